"""The two-core figure: one 64-byte UDP stream, guests in the hypervisor's process or their own.

:func:`measure_stream` boots dom0 (netback, switch) and two guests, A sending to B, with
each guest placed by ``placement``:

=================  ===============================================================
``one-process``    A and B are PyGuests in the hypervisor's process (the baseline)
``one-process-polling``  the same, A's and B's netfront busy-polling (:data:`BUSY_POLL`):
                   the baseline for placements whose guests in the hypervisor's process poll
``remote-sender``  A runs in its own process (:class:`~pvio.remote.RemoteGuest`)
``remote-receiver`` B runs in its own process
``remote-both``    A and B each run in their own process; the hypervisor's process
                   keeps netback, the switch and the hypercalls (grant copies)
``driver-domain``  A and B are PyGuests in the hypervisor's process; their vifs'
                   backend is a driver domain in its own process
                   (:mod:`pvio.remote.backend`: netback, the switch, the grant copies).
                   Their backend has a CPU of its own, so both sides busy-poll (netback,
                   and A's and B's netfront): a response or a frame is picked up without a
                   notification, which would cost a wake-up of the other process
=================  ===============================================================

Every guest is the same netfront PyGuest (:class:`~pvio.remote.guests.StreamGuest`), the
frames are built before the clock starts, and every frame B gets is checked to arrive once
and in order; a frame it does not get must be one netback counted as dropped (a receiver in
its own process that falls behind fills netback's RX queue for it).  ``pps`` is frames
delivered to B per wall-clock second (``time.perf_counter``, one clock for every process),
from the first send to the last frame's arrival.  Per-packet counts (per frame sent) come
from the hypervisor's counters and, for remote guests, from their own, taken before and
after the stream.
"""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

import trio

from pvio.core.hypervisor import DEFAULT_DOM0_PAGES, Hypervisor
from pvio.remote.guests import StreamGuest, numbered_frames, receive_numbers
from pvio.remote.host import RemoteGuest

PLACEMENTS: tuple[str, ...] = (
    "one-process", "one-process-polling", "remote-sender", "remote-receiver", "remote-both",
    "driver-domain",
)  # fmt: skip
#: What the benchmark runs: with both guests remote their processes share one CPU and B
#: falls behind (netback drops what its RX queue cannot hold), a figure of overload.
BENCH_PLACEMENTS: tuple[str, ...] = (
    "one-process", "one-process-polling", "remote-sender", "remote-receiver", "driver-domain",
)  # fmt: skip
#: netback's RX queue bounds, in frames and bytes (16 MiB of RX staging pages per vif: 256 k
#: frames of 64 bytes); a receiver that falls further behind sees drops, which are counted.
QUEUE = 1 << 20
QUEUE_BYTES = 16 << 20
KERNEL = "pvio.remote.guests:StreamGuest"
#: The receiver stops once nothing came for this long after its first frame (the rest were
#: dropped on the way, and counted by netback); the clock stops at its last frame.
IDLE_S = 0.5
#: A remote guest's netfront busy-poll budget (empty polls before it re-arms and sleeps):
#: about a batch's interval of polling, so that in a stream the backend need not notify it.
BUSY_POLL = 64


@dataclass
class StreamFigure:
    """One measured stream."""

    placement: str
    packets: int
    seconds: float
    processes: int  # OS processes the stream ran in
    per_packet: dict[str, float] = field(default_factory=dict)
    #: CPU seconds each process spent during the stream (``hypervisor``, ``a``, ``b``).
    cpu_seconds: dict[str, float] = field(default_factory=dict)
    #: Frames A sent (``packets`` is what B got; the difference netback dropped).
    offered: int = 0

    @property
    def dropped(self) -> int:
        """Frames A sent that B never got (netback's RX queue for B was full)."""
        return max(self.offered - self.packets, 0)

    @property
    def cpu_bound_pps(self) -> float:
        """The rate the stream's busiest CPU allows: packets over the CPU time of the
        hypervisor's process or of the guests' processes together (they share the other
        CPUs when pinned), whichever is larger.  What a quiet machine would show, from
        what this run measured of each process, whatever else the machine was doing."""
        host = self.cpu_seconds.get("hypervisor", 0.0)
        guests = sum(v for k, v in self.cpu_seconds.items() if k != "hypervisor")
        busiest = host + guests if self.processes == 1 else max(host, guests)
        return self.packets / busiest if busiest > 0 else float("inf")

    @property
    def pps(self) -> float:
        """Frames delivered per second."""
        return self.packets / self.seconds

    def row(self) -> dict[str, Any]:
        """A JSON row."""
        return {
            "placement": self.placement,
            "processes": self.processes,
            "packets": self.packets,
            "dropped": self.dropped,
            "pps": round(self.pps, 1),
            "cpu_bound_pps": round(self.cpu_bound_pps, 1),
            "cpu_seconds": {k: round(v, 4) for k, v in self.cpu_seconds.items()},
            "per_packet": self.per_packet,
        }


