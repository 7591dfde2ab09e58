"""The three device models under pytest-benchmark, through the plugin's ``pvio_bench`` fixture.

Each benchmark boots a fresh environment per round (real clock) and runs one scenario; the
per-packet interrupts, exits, hypercalls and copies, pps and (ping-pong) latency go into
``extra_info``, and the end-of-run table compares the models.  ``make bench`` runs them;
with benchmarks disabled (plain ``pytest``) each runs one small round as a smoke test.
Issue targets at saturation with 64-byte frames (emulated >= 1 interrupt and >= 4 exits,
PV <= 0.05 interrupts, smart NIC <= 0.005 interrupts and <= 0.01 exits per packet) are
asserted exactly under MockClock in ``tests/test_device_comparison.py``; here they are
reported, never asserted (real time, noisy machines).  The x86 rows run pvio's C guest kernel
(its bench app, ``cpu/bench_guest.py``) at saturation and back to back only.
"""

from __future__ import annotations

from typing import Any

import pytest

MODELS = ("emulated", "pv", "smartnic")


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.benchmark(group="device models: stream, saturation")
def test_stream_at_saturation(pvio_bench: Any, benchmark: Any, model: str) -> None:
    # Long enough that a fresh environment's start-up (first touches of its buffers and areas)
    # is noise: 300 k frames for PV and the smart NIC; the emulated NIC takes seconds for 20 k.
    packets = (20_000 if model == "emulated" else 300_000) if benchmark.enabled else 200
    result = pvio_bench(model, "stream", packets=packets)
    assert result.packets == packets


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.benchmark(group="device models: stream, 10k pps offered")
def test_stream_at_10k_pps(pvio_bench: Any, benchmark: Any, model: str) -> None:
    packets = 2000 if benchmark.enabled else 50
    result = pvio_bench(model, "stream", packets=packets, offered_load=10_000)
    assert result.packets == packets


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.benchmark(group="device models: ping-pong, 1k trips/s (low load)")
def test_pingpong_at_low_load(pvio_bench: Any, benchmark: Any, model: str) -> None:
    trips = 500 if benchmark.enabled else 20
    result = pvio_bench(model, "pingpong", packets=trips, offered_load=1000)
    assert result.packets == 2 * trips and result.latency_us is not None


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.benchmark(group="device models: ping-pong, back to back")
def test_pingpong_back_to_back(pvio_bench: Any, benchmark: Any, model: str) -> None:
    trips = 2000 if benchmark.enabled else 20
    result = pvio_bench(model, "pingpong", packets=trips)
    assert result.packets == 2 * trips and result.latency_us is not None


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.benchmark(group="device models, x86 guests: stream, saturation")
def test_x86_stream_at_saturation(pvio_bench: Any, benchmark: Any, model: str) -> None:
    packets = 1000 if benchmark.enabled else 50
    result = pvio_bench(model, "stream", packets=packets, guest="x86")
    assert result.packets == packets and result.guest == "x86"


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.benchmark(group="device models, x86 guests: ping-pong, back to back")
def test_x86_pingpong_back_to_back(pvio_bench: Any, benchmark: Any, model: str) -> None:
    trips = 100 if benchmark.enabled else 10
    result = pvio_bench(model, "pingpong", packets=trips, guest="x86")
    assert result.packets == 2 * trips and result.latency_us is not None


@pytest.mark.benchmark(group="smart NIC moderation: 1k pps one-way stream (MockClock)")
def test_smartnic_moderation_curve(benchmark: Any) -> None:
    """The low-load trade-off (``pvio.harness.moderation``): interrupts per packet against the
    latency moderation adds, per setting, under MockClock; the points go into ``extra_info``."""
    from pvio.harness.moderation import SETTINGS, curve

    packets = 200 if benchmark.enabled else 20
    points = benchmark.pedantic(lambda: curve(SETTINGS, rate=1000, packets=packets), rounds=1, iterations=1)
    assert [p.packets for p in points] == [packets] * len(SETTINGS)
    benchmark.extra_info["points"] = [p.row() for p in points]


@pytest.mark.parametrize("model", ("pv", "smartnic"))
@pytest.mark.benchmark(group="device models: stream, saturation, steady state")
def test_steady_stream_at_saturation(benchmark: Any, model: str) -> None:
    """``pvio bench --steady``: the saturation stream in one warmed-up environment (100 k frames
    first, not timed; then the best and median of three rounds of 300 k), run in a fresh
    interpreter as pyperf runs its workers.  Inside this pytest process the same stream is
    8-12 % slower (importing hypothesis into a plain script reproduces it; the cause is not
    known), and a fresh environment's first touches of its memory are left out, as a long
    experiment leaves them out."""
    import json
    import subprocess
    import sys

    argv = [sys.executable, "-m", "pvio", "bench", "--steady", "--json", "--models", model]
    if not benchmark.enabled:
        argv.append("--quick")
    rows: list[dict[str, Any]] = []

    def run() -> None:
        out = subprocess.run(argv, check=True, capture_output=True, text=True, timeout=600).stdout
        rows.extend(json.loads(out))

    benchmark.pedantic(run, rounds=1, iterations=1)
    (row,) = rows
    # PV: the two grant copies; the smart NIC: one DMA, two for a frame that waited for a buffer
    low = 2.0 if model == "pv" else 1.0
    assert row["model"] == model and low <= row["copies_per_pkt"] <= 2.0
    benchmark.extra_info.update(row)
