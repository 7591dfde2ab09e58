"""The smart NIC's DMA loops: the C versions (``backends/native/snic_dma.c``) against the Python
reference (``tx_batch_py`` / ``rx_batch_py`` in ``pvio.backends.smartnic_dma``).

Random batches of descriptors -- mostly valid, many hostile (pool indices past the pool,
offsets and lengths past the buffer, zero and runt lengths, unknown flags, granted pages
that stop the batch, a pool geometry reaching past the memory) -- over random guest memory,
with random frames for RX: both versions must return the same values and leave the same
bytes in memory.  ``PVIO_FUZZ=1`` runs ten times as many batches.
"""

from __future__ import annotations

import os
import random

import pytest

from pvio.abi.smartnic import CMPL, DESC, SNIC_F_GREF
from pvio.backends.smartnic_dma import rx_batch, rx_batch_py, tx_batch, tx_batch_py

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
def test_tx_batches_agree(seed: int) -> None:
    rng = random.Random(seed)
    for _ in range(ROUNDS):
        mem = bytearray(rng.randbytes(MEM))
        base, size, count = pool(rng)
        descs = b"".join(random_desc(rng, count, size) for _ in range(rng.randrange(0, 40)))
        start = rng.randrange(0, len(descs) // DESC.size + 1)
        got_c = tx_batch(descs, memoryview(mem), base, size, count, start)
        got_py = tx_batch_py(descs, memoryview(mem), base, size, count, start)
        assert got_c == got_py


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


def test_a_granted_page_stops_the_batch_before_it() -> None:
    mem = bytearray(MEM)
    mem[0:64] = bytes(range(64))
    descs = (
        DESC.pack(0, 0, 64, 7, 0, 0) + DESC.pack(5, 0, 64, 8, SNIC_F_GREF, 0) + DESC.pack(0, 0, 64, 9, 0, 0)
    )
    frames, cmpls, end, nbytes, *refused = tx_batch(descs, memoryview(mem), 0, 2048, 4, 0)
    assert cmpls == CMPL.pack(7, 64, 0, 0)
    assert (frames, end, nbytes, refused) == ([bytes(range(64))], 1, 64, [0, 0, 0])
    assert tx_batch(descs, memoryview(mem), 0, 2048, 4, 2)[2] == 3  # resumed after it: to the end


def test_bad_arguments_raise_instead_of_reading_past_the_batch() -> None:
    mem = memoryview(bytearray(MEM))
    with pytest.raises(ValueError):
        tx_batch(b"\0" * 15, mem, 0, 2048, 4, 0)
    with pytest.raises(ValueError):
        tx_batch(b"\0" * 16, mem, 0, 2048, 4, 2)  # start past the end
    with pytest.raises(ValueError):
        rx_batch(b"\0" * 17, [], mem, 0, 2048, 4)
    with pytest.raises(TypeError):
        rx_batch(DESC.pack(0, 0, 64, 1, 0, 0), ["not bytes"], mem, 0, 2048, 4)  # type: ignore[list-item]
    with pytest.raises(TypeError):
        rx_batch(b"", [], memoryview(bytes(MEM)), 0, 2048, 4)  # RX needs writable memory
