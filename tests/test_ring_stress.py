"""Concurrent stress: a frontend and a backend hammering one ring from two threads, and from
two processes sharing one MAP_SHARED anonymous mmap page.

Every entry is 16 bytes: a u64 sequence number and a u64 check word.  A request carries
(seq, ~seq); the backend echoes each request it takes as the response (~seq, seq), built
from the bytes it took, so a response is never mistaken for the request left in its slot.
Each side compares every batch it takes, byte for byte, with the exact stream it must see
next, so a torn entry (halves of two entries), a reordered, duplicated or lost entry, or a
response published before it was written all fail the run, with the offending entry
decoded in the message.  Batch sizes vary (1 to a full ring) on both sides, and the rings
are attached just below 2**32 so the indices wrap early in every run.

Bounded for ``make test`` (about 1.5 M entries each way per test); ``PVIO_FUZZ=1`` moves
20 M.  Time is never asserted: a wall-clock deadline only turns a hang into a clear
failure, and child processes are always reaped.
"""

from __future__ import annotations

import mmap
import multiprocessing
import os
import random
import struct
import sys
import threading
import time
import traceback
from array import array
from collections.abc import Callable
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from typing import Any

import pytest

from pvio.ringbuf import BackRing, FrontRing, RingLayout

FUZZ = os.environ.get("PVIO_FUZZ") == "1"
ENTRIES = 20_000_000 if FUZZ else 1_500_000
DEADLINE_S = 900.0 if FUZZ else 120.0  # hang guard only: a healthy run takes a few seconds

SEQ = RingLayout.generic("seq", 16, 16)
PAGE = 4096
ALL_ONES = (1 << 64) - 1
START = (1 << 32) - 1000  # indices wrap after the first thousand entries
CHUNK = 1 << 14  # entries generated per block of the expected stream

pytestmark = pytest.mark.slow


class Stream:
    """The exact bytes of entries [start, start+n) of the request or response stream.

    Requests are (seq, ~seq), responses (~seq, seq), as little-endian u64 pairs.  Built in
    blocks with ``array`` so that checking costs a memcmp per batch, not Python per entry.
    """

    def __init__(self, response: bool) -> None:
        self.response = response
        self.base = 0
        self.block = b""

    def _make(self, start: int, n: int) -> bytes:
        words = array("Q", bytes(16 * n))
        seqs = array("Q", range(start, start + n))
        checks = array("Q", range(ALL_ONES - start, ALL_ONES - start - n, -1))
        words[0::2], words[1::2] = (checks, seqs) if self.response else (seqs, checks)
        if sys.byteorder != "little":
            words.byteswap()
        return words.tobytes()

    def get(self, start: int, n: int) -> bytes:
        end = self.base + len(self.block) // 16
        if start < self.base or start + n > end:
            self.base = start
            self.block = self._make(start, max(n, CHUNK))
        at = (start - self.base) * 16
        return self.block[at : at + 16 * n]


def describe(got: bytes, want: bytes, first_seq: int, what: str) -> str:
    """Say which entry of a batch is wrong and how (torn, reordered, duplicated, lost)."""
    for i in range(0, len(want), 16):
        if got[i : i + 16] != want[i : i + 16]:
            a, b = struct.unpack_from("<QQ", got, i)
            seq, check = (b, a) if what == "response" else (a, b)
            kind = "torn (check word does not match)" if check != ALL_ONES - seq else "out of sequence"
            return f"{what} {first_seq + i // 16}: got seq {seq} check {check:#x}: {kind}"
    return f"{what} batch length {len(got)} != {len(want)}"


def echo(requests: bytes) -> bytes:
    """The response to each request: its two words swapped, built from the bytes taken."""
    words = array("Q", requests)
    out = array("Q", bytes(len(requests)))
    out[0::2], out[1::2] = words[1::2], words[0::2]
    return out.tobytes()


def batch_sizes(seed: int, most: int) -> list[int]:
    """1024 batch sizes from 1 to a full ring, biased to small batches and to the extremes."""
    rng = random.Random(seed)
    picks = [1, 1, 2, 3, 5, 8, 13, 16, 31, 64, 100, most - 1, most]
    return [rng.choice(picks) if rng.random() < 0.8 else rng.randint(1, most) for _ in range(1024)]


class Stuck(AssertionError):
    """A side made no progress before the deadline."""


