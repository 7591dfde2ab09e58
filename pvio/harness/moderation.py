"""The smart NIC's interrupt moderation at a low offered load: interrupts per packet against added latency.

A one-way stream of ``rate`` frames per second finds the receiver idle before every frame, so
one interrupt per frame is the price of delivering each frame at once; fewer interrupts mean
holding frames back until ``frames`` have gathered or ``usecs`` have passed, i.e. adding up to
the gap between frames (1 ms at 1,000 per second) per frame held.  :func:`curve` measures that
trade-off over moderation settings: for each it boots two PyGuests with smart NICs (the
receiver's card programmed with the setting), streams ``packets`` frames paced at ``rate``
from A to B, and reports B's interrupts per packet and the latency moderation added.

Runs under trio's MockClock by default, where the simulator takes no time: a frame's latency
(trio time from A's send to B's application receiving it) is then exactly the latency the
moderation setting added, and the counts are reproducible.  ``real_clock=True`` measures the
same on the wall clock (latency then includes the host's processing, and varies).

``python -m pvio.harness.moderation`` prints the table (``--markdown``, ``--json``) and
``--chart PATH`` draws the curve (matplotlib), the adaptive default's point marked.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import trio
import trio.testing

from pvio.abi.smartnic import MOD_ADAPTIVE, MOD_FIXED, MOD_OFF
from pvio.harness import bench

#: (label, (mode, frames, usecs)): the adaptive default, no moderation, then fixed settings that
#: coalesce 2, 4, 8 and 16 frames at 1,000 per second (the timer just past the group's span), and
#: two timers shorter than the gap (they add latency and save nothing: the dominated points).
SETTINGS: tuple[tuple[str, tuple[int, int, int]], ...] = (
    ("adaptive (default)", (MOD_ADAPTIVE, 1, 0)),
    ("off", (MOD_OFF, 1, 0)),
    ("fixed 2 frames / 1500 µs", (MOD_FIXED, 2, 1500)),
    ("fixed 4 frames / 3500 µs", (MOD_FIXED, 4, 3500)),
    ("fixed 8 frames / 7500 µs", (MOD_FIXED, 8, 7500)),
    ("fixed 16 frames / 15500 µs", (MOD_FIXED, 16, 15500)),
    ("fixed 64 frames / 200 µs", (MOD_FIXED, 64, 200)),
    ("fixed 64 frames / 1500 µs", (MOD_FIXED, 64, 1500)),
)


@dataclass(frozen=True)
class Point:
    """One moderation setting's cost at the offered load."""

    label: str
    moderation: tuple[int, int, int]
    rate: float
    packets: int
    interrupts: int  # every domain's interrupts over the stream (the receiver's: A takes none)
    exits: int  # every domain's exits over the stream
    mean_added_us: float  # mean over frames of (B's application receives it) - (A sent it)
    max_added_us: float

    @property
    def interrupts_per_packet(self) -> float:
        return self.interrupts / self.packets

    def row(self) -> dict[str, Any]:
        return {
            "setting": self.label,
            "moderation": list(self.moderation),
            "rate": self.rate,
            "packets": self.packets,
            "interrupts": self.interrupts,
            "exits": self.exits,
            "interrupts_per_packet": round(self.interrupts_per_packet, 4),
            "mean_added_latency_us": round(self.mean_added_us, 1),
            "max_added_latency_us": round(self.max_added_us, 1),
        }


async def measure(label: str, moderation: tuple[int, int, int], rate: float, packets: int) -> Point:
    """One point: boot, stream ``packets`` frames at ``rate`` from A to B, count and time them."""
    async with bench.model_env("smartnic", moderation=moderation) as env:
        a, b = env.guests[0], env.guests[1]
        frames = bench.make_frames(a, b, packets, bench.FRAME_SIZE, bench.STREAM_PORTS)
        sent_at = [0.0] * packets
        arrived_at = [0.0] * packets
        got = 0
        await trio.sleep(moderation[2] * 1e-6)  # boot's frames may wait for this setting's timer
        await bench.settle()
        before = env.snapshot()

        async def receive() -> None:
            nonlocal got
            while got < packets:
                for frame in await b.nic.recv_batch(packets - got):
                    arrived_at[bench.seq_of(frame)] = trio.current_time()
                    got += 1

        with trio.fail_after(60 + packets / rate):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(receive)
                t0 = trio.current_time()
                for k, frame in enumerate(frames):
                    await trio.sleep_until(t0 + k / rate)
                    sent_at[k] = trio.current_time()
                    await a.nic.send(frame)
            await bench.settle()
        diff = env.snapshot().diff(before)
    added = [(arrived_at[k] - sent_at[k]) * 1e6 for k in range(packets)]
    return Point(
        label,
        moderation,
        rate,
        packets,
        bench.costs(diff)["interrupts"],
        bench.costs(diff)["exits"],
        statistics.fmean(added),
        max(added),
    )


