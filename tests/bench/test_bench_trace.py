"""What the event timeline costs: the 64-byte PV stream with tracing off and on.

The scenario is ``test_bench_net.py``'s stream (guest A sends 64-byte UDP frames to B in
``send_batch`` calls of 64; B counts them with ``recv_batch``), each round booted fresh in
its own ``trio.run`` with the real clock.  ``tracing=off`` runs it as is: the counters are
plain dicts, so its pps is the stream's pps.  ``tracing=on`` runs the traffic phase inside
``with hv.trace():`` — every counter bump recorded.  Turning the log into JSON happens after
the timed phase (it is not paid per packet) and is timed separately as ``to_json_s``.

Reported in ``extra_info``: ``pps`` (median of the rounds) and ``pps_best``, and with tracing
on ``events_per_pkt`` (bumps recorded per frame delivered) and ``trace_bytes_per_pkt``.  Never
asserted (noisy machines).  With benchmarks disabled each variant runs once, small, as a
smoke test.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any

import pytest
import trio

from tests.bench.test_bench_net import BATCH, FRAME_SIZE, per_packet, record
from tests.netenv import NicGuest, ip_of, net_env, udp_stream


@pytest.mark.benchmark(group="tracing")
@pytest.mark.parametrize("tracing", ["off", "on"])
def test_stream_of_64_byte_udp_frames_with_tracing(benchmark: Any, tracing: str) -> None:
    frames_per_round = 100_000 // BATCH * BATCH if benchmark.enabled else 16 * BATCH
    rates: list[float] = []
    costs: dict[str, float] = {}

    async def scenario() -> None:
        a, b = NicGuest("a", ip_of(0)), NicGuest("b", ip_of(1))
        async with net_env(a, b) as env:
            batch = udp_stream(a, b, BATCH, size=FRAME_SIZE)
            received = 0

            async def receive() -> None:
                nonlocal received
                while received < frames_per_round:
                    received += len(await b.nic.recv_batch(4096))

            tracer = env.hv.trace() if tracing == "on" else None
            before = env.snapshot()
            start = time.perf_counter()
            with tracer if tracer is not None else contextlib.nullcontext():
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(receive)
                    for _ in range(frames_per_round // BATCH):
                        await a.nic.send_batch(batch)
            elapsed = time.perf_counter() - start
            diff = env.snapshot().diff(before)
            assert received == frames_per_round
            rates.append(frames_per_round / elapsed)
            costs.update(per_packet(diff, frames_per_round))
            if tracer is not None:
                assert len(tracer) > 0
                t0 = time.perf_counter()
                text = tracer.to_json()
                costs["to_json_s"] = round(time.perf_counter() - t0, 3)
                costs["events_per_pkt"] = round(len(tracer) / frames_per_round, 3)
                costs["trace_bytes_per_pkt"] = round(len(text) / frames_per_round, 1)

    benchmark.pedantic(lambda: trio.run(scenario), rounds=3 if benchmark.enabled else 1, iterations=1)
    record(benchmark, "pps", rates, costs, frames_per_round=frames_per_round, batch=BATCH)
