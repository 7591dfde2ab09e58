"""The three device models with x86 guests: pvio's C guest kernel and its C drivers
(``frontends/x86``: netfront.c, emunic.c, snic.c) on the emulated vCPU, through the plugin.

``pvio_env(model, guest="x86")`` boots two x86 guests in ``mode=bench`` (``cpu/bench_guest.py``);
``run_scenario`` has guest A's bench app stream to / ping-pong with guest B's, inside the
guests.  Everything runs under trio's MockClock with the seeded scheduler, so the counts
are pinned exactly.  They include the harness's control channel: one VIRQ_BENCH upcall on A
per scenario (the ``+1`` in A's interrupts).

Reading the numbers (64-byte frames)
------------------------------------
* emulated: A pays TXLEN + 16 TXDATA + CMD TX = 18 port writes per frame, then ISR read and
  acknowledge on the TOK interrupt and the iret: 21 exits, 1 interrupt per frame; B drains
  the FIFO with 19 exits per frame (RXLEN, 16 RXDATA, RX_POP, and the final empty RXLEN
  per interrupt), arrivals coalescing into fewer interrupts.
* pv: netfront.c with its event indices: a handful of notifications per stream; in
  ping-pong every hop notifies and dom0 (netback) takes an interrupt per frame.
* smartnic: snic.c polls while busy (``spin=``, a few of the vCPU's slices, during which the
  monitor's task runs) and re-arms only when idle, so a stream costs A one doorbell and B
  one interrupt, and a back-to-back ping-pong stays inside both polling windows; a push
  after the driver slept disarms its RX interrupt, so a paced ping-pong's answer is polled
  for, not interrupted for (A's interrupts there are its timer's).

Ordering (per packet): exits emulated > pv > smartnic in both scenarios; interrupts
emulated > pv > smartnic in the stream only -- in ping-pong PV's interrupts exceed the
emulated NIC's, because dom0's netback takes one per frame on top of the guests'.
"""

from __future__ import annotations

from typing import Any

import pytest
import trio
import trio.testing

from pvio.cpu.guest import X86Guest

MODELS = ("emulated", "pv", "smartnic")

# (scenario, packets) -> model -> (totals, per-domain (interrupts, exits, hypercalls))
PINNED: dict[tuple[str, int], dict[str, tuple[dict[str, int], dict[str, tuple[int, int, int]]]]] = {
    ("stream", 60): {
        "emulated": (
            {"interrupts": 97, "exits": 2522, "hypercalls": 134, "copies": 120},
            {"dom0": (0, 0, 0), "a": (61, 1262, 62), "b": (36, 1260, 72)},
        ),
        "pv": (
            {"interrupts": 4, "exits": 12, "hypercalls": 12, "copies": 120},
            {"dom0": (1, 5, 5), "a": (2, 5, 5), "b": (1, 2, 2)},
        ),
        "smartnic": (
            {"interrupts": 2, "exits": 5, "hypercalls": 4, "copies": 60},
            {"dom0": (0, 0, 0), "a": (1, 3, 2), "b": (1, 2, 2)},
        ),
    },
    ("pingpong", 20): {
        "emulated": (
            {"interrupts": 59, "exits": 1674, "hypercalls": 78, "copies": 80},
            {"dom0": (0, 0, 0), "a": (30, 838, 40), "b": (29, 836, 38)},
        ),
        "pv": (
            {"interrupts": 121, "exits": 399, "hypercalls": 399, "copies": 80},
            {"dom0": (40, 200, 200), "a": (41, 100, 100), "b": (40, 99, 99)},
        ),
        "smartnic": (
            {"interrupts": 2, "exits": 6, "hypercalls": 4, "copies": 40},
            {"dom0": (0, 0, 0), "a": (1, 3, 2), "b": (1, 3, 2)},
        ),
    },
}


async def _run(pvio_env: Any, run_scenario: Any, model: str, scenario: str, packets: int) -> Any:
    async with pvio_env(model, guest="x86") as env:
        return await run_scenario(env, scenario, packets=packets)


def _observed(result: Any) -> tuple[dict[str, int], dict[str, tuple[int, int, int]]]:
    by_dom = {d: (c["interrupts"], c["exits"], c["hypercalls"]) for d, c in result.by_domain.items()}
    return dict(result.totals), by_dom


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize(("scenario", "packets"), [("stream", 60), ("pingpong", 20)])
async def test_x86_scenarios_take_exact_counts(
    pvio_env: Any, run_scenario: Any, autojump_clock: Any, model: str, scenario: str, packets: int
) -> None:
    result = await _run(pvio_env, run_scenario, model, scenario, packets)
    assert result.guest == "x86"
    assert result.packets == (packets if scenario == "stream" else 2 * packets)
    # two per frame (one each way), but one on the smart NIC: its DMA goes from the sender's
    # memory straight into the receiver's buffer
    assert result.totals["copies"] == (1 if model == "smartnic" else 2) * result.packets
    assert _observed(result) == PINNED[(scenario, packets)][model], _observed(result)


