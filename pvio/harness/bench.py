"""The device-model comparison: environments, traffic scenarios, per-packet costs, ``pvio bench``.

One machinery serves the pytest plugin (:mod:`pvio.harness.pytest_plugin`), the tests and the
``pvio bench`` command, so a figure in the README, a pinned count in a test and a user's
benchmark are computed the same way.

- :func:`model_env` boots a hypervisor, the switch and ``n_guests`` guests, each with one
  NIC of the chosen model: ``"emulated"`` (trap-and-emulate register NIC,
  ``backends/emulated_nic.py``), ``"pv"`` (netfront/netback through dom0) or
  ``"smartnic"`` (DMA descriptors, the monitor does the I/O, ``backends/smartnic.py``).
  Guests come from a guest kind (:func:`register_guest_kind`): ``"py"`` (PyGuests) and
  ``"x86"`` (pvio's C guest kernel in ``mode=bench``, ``cpu/bench_guest.py``: its guests make
  their traffic themselves, through ``native_scenario``).
- :func:`run_scenario` runs a fixed traffic pattern from the first guest (A) to the second
  (B) and returns a :class:`ScenarioResult`: counters of the traffic phase per packet
  delivered end to end, packets per second and, for ping-pong, latency.

Scenarios
---------
``stream``: A sends ``packets`` UDP frames of ``frame_size`` bytes to B; B receives them
all.  ``offered_load=None`` is saturation (A sends batches of ``batch`` as fast as its
driver takes them); a number is a paced load in packets per second (at each wake-up A
sends every frame whose time has come, then sleeps until the next one's).
``pingpong``: A sends one frame to B and waits for B's echo (MACs swapped) before the next;
``packets`` round trips, ``2 * packets`` frames delivered.  ``offered_load`` paces the round
trips (trips per second); ``None`` is back to back.

What is counted
---------------
The counters of every domain (dom0 included: the PV model's backend work is paid there)
and every device, from just before the first frame to the moment the system is quiet after
the last one (moderation timers included), divided by frames delivered end to end:
``interrupts`` (upcalls taken), ``exits`` (hypercalls + port I/O + MMIO), ``hypercalls``,
``copies`` (frame copies made outside the guests: grant-copy elements for PV, DMA
transfers for the smart NIC, device-buffer transfers for the emulated NIC).  ``pps`` and
``latency_us`` are wall-clock (``time.perf_counter``) whatever trio's clock: under
MockClock they measure the simulator, and pacing sleeps cost no wall time.  Under
MockClock the counts are exactly reproducible; with the real clock they vary a little.
"""

from __future__ import annotations

import functools
import json
import math
import statistics
import struct
import sys
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

import trio
import trio.testing

from pvio.core.counters import Snapshot
from pvio.core.hypervisor import Hypervisor
from pvio.toolstack import FRAME_LIMITS, MODELS

SCENARIOS: tuple[str, ...] = ("stream", "pingpong")
FRAME_SIZE = 64
BATCH = 64
SEQ = struct.Struct("!I")
SEQ_OFFSET = 14 + 20 + 8  # Ethernet + IPv4 + UDP headers: the sequence number opens the payload
STREAM_PORTS = (5000, 9)
PINGPONG_PORTS = (40000, 7)


class GuestNic(Protocol):
    """What a scenario needs of a guest's NIC driver (netfront's API, which every driver offers)."""

    mac: bytes

    async def send_batch(self, frames: list[Any]) -> None: ...

    async def send(self, frame: Any) -> None: ...

    async def recv(self) -> bytes: ...

    async def recv_batch(self, max_frames: int = 256) -> list[bytes]: ...

    def pending(self) -> int: ...


class BenchGuest(Protocol):
    """A guest kernel of a scenario: ``nic`` once ``ready`` is set; ``spawn`` runs a task inside it."""

    name: str | None
    ip: str
    nic: GuestNic
    ready: trio.Event

    def spawn(self, fn: Callable[..., Any], *args: Any, name: str | None = None) -> None: ...


#: A guest kind: (name, model, ip, options) -> a guest kernel with one NIC of that model.
GuestFactory = Callable[[str, str, str, dict[str, Any]], Any]
GUEST_KINDS: dict[str, GuestFactory] = {}
#: The options each guest kind's factory takes (None: the kind did not say; not checked).
GUEST_OPTIONS: dict[str, frozenset[str] | None] = {}


def register_guest_kind(kind: str, factory: GuestFactory, options: Sequence[str] | None = None) -> None:
    """Make ``kind`` available to :func:`model_env` (the x86 guest kernel registers ``"x86"``);
    ``options`` names the options its factory takes, so a misspelt one is refused."""
    GUEST_KINDS[kind] = factory
    GUEST_OPTIONS[kind] = None if options is None else frozenset(options)


def _py_guest(name: str, model: str, ip: str, options: dict[str, Any]) -> Any:
    from pvio.frontends.guests import ModelGuest

    return ModelGuest(name, ip, model, **options)


register_guest_kind("py", _py_guest, ("use_mmio", "moderation"))


def _x86_guest(name: str, model: str, ip: str, options: dict[str, Any]) -> Any:
    """pvio's C guest kernel in ``mode=bench`` on the emulated vCPU (``cpu/bench_guest.py``)."""
    from pvio.cpu.bench_guest import x86_bench_guest

    return x86_bench_guest(name, model, ip, options)


register_guest_kind("x86", _x86_guest, ("use_mmio", "moderation", "spin", "cmdline"))


def _linux_guest(name: str, model: str, ip: str, options: dict[str, Any]) -> Any:
    """Debian's Linux with its own xen-netfront, PV model only (``cpu/linux.py``)."""
    from pvio.cpu.linux import linux_bench_guest

    return linux_bench_guest(name, model, ip, options)


register_guest_kind("linux", _linux_guest)


@dataclass
class ModelEnv:
    """What :func:`model_env` booted: the hypervisor, the switch, the guests, the model's devices."""

    hv: Hypervisor
    switch: Any
    model: str
    guest_kind: str
    guests: list[Any]
    devices: list[Any] = field(default_factory=list)
    netback: Any = None

    def snapshot(self) -> Snapshot:
        """Every domain's and device's counters, frozen."""
        return self.hv.snapshot()

    def domain_names(self) -> dict[str, str]:
        """Counter owner -> guest name (``dom1`` -> ``a``)."""
        return {f"dom{d.domid}": d.name for d in self.hv.domains.values()}


#: The most guests :func:`model_env` boots: their addresses are 10.0.0.1 .. 10.0.0.254.
MAX_GUESTS = 254


def _ip(index: int) -> str:
    return f"10.0.0.{index + 1}"


def guest_name(index: int) -> str:
    """Guest ``index``'s name: ``a`` .. ``z``, then ``g26``, ``g27``, ..."""
    return chr(ord("a") + index) if index < 26 else f"g{index}"


