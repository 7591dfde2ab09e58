"""The smart NIC's DMA loops: the C versions (``backends/native/snic_dma.c``) against the Python
reference (``tx_guest_batch_py``, ``rx_batch_py``, ``rx_area_batch_py``,
``area_frames``, ``area_copy_py``, ``frame_entries_py`` in ``pvio.backends.smartnic_dma``).

Random batches of descriptors -- mostly valid, many hostile (pool indices past the pool,
offsets and lengths past the buffer, zero and runt lengths, unknown flags, granted pages
that stop the batch, a pool geometry reaching past the memory) -- over random guest memory,
with random frames for RX: both versions must return the same values and leave the same
bytes in memory.  ``PVIO_FUZZ=1`` runs ten times as many batches.
"""

from __future__ import annotations

import array
import os
import random

import pytest

from pvio.abi.smartnic import CMPL, DESC, SNIC_F_GREF
from pvio.backends.smartnic_dma import (
    ETH_HEADER_LEN,
    HDR_STRIDE,
    NP_FRAME,
    PAGE,
    STOP_END,
    STOP_FULL,
    STOP_GRANTED,
    area_bytes,
    area_copy,
    area_copy_py,
    area_frames,
    frame_entries,
    frame_entries_py,
    place,
    rx_area_batch,
    rx_area_batch_py,
    rx_batch,
    rx_batch_py,
    tx_guest_batch,
    tx_guest_batch_py,
)

ROUNDS = 3000 if os.environ.get("PVIO_FUZZ") == "1" else 300
MEM = 64 * 1024


def random_desc(rng: random.Random, count: int, size: int) -> bytes:
    buf = rng.choice([rng.randrange(count), rng.randrange(count), count, count + 1, 0xFFFFFFFF])
    offset = rng.choice([0, 0, rng.randrange(size), size - 1, 0xFFFF])
    length = rng.choice([64, rng.randrange(1, size + 1), 0, 13, 14, size, size + 1, 0xFFFF])
    flags = rng.choice([0, 0, 0, SNIC_F_GREF, 0x2, SNIC_F_GREF | 0x4])
    return DESC.pack(buf, offset, length, rng.randrange(0x10000), flags, rng.randrange(2**32))


