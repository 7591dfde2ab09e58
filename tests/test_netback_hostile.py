"""netback against a hostile frontend: raw requests written straight into a guest's TX ring.

Three guests: the pair A and B exchange traffic before and after each attack, and the
hostile guest H (vif3.0) attacks.  H's ring is driven by hand: requests are packed with
``NETIF_TX`` and pushed with ``nic.tx.send`` (then H notifies netback).  Where a request
names one of H's TX pool pages, its id is that pool slot, claimed from H's netfront, so
the netfront reaps the response like one of its own (a status other than OKAY is counted
``tx_errors.<status>`` there).

The last test attacks the handshake instead: a :class:`HandmadeFrontend` writes keys that
are missing, not numbers, or name grants and ports that are not its own.

Every attack must be contained: a malformed packet is answered ERROR, counted and logged;
a frontend clearly broken or hostile gets its vif disabled with a logged reason naming
it.  Either way A and B lose nothing, and dom0 and the hypervisor keep running.
"""

from __future__ import annotations

import logging
import os
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pvio import XenbusState
from pvio.core.ratelimit import LOG_BURST, LOG_INTERVAL_S
from pvio.frontends.netstack import udp_packet
from pvio.ringbuf import NETIF_TX
from pvio.ringbuf.netif import (
    NETIF_RSP_ERROR,
    NETTXF_EXTRA_INFO,
    NETTXF_MORE_DATA,
    XEN_NETIF_EXTRA_TYPE_GSO,
)
from tests.netenv import (
    HandmadeFrontend,
    NetEnv,
    NicGuest,
    ip_of,
    net_env,
    recv_n,
    seq_of,
    udp_stream,
    wait_until,
)

K = 40  # frames each way per exchange of the A/B pair
HOSTILE = "vif3.0"


@asynccontextmanager
async def three_guests() -> AsyncIterator[tuple[NetEnv, NicGuest, NicGuest, NicGuest]]:
    a, b, h = NicGuest("a", ip_of(0)), NicGuest("b", ip_of(1)), NicGuest("hostile", ip_of(2))
    async with net_env(a, b, h) as env:
        assert env.vif(h).vif_name == HOSTILE
        yield env, a, b, h


async def exchange(a: NicGuest, b: NicGuest, start: int) -> None:
    """K frames A -> B and K frames B -> A, all received, in order, and nothing more."""
    await a.nic.send_batch(udp_stream(a, b, K, start=start))
    await b.nic.send_batch(udp_stream(b, a, K, start=start))
    at_b = await recv_n(b.nic, K)
    at_a = await recv_n(a.nic, K)
    await trio.testing.wait_all_tasks_blocked()
    assert [seq_of(f) for f in at_b] == [seq_of(f) for f in at_a] == list(range(start, start + K))
    assert a.nic.pending() == b.nic.pending() == 0


def claim(h: NicGuest) -> int:
    """Take a free TX pool slot from H's netfront, as if it had staged a frame there."""
    sid = h.nic.tx_free.pop()
    h.nic.tx_outstanding[sid] = True
    return sid


def push_raw(h: NicGuest, requests: list[dict[str, int]]) -> None:
    """Write ``requests`` (netif_tx_request fields) into H's TX ring, publish, notify netback."""
    sent, _notify = h.nic.tx.send(b"".join(NETIF_TX.pack_request(**r) for r in requests))
    assert sent == len(requests)
    h.evtchn_send(h.nic.port)


def chain(h: NicGuest, nslots: int, size: int = 100) -> list[dict[str, int]]:
    """A well-formed packet of ``nslots`` slots of ``size`` bytes from H's own pool pages."""
    reqs = []
    for k in range(nslots):
        sid = claim(h)
        reqs.append(
            {
                "gref": h.nic.tx_refs[sid],
                "offset": 0,
                "flags": NETTXF_MORE_DATA if k + 1 < nslots else 0,
                "id": sid,
                "size": nslots * size if k == 0 else size,
            }
        )
    return reqs


def netback_log(caplog: pytest.LogCaptureFixture, level: int) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "pvio.netback" and r.levelno == level]


def drops(env: NetEnv, owner: str) -> dict[str, int]:
    return {k: v for k, v in env.hv.counters[owner].items() if k.startswith("drops.") and v}


def backend_state(env: NetEnv, h: NicGuest) -> XenbusState:
    return XenbusState(int(env.hv.toolstack.read(f"{env.vif(h).path}/state")))


