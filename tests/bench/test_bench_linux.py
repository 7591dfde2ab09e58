"""Debian's Linux and its xen-netfront in the PV bench, next to pvio's C and Python netfronts.

One Linux boot serves the Linux rows of :data:`pvio.harness.bench.LINUX_PLAN` (a PyGuest ->
Linux UDP stream counted by Linux's ``rx_packets``, Linux's pktgen -> PyGuest, ICMP
ping-pong answered by Linux's stack); the same ``stream`` and ``pingpong`` cases run first
on the py and x86 guests (PV model), in the same session, so the three drivers' rows can be
compared.  Every row goes into ``extra_info`` as ``pvio bench --guest linux --json`` prints
it (per packet: interrupts, exits, hypercalls, copies; pps; latency), plus the Linux
domain's exits by kind.  Nothing is asserted about rates (noisy machines, real clock);
what is asserted is that each row delivered what it counted.  With benchmarks disabled the
plan runs small, as a smoke test.
"""

from __future__ import annotations

from typing import Any

import pytest

from pvio.harness import bench
from tests.pvh_support import require


@pytest.mark.slow
@pytest.mark.benchmark(group="linux guest")
def test_linux_rows_beside_the_c_and_python_netfronts(benchmark: Any) -> None:
    require("linux")
    scale = 1 if benchmark.enabled else 10
    plan = tuple(
        bench.Case(c.scenario, c.offered_load, max(10, c.packets // scale)) for c in bench.LINUX_PLAN
    )
    rows: list[dict[str, Any]] = []

    def run() -> None:
        rows[:] = [r.row() for r in bench.linux_rows(plan)]

    benchmark.pedantic(run, rounds=1, iterations=1)
    linux = [r for r in rows if r["guest"] == "linux"]
    assert [r["scenario"] for r in linux] == [c.scenario for c in plan]
    for row, case in zip(linux, plan, strict=True):
        offered = row["linux"]["offered"]
        assert offered == case.packets
        if row["scenario"] == "pingpong":  # two frames per answered trip
            assert row["packets"] == 2 * row["linux"]["trips_answered"] <= 2 * offered
        elif row["scenario"] == "stream":  # Linux counted what netback delivered, and no more
            assert 0 < row["packets"] == row["linux"]["eth0"]["rx_packets"] <= offered
        else:  # pktgen: A got what Linux sent
            assert 0 < row["packets"] <= row["linux"]["eth0"]["tx_packets"]
        assert row["by_domain"]["b"]["exits"] >= row["by_domain"]["b"]["exits.hypercall"]
    for kind in ("py", "x86"):
        assert {r["scenario"] for r in rows if r["guest"] == kind} <= {"stream", "pingpong"}
    benchmark.extra_info["rows"] = rows
    for r in rows:
        key = f"{r['guest']} {r['scenario']} {r['load']}"
        benchmark.extra_info[key] = {"pps": r["pps"], "latency_us": r["latency_us"], **r["per_packet"]}
