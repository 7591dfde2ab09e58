"""PyGuests end to end: two guests find each other through xenstore, share a page through a grant
and signal each other over an interdomain event channel, with the interrupts pinned exactly and
the whole run's counters identical from one run to the next.  Also: a crashing guest is stopped
alone, pause holds upcalls back, and xenstore keeps guests out of each other's homes."""

from __future__ import annotations

import logging
from typing import Any

import pytest
import trio

import pvio
from pvio.abi import GTF_permit_access, GTF_reading, GTF_writing
from pvio.core.grant_table import GrantMapping
from tests.guests import Probe, boot, settle

GREETING = b"hello from the sharer"
REPLY = b"mapped and written by the mapper"
REPLY_AT = 2048
ROUND_TRIPS = 5
BURST = 3


class Sharer(pvio.PyGuest):
    """Grants a page to its peer and offers it a port, both published under its own home, readable
    by the peer; then pings the peer and counts pongs."""

    memory_pages = 64

    def __init__(self, peer: int) -> None:
        super().__init__()
        self.peer = peer
        self.published = trio.Event()
        self.pongs = 0
        self._pong = trio.Event()

    async def main(self) -> None:
        self.gfn = self.alloc_page()
        self.page(self.gfn)[: len(GREETING)] = GREETING
        self.ref = self.grant_access(self.peer, self.gfn)
        self.port = self.evtchn_alloc_unbound(self.peer)
        self.bind_handler(self.port, self._on_pong)
        await self.xenbus.mkdir("share")
        await self.xenbus.set_perms("share", [f"n{self.domid}", f"r{self.peer}"])

        async def publish(t: Any) -> None:
            await t.write("share/gref", str(self.ref))
            await t.write("share/port", str(self.port))

        await self.xenbus.retry_transaction(publish)
        self.published.set()

    def _on_pong(self, _port: int) -> None:
        self.pongs += 1
        self._pong.set()

    async def ping(self, times: int) -> None:
        """``times`` round trips: notify the peer, wait for its answer."""
        for _ in range(times):
            self._pong = trio.Event()
            self.evtchn_send(self.port)
            await self._pong.wait()

    async def burst(self, sends: int) -> None:
        """``sends`` notifications back to back (no yield between them), then wait for the answer."""
        self._pong = trio.Event()
        for _ in range(sends):
            self.evtchn_send(self.port)
        await self._pong.wait()


class Mapper(pvio.PyGuest):
    """Watches the sharer's home for the gref and port, maps the page, binds the port, and answers
    every notification with one of its own."""

    memory_pages = 64

    def __init__(self, peer: int) -> None:
        super().__init__()
        self.peer = peer
        self.connected = trio.Event()
        self.pings = 0
        self._ping = trio.Event()
        self.mapping: GrantMapping | None = None

    async def main(self) -> None:
        share = f"/local/domain/{self.peer}/share"
        async with await self.xenbus.watch(f"{share}/port") as watch:
            async for _ in watch:
                try:
                    gref = await self.xenbus.read_int(f"{share}/gref")
                    port = await self.xenbus.read_int(f"{share}/port")
                    break
                except pvio.XenstoreError as err:
                    if err.errno not in ("ENOENT", "EACCES"):  # not published (or readable) yet
                        raise
        self.mapping = self.grant_map(self.peer, gref)
        self.seen = bytes(self.mapping.view[: len(GREETING)])
        self.mapping.view[REPLY_AT : REPLY_AT + len(REPLY)] = REPLY
        self.port = self.evtchn_bind_interdomain(self.peer, port)
        self.bind_handler(self.port, self._on_ping)
        self.spawn(self._answer)
        self.connected.set()

    def _on_ping(self, _port: int) -> None:
        self.pings += 1
        self._ping.set()

    async def _answer(self) -> None:
        while True:
            await self._ping.wait()
            self._ping = trio.Event()
            self.evtchn_send(self.port)


