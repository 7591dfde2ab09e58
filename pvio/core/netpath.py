"""The PV data path's per-packet work as batch calls: C (``native/netpath.c``) and its Python reference.

netback and the switch orchestrate batches; what they do per packet lives here, twice: the
C functions of ``pvio/core/native/netpath.c`` (the default) and, in :class:`PythonPath`, the
same algorithm in plain Python, kept as the readable reference.  Both work on the same
state (the cffi structs ``np_area``, ``np_rxq``, ``np_frame``, ``np_tx_pkt``), so a caller
switches between them with one attribute, and ``tests/test_netpath_differential.py`` feeds
both random and hostile input and asserts identical output.  ``PVIO_DATAPATH=python``
selects the reference everywhere (for debugging, or to read what the C does).

Areas.  Frames live in dom0 pages seen as one byte space (:class:`Area`): position ``p``
is byte ``p & 4095`` of page ``(p >> 12) % npages``.  A frame of up to a page never
crosses a page; a longer one starts on a page boundary and takes consecutive pages.  A
vif's TX area is reset for every batch (the frames in it are handed to the switch and
copied out before the next batch); a vif's RX queue (:class:`RxQueue`) is a FIFO in its
own area, bounded by frames and by the area's bytes.

Copies.  Every copy of frame bytes these functions make is counted by their callers as
``copies`` / ``copy_bytes`` (pvio.core.counters): grant copies (one per op that
succeeded), queue copies (one per chunk, :meth:`PythonPath.rx_enqueue`), and a frame turned
into ``bytes`` for a port that needs them (:meth:`FrameBatch.materialize`).
"""

from __future__ import annotations

import os
import struct
from collections.abc import Sequence
from typing import Any

from pvio.abi import (
    DOMID_SELF,
    GNTTAB_COPY,
    GNTTAB_COPY_STATUS_OFFSET,
    GNTCOPY_dest_gref,
    GNTCOPY_source_gref,
)
from pvio.core import _frames
from pvio.core._native import ffi, lib
from pvio.ringbuf.netif import (
    NETIF_RSP_ERROR,
    NETIF_RSP_NULL,
    NETIF_RSP_OKAY,
    NETRXF_MORE_DATA,
    NETTXF_CSUM_BLANK,
    NETTXF_EXTRA_INFO,
    NETTXF_MORE_DATA,
    RX_REQUEST,
    RX_RESPONSE,
    TX_REQUEST,
    TX_RESPONSE,
    XEN_NETIF_EXTRA_FLAG_MORE,
    XEN_NETIF_NR_SLOTS_MIN,
    complete_checksum,
)

PAGE = 4096
#: "c" (the default) or "python" (the reference), from PVIO_DATAPATH.
DATAPATH = os.environ.get("PVIO_DATAPATH", "c").strip().lower() or "c"
if DATAPATH not in ("c", "python"):
    raise ValueError(f"PVIO_DATAPATH must be 'c' or 'python', not {DATAPATH!r}")

OK, TOO_MANY_SLOTS, BAD_OFFSET, BAD_SIZE, BAD_GRANT = (
    lib.NP_OK, lib.NP_TOO_MANY_SLOTS, lib.NP_BAD_OFFSET, lib.NP_BAD_SIZE, lib.NP_BAD_GRANT,
)  # fmt: skip
#: Drop reason numbers -> the counter names netback uses (drops.<name>).
REASONS = {
    TOO_MANY_SLOTS: "too_many_slots",
    BAD_OFFSET: "bad_offset",
    BAD_SIZE: "bad_size",
    BAD_GRANT: "bad_grant",
}
FATAL_NONE, FATAL_ID, FATAL_SLOTS, FATAL_INTERNAL = (
    lib.NP_FATAL_NONE, lib.NP_FATAL_ID, lib.NP_FATAL_SLOTS, lib.NP_FATAL_INTERNAL,
)  # fmt: skip
SW_FLOOD, SW_RUNT, SW_OVERSIZE, SW_SAME_PORT, SW_SPOOFED, SW_NO_EGRESS = (
    lib.NP_SW_FLOOD, lib.NP_SW_RUNT, lib.NP_SW_OVERSIZE, lib.NP_SW_SAME_PORT, lib.NP_SW_SPOOFED,
    lib.NP_SW_NO_EGRESS,
)  # fmt: skip
MAX_FRAME_LEN = 65535 + 14
_OP = GNTTAB_COPY.size
_SPANS = 4096  # frames FrameBatch.materialize locates in one call (more: frame by frame)
_spans: tuple[Any, Any] | None = None


