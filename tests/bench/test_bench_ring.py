"""Ring throughput through the Python API (FrontRing/BackRing over cffi), on the netif TX ring.

Units.  An *entry* is one request or one response moved from its producer to its consumer:
written and published by one ``send`` and copied out by one ``take``.  A round trip (a
request and the response that reuses its slot) therefore moves two entries, and
``entries_per_s`` counts both directions.  ``api_calls_per_s`` counts the Python calls
(send, take) made per second; ``ops_per_s`` of the single-entry benchmark counts one send
plus one take of one entry as an op (so it equals its ``entries_per_s``).

* one thread, single entry: one request and one response per round trip, four calls;
* one thread, batched (1, 16, 64, 256 per call): the same loop moving B entries per call;
* two processes: the frontend in this process, the backend in a forked child, over one
  shared anonymous mmap page, both moving up to B entries per call (``api_calls_per_s``
  there counts the frontend's calls that moved a full batch, not its empty polls).

The C ring's own rate for the same loop (``pvio_ring_round_trips``: the same four calls per
batch, made from C) is measured in the same test, in rounds interleaved with rounds of the
Python loop, and the batched benchmarks report ``c_entries_per_s`` and ``ratio_to_c`` (the
median over rounds of Python API rate / C rate) next to their own rate, so each ratio compares
two figures of one moment of a noisy machine. Targets: batched >= 20 M entries/s in one thread,
>= 5 M entries/s across two processes, single entry >= 1 M ops/s, and at batch 64 a ratio to C
of at least 0.5. These are reported in ``extra_info`` (see ``--benchmark-json``; ``-s`` also
prints the ratios), never asserted: the machines are noisy. Each benchmark checks the entries
it moved, so the unmeasured run in ``make test`` is a smoke test.
"""

from __future__ import annotations

import mmap
import multiprocessing
import os
import statistics
import struct
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from pvio.ringbuf import NETIF_TX, BackRing, FrontRing
from pvio.ringbuf._ringbuf import ffi, lib

LAYOUT = NETIF_TX  # 12-byte requests, 4-byte responses, 256 slots
RING_BYTES = 4032  # the ring's share of the page; the last 64 bytes carry the stop flag
STOP_AT = 4092
REQ = LAYOUT.pack_request(gref=8, offset=0, flags=0, id=1, size=1514)
RSP = LAYOUT.pack_response(id=1, status=0)
BATCHES = [1, 16, 64, 256]
ENTRIES_PER_ROUND = 1_000_000  # batched benchmarks: requests + responses moved per round
DEADLINE_S = 120.0  # hang guard for one round


def record(benchmark: Any, entries: int, calls: int) -> None:
    """Store entries/s and calls/s of the median and of the best round in extra_info."""
    benchmark.extra_info["entries_per_round"] = entries
    stats = getattr(benchmark.stats, "stats", None)
    if stats is None:  # --benchmark-disable: run once, nothing measured
        return
    for name, seconds in (("", stats.median), ("_best", stats.min)):
        benchmark.extra_info[f"entries_per_s{name}"] = round(entries / seconds)
        benchmark.extra_info[f"api_calls_per_s{name}"] = round(calls / seconds)


def measure(benchmark: Any, run: Callable[[], None]) -> int:
    """Run ``run`` for 5 rounds after 1 warm-up (once when disabled); return how many runs ran."""
    if not benchmark.enabled:
        benchmark.pedantic(run)
        return 1
    benchmark.pedantic(run, rounds=5, warmup_rounds=1)
    return 6