async def run_scenario() -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """The whole scenario on a fresh hypervisor; returns (the signalling phase's counter changes,
    the counters at the end, observations)."""
    seen: dict[str, Any] = {}
    async with pvio.Hypervisor() as hv:
        sharer, mapper = Sharer(peer=2), Mapper(peer=1)
        a = hv.create_domain(sharer, name="sharer")
        b = hv.create_domain(mapper, name="mapper")
        assert (a.domid, b.domid) == (1, 2)
        await hv.start(b)  # the mapper first: it must wait for what the sharer publishes
        await hv.start(a)
        await mapper.connected.wait()
        await settle()  # the watch is gone and every store reply taken: quiet from here

        seen["mapper saw"] = mapper.seen
        seen["sharer sees"] = bytes(sharer.page(sharer.gfn)[REPLY_AT : REPLY_AT + len(REPLY)])
        seen["flags while mapped"] = sharer.gnttab.flags(sharer.ref)
        seen["revoke while mapped"] = sharer.end_access(sharer.ref)
        seen["flags after refused revoke"] = sharer.gnttab.flags(sharer.ref)
        # The bind raised the mapper's new port once; the mapper answered it with one pong.
        seen["pings, pongs after connect"] = (mapper.pings, sharer.pongs)

        before = hv.snapshot()
        await sharer.ping(ROUND_TRIPS)
        await sharer.burst(BURST)
        await settle()
        signalling = hv.snapshot().diff(before).as_dict()
        seen["pings, pongs"] = (mapper.pings, sharer.pongs)

        assert mapper.mapping is not None
        mapper.grant_unmap(mapper.mapping)
        seen["revoke after unmap"] = sharer.end_access(sharer.ref)
        await settle()
        return signalling, hv.snapshot().as_dict(), seen


async def test_two_guests_share_a_page_and_signal_each_other_with_exact_interrupts() -> None:
    signalling, totals, seen = await run_scenario()
    assert seen["mapper saw"] == GREETING
    assert seen["sharer sees"] == REPLY
    assert seen["flags while mapped"] == GTF_permit_access | GTF_reading | GTF_writing
    assert seen["revoke while mapped"] is False
    assert seen["flags after refused revoke"] == seen["flags while mapped"]
    assert seen["revoke after unmap"] is True
    assert seen["pings, pongs after connect"] == (1, 1)
    assert seen["pings, pongs"] == (1 + ROUND_TRIPS + 1, 1 + ROUND_TRIPS + 1)

    # Each round trip is one upcall on each side; the burst's sends coalesce into one upcall on
    # the mapper (one pending bit), which answers once: one more upcall on the sharer.  After each
    # upcall a vCPU goes idle again with one SCHEDOP_block.
    upcalls = ROUND_TRIPS + 1
    assert upcalls == 6
    sharer_sends, mapper_sends = ROUND_TRIPS + BURST, ROUND_TRIPS + 1
    assert signalling["domains"] == {
        "dom0": {},  # no store traffic, nothing for dom0
        "dom1": {
            "interrupts": upcalls,
            "evtchn.raised": upcalls,
            "evtchn.sends": sharer_sends,
            "hypercalls.event_channel_op.send": sharer_sends,
            "hypercalls.event_channel_op": sharer_sends,
            "hypercalls.sched_op.block": upcalls,
            "hypercalls.sched_op": upcalls,
            "hypercalls": sharer_sends + upcalls,
            "exits": sharer_sends + upcalls,
            "exits.hypercall": sharer_sends + upcalls,
        },
        "dom2": {
            "interrupts": upcalls,
            "evtchn.raised": upcalls,
            "evtchn.coalesced": BURST - 1,
            "evtchn.sends": mapper_sends,
            "hypercalls.event_channel_op.send": mapper_sends,
            "hypercalls.event_channel_op": mapper_sends,
            "hypercalls.sched_op.block": upcalls,
            "hypercalls.sched_op": upcalls,
            "hypercalls": mapper_sends + upcalls,
            "exits": mapper_sends + upcalls,
            "exits.hypercall": mapper_sends + upcalls,
        },
    }
    # The whole run on the sharer: one upcall per xenstore reply (mkdir, set_perms, transaction
    # start, two writes, commit), the pong to the bind's event, then the signalling phase.
    assert totals["domains"]["dom1"]["interrupts"] == 6 + 1 + upcalls == 13


