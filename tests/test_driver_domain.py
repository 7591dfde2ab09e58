"""A driver domain: netback and its switch in an OS process of their own (pvio.remote.backend).

Real processes and the real clock (a MockClock cannot see another process): the frontends
are PyGuests in the hypervisor's process, their vifs' backend is the driver domain, whose
grant copies run in its own process over the RAM the hypervisor handed it.
"""

from __future__ import annotations

import os
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio

from pvio import Hypervisor
from pvio.abi import GTF_reading, GTF_writing
from pvio.remote.backend import add_driver_vif, start_driver_domain
from pvio.remote.guests import frame_number, numbered_frames
from pvio.remote.host import RemoteGuest
from pvio.toolstack import NicConfig, add_vif, start_network
from tests.netenv import NicGuest, ip_of, net_env, recv_n, wait_until


@asynccontextmanager
async def driver_env(
    *guests: Any, hv: Hypervisor | None = None, **driver: Any
) -> AsyncIterator[tuple[Hypervisor, RemoteGuest]]:
    """A hypervisor (or ``hv``), a driver domain (``driver``: start_driver_domain's options),
    and ``guests`` each with a vif it serves, connected and announced to its switch."""
    async with _given_or_new(hv) as hv:
        dd = await start_driver_domain(hv, vifs=len(guests), **driver)
        await start_network(hv, guests, nics=[NicConfig(backend_domain=dd)] * len(guests), timeout_s=30)
        yield hv, dd


@asynccontextmanager
async def _given_or_new(hv: Hypervisor | None) -> AsyncIterator[Hypervisor]:
    if hv is not None:
        yield hv
        return
    async with Hypervisor() as new:
        yield new


async def test_a_stream_through_a_driver_domain_arrives_once_and_in_order() -> None:
    """3000 frames A -> B: every one arrives once and in order, and the per-frame backend work
    (both grant copies of each frame) ran in the driver domain's process, not in the
    hypervisor's: the host dispatched none of its hypercalls."""
    a, b = NicGuest("a", ip_of(0)), NicGuest("b", ip_of(1))
    async with driver_env(a, b) as (hv, dd):
        before = await dd.call("counters")
        host_before = hv.snapshot()
        frames = numbered_frames(a.nic.mac, b.nic.mac, a.ip, b.ip, 3000, 64)
        async with trio.open_nursery() as nursery:
            got: list[bytes] = []

            async def receive() -> None:
                got.extend(await recv_n(b.nic, 3000, timeout_s=60))

            nursery.start_soon(receive)
            for i in range(0, 3000, 64):
                await a.nic.send_batch(frames[i : i + 64])
        assert [frame_number(f) for f in got] == list(range(3000))
        after = await dd.call("counters")
        ddid = f"dom{dd.domain.domid}"
        copies = after["domains"][ddid]["grant.copies"] - before["domains"][ddid].get("grant.copies", 0)
        assert copies == 2 * 3000  # into its TX area, out into B's buffers: one each way
        assert after["devices"][f"netback/vif{a.domain.domid}.0"]["packets.tx"] == 3001  # and the announce
        diff = hv.snapshot().diff(host_before)
        assert diff.total("grant.copies", "domain") == 0  # none in the hypervisor's process
        # Nothing crosses the socket during the stream: copies are local, sends are posted.
        assert diff[ddid].get("remote.hypercalls", 0) == 0


