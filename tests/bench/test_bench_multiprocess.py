"""Both cores: the 64-byte UDP stream with its guests in the hypervisor's process or their own.

:func:`pvio.remote.stream.measure_stream` runs the stream A -> B (netfront -> netback ->
switch -> netback -> netfront, the guests unchanged PyGuests) with A and B in the
hypervisor's process (``one-process``; ``one-process-polling`` with their netfronts
busy-polling), A (``remote-sender``) or B (``remote-receiver``) in its own process, or
their vifs' backend in a driver domain (``driver-domain``), the other process pinned to the
CPUs the hypervisor's process is not on (``BENCH_PLACEMENTS`` says why not both guests).
Reported in ``extra_info``:
``pps`` (frames delivered per wall-clock second, median of the rounds, and ``pps_best``),
``dropped`` (the most frames netback dropped for B in a round: a receiver that fell behind),
``cpu_bound_pps`` (packets over the CPU seconds of the busiest CPU, from each process's
own CPU time: what a quiet machine would give), the CPU seconds of each process, and, for
the two-process placements, the ratios to the one-process figures measured in
the same run (``speedup`` on wall clock, ``cpu_bound_speedup``; ``speedup_vs_polling`` to
the polling one-process figure).  Target: two processes on
two cores >= 1.6x the one-process figure; reported, never asserted (noisy machines).
With benchmarks disabled each placement runs once, small, as a smoke test that still
checks every frame arrives once and in order.
"""

from __future__ import annotations

import statistics
from typing import Any

import pytest
import trio

from pvio.remote.stream import BENCH_PLACEMENTS, StreamFigure, measure_stream

BASELINE: dict[str, list[StreamFigure]] = {}


def _run(benchmark: Any, placement: str) -> list[StreamFigure]:
    packets = 50_000 if benchmark.enabled else 640
    figures: list[StreamFigure] = []
    benchmark.pedantic(
        lambda: figures.append(trio.run(measure_stream, placement, packets)),
        rounds=3 if benchmark.enabled else 1,
        iterations=1,
    )
    pps = [f.pps for f in figures]
    cpu_pps = [f.cpu_bound_pps for f in figures]
    info = benchmark.extra_info
    info.update(placement=placement, processes=figures[0].processes, packets=packets)
    info["dropped"] = max(f.dropped for f in figures)
    info["pps"] = round(statistics.median(pps), 1)
    info["pps_best"] = round(max(pps), 1)
    info["cpu_bound_pps"] = round(statistics.median(cpu_pps), 1)
    for key in figures[0].cpu_seconds:
        info[f"cpu_seconds.{key}"] = round(statistics.median(f.cpu_seconds[key] for f in figures), 4)
    info.update(figures[-1].per_packet)
    base = BASELINE.get("one-process")
    if base and placement != "one-process":
        info["speedup"] = round(info["pps"] / statistics.median(f.pps for f in base), 3)
        info["cpu_bound_speedup"] = round(
            info["cpu_bound_pps"] / statistics.median(f.cpu_bound_pps for f in base), 3
        )
    polling = BASELINE.get("one-process-polling")
    if polling and not placement.startswith("one-process"):
        info["speedup_vs_polling"] = round(info["pps"] / statistics.median(f.pps for f in polling), 3)
    return figures


# One test per placement, the baseline first (pytest runs them in this order).
@pytest.mark.benchmark(group="stream across processes")
@pytest.mark.parametrize("placement", BENCH_PLACEMENTS)
def test_stream_by_placement(benchmark: Any, placement: str) -> None:
    figures = _run(benchmark, placement)
    if placement.startswith("one-process"):
        BASELINE[placement] = figures
    assert all(f.offered == figures[0].offered and f.packets + f.dropped == f.offered for f in figures)
