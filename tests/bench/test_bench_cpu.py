"""The CPU half as pytest benchmarks: one boot of the teaching kernel per mode and round.

Each round boots the kernel in its mode under MockClock (exact counts) and measures the
wall time of the whole boot; ``extra_info`` carries the per-operation exits, hypercalls,
reflected traps and translations (``pvio bench --cpu``'s table).  The counts are asserted
(they are deterministic); the times are reported, never asserted (noisy machines).  With
benchmarks disabled each mode runs once, as a smoke test.
"""

from __future__ import annotations

from typing import Any

import pytest

from pvio.harness.cpu_bench import per_operation, run_guest


@pytest.mark.benchmark(group="cpu modes")
@pytest.mark.parametrize("mode", ["trap", "bt", "pv"])
def test_cpu_mode_boot_and_operations(benchmark: Any, mode: str) -> None:
    runs = []

    def one_round() -> None:
        runs.append(run_guest(mode, ops=8, idle_ticks=4))

    benchmark.pedantic(one_round, rounds=3 if benchmark.enabled else 1, iterations=1)
    run = runs[-1]
    assert run.crash_reason is None and "kernel: done" in run.console
    table = per_operation(run)
    for op, row in table.items():
        for col in ("exits", "hypercalls", "reflected", "translations", "virtual_ns"):
            benchmark.extra_info[f"{op}.{col}"] = row[col]
    benchmark.extra_info["total_exits"] = run.counters["exits"]
    assert table["cli_sti"]["exits"] == (2 if mode == "trap" else 0)
