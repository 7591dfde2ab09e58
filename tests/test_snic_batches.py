"""The smart NIC on the switch's batch path: TX frames left in the sender's memory and switched
as one batch (the switch's C decision, on a snapshot of their headers), RX DMA'd straight from
there into the receiver's buffers: one copy per frame.

A frame that finds no RX buffer, or goes to a port that is not a smart NIC, is first DMA'd into
the sender's TX area (counted as the sender's copy); a waiting receiver borrows that area (no
further copy) and the sender uses spare areas meanwhile, so queued frames are never
overwritten; beyond ``MAX_LENT_AREAS`` lent areas, or for an area that is not a smart NIC's
(netback's, one made by hand), the frames are copied out as ``bytes`` and that copy is counted.
Every count below is exact: the paths are synchronous (a doorbell sends on its exit)."""

from __future__ import annotations

import struct
from typing import Any

import pvio
from pvio.abi.smartnic import DESC, SNIC_F_GREF, SNIC_OK
from pvio.abi.xen import DOMID_IO
from pvio.backends.smartnic import MAX_LENT_AREAS, GuestFrameBatch, SmartNic, TxArea, add_smartnic
from pvio.backends.smartnic_dma import NP_FRAME
from pvio.backends.switch import Switch, SwitchPort
from pvio.core import netpath
from pvio.core._native import ffi
from pvio.core.netpath import Area, CPath, FrameBatch, PythonPath
from tests.guests import Probe, boot
from tests.test_smartnic import BUF_SIZE, POOL_BUFS, RawDriver, frame_to


async def pair(
    hv: pvio.Hypervisor, datapath: CPath | PythonPath = netpath.C
) -> tuple[RawDriver, SmartNic, RawDriver, SmartNic, Switch]:
    """Two guests, each driving a smart NIC by hand, on one switch (its C decision by default,
    whatever PVIO_DATAPATH says: that path is what these tests are about)."""
    switch = Switch(hv.counters)
    switch.datapath = datapath
    out = []
    for name in ("a", "b"):
        g = await boot(hv, Probe(name, memory_pages=96), name=name)
        nic = add_smartnic(hv, g.domain, switch)
        d = RawDriver(g)
        d.enable()
        out += [d, nic]
    return out[0], out[1], out[2], out[3], switch


def send(d: RawDriver, frames: list[bytes]) -> None:
    """Frames in pool buffers 0.., one push, one doorbell."""
    for i, f in enumerate(frames):
        d.buf(i)[: len(f)] = f
    d.send(*(DESC.pack(i, 0, len(f), i, 0, 0) for i, f in enumerate(frames)))
    assert [c[2] for c in d.tx_done()] == [SNIC_OK] * len(frames)


def lent(nic: SmartNic) -> int:
    assert nic._tx_areas is not None
    return nic._tx_areas.lent


def received(d: RawDriver, n: int) -> list[bytes]:
    """Post buffers 0..n-1 (one RX doorbell) and return what lands in them, in order."""
    d.post_rx(*(DESC.pack(i, 0, BUF_SIZE, i, 0, 0) for i in range(n)))
    done = d.rx_done()
    assert [c[2] for c in done] == [SNIC_OK] * len(done)
    return [bytes(d.buf(cid)[:length]) for cid, length, _st, _fl in done]


async def test_frames_cross_the_switch_as_one_batch_with_one_copy_each(hv: pvio.Hypervisor) -> None:
    """The sender's frames stay in its memory (the switch decides on a snapshot of their headers)
    and the receiver's DMA copies each from there into a posted buffer: one copy per frame."""
    da, a, db, b, switch = await pair(hv)
    db.post_rx(*(DESC.pack(i, 0, BUF_SIZE, i, 0, 0) for i in range(POOL_BUFS)))
    frames = [frame_to(b.mac, a.mac, 60 + i, fill=i) for i in range(POOL_BUFS)]
    send(da, frames)
    assert [bytes(db.buf(c[0])[: c[1]]) for c in db.rx_done()] == frames
    assert (a.dev["copies"], a.dev["header_bytes"]) == (0, 14 * POOL_BUFS)
    assert (b.dev["copies"], b.dev["copy_bytes"]) == (POOL_BUFS, sum(map(len, frames)))
    assert switch.counters["forwarded"] == POOL_BUFS and switch.counters["copies"] == 0
    assert lent(a) == 0 and not b._rx_queue