def curve(
    settings: Sequence[tuple[str, tuple[int, int, int]]] = SETTINGS,
    *,
    rate: float = 1000.0,
    packets: int = 200,
    real_clock: bool = False,
) -> list[Point]:
    """Every setting's point, each in its own ``trio.run`` (MockClock unless ``real_clock``)."""
    points = []
    for label, moderation in settings:
        clock = None if real_clock else trio.testing.MockClock(autojump_threshold=0)
        points.append(trio.run(measure, label, moderation, rate, packets, clock=clock))
    return points


def format_markdown(points: Sequence[Point]) -> str:
    """The curve as a Markdown table."""
    lines = [
        "| setting (receiver's card) | interrupts/pkt | mean added latency µs | max added latency µs |",
        "|---|---|---|---|",
    ]
    for p in points:
        lines.append(
            f"| {p.label} | {p.interrupts_per_packet:.3f} | {p.mean_added_us:.0f} | {p.max_added_us:.0f} |"
        )
    return "\n".join(lines)


def write_chart(points: Sequence[Point], path: str) -> None:
    """Interrupts per packet (y) against mean added latency (x), the adaptive default marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    xy = {p.label: (p.mean_added_us / 1000, p.interrupts_per_packet) for p in points}

    # The efficient frontier: no other point has both fewer interrupts and less added latency.
    def dominated(v: tuple[float, float]) -> bool:
        return any(o != v and o[0] <= v[0] and o[1] <= v[1] for o in xy.values())

    frontier = sorted(v for v in xy.values() if not dominated(v))
    ax.plot(*zip(*frontier, strict=True), color="tab:blue", alpha=0.4, zorder=1)
    taken: dict[tuple[float, float], int] = {}
    for p in points:
        x, y = xy[p.label]
        default = p.moderation[0] == MOD_ADAPTIVE
        on_frontier = (x, y) in frontier
        ax.scatter(x, y, marker="*" if default else "o", s=260 if default else 40, zorder=3,
                   color="tab:red" if default else "tab:blue" if on_frontier else "tab:gray")  # fmt: skip
        nth = taken.get((x, y), 0)  # points at the same place: labels stacked under each other
        taken[(x, y)] = nth + 1
        dy = 4 - 11 * nth if on_frontier else -14 - 11 * nth  # dominated points: labels below
        ax.annotate(p.label, (x, y), textcoords="offset points", xytext=(8, dy), fontsize=8,
                    color="tab:red" if default else "black" if on_frontier else "dimgray")  # fmt: skip
    rate = points[0].rate if points else 0
    ax.set_xlabel("mean added latency per frame (ms)")
    ax.set_ylabel("interrupts per packet")
    ax.set_title(f"Smart NIC moderation, one-way stream at {rate:g} frames/s (MockClock)")
    ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    """Print the moderation trade-off at a low load (``--markdown``, ``--json``, ``--chart PATH``)."""
    parser = argparse.ArgumentParser(prog="python -m pvio.harness.moderation", description=main.__doc__)
    parser.add_argument("--rate", type=float, default=1000.0, help="offered load, frames/s (default 1000)")
    parser.add_argument("--packets", type=int, default=200, help="frames per setting (default 200)")
    parser.add_argument("--real-clock", action="store_true", help="wall clock instead of MockClock")
    parser.add_argument("--markdown", action="store_true", help="print a Markdown table")
    parser.add_argument("--json", action="store_true", help="print the points as JSON")
    parser.add_argument("--chart", metavar="PATH", help="write a PNG chart (needs matplotlib)")
    args = parser.parse_args(argv)
    if args.rate <= 0 or args.packets < 1:
        parser.error("--rate must be > 0 and --packets >= 1")
    points = curve(rate=args.rate, packets=args.packets, real_clock=args.real_clock)
    if args.json:
        print(json.dumps([p.row() for p in points], indent=1))
    elif args.markdown:
        print(format_markdown(points))
    else:
        for p in points:
            print(
                f"{p.label:28s} {p.interrupts_per_packet:6.3f} irq/pkt  "
                f"+{p.mean_added_us:7.0f} µs mean  +{p.max_added_us:7.0f} µs max"
            )
    if args.chart:
        write_chart(points, args.chart)
        print(f"chart written to {args.chart}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