@asynccontextmanager
async def model_env(
    model: str = "pv",
    guest: str = "py",
    *,
    n_guests: int = 2,
    timeout_s: float = 10.0,
    backend: str | None = None,
    backend_options: dict[str, Any] | None = None,
    trace: str | None = None,
    dom0_pages: int | None = None,
    **options: Any,
) -> AsyncIterator[ModelEnv]:
    """Boot a hypervisor whose ``n_guests`` guests (``a``, ``b``, ... :func:`guest_name`; up to
    :data:`MAX_GUESTS`) each have one NIC of ``model``.

    The guests are connected and their MACs learned by the switch (each sends one frame to
    itself, which the switch learns from and drops), and the system is quiet when this
    yields.  ``options`` go to the guest kind (``moderation=(mode, frames, usecs)`` for
    the smart NIC driver, ``use_mmio=True`` for the emulated NIC driver); an option the kind
    does not take is refused (TypeError).  ``backend``/``backend_options`` give the PV vifs
    a custom backend (a ``pvio.backends`` entry point); ``trace`` records the whole run,
    boot included, as a Perfetto trace file (:mod:`pvio.core.trace`).  ``dom0_pages`` sizes
    dom0; None sizes it for the PV vifs (:func:`pvio.toolstack.dom0_pages_for`: 512 staging
    pages each), and a dom0 too small for them is refused in one line
    (:class:`pvio.toolstack.Dom0TooSmall`).
    """
    if not 1 <= n_guests <= MAX_GUESTS:
        raise ValueError(f"n_guests={n_guests}: model_env boots 1..{MAX_GUESTS} guests")
    if model not in MODELS:
        raise ValueError(f"unknown device model {model!r}: choose one of {', '.join(MODELS)}")
    factory = GUEST_KINDS.get(guest)
    if factory is None:
        raise NotImplementedError(
            f"guest kind {guest!r} is not available (known: {', '.join(sorted(GUEST_KINDS))}); "
            "x86 guests register themselves once the x86 guest kernel and its NIC drivers exist "
            "(docs/devices.md)"
        )
    allowed = GUEST_OPTIONS.get(guest)
    unknown = sorted(set(options) - allowed) if allowed is not None else []
    if allowed is not None and unknown:
        common = {"backend", "backend_options", "dom0_pages", "n_guests", "timeout_s", "trace"}
        valid = ", ".join(sorted(allowed | common))
        raise TypeError(f"pvio_env({model!r}, guest={guest!r}): unknown option(s) {unknown}; valid: {valid}")
    if (backend is not None or backend_options is not None) and model != "pv":
        raise ValueError(f"a backend serves PV vifs; {model} NICs have none (backend={backend!r})")
    from contextlib import nullcontext

    from pvio.toolstack import dom0_pages_for, start_network

    pages = dom0_pages_for(n_guests if model == "pv" else 0) if dom0_pages is None else dom0_pages
    async with Hypervisor(dom0_pages=pages) as hv:
        with hv.trace(trace) if trace is not None else nullcontext():
            kernels = [factory(guest_name(i), model, _ip(i), options) for i in range(n_guests)]
            net = await start_network(
                hv, kernels, model=model, backend=backend, backend_options=backend_options,
                settle_s=0.001, timeout_s=timeout_s,
            )  # fmt: skip
            yield ModelEnv(hv, net.switch, model, guest, net.guests, net.devices, net.netback)


async def settle() -> None:
    """Run until the system is quiet, moderation timers included (instant under MockClock)."""
    await trio.testing.wait_all_tasks_blocked()
    await trio.sleep(0.001)
    await trio.testing.wait_all_tasks_blocked()


# ---------------------------------------------------------------------- scenarios
def make_frames(
    src: Any, dst: Any, count: int, size: int, ports: tuple[int, int], start: int = 0
) -> list[bytes]:
    """``count`` UDP frames of ``size`` bytes from ``src`` to ``dst``, numbered from ``start``."""
    from pvio.frontends.netstack import udp_packet

    pad = size - SEQ_OFFSET - SEQ.size
    if pad < 0:
        raise ValueError(f"a scenario frame needs at least {SEQ_OFFSET + SEQ.size} bytes, not {size}")
    # Without a UDP checksum the frames differ only in the sequence number (the IPv4 header's
    # checksum does not cover the payload): one frame built, the others patched from it.
    template = udp_packet(
        src.nic.mac, dst.nic.mac, src.ip, dst.ip, *ports, SEQ.pack(start) + bytes(pad), checksum=False
    )
    head, tail = template[:SEQ_OFFSET], template[SEQ_OFFSET + SEQ.size :]
    return [head + SEQ.pack(start + i) + tail for i in range(count)]


def seq_of(frame: bytes) -> int:
    """The sequence number of a frame made by :func:`make_frames`."""
    return int(SEQ.unpack_from(frame, SEQ_OFFSET)[0])


COST_KEYS: tuple[str, ...] = ("interrupts", "exits", "hypercalls", "copies")


def costs(diff: Snapshot) -> dict[str, int]:
    """The four comparison totals of a counter diff (see the module docstring)."""
    return {
        "interrupts": diff.total("interrupts", "domain"),
        "exits": diff.total("exits", "domain"),
        "hypercalls": diff.total("hypercalls", "domain"),
        "copies": diff.total("grant.copies", "domain") + diff.total("copies", "device"),
    }


def per_domain(diff: Snapshot, names: dict[str, str]) -> dict[str, dict[str, int]]:
    """Interrupts, exits and hypercalls of each domain in ``diff``, by guest name."""
    return {
        names.get(owner, owner): {k: c.get(k, 0) for k in ("interrupts", "exits", "hypercalls")}
        for owner, c in diff.domains().items()
    }


@dataclass
class ScenarioResult:
    """One scenario run: what was offered, what was delivered, and what it cost."""

    model: str
    guest: str
    scenario: str
    offered_load: float | None
    frame_size: int
    packets: int  # frames delivered end to end
    seconds: float  # wall-clock duration of the traffic phase
    totals: dict[str, int]
    by_domain: dict[str, dict[str, int]]
    latency_us: float | None = None
    diff: Snapshot | None = None

    @property
    def per_packet(self) -> dict[str, float]:
        """Each total divided by the frames delivered end to end."""
        return {k: self.totals[k] / self.packets for k in COST_KEYS}

    @property
    def pps(self) -> float:
        """Frames delivered per wall-clock second."""
        return self.packets / self.seconds if self.seconds > 0 else math.inf

    @property
    def load(self) -> str:
        """The offered load as a label: ``saturation`` / ``back-to-back`` or ``<n> pps``."""
        if self.offered_load is None:
            return "saturation" if self.scenario == "stream" else "back-to-back"
        return f"{self.offered_load:g} pps"

    def row(self) -> dict[str, Any]:
        """The JSON row of ``pvio bench --json`` and of the pytest summary."""
        pp = self.per_packet
        return {
            "model": self.model,
            "guest": self.guest,
            "scenario": self.scenario,
            "offered_load": self.offered_load,
            "load": self.load,
            "frame_size": self.frame_size,
            "packets": self.packets,
            "pps": round(self.pps, 1) if math.isfinite(self.pps) else None,
            "latency_us": None if self.latency_us is None else round(self.latency_us, 1),
            "per_packet": {k: round(pp[k], 5) for k in COST_KEYS},
            "totals": dict(self.totals),
            "by_domain": self.by_domain,
        }


