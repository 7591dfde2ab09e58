"""The C data path (pvio/core/native/netpath.c) equals its Python reference (pvio.core.netpath).

Hypothesis generates ring contents — well-formed packets, chains of more_data slots, extra-info
slots, ids outside the ring, offsets and sizes crossing the page, packets longer than the
fatal limit, half-published packets — and grant-copy outcomes (good and failed ops).  Each batch
runs through :data:`pvio.core.netpath.C` and :data:`pvio.core.netpath.PYTHON` on two copies of
the same memory; the plans, the grant-copy ops, the responses, the frames, the counts, the
drop and fatal reasons and every byte of memory afterwards must be identical.  The RX queue
(enqueue under a frame and byte bound, plan against posted buffers, ops, responses), RX
straight from a batch, netfront's reaping, and the switch's decision for a locked port are
held equal the same way.
"""

from __future__ import annotations

import random
import struct
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pvio.abi import GNTTAB_COPY, GNTTAB_COPY_STATUS_OFFSET
from pvio.backends.switch import CapturePort, Switch, SwitchPort
from pvio.core import netpath
from pvio.core._native import ffi, lib
from pvio.core.netpath import Area, FrameBatch, RxQueue
from pvio.ringbuf.netif import (
    NETRXF_MORE_DATA,
    NETTXF_CSUM_BLANK,
    NETTXF_EXTRA_INFO,
    NETTXF_MORE_DATA,
    RX_REQUEST,
    RX_RESPONSE,
    TX_REQUEST,
    TX_RESPONSE,
)

NR = 256
PAGES = 64  # the test's dom0 memory
TX_GFNS = list(range(8, 8 + 32))  # the TX area: 32 pages, not in order of their gfns
TX_GFNS = TX_GFNS[::2] + TX_GFNS[1::2]
RX_GFNS = list(range(40, 48))
OPS_BYTES = 1638 * GNTTAB_COPY.size
SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

TX_PLAN_FIELDS = ("npkts", "consumed", "nops", "fatal", "fatal_arg", "nbad")
TX_PKT_FIELDS = ("first", "nslots", "extras", "reason", "bad_status", "op", "nops", "pos", "len", "csum")


class Side:
    """One implementation's copy of the state: dom0 memory, the areas, the batch buffers."""

    def __init__(self, path: Any, mem: bytes) -> None:
        self.path = path
        self.mem = bytearray(mem)
        self.tx_area = Area(self.mem, TX_GFNS)
        self.ops_mem = bytearray(OPS_BYTES)
        self.ops = ffi.from_buffer(self.ops_mem) if path is netpath.C else memoryview(self.ops_mem)
        self.pkts = ffi.new("struct np_tx_pkt[]", 2 * NR)
        self.plan = ffi.new("struct np_tx_plan *")
        self.done = ffi.new("struct np_tx_done *")
        self.rsp = ffi.new("uint8_t[]", 2 * NR * 4)
        self.frames = ffi.new("struct np_frame[]", 2 * NR)
        self.queue = RxQueue(64)
        self.queue.bind(Area(self.mem, RX_GFNS))
        self.rx_done = ffi.new("struct np_rx_done *")
        self.rx_rsp = ffi.new("uint8_t[]", 2 * NR * 8)
        self.enq = ffi.new("struct np_enq_done *")


def fields(cdata: Any, names: tuple[str, ...]) -> tuple[int, ...]:
    return tuple(int(getattr(cdata, n)) for n in names)


def set_statuses(ops: bytearray, statuses: list[int]) -> None:
    for k, s in enumerate(statuses):
        struct.pack_into("<h", ops, k * GNTTAB_COPY.size + GNTTAB_COPY_STATUS_OFFSET, s)