async def test_the_scenario_gives_identical_counters_every_run() -> None:
    first = await run_scenario()
    second = await run_scenario()
    assert first[1]["domains"]["dom1"]["interrupts"] > 0
    assert first == second


# ---- a crashing guest -----------------------------------------------------------------------


class Crasher(Probe):
    """Boots, then raises from its main once told to."""

    def __init__(self) -> None:
        super().__init__()
        self.go = trio.Event()

    async def main(self) -> None:
        self.ready.set()
        await self.go.wait()
        raise RuntimeError("boom")


async def test_a_guest_whose_main_raises_is_stopped_and_the_others_go_on(
    hv: pvio.Hypervisor, caplog: pytest.LogCaptureFixture
) -> None:
    survivor = await boot(hv, Probe(), "survivor")
    crasher = await boot(hv, Crasher(), "crasher")
    port = survivor.listen(survivor.evtchn_alloc_unbound(crasher.domid))
    crasher.evtchn_bind_interdomain(survivor.domid, port)
    dom = crasher.domain
    crasher.go.set()
    await settle()

    assert dom.state == "dead"
    assert dom.domid not in hv.domains
    assert dom.crash_reason == "kernel raised RuntimeError: boom"
    assert dom.counters["crashes"] == 1
    errors = [r for r in caplog.records if r.levelno == logging.ERROR and r.name == "pvio.hypervisor"]
    assert [r.getMessage() for r in errors] == [f"dom{dom.domid} stopped: {dom.crash_reason}"]  # one line
    assert hv.channel_state(survivor.domain, port) == pvio.abi.EvtchnStat.unbound

    # The survivor still talks to the store and to a new peer.
    await survivor.xenbus.write("data/alive", "yes")
    assert await survivor.xenbus.read("data/alive") == "yes"
    peer = await boot(hv, Probe(), "peer")
    p = peer.listen(peer.evtchn_alloc_unbound(survivor.domid))
    q = survivor.evtchn_bind_interdomain(peer.domid, p)
    survivor.evtchn_send(q)
    await settle()
    assert peer.fired == [p]


# ---- pause ----------------------------------------------------------------------------------


async def test_pause_holds_upcalls_and_unpause_delivers_what_became_pending(hv: pvio.Hypervisor) -> None:
    a = await boot(hv, Probe(), "a")
    b = await boot(hv, Probe(), "b")
    pa = a.listen(a.evtchn_alloc_unbound(b.domid))
    pb = b.evtchn_bind_interdomain(a.domid, pa)
    await settle()
    interrupts = a.interrupts

    hv.pause(a.domain)
    assert a.domain.state == "paused"
    b.evtchn_send(pb)
    await settle()
    b.evtchn_send(pb)
    await settle()
    assert a.fired == []
    assert a.port_pending(pa)
    assert a.interrupts == interrupts

    hv.unpause(a.domain)
    assert a.domain.state == "running"
    await settle()
    assert a.fired == [pa]
    assert a.interrupts == interrupts + 1
    assert a.domain.counters["evtchn.coalesced"] == 1


# ---- xenstore homes -------------------------------------------------------------------------


async def test_a_guest_cannot_write_or_read_another_guests_home(hv: pvio.Hypervisor) -> None:
    a = await boot(hv, Probe(), "a")
    b = await boot(hv, Probe(), "b")
    with pytest.raises(pvio.XenstoreError) as info:
        await b.xenbus.write(f"/local/domain/{a.domid}/data/x", "intruder")
    assert info.value.errno == "EACCES"
    with pytest.raises(pvio.XenstoreError) as info:
        await b.xenbus.read(f"/local/domain/{a.domid}/name")
    assert info.value.errno == "EACCES"
    assert not await a.xenbus.exists("data/x")
    await b.xenbus.write("data/x", "mine")  # its own home is fine
    assert await b.xenbus.read(f"/local/domain/{b.domid}/data/x") == "mine"
