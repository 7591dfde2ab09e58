"""Netfront's C data path equals its Python reference, end to end; and pvio.core._frames' fences.

Netfront stages, reaps and receives through C (``pvio_nf_*`` in native/netpath.c and the batch
copies of native/frames.c) unless its ``datapath`` is ``"python"``, when the readable reference
does the same work frame by frame.  Hypothesis draws a stream -- frame sizes from one byte to
several pages, bytes / bytearray / memoryview frames, the sender's batch size, an application
that reads as frames come or only at the end (so its bounded queue overflows) -- and runs it
twice under MockClock, once per path.  Everything observable must be identical: the frames the
receiver got, byte for byte and in order, and every counter of every domain and device (frames,
bytes, copies, drops, notifications sent and suppressed, interrupts, hypercalls).
"""

from __future__ import annotations

import array
import mmap
from typing import Any

import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import pvio.frontends.netfront as netfront_module
from pvio.core import _frames
from pvio.frontends.netstack import udp_packet

from .netenv import NicGuest, ip_of, net_env

QUEUE_MAX = 24  # the application's queue, made small so that the tests overflow it


def frames_for(a: NicGuest, b: NicGuest, sizes: list[int], kinds: list[int]) -> list[Any]:
    """UDP frames of ``sizes`` payload bytes from A to B, as bytes, bytearray or memoryview."""
    out: list[Any] = []
    for k, (size, kind) in enumerate(zip(sizes, kinds, strict=True)):
        payload = (k.to_bytes(4, "big") * (size // 4 + 1))[:size]
        f = udp_packet(a.nic.mac, b.nic.mac, a.ip, b.ip, 7000, 7001, payload, checksum=False)
        out.append(f if kind == 0 else bytearray(f) if kind == 1 else memoryview(f))
    return out


async def stream_once(path: str, sizes: list[int], kinds: list[int], batch: int, read_late: bool) -> Any:
    a, b = NicGuest("a", ip_of(0)), NicGuest("b", ip_of(1))
    async with net_env(a, b) as env:
        for g in (a, b):
            g.nic.datapath = path
        frames = frames_for(a, b, sizes, kinds)
        got: list[bytes] = []
        before = env.hv.counters.snapshot()
        for i in range(0, len(frames), batch):
            await a.nic.send_batch(frames[i : i + batch])
            if not read_late:
                await trio.testing.wait_all_tasks_blocked()
                if b.nic.pending():
                    got.extend(await b.nic.recv_batch())
        await trio.sleep(0.01)  # every frame through (MockClock: until the system is quiet)
        while b.nic.pending():
            got.extend(await b.nic.recv_batch())
        diff = env.hv.counters.snapshot().diff(before)
        return got, {owner: dict(c) for owner, c in diff.items()}


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.function_scoped_fixture,
    ],  # monkeypatch: one constant
)
@given(
    spec=st.lists(
        st.tuples(
            st.one_of(st.integers(1, 200), st.sampled_from([1472, 4000, 4054, 4055, 9000])), st.integers(0, 2)
        ),
        min_size=1,
        max_size=90,
    ),
    batch=st.sampled_from([1, 7, 64, 300]),
    read_late=st.booleans(),
)
@example(spec=[(64, 0)] * 60, batch=64, read_late=True)  # the queue overflows, frames in one slot each
@example(spec=[(64, 0), (9000, 1), (30, 2)] * 20, batch=7, read_late=True)  # ... and frames of several
def test_c_and_python_netfronts_deliver_and_count_identically(
    spec: list[tuple[int, int]], batch: int, read_late: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(netfront_module, "RX_QUEUE_MAX", QUEUE_MAX)
    sizes, kinds = [s for s, _ in spec], [k for _, k in spec]
    runs = [
        trio.run(
            stream_once,
            path,
            sizes,
            kinds,
            batch,
            read_late,
            clock=trio.testing.MockClock(autojump_threshold=0),
        )
        for path in ("c", "python")
    ]
    (got_c, counts_c), (got_py, counts_py) = runs
    assert got_c == got_py
    assert counts_c == counts_py
    if read_late and len(spec) > QUEUE_MAX:  # the overflow happened, and was counted, not copied
        nf = next(c for owner, c in counts_c.items() if owner.startswith("netfront/") and "packets.rx" in c)
        assert nf["drops.rx_app_queue_full"] == len(spec) - QUEUE_MAX == nf["packets.rx"] - len(got_c)


# ---------------------------------------------------------------------- pvio.core._frames
def spans(pairs: list[tuple[int, int]]) -> tuple[array.array[int], array.array[int]]:
    return array.array("Q", [s for s, _ in pairs]), array.array("Q", [e for _, e in pairs])


def test_scatter_and_gather_move_each_frame_to_and_from_its_span() -> None:
    mem = mmap.mmap(-1, 3 * 4096)
    frames: list[Any] = [b"first", bytearray(b"second!"), b"x" * 4096]
    starts, ends = spans([(100, 105), (4096, 4103), (8192, 12288)])
    assert _frames.lengths(frames, 0, 3, array.array("I", [0, 0, 0]), 4096) == (3, 5 + 7 + 4096)
    assert _frames.scatter(mem, frames, 0, 3, starts, ends) == 5 + 7 + 4096
    got, total = _frames.gather(mem, starts, ends, 3)
    assert (got, total) == ([b"first", b"second!", b"x" * 4096], 5 + 7 + 4096)
    assert all(type(f) is bytes for f in got)


def test_lengths_stops_at_the_first_frame_the_batch_path_cannot_take() -> None:
    out = array.array("I", [0] * 5)
    assert _frames.lengths([b"ab", b"cde", memoryview(b"v"), b"f", b"g"], 0, 5, out, 4096) == (2, 5)
    assert _frames.lengths([b"ab", b"", b"c"], 0, 3, out, 4096) == (1, 2)
    assert _frames.lengths([b"ab", b"x" * 4097], 0, 2, out, 4096) == (1, 2)
    assert _frames.lengths([b"ab", b"cd", b"ef"], 1, 2, out, 4096) == (2, 4)
    assert list(out[:2]) == [2, 2]


@pytest.mark.parametrize(
    ("pairs", "frames", "problem"),
    [
        ([(4096 * 3 - 2, 4096 * 3 + 3)], [b"hello"], "outside memory"),  # runs off the end
        ([(10, 5)], [b"hello"], "outside memory"),  # an end before its start
        ([(0, 4)], [b"hello"], "not bytes of its span"),  # a length that does not match
        ([(0, 5), (100, 105)], [b"hello", memoryview(b"world")], "not bytes of its span"),
    ],
)
def test_scatter_refuses_a_bad_batch_and_copies_nothing(pairs: Any, frames: Any, problem: str) -> None:
    mem = mmap.mmap(-1, 3 * 4096)
    starts, ends = spans(pairs)
    with pytest.raises(ValueError, match=problem):
        _frames.scatter(mem, frames, 0, len(frames), starts, ends)
    assert mem[:] == bytes(3 * 4096)


def test_the_batch_calls_refuse_counts_beyond_their_lists_and_buffers() -> None:
    mem = mmap.mmap(-1, 4096)
    starts, ends = spans([(0, 1)])
    with pytest.raises(ValueError, match="outside a list"):
        _frames.scatter(mem, [b"a"], 0, 2, starts, ends)
    with pytest.raises(ValueError, match="outside a list"):
        _frames.lengths([b"a"], 1, 1, array.array("I", [0]), 4096)
    with pytest.raises(ValueError, match="entries need"):
        _frames.gather(mem, starts, ends, 2)
    with pytest.raises(ValueError, match="outside memory"):
        _frames.gather(mem, *spans([(4000, 4097)]), 1)
    with pytest.raises(TypeError):
        _frames.gather(bytes(10), starts, ends, 1.5)  # type: ignore[arg-type]
    with pytest.raises(BufferError):
        _frames.scatter(bytes(10), [b"a"], 0, 1, starts, ends)  # read-only memory


def test_pop_ids_pops_in_list_pop_order_and_refuses_a_bad_stack_whole() -> None:
    stack = [5, 9, 300, 7]
    out = array.array("H", [0] * 4)
    _frames.pop_ids(stack, 3, out)
    assert (stack, list(out[:3])) == ([5], [7, 300, 9])
    for bad in ([1, 70000], [1, -1], [1, "2"]):
        before = list(bad)
        with pytest.raises((ValueError, TypeError)):
            _frames.pop_ids(bad, 2, out)
        assert bad == before  # nothing popped
    with pytest.raises(ValueError, match="cannot pop 2 ids off a stack of 1"):
        _frames.pop_ids([1], 2, out)
    with pytest.raises(ValueError, match="entries need"):
        _frames.pop_ids(list(range(10)), 5, array.array("H", [0] * 4))


async def test_a_busy_polling_receiver_is_not_notified_while_it_polls(autojump_clock: Any) -> None:
    """With a busy-poll budget, B's netfront polls on instead of arming its RX event index, so
    netback pushes a stream's batches without notifying it; once the stream stops and the
    budget runs out, B arms and sleeps, and the next frame notifies it as usual."""
    a, b = NicGuest("a", ip_of(0)), NicGuest("b", ip_of(1))
    async with net_env(a, b) as env:
        frames = [udp_packet(a.nic.mac, b.nic.mac, a.ip, b.ip, 7000, 7001, bytes(18)) for _ in range(64)]
        sent = env.count("netback/vif2.0", "notifications.sent")
        await a.nic.send_batch(frames[:1])  # B sleeps, armed: this one is notified
        assert len(await b.nic.recv_batch()) == 1
        assert env.count("netback/vif2.0", "notifications.sent") == sent + 1
        b.nic.busy_poll = 1_000
        await a.nic.send_batch(frames[:1])  # notified (B was asleep), then B polls
        got = len(await b.nic.recv_batch())
        for i in range(0, 64, 8):
            await a.nic.send_batch(frames[i : i + 8])
            got += len(await b.nic.recv_batch())
        assert got == 65
        assert env.count("netback/vif2.0", "notifications.sent") == sent + 2  # none while B polled
        assert env.count("netfront/vif2.0", "busy_poll.empty_polls") > 0
        await trio.sleep(0.01)  # the budget runs out: B arms and sleeps
        assert b.nic._idle
        await a.nic.send_batch(frames[:1])
        assert len(await b.nic.recv_batch()) == 1
        assert env.count("netback/vif2.0", "notifications.sent") == sent + 3


@pytest.mark.parametrize("path", ["c", "python"])
async def test_a_frame_of_several_slots_counts_the_join_as_a_copy(autojump_clock: Any, path: str) -> None:
    """A 9000-byte frame comes in three RX slots: each slot is copied out once, and joining the
    copies into the frame copies every byte again; guest_copies counts all four."""
    a, b = NicGuest("a", ip_of(0)), NicGuest("b", ip_of(1))
    async with net_env(a, b) as env:
        b.nic.datapath = path
        frame = udp_packet(
            a.nic.mac, b.nic.mac, a.ip, b.ip, 7000, 7001, bytes(range(256)) * 35, checksum=False
        )
        assert len(frame) == 8960 + 42
        before = (
            env.count("netfront/vif2.0", "guest_copies"),
            env.count("netfront/vif2.0", "guest_copy_bytes"),
        )
        await a.nic.send(frame)
        assert await b.nic.recv() == frame
        after = env.count("netfront/vif2.0", "guest_copies"), env.count("netfront/vif2.0", "guest_copy_bytes")
        assert (after[0] - before[0], after[1] - before[1]) == (4, 2 * len(frame))