async def run_scenario(
    env: ModelEnv,
    scenario: str,
    *,
    packets: int = 1000,
    frame_size: int = FRAME_SIZE,
    offered_load: float | None = None,
    batch: int = BATCH,
    timeout_s: float = 60.0,
) -> ScenarioResult:
    """Run ``scenario`` ("stream" or "pingpong") from guest A to guest B of ``env`` (see the module doc)."""
    if scenario not in SCENARIOS:
        raise ValueError(f"unknown scenario {scenario!r}: choose one of {', '.join(SCENARIOS)}")
    if packets < 1 or (offered_load is not None and offered_load <= 0):
        raise ValueError(f"packets must be >= 1 and offered_load > 0 (got {packets}, {offered_load})")
    low, high = FRAME_LIMITS[env.model]
    if not low <= frame_size <= high:
        raise ValueError(f"frame_size={frame_size}: {env.model} NICs carry frames of {low}..{high} bytes")
    a, b = env.guests[0], env.guests[1]
    await settle()
    before = env.snapshot()
    latency: float | None = None
    native = getattr(a, "native_scenario", None)  # a guest kind whose guests make their own traffic
    with trio.fail_after(timeout_s):
        if native is not None:
            delivered, seconds, latency = await native(scenario, b, packets, frame_size, offered_load, batch)
        elif scenario == "stream":
            delivered, seconds = await _stream(a, b, packets, frame_size, offered_load, batch)
        else:
            delivered, seconds, latency = await _pingpong(a, b, packets, frame_size, offered_load)
        await settle()
    diff = env.snapshot().diff(before)
    by_domain = per_domain(diff, env.domain_names())
    return ScenarioResult(
        env.model,
        env.guest_kind,
        scenario,
        offered_load,
        frame_size,
        delivered,
        seconds,
        costs(diff),
        by_domain,
        latency,
        diff,
    )


async def send_all(a: Any, frames: list[bytes], offered_load: float | None, batch: int) -> None:
    """A sends ``frames``: in batches of ``batch`` at saturation, or paced at ``offered_load``
    frames per second (at each wake-up every frame whose time has come)."""
    packets = len(frames)
    if offered_load is None:
        for i in range(0, packets, batch):
            await a.nic.send_batch(frames[i : i + batch])
        return
    t0 = trio.current_time()
    sent = 0
    while sent < packets:
        next_at = t0 + sent / offered_load  # when frame `sent` is due
        if trio.current_time() < next_at:
            await trio.sleep_until(next_at)
        due = math.floor((trio.current_time() - t0) * offered_load + 1e-9) + 1
        upto = min(packets, sent + batch, max(sent + 1, due))
        await a.nic.send_batch(frames[sent:upto])
        sent = upto


async def stream_frames(
    a: Any, b: Any, frames: list[bytes], offered_load: float | None, batch: int, wait_s: float = math.inf
) -> list[bytes]:
    """A sends ``frames`` to B (see :func:`send_all`); returns what B received, waiting at
    most ``wait_s`` (of trio's clock) for the rest."""
    packets = len(frames)
    received: list[bytes] = []

    async def receive() -> None:
        while len(received) < packets:
            received.extend(await b.nic.recv_batch(packets - len(received)))

    with trio.move_on_after(wait_s):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(receive)
            await send_all(a, frames, offered_load, batch)
    return received


async def stream_in_order(a: Any, b: Any, frames: list[bytes], offered_load: float | None, batch: int) -> int:
    """A sends ``frames`` to B, which checks each batch it receives against the frames due next
    (every byte, in order) and keeps none of them, as a streaming receiver does: how many came.

    Raises AssertionError at the first frame that is not the one expected.
    """
    packets = len(frames)
    got = 0

    async def receive() -> None:
        nonlocal got
        while got < packets:
            batch_in = await b.nic.recv_batch(packets - got)
            if batch_in != frames[got : got + len(batch_in)]:
                bad = next(i for i, f in enumerate(batch_in) if got + i >= packets or f != frames[got + i])
                raise AssertionError(f"stream: B's frame {got + bad} is not the frame A sent as {got + bad}")
            got += len(batch_in)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(receive)
        await send_all(a, frames, offered_load, batch)
    return got


async def _stream(
    a: Any, b: Any, packets: int, size: int, offered_load: float | None, batch: int
) -> tuple[int, float]:
    frames = make_frames(a, b, packets, size, STREAM_PORTS)
    start = time.perf_counter()
    delivered = await stream_in_order(a, b, frames, offered_load, batch)
    seconds = time.perf_counter() - start
    return delivered, seconds


@dataclass
class Trips:
    """What a ping-pong measured: round-trip times (wall clock), trips lost, wrong answers."""

    rtts: list[float] = field(default_factory=list)
    lost: int = 0
    wrong: list[int] = field(default_factory=list)


async def pingpong_trips(
    a: Any, b: Any, requests: list[bytes], offered_load: float | None, wait_s: float = math.inf
) -> Trips:
    """A sends each request and waits (at most ``wait_s`` of trio's clock) for B's echo (MACs
    swapped) before the next; ``offered_load`` paces the trips per second."""
    scope = trio.CancelScope()

    async def echo() -> None:
        with scope:
            while True:
                frames = await b.nic.recv_batch()
                await b.nic.send_batch([f[6:12] + f[0:6] + f[12:] for f in frames])

    b.spawn(echo, name="pingpong-echo")
    out = Trips()
    t0 = trio.current_time()
    try:
        for k, request in enumerate(requests):
            if offered_load is not None:
                await trio.sleep_until(t0 + k / offered_load)
            sent_at = time.perf_counter()
            await a.nic.send(request)
            answer = None
            with trio.move_on_after(wait_s):
                answer = await a.nic.recv()
            if answer is None:
                out.lost += 1
                continue
            out.rtts.append(time.perf_counter() - sent_at)
            if answer[12:] != request[12:] or answer[0:6] != request[6:12]:
                out.wrong.append(k)
    finally:
        scope.cancel()
    return out


async def _pingpong(
    a: Any, b: Any, trips: int, size: int, offered_load: float | None
) -> tuple[int, float, float]:
    requests = make_frames(a, b, trips, size, PINGPONG_PORTS)
    start = time.perf_counter()
    out = await pingpong_trips(a, b, requests, offered_load)
    seconds = time.perf_counter() - start
    if out.wrong:
        raise AssertionError(f"ping-pong trip {out.wrong[0]}: the answer is not the echo of the request")
    return 2 * trips, seconds, statistics.median(out.rtts) * 1e6


# ---------------------------------------------------------------------- the comparison table
@dataclass(frozen=True)
class Case:
    """One line of the comparison: a scenario at an offered load, with its packet count."""

    scenario: str
    offered_load: float | None
    packets: int


#: ``pvio bench``'s plan: each case runs once per model on a freshly booted environment.
BENCH_PLAN: tuple[Case, ...] = (
    Case("stream", 1_000, 200),
    Case("stream", 10_000, 1_000),
    Case("stream", None, 30_000),
    Case("pingpong", 1_000, 200),
    Case("pingpong", None, 500),
)

#: The x86 guests' plan (``--guest x86``, and the x86 rows of the default table): the same loads
#: as BENCH_PLAN (the bench app paces itself with set_timer_op / VIRQ_TIMER, whose costs are in
#: its counts), fewer packets where the emulated CPU is the bottleneck.
X86_PLAN: tuple[Case, ...] = (
    Case("stream", 1_000, 200),
    Case("stream", 10_000, 1_000),
    Case("stream", None, 1_000),
    Case("pingpong", 1_000, 100),
    Case("pingpong", None, 100),
)
PLANS: dict[str, tuple[Case, ...]] = {"py": BENCH_PLAN, "x86": X86_PLAN}