def _span_arrays() -> tuple[Any, Any]:
    """The start/end scratch arrays of :meth:`FrameBatch.materialize` (one pair, reused)."""
    global _spans
    if _spans is None:
        _spans = (ffi.new("uint64_t[]", _SPANS), ffi.new("uint64_t[]", _SPANS))
    return _spans


_STATUS = struct.Struct("<h")


class Area:
    """Dom0 pages as one byte space (``struct np_area``): where the data path keeps frames."""

    def __init__(self, mem: Any, gfns: Sequence[int]) -> None:
        self.mem = mem  # dom0's RAM (a writable buffer): kept alive as long as the area
        self._cmem = ffi.from_buffer(mem, require_writable=True)
        self._gfns = ffi.new("uint64_t[]", list(gfns))
        self.gfns = list(gfns)
        self.c = ffi.new("struct np_area *")
        self.c.mem = ffi.cast("uint8_t *", self._cmem)
        self.c.gfn = self._gfns
        self.c.npages = len(self.gfns)
        self._view = mem
        self.npages = len(self.gfns)

    def release(self) -> None:
        """Let go of dom0's memory (its mmap can only be closed without exports)."""
        ffi.release(self._cmem)

    def ptr(self, offset: int) -> Any:
        """A C pointer to byte ``offset`` of dom0's RAM."""
        return ffi.cast("uint8_t *", self._cmem) + offset

    def addr(self, pos: int) -> int:
        """The offset in dom0's RAM of area position ``pos``."""
        return self.gfns[(pos >> 12) % self.npages] * PAGE + (pos & (PAGE - 1))

    def read(self, pos: int, length: int) -> bytes:
        """The ``length`` bytes of the frame at ``pos`` (a copy)."""
        if length <= PAGE:
            a = self.addr(pos)
            return bytes(self._view[a : a + length])
        return b"".join(self.read(pos + k, min(PAGE, length - k)) for k in range(0, length, PAGE))

    def write(self, pos: int, data: bytes | memoryview) -> int:
        """Store a frame at ``pos`` (chunks of a page, as :meth:`place` laid it); the chunks written."""
        length = len(data)
        if length <= PAGE:
            a = self.addr(pos)
            self._view[a : a + length] = data
            return 1
        for k in range(0, length, PAGE):
            a = self.addr(pos + k)
            self._view[a : a + min(PAGE, length - k)] = data[k : k + PAGE]
        return -(-length // PAGE)


def place(c: Any, length: int, check_room: bool) -> int:
    """``pvio_np_place`` in Python: where a frame of ``length`` bytes goes at the area's head, or
    -1 when ``check_room`` and there is no room between tail and head."""
    p = int(c.head)
    off = p & (PAGE - 1)
    if off and (length > PAGE or off + length > PAGE):
        p = (p + PAGE - 1) & ~(PAGE - 1)
    if check_room and p + length - int(c.tail) > int(c.npages) * PAGE:
        return -1
    c.head = p + length
    return p


class RxQueue:
    """A vif's queue of frames waiting for guest buffers (``struct np_rxq``), in its own area."""

    def __init__(self, capacity: int) -> None:
        self.capacity = max(1, capacity)
        self._q = ffi.new("struct np_frame[]", self.capacity)
        self.c = ffi.new("struct np_rxq *")
        self.c.q = self._q
        self.c.qcap = self.capacity
        self.area: Area | None = None

    def bind(self, area: Area) -> None:
        """Keep the queued frames in ``area`` from now on (the queue must be empty)."""
        self.clear()
        self.area = area
        self.c.area = area.c[0]
        self.c.area.head = self.c.area.tail = 0

    def __len__(self) -> int:
        return int(self.c.qlen)

    def __bool__(self) -> bool:
        return self.c.qlen != 0

    def clear(self) -> None:
        """Forget every queued frame."""
        self.c.qlen = 0
        self.c.qhead = 0
        self.c.area.tail = self.c.area.head

    def load(self, path: CPath | PythonPath, src: Area, frames: Any, idx: Any, n: int) -> int:
        """Make this (scratch) queue hold frames ``idx[0..n)`` of ``src`` where they lie: RX
        straight from a switch batch, with no copy into the receiver's own queue."""
        self.area = src
        return path.rx_load(self, src, frames, idx, n)

    def frames(self) -> list[bytes]:
        """The queued frames (copies), oldest first: for inspection and tests."""
        c = self.c
        out = []
        for k in range(c.qlen):
            f = c.q[(c.qhead + k) % c.qcap]
            out.append(self._area().read(f.pos, f.len))
        return out

    def _area(self) -> Area:
        assert self.area is not None
        return self.area


class FrameBatch:
    """Frames in an area, as one TX drain produced them: what travels through the switch.

    ``frames`` is a ``struct np_frame[]`` (position and length of each).  The frames are valid
    until their producer's next batch: a port that keeps them copies them (into its own queue,
    or as ``bytes`` with :meth:`materialize`, each copy counted by the caller).
    """

    __slots__ = ("area", "frames", "n")

    def __init__(self, area: Area, frames: Any, n: int) -> None:
        self.area = area
        self.frames = frames
        self.n = n

    def __len__(self) -> int:
        return self.n

    def settled(self) -> FrameBatch:
        """This batch with its frames in an :class:`Area` of the producer's own memory, where
        ``area``/``frames`` say: itself.  A batch whose frames still lie in a guest's memory
        (the smart NIC's, ``pvio.backends.smartnic.GuestFrameBatch``) answers with a copy, made
        once and counted by its producer: what the switch hands a port that reads frames from
        ``area`` or keeps them past the call."""
        return self

    def materialize(self, idx: Any = None, n: int | None = None) -> list[bytes]:
        """The frames (``idx[0..n)`` of them, or all) as ``bytes``: one copy each.

        Frames of up to a page (the common case) are located by ``pvio_np_spans`` and copied
        out by :func:`pvio.core._frames.gather`, in two calls for the batch; a batch with a
        longer frame is copied frame by frame (:meth:`Area.read`)."""
        count = self.n if idx is None else (n or 0)
        if 0 < count <= _SPANS:
            starts, ends = _span_arrays()
            which = ffi.NULL if idx is None else idx
            if lib.pvio_np_spans(self.area.c, self.frames, which, count, starts, ends) == 0:
                return _frames.gather(self.area.mem, ffi.buffer(starts), ffi.buffer(ends), count)[0]
        f = self.frames
        read = self.area.read
        if idx is None:
            return [read(f[k].pos, f[k].len) for k in range(self.n)]
        return [read(f[idx[k]].pos, f[idx[k]].len) for k in range(n or 0)]


class CPath:
    """The C implementation (``native/netpath.c``): one cffi call per batch step."""

    name = "c"

    def tx_plan(self, raw: bytes, nr_ents: int, fatal_slots: int, fe: int, area: Area, ops: Any,
                max_ops: int, pkts: Any, plan: Any) -> None:  # fmt: skip
        """Group ``raw`` (packed TX requests) into packets, validate, place and plan their copies."""
        lib.pvio_np_tx_plan(
            ffi.from_buffer(raw), len(raw) // 12, nr_ents, fatal_slots, fe, area.c, ops, max_ops, pkts, plan
        )

    def tx_finish(self, raw: bytes, ops: Any, pkts: Any, npkts: int, area: Area, rsp: Any, frames: Any,
                  done: Any) -> None:  # fmt: skip
        """After the grant copy: drops, checksums, frames and every request's response."""
        lib.pvio_np_tx_finish(ffi.from_buffer(raw), ops, pkts, npkts, area.c, rsp, frames, done)

    def rx_enqueue(self, q: RxQueue, src: Area, frames: Any, idx: Any, n: int, limit: int, done: Any) -> None:
        """Copy frames into the queue's area, at most ``limit`` queued; the rest are dropped."""
        lib.pvio_np_rx_enqueue(q.c, src.c, frames, idx if idx is not None else ffi.NULL, n, limit, done)

    def rx_load(self, q: RxQueue, src: Area, frames: Any, idx: Any, n: int) -> int:
        """Point the scratch queue ``q`` at frames of ``src`` (see :meth:`RxQueue.load`)."""
        return int(lib.pvio_np_rx_load(q.c, src.c, frames, idx if idx is not None else ffi.NULL, n))

    def rx_plan(self, q: RxQueue, avail: int, max_frames: int) -> tuple[int, int]:
        """How many queued frames ``avail`` posted buffers take, and their slots."""
        need = ffi.new("uint32_t *")
        nf = lib.pvio_np_rx_plan(q.c, avail, max_frames, need)
        return int(nf), int(need[0])

    def rx_build(self, q: RxQueue, nframes: int, reqs: bytes, fe: int, ops: Any) -> int:
        """The grant-copy ops of the first ``nframes`` queued frames into the guest's buffers."""
        return int(lib.pvio_np_rx_build(q.c, nframes, ffi.from_buffer(reqs), fe, ops))

    def rx_finish(self, q: RxQueue, nframes: int, reqs: bytes, ops: Any, rsp: Any, done: Any) -> None:
        """After the grant copy: the responses and counts; the frames leave the queue."""
        lib.pvio_np_rx_finish(q.c, nframes, ffi.from_buffer(reqs), ops, rsp, done)


def _op_status(ops: memoryview, k: int) -> int:
    return int(_STATUS.unpack_from(ops, k * _OP + GNTTAB_COPY_STATUS_OFFSET)[0])


class PythonPath:
    """The readable reference: the same steps, state and results as :class:`CPath`, in Python."""

    name = "python"

    def tx_plan(self, raw: bytes, nr_ents: int, fatal_slots: int, fe: int, area: Area, ops: Any,
                max_ops: int, pkts: Any, plan: Any) -> None:  # fmt: skip
        reqs = list(TX_REQUEST.iter_unpack(raw))
        for field in ("npkts", "consumed", "nops", "fatal", "fatal_arg", "nbad"):
            setattr(plan, field, 0)
        area.c.head = area.c.tail = 0
        n = len(reqs)
        i = npkts = nops = 0
        blob: list[bytes] = []
        while i < n:
            start = i
            first = reqs[i]
            if first[3] >= nr_ents:
                plan.fatal, plan.fatal_arg = FATAL_ID, first[3]
                return
            j = i + 1
            # Extra-info slots follow the first slot while EXTRA_FLAG_MORE chains them.
            extras = 0
            extras_pending = bool(first[2] & NETTXF_EXTRA_INFO)
            while extras_pending and j < n:
                extras += 1
                ex_flags = (reqs[j][0] >> 8) & 0xFF
                j += 1
                extras_pending = bool(ex_flags & XEN_NETIF_EXTRA_FLAG_MORE)
            slots = [first]
            flags = first[2]
            while flags & NETTXF_MORE_DATA and j < n:
                slots.append(reqs[j])
                flags = reqs[j][2]
                j += 1
                if len(slots) + extras > fatal_slots:
                    plan.fatal = FATAL_SLOTS
                    return
            if flags & NETTXF_MORE_DATA or extras_pending:
                # The rest of the packet is not published yet: its slots are carried.
                if j - start > fatal_slots:
                    plan.fatal = FATAL_SLOTS
                    return
                break
            for r in reqs[start + 1 : j]:
                if r[3] >= nr_ents:
                    plan.fatal, plan.fatal_arg = FATAL_ID, r[3]
                    return
            p = pkts[npkts]
            npkts += 1
            p.first, p.nslots, p.extras = start, len(slots), extras
            p.csum = 1 if first[2] & NETTXF_CSUM_BLANK else 0
            p.bad_status = p.op = p.nops = p.pos = p.len = 0
            reason = tx_packet_problem(slots)
            p.reason = reason
            i = j
            if reason != OK:
                plan.nbad += 1
                continue
            first_len = first[4] - sum(s[4] for s in slots[1:])
            pos = place(area.c, first[4], True)
            if pos < 0 or nops + 2 * len(slots) > max_ops:
                plan.fatal = FATAL_INTERNAL
                return
            p.pos, p.len, p.op = pos, first[4], nops
            d = pos
            for k, (gref, offset, _flags, _id, size) in enumerate(slots):
                left = first_len if k == 0 else size
                soff = offset
                while left:  # a chunk never crosses a page of the area
                    doff = d & (PAGE - 1)
                    chunk = min(PAGE - doff, left)
                    gfn = area.gfns[(d >> 12) % area.npages]
                    blob.append(
                        GNTTAB_COPY.pack(gref, fe, soff, gfn, DOMID_SELF, doff, chunk, GNTCOPY_source_gref, 0)
                    )
                    nops += 1
                    soff += chunk
                    d += chunk
                    left -= chunk
            p.nops = nops - p.op
        data = b"".join(blob)
        ops[: len(data)] = data
        plan.npkts, plan.consumed, plan.nops = npkts, i, nops

    def tx_finish(self, raw: bytes, ops: Any, pkts: Any, npkts: int, area: Area, rsp: Any, frames: Any,
                  done: Any) -> None:  # fmt: skip
        reqs = list(TX_REQUEST.iter_unpack(raw))
        out: list[bytes] = []
        nf = nbytes = checksums = 0
        drops = [0] * 8
        for x in range(npkts):
            p = pkts[x]
            if p.reason == OK:
                bad = next((s for s in (_op_status(ops, p.op + k) for k in range(p.nops)) if s), 0)
                if bad:
                    p.reason, p.bad_status = BAD_GRANT, bad
                else:
                    if p.csum:  # offloaded: the backend finishes it, in place
                        area.write(p.pos, complete_checksum(area.read(p.pos, p.len)))
                        checksums += 1
                    frames[nf].pos, frames[nf].len, frames[nf].pad = p.pos, p.len, 0
                    nf += 1
                    nbytes += p.len
            status = NETIF_RSP_OKAY if p.reason == OK else NETIF_RSP_ERROR
            if p.reason != OK:
                drops[p.reason] += 1
            out.append(TX_RESPONSE.pack(reqs[p.first][3], status))
            out.extend(TX_RESPONSE.pack(0, NETIF_RSP_NULL) for _ in range(p.extras))
            data_start = p.first + 1 + p.extras
            out.extend(TX_RESPONSE.pack(reqs[data_start + k][3], status) for k in range(p.nslots - 1))
        data = b"".join(out)
        ffi.memmove(rsp, data, len(data))
        done.nrsp, done.nframes, done.bytes, done.checksums = len(out), nf, nbytes, checksums
        for k in range(8):
            done.drops[k] = drops[k]

    def rx_enqueue(self, q: RxQueue, src: Area, frames: Any, idx: Any, n: int, limit: int, done: Any) -> None:
        c = q.c
        limit = min(limit, int(c.qcap))
        done.queued = done.dropped = done.copies = done.copy_bytes = 0
        for k in range(n):
            f = frames[idx[k] if idx is not None else k]
            pos = place(c.area, f.len, True) if c.qlen < limit else -1
            if pos < 0:
                done.dropped = n - k
                break
            if c.qlen == 0:
                c.area.tail = pos
            done.copies += q._area().write(pos, src.read(f.pos, f.len))
            done.copy_bytes += f.len
            d = c.q[(c.qhead + c.qlen) % c.qcap]
            d.pos, d.len, d.pad = pos, f.len, 0
            c.qlen += 1
            done.queued += 1

    def rx_load(self, q: RxQueue, src: Area, frames: Any, idx: Any, n: int) -> int:
        c = q.c
        n = min(n, int(c.qcap))
        c.area = src.c[0]
        c.qhead, c.qlen = 0, n
        for k in range(n):
            f = frames[idx[k] if idx is not None else k]
            c.q[k].pos, c.q[k].len, c.q[k].pad = f.pos, f.len, 0
        c.area.tail = c.q[0].pos if n else c.area.head
        return n

    def rx_plan(self, q: RxQueue, avail: int, max_frames: int) -> tuple[int, int]:
        c = q.c
        nf = need = 0
        while nf < c.qlen and nf < max_frames:
            slots = max(1, -(-c.q[(c.qhead + nf) % c.qcap].len // PAGE))
            if need + slots > avail:
                break
            need += slots
            nf += 1
        return nf, need

    def rx_build(self, q: RxQueue, nframes: int, reqs: bytes, fe: int, ops: Any) -> int:
        c = q.c
        area = q._area()
        rx = list(RX_REQUEST.iter_unpack(reqs))
        blob: list[bytes] = []
        for x in range(nframes):
            f = c.q[(c.qhead + x) % c.qcap]
            for part in range(max(1, -(-f.len // PAGE))):
                p = f.pos + part * PAGE
                chunk = min(PAGE, f.len - part * PAGE)
                gref = rx[len(blob)][2]
                gfn = area.gfns[(p >> 12) % area.npages]
                blob.append(
                    GNTTAB_COPY.pack(
                        gfn, DOMID_SELF, p & (PAGE - 1), gref, fe, 0, chunk, GNTCOPY_dest_gref, 0
                    )
                )
        data = b"".join(blob)
        ops[: len(data)] = data
        return len(blob)

    def rx_finish(self, q: RxQueue, nframes: int, reqs: bytes, ops: Any, rsp: Any, done: Any) -> None:
        c = q.c
        rx = list(RX_REQUEST.iter_unpack(reqs))
        out: list[bytes] = []
        delivered = delivered_bytes = bad = 0
        for _ in range(nframes):
            f = c.q[c.qhead]
            nslots = max(1, -(-f.len // PAGE))
            k = len(out)
            ok = not any(_op_status(ops, k + part) for part in range(nslots))
            for part in range(nslots):
                rid = rx[k + part][0]
                if ok:
                    more = NETRXF_MORE_DATA if part + 1 < nslots else 0
                    out.append(RX_RESPONSE.pack(rid, 0, more, min(PAGE, f.len - part * PAGE)))
                else:
                    out.append(RX_RESPONSE.pack(rid, 0, 0, NETIF_RSP_ERROR))
            if ok:
                delivered += 1
                delivered_bytes += f.len
            else:
                bad += 1
            c.qhead = (c.qhead + 1) % c.qcap
            c.qlen -= 1
        c.area.tail = c.q[c.qhead].pos if c.qlen else c.area.head
        data = b"".join(out)
        ffi.memmove(rsp, data, len(data))
        done.nrsp, done.delivered, done.delivered_bytes, done.bad_grant = (
            len(out),
            delivered,
            delivered_bytes,
            bad,
        )


def tx_packet_problem(slots: Sequence[tuple[int, int, int, int, int]]) -> int:
    """Why a TX packet (its data slots: gref, offset, flags, id, size) must be dropped (a reason
    number), or OK: at most 18 slots, every later slot inside its page, sizes adding up, the
    first slot inside its page.  BackendVif._check_packet applies (and logs) the same rules."""
    if len(slots) > XEN_NETIF_NR_SLOTS_MIN:
        return TOO_MANY_SLOTS
    for _gref, offset, _flags, _id, size in slots[1:]:
        if size <= 0 or offset + size > PAGE:
            return BAD_OFFSET
    first_len = slots[0][4] - sum(s[4] for s in slots[1:])
    if first_len <= 0:
        return BAD_SIZE
    if slots[0][1] + first_len > PAGE:
        return BAD_OFFSET
    return OK


C = CPath()
PYTHON = PythonPath()


def default_path() -> CPath | PythonPath:
    """The implementation PVIO_DATAPATH selects (C unless it says ``python``)."""
    return PYTHON if DATAPATH == "python" else C


__all__ = [
    "DATAPATH",
    "PYTHON",
    "REASONS",
    "Area",
    "C",
    "CPath",
    "FrameBatch",
    "PythonPath",
    "RxQueue",
    "default_path",
    "place",
    "tx_packet_problem",
]


def enqueue_bytes(q: RxQueue, frames: Sequence[bytes | memoryview], limit: int) -> tuple[int, int, int, int]:
    """Copy ``frames`` (from a port that hands ``bytes``) to the queue's tail, as ``rx_enqueue``
    does for a batch: (queued, dropped, copies, copy_bytes)."""
    c = q.c
    limit = min(limit, int(c.qcap))
    area = q._area()
    queued = copies = nbytes = 0
    for k, frame in enumerate(frames):
        length = len(frame)
        pos = place(c.area, length, True) if c.qlen < limit else -1
        if pos < 0:
            return queued, len(frames) - k, copies, nbytes
        if c.qlen == 0:
            c.area.tail = pos
        copies += area.write(pos, frame)
        nbytes += length
        d = c.q[(c.qhead + c.qlen) % c.qcap]
        d.pos, d.len, d.pad = pos, length, 0
        c.qlen += 1
        queued += 1
    return queued, 0, copies, nbytes
