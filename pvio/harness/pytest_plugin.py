"""pvio's pytest plugin: device-model environments, traffic scenarios and a cost summary.

Installed with pvio (entry point ``pytest11: pvio``), so any project that has pvio
installed gets, in its tests:

``pvio_env``
    A factory of booted environments (:func:`pvio.harness.bench.model_env`)::

        async def test_smartnic_stream(pvio_env, run_scenario, autojump_clock):
            async with pvio_env("smartnic", guest="py") as env:
                result = await run_scenario(env, "stream", packets=2000)
            assert result.per_packet["interrupts"] <= 0.005

    ``model`` is ``"emulated"``, ``"pv"`` or ``"smartnic"``; ``guest`` is ``"py"`` or
    ``"x86"`` (pvio's C guest kernel; saturation and back-to-back scenarios only).  Use pytest-trio's
    ``autojump_clock`` fixture for exactly reproducible counts.

``run_scenario``
    :func:`pvio.harness.bench.run_scenario` (``"stream"`` or ``"pingpong"``, ``packets=``,
    ``frame_size=64``, ``offered_load=`` pps or None for saturation), returning a
    :class:`pvio.harness.bench.ScenarioResult` (``per_packet`` interrupts, exits, hypercalls,
    copies; ``pps``; ``latency_us``), and recording it for the end-of-run summary.

``pvio_bench``
    For pytest-benchmark: ``pvio_bench(model, scenario, packets=..., offered_load=...,
    rounds=3)`` boots a fresh environment per round under ``benchmark.pedantic`` (real
    clock), puts the per-packet counters, pps and latency into ``benchmark.extra_info``
    and records the last round for the summary.

At the end of the run, if any scenario ran, a table: model x scenario x load with
interrupts, exits, hypercalls and copies per packet, and pps (``--pvio-no-summary`` hides it).

The module imports nothing heavy at collection time: pytest loads it for every run.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from pvio.harness.bench import ScenarioResult

_RESULTS = pytest.StashKey[list[dict[str, Any]]]()


def pytest_addoption(parser: pytest.Parser) -> None:
    """``--pvio-no-summary``: no device-model table at the end of the run."""
    group = parser.getgroup("pvio", "pvio device models")
    group.addoption(
        "--pvio-no-summary",
        action="store_true",
        default=False,
        help="do not print the pvio device-model cost table at the end of the run",
    )


def pytest_configure(config: pytest.Config) -> None:
    """Make room for the results the tests record."""
    config.stash[_RESULTS] = []


def record_result(config: pytest.Config, result: ScenarioResult, nodeid: str = "") -> None:
    """Add ``result`` to the end-of-run summary."""
    row = result.row()
    row["test"] = nodeid
    config.stash.setdefault(_RESULTS, []).append(row)


def extra_info(result: ScenarioResult) -> dict[str, Any]:
    """The counters of ``result`` as pytest-benchmark ``extra_info`` entries."""
    info: dict[str, Any] = {
        "model": result.model,
        "guest": result.guest,
        "scenario": result.scenario,
        "offered_load": result.load,
        "packets": result.packets,
        "pps": round(result.pps, 1),
    }
    if result.latency_us is not None:
        info["latency_us"] = round(result.latency_us, 1)
    for key, value in result.per_packet.items():
        info[f"{key}_per_pkt"] = round(value, 5)
    for dom, counts in result.by_domain.items():
        for key, value in counts.items():
            info[f"{key}_per_pkt.{dom}"] = round(value / result.packets, 5)
    return info


@pytest.fixture
def pvio_env() -> Callable[..., Any]:
    """``async with pvio_env(model, guest="py", n_guests=2, **options) as env:`` (see the module doc)."""
    from pvio.harness.bench import model_env

    return model_env


@pytest.fixture
def run_scenario(request: pytest.FixtureRequest) -> Callable[..., Awaitable[ScenarioResult]]:
    """``await run_scenario(env, "stream"|"pingpong", packets=, frame_size=64, offered_load=None)``."""
    from pvio.harness import bench

    async def run(env: bench.ModelEnv, scenario: str, **kwargs: Any) -> ScenarioResult:
        result = await bench.run_scenario(env, scenario, **kwargs)
        record_result(request.config, result, request.node.nodeid)
        return result

    return run


@pytest.fixture
def pvio_bench(request: pytest.FixtureRequest, benchmark: Any) -> Callable[..., ScenarioResult]:
    """``pvio_bench(model, scenario, packets=, offered_load=None, guest="py", rounds=3)`` under
    pytest-benchmark: one fresh environment per round; counters into ``benchmark.extra_info``.

    With benchmarks disabled (``--benchmark-disable``) it runs one round: a smoke test.
    """
    import trio

    from pvio.harness import bench

    def run(
        model: str,
        scenario: str,
        *,
        packets: int = 1000,
        offered_load: float | None = None,
        guest: str = "py",
        rounds: int = 3,
        **options: Any,
    ) -> ScenarioResult:
        case = bench.Case(scenario, offered_load, packets)
        results: list[ScenarioResult] = []

        def one_round() -> None:
            results.append(trio.run(functools.partial(bench.run_case, model, case, guest, **options)))

        benchmark.pedantic(one_round, rounds=rounds if benchmark.enabled else 1, iterations=1)
        best = results[-1]
        benchmark.extra_info.update(extra_info(best))
        if len(results) > 1:
            benchmark.extra_info["pps_median"] = round(sorted(r.pps for r in results)[len(results) // 2], 1)
        record_result(request.config, best, request.node.nodeid)
        return best

    return run


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    """The device-model cost table of every scenario the run recorded."""
    rows = config.stash.get(_RESULTS, [])
    if not rows or config.getoption("pvio_no_summary"):
        return
    from pvio.harness.bench import MODELS, format_table

    order = {m: i for i, m in enumerate(MODELS)}
    rows = sorted(
        rows, key=lambda r: (r["scenario"], r["offered_load"] or float("inf"), order.get(r["model"], 99))
    )
    terminalreporter.write_sep("=", "pvio device models: cost per packet delivered end to end")
    for line in format_table(rows).splitlines():
        terminalreporter.write_line(line)
