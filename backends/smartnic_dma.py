"""The smart NIC's DMA loops: one call per batch of descriptors, in C, with the Python reference.

:mod:`pvio.backends.smartnic` takes a batch of descriptors off a ring (each copied out of the
shared page once, by ring.c) and hands the copy to one of these: for each descriptor they check
it, move the frame between guest memory and the device's side (the DMA) and write its
completion.  :func:`tx_guest_batch` sends TX frames as a switch batch that stays in guest
memory (positions are guest addresses) with a snapshot of each frame's 14-byte header, which
the switch decides on; :func:`rx_area_batch` writes frames of a switch batch from where they
lie (the sender's memory, with those checked headers over them, or an area) into posted
buffers, :func:`rx_batch` frames held as ``bytes``; :func:`area_copy` copies frames of a batch
into an area of the device's own (a frame that must wait, or goes to another kind of port),
:func:`area_bytes` copies them out as ``bytes``, and :func:`frame_entries` gathers their
``struct np_frame`` entries.  The C versions (``native/snic_dma.c``, module ``_snic_dma``) are
the ones the device uses; :func:`tx_guest_batch_py`, :func:`rx_area_batch_py`,
:func:`rx_batch_py`, :func:`area_copy_py`, :func:`area_frames` and :func:`frame_entries_py`
are the readable reference, held equal to them by ``tests/test_smartnic_dma.py`` on random and
hostile input.

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
STOP_END, STOP_GRANTED, STOP_FULL = 0, 1, 2  # why tx_guest_batch stopped
#: Frame k's checked header (its first 14 bytes) lies at ``HDR_STRIDE * k`` of a header buffer.
HDR_STRIDE: int = _snic_dma.HDR_STRIDE

#: (completions, end, stop, frame entries, bytes sent, bad_len, bad_buf, bad_flags)
TxGuestResult = tuple[bytes, int, int, int, int, int, int, int]

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


def area_frames(
    area_mem: Any, gfns: list[int] | None, frames: Any, idx: list[int] | None, n: int, hdrs: Any = None
) -> list[bytes]:
    """Frames ``idx[0..n)`` (or ``0..n-1``) of a switch batch as ``bytes``, read where they lie:
    area position p is byte ``p % 4096`` of page ``gfns[(p >> 12) % len(gfns)]`` of ``area_mem``
    (``gfns`` None: position p is byte p of ``area_mem``, guest memory as the area).  With
    ``hdrs``, frame k's checked header (``hdrs[HDR_STRIDE * k:]``) replaces its first 14 bytes."""
    out = []
    for j in range(n):
        k = idx[j] if idx is not None else j
        if (k + 1) * NP_FRAME.size > len(frames) or (hdrs is not None and (k + 1) * HDR_STRIDE > len(hdrs)):
            raise ValueError("rx_batch: a batch frame outside its area")
        pos, length, _pad = NP_FRAME.unpack_from(frames, k * NP_FRAME.size)
        chunks, done = [], 0
        while done < length:
            p = pos + done
            off = p & (PAGE - 1)
            chunk = min(length - done, PAGE - off)
            page = gfns[(p >> 12) % len(gfns)] if gfns is not None else p >> 12
            at = page * PAGE + off
            if at + chunk > len(area_mem):
                raise ValueError("rx_batch: a batch frame outside its area")
            chunks.append(bytes(area_mem[at : at + chunk]))
            done += chunk
        frame = b"".join(chunks)
        if hdrs is not None:
            cut = min(length, ETH_HEADER_LEN)
            frame = bytes(hdrs[k * HDR_STRIDE : k * HDR_STRIDE + cut]) + frame[cut:]
        out.append(frame)
    return out


