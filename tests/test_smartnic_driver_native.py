"""The PyGuest smart NIC driver's loops: the C versions (``frontends/native/snic_driver.c``)
against the Python reference in ``pvio.frontends.smartnic_driver`` (stage_tx_py, reap_tx_py,
reap_rx_py).

Random driver states (which buffers are free, outstanding, posted) and random, often hostile,
completions from the device (ids outside the ring's buffers, not outstanding, repeated in one
batch; bad statuses; lengths past the buffer): both versions must return the same values and
leave the same state and guest memory.  ``PVIO_FUZZ=1`` runs ten times as many rounds.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable
from typing import Any

import pytest

from pvio.abi.smartnic import CMPL
from pvio.frontends import _snic_driver
from pvio.frontends.smartnic_driver import check_frames_py, reap_rx_py, reap_tx_py, stage_tx_py

ROUNDS = 3000 if os.environ.get("PVIO_FUZZ") == "1" else 300
NR_TX = NR_RX = 16
BUF = 256
MEM = 64 * 1024
POOL = 4096


def random_cmpls(rng: random.Random, lo: int, hi: int) -> bytes:
    out = []
    for _ in range(rng.randrange(0, 24)):
        cid = rng.choice(
            [rng.randrange(lo, hi), rng.randrange(lo, hi), rng.randrange(0, 0x10000), hi, lo - 1]
        )
        length = rng.choice([64, rng.randrange(0, BUF + 1), BUF + 1, 0xFFFF])
        status = rng.choice([0, 0, 0, -1, -3, 7])
        out.append(CMPL.pack(cid % 0x10000, length, status, 0))
    return b"".join(out)


@pytest.mark.parametrize("seed", range(3))
def test_stage_tx_agrees(seed: int) -> None:
    rng = random.Random(seed)
    for _ in range(ROUNDS):
        fill = rng.randbytes(MEM)
        mem_c, mem_py = bytearray(fill), bytearray(fill)
        free = rng.sample(range(NR_TX), rng.randrange(0, NR_TX + 1))
        out = bytearray(1 if i not in free else 0 for i in range(NR_TX))
        frames: list[bytes | bytearray | memoryview] = [
            rng.choice([bytes, bytearray, memoryview])(rng.randbytes(rng.randrange(14, BUF + 1)))
            for _ in range(rng.randrange(0, 24))
        ]
        start = rng.randrange(0, len(frames) + 1)
        free_c, free_py, out_c, out_py = list(free), list(free), bytearray(out), bytearray(out)
        got_c = _snic_driver.stage_tx(frames, start, memoryview(mem_c), POOL, BUF, free_c, out_c)
        got_py = stage_tx_py(frames, start, memoryview(mem_py), POOL, BUF, free_py, out_py)
        assert got_c == got_py
        assert (free_c, out_c, mem_c) == (free_py, out_py, mem_py)


def test_stage_tx_refuses_a_frame_too_big_and_changes_nothing() -> None:
    mem = memoryview(bytearray(MEM))
    for stage in (_snic_driver.stage_tx, stage_tx_py):
        free, out = [3, 2, 1], bytearray(NR_TX)
        with pytest.raises(ValueError, match=r"frame 1 \(257 bytes\) does not fit TX buffer 2"):
            stage([bytes(64), bytes(BUF + 1)], 0, mem, POOL, BUF, free, out)
        assert free == [3, 2, 1] and out == bytearray(NR_TX)


@pytest.mark.parametrize("seed", range(3))
def test_reap_tx_agrees(seed: int) -> None:
    rng = random.Random(10 + seed)
    for _ in range(ROUNDS):
        out = bytearray(rng.getrandbits(1) for _ in range(NR_TX))
        free = [i for i in range(NR_TX) if not out[i]]
        cmpls = random_cmpls(rng, 0, NR_TX)
        out_c, out_py, free_c, free_py = bytearray(out), bytearray(out), list(free), list(free)
        assert _snic_driver.reap_tx(cmpls, out_c, free_c) == reap_tx_py(cmpls, out_py, free_py)
        assert (out_c, free_c) == (out_py, free_py)


@pytest.mark.parametrize("seed", range(3))
def test_reap_rx_agrees(seed: int) -> None:
    rng = random.Random(20 + seed)
    for _ in range(ROUNDS):
        mem = rng.randbytes(MEM)
        posted = bytearray(0 if i < NR_TX else rng.choice([1, 1, 0]) for i in range(NR_TX + NR_RX))
        cmpls = random_cmpls(rng, NR_TX, NR_TX + NR_RX)
        room = rng.choice([0, 3, 4096])
        base = rng.choice([POOL, MEM - 8 * BUF])  # the last: some buffers would lie past the memory
        p_c, p_py = bytearray(posted), bytearray(posted)
        got_c = _snic_driver.reap_rx(cmpls, memoryview(mem), base, BUF, NR_TX, p_c, room)
        got_py = reap_rx_py(cmpls, memoryview(mem), base, BUF, NR_TX, p_py, room)
        assert got_c == got_py
        assert p_c == p_py


def test_an_rx_id_repeated_in_one_batch_is_refused_the_second_time() -> None:
    mem = memoryview(bytearray(MEM))
    posted = bytearray(NR_TX + NR_RX)
    posted[NR_TX] = 1
    cmpls = CMPL.pack(NR_TX, 64, 0, 0) * 2
    frames, repost, bad, errors, full, nbytes = _snic_driver.reap_rx(cmpls, mem, POOL, BUF, NR_TX, posted, 10)
    assert (len(frames), len(repost), bad, errors, full, nbytes) == (1, 16, 1, [], 0, 64)
    assert posted[NR_TX] == 1  # re-posted once, after the batch


@pytest.mark.parametrize("seed", range(3))
def test_check_frames_agrees(seed: int) -> None:
    """send_batch's one pass: the first frame that is not bytes/bytearray of 14..BUF bytes."""
    rng = random.Random(30 + seed)
    kinds: list[Callable[[bytes], Any]] = [bytes, bytes, bytearray, memoryview, list]
    for _ in range(ROUNDS):
        sizes = [rng.choice([0, 13, 14, 64, BUF, BUF + 1]) for _ in range(rng.randrange(0, 12))]
        frames = [rng.choice(kinds)(bytes(n)) for n in sizes]
        assert _snic_driver.check_frames(frames, 14, BUF) == check_frames_py(frames, 14, BUF)


def test_stage_tx_counts_the_bytes_it_copies() -> None:
    mem = memoryview(bytearray(MEM))
    for stage in (_snic_driver.stage_tx, stage_tx_py):
        free, out = [1, 0], bytearray(NR_TX)
        frames = [bytes(64), bytearray(100), memoryview(bytes(20))]
        descs, upto, nbytes = stage(frames, 0, mem, POOL, BUF, free, out)
        assert (len(descs), upto, nbytes, free) == (32, 2, 164, [])