@pytest.mark.parametrize(("scenario", "packets"), [("stream", 60), ("pingpong", 20)])
async def test_x86_ordering_emulated_pv_smartnic(
    pvio_env: Any, run_scenario: Any, autojump_clock: Any, scenario: str, packets: int
) -> None:
    pp = {m: (await _run(pvio_env, run_scenario, m, scenario, packets)).per_packet for m in MODELS}
    assert pp["emulated"]["exits"] > pp["pv"]["exits"] > pp["smartnic"]["exits"]
    assert pp["emulated"]["exits"] >= 4  # the smart NIC's few exits are fixed costs (kick, first doorbell)
    if scenario == "stream":
        assert pp["emulated"]["interrupts"] > pp["pv"]["interrupts"] > pp["smartnic"]["interrupts"]
        assert pp["emulated"]["interrupts"] >= 1
    else:  # dom0's netback takes an interrupt per frame: PV above the emulated NIC, smart NIC far below
        assert pp["pv"]["interrupts"] > pp["emulated"]["interrupts"] > pp["smartnic"]["interrupts"]


# ---------------------------------------------------------------------- paced loads
# The bench app paces itself (frontends/x86/bench.c): frame (trip) k is due at t0 + k/rate in
# system time; between due times the sender arms set_timer_op and idles, and VIRQ_TIMER wakes
# it.  So A pays, per frame after the first, one timer upcall and about three hypercalls
# (set_timer_op, the upcall's iret, SCHEDOP_block) on top of what the model costs it: these
# counts include them (``timer_sets`` says how many timers A armed).  At 1000 pps every frame
# finds the receiver idle: one interrupt per frame on B in every model (and on dom0 for PV).
#
# (scenario, offered load, packets) -> model -> (totals, per-domain (interrupts, exits,
# hypercalls), timers armed by A)
PINNED_PACED: dict[
    tuple[str, int, int], dict[str, tuple[dict[str, int], dict[str, tuple[int, int, int]], int]]
] = {
    ("stream", 1000, 20): {
        "emulated": (
            {"interrupts": 60, "exits": 939, "hypercalls": 119, "copies": 40},
            {"dom0": (0, 0, 0), "a": (40, 479, 79), "b": (20, 460, 40)},
            19,
        ),
        "pv": (
            {"interrupts": 80, "exits": 259, "hypercalls": 259, "copies": 40},
            {"dom0": (20, 100, 100), "a": (40, 119, 119), "b": (20, 40, 40)},
            19,
        ),
        "smartnic": (
            {"interrupts": 40, "exits": 119, "hypercalls": 99, "copies": 20},
            {"dom0": (0, 0, 0), "a": (20, 79, 59), "b": (20, 40, 40)},
            19,
        ),
    },
    ("pingpong", 1000, 10): {
        "emulated": (
            {"interrupts": 45, "exits": 889, "hypercalls": 79, "copies": 40},
            {"dom0": (0, 0, 0), "a": (25, 449, 49), "b": (20, 440, 30)},
            9,
        ),
        "pv": (
            {"interrupts": 70, "exits": 229, "hypercalls": 229, "copies": 40},
            {"dom0": (20, 100, 100), "a": (30, 79, 79), "b": (20, 50, 50)},
            9,
        ),
        "smartnic": (  # A busy-polls for each answer: its interrupts are the timer's and the kick
            {"interrupts": 20, "exits": 69, "hypercalls": 49, "copies": 20},
            {"dom0": (0, 0, 0), "a": (10, 39, 29), "b": (10, 30, 20)},
            9,
        ),
    },
}


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize(("scenario", "rate", "packets"), list(PINNED_PACED))
async def test_x86_paced_scenarios_take_exact_counts(
    pvio_env: Any, run_scenario: Any, autojump_clock: Any, model: str, scenario: str, rate: int, packets: int
) -> None:
    async with pvio_env(model, guest="x86") as env:
        start = trio.current_time()
        result = await run_scenario(env, scenario, packets=packets, offered_load=rate)
        elapsed = trio.current_time() - start
        timers = env.guests[0].mailbox()["timer_sets"]
    assert result.load == f"{rate} pps" and result.guest == "x86"
    assert result.packets == (packets if scenario == "stream" else 2 * packets)
    # paced in the guest's system time: the last frame (trip) goes out at (packets - 1) / rate
    assert (packets - 1) / rate <= elapsed < (packets - 1) / rate + 0.01
    totals, by_domain, timer_sets = PINNED_PACED[(scenario, rate, packets)][model]
    assert (*_observed(result), timers) == (totals, by_domain, timer_sets), (*_observed(result), timers)