async def test_the_switchs_python_decision_takes_the_frames_as_bytes_and_counts_that_copy(
    hv: pvio.Hypervisor,
) -> None:
    """The switch's readable reference (``PVIO_DATAPATH=python``) gets the batch's frames as
    ``bytes`` (one copy each, the switch's) and hands them to the receiver's ``transmit``."""
    da, a, db, b, switch = await pair(hv, netpath.PYTHON)
    db.post_rx(*(DESC.pack(i, 0, BUF_SIZE, i, 0, 0) for i in range(4)))
    frames = [frame_to(b.mac, a.mac, 64, fill=i) for i in range(4)]
    send(da, frames)
    assert [bytes(db.buf(c[0])[: c[1]]) for c in db.rx_done()] == frames
    assert (switch.counters["copies"], a.dev["copies"], b.dev["copies"]) == (4, 0, 4)


async def test_frames_without_buffers_borrow_the_senders_area_and_are_never_overwritten(
    hv: pvio.Hypervisor,
) -> None:
    da, a, db, b, _switch = await pair(hv)
    first = [frame_to(b.mac, a.mac, 64, fill=0x10 + i) for i in range(3)]
    second = [frame_to(b.mac, a.mac, 100, fill=0x20 + i) for i in range(3)]
    send(da, first)  # b has no buffers: the frames are DMA'd into a's TX area, lent to b
    assert lent(a) == 1 and len(b._rx_queue) == 3 and (a.dev["copies"], b.dev["copies"]) == (3, 0)
    send(da, second)  # a DMAs into a spare area: the first batch stays as it was
    assert lent(a) == 2 and len(b._rx_queue) == 6
    assert received(db, 6) == first + second
    assert lent(a) == 0 and not b._rx_queue
    assert b.dev["copies"] == 6 and b.dev["copy_bytes"] == 3 * 64 + 3 * 100  # the DMA writes, no more
    assert a._tx_areas is not None and len(a._tx_areas.spare) == 1  # two areas in all, reused from now on
    third = [frame_to(b.mac, a.mac, 70, fill=0x30)]
    send(da, third)
    assert received(db, 1) == third and lent(a) == 0


async def test_past_the_lent_areas_waiting_frames_are_copied_out_and_counted(hv: pvio.Hypervisor) -> None:
    da, a, db, b, _switch = await pair(hv)
    batches = [[frame_to(b.mac, a.mac, 64 + k, fill=k)] for k in range(MAX_LENT_AREAS + 2)]
    for frames in batches:
        send(da, frames)
    assert lent(a) == MAX_LENT_AREAS
    copied = 2  # the two batches past the limit: a frame each, copied out as bytes
    assert b.dev["copies"] == copied and b.dev["copy_bytes"] == sum(len(f[0]) for f in batches[-2:])
    assert received(db, len(batches)) == [f for frames in batches for f in frames]
    assert lent(a) == 0
    assert b.dev["copies"] == copied + len(batches)


async def test_a_granted_rx_page_takes_a_frame_from_a_borrowed_area(hv: pvio.Hypervisor) -> None:
    da, a, db, b, _switch = await pair(hv)
    frames = [frame_to(b.mac, a.mac, 300, fill=7), frame_to(b.mac, a.mac, 90, fill=8)]
    send(da, frames)
    assert lent(a) == 1
    gfn = db.g.alloc_page()
    ref = db.g.grant_access(DOMID_IO, gfn)
    # a granted page too small for the first frame (dropped, the page kept), then the second
    db.post_rx(DESC.pack(ref, 10, 200, 5, SNIC_F_GREF, 0))
    assert [c[:3] for c in db.rx_done()] == [(5, 90, SNIC_OK)]
    assert bytes(db.g.page(gfn)[10:100]) == frames[1]
    assert b.dev["drops.rx_too_big"] == 1 and b.dev["copies"] == 1
    assert lent(a) == 0 and not b._rx_queue


async def test_a_reset_receiver_returns_the_areas_it_borrowed(hv: pvio.Hypervisor) -> None:
    da, a, db, b, _switch = await pair(hv)
    send(da, [frame_to(b.mac, a.mac)] * 3)
    assert lent(a) == 1
    db.wr(0x08, 0x2)  # CTRL RESET
    assert lent(a) == 0 and b.dev["drops.reset"] == 3 and not b._rx_queue


