"""Many guests on one switch: 64 PV guests, 32 concurrent 64-byte UDP streams (guest 2k -> 2k+1).

:func:`pvio.harness.bench.scale_report` boots the 64-guest network (timed, with the resident
memory it adds), runs the 32 streams at saturation (every frame checked, in order, by its
receiver), then boots 2 guests and runs one stream of as many frames, in the same run.
Reported in ``extra_info``: the aggregate ``pps`` of each (median of the rounds, wall clock)
and ``cpu_pps`` (per CPU second of this process), their ratio (target: within 20 % of the
2-guest figure), interrupts / exits / hypercalls / copies per packet of each, the boot time
and the resident memory per guest (VmRSS added by the boot over the guests, dom0's 2 MiB of
staging pages per vif included).  Reported, never asserted: this machine is shared.

With benchmarks disabled (``make test`` does not collect tests/bench) it runs once, small.
"""

from __future__ import annotations

from typing import Any

import pytest

from pvio.harness.bench import SCALE_GUESTS, SCALE_PACKETS, ScaleReport, scale_report


@pytest.mark.benchmark(group="scale")
def test_64_guests_32_streams(benchmark: Any) -> None:
    packets = SCALE_PACKETS * 5 if benchmark.enabled else 50
    reports: list[ScaleReport] = []
    benchmark.pedantic(
        lambda: reports.append(scale_report(SCALE_GUESTS, packets, rounds=3 if benchmark.enabled else 1)),
        rounds=1,
        iterations=1,
    )
    report = reports[-1]
    info = benchmark.extra_info
    info.update(ratio=round(report.ratio, 3), cpu_ratio=round(report.cpu_ratio, 3))
    for label, run in (("guests2", report.base), ("guests64", report.scale)):
        row = run.row()
        info[f"{label}.pps"] = row["pps"]
        info[f"{label}.cpu_pps"] = row["cpu_pps"]
        info[f"{label}.boot_s"] = row["boot_s"]
        info[f"{label}.rss_per_guest_mib"] = round(row["rss_per_guest"] / 2**20, 3)
        for key, value in row["per_packet"].items():
            info[f"{label}.{key}_per_pkt"] = value
    total = packets * SCALE_GUESTS // 2
    assert report.scale.rounds[-1].delivered == report.base.rounds[-1].delivered == total
