"""netfront against a lying backend: RX responses written straight into a guest's RX ring.

dom0 answers requests it took from A's RX ring with responses of its choosing (through
netback's own ring object, so the indices stay consistent).  A response must name a buffer
the frontend posted and has not had back yet, carry 1..4096 bytes inside its page, and a
packet may take at most 18 slots; anything else disconnects A's vif with a logged reason,
and nothing wrong is delivered.  B is unaffected.
"""

from __future__ import annotations

import os
from typing import Any

import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pvio.ringbuf.netif import NETRXF_MORE_DATA, RX_REQUEST, RX_RESPONSE, XEN_NETIF_NR_SLOTS_MIN
from tests.netenv import NetEnv, NicGuest, ip_of, net_env, recv_n, seq_of, udp_stream

FUZZ = os.environ.get("PVIO_FUZZ") == "1"


async def lie(
    env: NetEnv, a: NicGuest, responses: list[tuple[int, int, int, int]] | None, take: int
) -> list[int]:
    """Take ``take`` of A's posted RX requests in dom0 and answer with ``responses``
    (id, offset, flags, status; an id of -k means "the k-th id taken", modulo how many)."""
    vif = env.vif(a)
    ids = [rid for rid, _pad, _gref in RX_REQUEST.iter_unpack(vif.rx.take_requests(take))]
    assert len(ids) == take
    out = [
        (ids[(-rid - 1) % len(ids)] if rid < 0 else rid, off, flags, status)
        for rid, off, flags, status in responses or []
    ]
    vif.rx.send(b"".join(RX_RESPONSE.pack(*r) for r in out))
    vif.dom0.evtchn_send(vif.port)
    await trio.testing.wait_all_tasks_blocked()
    return ids


async def check_disconnected(env: NetEnv, a: NicGuest, b: NicGuest, reason: str, delivered: int) -> None:
    assert a.nic.error is not None and reason in a.nic.error
    assert env.count("netfront/vif1.0", "disconnects") == 1
    assert a.nic.pending() == delivered
    # The bystander is untouched.
    await b.nic.send_batch(udp_stream(b, b, 0))
    await trio.testing.wait_all_tasks_blocked()
    assert b.nic.error is None


async def test_a_duplicate_rx_id_is_delivered_once_then_disconnects(autojump_clock: Any) -> None:
    a, b = NicGuest("a", ip_of(0)), NicGuest("b", ip_of(1))
    async with net_env(a, b) as env:
        frames_before = a.nic.pending()
        await lie(env, a, [(-1, 0, 0, 64)] * 4, take=4)  # one buffer answered four times
        await check_disconnected(env, a, b, "not a posted buffer", frames_before + 1)


async def test_a_zero_byte_rx_response_disconnects(autojump_clock: Any) -> None:
    a, b = NicGuest("a", ip_of(0)), NicGuest("b", ip_of(1))
    async with net_env(a, b) as env:
        before = a.nic.pending()
        await lie(env, a, [(-1, 0, 0, 0)], take=1)
        await check_disconnected(env, a, b, "0 bytes", before)


async def test_an_rx_packet_of_19_slots_disconnects(autojump_clock: Any) -> None:
    a, b = NicGuest("a", ip_of(0)), NicGuest("b", ip_of(1))
    async with net_env(a, b) as env:
        before = a.nic.pending()
        n = XEN_NETIF_NR_SLOTS_MIN + 1
        await lie(env, a, [(-k - 1, 0, NETRXF_MORE_DATA if k + 1 < n else 0, 100) for k in range(n)], take=n)
        await check_disconnected(env, a, b, "more than 18 slots", before)


async def test_an_rx_packet_of_18_slots_is_accepted(autojump_clock: Any) -> None:
    a, b = NicGuest("a", ip_of(0)), NicGuest("b", ip_of(1))
    async with net_env(a, b) as env:
        n = XEN_NETIF_NR_SLOTS_MIN
        await lie(env, a, [(-k - 1, 0, NETRXF_MORE_DATA if k + 1 < n else 0, 100) for k in range(n)], take=n)
        assert a.nic.error is None
        [frame] = await recv_n(a.nic, 1)
        assert len(frame) == 1800
        await b.nic.send_batch(udp_stream(b, a, 5))
        assert [seq_of(f) for f in await recv_n(a.nic, 5)] == list(range(5))


RESPONSE = st.tuples(
    st.one_of(st.integers(-4, -1), st.integers(0, 300)),  # id: -k = the k-th buffer taken
    st.sampled_from([0, 0, 1, 100, 4000, 4095, 4096]),  # offset
    st.sampled_from([0, 0, NETRXF_MORE_DATA, 0xFF]),  # flags
    st.sampled_from([-2, -1, 0, 1, 14, 60, 100, 4096, 4097, 32767]),  # status
)


@settings(
    max_examples=300 if FUZZ else 12,
    deadline=None,
    derandomize=not FUZZ,
    suppress_health_check=list(HealthCheck),
)
@given(responses=st.lists(RESPONSE, min_size=1, max_size=24))
def test_fuzz_lying_backend_against_netfront(responses: list[tuple[int, int, int, int]]) -> None:
    """Whatever RX responses a backend writes: nothing escapes the guest, A either stays up or
    disconnects with a reason, A never holds more frames than responses, B loses nothing."""

    async def scenario() -> None:
        a, b = NicGuest("a", ip_of(0)), NicGuest("b", ip_of(1))
        async with net_env(a, b) as env:
            before = a.nic.pending()
            await lie(env, a, responses, take=len(responses))
            assert a.nic.pending() - before <= len(responses)
            if a.nic.error is None:
                assert all(len(f) > 0 for f in a.nic._rx_frames)
            assert env.hv.domains[a.domain.domid].state == "running"
            await b.nic.send_batch(udp_stream(b, b, 0))
            assert b.nic.error is None and env.hv.dom0 is not None and env.hv.dom0.state == "running"

    trio.run(scenario, clock=trio.testing.MockClock(autojump_threshold=0))