@st.composite
def tx_requests(draw: st.DrawFn) -> bytes:
    """A ring drain: mostly well-formed packets, with every kind of hostile slot mixed in."""
    out: list[bytes] = []
    for _ in range(draw(st.integers(0, 12))):
        kind = draw(st.sampled_from(["ok", "ok", "ok", "chain", "extra", "hostile", "long"]))
        rid = draw(
            st.sampled_from([0, 1, 5, 200, 255, 255, 256, 4000]) if kind == "hostile" else st.integers(0, 255)
        )
        if kind == "ok":
            size = draw(st.sampled_from([14, 60, 64, 1514, 4096]))
            offset = draw(st.sampled_from([0, 0, 2, 4096 - size]))
            flags = draw(st.sampled_from([0, 0, NETTXF_CSUM_BLANK]))
            out.append(TX_REQUEST.pack(7, offset, flags, rid, size))
        elif kind in ("chain", "long"):
            n = draw(st.integers(2, 5)) if kind == "chain" else draw(st.integers(17, 22))
            sizes = [draw(st.sampled_from([1, 100, 4000, 4096, 0, 4097])) for _ in range(n - 1)]
            first = draw(st.sampled_from([1, 50, 4096, 0]))
            total = min(0xFFFF, first + sum(sizes)) if draw(st.booleans()) else draw(st.integers(0, 0xFFFF))
            more_last = draw(st.sampled_from([0, 0, 0, NETTXF_MORE_DATA]))  # half published
            out.append(TX_REQUEST.pack(7, draw(st.sampled_from([0, 10, 4090])), NETTXF_MORE_DATA, rid, total))
            for k, size in enumerate(sizes):
                more = NETTXF_MORE_DATA if k + 1 < len(sizes) else more_last
                off = draw(st.sampled_from([0, 0, 96, 4095]))
                out.append(TX_REQUEST.pack(7, off, more, draw(st.integers(0, 257)), size))
        elif kind == "extra":
            chained = draw(st.sampled_from([0, 1]))  # XEN_NETIF_EXTRA_FLAG_MORE in the extra's flags byte
            out.append(TX_REQUEST.pack(7, 0, NETTXF_EXTRA_INFO, rid, 64))
            out.append(TX_REQUEST.pack(1 | (chained << 8), 0, 0, 0, 0))
            if chained and draw(st.booleans()):
                out.append(TX_REQUEST.pack(1, 0, 0, 0, 0))
        else:
            out.append(
                TX_REQUEST.pack(
                    draw(st.integers(0, 2**32 - 1)),
                    draw(st.sampled_from([0, 4000, 4096, 65535])),
                    draw(st.integers(0, 0xFFFF)),
                    rid,
                    draw(st.sampled_from([0, 1, 200, 65535])),
                )
            )
    return b"".join(out)


def udp_frame(data: st.DrawFn, length: int) -> bytes:
    """An IPv4 UDP frame (so checksum completion has work) or random bytes."""
    if length >= 42 and data(st.booleans()):
        ip = bytes([0x45, 0]) + (length - 14).to_bytes(2, "big") + bytes(5) + b"\x11" + bytes(10)
        return b"\x02" * 6 + b"\x04" * 6 + b"\x08\x00" + ip + bytes(length - 34)
    return data(st.binary(min_size=length, max_size=length))


@SETTINGS
@given(raw=tx_requests(), data=st.data())
def test_tx_plan_and_finish_are_identical(raw: bytes, data: st.DataObject) -> None:
    mem = bytes(PAGES * 4096)
    c, p = Side(netpath.C, mem), Side(netpath.PYTHON, mem)
    for s in (c, p):
        s.path.tx_plan(raw, NR, 20, 3, s.tx_area, s.ops, 1638, s.pkts, s.plan)
    assert fields(c.plan, TX_PLAN_FIELDS) == fields(p.plan, TX_PLAN_FIELDS)
    plan = c.plan
    if plan.fatal:
        return
    npkts, nops = plan.npkts, plan.nops
    for x in range(npkts):
        assert fields(c.pkts[x], TX_PKT_FIELDS) == fields(p.pkts[x], TX_PKT_FIELDS)
    assert c.ops_mem[: nops * 40] == p.ops_mem[: nops * 40]
    # The grant copy: some ops fail; the good ones' bytes land in the TX area (same on both sides).
    statuses = [data.draw(st.sampled_from([0, 0, 0, 0, -3, -8])) for _ in range(nops)]
    payload = bytearray(c.mem)
    for x in range(npkts):
        pk = c.pkts[x]
        if pk.reason == 0:
            Area(payload, TX_GFNS).write(pk.pos, udp_frame(data.draw, pk.len))
    for s in (c, p):
        s.mem[:] = payload
        set_statuses(s.ops_mem, statuses)
        s.path.tx_finish(raw, s.ops, s.pkts, npkts, s.tx_area, s.rsp, s.frames, s.done)
    done_fields = ("nrsp", "nframes", "bytes", "checksums")
    assert fields(c.done, done_fields) == fields(p.done, done_fields)
    assert list(c.done.drops) == list(p.done.drops)
    nrsp = c.done.nrsp
    assert ffi.buffer(c.rsp, nrsp * 4)[:] == ffi.buffer(p.rsp, nrsp * 4)[:]
    for k in range(c.done.nframes):
        assert (c.frames[k].pos, c.frames[k].len) == (p.frames[k].pos, p.frames[k].len)
    assert c.mem == p.mem  # the checksums completed in place, byte for byte
    # Every request used is answered once, in ring order; OKAY packets became frames.
    rsps = list(TX_RESPONSE.iter_unpack(ffi.buffer(c.rsp, nrsp * 4)[:]))
    assert len(rsps) == plan.consumed
    assert sum(1 for x in range(npkts) if c.pkts[x].reason == 0) == c.done.nframes


