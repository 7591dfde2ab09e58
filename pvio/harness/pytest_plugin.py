"""pvio's pytest plugin: device-model environments, traffic scenarios and a cost summary.

Installed with pvio (entry point ``pytest11: pvio``), so any project that has pvio
installed gets, in its tests:

``pvio_env``
    A factory of booted environments (:func:`pvio.harness.bench.model_env`)::

        @pytest.mark.trio  # or trio_mode = true in the project's pytest configuration
        async def test_smartnic_stream(pvio_env, run_scenario, autojump_clock):
            async with pvio_env("smartnic", guest="py") as env:
                result = await run_scenario(env, "stream", packets=2000)
            assert result.per_packet["interrupts"] <= 0.005

    ``model`` is ``"emulated"``, ``"pv"`` or ``"smartnic"``; ``guest`` is ``"py"`` or
    ``"x86"`` (pvio's C guest kernel).  ``n_guests`` (default 2, up to 254) boots that many
    guests on the switch, dom0 sized for their vifs (``dom0_pages=`` overrides it; too few for
    the vifs is refused in one line); :func:`pvio.harness.bench.run_streams` runs a stream
    from each even-numbered guest to the next one, all at once.  ``backend="lossy",
    backend_options={...}`` puts a custom backend on the PV vifs; an unknown option is
    refused.  Use pytest-trio's ``autojump_clock`` fixture for exactly reproducible counts.
    ``--pvio-trace DIR`` writes one Perfetto trace per environment into DIR.

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

At the end of the run, a table of the scenarios that ran under the real clock (where pps
means something): model x scenario x load with interrupts, exits, hypercalls and copies per
packet, and pps (``--pvio-no-summary`` hides it).  Scenarios under MockClock are counted in
one line: their counts are what the tests assert.

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
    group.addoption(
        "--pvio-trace",
        metavar="DIR",
        default=None,
        help="write a Perfetto trace of every pvio_env environment into DIR",
    )


def pytest_configure(config: pytest.Config) -> None:
    """Make room for the results the tests record."""
    config.stash[_RESULTS] = []


def record_result(
    config: pytest.Config, result: ScenarioResult, nodeid: str = "", mock: bool = False
) -> None:
    """Add ``result`` to the end-of-run summary (``mock``: it ran under trio's MockClock)."""
    row = result.row()
    row["test"] = nodeid
    row["mock_clock"] = mock
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
def pvio_env(request: pytest.FixtureRequest) -> Callable[..., Any]:
    """``async with pvio_env(model, guest="py", n_guests=2, backend=None, dom0_pages=None,
    **options) as env:`` (see the module doc)."""
    from pvio.harness.bench import model_env

    trace_dir = request.config.getoption("pvio_trace")
    if trace_dir is None:
        return model_env
    made = [0]

    def traced(*args: Any, **kwargs: Any) -> Any:
        import pathlib
        import re

        made[0] += 1
        name = re.sub(r"[^A-Za-z0-9_.-]+", "_", request.node.nodeid) + f"-{made[0]}.json"
        pathlib.Path(trace_dir).mkdir(parents=True, exist_ok=True)
        kwargs.setdefault("trace", str(pathlib.Path(trace_dir) / name))
        return model_env(*args, **kwargs)

    return traced


@pytest.fixture
def run_scenario(request: pytest.FixtureRequest) -> Callable[..., Awaitable[ScenarioResult]]:
    """``await run_scenario(env, "stream"|"pingpong", packets=, frame_size=64, offered_load=None)``."""
    from pvio.harness import bench

    async def run(env: bench.ModelEnv, scenario: str, **kwargs: Any) -> ScenarioResult:
        import trio.testing

        result = await bench.run_scenario(env, scenario, **kwargs)
        mock = isinstance(trio.lowlevel.current_clock(), trio.testing.MockClock)
        record_result(request.config, result, request.node.nodeid, mock=mock)
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
    recorded = config.stash.get(_RESULTS, [])
    if not recorded or config.getoption("pvio_no_summary"):
        return
    from pvio.harness.bench import MODELS, format_table

    rows = [r for r in recorded if not r.get("mock_clock")]
    mocked = len(recorded) - len(rows)
    if not rows:
        terminalreporter.write_line(
            f"pvio: {mocked} scenario(s) ran under MockClock; their exact counts are what the tests "
            "assert (no pps table: wall-clock rates mean nothing there)"
        )
        return
    order = {m: i for i, m in enumerate(MODELS)}
    rows = sorted(
        rows, key=lambda r: (r["scenario"], r["offered_load"] or float("inf"), order.get(r["model"], 99))
    )
    terminalreporter.write_sep("=", "pvio device models: cost per packet delivered end to end (real clock)")
    for line in format_table(rows).splitlines():
        terminalreporter.write_line(line)