async def test_a_killed_driver_domain_leaves_the_hypervisor_and_its_other_guests_running() -> None:
    """SIGKILL the driver domain's process mid-stream: its domain is destroyed with the one-line
    reason, the frontends' pages it had mapped are unpinned (their grants can be revoked),
    the hypervisor runs on, and a dom0 network of other guests loses nothing."""
    c, d = NicGuest("c", ip_of(2)), NicGuest("d", ip_of(3))
    async with net_env(c, d, timeout_s=30) as env:
        a, b = NicGuest("a", ip_of(0)), NicGuest("b", ip_of(1))
        async with driver_env(a, b, hv=env.hv) as (hv, dd):
            assert dd.process is not None
            assert a.domain.mapped_by_others  # its rings are mapped by the driver domain
            ddid = dd.domain.domid
            got_d: list[bytes] = []
            async with trio.open_nursery() as nursery:

                async def stream_a() -> None:
                    frames = numbered_frames(a.nic.mac, b.nic.mac, a.ip, b.ip, 64, 64)
                    with pytest.raises(Exception):  # noqa: B017 - how it stops is netfront's affair
                        while True:
                            await a.nic.send_batch(frames)

                nursery.start_soon(stream_a)
                frames = numbered_frames(c.nic.mac, d.nic.mac, c.ip, d.ip, 2000, 64)
                for i in range(0, 2000, 64):
                    await c.nic.send_batch(frames[i : i + 64])
                    if i == 512:
                        os.kill(dd.process.pid, signal.SIGKILL)
                got_d = await recv_n(d.nic, 2000, timeout_s=60)
                await wait_until(lambda: not dd.domain.alive, 60, "the driver domain to be destroyed")
                nursery.cancel_scope.cancel()
            assert [frame_number(f) for f in got_d] == list(range(2000))  # 0 loss for dom0's guests
            assert dd.domain.crash_reason == (
                f"kernel raised RemoteGuestError: the guest's process {dd.process.pid} was killed by SIGKILL"
            )
            assert ddid not in hv.domains
            # The frontends see their backend vanish (its directory went with its domain) and
            # carry on, as Linux's xen-netfront does: the device stays until it is removed.
            await wait_until(
                lambda: all(env.count(f"netfront/vif{g.domain.domid}.0", "backend_vanished") for g in (a, b)),
                60,
                "the frontends to see their backend vanish",
            )
            assert a.domain.alive and b.domain.alive
            for g in (a, b):
                assert not g.domain.mapped_by_others  # unpinned: the guest can revoke its grants
                flags = [g.gnttab.flags(ref) for ref in range(8, 64)]
                assert not any(f & (GTF_reading | GTF_writing) for f in flags)
            # dom0's network still works.
            await c.nic.send_batch(numbered_frames(c.nic.mac, d.nic.mac, c.ip, d.ip, 10, 64))
            assert [frame_number(f) for f in await recv_n(d.nic, 10)] == list(range(10))


async def test_a_destroyed_frontend_is_let_go_of_in_the_driver_domain() -> None:
    """Destroying B: the hypervisor revokes the driver domain's mappings of B's pages and tells
    its process (FOREIGN_GONE); netback there drops B's vif, and A's vif serves on."""
    a, b = NicGuest("a", ip_of(0)), NicGuest("b", ip_of(1))
    async with driver_env(a, b) as (hv, dd):
        bid = b.domain.domid
        assert {m[0] for m in await dd.call("mappings")} == {a.domain.domid, bid}
        hv.destroy(b.domain)
        with trio.fail_after(30):
            while True:
                vifs = await dd.call("vifs")
                if not vifs[f"vif{bid}.0"]["connected"]:
                    break
                await trio.sleep(0.01)
        assert {m[0] for m in await dd.call("mappings")} == {a.domain.domid}
        assert vifs[f"vif{a.domain.domid}.0"]["connected"]


async def test_a_guest_whose_ram_is_not_shared_cannot_be_mapped_by_a_driver_domain() -> None:
    """add_driver_vif refuses a guest with anonymous RAM in one line; a vif made by hand for one
    anyway fails in the driver domain's netback (its ring map answers general_error), and no
    pin or mapping of that guest is left behind."""
    a = NicGuest("a", ip_of(0))
    async with Hypervisor() as hv:
        dd = await start_driver_domain(hv, vifs=1)
        dom = hv.create_domain(a, name="a")
        with pytest.raises(ValueError, match="needs the guest's RAM in a memfd"):
            add_driver_vif(hv, dom, dd)
        add_vif(hv, dom, backend=dd.domain)
        await hv.start(dom)
        with trio.fail_after(30):
            while True:
                vif = (await dd.call("vifs")).get(f"vif{dom.domid}.0")
                if vif is not None and vif["error"]:
                    break
                await trio.sleep(0.01)
        assert "general_error" in vif["error"]
        assert dom.mapped_by_others == {}
        assert dd.domain.maptrack == {}
        assert await dd.call("mappings") == []
        assert dd.domain.alive


