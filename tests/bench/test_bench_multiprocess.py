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
the two-process placements, the ratios to the one-process figures measured round by round
beside them (``speedup`` on wall clock, ``cpu_bound_speedup``; ``speedup_vs_polling`` to the
polling one-process figure; each the median of the per-round ratios).  Target: two processes on
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
#: The baselines a two-process placement is compared with, round by round.
PAIRED = ("one-process", "one-process-polling")


def _run(benchmark: Any, placement: str) -> list[StreamFigure]:
    """Rounds of ``placement`` (timed by pytest-benchmark).  A two-process placement's rounds
    each follow a round of every baseline (run in the untimed ``setup``), and its speed-ups
    are the median of the per-round ratios: on a shared machine whose speed drifts by tens of
    per cent over a minute, a ratio of two figures taken seconds apart means more than one of
    two medians taken a minute apart."""
    packets = 50_000 if benchmark.enabled else 640
    figures: list[StreamFigure] = []
    paired: dict[str, list[StreamFigure]] = {name: [] for name in PAIRED}
    two_process = not placement.startswith("one-process")

    def setup() -> None:
        if two_process:
            for name in PAIRED:
                paired[name].append(trio.run(measure_stream, name, packets))

    benchmark.pedantic(
        lambda: figures.append(trio.run(measure_stream, placement, packets)),
        setup=setup,
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

    def ratio(base: list[StreamFigure], attr: str) -> float:
        if two_process:  # paired rounds: the median of the ratios
            return round(
                statistics.median(
                    getattr(f, attr) / getattr(b, attr) for f, b in zip(figures, base, strict=True)
                ),
                3,
            )
        return round(
            statistics.median(getattr(f, attr) for f in figures)
            / statistics.median(getattr(b, attr) for b in base),
            3,
        )

    one = paired["one-process"] if two_process else BASELINE.get("one-process")
    if one and placement != "one-process":
        info["speedup"] = ratio(one, "pps")
        info["cpu_bound_speedup"] = ratio(one, "cpu_bound_pps")
    if two_process:
        info["speedup_vs_polling"] = ratio(paired["one-process-polling"], "pps")
    return figures


# One test per placement, the baseline first (pytest runs them in this order).
@pytest.mark.benchmark(group="stream across processes")
@pytest.mark.parametrize("placement", BENCH_PLACEMENTS)
def test_stream_by_placement(benchmark: Any, placement: str) -> None:
    figures = _run(benchmark, placement)
    if placement.startswith("one-process"):
        BASELINE[placement] = figures
    assert all(f.offered == figures[0].offered and f.packets + f.dropped == f.offered for f in figures)