def scale(benchmark: Any, n: int) -> int:
    """Full size when measuring; a small smoke run when benchmarks are disabled."""
    return n if benchmark.enabled else max(256, n // 50)


def ratio_to_c(front: FrontRing, back: BackRing, batch: int, loops: int, rounds: int = 7) -> dict[str, float]:
    """The Python API's rate over the C ring's for the same loop, from interleaved rounds.

    Each round times the Python loop, then ``pvio_ring_round_trips`` (the same four calls per
    batch, made from C) on the same rings, so a load spike on a shared machine hits both
    sides of a pair; the ratio is the median of the per-round ratios.
    """
    reqs, rsps = REQ * batch, RSP * batch
    scratch = ffi.new("char[]", LAYOUT.nr_ents() * LAYOUT.req_size)
    fsend, ftake, bsend, btake = front.send, front.take_responses, back.send, back.take_requests
    py_rates, c_rates, ratios = [], [], []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(loops):
            fsend(reqs)
            btake(batch)
            bsend(rsps)
            ftake(batch)
        py = 2 * batch * loops / (time.perf_counter() - start)
        start = time.perf_counter()
        moved = lib.pvio_ring_round_trips(front._r, back._r, reqs, rsps, batch, loops, scratch)
        c = moved / (time.perf_counter() - start)
        assert moved == 2 * batch * loops, moved
        py_rates.append(py)
        c_rates.append(c)
        ratios.append(py / c)
    return {
        "py_entries_per_s": statistics.median(py_rates),
        "c_entries_per_s": statistics.median(c_rates),
        "ratio_to_c": statistics.median(ratios),
    }


# ---- one thread --------------------------------------------------------------------------


@pytest.mark.benchmark(group="ring one thread")
def test_single_entry_round_trips(benchmark: Any) -> None:
    page = bytearray(4096)
    front, back = FrontRing(LAYOUT, page), BackRing(LAYOUT, page)
    trips = scale(benchmark, 100_000)

    def run() -> None:
        fsend, ftake, bsend, btake = front.send, front.take_responses, back.send, back.take_requests
        for _ in range(trips):
            fsend(REQ)
            btake(1)
            bsend(RSP)
            ftake(1)

    runs = measure(benchmark, run)
    assert front.rsp_cons == back.req_cons == runs * trips
    assert front.take_responses() == b"" and back.take_requests() == b""
    record(benchmark, 2 * trips, 4 * trips)
    if "entries_per_s" in benchmark.extra_info:  # an op = one send + one take of one entry
        benchmark.extra_info["ops_per_s"] = benchmark.extra_info["entries_per_s"]


@pytest.mark.benchmark(group="ring one thread")
@pytest.mark.parametrize("batch", BATCHES)
def test_batched_round_trips(benchmark: Any, batch: int) -> None:
    page = bytearray(4096)
    front, back = FrontRing(LAYOUT, page), BackRing(LAYOUT, page)
    reqs, rsps = REQ * batch, RSP * batch
    loops = scale(benchmark, ENTRIES_PER_ROUND) // (2 * batch)

    def run() -> None:
        fsend, ftake, bsend, btake = front.send, front.take_responses, back.send, back.take_requests
        for _ in range(loops):
            fsend(reqs)
            btake(batch)
            bsend(rsps)
            ftake(batch)

    runs = measure(benchmark, run)
    assert front.rsp_cons == back.req_cons == runs * loops * batch
    assert front.take_responses() == b"" and back.take_requests() == b""
    record(benchmark, 2 * batch * loops, 4 * loops)
    if "entries_per_s" in benchmark.extra_info:  # the C ring's rate for the same loop, now
        paired = ratio_to_c(front, back, batch, loops)
        info = benchmark.extra_info
        info["c_entries_per_s"] = round(paired["c_entries_per_s"])
        info["paired_py_entries_per_s"] = round(paired["py_entries_per_s"])
        info["ratio_to_c"] = round(paired["ratio_to_c"], 3)
        print(
            f"\nring batch {batch}: Python API {paired['py_entries_per_s'] / 1e6:.1f} M entries/s, "
            f"C {paired['c_entries_per_s'] / 1e6:.1f} M/s: ratio {paired['ratio_to_c']:.2f}"
        )


# ---- two processes -----------------------------------------------------------------------


def _backend_process(shared: mmap.mmap, batch: int, parent: int) -> None:
    """Echo every request taken (up to ``batch`` per call) until the stop flag is set."""
    back = BackRing(LAYOUT, shared, size=RING_BYTES)
    take, send, rsps = back.take_requests, back.send, RSP * batch
    idle = 0
    while True:
        got = take(batch)
        if got:
            send(rsps[: len(got) // 3])  # a 12-byte request gets a 4-byte response
            continue
        idle += 1
        if idle & 0x3FF == 0 and (struct.unpack_from("<I", shared, STOP_AT)[0] or os.getppid() != parent):
            os._exit(0)


@pytest.fixture(params=BATCHES, ids=[f"batch{b}" for b in BATCHES])
def two_process_ring(request: pytest.FixtureRequest) -> Iterator[tuple[FrontRing, int, Callable[[], bool]]]:
    """A frontend here and an echoing backend in a forked child, over one shared page."""
    batch = request.param
    shared = mmap.mmap(-1, 4096, flags=mmap.MAP_SHARED | mmap.MAP_ANONYMOUS)
    front = FrontRing(LAYOUT, shared, size=RING_BYTES)
    ctx = multiprocessing.get_context("fork")
    child = ctx.Process(target=_backend_process, args=(shared, batch, os.getpid()), daemon=True)
    child.start()
    try:
        yield front, batch, child.is_alive
    finally:
        struct.pack_into("<I", shared, STOP_AT, 1)
        child.join(timeout=10)
        if child.is_alive():
            child.kill()
            child.join(timeout=5)
        front.release()
        shared.close()


@pytest.mark.benchmark(group="ring two processes")
def test_two_process_round_trips(benchmark: Any, two_process_ring: tuple[FrontRing, int, Any]) -> None:
    front, batch, backend_alive = two_process_ring
    trips = scale(benchmark, ENTRIES_PER_ROUND // 2) // batch * batch
    reqs = REQ * batch
    rsp_size = LAYOUT.rsp_size

    def run() -> None:
        send, take = front.send, front.take_responses
        sent = answered = spins = 0
        deadline = time.monotonic() + DEADLINE_S
        while answered < trips:
            if sent < trips:
                sent += send(reqs if trips - sent >= batch else REQ * (trips - sent))[0]
            got = take(batch)
            if got:
                answered += len(got) // rsp_size
                continue
            spins += 1
            if spins & 0xFFF == 0 and (time.monotonic() > deadline or not backend_alive()):
                raise AssertionError(f"backend stopped answering: {answered} of {trips} responses")
        assert answered == trips

    runs = measure(benchmark, run)
    assert front.rsp_cons == front.req_prod_pvt == runs * trips
    record(benchmark, 2 * trips, 2 * trips // batch)