async def test_a_busy_polling_netback_is_not_notified_while_it_polls(autojump_clock: Any) -> None:
    """With a busy-poll budget (a backend with a CPU of its own), netback's service task polls
    on instead of arming A's TX event index, so A's netfront pushes a stream's batches without
    notifying it; once the budget runs out netback arms and sleeps, and the next push notifies."""
    from pvio.frontends.netstack import udp_packet

    a, b = NicGuest("a", ip_of(0)), NicGuest("b", ip_of(1))
    async with net_env(a, b) as env:
        assert env.netback is not None
        frames = [udp_packet(a.nic.mac, b.nic.mac, a.ip, b.ip, 7000, 7001, bytes(18)) for _ in range(64)]
        vif, nf = f"netback/vif{a.domain.domid}.0", f"netfront/vif{a.domain.domid}.0"
        sent = env.count(nf, "notifications.sent")
        await a.nic.send_batch(frames[:1])  # netback sleeps, armed: notified
        assert len(await b.nic.recv_batch()) == 1
        assert env.count(nf, "notifications.sent") == sent + 1
        env.netback.busy_poll = 1_000
        await a.nic.send_batch(frames[:1])  # notified (it slept), then netback polls
        got = len(await b.nic.recv_batch())
        for i in range(0, 64, 8):
            await a.nic.send_batch(frames[i : i + 8])
            got += len(await b.nic.recv_batch())
        assert got == 65
        assert env.count(nf, "notifications.sent") == sent + 2  # none while netback polled
        assert env.count(vif, "busy_poll.empty_polls") > 0
        await trio.sleep(0.01)  # the budget runs out: netback arms and sleeps
        await a.nic.send_batch(frames[:1])
        assert len(await b.nic.recv_batch()) == 1
        assert env.count(nf, "notifications.sent") == sent + 3


async def test_the_driver_domain_placement_reports_the_backends_counts() -> None:
    """measure_stream's driver-domain placement: every frame arrives; the grant copies (two per
    frame) are the driver domain's own, counted in its process; its CPU time is reported."""
    from pvio.remote.stream import measure_stream

    figure = await measure_stream("driver-domain", 640, pin=False)
    assert (figure.packets, figure.dropped, figure.processes) == (640, 0, 2)
    assert figure.per_packet["grant_copies"] == 2.0
    assert figure.per_packet["hypercalls.dom0"] == 0.0  # dom0 has no part in it
    assert figure.per_packet["socket_hypercalls.driver"] == 0.0  # copies never cross the socket
    assert set(figure.cpu_seconds) == {"hypervisor", "driver"}


# ---------------------------------------------------------------------- the child's side
def backend_child() -> Any:
    """A backend child's state as WELCOME leaves it (no guest kernel running): its own RAM,
    the foreign-memory handling on, the C grant copy ready."""
    import socket

    from pvio.core.memory import GuestMemory
    from pvio.remote.child import Child, ChildDomain, ChildHypervisor, GrantFrames

    ours, _theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    child = Child(ours)
    child.foreign_memory = True
    child._peer = _theirs  # type: ignore[attr-defined]  # kept open for the test's length
    # What the foreign-memory handling uses of the domain (no start_info: no kernel boots here).
    dom = object.__new__(ChildDomain)
    dom.hv, dom.domid, dom.mem, dom.state = ChildHypervisor(child, 0.0), 5, GuestMemory(64), "running"
    dom.maptrack, dom.grant_table, dom.counters = {}, GrantFrames(), dom.hv.counters.new("dom5")
    child.dom = dom
    from pvio.core import fastpath

    child.native = fastpath.NativeDomains()
    child._rebuild_native()
    return child


def foreign_message(domid: int, pages: int, fd: int | None) -> Any:
    from pvio.remote import wire

    payload = wire.FOREIGN.pack(domid, pages, 0, 32)
    return wire.Message(wire.Msg.FOREIGN, wire.VERSION, payload, () if fd is None else (fd,))