def process_cpu_seconds(pid: int) -> float:
    """CPU seconds process ``pid`` has run so far, all its threads: the scheduler's own
    nanosecond count (``/proc/PID/task/*/schedstat``); where the kernel has no schedstat,
    user + system time from ``/proc/PID/stat`` (clock ticks: 10 ms steps)."""
    try:
        total = 0
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                total += int(f.read().split()[0])
        return total / 1e9
    except (OSError, ValueError, IndexError):
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _cpu_now(guests: list[tuple[str, Any]]) -> dict[str, float]:
    """CPU seconds so far of this process and of each remote guest's (None: absent)."""
    out = {"hypervisor": time.process_time()}
    for name, g in guests:
        if isinstance(g, RemoteGuest) and g.process is not None:
            out[name] = process_cpu_seconds(g.process.pid)
    return out


def _guest(name: str, ip: str, remote: bool, cpus: set[int] | None, poll: bool = False) -> Any:
    if remote:  # it has a CPU of its own: it busy-polls instead of asking to be notified
        return RemoteGuest(KERNEL, name, args={"name": name, "ip": ip, "busy_poll": BUSY_POLL}, cpus=cpus)
    return StreamGuest(name, ip, busy_poll=BUSY_POLL if poll else 0)


def cpu_split() -> tuple[set[int], set[int]] | None:
    """(the hypervisor's CPUs, the remote guests' CPUs): the first CPU this process may use,
    and the others; None on a single CPU."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return None
    return {cpus[0]}, set(cpus[1:])


async def measure_stream(
    placement: str, packets: int = 50_000, *, batch: int = 64, size: int = 64, pin: bool = True
) -> StreamFigure:
    """Run one stream of ``packets`` frames with ``placement`` (see the module doc).

    ``pin``: with remote guests, run the hypervisor's process on one CPU and the guests'
    processes on the others (:func:`cpu_split`), as one pins a vhost-user back end, so that
    waking a guest never preempts the hypervisor; the affinity is restored afterwards."""
    if placement not in PLACEMENTS:
        raise ValueError(f"unknown placement {placement!r}: choose one of {', '.join(PLACEMENTS)}")
    split = cpu_split() if pin and not placement.startswith("one-process") else None
    saved = os.sched_getaffinity(0)
    if split is not None:
        os.sched_setaffinity(0, split[0])
    try:
        return await _measure(placement, packets, batch, size, None if split is None else split[1])
    finally:
        os.sched_setaffinity(0, saved)


async def _driver_network(hv: Hypervisor, guests: list[StreamGuest], cpus: set[int] | None) -> RemoteGuest:
    """The driver-domain placement's network: a driver domain (busy-polling: it has a CPU of
    its own) serving a vif of each guest, every MAC known to its switch."""
    from pvio.remote.backend import start_driver_domain
    from pvio.toolstack import NicConfig, start_network

    driver = await start_driver_domain(
        hv, vifs=len(guests), rx_queue_max=QUEUE, rx_queue_bytes=QUEUE_BYTES, busy_poll=BUSY_POLL, cpus=cpus
    )
    await start_network(hv, guests, nics=[NicConfig(backend_domain=driver)] * len(guests), timeout_s=60.0)
    return driver


async def _measure(
    placement: str, packets: int, batch: int, size: int, guest_cpus: set[int] | None
) -> StreamFigure:
    from pvio.toolstack import dom0_pages_for, start_network

    remote_a = placement in ("remote-sender", "remote-both")
    remote_b = placement in ("remote-receiver", "remote-both")
    in_driver = placement == "driver-domain"
    # dom0 serves no vif when a driver domain does: its default size.
    dom0_pages = DEFAULT_DOM0_PAGES if in_driver else dom0_pages_for(2, QUEUE_BYTES)
    async with Hypervisor(dom0_pages=dom0_pages) as hv:
        poll = placement in ("one-process-polling", "driver-domain")
        a = _guest("a", "10.0.0.1", remote_a, guest_cpus, poll)
        b = _guest("b", "10.0.0.2", remote_b, guest_cpus, poll)
        driver: RemoteGuest | None = None
        if in_driver:
            driver = await _driver_network(hv, [a, b], guest_cpus)
        else:
            await start_network(hv, [a, b], rx_queue_max=QUEUE, rx_queue_bytes=QUEUE_BYTES, timeout_s=60.0)
        a_mac, b_mac = a.nic.mac, b.nic.mac
        if remote_a:
            await a.call("prepare", dst_mac=b_mac.hex(), dst_ip="10.0.0.2", packets=packets, size=size)
        else:
            frames = numbered_frames(a_mac, b_mac, "10.0.0.1", "10.0.0.2", packets, size)
        remote = [(name, g) for name, g in (("a", a), ("b", b)) if isinstance(g, RemoteGuest)]
        child_before = {name: await _child_counters(g) for name, g in remote}
        driver_before = await driver.call("counters") if driver is not None else {}
        processes = [("a", a), ("b", b), ("driver", driver)]
        before = hv.snapshot()
        cpu_before = _cpu_now(processes)
        result: dict[str, Any] = {}
        start = 0.0

        async def receive() -> None:
            if remote_b:
                answer = await b.call("receive", packets=packets, timeout_s=600.0, idle_s=IDLE_S)
            else:
                answer = await receive_numbers(b.nic, packets, 600.0, IDLE_S)
            result.update(answer)

        with trio.fail_after(600):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(receive)
                if remote_b:
                    await trio.sleep(0.05)  # B's receive call is under way before the clock starts
                start = time.perf_counter()
                if remote_a:
                    await a.call("stream", batch=batch)
                else:
                    for i in range(0, packets, batch):
                        await a.nic.send_batch(frames[i : i + batch])
        cpu_after = _cpu_now(processes)
        delivered = int(result["received"])
        seconds = float(result["last_at"]) - start
        diff = hv.snapshot().diff(before)
        driver_diff = _diff(await driver.call("counters"), driver_before) if driver is not None else {}
        # Every frame B got came once and in order; every frame it did not get is one netback
        # counted as dropped (its RX queue was full: B in its own process fell behind).
        netback = driver_diff.get("devices", {}) if driver is not None else diff.devices()
        dropped = sum(v for o, c in netback.items() if o.startswith("netback/") for k, v in c.items()
                      if k.startswith("drops."))  # fmt: skip
        if not result["increasing"] or delivered + dropped != packets or delivered == 0:
            raise AssertionError(
                f"{placement}: B got {delivered} of frames 0..{packets - 1} (in order: "
                f"{result['increasing']}) and netback dropped {dropped}"
            )
        diff = hv.snapshot().diff(before)
        per = {
            "hypercalls.dom0": round(diff["dom0"].get("hypercalls", 0) / packets, 5),
            "interrupts.dom0": round(diff["dom0"].get("interrupts", 0) / packets, 5),
            "grant_copies": round(diff.total("grant.copies", "domain") / packets, 5),
        }
        if driver is not None:  # the backend's counts, from its own process and from the host's
            own = driver_diff["domains"].get(f"dom{driver.domain.domid}", {})
            host = diff[f"dom{driver.domain.domid}"]
            per["grant_copies"] = round(own.get("grant.copies", 0) / packets, 5)
            per["hypercalls.driver"] = round(own.get("hypercalls", 0) / packets, 5)
            per["interrupts.driver"] = round(own.get("interrupts", 0) / packets, 5)
            per["socket_hypercalls.driver"] = round(own.get("hypercalls.remote", 0) / packets, 5)
            per["posted_sends.driver"] = round(own.get("hypercalls.posted", 0) / packets, 5)
            per["host_kick_wakeups.driver"] = round(host.get("remote.kick_wakeups", 0) / packets, 5)
            per["raises.driver"] = round(host.get("remote.raises", 0) / packets, 5)
        for guest, name in ((a, "a"), (b, "b")):
            if isinstance(guest, RemoteGuest):
                now = await _child_counters(guest)
                child = {k: v - child_before[name].get(k, 0) for k, v in now.items()}
                host = diff[f"dom{guest.domain.domid}"]
                per[f"interrupts.{name}"] = round(child.get("interrupts", 0) / packets, 5)
                # What crosses between the processes: socket messages (hypercalls), doorbell
                # rings each way and the wake-ups they cost on each side.
                per[f"socket_hypercalls.{name}"] = round(child.get("hypercalls.remote", 0) / packets, 5)
                per[f"posted_sends.{name}"] = round(child.get("hypercalls.posted", 0) / packets, 5)
                per[f"host_kick_wakeups.{name}"] = round(host.get("remote.kick_wakeups", 0) / packets, 5)
                per[f"raises.{name}"] = round(host.get("remote.raises", 0) / packets, 5)
                per[f"child_upcall_wakeups.{name}"] = round(
                    child.get("remote.upcall_wakeups", 0) / packets, 5
                )
            else:
                per[f"interrupts.{name}"] = round(
                    diff[f"dom{guest.domain.domid}"].get("interrupts", 0) / packets, 5
                )
        cpu = {k: cpu_after[k] - cpu_before[k] for k in cpu_after}
        # B's checks after its last frame (sorting the numbers) are not the stream's work.
        receiver = "b" if remote_b else "hypervisor"
        cpu[receiver] = max(cpu[receiver] - float(result["check_cpu_s"]), 0.0)
        nprocs = 1 + int(remote_a) + int(remote_b) + int(in_driver)
        return StreamFigure(placement, delivered, seconds, nprocs, per, cpu, offered=packets)


def _diff(now: dict[str, Any], before: dict[str, Any]) -> dict[str, dict[str, dict[str, int]]]:
    """Counter snapshots (``Snapshot.as_dict``, a child's) subtracted, kind by kind."""
    out: dict[str, dict[str, dict[str, int]]] = {}
    for kind, owners in now.items():
        if not isinstance(owners, dict):
            continue
        was = before.get(kind, {})
        out[kind] = {
            owner: {k: v - was.get(owner, {}).get(k, 0) for k, v in counts.items()}
            for owner, counts in owners.items()
            if isinstance(counts, dict)
        }
    return out


async def _child_counters(guest: RemoteGuest) -> dict[str, int]:
    """The remote guest's own domain counters, as its process counts them."""
    snap = await guest.call("counters")
    return dict(snap["domains"][f"dom{guest.domain.domid}"])


def run_placements(
    placements: tuple[str, ...] = BENCH_PLACEMENTS, packets: int = 50_000, rounds: int = 1
) -> list[list[StreamFigure]]:
    """``rounds`` rounds, each running every placement once (each in its own ``trio.run``),
    in order: one list of figures per round.  A placement's figures are compared with the
    baselines of the same round (:func:`format_figures`), seconds apart rather than minutes."""
    return [[trio.run(measure_stream, p, packets) for p in placements] for _ in range(rounds)]


def _paired(rounds: list[list[StreamFigure]], placement: str, to: str, cpu: bool = False) -> float | None:
    """The median over the rounds of ``placement``'s rate over ``to``'s in the same round."""
    ratios = []
    for figures in rounds:
        by = {f.placement: f for f in figures}
        if placement in by and to in by:
            f, base = by[placement], by[to]
            ratios.append(f.cpu_bound_pps / base.cpu_bound_pps if cpu else f.pps / base.pps)
    return statistics.median(ratios) if ratios else None


def format_figures(rounds: list[list[StreamFigure]]) -> str:
    """A plain table: per placement the median over the rounds of its rate, and of its
    ratio to the one-process figure (``x1``) and to the one-process figure with polling
    guests (``x1p``) of the same round (the ``x1`` after ``cpu-bound pps``: the ratio of
    the CPU-bound rates); the CPU seconds are the last round's."""

    def ratio(placement: str, to: str, cpu: bool = False) -> str:
        r = _paired(rounds, placement, to, cpu)
        return "-" if r is None else f"{r:.2f}"

    head = f"{'placement':<20} {'procs':>5} {'packets':>8} {'dropped':>8} {'pps':>10} {'x1':>5} {'x1p':>5}"
    lines = [f"{head} {'cpu-bound pps':>14} {'x1':>5}  cpu s"]
    for f in rounds[-1]:
        same = [g for figures in rounds for g in figures if g.placement == f.placement]
        pps = statistics.median(g.pps for g in same)
        cpu_pps = statistics.median(g.cpu_bound_pps for g in same)
        dropped = max(g.dropped for g in same)
        cpu = " ".join(f"{k}={v:.3f}" for k, v in f.cpu_seconds.items())
        lines.append(
            f"{f.placement:<20} {f.processes:>5} {f.packets:>8} {dropped:>8} {pps:>10.0f} "
            f"{ratio(f.placement, 'one-process'):>5} {ratio(f.placement, 'one-process-polling'):>5} "
            f"{cpu_pps:>14.0f} {ratio(f.placement, 'one-process', True):>5}  {cpu}"
        )
    if len(rounds) > 1:
        lines.append(f"medians of {len(rounds)} rounds; each ratio is to the baseline of the same round")
    return "\n".join(lines)


def bench_main(quick: bool = False, as_json: bool = False, rounds: int = 1) -> int:
    """``pvio bench --processes``: ``rounds`` rounds of every placement; a table (or JSON
    rows: one per placement and round, with its ``round``)."""
    import json

    figures = run_placements(packets=5_000 if quick else 50_000, rounds=rounds)
    if as_json:
        rows = [{"round": k, **f.row()} for k, fs in enumerate(figures) for f in fs]
        print(json.dumps(rows, indent=1))
    else:
        print(format_figures(figures))
    return 0
