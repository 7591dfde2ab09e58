"""The smart NIC's DMA loops: one call per batch of descriptors, in C, with the Python reference.

:mod:`pvio.backends.smartnic` takes a batch of descriptors off a ring (each copied out of the
shared page once, by ring.c) and hands the copy to :func:`tx_batch` or :func:`rx_batch`: for
each descriptor they check it, move the frame between guest memory and ``bytes`` (the DMA) and
write its completion.  The C versions (``native/snic_dma.c``, module ``_snic_dma``) are the
ones the device uses; :func:`tx_batch_py` and :func:`rx_batch_py` are the readable reference,
held equal to them by ``tests/test_smartnic_dma.py`` on random and hostile descriptors.

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

#: (frames, completions, end, bytes sent, bad_len, bad_buf, bad_flags)
TxResult = tuple[list[bytes], bytes, int, int, int, int, int]
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


def tx_batch_py(
    descs: bytes, mem: Any, pool_base: int, pool_size: int, pool_count: int, start: int = 0
) -> TxResult:
    """Send descriptors ``start``.. of ``descs`` until one names a granted page (the reference)."""
    pool = (pool_base, pool_size, pool_count)
    mem_len = len(mem)
    frames: list[bytes] = []
    cmpls: list[bytes] = []
    refused = [0, 0, 0]
    nbytes = 0
    items = list(DESC.iter_unpack(descs))
    end = start
    while end < len(items):
        buf, offset, length, desc_id, flags, _rsvd = items[end]
        at = SNIC_E_BAD_LEN if length < ETH_HEADER_LEN else _window(buf, offset, length, flags, pool, mem_len)
        if at == GRANTED:
            break
        end += 1
        if at < 0:
            refused[_STATUS_INDEX[at]] += 1
            cmpls.append(CMPL.pack(desc_id, 0, at, 0))
            continue
        frames.append(bytes(mem[at : at + length]))  # the DMA read: guest memory -> wire
        nbytes += length
        cmpls.append(CMPL.pack(desc_id, length, SNIC_OK, 0))
    return frames, b"".join(cmpls), end, nbytes, refused[0], refused[1], refused[2]


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


def tx_batch(
    descs: bytes, mem: Any, pool_base: int, pool_size: int, pool_count: int, start: int = 0
) -> TxResult:
    """:func:`tx_batch_py` in C: one call per batch."""
    result: TxResult = _snic_dma.tx_batch(descs, mem, pool_base, pool_size, pool_count, start)
    return result


def rx_batch(
    descs: bytes, frames: list[bytes], mem: Any, pool_base: int, pool_size: int, pool_count: int
) -> RxResult:
    """:func:`rx_batch_py` in C: one call per batch."""
    result: RxResult = _snic_dma.rx_batch(descs, frames, mem, pool_base, pool_size, pool_count)
    return result