async def test_frames_of_another_area_are_copied_when_they_must_wait(hv: pvio.Hypervisor) -> None:
    """A batch whose area is not a smart NIC's (as netback's): delivered from where it lies when
    buffers are posted, copied out (counted) when they must wait; pages of the area in any order."""
    _da, a, db, b, _switch = await pair(hv)
    mem = bytearray(4 * 4096)
    area = Area(mem, [3, 1])  # area page 0 is memory page 3, page 1 is page 1
    frames = [frame_to(b.mac, a.mac, 64, fill=1), frame_to(b.mac, a.mac, 2000, fill=2)]
    entries = ffi.new("struct np_frame[]", 2)
    mem[3 * 4096 : 3 * 4096 + 64] = frames[0]
    mem[1 * 4096 : 1 * 4096 + 2000] = frames[1]  # area page 1 (memory page 1)
    entries[0].pos, entries[0].len = 0, 64
    entries[1].pos, entries[1].len = 4096, 2000
    batch = FrameBatch(area, entries, 2)
    assert not isinstance(area, TxArea)
    b.transmit_batch(batch, None, 2)  # no buffers yet: both copied out
    assert b.dev["copies"] == 2 and b.dev["copy_bytes"] == 64 + 2000
    mem[:] = bytes(len(mem))  # the producer reuses its area: the queued copies are unaffected
    assert received(db, 2) == frames
    db.post_rx(*(DESC.pack(i, 0, BUF_SIZE, i, 0, 0) for i in range(2)))
    mem[3 * 4096 : 3 * 4096 + 64] = frames[0]
    idx = ffi.new("uint32_t[]", [0, 0])
    b.transmit_batch(batch, idx, 2)  # the same frame twice, by index, straight into the buffers
    assert [bytes(db.buf(c[0])[: c[1]]) for c in db.rx_done()] == [frames[0]] * 2
    assert b.dev["copies"] == 2 + 2 + 2


def test_the_frame_entry_is_the_switch_batchs() -> None:
    """One layout: struct np_frame as netpath.h defines it is what smartnic_dma packs."""
    assert ffi.sizeof("struct np_frame") == NP_FRAME.size
    assert ffi.offsetof("struct np_frame", "pos") == 0 and ffi.offsetof("struct np_frame", "len") == 8


async def test_a_disabled_receiver_drops_a_batch_and_keeps_nothing(hv: pvio.Hypervisor) -> None:
    da, a, _db, b, _switch = await pair(hv)
    send(da, [frame_to(b.mac, a.mac)] * 2)  # waits in b's queue, a's area lent
    b.reset()
    assert lent(a) == 0 and b.dev["drops.reset"] == 2
    area = a._tx_areas.current if a._tx_areas is not None else None
    assert area is not None
    b.transmit_batch(FrameBatch(area, area.frames, 2), None, 2)
    assert b.dev["drops.rx_disabled"] == 2 and lent(a) == 0 and not b._rx_queue


BROADCAST = b"\xff" * 6


class Meddler(SwitchPort):
    """A port that, when a batch reaches it, records what it was handed and then rewrites the
    sender's buffer 0 -- as a guest on another core could while the switch works: a spoofed
    source MAC and new payload bytes."""

    accepts_batches = True

    def __init__(self, sender: RawDriver) -> None:
        super().__init__("meddler")
        self.sender = sender
        self.seen: list[tuple[bool, list[bytes], list[Any]]] = []

    def transmit(self, frames: list[bytes]) -> None:
        raise AssertionError("batches only")

    def transmit_batch(self, batch: FrameBatch, idx: Any, n: int) -> None:
        self.seen.append(
            (isinstance(batch, GuestFrameBatch), batch.materialize(idx, n), self.sender.tx_done())
        )
        self.sender.buf(0)[6:12] = b"\x02\xee\xee\xee\xee\xee"
        self.sender.buf(0)[20:24] = b"late"


async def test_receivers_get_the_header_the_switch_checked_whatever_the_sender_writes_later(
    hv: pvio.Hypervisor,
) -> None:
    """The decision reads a snapshot of each header; a smart NIC receiver copies the frame from
    the sender's memory as it is when the copy is made, with that snapshot over its header, so
    a source MAC rewritten after the check never leaves the switch.  A port that is not a smart
    NIC gets the frames settled into the sender's TX area first, and the sender completes its
    descriptors only once the switch has handed every frame on."""
    da, a, db, b, switch = await pair(hv)
    meddler = Meddler(da)
    switch.detach(b)
    switch.attach(meddler)
    switch.attach(b)  # flooded frames reach the meddler first, then b
    db.post_rx(DESC.pack(0, 0, BUF_SIZE, 3, 0, 0))
    frame = frame_to(BROADCAST, a.mac, 64, fill=5)
    da.buf(0)[:64] = frame
    da.send(DESC.pack(0, 0, 64, 9, 0, 0))
    ((guest_batch, handed, done_then),) = meddler.seen
    assert not guest_batch and handed == [frame]  # settled: a copy made before it meddled
    assert done_then == []  # no completion while the switch still works on the frame
    assert da.tx_done() == [(9, 64, SNIC_OK, 0)]
    assert db.rx_done() == [(3, 64, SNIC_OK, 0)]
    got = bytes(db.buf(0)[:64])
    assert got[:14] == frame[:14] and got[20:24] == b"late"  # the checked header, the live payload
    assert switch.counters["drops.spoofed_mac"] == 0 and switch.counters["flooded"] == 1
    assert (a.dev["copies"], b.dev["copies"]) == (1, 1)  # the settling DMA, b's DMA


