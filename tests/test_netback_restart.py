"""netback stops or crashes mid-stream, a new netback starts, and every vif reconnects.

When netback stops (``NetBack.stop``) or dies of a bug of its own, each vif it served lets
go of its guest (rings unmapped, event channels closed, staging pages freed) and goes
Closing, Closed in xenstore, as a Linux backend does when its driver is unbound.  The
frontends see it: each takes what the backend answered before it went, tears the device
down (grants revoked once the backend is Closed, so none is still mapped), goes Closed and
then Initialising.  A new netback takes over the vifs the old one left Closed, waits for
each frontend to be back in Initialising, and runs the handshake again: InitWait,
Connected.

The stream A -> B is numbered.  Every frame A handed to netfront is accounted for exactly:
delivered to B (in order, once), or lost with the backend and counted where it was lost:
TX requests the old netback never answered (A's ``tx_lost_slots``), frames queued for B
when its vif was torn down (``drops.vif_closed``), frames the switch had no port for while
B's vif was away (``drops.no_egress``).  After the network is torn down the hypervisor's
own bookkeeping shows nothing leaked: no mapping, no grant, no netback task, no guest
memory.
"""

from __future__ import annotations

import gc
import logging
import weakref
from collections.abc import Callable
from typing import Any

import pytest
import trio
import trio.testing

from pvio import XenbusState
from pvio.backends.netback import NetBack
from pvio.cpu.guest import X86Guest
from pvio.frontends.netfront import NetfrontError
from pvio.frontends.netstack import icmp_echo
from pvio.harness.demo import wait_x86_ready
from tests.netenv import NetEnv, NicGuest, ip_of, net_env, recv_n, seq_of, udp_stream, wait_until
from tests.test_netif import VifStateLog
from tests.test_teardown_leaks import netback_tasks

BATCH = 40


async def stream(a: NicGuest, b: NicGuest, start: int, n: int) -> int:
    """Send frames start..start+n-1 A -> B in batches; returns how many A's netfront took
    (a batch refused while the vif is away is not taken: ``NetfrontError``)."""
    taken = 0
    for first in range(start, start + n, BATCH):
        try:
            await a.nic.send_batch(udp_stream(a, b, min(BATCH, start + n - first), start=first))
            taken += min(BATCH, start + n - first)
        except NetfrontError:
            break
    return taken


def lost(env: NetEnv) -> dict[str, int]:
    return {
        "a.tx_lost_slots": env.count("netfront/vif1.0", "tx_lost_slots"),
        "b.drops.vif_closed": env.count("netback/vif2.0", "drops.vif_closed"),
        "switch.drops.no_egress": env.count("switch/switch0", "drops.no_egress"),
    }


def all_connected(guests: list[NicGuest]) -> Callable[[], bool]:
    return lambda: all(g.nic.connected for g in guests)


async def start_netback(env: NetEnv) -> NetBack:
    assert env.hv.dom0 is not None
    dom0 = env.hv.dom0.kernel
    netback = NetBack(dom0, env.switch)  # type: ignore[arg-type]
    dom0.spawn(netback.run, name="netback-restarted")  # type: ignore[attr-defined]
    env.netback = netback
    return netback