def test_a_backend_child_maps_what_foreign_and_mapped_name_and_lets_go_on_foreign_gone() -> None:
    from pvio.core.memory import GuestMemory
    from pvio.remote import wire

    child = backend_child()
    granter = GuestMemory(16, shared=True)
    granter.view[3 << 12 : (3 << 12) + 5] = b"rings"
    assert granter.fd is not None
    child._host_message(foreign_message(7, 16, os.dup(granter.fd)), None)
    mapped = wire.Message(wire.Msg.MAPPED, wire.VERSION, wire.MAPPED.pack(41, 7, 9, 0, 3))
    child._host_message(mapped, None)
    m = child.dom.maptrack[41]
    assert (m.granter.domid, m.ref, m.gfn, bytes(m.view[:5])) == (7, 9, 3, b"rings")
    granter.view[3 << 12] = ord("R")  # one set of pages in two mappings
    assert bytes(m.view[:1]) == b"R"
    gone = wire.Message(wire.Msg.FOREIGN_GONE, wire.VERSION, wire.FOREIGN_GONE.pack(7))
    child._host_message(gone, None)
    assert child.dom.maptrack == {} and child.foreign == {}
    assert not m.granter.release_memory()  # the driver's view still holds it...
    m.view.release()
    assert m.granter.release_memory()  # ...and once let go of, the RAM is unmapped
    granter.close()


@pytest.mark.parametrize(
    ("message", "reason"),
    [
        (lambda fd: foreign_message(7, 16, None), "FOREIGN with 0 fds"),
        (lambda fd: foreign_message(7, 32, fd), "holds 65536 bytes, not the 131072 announced"),
        ("mapped-unknown", "MAPPED of dom8, whose RAM was never handed over"),
        ("mapped-outside", "MAPPED of frame 0x10 outside dom7's RAM"),
        ("short-unmapped", "UNMAPPED of 2 bytes, not 4"),
    ],
)
def test_a_backend_child_refuses_a_foreign_message_that_cannot_be_right(message: Any, reason: str) -> None:
    from pvio.core.memory import GuestMemory
    from pvio.remote import wire
    from pvio.remote.wire import ProtocolError

    child = backend_child()
    granter = GuestMemory(16, shared=True)
    assert granter.fd is not None
    child._host_message(foreign_message(7, 16, os.dup(granter.fd)), None)
    if message == "mapped-unknown":
        msg = wire.Message(wire.Msg.MAPPED, wire.VERSION, wire.MAPPED.pack(1, 8, 9, 0, 3))
    elif message == "mapped-outside":
        msg = wire.Message(wire.Msg.MAPPED, wire.VERSION, wire.MAPPED.pack(1, 7, 9, 0, 16))
    elif message == "short-unmapped":
        msg = wire.Message(wire.Msg.UNMAPPED, wire.VERSION, b"\0\0")
    else:
        msg = message(os.dup(granter.fd))
    fds_before = len(os.listdir("/proc/self/fd"))
    with pytest.raises((ProtocolError, ValueError), match=reason):
        child._host_message(msg, None)
    assert len(os.listdir("/proc/self/fd")) <= fds_before - len(msg.fds)  # what it carried is closed
    assert child.dom.maptrack == {}
    granter.close()