def assert_pair_unharmed(env: NetEnv, a: NicGuest, b: NicGuest, rounds: int) -> None:
    """The pair received exactly what it was sent, and nothing of theirs was dropped anywhere."""
    assert (
        env.count("netfront/vif1.0", "packets.rx") == env.count("netfront/vif2.0", "packets.rx") == rounds * K
    )
    for owner in ("netback/vif1.0", "netback/vif2.0", "switch/switch0"):
        assert {k: v for k, v in drops(env, owner).items() if k != "drops.same_port"} == {}
    assert env.hv.dom0 is not None and env.hv.dom0.state == "running"
    assert all(dom.state == "running" for dom in env.hv.domains.values())
    assert sorted(env.hv.domains) == [0, 1, 2, 3]


# ---------------------------------------------------------------------------- malformed packets


@pytest.mark.parametrize(
    ("gref", "status_name"),
    [(4096, "bad_gntref"), (2047, "general_error")],
    ids=["ref-outside-the-table", "ref-never-granted"],
)
async def test_a_bad_grant_is_answered_error_counted_and_logged(
    autojump_clock: Any, caplog: pytest.LogCaptureFixture, gref: int, status_name: str
) -> None:
    async with three_guests() as (env, a, b, h):
        await exchange(a, b, 0)
        push_raw(h, [{"gref": gref, "offset": 0, "flags": 0, "id": claim(h), "size": 64}])
        await trio.testing.wait_all_tasks_blocked()
        assert env.count("netfront/vif3.0", f"tx_errors.{NETIF_RSP_ERROR}") == 1
        assert drops(env, f"netback/{HOSTILE}") == {"drops.bad_grant": 1}
        assert netback_log(caplog, logging.WARNING) == [f"{HOSTILE}: TX grant copy failed: {status_name}"]
        assert env.vif(h).connected and backend_state(env, h) == XenbusState.CONNECTED
        await exchange(a, b, K)
        assert_pair_unharmed(env, a, b, 2)
        assert netback_log(caplog, logging.ERROR) == []


async def test_a_slot_crossing_its_page_is_dropped_as_bad_offset(
    autojump_clock: Any, caplog: pytest.LogCaptureFixture
) -> None:
    async with three_guests() as (env, a, b, h):
        await exchange(a, b, 0)
        sid = claim(h)
        push_raw(h, [{"gref": h.nic.tx_refs[sid], "offset": 4000, "flags": 0, "id": sid, "size": 200}])
        await trio.testing.wait_all_tasks_blocked()
        assert env.count("netfront/vif3.0", f"tx_errors.{NETIF_RSP_ERROR}") == 1
        assert drops(env, f"netback/{HOSTILE}") == {"drops.bad_offset": 1}
        assert netback_log(caplog, logging.WARNING) == [
            f"{HOSTILE}: TX slot offset 4000 + size 200 crosses the page"
        ]
        assert env.vif(h).connected
        await exchange(a, b, K)
        assert_pair_unharmed(env, a, b, 2)


async def test_a_packet_of_19_slots_is_dropped_and_the_vif_stays_up(
    autojump_clock: Any, caplog: pytest.LogCaptureFixture
) -> None:
    async with three_guests() as (env, a, b, h):
        await exchange(a, b, 0)
        push_raw(h, chain(h, 19))
        await trio.testing.wait_all_tasks_blocked()
        # One ERROR response per slot, one drop per packet.
        assert env.count("netfront/vif3.0", f"tx_errors.{NETIF_RSP_ERROR}") == 19
        assert drops(env, f"netback/{HOSTILE}") == {"drops.too_many_slots": 1}
        assert netback_log(caplog, logging.WARNING) == [f"{HOSTILE}: TX packet of 19 slots (max 18)"]
        assert h.nic.error is None and len(h.nic.tx_free) == 256  # every slot answered and reaped
        # The vif still works: a good frame from H reaches A.
        await h.nic.send(udp_stream(h, a, 1, start=7777)[0])
        [frame] = await recv_n(a.nic, 1)
        assert seq_of(frame) == 7777 and frame[6:12] == h.nic.mac
        await exchange(a, b, K)
        assert env.count("netfront/vif1.0", "packets.rx") == 2 * K + 1
        assert env.count("netfront/vif2.0", "packets.rx") == 2 * K
        assert backend_state(env, h) == XenbusState.CONNECTED