def tx_guest_batch_py(
    descs: bytes,
    mem: Any,
    pool_base: int,
    pool_size: int,
    pool_count: int,
    start: int,
    frames: Any,
    heads: Any,
    hdrs: Any,
    nf: int,
) -> TxGuestResult:
    """Send descriptors ``start``.. of ``descs`` as a batch left in guest memory: no DMA yet.
    Each good frame is entered as ``struct np_frame`` number ``nf`` of ``frames`` at its guest
    address (guest memory is the batch's area, with no page table: ``area_frames(mem, None, ..)``),
    and its first 14 bytes are snapshotted into ``hdrs`` at ``HDR_STRIDE * nf`` and entered in
    ``heads`` there: the switch decides on the snapshot, which the guest can no longer change,
    and every later copy of the frame puts the snapshot over the header it reads.  Stops
    before a granted page (STOP_GRANTED) or when a table is full (STOP_FULL).  The reference
    of ``_snic_dma.tx_guest_batch``."""
    pool = (pool_base, pool_size, pool_count)
    mem_len = len(mem)
    cap = min(len(frames) // NP_FRAME.size, len(heads) // NP_FRAME.size, len(hdrs) // HDR_STRIDE)
    if len(descs) % DESC.size or not 0 <= start <= len(descs) // DESC.size or not 0 <= nf <= cap:
        raise ValueError("tx_guest_batch: partial descriptors, or start/nf out of range")
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
        if nf == cap:
            stop = STOP_FULL
            break
        end += 1
        h = nf * HDR_STRIDE
        hdrs[h : h + HDR_STRIDE] = bytes(mem[at : at + ETH_HEADER_LEN]) + bytes(HDR_STRIDE - ETH_HEADER_LEN)
        NP_FRAME.pack_into(frames, nf * NP_FRAME.size, at, length, 0)
        NP_FRAME.pack_into(heads, nf * NP_FRAME.size, h, length, 0)
        nf += 1
        nbytes += length
        cmpls.append(CMPL.pack(desc_id, length, SNIC_OK, 0))
    return b"".join(cmpls), end, stop, nf, nbytes, refused[0], refused[1], refused[2]


def area_copy_py(
    area_mem: Any,
    gfns: list[int] | None,
    frames: Any,
    idx: list[int] | None,
    n: int,
    hdrs: Any,
    dst: Any,
    dst_frames: Any,
    head: int,
) -> tuple[int, int, int]:
    """Copy frames ``idx[0..n)`` of a switch batch (read as :func:`area_frames` reads them, with
    their checked headers) into the contiguous area ``dst`` at ``head``, placed as :func:`place`
    places, frame j entered as ``struct np_frame`` j of ``dst_frames``; stops when either is
    full.  (copied, head, bytes).  The reference of ``_snic_dma.area_copy``."""
    if head > len(dst):
        raise ValueError("area_copy: head past the area")
    batch = area_frames(area_mem, gfns, frames, idx, n, hdrs)
    cap = len(dst_frames) // NP_FRAME.size
    copied = nbytes = 0
    for frame in batch[:cap]:
        pos = place(head, len(frame))
        if pos + len(frame) > len(dst):
            break
        dst[pos : pos + len(frame)] = frame
        NP_FRAME.pack_into(dst_frames, copied * NP_FRAME.size, pos, len(frame), 0)
        head = pos + len(frame)
        copied += 1
        nbytes += len(frame)
    return copied, head, nbytes


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
    hdrs: Any = None,
) -> RxResult:
    """:func:`rx_batch_py` on frames of a switch batch where they lie, with their checked headers
    when ``hdrs`` is given (the reference of ``_snic_dma.rx_area_batch``, which copies each
    straight from the area into its buffer)."""
    batch = area_frames(area_mem, gfns, frames, idx, n, hdrs)
    return rx_batch_py(descs, batch, mem, pool_base, pool_size, pool_count)


def rx_batch(
    descs: bytes, frames: list[bytes], mem: Any, pool_base: int, pool_size: int, pool_count: int
) -> RxResult:
    """:func:`rx_batch_py` in C: one call per batch."""
    result: RxResult = _snic_dma.rx_batch(descs, frames, mem, pool_base, pool_size, pool_count)
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
    hdrs: Any = None,
) -> RxResult:
    """:func:`rx_area_batch_py` in C (``gfns``: the pages as uint64, or None; ``idx``: uint32
    indices or None)."""
    result: RxResult = _snic_dma.rx_area_batch(
        descs, area_mem, gfns, frames, idx, n, mem, pool_base, pool_size, pool_count, hdrs
    )
    return result


def area_bytes(area_mem: Any, gfns: Any, frames: Any, idx: Any, n: int, hdrs: Any = None) -> list[bytes]:
    """:func:`area_frames` in C (``gfns``: the pages as uint64, or None; ``idx``: uint32 indices
    or None)."""
    result: list[bytes] = _snic_dma.area_bytes(area_mem, gfns, frames, idx, n, hdrs)
    return result


def tx_guest_batch(
    descs: bytes,
    mem: Any,
    pool_base: int,
    pool_size: int,
    pool_count: int,
    start: int,
    frames: Any,
    heads: Any,
    hdrs: Any,
    nf: int,
) -> TxGuestResult:
    """:func:`tx_guest_batch_py` in C: one call per batch."""
    result: TxGuestResult = _snic_dma.tx_guest_batch(
        descs, mem, pool_base, pool_size, pool_count, start, frames, heads, hdrs, nf
    )
    return result


def area_copy(
    area_mem: Any, gfns: Any, frames: Any, idx: Any, n: int, hdrs: Any, dst: Any, dst_frames: Any, head: int
) -> tuple[int, int, int]:
    """:func:`area_copy_py` in C (``gfns``, ``idx``, ``hdrs`` as :func:`area_bytes` takes them)."""
    result: tuple[int, int, int] = _snic_dma.area_copy(
        area_mem, gfns, frames, idx, n, hdrs, dst, dst_frames, head
    )
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
