"""The three device models side by side, written with pvio's own pytest plugin.

Each fixed scenario runs under trio's MockClock (``autojump_clock``) with a seeded
scheduler, so its counters are the same on every run: these tests pin them exactly, per
domain.  (Exactly reproducible for one harness: ``pvio bench --mock-clock`` runs the same
scenarios in a bare ``trio.run``, where trio's seeded shuffle of runnable tasks sees other
tasks, so where arrivals can coalesce -- the emulated NIC -- its counts differ slightly.)
Per packet = per frame delivered end to end (a ping-pong round trip is two).
If a model's data path changes, its pinned counts here change with it: update them from
the failure message only when the change is intended and explained.

Reading the numbers
-------------------
* emulated (trap-and-emulate): a 64-byte frame is TXLEN + 16 data writes + TX command =
  18 exits to send, RXLEN + 16 data reads + RX_POP + the final empty RXLEN = 19 to
  receive, plus ISR read and acknowledge per interrupt; one interrupt per transmit
  (single TX buffer) and one per arrival unless arrivals coalesce.
* pv (netfront/netback, dom0 counted): no register exits, only hypercalls; at saturation
  the ring event indices suppress almost every notification; at low load each hop
  notifies (dom0 takes one interrupt per frame, so PV's interrupts per frame are not below
  the emulated NIC's at low load, while its exits are 5x fewer).
* smartnic: at low load one doorbell (A) and one interrupt (B) per frame; under load the
  monitor polls the TX ring and the driver polls completions, so doorbells and interrupts
  vanish (and back-to-back ping-pong stays inside both polling windows).  In a ping-pong
  the requester's driver busy-polls for the answer after each send from idle (its RX
  interrupt disarmed meanwhile), so only the responder is interrupted: 0.5 per frame.
"""

from __future__ import annotations

from typing import Any

import pytest

from pvio.harness import bench

MODELS = ("emulated", "pv", "smartnic")

# (scenario, offered_load, packets) -> model -> (totals, per-domain interrupts/exits/hypercalls)
PINNED: dict[
    tuple[str, float | None, int], dict[str, tuple[dict[str, int], dict[str, tuple[int, int, int]]]]
] = {
    ("stream", None, 2000): {
        "emulated": (
            {"interrupts": 4000, "exits": 86000, "hypercalls": 4000, "copies": 4000},
            {"dom0": (0, 0, 0), "a": (2000, 42000, 2000), "b": (2000, 44000, 2000)},
        ),
        "pv": (
            {"interrupts": 24, "exits": 64, "hypercalls": 64, "copies": 4000},
            {"dom0": (8, 40, 40), "a": (8, 16, 16), "b": (8, 8, 8)},
        ),
        "smartnic": (
            # one DMA per frame, from the sender's memory into the receiver's buffer
            {"interrupts": 1, "exits": 2, "hypercalls": 1, "copies": 2000},
            {"dom0": (0, 0, 0), "a": (0, 1, 0), "b": (1, 1, 1)},
        ),
    },
    ("stream", 1000, 100): {
        "emulated": (
            {"interrupts": 200, "exits": 4300, "hypercalls": 200, "copies": 200},
            {"dom0": (0, 0, 0), "a": (100, 2100, 100), "b": (100, 2200, 100)},
        ),
        "pv": (
            {"interrupts": 300, "exits": 800, "hypercalls": 800, "copies": 200},
            {"dom0": (100, 500, 500), "a": (100, 200, 200), "b": (100, 100, 100)},
        ),
        "smartnic": (
            {"interrupts": 100, "exits": 200, "hypercalls": 100, "copies": 100},
            {"dom0": (0, 0, 0), "a": (0, 100, 0), "b": (100, 100, 100)},
        ),
    },
    ("pingpong", None, 100): {
        "emulated": (
            {"interrupts": 399, "exits": 8597, "hypercalls": 399, "copies": 400},
            {"dom0": (0, 0, 0), "a": (199, 4297, 199), "b": (200, 4300, 200)},
        ),
        "pv": (
            {"interrupts": 600, "exits": 1600, "hypercalls": 1600, "copies": 400},
            {"dom0": (200, 1000, 1000), "a": (200, 300, 300), "b": (200, 300, 300)},
        ),
        "smartnic": (
            {"interrupts": 1, "exits": 3, "hypercalls": 1, "copies": 200},
            {"dom0": (0, 0, 0), "a": (0, 1, 0), "b": (1, 2, 1)},
        ),
    },
    ("pingpong", 1000, 50): {
        "emulated": (
            {"interrupts": 200, "exits": 4300, "hypercalls": 200, "copies": 200},
            {"dom0": (0, 0, 0), "a": (100, 2150, 100), "b": (100, 2150, 100)},
        ),
        "pv": (
            {"interrupts": 300, "exits": 800, "hypercalls": 800, "copies": 200},
            {"dom0": (100, 500, 500), "a": (100, 150, 150), "b": (100, 150, 150)},
        ),
        "smartnic": (  # A busy-polls for each answer: only B's interrupt per trip, 0.5 per frame
            {"interrupts": 50, "exits": 150, "hypercalls": 50, "copies": 100},
            {"dom0": (0, 0, 0), "a": (0, 50, 0), "b": (50, 100, 50)},
        ),
    },
}