class PeerFailed(Exception):
    """The other side failed, so this one stops waiting for it."""


def run_frontend(front: FrontRing, total: int, deadline: float, idle: Callable[[], None]) -> int:
    """Send requests 0..total-1 in varying batches; check every response. Returns batches sent."""
    requests, responses = Stream(response=False), Stream(response=True)
    sizes = batch_sizes(1, front.nr_ents)
    sent = answered = batches = 0
    while answered < total:
        progress = False
        if sent < total:
            n = min(sizes[batches & 1023], total - sent)
            k, _ = front.send(requests.get(sent, n))
            if k:
                sent += k
                batches += 1
                progress = True
        got = front.take_responses(sizes[(batches + 7) & 1023])
        if got:
            n = len(got) // 16
            want = responses.get(answered, n)
            if got != want:
                raise AssertionError(describe(got, want, answered, "response"))
            answered += n
            progress = True
        if not progress:
            if time.monotonic() > deadline:
                raise Stuck(f"frontend stuck: {sent} requests sent, {answered} responses of {total}")
            idle()
    if front.take_responses() != b"" or front.unconsumed_responses() != 0:
        raise AssertionError("responses beyond the last request")
    return batches


def run_backend(
    back: BackRing, total: int, deadline: float, idle: Callable[[], None], corrupt: int | None = None
) -> int:
    """Take requests in varying batches, check each, echo it back in one or two pieces.

    ``corrupt`` (for testing the test) flips a bit in the response to that request.
    """
    requests = Stream(response=False)
    sizes = batch_sizes(2, back.nr_ents)
    taken = batches = 0
    while taken < total:
        got = back.take_requests(sizes[batches & 1023])
        if not got:
            if time.monotonic() > deadline:
                raise Stuck(f"backend stuck: {taken} requests of {total} taken")
            idle()
            continue
        n = len(got) // 16
        want = requests.get(taken, n)
        if got != want:
            raise AssertionError(describe(got, want, taken, "request"))
        reply = echo(got)
        if corrupt is not None and taken <= corrupt < taken + n:
            at = 16 * (corrupt - taken) + 3
            reply = reply[:at] + bytes([reply[at] ^ 0x10]) + reply[at + 1 :]
        cut = 16 * (sizes[(batches + 3) & 1023] % (n + 1))  # answer part now, the rest after
        for piece in (reply[:cut], reply[cut:]):
            if piece:
                back.send(piece)
        taken += n
        batches += 1
    return batches


def live_page(buffer: Any) -> None:
    """Make ``buffer`` a live ring at index START, ready to be attached by both ends."""
    struct.pack_into("<IIII", buffer, 0, START, START + 1, START, START + 1)


def test_two_threads_move_every_entry_once_in_order() -> None:
    page = bytearray(PAGE)
    live_page(page)
    front = FrontRing(SEQ, page, attach_at=START)
    back = BackRing(SEQ, page, attach_at=START)
    deadline = time.monotonic() + DEADLINE_S
    errors: list[BaseException] = []
    failed = threading.Event()  # set by a side that fails, so its peer stops waiting

    def idle() -> None:
        if failed.is_set():
            raise PeerFailed
        time.sleep(0)  # let the other thread have the GIL

    def backend() -> None:
        try:
            run_backend(back, ENTRIES, deadline, idle)
        except BaseException as e:
            failed.set()
            errors.append(e)

    thread = threading.Thread(target=backend, name="ring-backend", daemon=True)
    thread.start()
    try:
        run_frontend(front, ENTRIES, deadline, idle)
    except BaseException as e:
        failed.set()
        errors.append(e)
    finally:
        thread.join(timeout=max(1.0, deadline - time.monotonic()))
    assert not thread.is_alive(), "backend thread did not finish"
    causes = [e for e in errors if not isinstance(e, PeerFailed)]
    if causes:
        raise causes[0]
    assert (front.req_prod_pvt, front.rsp_cons) == ((START + ENTRIES) % (1 << 32),) * 2
    assert (back.req_cons, back.rsp_prod_pvt) == ((START + ENTRIES) % (1 << 32),) * 2


# ---- two processes ---------------------------------------------------------------------------