def test_a_backend_childs_grant_copy_runs_locally_with_the_hypervisors_checks() -> None:
    """GNTTABOP_copy in a backend child: from a grant of a foreign domain into the child's own
    frame, in its process; a reference not granted to it, a domain whose RAM it does not hold
    and an argument outside its RAM fail as the hypervisor's would, counted, never raised."""
    from pvio.abi import (
        DOMID_SELF,
        GNTTAB_COPY,
        GRANT_ENTRY_V1,
        Errno,
        GNTCOPY_source_gref,
        GntSt,
        GnttabOp,
        GTF_permit_access,
        Hypercall,
    )
    from pvio.core.memory import GuestMemory
    from pvio.remote.child import ChildHypercalls

    child = backend_child()
    granter = GuestMemory(16, shared=True)
    assert granter.fd is not None
    GRANT_ENTRY_V1.pack_into(granter.view, 9 * 8, GTF_permit_access, 5, 3)  # ref 9: frame 3 to dom5
    GRANT_ENTRY_V1.pack_into(granter.view, 10 * 8, GTF_permit_access, 6, 4)  # ref 10: to dom6
    granter.view[(3 << 12) + 100 : (3 << 12) + 108] = b"payload!"
    child._host_message(foreign_message(7, 16, os.dup(granter.fd)), None)
    ops = b"".join(
        GNTTAB_COPY.pack(ref, dom, 100, 20, DOMID_SELF, 8 * i, 8, GNTCOPY_source_gref, 0)
        for i, (ref, dom) in enumerate([(9, 7), (10, 7), (9, 8)])
    )
    arg = 10 << 12
    child.dom.mem.view[arg : arg + len(ops)] = ops
    calls = ChildHypercalls(child)
    assert calls.dispatch(child.dom, Hypercall.grant_table_op, GnttabOp.copy, arg, 3) == 0
    statuses = [GNTTAB_COPY.unpack_from(child.dom.mem.view, arg + i * GNTTAB_COPY.size)[-1] for i in range(3)]
    assert statuses == [GntSt.okay, GntSt.permission_denied, GntSt.bad_domain]
    assert bytes(child.dom.mem.view[20 << 12 : (20 << 12) + 8]) == b"payload!"
    c = child.dom.counters
    assert (c["grant.copies"], c["grant.copy_bytes"], c["hypercalls.local"]) == (1, 8, 1)
    assert (c["hypercall_errors.permission_denied"], c["hypercall_errors.bad_domain"]) == (1, 1)
    # An argument array outside its own RAM: EFAULT, as the hypervisor answers.
    assert calls.dispatch(child.dom, Hypercall.grant_table_op, GnttabOp.copy, 63 << 12, 200) == -int(
        Errno.EFAULT
    )
    granter.close()


async def test_a_custom_backend_runs_in_the_driver_domain() -> None:
    """The lossy example backend, by its entry-point name, in the driver domain's process: A's
    every 4th frame is dropped there, counted by the backend in that process."""
    a, b = NicGuest("a", ip_of(0)), NicGuest("b", ip_of(1))
    options = {"drop_every": 4, "direction": "tx"}
    async with driver_env(a, b, backend="lossy", backend_options=options) as (_hv, dd):
        await a.nic.send_batch(numbered_frames(a.nic.mac, b.nic.mac, a.ip, b.ip, 99, 64))
        got = [frame_number(f) for f in await recv_n(b.nic, 74, timeout_s=30)]
        # The 4th, 8th, ... frame through A's vif is dropped, its announce frame being the 1st.
        assert got == [n for n in range(99) if (n + 2) % 4]
        counters = await dd.call("counters")
        assert counters["devices"][f"backend/vif{a.domain.domid}.0"]["drops.injected_loss"] == 25


async def test_a_hostile_frontend_costs_the_driver_domain_only_its_own_vif() -> None:
    """A guest moves its TX req_prod 1000 slots ahead: netback in the driver domain's process
    disables that vif with the reason, and another guest's traffic through it goes on."""
    import struct

    a, b, c = NicGuest("a", ip_of(0)), NicGuest("b", ip_of(1)), NicGuest("c", ip_of(2))
    async with driver_env(a, b, c) as (_hv, dd):
        page = a.page(a.nic.tx_gfn)
        (req_prod,) = struct.unpack_from("<I", page, 0)
        struct.pack_into("<I", page, 0, req_prod + 1000)
        a.evtchn_send(a.nic.port)
        vif = f"vif{a.domain.domid}.0"
        with trio.fail_after(30):
            while not (await dd.call("vifs"))[vif]["error"]:
                await trio.sleep(0.01)
        assert "impossible req_prod from the frontend (TX ring" in (await dd.call("vifs"))[vif]["error"]
        assert dd.domain.alive
        await c.nic.send_batch(numbered_frames(c.nic.mac, b.nic.mac, c.ip, b.ip, 64, 64))
        assert [frame_number(f) for f in await recv_n(b.nic, 64, timeout_s=30)] == list(range(64))