async def test_a_packet_of_18_slots_is_accepted(autojump_clock: Any) -> None:
    # The boundary: every backend must take XEN_NETIF_NR_SLOTS_MIN = 18 slots.
    async with three_guests() as (env, a, _b, h):
        reqs = chain(h, 18)
        payload = bytes(range(256)) * 8
        frame = udp_packet(h.nic.mac, a.nic.mac, h.ip, a.ip, 1, 2, payload)
        # Spread the frame over the 18 pool pages, 100 bytes per later slot.
        first = len(frame) - 17 * 100
        pieces = [frame[:first]] + [frame[first + 100 * k : first + 100 * (k + 1)] for k in range(17)]
        for req, piece in zip(reqs, pieces, strict=True):
            h.nic.tx_views[req["id"]][: len(piece)] = piece
            req["size"] = len(piece)
        reqs[0]["size"] = len(frame)
        push_raw(h, reqs)
        [got] = await recv_n(a.nic, 1)
        assert got == frame
        assert drops(env, f"netback/{HOSTILE}") == {}


# ---------------------------------------------------------------------------- fatal: vif disabled


async def _attack_disables_the_vif(caplog: pytest.LogCaptureFixture, attack: Any, reason: str) -> None:
    async with three_guests() as (env, a, b, h):
        await exchange(a, b, 0)
        assert env.hv.dom0 is not None and len(env.hv.dom0.maptrack) == 6  # 3 vifs x 2 rings
        attack(h)
        await trio.testing.wait_all_tasks_blocked()
        vif = env.vif(h)
        assert vif.error == reason
        assert not vif.connected and vif not in env.switch.ports
        assert backend_state(env, h) == XenbusState.CLOSED
        assert env.count(f"netback/{HOSTILE}", "disconnects") == 1
        assert len(env.hv.dom0.maptrack) == 4  # H's rings unmapped, the pair's still mapped
        assert netback_log(caplog, logging.ERROR) == [f"{HOSTILE} disabled: {reason}"]
        await exchange(a, b, K)
        assert_pair_unharmed(env, a, b, 2)


async def test_a_packet_of_21_slots_disables_the_vif(
    autojump_clock: Any, caplog: pytest.LogCaptureFixture
) -> None:
    await _attack_disables_the_vif(
        caplog, lambda h: push_raw(h, chain(h, 21)), "TX packet of more than 20 slots (fatal_skb_slots)"
    )


async def test_a_request_id_outside_the_ring_disables_the_vif(
    autojump_clock: Any, caplog: pytest.LogCaptureFixture
) -> None:
    def attack(h: NicGuest) -> None:
        sid = claim(h)
        push_raw(h, [{"gref": h.nic.tx_refs[sid], "offset": 0, "flags": 0, "id": 256, "size": 64}])

    await _attack_disables_the_vif(caplog, attack, "TX request id 256 outside the ring of 256")


async def test_an_impossible_req_prod_disables_the_vif(
    autojump_clock: Any, caplog: pytest.LogCaptureFixture
) -> None:
    def attack(h: NicGuest) -> None:
        # req_prod is the u32 at offset 0 of the shared ring page; move it 1000 slots ahead.
        page = h.page(h.nic.tx_gfn)
        (req_prod,) = struct.unpack_from("<I", page, 0)
        struct.pack_into("<I", page, 0, req_prod + 1000)
        h.evtchn_send(h.nic.port)

    await _attack_disables_the_vif(
        caplog,
        attack,
        # one announce frame went through before the attack: req_cons = rsp_prod_pvt = 1
        "impossible req_prod from the frontend "
        "(TX ring: req_prod 1001, req_cons 1, rsp_prod_pvt 1, 256 slots)",
    )


# ---------------------------------------------------------------------------- hostile handshake


