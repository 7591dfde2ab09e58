"""The smart NIC's DMA loops: one call per batch of descriptors, in C, with the Python reference.

:mod:`pvio.backends.smartnic` takes a batch of descriptors off a ring (each copied out of the
shared page once, by ring.c) and hands the copy to one of these: for each descriptor they check
it, move the frame between guest memory and the device's side (the DMA) and write its
completion.  :func:`tx_area_batch` DMAs TX frames into the device's TX area, where they form a
:class:`~pvio.core.netpath.FrameBatch` for the switch (placed as ``pvio_np_place`` places
them); :func:`rx_area_batch` writes frames of a switch batch from where they lie in its area,
:func:`rx_batch` frames held as ``bytes``; :func:`area_bytes` copies frames of a batch out (a
receiver keeping frames it cannot lend) and :func:`frame_entries` gathers their ``struct
np_frame`` entries.  The C versions (``native/snic_dma.c``, module ``_snic_dma``) are the ones
the device uses; :func:`tx_area_batch_py`, :func:`rx_area_batch_py`, :func:`rx_batch_py`,
:func:`area_frames` and :func:`frame_entries_py` are the readable reference, held equal to them
by ``tests/test_smartnic_dma.py`` on random and hostile input.

A descriptor naming a granted page (``SNIC_F_GREF``, otherwise well formed) needs the grant
table, which lives in Python: both loops stop before it and say where, and the device serves
that descriptor itself and calls again for the rest.

Checks, in the order both versions make them (a refused descriptor is completed with its
status and counted by reason, never raised): flags other than ``SNIC_F_GREF`` (bad_flags), a
zero length (bad_len; TX: a length below the 14-byte Ethernet header), then for a pool buffer
an index past the pool (bad_buf), offset + length past the buffer (bad_len), and a window
outside the guest memory (bad_buf; ENABLE already refuses such pools, this is belt and braces).
"""

from __future__ import annotations

import struct
from typing import Any

from pvio.abi.smartnic import (
    CMPL,
    DESC,
    SNIC_E_BAD_BUF,
    SNIC_E_BAD_FLAGS,
    SNIC_E_BAD_LEN,
    SNIC_F_GREF,
    SNIC_OK,
)
from pvio.backends import _snic_dma

ETH_HEADER_LEN = 14
PAGE = 4096
#: ``struct np_frame`` (pvio/core/native/netpath.h): a frame of a switch batch, where it lies in its area.
NP_FRAME = struct.Struct("<QII")
STOP_END, STOP_GRANTED, STOP_FULL = 0, 1, 2  # why tx_area_batch stopped

#: (completions, end, stop, frame entries, area head, bytes sent, bad_len, bad_buf, bad_flags)
TxAreaResult = tuple[bytes, int, int, int, int, int, int, int, int]

#: (completions, descriptors used, frames used, delivered, bytes, too_big, bad_len, bad_buf, bad_flags)
RxResult = tuple[bytes, int, int, int, int, int, int, int, int]

_STATUS_INDEX = {SNIC_E_BAD_LEN: 0, SNIC_E_BAD_BUF: 1, SNIC_E_BAD_FLAGS: 2}


GRANTED = -10  # _window's answer for a well-formed descriptor naming a granted page


def _window(buf: int, offset: int, length: int, flags: int, pool: tuple[int, int, int], mem_len: int) -> int:
    """A pool descriptor's guest-physical address (>= 0), its negative SNIC_E_* status, or
    :data:`GRANTED` for a granted page (the caller's to serve)."""
    if flags & ~SNIC_F_GREF:
        return SNIC_E_BAD_FLAGS
    if length == 0:
        return SNIC_E_BAD_LEN
    if flags & SNIC_F_GREF:
        return GRANTED
    base, size, count = pool
    if buf >= count:
        return SNIC_E_BAD_BUF
    if offset + length > size:
        return SNIC_E_BAD_LEN
    gpa = base + buf * size + offset
    if gpa + length > mem_len:
        return SNIC_E_BAD_BUF
    return gpa