def _child(conn: Connection, body: Callable[[], int]) -> None:
    """Run one side in a forked child and report ("ok", batches) or ("error", traceback)."""
    try:
        conn.send(("ok", body()))
    except BaseException:
        conn.send(("error", traceback.format_exc()))
    finally:
        conn.close()


def _reap(procs: list[BaseProcess]) -> None:
    for p in procs:
        if p.is_alive():
            p.terminate()
        p.join(timeout=5)
        if p.is_alive():
            p.kill()
            p.join(timeout=5)


def run_in_two_processes(total: int, corrupt: int | None = None) -> dict[str, tuple[str, Any]]:
    """Frontend and backend in two forked processes over one shared anonymous mmap page.

    Returns each side's report; as soon as one side fails the other is terminated.
    """
    ctx = multiprocessing.get_context("fork")
    shared = mmap.mmap(-1, PAGE, flags=mmap.MAP_SHARED | mmap.MAP_ANONYMOUS)
    live_page(shared)
    deadline = time.monotonic() + DEADLINE_S
    results: dict[str, tuple[str, Any]] = {}
    procs: list[BaseProcess] = []
    waiting: dict[Connection, str] = {}
    front = FrontRing(SEQ, shared, attach_at=START)
    back = BackRing(SEQ, shared, attach_at=START)
    try:
        sides: dict[str, Callable[[], int]] = {
            "frontend": lambda: run_frontend(front, total, deadline, os.sched_yield),
            "backend": lambda: run_backend(back, total, deadline, os.sched_yield, corrupt),
        }
        for name, body in sides.items():
            receive, report = ctx.Pipe(duplex=False)
            proc = ctx.Process(target=_child, args=(report, body), name=f"ring-{name}", daemon=True)
            proc.start()
            report.close()
            procs.append(proc)
            waiting[receive] = name
        while waiting:
            ready = wait(list(waiting), timeout=max(0.0, deadline + 10 - time.monotonic()))
            if not ready:
                results.update(dict.fromkeys(waiting.values(), ("error", "no report before the deadline")))
                break
            for conn in ready:
                assert isinstance(conn, Connection)
                name = waiting.pop(conn)
                try:
                    results[name] = conn.recv()
                except EOFError:
                    results[name] = ("error", "died without a report")
            if any(status != "ok" for status, _ in results.values()):
                break  # one side failed: stop waiting for the other, which is reaped below
    finally:
        _reap(procs)
        front.release()
        back.release()
        shared.close()
    return results


def test_two_processes_move_every_entry_once_in_order() -> None:
    results = run_in_two_processes(ENTRIES)
    failures = {name: detail for name, (status, detail) in results.items() if status != "ok"}
    assert failures == {}, "\n".join(f"{name}: {detail}" for name, detail in failures.items())
    assert set(results) == {"frontend", "backend"}
    assert all(batches > 0 for _, batches in results.values())


def test_a_corrupted_response_fails_the_frontend_and_the_backend_is_reaped() -> None:
    """A failing side is reported with its reason and its peer, left waiting, is terminated."""
    results = run_in_two_processes(ENTRIES, corrupt=123_457)
    status, detail = results["frontend"]
    assert status == "error"
    assert "response 123457: got seq 123457 check" in detail and "torn" in detail
    assert "backend" not in results  # it was still waiting for requests: terminated, not reported


def test_stress_check_catches_a_lost_entry() -> None:
    """The checker is not blind: a backend that drops one request is caught by the frontend."""
    page = bytearray(PAGE)
    live_page(page)
    front = FrontRing(SEQ, page, attach_at=START)
    back = BackRing(SEQ, page, attach_at=START)
    requests = Stream(response=False)
    front.send(requests.get(0, 4))
    got = back.take_requests()
    assert got == requests.get(0, 4)
    back.send(echo(got[:16] + got[32:]) + echo(got[32:48]))  # request 1 lost, request 2 twice
    with pytest.raises(AssertionError, match=r"response 1: got seq 2 check .*: out of sequence"):
        run_frontend(front, 4, time.monotonic() + 5, lambda: None)


def test_stress_check_catches_a_torn_entry() -> None:
    torn = Stream(response=False).get(0, 1)[:8] + Stream(response=False).get(5, 1)[8:]
    message = describe(torn, Stream(response=False).get(0, 1), 0, "request")
    assert message.startswith("request 0: got seq 0 check ")
    assert message.endswith("torn (check word does not match)")
