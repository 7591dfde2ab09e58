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
  one interrupt, and a back-to-back ping-pong stays inside both polling windows.

Ordering (per packet): exits emulated > pv > smartnic in both scenarios; interrupts
emulated > pv > smartnic in the stream only -- in ping-pong PV's interrupts exceed the
emulated NIC's, because dom0's netback takes one per frame on top of the guests'.
"""

from __future__ import annotations

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
            {"interrupts": 2, "exits": 5, "hypercalls": 4, "copies": 120},
            {"dom0": (0, 0, 0), "a": (1, 3, 2), "b": (1, 2, 2)},
        ),
    },
    ("pingpong", 20): {
        "emulated": (
            {"interrupts": 59, "exits": 1674, "hypercalls": 78, "copies": 80},
            {"dom0": (0, 0, 0), "a": (30, 838, 40), "b": (29, 836, 38)},
        ),
        "pv": (
            {"interrupts": 121, "exits": 402, "hypercalls": 402, "copies": 80},
            {"dom0": (40, 200, 200), "a": (41, 102, 102), "b": (40, 100, 100)},
        ),
        "smartnic": (
            {"interrupts": 4, "exits": 12, "hypercalls": 8, "copies": 80},
            {"dom0": (0, 0, 0), "a": (2, 6, 4), "b": (2, 6, 4)},
        ),
    },
}