def pool(rng: random.Random) -> tuple[int, int, int]:
    size = rng.choice([64, 256, 2048])
    count = rng.randrange(1, MEM // size)
    base = rng.choice(
        [0, 4096, MEM - size * count, MEM - size * count + rng.randrange(1, 4096)]
    )  # last: past RAM
    return base, size, count


@pytest.mark.parametrize("seed", range(4))
def test_rx_batches_agree(seed: int) -> None:
    rng = random.Random(100 + seed)
    for _ in range(ROUNDS):
        fill = rng.randbytes(MEM)
        mem_c, mem_py = bytearray(fill), bytearray(fill)
        base, size, count = pool(rng)
        descs = b"".join(random_desc(rng, count, size) for _ in range(rng.randrange(0, 40)))
        frames = [
            rng.randbytes(rng.choice([14, 64, rng.randrange(14, 3000)])) for _ in range(rng.randrange(0, 40))
        ]
        got_c = rx_batch(descs, list(frames), memoryview(mem_c), base, size, count)
        got_py = rx_batch_py(descs, list(frames), memoryview(mem_py), base, size, count)
        assert got_c == got_py
        assert mem_c == mem_py


def guest_tables(cap: int) -> tuple[bytearray, bytearray, bytearray]:
    """Empty frame, header-entry and header tables for ``cap`` frames of a guest batch."""
    return bytearray(cap * NP_FRAME.size), bytearray(cap * NP_FRAME.size), bytearray(cap * HDR_STRIDE)


def test_a_granted_page_stops_the_batch_before_it() -> None:
    mem = bytearray(MEM)
    mem[0:64] = bytes(range(64))
    descs = (
        DESC.pack(0, 0, 64, 7, 0, 0) + DESC.pack(5, 0, 64, 8, SNIC_F_GREF, 0) + DESC.pack(1, 0, 64, 9, 0, 0)
    )
    tables = guest_tables(4)
    cmpls, end, stop, nf, nbytes, *refused = tx_guest_batch(descs, memoryview(mem), 0, 2048, 4, 0, *tables, 0)
    assert cmpls == CMPL.pack(7, 64, 0, 0)
    assert (end, stop, nf, nbytes, refused) == (1, STOP_GRANTED, 1, 64, [0, 0, 0])
    assert area_frames(mem, None, tables[0], None, 1, tables[2]) == [bytes(range(64))]
    resumed = tx_guest_batch(descs, memoryview(mem), 0, 2048, 4, 2, *tables, nf)
    assert resumed[1:5] == (3, STOP_END, 2, 64)  # resumed after it: to the end
    assert NP_FRAME.unpack_from(tables[0], 16) == (2048, 64, 0)  # buffer 1, where it lies


def test_bad_arguments_raise_instead_of_reading_past_the_batch() -> None:
    mem = memoryview(bytearray(MEM))
    tables = guest_tables(4)
    with pytest.raises(ValueError):
        tx_guest_batch(b"\0" * 15, mem, 0, 2048, 4, 0, *tables, 0)
    with pytest.raises(ValueError):
        tx_guest_batch(b"\0" * 16, mem, 0, 2048, 4, 2, *tables, 0)  # start past the end
    with pytest.raises(ValueError):
        tx_guest_batch(b"\0" * 16, mem, 0, 2048, 4, 0, *tables, 5)  # nf past the frame tables
    with pytest.raises(ValueError):  # a header table shorter than the frame tables bounds them
        tx_guest_batch(b"\0" * 16, mem, 0, 2048, 4, 0, tables[0], tables[1], bytearray(HDR_STRIDE), 2)
    with pytest.raises(ValueError):
        rx_batch(b"\0" * 17, [], mem, 0, 2048, 4)
    with pytest.raises(TypeError):
        rx_batch(DESC.pack(0, 0, 64, 1, 0, 0), ["not bytes"], mem, 0, 2048, 4)  # type: ignore[list-item]
    with pytest.raises(TypeError):
        rx_batch(b"", [], memoryview(bytes(MEM)), 0, 2048, 4)  # RX needs writable memory


def test_frames_copied_into_an_area_are_placed_as_the_switch_expects() -> None:
    mem = bytearray(MEM)
    for k in range(4):
        mem[k * 2048 : k * 2048 + 2000] = bytes([k + 1]) * 2000
    descs = b"".join(DESC.pack(k, 0, 2000, k, 0, 0) for k in range(4))
    tables = guest_tables(8)
    cmpls, end, stop, nf, nbytes, *refused = tx_guest_batch(descs, memoryview(mem), 0, 2048, 4, 0, *tables, 0)
    assert cmpls == b"".join(CMPL.pack(k, 2000, 0, 0) for k in range(4))
    assert (end, stop, nf, nbytes, refused) == (4, STOP_END, 4, 8000, [0, 0, 0])
    area, frames = bytearray(4 * PAGE), bytearray(8 * NP_FRAME.size)
    assert area_copy(mem, None, bytes(tables[0]), None, nf, bytes(tables[2]), area, frames, 0) == (
        4,
        8096,
        8000,
    )
    # two frames of 2000 bytes share a page; the third does not fit its rest and starts the next
    assert [NP_FRAME.unpack_from(frames, k * 16)[:2] for k in range(nf)] == [
        (0, 2000), (2000, 2000), (4096, 2000), (6096, 2000)
    ]  # fmt: skip
    assert area_frames(area, list(range(4)), frames, None, 4) == [bytes([k + 1]) * 2000 for k in range(4)]
    small = bytearray(PAGE)  # room for two: area_copy stops at the third
    assert area_copy(mem, None, bytes(tables[0]), None, nf, bytes(tables[2]), small, frames, 0)[0] == 2


def random_area(rng: random.Random) -> tuple[bytearray, list[int], bytearray, int]:
    """An area of random pages (not in order) of a random memory, holding random frames placed as
    pvio_np_place places them (from a random start: positions past the area wrap round it)."""
    mem_pages = rng.randrange(4, 24)
    area_mem = bytearray(rng.randbytes(mem_pages * PAGE))
    gfns = rng.sample(range(mem_pages), rng.randrange(1, mem_pages + 1))
    head = rng.choice([0, rng.randrange(0, 3 * PAGE), len(gfns) * PAGE * 5])
    entries = []
    room = len(gfns) * PAGE
    used = 0
    for _ in range(rng.randrange(0, 30)):
        length = rng.choice([14, 64, rng.randrange(14, 3000), PAGE, PAGE + 1, 2 * PAGE + 7])
        pos = place(head, length)
        if used + (pos - head) + length > room:
            break
        used += pos - head + length
        entries.append(NP_FRAME.pack(pos, length, 0))
        head = pos + length
    return area_mem, gfns, bytearray(b"".join(entries)), len(entries)


@pytest.mark.parametrize("seed", range(4))
def test_rx_from_an_area_agrees(seed: int) -> None:
    """rx_area_batch: frames of a switch batch, copied from where they lie (pages of the area in
    any order, frames longer than a page, a batch index with repeats), as the reference writes them."""
    rng = random.Random(300 + seed)
    for _ in range(ROUNDS):
        area_mem, gfns, frames, nfr = random_area(rng)
        fill = rng.randbytes(MEM)
        mem_c, mem_py = bytearray(fill), bytearray(fill)
        base, size, count = pool(rng)
        descs = b"".join(random_desc(rng, count, size) for _ in range(rng.randrange(0, 40)))
        if nfr and rng.random() < 0.5:
            idx: list[int] | None = [rng.randrange(nfr) for _ in range(rng.randrange(0, 2 * nfr))]
        else:
            idx = None
        n = len(idx) if idx is not None else nfr
        gfn_buf = array.array("Q", gfns).tobytes()
        idx_buf = array.array("I", idx).tobytes() if idx is not None else None
        got_c = rx_area_batch(
            descs, area_mem, gfn_buf, bytes(frames), idx_buf, n, memoryview(mem_c), base, size, count
        )
        got_py = rx_area_batch_py(
            descs, area_mem, gfns, frames, idx, n, memoryview(mem_py), base, size, count
        )
        assert got_c == got_py
        assert mem_c == mem_py


def random_index(rng: random.Random, nfr: int) -> tuple[list[int] | None, int, bytes | None]:
    """Half the time an index into ``nfr`` frames (repeats allowed), else None (all in order):
    (the index, how many frames it names, the index as uint32 for C)."""
    idx = [rng.randrange(nfr) for _ in range(rng.randrange(0, 2 * nfr))] if nfr else []
    if idx and rng.random() < 0.5:
        return idx, len(idx), array.array("I", idx).tobytes()
    return None, nfr, None


@pytest.mark.parametrize("seed", range(2))
def test_frames_copied_out_of_an_area_and_their_entries_agree(seed: int) -> None:
    """area_bytes and frame_entries (what a receiver keeps of a batch that must wait) against
    the reference: the same bytes, the same entries, for any index."""
    rng = random.Random(400 + seed)
    for _ in range(ROUNDS):
        area_mem, gfns, frames, nfr = random_area(rng)
        which, n, ib = random_index(rng, nfr)
        gfn_buf = array.array("Q", gfns).tobytes()
        want = area_frames(area_mem, gfns, frames, which, n)
        assert area_bytes(area_mem, gfn_buf, bytes(frames), ib, n) == want
        entries = frame_entries(bytes(frames), ib, n)
        assert entries == frame_entries_py(frames, which, n)
        assert area_frames(area_mem, gfns, entries, None, n) == want


def test_rx_from_an_area_refuses_a_broken_batch() -> None:
    """A batch frame outside its area's memory, an index past the frames, or n past the index is
    an error (ValueError), never a read outside the buffers."""
    mem = memoryview(bytearray(MEM))
    desc = DESC.pack(0, 0, 2048, 1, 0, 0)
    area_mem = bytes(2 * PAGE)
    one = NP_FRAME.pack(0, 64, 0)
    gfn = array.array("Q", [0]).tobytes()
    cases = [
        (array.array("Q", [2]).tobytes(), one, None, 1),  # the page lies past the area's memory
        (gfn, NP_FRAME.pack(PAGE - 8, 64, 0), None, 1),  # ok: wraps within page 0 (one page area)
        (gfn, one, array.array("I", [1]).tobytes(), 1),  # index past the frames
        (gfn, one, array.array("I", [0]).tobytes(), 2),  # n past the index
        (gfn, one, None, 2),  # n past the frames
    ]
    for k, (gfns, frames, idx, n) in enumerate(cases):
        if k == 1:
            assert rx_area_batch(desc, area_mem, gfns, frames, idx, n, mem, 0, 2048, 4)[3] == 1
            continue
        with pytest.raises(ValueError):
            rx_area_batch(desc, area_mem, gfns, frames, idx, n, mem, 0, 2048, 4)


@pytest.mark.parametrize("seed", range(4))
def test_tx_as_a_guest_batch_agrees(seed: int) -> None:
    """tx_guest_batch: the same completions, counts, frame entries (guest addresses), header
    entries and header snapshots as the reference, with tables small enough to fill up; the
    batch it leaves reads back as the frames in guest memory."""
    rng = random.Random(500 + seed)
    stops = set()
    for _ in range(ROUNDS):
        mem = bytearray(rng.randbytes(MEM))
        base, size, count = pool(rng)
        descs = b"".join(random_desc(rng, count, size) for _ in range(rng.randrange(0, 40)))
        start = rng.randrange(0, len(descs) // DESC.size + 1)
        cap = rng.choice([1, 8, 64])
        nf = rng.randrange(0, cap + 1)
        fills = [
            rng.randbytes(cap * NP_FRAME.size),
            rng.randbytes(cap * NP_FRAME.size),
            rng.randbytes(cap * HDR_STRIDE),
        ]
        bufs_c = [bytearray(f) for f in fills]
        bufs_py = [bytearray(f) for f in fills]
        got_c = tx_guest_batch(descs, memoryview(mem), base, size, count, start, *bufs_c, nf)
        got_py = tx_guest_batch_py(descs, memoryview(mem), base, size, count, start, *bufs_py, nf)
        assert got_c == got_py
        assert bufs_c == bufs_py
        stops.add(got_c[2])
        frames, heads, hdrs = bufs_c
        for k in range(nf, got_c[3]):  # the frames it entered: where they lie, and their headers
            pos, length, _ = NP_FRAME.unpack_from(frames, k * NP_FRAME.size)
            assert NP_FRAME.unpack_from(heads, k * NP_FRAME.size) == (k * HDR_STRIDE, length, 0)
            assert hdrs[k * HDR_STRIDE : k * HDR_STRIDE + ETH_HEADER_LEN] == mem[pos : pos + ETH_HEADER_LEN]
        got = area_frames(mem, None, frames, list(range(nf, got_c[3])), got_c[3] - nf, hdrs)
        assert got == [
            bytes(mem[p : p + n]) for p, n, _ in NP_FRAME.iter_unpack(frames[nf * 16 : got_c[3] * 16])
        ]
    assert stops == {STOP_END, STOP_GRANTED, STOP_FULL}


def random_guest_batch(rng: random.Random) -> tuple[bytearray, bytearray, bytearray, int]:
    """Guest memory, frames lying anywhere in it (across pages, overlapping, up to its last
    byte) and random checked headers for them: a batch tx_guest_batch could have left."""
    mem = bytearray(rng.randbytes(MEM))
    entries = []
    for _ in range(rng.randrange(0, 30)):
        length = rng.choice([14, 64, rng.randrange(14, 3000), PAGE + 1, 2 * PAGE + 7])
        pos = rng.choice([rng.randrange(0, MEM - length + 1), MEM - length, PAGE - 10])
        entries.append(NP_FRAME.pack(pos, length, 0))
    hdrs = bytearray(rng.randbytes(len(entries) * HDR_STRIDE))
    return mem, bytearray(b"".join(entries)), hdrs, len(entries)


@pytest.mark.parametrize("seed", range(4))
def test_rx_from_guest_memory_with_checked_headers_agrees(seed: int) -> None:
    """rx_area_batch, area_bytes and area_copy on a batch left in guest memory (no page table:
    ``gfns`` None) with its checked headers: the same as the reference, and every frame
    delivered, copied out or copied into an area is its bytes in memory under its header."""
    rng = random.Random(600 + seed)
    for _ in range(ROUNDS):
        src, frames, hdrs, nfr = random_guest_batch(rng)
        which, n, ib = random_index(rng, nfr)
        want = area_frames(src, None, frames, which, n, hdrs)
        for j, frame in enumerate(want):
            pos, length, _ = NP_FRAME.unpack_from(frames, (which[j] if which else j) * NP_FRAME.size)
            k = which[j] if which else j
            cut = min(length, ETH_HEADER_LEN)
            assert frame == bytes(hdrs[k * HDR_STRIDE : k * HDR_STRIDE + cut]) + bytes(
                src[pos + cut : pos + length]
            )
        assert area_bytes(src, None, bytes(frames), ib, n, bytes(hdrs)) == want
        fill = rng.randbytes(MEM)
        mem_c, mem_py = bytearray(fill), bytearray(fill)
        base, size, count = pool(rng)
        descs = b"".join(random_desc(rng, count, size) for _ in range(rng.randrange(0, 40)))
        got_c = rx_area_batch(
            descs, src, None, bytes(frames), ib, n, memoryview(mem_c), base, size, count, hdrs
        )
        got_py = rx_area_batch_py(
            descs, src, None, frames, which, n, memoryview(mem_py), base, size, count, hdrs
        )
        assert got_c == got_py
        assert mem_c == mem_py
        dst_len = rng.choice([PAGE, 8 * PAGE, 40 * PAGE])
        cap = rng.choice([1, 8, 64])
        head = rng.randrange(0, dst_len + 1)
        fill_dst, fill_fr = rng.randbytes(dst_len), rng.randbytes(cap * NP_FRAME.size)
        dst_c, dst_py = bytearray(fill_dst), bytearray(fill_dst)
        dfr_c, dfr_py = bytearray(fill_fr), bytearray(fill_fr)
        copied = area_copy(src, None, bytes(frames), ib, n, bytes(hdrs), dst_c, dfr_c, head)
        assert copied == area_copy_py(src, None, frames, which, n, hdrs, dst_py, dfr_py, head)
        assert (dst_c, dfr_c) == (dst_py, dfr_py)
        assert area_frames(dst_c, list(range(dst_len // PAGE)), dfr_c, None, copied[0]) == want[: copied[0]]


def test_a_guest_batch_frame_outside_guest_memory_is_refused() -> None:
    """A frame entry reaching past guest memory (it cannot come from tx_guest_batch, which checks
    every window) is an error in every reader, never a read past the memory."""
    src = bytes(2 * PAGE)
    frames = NP_FRAME.pack(2 * PAGE - 10, 64, 0)
    hdrs = bytes(HDR_STRIDE)
    mem = memoryview(bytearray(MEM))
    with pytest.raises(ValueError):
        area_bytes(src, None, frames, None, 1, hdrs)
    with pytest.raises(ValueError):
        rx_area_batch(DESC.pack(0, 0, 2048, 1, 0, 0), src, None, frames, None, 1, mem, 0, 2048, 4, hdrs)
    with pytest.raises(ValueError):
        area_copy(src, None, frames, None, 1, hdrs, bytearray(PAGE), bytearray(16), 0)
    with pytest.raises(ValueError):
        area_frames(src, None, frames, None, 1, hdrs)
    for read in (area_bytes, area_frames):  # a header missing for frame 1
        with pytest.raises(ValueError):
            read(src, None, NP_FRAME.pack(0, 64, 0) * 2, None, 2, hdrs)
    with pytest.raises(ValueError):  # nf past the tables
        tx_guest_batch(
            b"", memoryview(bytearray(MEM)), 0, 2048, 4, 0, bytearray(16), bytearray(16), bytearray(16), 2
        )