async def test_x86_paced_stream_orders_the_models_by_exits(
    pvio_env: Any, run_scenario: Any, autojump_clock: Any
) -> None:
    """At 1000 pps exits still order emulated > pv > smartnic; interrupts do not (PV pays dom0's)."""
    pp = {}
    for m in MODELS:
        async with pvio_env(m, guest="x86") as env:
            pp[m] = (await run_scenario(env, "stream", packets=20, offered_load=1000)).per_packet
    assert pp["emulated"]["exits"] > pp["pv"]["exits"] > pp["smartnic"]["exits"]
    assert pp["pv"]["interrupts"] > pp["emulated"]["interrupts"] > pp["smartnic"]["interrupts"]


# ---------------------------------------------------------------------- hostile guests
async def _hostile(env: Any, model: str, mode: str) -> tuple[X86Guest, Any]:
    """Plug a third x86 guest (``mode``) into ``env`` on ``model``; wait until it is up."""
    from pvio.backends.emulated_nic import add_emulated_nic
    from pvio.backends.smartnic import add_smartnic

    guest = X86Guest(name=f"x86-{mode}", cmdline=f"mode={mode} nic={model} ip=10.0.0.9")
    dom = env.hv.create_domain(guest, name=guest.name)
    dev = (add_emulated_nic if model == "emulated" else add_smartnic)(env.hv, dom, env.switch)
    await env.hv.start(dom)
    with trio.fail_after(5):
        while not any(line.startswith("ready:") for line in dom.console_lines):
            await trio.sleep(0.001)
        await trio.sleep(0.01)
    return guest, dev


async def test_a_guest_writing_bad_registers_is_a_counted_error_and_others_go_on(
    pvio_env: Any, run_scenario: Any, autojump_clock: Any
) -> None:
    """mode=badreg: TXLEN=4000 then CMD TX (TER, tx_bad_length) and a write to offset 0x30
    (bad_register); the card and the guest go on, and so do the other guests."""
    async with pvio_env("emulated", guest="x86") as env:
        guest, dev = await _hostile(env, "emulated", "badreg")
        assert dev.dev["errors.tx_bad_length"] == 1 and dev.dev["errors.bad_register"] == 1
        assert guest.domain.alive and dev.enabled and dev.isr == 0  # TER taken and acknowledged
        assert guest.domain.crash_reason is None
        result = await run_scenario(env, "stream", packets=20)
        assert result.packets == 20 and guest.domain.alive


async def test_a_guest_posting_a_bad_descriptor_is_a_counted_error_and_others_go_on(
    pvio_env: Any, run_scenario: Any, autojump_clock: Any
) -> None:
    """mode=baddesc: a TX descriptor naming pool buffer 0xFFFF: completed with BAD_BUF,
    counted by the device (errors.bad_buf, ERRORS); the device keeps running."""
    async with pvio_env("smartnic", guest="x86") as env:
        guest, dev = await _hostile(env, "smartnic", "baddesc")
        assert dev.dev["errors.bad_buf"] == 1 and dev.errors == 1
        assert guest.domain.alive and dev.enabled and not dev.error
        result = await run_scenario(env, "pingpong", packets=5)
        assert result.packets == 10 and guest.domain.alive


async def test_a_driver_polling_with_hlt_is_not_a_runaway_guest(pvio_env: Any, autojump_clock: Any) -> None:
    """snic.c's busy-poll ends each round with hlt and makes no exit: 6000 rounds (more than the
    vCPU's 5000-slice runaway limit) are a yield, not a stuck guest."""
    async with pvio_env("smartnic", guest="x86", spin=6000) as env:
        for g in env.guests:
            assert g.domain.alive and g.domain.crash_reason is None
            assert g.driver_stats()["rearms"] >= 1  # it went through the whole window, then slept


def test_x86_smartnic_saturation_counts_on_the_real_clock_are_within_2x_of_mockclock() -> None:
    """snic.c's busy-poll budget is in rounds (hlt-ended slices), not in system time, and the
    device's moderation timer waits while frames keep coming: the same x86 stream costs the same
    interrupts, exits and hypercalls under MockClock and under the real clock of a slow, shared
    machine, up to the scheduler's interleaving (bounded here at 2x; counts, not times).  With
    a busy-poll bound of 500 µs of system time the real clock took 4x MockClock's interrupts."""
    from pvio.harness import bench

    async def stream() -> dict[str, int]:
        async with bench.model_env("smartnic", "x86") as env:
            return dict((await bench.run_scenario(env, "stream", packets=1000)).totals)

    mock = trio.run(stream, clock=trio.testing.MockClock(autojump_threshold=0))
    real = trio.run(stream)
    # One DMA per frame: the driver posts twice as many RX buffers as TX buffers, so under
    # MockClock no frame finds the receiver without one.  On the real clock one that does waits
    # in the sender's TX area and costs a second copy; how many depends on how the two vCPUs
    # interleave, so a bound.
    assert mock["copies"] == 1000
    assert 1000 <= real["copies"] <= 2000
    for key in ("interrupts", "exits", "hypercalls"):
        assert real[key] <= 2 * max(1, mock[key]), (key, mock, real)