@pytest.mark.parametrize(
    ("keys", "reason"),
    [
        ({"tx_ring_ref": None}, "frontend key tx-ring-ref is missing"),
        ({"event_channel": "eth0"}, "frontend key event-channel='eth0' is not a number"),
        (
            {"tx_ring_ref": "4096"},
            "cannot map the rings or bind the event channel: dom0 map dom3 ref 4096: bad_gntref",
        ),
        (
            {"rx_ring_ref": "4096"},
            "cannot map the rings or bind the event channel: dom0 map dom3 ref 4096: bad_gntref",
        ),
        (
            {"event_channel": "1"},
            "cannot map the rings or bind the event channel: [Errno 22] dom0 bind_interdomain: EINVAL",
        ),
    ],
    ids=[
        "tx-ring-ref-missing",
        "event-channel-not-a-number",
        "bad-tx-ring-ref",
        "bad-rx-ring-ref",
        "foreign-port",
    ],
)
async def test_bad_frontend_keys_are_refused_and_the_pair_is_unharmed(
    autojump_clock: Any, caplog: pytest.LogCaptureFixture, keys: dict[str, str | None], reason: str
) -> None:
    a, b = NicGuest("a", ip_of(0)), NicGuest("b", ip_of(1))
    h = HandmadeFrontend("hostile", **keys)
    async with net_env(a, b, h) as env:
        await wait_until(lambda: h.backend_state is not None, what="netback's answer to H")
        assert h.backend_state == XenbusState.CLOSED
        vif = env.vif(h)
        assert vif.error == reason and not vif.connected and vif not in env.switch.ports
        assert env.count(f"netback/{HOSTILE}", "disconnects") == 1
        assert env.hv.dom0 is not None and len(env.hv.dom0.maptrack) == 4  # the pair's rings only
        assert netback_log(caplog, logging.ERROR) == [f"{HOSTILE} disabled: {reason}"]
        await exchange(a, b, 0)
        await exchange(a, b, K)
        assert_pair_unharmed(env, a, b, 2)


async def test_an_internal_error_in_netback_disables_that_vif_only(
    autojump_clock: Any, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bug in netback's handling of one vif (here: an exception from its TX work) must not take
    dom0 down: that vif is disabled with the reason logged, the other pair keeps exchanging."""
    from pvio.backends import netback

    real = netback.BackendVif._tx_work
    armed: list[int] = []  # the hostile guest's domid, once the attack starts

    def buggy(self: netback.BackendVif) -> int:
        if self.fe_domid in armed:
            raise RuntimeError("simulated netback bug")
        return real(self)

    def attack(h: NicGuest) -> None:
        armed.append(h.domain.domid)
        push_raw(h, chain(h, 1))

    monkeypatch.setattr(netback.BackendVif, "_tx_work", buggy)
    await _attack_disables_the_vif(caplog, attack, "internal error: RuntimeError('simulated netback bug')")


async def test_a_frontend_refused_by_its_backend_is_told_why(autojump_clock: Any) -> None:
    """The backend's reason reaches the frontend (netback leaves it in the backend's ``error``
    node, as xenbus_dev_fatal does): the guest's connect fails naming it, not with ENOSYS."""
    from pvio.frontends.guests import NicGuest
    from pvio.toolstack import NicConfig, boot_network

    a, b = NicGuest("a", "10.0.0.1"), NicGuest("b", "10.0.0.2")
    refused = NicConfig(backend="lossy", options={"bogus": 1})
    with pytest.raises(RuntimeError) as info:
        async with boot_network([a, b], nics=[refused, None]):
            pass
    message = str(info.value)
    assert message.startswith(
        "guest a stopped while connecting: kernel raised NetfrontError: vif1.0: the backend"
    )
    assert "refused the vif: backend 'lossy' on vif1.0 (dom1): on_attach failed" in message
    assert "unknown options ['bogus']" in message


async def test_a_flood_of_malformed_packets_logs_a_bounded_number_of_lines(
    autojump_clock: Any, caplog: pytest.LogCaptureFixture
) -> None:
    async with three_guests() as (env, a, b, h):
        await exchange(a, b, 0)
        rounds, per_round = 50, 40
        for _ in range(rounds):  # within one window of the limiter: virtual time barely moves
            reqs = []
            for _ in range(per_round):
                sid = claim(h)
                reqs.append({"gref": h.nic.tx_refs[sid], "offset": 4000, "flags": 0, "id": sid, "size": 200})
            push_raw(h, reqs)
            await trio.testing.wait_all_tasks_blocked()
        total = rounds * per_round
        assert drops(env, f"netback/{HOSTILE}") == {"drops.bad_offset": total}
        lines = netback_log(caplog, logging.WARNING)
        assert len(lines) == LOG_BURST
        assert env.count(f"netback/{HOSTILE}", "log.suppressed") == total - LOG_BURST
        assert env.vif(h).connected
        await exchange(a, b, K)
        assert_pair_unharmed(env, a, b, 2)
        # The next window says how many were suppressed, in its first line.
        await trio.sleep(LOG_INTERVAL_S)
        sid = claim(h)
        push_raw(h, [{"gref": h.nic.tx_refs[sid], "offset": 4000, "flags": 0, "id": sid, "size": 200}])
        await trio.testing.wait_all_tasks_blocked()
        assert netback_log(caplog, logging.WARNING)[-1].endswith(
            f"({total - LOG_BURST} similar messages suppressed)"
        )