def rx_batch_py(
    descs: bytes, frames: list[bytes], mem: Any, pool_base: int, pool_size: int, pool_count: int
) -> RxResult:
    """Write ``frames`` in order into the buffers ``descs`` post, until either runs out or a
    descriptor names a granted page (the reference).  A frame longer than the buffer it is due
    in is dropped and the buffer kept for the next."""
    pool = (pool_base, pool_size, pool_count)
    mem_len = len(mem)
    items = list(DESC.iter_unpack(descs))
    cmpls: list[bytes] = []
    refused = [0, 0, 0]
    i = j = delivered = nbytes = too_big = 0
    while i < len(items) and j < len(frames):
        buf, offset, length, desc_id, flags, _rsvd = items[i]
        at = _window(buf, offset, length, flags, pool, mem_len)
        if at == GRANTED:
            break
        if at < 0:
            refused[_STATUS_INDEX[at]] += 1
            cmpls.append(CMPL.pack(desc_id, 0, at, 0))
            i += 1
            continue
        frame = frames[j]
        j += 1
        if len(frame) > length:
            too_big += 1
            continue
        mem[at : at + len(frame)] = frame  # the DMA write: wire -> guest memory
        cmpls.append(CMPL.pack(desc_id, len(frame), SNIC_OK, 0))
        i += 1
        delivered += 1
        nbytes += len(frame)
    return b"".join(cmpls), i, j, delivered, nbytes, too_big, refused[0], refused[1], refused[2]


def place(head: int, length: int) -> int:
    """Where a frame of ``length`` bytes goes at ``head`` of an area (``pvio_np_place``): within one
    page if it fits one, else from a page boundary."""
    off = head & (PAGE - 1)
    if off and (length > PAGE or off + length > PAGE):
        return (head + PAGE - 1) & ~(PAGE - 1)
    return head


def tx_area_batch_py(
    descs: bytes,
    mem: Any,
    pool_base: int,
    pool_size: int,
    pool_count: int,
    start: int,
    area: Any,
    frames: Any,
    nf: int,
    head: int,
) -> TxAreaResult:
    """Send descriptors ``start``.. of ``descs``: each frame DMA'd into ``area`` (contiguous: area
    page i is bytes ``i*4096..`` of it) at ``head``, placed as :func:`place` places, and entered
    as ``struct np_frame`` number ``nf`` of the buffer ``frames``: a batch for the switch's C
    decision.  Stops before a granted page (STOP_GRANTED) or a frame there is no room for
    (STOP_FULL).  The reference of ``_snic_dma.tx_area_batch``."""
    pool = (pool_base, pool_size, pool_count)
    mem_len, cap = len(mem), len(frames) // NP_FRAME.size
    cmpls: list[bytes] = []
    refused = [0, 0, 0]
    nbytes = 0
    items = list(DESC.iter_unpack(descs))
    end, stop = start, STOP_END
    while end < len(items):
        buf, offset, length, desc_id, flags, _rsvd = items[end]
        at = SNIC_E_BAD_LEN if length < ETH_HEADER_LEN else _window(buf, offset, length, flags, pool, mem_len)
        if at == GRANTED:
            stop = STOP_GRANTED
            break
        if at < 0:
            end += 1
            refused[_STATUS_INDEX[at]] += 1
            cmpls.append(CMPL.pack(desc_id, 0, at, 0))
            continue
        pos = place(head, length)
        if nf == cap or pos + length > len(area):
            stop = STOP_FULL
            break
        end += 1
        area[pos : pos + length] = mem[at : at + length]  # the DMA read: guest memory -> the area
        NP_FRAME.pack_into(frames, nf * NP_FRAME.size, pos, length, 0)
        nf += 1
        head = pos + length
        nbytes += length
        cmpls.append(CMPL.pack(desc_id, length, SNIC_OK, 0))
    return b"".join(cmpls), end, stop, nf, head, nbytes, refused[0], refused[1], refused[2]


