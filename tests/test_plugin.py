"""The pytest plugin as a user meets it: installed through its pytest11 entry point, its fixtures
in a fresh project's tests, pytest-benchmark's extra_info filled, and the cost table at the end."""

from __future__ import annotations

import json
from typing import Any

import pytest

pytest_plugins = ["pytester"]

USER_TESTS = """
import pytest

@pytest.mark.parametrize("model", ["emulated", "pv", "smartnic"])
async def test_stream(pvio_env, run_scenario, autojump_clock, model):
    async with pvio_env(model, guest="py") as env:
        result = await run_scenario(env, "stream", packets=40, offered_load=1000)
    # one copy each way, but the smart NIC DMAs from the sender's memory to the receiver's
    assert result.packets == 40 and result.per_packet["copies"] == (1 if model == "smartnic" else 2)

async def test_pingpong(pvio_env, run_scenario, autojump_clock):
    async with pvio_env("smartnic") as env:
        result = await run_scenario(env, "pingpong", packets=10)
    assert result.packets == 20 and result.latency_us is not None
"""

BENCH_TESTS = """
def test_bench(pvio_bench):
    result = pvio_bench("smartnic", "stream", packets=64, rounds=1)
    assert result.packets == 64
"""


@pytest.fixture
def project(pytester: pytest.Pytester) -> pytest.Pytester:
    pytester.makeini("[pytest]\ntrio_mode = true\n")
    return pytester


def test_under_mockclock_the_run_ends_with_one_labelled_line(project: pytest.Pytester) -> None:
    project.makepyfile(test_user=USER_TESTS)
    result = project.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=4)
    result.stdout.fnmatch_lines(
        ["pvio: 4 scenario(s) ran under MockClock; their exact counts are what the tests*"]
    )
    assert "pvio device models" not in result.stdout.str()


REAL_CLOCK_TESTS = """
import pytest

@pytest.mark.parametrize("model", ["emulated", "pv", "smartnic"])
async def test_stream(pvio_env, run_scenario, model):
    async with pvio_env(model, guest="py") as env:
        result = await run_scenario(env, "stream", packets=40)
    # a smart NIC frame that finds no RX buffer waits in the sender's TX area: one more copy,
    # and how many wait depends on the interleaving
    low, high = (1, 2) if model == "smartnic" else (2, 2)
    assert result.packets == 40 and low <= result.per_packet["copies"] <= high
"""


def test_under_the_real_clock_the_run_ends_with_the_cost_table(project: pytest.Pytester) -> None:
    project.makepyfile(test_user=REAL_CLOCK_TESTS)
    result = project.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=3)
    result.stdout.fnmatch_lines(
        [
            "*pvio device models: cost per packet delivered end to end (real clock)*",
            "model*guest*scenario*load*packets*int/pkt*exits/pkt*hcalls/pkt*copies/pkt*pps*",
            "emulated*py*stream*saturation*40*",
            "pv*py*stream*saturation*40*",
            "smartnic*py*stream*saturation*40*",
        ]
    )


OPTION_TESTS = r"""
import pytest

async def test_unknown_option(pvio_env):
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['bogus_option'\]; valid: backend, "):
        async with pvio_env("pv", bogus_option=123):
            pass

async def test_backend(pvio_env, run_scenario, autojump_clock):
    async with pvio_env("pv", backend="lossy", backend_options={"drop_every": 1000}) as env:
        result = await run_scenario(env, "stream", packets=20)
    assert result.packets == 20
    assert "backend/vif1.0" in env.hv.counters and "backend/vif2.0" in env.hv.counters

async def test_no_backend_for_smartnic(pvio_env):
    with pytest.raises(ValueError, match="a backend serves PV vifs; smartnic NICs have none"):
        async with pvio_env("smartnic", backend="lossy"):
            pass
"""


def test_the_env_takes_a_backend_and_refuses_unknown_options(project: pytest.Pytester) -> None:
    project.makepyfile(test_options=OPTION_TESTS)
    result = project.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=3)


def test_the_summary_can_be_turned_off(project: pytest.Pytester) -> None:
    project.makepyfile(test_user=USER_TESTS)
    result = project.runpytest_subprocess("-p", "no:cacheprovider", "--pvio-no-summary", "-k", "pingpong")
    result.assert_outcomes(passed=1, deselected=3)
    assert "pvio device models" not in result.stdout.str()


def test_pvio_bench_puts_the_per_packet_counters_into_extra_info(project: pytest.Pytester) -> None:
    project.makepyfile(test_bench=BENCH_TESTS)
    result = project.runpytest_subprocess(
        "-p", "no:cacheprovider", "--benchmark-enable", "--benchmark-json=bench.json"
    )
    result.assert_outcomes(passed=1)
    report: dict[str, Any] = json.loads((project.path / "bench.json").read_text())
    info = report["benchmarks"][0]["extra_info"]
    assert info["model"] == "smartnic" and info["scenario"] == "stream" and info["packets"] == 64
    assert {"interrupts_per_pkt", "exits_per_pkt", "hypercalls_per_pkt", "copies_per_pkt", "pps"} <= set(info)
    assert 1.0 <= info["copies_per_pkt"] <= 2.0  # one DMA per frame, two if it waited for a buffer
    result.stdout.fnmatch_lines(["*pvio device models*", "smartnic*py*stream*saturation*64*"])