@st.composite
def frames_in_area(draw: st.DrawFn) -> list[bytes]:
    lengths = draw(st.lists(st.sampled_from([0, 14, 64, 64, 1514, 4095, 4096, 4097, 9000]), max_size=8))
    return [bytes([k % 251 + 1]) * n for k, n in enumerate(lengths)]


def load_source(s: Side, frames: list[bytes]) -> tuple[Area, Any]:
    """Frames placed in a fresh area over pages 0..7 of this side's memory (as a TX drain would)."""
    src = Area(s.mem, list(range(0, 8)) + list(range(48, 64)))
    descs = ffi.new("struct np_frame[]", max(1, len(frames)))
    for k, f in enumerate(frames):
        pos = netpath.place(src.c, len(f), True)
        assert pos >= 0
        src.write(pos, f)
        descs[k].pos, descs[k].len = pos, len(f)
    return src, descs


@SETTINGS
@given(frames=frames_in_area(), data=st.data())
def test_rx_queue_and_delivery_are_identical(frames: list[bytes], data: st.DataObject) -> None:
    mem = bytes(PAGES * 4096)
    c, p = Side(netpath.C, mem), Side(netpath.PYTHON, mem)
    limit = data.draw(st.integers(0, 30))
    rounds = data.draw(st.integers(1, 3))
    for _ in range(rounds):
        for s in (c, p):
            src, descs = load_source(s, frames)
            s.path.rx_enqueue(s.queue, src, descs, None, len(frames), limit, s.enq)
        enq = ("queued", "dropped", "copies", "copy_bytes")
        assert fields(c.enq, enq) == fields(p.enq, enq)
        assert c.queue.frames() == p.queue.frames()
        qc = ("qhead", "qlen")
        assert fields(c.queue.c, qc) == fields(p.queue.c, qc)
        assert (c.queue.c.area.head, c.queue.c.area.tail) == (p.queue.c.area.head, p.queue.c.area.tail)
        avail = data.draw(st.integers(0, 40))
        nf, need = c.path.rx_plan(c.queue, avail, NR)
        assert (nf, need) == p.path.rx_plan(p.queue, avail, NR)
        if not nf:
            continue
        reqs = b"".join(RX_REQUEST.pack(data.draw(st.integers(0, 255)), 0, 100 + k) for k in range(need))
        statuses = [data.draw(st.sampled_from([0, 0, 0, -3])) for _ in range(need)]
        for s in (c, p):
            assert s.path.rx_build(s.queue, nf, reqs, 3, s.ops) == need
        assert c.ops_mem[: need * 40] == p.ops_mem[: need * 40]
        for s in (c, p):
            set_statuses(s.ops_mem, statuses)
            s.path.rx_finish(s.queue, nf, reqs, s.ops, s.rx_rsp, s.rx_done)
        rd = ("nrsp", "delivered", "delivered_bytes", "bad_grant")
        assert fields(c.rx_done, rd) == fields(p.rx_done, rd)
        n = c.rx_done.nrsp
        assert ffi.buffer(c.rx_rsp, n * 8)[:] == ffi.buffer(p.rx_rsp, n * 8)[:]
        assert c.queue.frames() == p.queue.frames()
        for rid, offset, flags, status in RX_RESPONSE.iter_unpack(ffi.buffer(c.rx_rsp, n * 8)[:]):
            assert (
                offset == 0
                and (status <= 4096)
                and (status > 0 or status == -1 or not flags & NETRXF_MORE_DATA)
            )
            assert rid < 256