def area_frames(area_mem: Any, gfns: list[int], frames: Any, idx: list[int] | None, n: int) -> list[bytes]:
    """Frames ``idx[0..n)`` (or ``0..n-1``) of a switch batch as ``bytes``, read where they lie:
    area position p is byte ``p % 4096`` of page ``gfns[(p >> 12) % len(gfns)]`` of ``area_mem``."""
    out = []
    for j in range(n):
        pos, length, _pad = NP_FRAME.unpack_from(frames, (idx[j] if idx is not None else j) * NP_FRAME.size)
        chunks, done = [], 0
        while done < length:
            p = pos + done
            off = p & (PAGE - 1)
            chunk = min(length - done, PAGE - off)
            at = gfns[(p >> 12) % len(gfns)] * PAGE + off
            chunks.append(bytes(area_mem[at : at + chunk]))
            done += chunk
        out.append(b"".join(chunks))
    return out


def rx_area_batch_py(
    descs: bytes,
    area_mem: Any,
    gfns: list[int],
    frames: Any,
    idx: list[int] | None,
    n: int,
    mem: Any,
    pool_base: int,
    pool_size: int,
    pool_count: int,
) -> RxResult:
    """:func:`rx_batch_py` on frames of a switch batch where they lie (the reference of
    ``_snic_dma.rx_area_batch``, which copies each straight from the area into its buffer)."""
    batch = area_frames(area_mem, gfns, frames, idx, n)
    return rx_batch_py(descs, batch, mem, pool_base, pool_size, pool_count)


def rx_batch(
    descs: bytes, frames: list[bytes], mem: Any, pool_base: int, pool_size: int, pool_count: int
) -> RxResult:
    """:func:`rx_batch_py` in C: one call per batch."""
    result: RxResult = _snic_dma.rx_batch(descs, frames, mem, pool_base, pool_size, pool_count)
    return result


def tx_area_batch(
    descs: bytes,
    mem: Any,
    pool_base: int,
    pool_size: int,
    pool_count: int,
    start: int,
    area: Any,
    frames: Any,
    nf: int,
    head: int,
) -> TxAreaResult:
    """:func:`tx_area_batch_py` in C: one call per batch."""
    result: TxAreaResult = _snic_dma.tx_area_batch(
        descs, mem, pool_base, pool_size, pool_count, start, area, frames, nf, head
    )
    return result


def rx_area_batch(
    descs: bytes,
    area_mem: Any,
    gfns: Any,
    frames: Any,
    idx: Any,
    n: int,
    mem: Any,
    pool_base: int,
    pool_size: int,
    pool_count: int,
) -> RxResult:
    """:func:`rx_area_batch_py` in C (``gfns``: the pages as uint64; ``idx``: uint32 indices or None)."""
    result: RxResult = _snic_dma.rx_area_batch(
        descs, area_mem, gfns, frames, idx, n, mem, pool_base, pool_size, pool_count
    )
    return result


def area_bytes(area_mem: Any, gfns: Any, frames: Any, idx: Any, n: int) -> list[bytes]:
    """:func:`area_frames` in C (``gfns``: the pages as uint64; ``idx``: uint32 indices or None)."""
    result: list[bytes] = _snic_dma.area_bytes(area_mem, gfns, frames, idx, n)
    return result


def frame_entries_py(frames: Any, idx: list[int] | None, n: int) -> bytes:
    """The ``struct np_frame`` entries ``idx[0..n)`` (or the first ``n``) of ``frames``, gathered."""
    size = NP_FRAME.size
    if idx is None:
        if n * size > len(frames):
            raise ValueError("frame_entries: n past the frames")
        return bytes(frames[: n * size])
    if any(k * size + size > len(frames) for k in idx[:n]) or n > len(idx):
        raise ValueError("frame_entries: an index past the frames")
    return b"".join(bytes(frames[k * size : k * size + size]) for k in idx[:n])


def frame_entries(frames: Any, idx: Any, n: int) -> bytes:
    """:func:`frame_entries_py` in C (``idx``: uint32 indices or None)."""
    result: bytes = _snic_dma.frame_entries(frames, idx, n)
    return result