async def test_granted_pages_between_pool_buffers_are_sent_in_order(hv: pvio.Hypervisor) -> None:
    da, a, db, b, _switch = await pair(hv)
    gfn = da.g.alloc_page()
    ref = da.g.grant_access(DOMID_IO, gfn)
    frames = [frame_to(b.mac, a.mac, 64 + k, fill=k) for k in range(5)]
    for k in (0, 3, 4):
        da.buf(k)[: len(frames[k])] = frames[k]
    da.g.page(gfn)[0:65] = frames[1]
    da.g.page(gfn)[1000:1066] = frames[2]
    db.post_rx(*(DESC.pack(i, 0, BUF_SIZE, i, 0, 0) for i in range(5)))
    da.send(
        DESC.pack(0, 0, 64, 0, 0, 0),
        DESC.pack(ref, 0, 65, 1, SNIC_F_GREF, 0),
        DESC.pack(ref, 1000, 66, 2, SNIC_F_GREF, 0),
        DESC.pack(3, 0, 67, 3, 0, 0),
        DESC.pack(4, 0, 68, 4, 0, 0),
    )
    assert [c[:3] for c in da.tx_done()] == [(k, 64 + k, SNIC_OK) for k in range(5)]
    assert [bytes(db.buf(c[0])[: c[1]]) for c in db.rx_done()] == frames
    # the granted pages were DMA'd into a's TX area; the pool buffers went straight to b
    assert a.dev["copies"] == 2 and b.dev["copies"] == 5 and a.dev["header_bytes"] == 14 * 3


async def test_a_frame_sent_to_another_smart_nic_of_the_same_guest_into_its_own_buffer(
    hv: pvio.Hypervisor,
) -> None:
    """A hostile guest posts the very buffer it sends from as the RX buffer of its second smart
    NIC: the copy overlaps itself and the frame lands with its checked header, nothing raises."""
    switch = Switch(hv.counters)
    g = await boot(hv, Probe("g", memory_pages=96), name="g")
    nic0 = add_smartnic(hv, g.domain, switch, devid=0)
    nic1 = add_smartnic(hv, g.domain, switch, devid=1)
    d0 = RawDriver(g)
    d0.enable()
    d1 = RawDriver(g, devid=1, pool=d0.pool)
    d1.enable()
    frame = frame_to(nic1.mac, nic0.mac, 300, fill=9)
    d0.buf(0)[2:302] = frame
    d1.post_rx(DESC.pack(0, 0, BUF_SIZE, 7, 0, 0))  # buffer 0: the frame lies in it, 2 bytes in
    d0.send(DESC.pack(0, 2, 300, 1, 0, 0))
    assert d1.rx_done() == [(7, 300, SNIC_OK, 0)]
    assert bytes(d0.buf(0)[:300]) == frame
    assert d0.tx_done() == [(1, 300, SNIC_OK, 0)]


async def test_a_receiver_breaking_its_rx_ring_mid_batch_stops_alone_and_counts_the_frames(
    hv: pvio.Hypervisor,
) -> None:
    """b's RX ring names an impossible index when a's frames arrive: b stops (ERROR) and counts
    them as dropped; a's descriptors complete, and nothing raises."""
    da, a, db, b, switch = await pair(hv)
    struct.pack_into("<I", db.g.page(db.rx_gfn), 0, 100_000)  # req_prod far beyond the ring
    frames = [frame_to(b.mac, a.mac, 64, fill=k) for k in range(3)]
    send(da, frames)
    assert b.error and not b.enabled and b.dev["errors.ring_overflow"] == 1
    assert b.dev["drops.rx_disabled"] == 3 and b.dev["copies"] == 0
    assert a.enabled and a.dev["packets.tx"] == 3 and b not in switch.ports