async def test_an_extra_info_chain_split_across_two_pushes_is_read_as_one_packet(
    autojump_clock: Any, caplog: pytest.LogCaptureFixture
) -> None:
    async with three_guests() as (env, a, b, h):
        frame = udp_stream(h, a, 1, start=4242)[0]
        sid = claim(h)
        h.nic.tx_views[sid][: len(frame)] = frame
        first = {"gref": h.nic.tx_refs[sid], "offset": 0, "flags": NETTXF_EXTRA_INFO, "id": sid}
        push_raw(h, [{**first, "size": len(frame)}])  # the extra-info slot is not published yet
        await trio.testing.wait_all_tasks_blocked()
        extra = struct.pack("<BB", XEN_NETIF_EXTRA_TYPE_GSO, 0) + bytes(NETIF_TX.req_size - 2)
        sent, _ = h.nic.tx.send(extra)
        assert sent == 1
        h.evtchn_send(h.nic.port)
        [got] = await recv_n(a.nic, 1)
        await trio.testing.wait_all_tasks_blocked()
        assert got == frame
        assert env.vif(h).connected and drops(env, f"netback/{HOSTILE}") == {}
        assert h.nic.error is None and len(h.nic.tx_free) == 256
        assert netback_log(caplog, logging.ERROR) == []
        await exchange(a, b, 0)


FUZZ = os.environ.get("PVIO_FUZZ") == "1"
TX_SLOT = st.fixed_dictionaries(
    {
        "gref": st.sampled_from([-1, -1, -1, 0, 4095, 4096, 2**32 - 1]),  # -1: one of H's own pool grants
        "offset": st.sampled_from([0, 0, 1, 2000, 4095, 4096, 65535]),
        "flags": st.sampled_from([0, 0, NETTXF_MORE_DATA, NETTXF_EXTRA_INFO, 0xFFFF]),
        "id": st.sampled_from([-1, -1, 0, 255, 256, 65535]),  # -1: a claimed pool slot
        "size": st.sampled_from([0, 1, 14, 60, 100, 4096, 4097, 65535]),
    }
)


@settings(
    max_examples=200 if FUZZ else 10,
    deadline=None,
    derandomize=not FUZZ,
    suppress_health_check=list(HealthCheck),
)
@given(pushes=st.lists(st.lists(TX_SLOT, min_size=1, max_size=24), min_size=1, max_size=3))
def test_fuzz_malicious_frontend_against_netback(pushes: list[list[dict[str, int]]]) -> None:
    """Whatever H writes into its TX ring: nothing escapes dom0 (no internal error), H's vif
    is either up or disabled with a logged reason, and the pair A/B loses nothing."""

    async def scenario() -> None:
        async with three_guests() as (env, a, b, h):
            await exchange(a, b, 0)
            for push in pushes:
                reqs = []
                for slot in push:
                    req = dict(slot)
                    if req["id"] == -1 and h.nic.tx_free:
                        req["id"] = claim(h)
                    elif req["id"] == -1:
                        req["id"] = 0
                    if req["gref"] == -1:
                        req["gref"] = h.nic.tx_refs[req["id"] % len(h.nic.tx_refs)]
                    reqs.append(req)
                if h.nic.connected and h.nic.error is None:
                    h.nic.tx.send(b"".join(NETIF_TX.pack_request(**r) for r in reqs))
                    h.evtchn_send(h.nic.port)
                await trio.testing.wait_all_tasks_blocked()
            vif = env.vif(h)
            assert env.count(f"netback/{HOSTILE}", "internal_errors") == 0
            assert vif.connected or vif.error is not None
            await exchange(a, b, K)
            # H's own garbage may land in the switch's drops; nothing of the pair's may.
            assert (
                env.count("netfront/vif1.0", "packets.rx")
                == env.count("netfront/vif2.0", "packets.rx")
                == 2 * K
            )
            for owner in ("netback/vif1.0", "netback/vif2.0"):
                assert drops(env, owner) == {}
            assert all(dom.state == "running" for dom in env.hv.domains.values())

    trio.run(scenario, clock=trio.testing.MockClock(autojump_threshold=0))