async def run_case(model: str, case: Case, guest: str = "py", **options: Any) -> ScenarioResult:
    """Boot a fresh environment for ``model`` and run ``case`` in it."""
    async with model_env(model, guest, **options) as env:
        return await run_scenario(env, case.scenario, packets=case.packets, offered_load=case.offered_load)


def run_plan(
    plan: Sequence[Case] = BENCH_PLAN,
    models: Sequence[str] = MODELS,
    *,
    guest: str = "py",
    mock_clock: bool = False,
    progress: Callable[[str], None] | None = None,
) -> list[ScenarioResult]:
    """Every case of ``plan`` for every model, each in its own ``trio.run``."""
    results = []
    for case in plan:
        for model in models:
            if progress is not None:
                progress(f"{guest} {model} {case.scenario} {case.offered_load or 'max'}")
            clock = trio.testing.MockClock(autojump_threshold=0) if mock_clock else None
            results.append(trio.run(run_case, model, case, guest, clock=clock))
    return results


def _fmt(x: float) -> str:
    if x == 0:
        return "0"
    if x >= 100:
        return f"{x:.0f}"
    if x >= 1:
        return f"{x:.2f}"
    return f"{x:.4f}"


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """A fixed-width table of result rows (as :meth:`ScenarioResult.row` makes them)."""
    head: tuple[str, ...] = ("model", "guest", "scenario", "load", "packets", "int/pkt", "exits/pkt")
    head += ("hcalls/pkt", "copies/pkt", "pps", "latency µs")
    lines: list[tuple[str, ...]] = [head]
    for r in rows:
        pp = r["per_packet"]
        lines.append(
            (
                r["model"],
                r["guest"],
                r["scenario"],
                r["load"],
                str(r["packets"]),
                _fmt(pp["interrupts"]),
                _fmt(pp["exits"]),
                _fmt(pp["hypercalls"]),
                _fmt(pp["copies"]),
                "-" if r["pps"] is None else f"{r['pps']:.0f}",
                "-" if r["latency_us"] is None else f"{r['latency_us']:.0f}",
            )
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    out = []
    for n, line in enumerate(lines):
        out.append(
            "  ".join(
                cell.ljust(w) if i < 4 else cell.rjust(w)
                for i, (cell, w) in enumerate(zip(line, widths, strict=True))
            )
        )
        if n == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def format_markdown(rows: Sequence[dict[str, Any]]) -> str:
    """The same table in Markdown (for the README)."""
    out = [
        "| model | guest | scenario | offered load | packets | interrupts/pkt | exits/pkt | hypercalls/pkt "
        "| copies/pkt | pps | latency µs |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        pp = r["per_packet"]
        pps = "-" if r["pps"] is None else f"{r['pps']:.0f}"
        lat = "-" if r["latency_us"] is None else f"{r['latency_us']:.0f}"
        out.append(
            f"| {r['model']} | {r['guest']} | {r['scenario']} | {r['load']} | {r['packets']} | "
            f"{_fmt(pp['interrupts'])} | "
            f"{_fmt(pp['exits'])} | {_fmt(pp['hypercalls'])} | {_fmt(pp['copies'])} | {pps} | {lat} |"
        )
    return "\n".join(out)


def write_chart(rows: Sequence[dict[str, Any]], path: str) -> None:
    """A PNG: interrupts and exits per packet by model and offered load (needs matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit(
            "pvio bench --chart needs matplotlib: pip install 'pvio[chart]' (or run `make chart`)"
        ) from None
    guests = sorted({r["guest"] for r in rows})

    def label_of(r: dict[str, Any]) -> str:
        return f"{r['scenario']}\n{r['load']}" + (f"\n{r['guest']} guests" if len(guests) > 1 else "")

    cases: list[str] = []
    for r in rows:
        label = label_of(r)
        if label not in cases:
            cases.append(label)
    models = [m for m in MODELS if any(r["model"] == m for r in rows)]
    colours = {"emulated": "#c0392b", "pv": "#2e86c1", "smartnic": "#27ae60"}
    floor = 1e-4  # log axes cannot show 0: a zero is drawn at the floor and labelled "0"
    fig, axes = plt.subplots(1, 2, figsize=(13 + 1.2 * max(0, len(cases) - 5), 5))
    width = 0.8 / max(1, len(models))
    for ax, key, title in zip(
        axes, ("interrupts", "exits"), ("interrupts per packet", "exits per packet"), strict=True
    ):
        for j, model in enumerate(models):
            values = []
            for label in cases:
                match = [r for r in rows if r["model"] == model and label_of(r) == label]
                values.append(match[0]["per_packet"][key] if match else float("nan"))
            xs = [i + (j - (len(models) - 1) / 2) * width for i in range(len(cases))]
            bars = ax.bar(xs, [max(v, floor) for v in values], width, label=model, color=colours.get(model))
            for bar, v in zip(bars, values, strict=True):
                if not math.isnan(v):
                    ax.annotate(_fmt(v), (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                                ha="center", va="bottom", fontsize=7)  # fmt: skip
        ax.set_yscale("log")
        ax.set_ylim(floor / 2, None)
        ax.set_title(title)
        ax.set_xticks(range(len(cases)), cases, fontsize=8)
        ax.grid(axis="y", which="major", alpha=0.3)
    guest = " and ".join(guests) if guests else "py"
    size = rows[0]["frame_size"] if rows else FRAME_SIZE
    fig.suptitle(f"pvio device models, {size}-byte frames, {guest} guests (lower is better)")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(
        handles, labels, loc="upper center", ncol=len(models), bbox_to_anchor=(0.5, 0.95), frameon=False
    )
    fig.tight_layout(rect=(0, 0, 1, 0.92))
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    """``pvio bench``: the comparison table of the device models (``--json``, ``--chart PATH``)."""
    from pvio.harness.cli import OneLineParser

    parser = OneLineParser(prog="pvio bench", description=main.__doc__)
    parser.add_argument("--json", action="store_true", help="print the rows as a JSON list")
    parser.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    parser.add_argument("--chart", metavar="PATH", help="write a PNG chart (needs matplotlib)")
    parser.add_argument("--models", help="comma-separated models (default: all; with --steady: pv,smartnic)")
    parser.add_argument(
        "--guest",
        default="all",
        help="guest kind: py, x86, linux (Debian's Linux, PV rows beside py and x86; boots Linux) "
        "or all (default: py's plan, then x86's)",
    )
    parser.add_argument(
        "--mock-clock", action="store_true", help="run under trio's MockClock: exactly reproducible counts"
    )
    parser.add_argument("--quick", action="store_true", help="a tenth of the packets (a smoke run)")
    parser.add_argument(
        "--processes",
        action="store_true",
        help="the PV stream with a guest, or the vifs' backend (a driver domain), in a process of its own",
    )
    parser.add_argument(
        "--guests",
        type=int,
        metavar="N",
        help="the scale benchmark instead: N PV guests on one switch, N/2 concurrent 64-byte streams "
        "(guest 2k -> 2k+1), beside 2 guests' one stream measured in the same run",
    )
    parser.add_argument(
        "--packets", type=int, metavar="K", help=f"with --guests: frames per stream (default {SCALE_PACKETS})"
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="with --guests: rounds per network; with --processes: rounds of every placement, each "
        "compared with the baselines of its own round (default 3)",
    )
    parser.add_argument(
        "--steady",
        action="store_true",
        help="the saturation stream of each model (--models) in one warmed-up environment: best "
        "and median of three rounds of 300 k frames",
    )
    args = parser.parse_args(argv)
    if args.processes:
        if args.rounds < 1:
            parser.error(f"--rounds ({args.rounds}) must be at least 1")
        return processes_bench(args.quick, args.json, args.rounds)
    default = ("pv", "smartnic") if args.steady else MODELS  # the emulated NIC takes seconds for 20 k
    chosen = ",".join(default) if args.models is None else args.models
    models = [m.strip() for m in chosen.split(",") if m.strip()]
    if not models:
        parser.error(f"--models names no model (choose from {', '.join(MODELS)})")
    for m in models:
        if m not in MODELS:
            parser.error(f"unknown model {m!r} (choose from {', '.join(MODELS)})")
    if args.steady:
        return steady_main(models, args.quick, args.json)
    if args.packets is not None and args.guests is None:
        parser.error("--packets goes with --guests N (the scale benchmark)")
    if args.guests is not None:
        return _scale_main(parser, args)
    if args.guest != "all" and args.guest not in GUEST_KINDS:
        parser.error(f"unknown guest kind {args.guest!r} (choose from all, {', '.join(sorted(GUEST_KINDS))})")
    if args.chart:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            parser.error("--chart needs matplotlib: pip install 'pvio[chart]' (or make chart)")
    kinds = list(PLANS) if args.guest == "all" else [args.guest]
    if args.guest == "linux" and ("pv" not in models or args.mock_clock):
        parser.error("--guest linux runs the PV model on the real clock (no --mock-clock; --models pv)")

    def progress(what: str) -> None:
        if not args.json:
            print(f"  running {what} ...", file=sys.stderr)

    results: list[ScenarioResult] = []
    try:
        for kind in kinds:
            plan = LINUX_PLAN if kind == "linux" else PLANS.get(kind, BENCH_PLAN)
            if args.quick:
                plan = tuple(Case(c.scenario, c.offered_load, max(10, c.packets // 10)) for c in plan)
            if kind == "linux":
                results += linux_rows(plan, progress=progress)
                continue
            results += run_plan(plan, models, guest=kind, mock_clock=args.mock_clock, progress=progress)
    except NotImplementedError as e:
        print(f"pvio bench: {e}", file=sys.stderr)
        return 2
    rows = [r.row() for r in results]
    if args.json:
        print(json.dumps(rows, indent=1))
    elif args.markdown:
        print(format_markdown(rows))
    else:
        print(format_table(rows))
    if args.chart:
        write_chart(rows, args.chart)
        if not args.json:
            print(f"chart written to {args.chart}", file=sys.stderr)
    return 0


#: ``pvio bench --steady``: frames per timed round, warm-up frames, rounds.
STEADY_PACKETS, STEADY_WARMUP, STEADY_ROUNDS = 300_000, 100_000, 3


@dataclass
class SteadyStream:
    """One model's saturation stream in a warmed-up environment (``pvio bench --steady``)."""

    model: str
    packets: int  # per timed round
    rates: list[float]  # frames per second, each round
    per_packet: dict[str, float]  # interrupts, exits, hypercalls, copies per frame (the last round)

    def row(self) -> dict[str, Any]:
        """A JSON row: the best round's rate, the median's, and the per-frame costs."""
        return {
            "model": self.model, "packets": self.packets, "rounds": len(self.rates),
            "pps": round(max(self.rates), 1), "pps_median": round(statistics.median(self.rates), 1),
            **{f"{k}_per_pkt": round(v, 5) for k, v in self.per_packet.items()},
        }  # fmt: skip


async def steady_stream(
    model: str, packets: int = STEADY_PACKETS, warmup: int = STEADY_WARMUP, rounds: int = STEADY_ROUNDS
) -> SteadyStream:
    """A's 64-byte saturation stream to B (64 frames per send, B checks every frame) in one
    environment: ``warmup`` frames first, not timed, so that every buffer, ring and area has
    been touched once, then ``rounds`` timed streams of ``packets`` frames: the rate of a long
    experiment, without a fresh environment's start-up (first touches of its memory)."""
    async with model_env(model) as env:
        a, b = env.guests[0], env.guests[1]
        frames = make_frames(a, b, max(packets, warmup), FRAME_SIZE, STREAM_PORTS)
        if warmup:
            await stream_in_order(a, b, frames[:warmup], None, BATCH)
        rates: list[float] = []
        per: dict[str, float] = {}
        for _ in range(rounds):
            before = env.snapshot()
            start = time.perf_counter()
            got = await stream_in_order(a, b, frames[:packets], None, BATCH)
            rates.append(got / (time.perf_counter() - start))
            per = {k: v / got for k, v in costs(env.snapshot().diff(before)).items()}
        return SteadyStream(model, packets, rates, per)


def steady_main(models: Sequence[str], quick: bool, as_json: bool) -> int:
    """``pvio bench --steady``: :func:`steady_stream` per model, as a table or JSON rows."""
    scale = 10 if quick else 1
    rows = [
        trio.run(steady_stream, m, STEADY_PACKETS // scale, STEADY_WARMUP // scale, STEADY_ROUNDS).row()
        for m in models
    ]
    if as_json:
        print(json.dumps(rows, indent=1))
        return 0
    print(f"{'model':<10} {'packets':>8} {'pps (best)':>12} {'pps (median)':>13}  per packet")
    for r in rows:
        costs_ = " ".join(
            f"{k[: -len('_per_pkt')]}={_fmt(v)}" for k, v in r.items() if k.endswith("_per_pkt")
        )
        print(f"{r['model']:<10} {r['packets']:>8} {r['pps']:>12.0f} {r['pps_median']:>13.0f}  {costs_}")
    return 0


def _scale_main(parser: Any, args: Any) -> int:
    """``pvio bench --guests N``: :func:`scale_report`, as a table or JSON."""
    n = args.guests
    if n < 4 or n % 2 or n > MAX_GUESTS:
        parser.error(f"--guests {n}: an even number of guests, 4 to {MAX_GUESTS - 1}")
    packets = args.packets if args.packets is not None else SCALE_PACKETS // (10 if args.quick else 1)
    if packets < 1 or args.rounds < 1:
        parser.error(f"--packets ({packets}) and --rounds ({args.rounds}) must be at least 1")

    def progress(what: str) -> None:
        if not args.json:
            print(f"  running {what} ...", file=sys.stderr)

    report = scale_report(n, packets, rounds=args.rounds, mock_clock=args.mock_clock, progress=progress)
    print(json.dumps(report.as_json(), indent=1) if args.json else report.format())
    return 0


def processes_bench(quick: bool, as_json: bool, rounds: int = 1) -> int:
    """``pvio bench --processes``: one 64-byte PV stream per placement of its guests (in the
    hypervisor's process or their own: :mod:`pvio.remote.stream`), ``rounds`` times, each
    placement against the one-process figures of its own round."""
    from pvio.remote.stream import bench_main

    return bench_main(quick=quick, as_json=as_json, rounds=rounds)


# ---------------------------------------------------------------------- Linux rows (--guest linux)
#: The Linux rows' plan (``pvio bench --guest linux``).  ``stream``: a PyGuest (A) sends 64-byte UDP
#: frames to Linux (B), counted by Linux's ``rx_packets``; ``stream-from-linux``: Linux's own packet
#: generator (``pktgen``, the kernel's: BusyBox has no UDP sender) sends 64-byte UDP frames to A;
#: ``pingpong``: A sends ICMP echo requests that Linux's stack answers, one at a time.  The
#: ``stream`` and ``pingpong`` cases also run on the Python and the C netfront (py and x86 guests,
#: PV model) in the same run, so the real driver's row sits next to pvio's two.
LINUX_PLAN: tuple[Case, ...] = (
    Case("stream", 2_000, 1_000),
    Case("stream", None, 2_000),
    Case("stream-from-linux", None, 2_000),
    Case("pingpong", None, 200),
)
LINUX_SCENARIOS = ("stream", "stream-from-linux", "pingpong")
LINUX_EXIT_KINDS = ("exits.hypercall", "exits.page_fault", "exits.syscall", "exits.exception",
                    "exits.pio", "exits.mmio", "exits.hlt", "exits.cpuid")  # fmt: skip
LINUX_BOOT_TIMEOUT_S = 600.0
ICMP_IDENT = 0x7076


@dataclass
class LinuxScenarioResult(ScenarioResult):
    """A Linux row: a :class:`ScenarioResult` whose JSON row adds a ``linux`` entry (see
    :func:`run_linux_scenario`)."""

    linux: dict[str, Any] = field(default_factory=dict)

    @property
    def load(self) -> str:
        """As :attr:`ScenarioResult.load`; Linux's pktgen stream is a saturation load too."""
        if self.offered_load is None and self.scenario.startswith("stream"):
            return "saturation"
        return super().load

    def row(self) -> dict[str, Any]:
        """:meth:`ScenarioResult.row` plus ``linux``: offered frames, Linux's eth0 counts, drops."""
        return {**super().row(), "linux": self.linux}


@asynccontextmanager
async def linux_env(timeout_s: float = LINUX_BOOT_TIMEOUT_S) -> AsyncIterator[ModelEnv]:
    """A PyGuest ``a`` (pvio's Python netfront) and Debian's Linux ``b`` (its xen-netfront) on the switch.

    Linux knows A's MAC before the measurements (a permanent neighbour entry, BusyBox's
    ``arp -s``): its answers go out without an ARP exchange.  Raises
    :class:`pvio.cpu.debian.DebianUnavailable` when the Debian packages cannot be had.
    """
    from pvio.cpu.linux import LinuxBenchGuest
    from pvio.frontends.guests import ModelGuest
    from pvio.toolstack import start_network

    async with Hypervisor() as hv:
        a = ModelGuest("a", _ip(0), "pv")
        b = LinuxBenchGuest("b", _ip(1))
        net = await start_network(hv, [a, b], model="pv", settle_s=0.001, timeout_s=timeout_s)
        mac = ":".join(f"{x:02x}" for x in a.nic.mac)
        out = await b.run_command(f"arp -i eth0 -s {a.ip} {mac} && ip neigh show {a.ip}")
        if out is None or "PERMANENT" not in out:
            raise RuntimeError(f"Linux did not take A's MAC as a permanent neighbour: {out!r}")
        yield ModelEnv(hv, net.switch, "pv", "linux", net.guests, net.devices, net.netback)


async def linux_quiet(env: ModelEnv, timeout_s: float = 30.0) -> None:
    """Until every task is blocked -- Linux idle in ``hlt``, netback and A waiting -- twice in a row."""
    with trio.move_on_after(timeout_s):
        for _ in range(2):
            await trio.testing.wait_all_tasks_blocked(cushion=0.01)
            await trio.sleep(0.01)


async def _drain(nic: Any, into: list[bytes], stop: trio.Event) -> None:
    while not stop.is_set():
        into.extend(await nic.recv_batch())


async def run_linux_scenario(
    env: ModelEnv, scenario: str, *, packets: int, offered_load: float | None = None, batch: int = BATCH,
    frame_size: int = FRAME_SIZE, timeout_s: float = 120.0,
) -> ScenarioResult:  # fmt: skip
    """One Linux row: ``scenario`` (see :data:`LINUX_PLAN`) between PyGuest A and Linux B of ``env``.

    ``pps`` is what the receiver got over the time to its last frame (``stream``: netback's
    last delivery into Linux's RX ring).  Counters cover the traffic phase only (Linux's
    console commands that set up and read its statistics are outside it, except the one
    ``echo start`` that starts ``pktgen``).
    ``packets`` in the result is what the receiver counted: Linux's ``rx_packets`` (stream),
    the frames A got (``stream-from-linux``), ``2 * trips`` answered (ping-pong).  The row's
    ``linux`` entry adds what was offered, Linux's own statistics, netback's drops and the
    Linux domain's exits by kind.
    """
    if scenario not in LINUX_SCENARIOS:
        raise ValueError(f"unknown Linux scenario {scenario!r}: choose one of {', '.join(LINUX_SCENARIOS)}")
    a, b = env.guests[0], env.guests[1]
    b_dom = f"dom{b.domain.domid}"
    stats0 = await b.eth0_stats()
    if scenario == "stream-from-linux":
        mac = ":".join(f"{x:02x}" for x in a.nic.mac)
        setup = " && ".join([
            "(lsmod | grep -q pktgen || insmod /lib/pktgen.ko)",
            "echo rem_device_all > /proc/net/pktgen/kpktgend_0",
            "echo add_device eth0 > /proc/net/pktgen/kpktgend_0",
            *(f"echo '{cmd}' > /proc/net/pktgen/eth0" for cmd in (
                f"count {packets}", "clone_skb 0", f"pkt_size {frame_size}", "delay 0", f"dst {a.ip}",
                f"dst_mac {mac}", f"udp_src_min {STREAM_PORTS[0]}", f"udp_src_max {STREAM_PORTS[0]}",
                f"udp_dst_min {STREAM_PORTS[1]}", f"udp_dst_max {STREAM_PORTS[1]}")),
        ])  # fmt: skip
        out = await b.run_command(setup + " && echo pktgen-ok")
        if out is None or "pktgen-ok" not in out:
            raise RuntimeError(f"pktgen set-up failed in Linux: {out!r}")
    await linux_quiet(env)
    before = env.snapshot()
    latency: float | None = None
    extra: dict[str, Any] = {}
    with trio.fail_after(timeout_s):
        start = time.perf_counter()
        if scenario == "stream":
            frames = make_frames(a, b, packets, frame_size, STREAM_PORTS)
            got: list[bytes] = []  # Linux's answers (rate-limited ICMP port unreachable)
            stop = trio.Event()
            vif = env.netback.vifs[(b.domain.domid, 0)]
            last = [start]  # when netback last put a frame into Linux's RX ring

            async def watch(done: trio.Event) -> None:
                count = vif.dev["packets.rx"]
                while not (done.is_set() and time.perf_counter() - last[0] > 0.2):
                    await trio.sleep(0.001)
                    if vif.dev["packets.rx"] != count:
                        count, last[0] = vif.dev["packets.rx"], time.perf_counter()

            sent = trio.Event()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_drain, a.nic, got, stop)
                async with trio.open_nursery() as sending:
                    sending.start_soon(watch, sent)  # until netback has delivered nothing for 0.2 s
                    await send_all(a, frames, offered_load, batch)
                    sent.set()
                await linux_quiet(env)
                stop.set()
                nursery.cancel_scope.cancel()
            seconds = last[0] - start
            extra["frames_to_a"] = len(got)
        elif scenario == "stream-from-linux":
            got = []
            b.type("echo start > /proc/net/pktgen/pgctrl\n")
            with trio.move_on_after(timeout_s / 2):
                while sum(1 for f in got if f[6:12] == b.nic.mac) < packets:
                    got.extend(await a.nic.recv_batch())
            seconds = time.perf_counter() - start
            await linux_quiet(env)
        else:
            trips = await _linux_pings(a, b, packets)
            seconds = time.perf_counter() - start
            latency = statistics.median(trips) * 1e6 if trips else None
            extra["trips_answered"] = len(trips)
            await linux_quiet(env)
    diff = env.snapshot().diff(before)
    stats1 = await b.eth0_stats()
    linux_stats = {k: stats1[k] - stats0[k] for k in stats0}
    if scenario == "stream":
        delivered = linux_stats["rx_packets"]
    elif scenario == "stream-from-linux":
        delivered = sum(1 for f in got if f[6:12] == b.nic.mac)
    else:
        delivered = 2 * extra["trips_answered"]
    if delivered <= 0:
        raise RuntimeError(f"Linux {scenario}: nothing was delivered (eth0: {linux_stats})")
    vif = env.netback.vifs.get((b.domain.domid, 0)) if env.netback is not None else None
    vif_counts = diff.devices().get(f"netback/{vif.vif_name}", {}) if vif is not None else {}
    by_domain = per_domain(diff, env.domain_names())
    linux_counts = diff.domains().get(b_dom, {})
    by_domain[b.name].update({k: linux_counts.get(k, 0) for k in LINUX_EXIT_KINDS})
    extra.update(
        offered=packets,
        eth0=linux_stats,
        netback_drops={k: v for k, v in vif_counts.items() if k.startswith("drops.")},
    )
    return LinuxScenarioResult(
        "pv", "linux", scenario, offered_load, frame_size, delivered, seconds, costs(diff), by_domain,
        latency, diff, linux=extra,
    )  # fmt: skip


async def _linux_pings(a: Any, b: Any, trips: int, wait_s: float = 2.0) -> list[float]:
    """A sends ICMP echo requests to Linux one at a time; the round-trip times of those answered."""
    from pvio.frontends.netstack import icmp_echo

    rtts: list[float] = []
    payload = bytes(FRAME_SIZE - 14 - 20 - 8)
    for seq in range(trips):
        request = icmp_echo(a.nic.mac, b.nic.mac, a.ip, b.ip, ICMP_IDENT, seq, payload)
        sent_at = time.perf_counter()
        await a.nic.send(request)
        with trio.move_on_after(wait_s):
            while True:
                f = await a.nic.recv()
                # An echo reply (type 0) for this sequence number: IPv4 header of 20 bytes here.
                if (
                    f[12:14] == b"\x08\x00"
                    and f[23] == 1
                    and f[34] == 0
                    and f[38:42] == struct.pack("!HH", ICMP_IDENT, seq)
                ):
                    rtts.append(time.perf_counter() - sent_at)
                    break
    return rtts


async def _linux_cases(plan: Sequence[Case], progress: Callable[[str], None] | None) -> list[ScenarioResult]:
    results: list[ScenarioResult] = []
    async with linux_env() as env:
        for case in plan:
            if progress is not None:
                progress(f"linux pv {case.scenario} {case.offered_load or 'max'}")
            results.append(
                await run_linux_scenario(
                    env, case.scenario, packets=case.packets, offered_load=case.offered_load
                )
            )
    return results


def linux_rows(
    plan: Sequence[Case] = LINUX_PLAN,
    *,
    compare: Sequence[str] = ("py", "x86"),
    progress: Callable[[str], None] | None = None,
) -> list[ScenarioResult]:
    """The Linux rows of ``plan`` (one Linux boot for all of them, real clock: Linux keeps time
    with the host's TSC), after the same ``stream``/``pingpong`` cases on the ``compare`` guest
    kinds' netfronts (PV model).  NotImplementedError (one line) without Debian's packages."""
    from pvio.cpu.debian import DebianUnavailable

    results: list[ScenarioResult] = []
    shared = [c for c in plan if c.scenario in SCENARIOS]
    for kind in compare:
        if kind in GUEST_KINDS:
            results += run_plan(shared, ("pv",), guest=kind, progress=progress)
    try:
        results += trio.run(_linux_cases, plan, progress)
    except DebianUnavailable as e:
        raise NotImplementedError(f"the linux rows need Debian's packages: {e}") from None
    return results


# ---------------------------------------------------------------------- many guests (--guests N)
#: The scale benchmark's defaults: 64 guests, 32 streams (guest 2k -> 2k+1) of 64-byte frames.
SCALE_GUESTS = 64
SCALE_PACKETS = 2_000  # per stream


@dataclass
class StreamsResult:
    """Concurrent streams on one switch: guest 2k sends ``packets`` frames to guest 2k+1, every
    pair at once; costs are per frame delivered end to end, ``pps`` the aggregate."""

    n_guests: int
    streams: int
    packets: int  # frames per stream
    frame_size: int
    delivered: int  # frames delivered end to end, over all streams
    seconds: float  # wall clock, first send to last frame checked
    totals: dict[str, int]
    diff: Snapshot | None = None
    cpu_seconds: float = 0.0  # this process's CPU time (user + system) over the same span

    @property
    def cpu_pps(self) -> float:
        """Frames delivered per CPU second of this process: what a quiet machine would give,
        whatever else runs on it (every guest and dom0 run in this one process)."""
        return self.delivered / self.cpu_seconds if self.cpu_seconds > 0 else math.inf

    @property
    def pps(self) -> float:
        """Aggregate frames delivered per wall-clock second."""
        return self.delivered / self.seconds if self.seconds > 0 else math.inf

    @property
    def per_packet(self) -> dict[str, float]:
        """Each total divided by the frames delivered end to end."""
        return {k: self.totals[k] / self.delivered for k in COST_KEYS}


async def run_streams(
    env: ModelEnv,
    *,
    packets: int = SCALE_PACKETS,
    frame_size: int = FRAME_SIZE,
    batch: int = BATCH,
    timeout_s: float = 120.0,
) -> StreamsResult:
    """Every pair of ``env``'s guests streams at once: guest 2k sends ``packets`` UDP frames to
    guest 2k+1 at saturation (batches of ``batch``), and 2k+1 checks each frame against the one
    due next (every byte, in order: AssertionError otherwise), as :func:`stream_in_order` does."""
    low, high = FRAME_LIMITS[env.model]
    if not low <= frame_size <= high:
        raise ValueError(f"frame_size={frame_size}: {env.model} NICs carry frames of {low}..{high} bytes")
    pairs = [(env.guests[i], env.guests[i + 1]) for i in range(0, len(env.guests) - 1, 2)]
    if not pairs:
        raise ValueError("concurrent streams need at least 2 guests")
    plans = [(a, b, make_frames(a, b, packets, frame_size, STREAM_PORTS)) for a, b in pairs]
    counts = [0] * len(plans)

    async def one(k: int, a: Any, b: Any, frames: list[bytes]) -> None:
        counts[k] = await stream_in_order(a, b, frames, None, batch)

    await settle()
    before = env.snapshot()
    with trio.fail_after(timeout_s):
        start, cpu0 = time.perf_counter(), time.process_time()
        async with trio.open_nursery() as nursery:
            for k, (a, b, frames) in enumerate(plans):
                nursery.start_soon(one, k, a, b, frames)
        seconds, cpu = time.perf_counter() - start, time.process_time() - cpu0
        await settle()
    diff = env.snapshot().diff(before)
    return StreamsResult(
        len(env.guests), len(plans), packets, frame_size, sum(counts), seconds, costs(diff), diff, cpu
    )


def rss_bytes() -> dict[str, int]:
    """This process's resident memory from ``/proc/self/status`` (Linux): ``rss`` (VmRSS) and
    its parts ``anon`` (the Python heap, anonymous guest RAM) and ``shmem`` (memfd-backed RAM);
    empty where there is no such file."""
    keys = {"VmRSS": "rss", "RssAnon": "anon", "RssShmem": "shmem"}
    out: dict[str, int] = {}
    try:
        with open("/proc/self/status") as status:
            for line in status:
                name, _, value = line.partition(":")
                if name in keys:
                    out[keys[name]] = int(value.split()[0]) * 1024
    except OSError:
        pass
    return out


@dataclass
class ScaleRun:
    """One network of :func:`scale_run`: its boot and its rounds of concurrent streams."""

    n_guests: int
    boot_s: float  # wall clock of booting the network (model_env: every guest connected, MACs learned)
    rss_boot: dict[str, int]  # resident memory the boot added (rss_bytes keys)
    rounds: list[StreamsResult]

    @property
    def pps(self) -> float:
        """The median aggregate pps of the rounds (wall clock)."""
        return statistics.median(r.pps for r in self.rounds)

    @property
    def cpu_pps(self) -> float:
        """The median of the rounds' frames per CPU second (:attr:`StreamsResult.cpu_pps`)."""
        return statistics.median(r.cpu_pps for r in self.rounds)

    def row(self) -> dict[str, Any]:
        """The JSON row of ``pvio bench --guests``."""
        last = self.rounds[-1]
        return {
            "guests": self.n_guests,
            "streams": last.streams,
            "packets_per_stream": last.packets,
            "frame_size": last.frame_size,
            "delivered": last.delivered,
            "pps": round(self.pps, 1),
            "pps_rounds": [round(r.pps, 1) for r in self.rounds],
            "cpu_pps": round(self.cpu_pps, 1),
            "per_packet": {k: round(v, 5) for k, v in last.per_packet.items()},
            "boot_s": round(self.boot_s, 3),
            "rss_boot": self.rss_boot,
            "rss_per_guest": round(self.rss_boot.get("rss", 0) / self.n_guests),
        }


async def scale_run(
    n_guests: int, *, packets: int, rounds: int = 3, frame_size: int = FRAME_SIZE, timeout_s: float = 120.0
) -> ScaleRun:
    """Boot ``n_guests`` PV guests on one switch (timed; resident memory before and after), then
    ``rounds`` rounds of :func:`run_streams` with ``packets`` frames per stream.

    Before each round a full garbage collection: the boot leaves the collector enough new
    objects that its next full pass (tens of ms with 64 guests) would otherwise land in the
    first round and be charged to the traffic.
    """
    import gc

    gc.collect()
    mem0 = rss_bytes()
    start = time.perf_counter()
    async with model_env("pv", n_guests=n_guests, timeout_s=timeout_s) as env:
        boot_s = time.perf_counter() - start
        mem1 = rss_bytes()
        results: list[StreamsResult] = []
        for _ in range(rounds):
            gc.collect()
            results.append(
                await run_streams(env, packets=packets, frame_size=frame_size, timeout_s=timeout_s)
            )
    return ScaleRun(n_guests, boot_s, {k: mem1[k] - mem0.get(k, 0) for k in mem1}, results)


@dataclass
class ScaleReport:
    """``pvio bench --guests N``: N guests' concurrent streams beside 2 guests' one stream of
    the same total frames, measured in the same run; ``ratio`` = N's aggregate pps / 2's."""

    base: ScaleRun
    scale: ScaleRun

    @property
    def ratio(self) -> float:
        """The N-guest aggregate over the 2-guest figure (wall clock, medians)."""
        return self.scale.pps / self.base.pps

    @property
    def cpu_ratio(self) -> float:
        """The same ratio from frames per CPU second (robust to other load on the machine)."""
        return self.scale.cpu_pps / self.base.cpu_pps

    def as_json(self) -> dict[str, Any]:
        """Both rows and the ratios."""
        return {
            "base": self.base.row(),
            "scale": self.scale.row(),
            "ratio": round(self.ratio, 3),
            "cpu_ratio": round(self.cpu_ratio, 3),
            "memory": "resident set (VmRSS) added by the boot, divided by the guests; dom0's staging "
            "pages for each guest's vif (512 pages, 2 MiB) included",
        }

    def format(self) -> str:
        """The human-readable report."""
        lines = [f"{'guests':>6}  {'streams':>7}  {'frames':>7}  {'pps':>9}  {'cpu pps':>9}  "
                 f"{'int/pkt':>7}  {'exits/pkt':>9}  {'hcalls/pkt':>10}  {'copies/pkt':>10}  "
                 f"{'boot s':>6}  {'RSS/guest':>9}"]  # fmt: skip
        for run in (self.base, self.scale):
            last, pp = run.rounds[-1], run.rounds[-1].per_packet
            mib = run.rss_boot.get("rss", 0) / run.n_guests / 2**20
            lines.append(
                f"{run.n_guests:>6}  {last.streams:>7}  {last.delivered:>7}  {run.pps:>9.0f}  "
                f"{run.cpu_pps:>9.0f}  {_fmt(pp['interrupts']):>7}  {_fmt(pp['exits']):>9}  "
                f"{_fmt(pp['hypercalls']):>10}  {_fmt(pp['copies']):>10}  {run.boot_s:>6.2f}  "
                f"{mib:>5.2f} MiB"
            )
        lines.append(
            f"aggregate {self.scale.n_guests} guests / 2 guests: {self.ratio:.2f} (wall clock), "
            f"{self.cpu_ratio:.2f} (per CPU second); medians of {len(self.scale.rounds)} rounds"
        )
        return "\n".join(lines)


def scale_report(
    n_guests: int = SCALE_GUESTS,
    packets: int = SCALE_PACKETS,
    *,
    rounds: int = 3,
    mock_clock: bool = False,
    progress: Callable[[str], None] | None = None,
) -> ScaleReport:
    """The N-guest network first (so its memory figure is not helped by what the 2-guest run
    freed), then the 2-guest one with one stream of as many frames as all N's streams carry."""
    if n_guests < 4 or n_guests % 2:
        raise ValueError(f"--guests {n_guests}: an even number of at least 4 (guest 2k streams to 2k+1)")

    def clock() -> Any:
        return trio.testing.MockClock(autojump_threshold=0) if mock_clock else None

    if progress is not None:
        progress(f"{n_guests} guests, {n_guests // 2} streams of {packets} frames")
    scale = trio.run(functools.partial(scale_run, n_guests, packets=packets, rounds=rounds), clock=clock())
    if progress is not None:
        progress(f"2 guests, 1 stream of {packets * (n_guests // 2)} frames")
    total = packets * (n_guests // 2)
    base = trio.run(functools.partial(scale_run, 2, packets=total, rounds=rounds), clock=clock())
    return ScaleReport(base, scale)
