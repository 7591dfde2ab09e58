"""The event timeline (pvio.core.trace): the file follows the Trace Event Format, its events
are the counters' bumps exactly, a fixed scenario gives the same bytes on every run, and
with tracing off the counters are untouched.

The scenarios run under trio's MockClock (the ``autojump_clock`` fixture, or a fresh
MockClock per ``trio.run`` where two runs are compared).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from pvio import Hypervisor, Snapshot
from pvio.core.counters import CounterRegistry, Counters
from pvio.core.trace import COUNTER_TRACK_FAMILIES, TracedCounters, Tracer
from pvio.harness.bench import model_env, run_scenario
from tests.netenv import NicGuest, ip_of, net_env, recv_n, udp_stream

PHASE_FIELDS: dict[str, dict[str, type | tuple[type, ...]]] = {
    "M": {"name": str, "ph": str, "pid": int, "args": dict},
    "i": {"name": str, "cat": str, "ph": str, "ts": (int, float), "pid": int, "tid": int, "args": dict},
    "C": {"name": str, "cat": str, "ph": str, "ts": (int, float), "pid": int, "args": dict},
}
METADATA = {"process_name", "process_sort_index", "thread_name", "thread_sort_index"}


def validate(trace: Any) -> dict[int, str]:
    """Check ``trace`` (the parsed file) against the Trace Event Format as pvio writes it;
    returns tid -> counter owner (from the thread names' metadata)."""
    assert isinstance(trace, dict) and set(trace) == {"displayTimeUnit", "traceEvents"}
    assert trace["displayTimeUnit"] == "ns"
    events = trace["traceEvents"]
    assert isinstance(events, list) and events
    processes: dict[int, str] = {}
    threads: dict[tuple[int, int], str] = {}
    owners: dict[int, str] = {}
    last_ts: dict[tuple[Any, ...], float] = {}
    for e in events:
        assert isinstance(e, dict)
        fields = PHASE_FIELDS[e["ph"]]  # only the phases pvio emits
        for name, kind in fields.items():
            assert isinstance(e.get(name), kind) and not isinstance(e.get(name), bool), (name, e)
        if e["ph"] == "M":
            assert e["name"] in METADATA, e
            if e["name"].startswith("thread_"):
                assert isinstance(e.get("tid"), int), e
            if e["name"] == "process_name":
                assert e["pid"] not in processes, "a process named twice"
                processes[e["pid"]] = e["args"]["name"]
            elif e["name"] == "thread_name":
                assert e["tid"] not in owners, "tids are unique across processes"
                threads[e["pid"], e["tid"]] = e["args"]["name"]
                owners[e["tid"]] = e["args"]["owner"]
            else:
                assert isinstance(e["args"]["sort_index"], int)
            continue
        assert e["ts"] >= 0 and math.isfinite(e["ts"])
        assert e["pid"] in processes, f"process {e['pid']} has no name"
        if e["ph"] == "i":
            assert e["s"] == "t"  # thread-scoped instants
            assert (e["pid"], e["tid"]) in threads, f"thread {e['tid']} has no name"
            assert e["cat"] == e["name"].partition(".")[0]
            assert set(e["args"]) == {"delta", "value"}
            assert all(type(v) is int for v in e["args"].values()) and e["args"]["delta"] != 0
            track: tuple[Any, ...] = ("thread", e["pid"], e["tid"])
        else:
            assert e["args"] and all(type(v) is int for v in e["args"].values())
            assert e["cat"] in COUNTER_TRACK_FAMILIES
            track = ("counter", e["pid"], e["name"])
        assert e["ts"] >= last_ts.get(track, 0.0), f"ts goes back on {track}"
        last_ts[track] = e["ts"]
    return owners


def traced_counts(trace: Any) -> dict[str, dict[str, int]]:
    """owner -> key -> the sum of the traced deltas."""
    owners = validate(trace)
    out: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for e in trace["traceEvents"]:
        if e["ph"] == "i":
            out[owners[e["tid"]]][e["name"]] += e["args"]["delta"]
    return {o: dict(c) for o, c in out.items()}


def counted(diff: Snapshot) -> dict[str, dict[str, int]]:
    """owner -> key -> what the counter moved by (owners that did not move left out)."""
    return {o: dict(c) for o, c in diff.items() if c}


def assert_matches(tracer: Tracer, before: Snapshot, after: Snapshot) -> dict[str, dict[str, int]]:
    trace = json.loads(tracer.to_json())
    traced = traced_counts(trace)
    assert traced == counted(after.diff(before))
    # Each key's last traced value is the counter's value at the end.
    last: dict[tuple[str, str], int] = {}
    owners = validate(trace)
    for e in trace["traceEvents"]:
        if e["ph"] == "i":
            last[owners[e["tid"]], e["name"]] = e["args"]["value"]
    assert all(after.get_count(o, k) == v for (o, k), v in last.items())
    return traced


async def test_a_pv_stream_traces_every_counted_event_into_a_valid_file(
    autojump_clock: Any, tmp_path: Path
) -> None:
    a, b = NicGuest("a", ip_of(0)), NicGuest("b", ip_of(1))
    path = tmp_path / "stream.json"
    async with net_env(a, b) as env:
        before = env.snapshot()
        with env.hv.trace(path) as tracer:
            await a.nic.send_batch(udp_stream(a, b, 64))
            assert len(await recv_n(b.nic, 64)) == 64
        after = env.snapshot()
    trace = json.loads(path.read_text())
    assert path.read_text() == tracer.to_json()
    traced = assert_matches(tracer, before, after)
    assert traced["netfront/vif1.0"]["packets.tx"] == 64
    assert traced["netfront/vif2.0"]["packets.rx"] == 64
    assert traced["dom0"]["hypercalls.grant_table_op.copy"] >= 1
    assert traced["dom2"]["interrupts"] >= 1
    names = {(e["name"], e["args"]["name"]) for e in trace["traceEvents"] if e["name"].endswith("_name")}
    assert {("process_name", "dom1 a"), ("process_name", "netback"), ("thread_name", "vcpu0")} <= names
    assert ("thread_name", "vif1.0") in names
    counters = [e for e in trace["traceEvents"] if e["ph"] == "C"]
    assert {"vif2.0 packets"} <= {e["name"] for e in counters}


@pytest.mark.parametrize(
    ("model", "guest", "scenario", "offered_load"),
    [
        ("pv", "py", "pingpong", None),
        ("pv", "x86", "stream", 20_000),
        ("emulated", "py", "stream", None),
        ("emulated", "x86", "pingpong", None),
        ("smartnic", "py", "stream", 20_000),
        ("smartnic", "py", "pingpong", None),
    ],
)
async def test_the_traced_events_are_the_counters_exactly(
    autojump_clock: Any, model: str, guest: str, scenario: str, offered_load: float | None
) -> None:
    async with model_env(model, guest) as env:
        before = env.snapshot()
        with Tracer(env.hv) as tracer:
            await run_scenario(env, scenario, packets=100, offered_load=offered_load)
        after = env.snapshot()
    traced = assert_matches(tracer, before, after)
    domains = [o for o in traced if o.startswith("dom")]
    assert sum(traced[o].get("interrupts", 0) for o in domains) >= 1
    if model == "emulated":
        assert sum(traced[o].get("exits.pio", 0) for o in domains) >= 1
    if model == "smartnic":
        snic = next(c for o, c in traced.items() if o.startswith("smartnic/") and "irqs.raised" in c)
        assert snic["irqs.raised"] == snic.get("irqs.by_frames", 0) + snic.get("irqs.by_timer", 0)


async def test_counters_created_while_tracing_get_tracks_of_their_own(autojump_clock: Any) -> None:
    tracers: list[Tracer] = []
    befores: list[Snapshot] = []

    def start_tracing(hv: Hypervisor) -> None:
        befores.append(hv.snapshot())
        tracers.append(Tracer(hv).start())

    a, b = NicGuest("a", ip_of(0)), NicGuest("b", ip_of(1))
    async with net_env(a, b, before_guests=start_tracing) as env:
        tracer = tracers[0]
        await a.nic.send_batch(udp_stream(a, b, 8))
        await recv_n(b.nic, 8)
        tracer.stop()
        after = env.snapshot()
        assert all(type(env.hv.counters[o]) is Counters for o in env.hv.counters)
    assert {"dom1", "dom2", "netfront/vif1.0", "netback/vif2.0"} <= set(tracer.tracks())
    assert list(tracer.tracks()) == [o for o in env.hv.counters if o in tracer.tracks()]
    traced = assert_matches(tracer, befores[0], after)
    assert traced["dom1"]["hypercalls"] >= 1  # the guest's boot is on the timeline


def run_fixed_scenario() -> str:
    """A PV stream under a fresh MockClock; returns the trace file's text."""

    async def scenario() -> str:
        a, b = NicGuest("a", ip_of(0)), NicGuest("b", ip_of(1))
        async with net_env(a, b) as env:
            with env.hv.trace() as tracer:
                for start in (0, 32):
                    await a.nic.send_batch(udp_stream(a, b, 32, start=start))
                    await trio.sleep(0.001)  # two bursts: the clock moves between them
                await recv_n(b.nic, 64)
        return tracer.to_json()

    return trio.run(scenario, clock=trio.testing.MockClock(autojump_threshold=0))


def test_a_fixed_scenario_gives_a_byte_identical_trace_on_every_run() -> None:
    first, second = run_fixed_scenario(), run_fixed_scenario()
    assert first == second
    ts = [e["ts"] for e in json.loads(first)["traceEvents"] if e["ph"] == "i"]
    assert len(set(ts)) == len(ts), "every bump has its own timestamp"
    assert ts[-1] >= 1000.0, "the second burst is at least 1 ms (1000 µs) later"


def test_the_trace_is_the_same_in_another_process_with_another_hash_seed() -> None:
    # The child imports hypothesis as pytest-trio does here: with it imported or not, the
    # boot before the traced phase takes a different (each time the same) number of
    # hypercalls, which shows in the events' running totals.
    script = (
        "import sys, hypothesis; from tests.test_trace import run_fixed_scenario as r; sys.stdout.write(r())"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    root = Path(__file__).resolve().parent.parent
    other = subprocess.run(
        [sys.executable, "-c", script], cwd=root, env=env, capture_output=True, text=True, check=True
    ).stdout
    assert other == run_fixed_scenario()


async def test_tracing_off_leaves_the_counter_classes_untouched(autojump_clock: Any) -> None:
    assert "__setitem__" not in vars(Counters)  # the C dict's own, on the hot path
    a, b = NicGuest("a", ip_of(0)), NicGuest("b", ip_of(1))
    async with net_env(a, b) as env:
        registry = env.hv.counters
        assert all(type(registry[o]) is Counters for o in registry)
        tracer = env.hv.trace()
        with tracer:
            assert all(isinstance(registry[o], TracedCounters) for o in registry)
            assert registry.on_new == [tracer._adopt]
        assert all(type(registry[o]) is Counters for o in registry)
        assert registry.on_new == []
        recorded = len(tracer)
        await a.nic.send_batch(udp_stream(a, b, 8))
        await recv_n(b.nic, 8)
        assert len(tracer) == recorded  # nothing recorded while off
        assert all(type(registry[o]) is Counters for o in registry)
        assert not tracer.running


def test_one_tracer_at_a_time_and_a_restart_goes_on_with_the_same_tracks() -> None:
    registry = CounterRegistry()
    dom = registry.new("dom1")
    first = Tracer(registry).start()
    with pytest.raises(RuntimeError, match="another tracer"):
        Tracer(registry).start()
    with pytest.raises(RuntimeError, match="running already"):
        first.start()
    dom["exits"] += 2  # outside a trio run: stamped at the origin
    dev = registry.new("netback/vif1.0", "device")
    dev["packets.rx"] += 3
    first.stop()
    first.stop()  # stopping twice is harmless
    dom["exits"] += 1
    with first:
        dom["exits"] += 4
        dev["packets.rx"] += 0  # no change, no event
    assert first.tracks() == {"dom1": (1, 1), "netback/vif1.0": (2, 2)}
    instants = [e for e in first.events() if e["ph"] == "i"]
    assert [(e["name"], e["args"]["delta"], e["args"]["value"]) for e in instants] == [
        ("exits", 2, 2),
        ("packets.rx", 3, 3),
        ("exits", 4, 7),
    ]
    assert [e["ts"] for e in instants] == [0.0, 0.001, 0.002]
    validate(json.loads(first.to_json()))


async def test_the_file_holds_exactly_the_events(autojump_clock: Any) -> None:
    async with model_env("smartnic") as env:
        with Tracer(env.hv) as tracer:
            await run_scenario(env, "stream", packets=50, offered_load=20_000)
    text = tracer.to_json()
    assert json.loads(text)["traceEvents"] == tracer.events()
    expected = [json.dumps(e, sort_keys=True, separators=(",", ":")) for e in tracer.events()]
    assert [line.rstrip(",") for line in text.splitlines()[1:-1]] == expected


async def test_with_the_real_clock_the_events_are_stamped_as_they_happen() -> None:
    registry = CounterRegistry()
    dom = registry.new("dom1")
    with Tracer(registry) as tracer:
        dom["exits"] += 1
        await trio.sleep(0.001)
        dom["exits"] += 1
    trace = json.loads(tracer.to_json())
    validate(trace)
    first, second = (e["ts"] for e in trace["traceEvents"] if e["ph"] == "i")
    assert second > first + 0.001  # more than the 1 ns spacing of bumps at one clock reading