@pytest.mark.parametrize("how", ["stop", "crash"])
async def test_netback_restarts_and_every_vif_reconnects_with_exact_loss_accounting(
    autojump_clock: Any, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    a, b = NicGuest("a", ip_of(0)), NicGuest("b", ip_of(1))
    logs: list[VifStateLog] = []
    async with net_env(a, b, before_guests=lambda hv: logs.append(VifStateLog(hv, 1))) as env:
        hv, old = env.hv, env.netback
        assert old is not None and hv.dom0 is not None
        sent = await stream(a, b, 0, 200)
        got = await recv_n(b.nic, 200)
        # Mid-stream: a batch is on A's TX ring, netback has not run yet, when it goes.
        sent += await stream(a, b, 200, BATCH)
        if how == "stop":
            old.stop()
        else:  # a bug in netback itself: its next scan raises
            boom = RuntimeError("simulated netback crash")

            async def crash() -> None:
                raise boom

            monkeypatch.setattr(old, "_scan", crash)
            hv.toolstack.write(f"{old.base}/poke", "1")  # any change below the directory: a scan
        await trio.testing.wait_all_tasks_blocked()
        assert old.vifs == {}
        assert not any(m.granter.domid in (1, 2) for m in hv.dom0.maptrack.values())
        assert not a.nic.connected and not b.nic.connected
        # The frontends wait in Initialising for a backend; nothing of theirs is granted.
        for g in (a, b):
            assert XenbusState(int(hv.toolstack.read(f"{g.nic.dir}/state"))) == XenbusState.INITIALISING
        sent += await stream(a, b, 10_000, BATCH)  # refused: no device

        new = await start_netback(env)
        await wait_until(all_connected([a, b]), what="both vifs to reconnect")
        assert set(new.vifs) == {(1, 0), (2, 0)}
        assert env.count("netfront/vif1.0", "reconnects") == env.count("netfront/vif2.0", "reconnects") == 1
        sent_after = await stream(a, b, 1000, 200)
        got_after = await recv_n(b.nic, 200)
        await trio.testing.wait_all_tasks_blocked()
        got += [f for f in got_after if seq_of(f) < 1000]
        got_after = [f for f in got_after if seq_of(f) >= 1000]
        while b.nic.pending():
            got_after += [await b.nic.recv()]

        # Exact accounting: every frame A's netfront took is at B or counted lost, once.
        seqs = [seq_of(f) for f in got]
        assert seqs == sorted(set(seqs)) and seqs[:200] == list(range(200))
        assert [seq_of(f) for f in got_after] == list(range(1000, 1000 + sent_after))
        assert sent == 200 + BATCH and sent_after == 200
        assert len(got) + sum(lost(env).values()) == sent, (len(got), lost(env))
        # Stopped at once, netback never took the last batch: A counts it lost with the backend.
        # The crash comes at netback's next scan, after the batch went through: nothing lost.
        in_flight = BATCH if how == "stop" else 0
        assert lost(env) == {
            "a.tx_lost_slots": in_flight,
            "b.drops.vif_closed": 0,
            "switch.drops.no_egress": 0,
        }
        assert len(got) == 200 + BATCH - in_flight
        # The states each side went through, as Xen's: Closing, Closed, Initialising, InitWait, Connected.
        states = logs[0].states
        tail = states[states.index(("BE", XenbusState.CLOSING)) :]
        assert tail == [
            ("BE", XenbusState.CLOSING),
            ("BE", XenbusState.CLOSED),
            ("FE", XenbusState.CLOSED),
            ("FE", XenbusState.INITIALISING),
            ("BE", XenbusState.INIT_WAIT),
            ("FE", XenbusState.CONNECTED),
            ("BE", XenbusState.CONNECTED),
        ]
        assert env.count("netfront/vif1.0", "grants_still_mapped") == 0
        if how == "crash":
            assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == [
                f"dom0: netback crashed: {boom!r}"
            ]
        else:
            assert [r for r in caplog.records if r.levelno >= logging.ERROR] == []
        ram = [weakref.ref(g.domain.mem) for g in (a, b)]
        domids = [g.domain.domid for g in (a, b)]
        assert sorted(netback_tasks(env)) == ["netback-vif1.0", "netback-vif2.0"]
        for g in (a, b):
            hv.destroy(g.domain)
        await trio.testing.wait_all_tasks_blocked()
        assert netback_tasks(env) == []
        assert not any(m.granter.domid in domids for m in hv.dom0.maptrack.values())
        assert hv.dom0.maptrack == {}
        assert new.vifs == {}
    del a, b, env, g
    gc.collect()
    assert [r() for r in ram] == [None, None]


async def ping_all(a: NicGuest, mac: bytes, ip: str, seqs: range) -> list[int]:
    """ICMP echo requests A -> the x86 guest, one at a time; the sequence numbers answered."""
    answered = []
    for seq in seqs:
        await a.nic.send(icmp_echo(a.nic.mac, mac, ip_of(0), ip, 7, seq, b"restart"))
        [reply] = await recv_n(a.nic, 1)
        answered.append(int.from_bytes(reply[14 + 20 + 6 : 14 + 20 + 8], "big"))
    return answered


async def test_the_c_netfront_reconnects_when_netback_restarts(autojump_clock: Any) -> None:
    """The x86 guest's C netfront follows its backend too: Closing, Closed, its grants revoked
    (none still mapped), Closed, Initialising, and the handshake again with the new netback."""
    a = NicGuest("a", ip_of(0))
    ip = "10.0.0.9"
    x86 = X86Guest(name="x86-echo", cmdline=f"mode=echo ip={ip}")
    logs: list[VifStateLog] = []
    async with net_env(a, x86, before_guests=lambda hv: logs.append(VifStateLog(hv, 2))) as env:
        hv, old = env.hv, env.netback
        assert old is not None and hv.dom0 is not None
        mac = await wait_x86_ready(x86, env.switch)
        await trio.sleep(0.01)
        assert await ping_all(a, mac, ip, range(10)) == list(range(10))
        old.stop()
        await trio.testing.wait_all_tasks_blocked()
        await wait_until(lambda: "released:" in x86.domain.console, what="the C netfront to let go")
        assert (
            f"netfront: vif{x86.domain.domid}.0 released: 0 TX slots lost in flight, 0 grants still mapped"
            in (x86.domain.console)
        )
        assert not any(m.granter.domid == x86.domain.domid for m in hv.dom0.maptrack.values())
        await start_netback(env)
        await wait_until(lambda: "reconnected (1)" in x86.domain.console, what="the C netfront to reconnect")
        await wait_until(all_connected([a]), what="a to reconnect")
        assert await ping_all(a, mac, ip, range(10, 20)) == list(range(10, 20))
        states = logs[0].states
        assert states[states.index(("BE", XenbusState.CLOSING)) :] == [
            ("BE", XenbusState.CLOSING),
            ("BE", XenbusState.CLOSED),
            ("FE", XenbusState.CLOSED),
            ("FE", XenbusState.INITIALISING),
            ("BE", XenbusState.INIT_WAIT),
            ("FE", XenbusState.CONNECTED),
            ("BE", XenbusState.CONNECTED),
        ]
        assert x86.domain.alive and x86.domain.counters["exits.fault"] == 0
        hv.destroy(x86.domain)
        hv.destroy(a.domain)
        await trio.testing.wait_all_tasks_blocked()
        assert hv.dom0.maptrack == {} and netback_tasks(env) == []