def _pinned_params() -> list[Any]:
    return [
        pytest.param(scenario, load, packets, model, id=f"{scenario}-{load or 'max'}-{model}")
        for (scenario, load, packets) in PINNED
        for model in MODELS
    ]


@pytest.mark.parametrize(("scenario", "offered_load", "packets", "model"), _pinned_params())
async def test_fixed_scenario_costs_exactly_the_pinned_counts(
    pvio_env: Any,
    run_scenario: Any,
    autojump_clock: Any,
    scenario: str,
    offered_load: float | None,
    packets: int,
    model: str,
) -> None:
    async with pvio_env(model) as env:
        result = await run_scenario(env, scenario, packets=packets, offered_load=offered_load)
    totals, by_domain = PINNED[(scenario, offered_load, packets)][model]
    delivered = packets * (2 if scenario == "pingpong" else 1)
    observed = {d: (c["interrupts"], c["exits"], c["hypercalls"]) for d, c in result.by_domain.items()}
    assert result.packets == delivered
    assert (result.totals, observed) == (totals, by_domain), f"observed: ({result.totals}, {observed})"


async def _saturation(pvio_env: Any, run_scenario: Any, model: str) -> Any:
    async with pvio_env(model) as env:
        return await run_scenario(env, "stream", packets=2000, frame_size=64)


async def test_at_saturation_emulated_costs_more_than_pv_which_costs_more_than_smartnic(
    pvio_env: Any, run_scenario: Any, autojump_clock: Any
) -> None:
    pp = {model: (await _saturation(pvio_env, run_scenario, model)).per_packet for model in MODELS}
    for key in ("interrupts", "exits"):
        assert pp["emulated"][key] > pp["pv"][key] > pp["smartnic"][key], (key, pp)


async def test_saturation_targets_of_the_issue_hold(
    pvio_env: Any, run_scenario: Any, autojump_clock: Any
) -> None:
    emulated = (await _saturation(pvio_env, run_scenario, "emulated")).per_packet
    pv = (await _saturation(pvio_env, run_scenario, "pv")).per_packet
    smartnic = (await _saturation(pvio_env, run_scenario, "smartnic")).per_packet
    assert emulated["interrupts"] >= 1 and emulated["exits"] >= 4
    assert pv["interrupts"] <= 0.05
    assert smartnic["interrupts"] <= 0.005 and smartnic["exits"] <= 0.01


@pytest.mark.parametrize("scenario", ["stream", "pingpong"])
async def test_exits_per_packet_order_the_models_at_low_load_too(
    pvio_env: Any, run_scenario: Any, autojump_clock: Any, scenario: str
) -> None:
    exits = {}
    for model in MODELS:
        async with pvio_env(model) as env:
            exits[model] = (await run_scenario(env, scenario, packets=50, offered_load=1000)).per_packet[
                "exits"
            ]
    assert exits["emulated"] > exits["pv"] > exits["smartnic"], exits


async def test_a_run_repeats_its_counts_exactly(
    pvio_env: Any, run_scenario: Any, autojump_clock: Any
) -> None:
    runs = []
    for _ in range(2):
        async with pvio_env("smartnic") as env:
            runs.append(await run_scenario(env, "stream", packets=500, offered_load=20_000))
    assert runs[0].diff is not None and runs[1].diff is not None
    assert runs[0].diff.as_dict() == runs[1].diff.as_dict()


async def test_the_emulated_nic_through_mmio_costs_the_same_exits_as_through_ports(
    pvio_env: Any, run_scenario: Any, autojump_clock: Any
) -> None:
    results = {}
    for use_mmio in (False, True):
        async with pvio_env("emulated", use_mmio=use_mmio) as env:
            result = await run_scenario(env, "stream", packets=20, offered_load=1000)
        assert result.diff is not None
        results[use_mmio] = (result.totals, result.diff.total("exits.pio"), result.diff.total("exits.mmio"))
    assert results[False][0] == results[True][0]
    assert results[False][1] == results[True][2] > 0
    assert results[False][2] == results[True][1] == 0


async def test_unknown_models_scenarios_and_guest_kinds_are_refused_with_a_reason(
    pvio_env: Any, run_scenario: Any, autojump_clock: Any
) -> None:
    with pytest.raises(ValueError, match="unknown device model 'virtio'"):
        async with pvio_env("virtio"):
            pass
    with pytest.raises(NotImplementedError, match="guest kind 'arm'"):
        async with pvio_env("pv", guest="arm"):
            pass
    async with pvio_env("smartnic") as env:
        with pytest.raises(ValueError, match="unknown scenario 'flood'"):
            await run_scenario(env, "flood")


@pytest.mark.parametrize(
    ("model", "size", "limit"), [("pv", 100_000, "46..65535"), ("emulated", 1600, "46..1518")]
)
async def test_a_frame_size_the_model_cannot_carry_is_a_clear_error(
    autojump_clock: Any, model: str, size: int, limit: str
) -> None:
    async with bench.model_env(model) as env:
        with pytest.raises(
            ValueError, match=f"frame_size={size}: {model} NICs carry frames of {limit} bytes"
        ):
            await bench.run_scenario(env, "stream", packets=1, frame_size=size)