@SETTINGS
@given(frames=frames_in_area(), data=st.data())
def test_rx_straight_from_a_batch_is_identical(frames: list[bytes], data: st.DataObject) -> None:
    mem = bytes(PAGES * 4096)
    c, p = Side(netpath.C, mem), Side(netpath.PYTHON, mem)
    pick = (
        data.draw(st.lists(st.integers(0, max(0, len(frames) - 1)), max_size=len(frames))) if frames else []
    )
    idx = ffi.new("uint32_t[]", pick or [0])
    loaded = []
    for s in (c, p):
        src, descs = load_source(s, frames)
        q = RxQueue(64)
        loaded.append(q.load(s.path, src, descs, idx, len(pick)))
        assert q.frames() == [frames[k] for k in pick]
        nf_need = s.path.rx_plan(q, 12, NR)
        loaded.append(nf_need)
    assert loaded[0:2] == loaded[2:4]


@SETTINGS
@given(data=st.data())
def test_netfront_rx_and_tx_reaping_agree_with_the_reference_rules(data: st.DataObject) -> None:
    posted = bytearray(data.draw(st.binary(min_size=NR, max_size=NR)).translate(bytes([1, 0] * 128)))
    rsps = []
    for _ in range(data.draw(st.integers(0, 20))):
        rid = data.draw(st.sampled_from([0, 1, 2, 3, 100, 255, 256, 4000]))
        offset = data.draw(st.sampled_from([0, 0, 10, 4000, 4096]))
        flags = data.draw(st.sampled_from([0, 0, NETRXF_MORE_DATA]))
        status = data.draw(st.sampled_from([64, 64, 1, 96, 4096, 0, -1, -2]))
        rsps.append(RX_RESPONSE.pack(rid, offset, flags, status))
    raw = b"".join(rsps)
    # The reference rules, written out: the C must stop where they stop and record what they keep.
    expect_rec: list[tuple[int, int, int, int]] = []
    expect_err = 0
    check = bytearray(posted)
    parts = 0
    for rid, offset, flags, status in RX_RESPONSE.iter_unpack(raw):
        if rid >= NR or not check[rid]:
            expect_err = lib.NF_ERR_ID
            break
        check[rid] = 0
        if status < 0:
            expect_rec.append((rid, offset, status, lib.NF_STATUS))
            parts = 0
            continue
        if status == 0:
            expect_err = lib.NF_ERR_EMPTY
            break
        if offset + status > 4096:
            expect_err = lib.NF_ERR_CROSS
            break
        if flags & NETRXF_MORE_DATA:
            expect_rec.append((rid, offset, status, lib.NF_PART))
            parts += 1
            if parts >= 18:
                expect_err = lib.NF_ERR_SLOTS
                break
            continue
        expect_rec.append((rid, offset, status, lib.NF_LAST if parts else lib.NF_FRAME))
        parts = 0
    out = ffi.new("struct nf_rx_done *")
    ids, offs = ffi.new("uint16_t[]", NR), ffi.new("uint16_t[]", NR)
    lens, kinds = ffi.new("int32_t[]", NR), ffi.new("uint8_t[]", NR)
    repost, base = ffi.new("uint16_t[]", NR), ffi.new("uint64_t[]", [k << 12 for k in range(NR)])
    start, end = ffi.new("uint64_t[]", NR), ffi.new("uint64_t[]", NR)
    cposted = ffi.from_buffer(posted)
    lib.pvio_nf_rx(raw, len(rsps), NR, cposted, 0, 18, ids, offs, lens, kinds, repost, base, start, end, out)
    got = [(ids[k], offs[k], lens[k], kinds[k]) for k in range(out.nrec)]
    assert (got, out.error) == (expect_rec, expect_err)
    assert bytes(posted) == bytes(check)
    for k in range(out.nrec):
        if kinds[k] != lib.NF_STATUS:
            assert (start[k], end[k]) == ((ids[k] << 12) + offs[k], (ids[k] << 12) + offs[k] + lens[k])


class BatchPort(SwitchPort):
    """A port that takes batches, keeping copies of what it was given."""

    accepts_batches = True

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.got: list[bytes] = []

    def transmit(self, frames: list[bytes]) -> None:
        self.got.extend(bytes(f) for f in frames)

    def transmit_batch(self, batch: FrameBatch, idx: Any, n: int) -> None:
        self.got.extend(batch.materialize(idx, n))


MACS = [b"\x02\x00\x00\x00\x00" + bytes([k]) for k in range(5)] + [b"\xff" * 6, b"\x01\x00\x5e\x00\x00\x01"]


def build_switch(path: Any) -> tuple[Switch, list[SwitchPort]]:
    sw = Switch(name="sw")
    sw.datapath = path
    ports: list[SwitchPort] = []
    for k in range(4):
        port: SwitchPort = BatchPort(f"v{k}") if k % 2 == 0 else CapturePort(f"c{k}")
        port.locked_macs = frozenset({MACS[k]}) if k < 3 else None
        sw.attach(port)
        ports.append(port)
    return sw, ports


@SETTINGS
@given(data=st.data())
def test_switch_decision_for_a_locked_port_is_identical(data: st.DataObject) -> None:
    specs = data.draw(
        st.lists(
            st.tuples(
                st.sampled_from(MACS), st.sampled_from(MACS), st.sampled_from([0, 6, 13, 14, 64, 1514])
            ),
            max_size=20,
        )
    )
    frames = [(dst + src + b"\x08\x00" + bytes(60))[:n] for dst, src, n in specs]
    frames = [f + bytes(max(0, n - len(f))) for f, (_, _, n) in zip(frames, specs, strict=True)]
    learned = data.draw(st.sampled_from([None, MACS[3], MACS[4]]))
    tapped = data.draw(st.booleans())
    results = []
    for path in (netpath.C, netpath.PYTHON):
        sw, ports = build_switch(path)
        if learned is not None:  # the learning port has been heard from
            sw.input(ports[3], [MACS[0] + learned + bytes(52)])
        mirrored: list[tuple[str, str, list[bytes]]] = []
        if tapped:  # a capture: what it sees, port by port and in order, is part of the result
            sw.add_tap(
                lambda port, direction, fs, seen=mirrored: seen.append((port.name, direction, list(fs)))
            )
        side = Side(path, bytes(PAGES * 4096))
        src, descs = load_source(side, frames)
        sw.input_batch(ports[0], FrameBatch(src, descs, len(frames)))
        got = [list(p.got) if isinstance(p, BatchPort) else list(p.frames) for p in ports]
        counts = {o: {k: v for k, v in c.items() if v and k not in ("copies", "copy_bytes")}
                  for o, c in [(sw.name, sw.counters), *[(p.name, p.counters) for p in ports]]}  # fmt: skip
        results.append((got, counts, mirrored))
    assert results[0] == results[1]


@SETTINGS
@given(
    sizes=st.lists(st.integers(1, 3 * 4096), min_size=1, max_size=40),
    pick=st.lists(st.integers(0, 39), max_size=40),
)
def test_materialize_in_two_calls_equals_the_frame_by_frame_copy(sizes: list[int], pick: list[int]) -> None:
    mem = bytearray(random.Random(len(sizes)).randbytes(PAGES * 4096))
    area = Area(mem, TX_GFNS)
    frames = ffi.new("struct np_frame[]", len(sizes))
    for k, size in enumerate(sizes):
        frames[k].pos = netpath.place(area.c, size, False)  # as the TX plan lays frames (it wraps)
        frames[k].len = size
    batch = FrameBatch(area, frames, len(sizes))
    by_frame = [area.read(frames[k].pos, frames[k].len) for k in range(len(sizes))]
    assert batch.materialize() == by_frame
    chosen = [k for k in pick if k < len(sizes)]
    idx = ffi.new("uint32_t[]", chosen or [0])
    assert batch.materialize(idx, len(chosen)) == [by_frame[k] for k in chosen]
