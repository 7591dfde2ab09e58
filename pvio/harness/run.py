"""``pvio run FILE``: boot a scenario file's network, run its traffic, report, serve control.

The run: validate the file (:mod:`pvio.harness.scenario`), boot the domains with the
toolstack (:func:`pvio.toolstack.start_network`), then run each ``[[traffic]]`` item in
order and measure it: the counters from just before its first frame to the moment the
system is quiet after its last one, divided by the frames delivered end to end, in the
schema of ``pvio bench --json`` (one row per traffic item, plus ``from``, ``to``, ``sent``,
``lost`` and ``ok``).  Traffic that was lost, or a probe whose answer was wrong, makes the
run fail (exit status 1).

With the real clock, while it runs, the hypervisor answers the control socket
(:mod:`pvio.harness.control`), so ``pvio list``, ``pvio console``, ``pvio stats`` ... work
against it; ``--hold`` (which implies the real clock) keeps it running and serving after the
traffic until ``pvio shutdown`` or Ctrl-C.  A mock-clock run takes no wall time and must be
reproducible, so it serves no socket.

Loss is detected without waiting for wall time under the mock clock: a receiver waits at
most ``timeout`` of the scenario's clock for each item, and virtual time jumps there as
soon as nothing else can happen.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import trio
import trio.testing

from pvio.core.counters import Snapshot
from pvio.core.hypervisor import Hypervisor
from pvio.frontends.nic import GuestNic
from pvio.harness.bench import (
    COST_KEYS,
    PINGPONG_PORTS,
    STREAM_PORTS,
    costs,
    make_frames,
    per_domain,
    pingpong_trips,
    seq_of,
    settle,
    stream_frames,
)
from pvio.harness.scenario import DomainSpec, PortSpec, Scenario, TrafficSpec
from pvio.toolstack import Network, NicConfig, start_network

MIB_PAGES = 256  # 4 KiB pages per MiB


@dataclass
class TrafficResult:
    """What one ``[[traffic]]`` item delivered and cost."""

    spec: TrafficSpec
    model: str
    guest: str
    sent: int = 0
    delivered: int = 0  # frames delivered end to end
    lost: int = 0
    failed_checks: list[str] = field(default_factory=list)
    seconds: float = 0.0
    latency_us: float | None = None
    diff: Snapshot | None = None
    by_domain: dict[str, dict[str, int]] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.lost == 0 and not self.failed_checks

    def row(self, counters: tuple[str, ...] = COST_KEYS, by_domain: bool = True) -> dict[str, Any]:
        """One row in ``pvio bench --json``'s schema, plus the scenario's own fields."""
        totals = costs(self.diff) if self.diff is not None else dict.fromkeys(COST_KEYS, 0)
        n = max(self.delivered, 1)
        pps = self.delivered / self.seconds if self.seconds > 0 else math.inf
        out: dict[str, Any] = {
            "model": self.model,
            "guest": self.guest,
            "scenario": self.spec.type,
            "from": self.spec.src,
            "to": self.spec.dst,
            "offered_load": self.spec.rate or None,
            "load": f"{self.spec.rate:g} pps" if self.spec.rate else "as fast as possible",
            "frame_size": self.spec.size,
            "sent": self.sent,
            "packets": self.delivered,
            "lost": self.lost,
            "ok": self.ok,
            "failed_checks": list(self.failed_checks),
            "pps": round(pps, 1) if math.isfinite(pps) else None,
            "latency_us": None if self.latency_us is None else round(self.latency_us, 1),
            "per_packet": {k: round(totals[k] / n, 5) for k in counters},
            "totals": {k: totals[k] for k in counters},
        }
        if by_domain:
            out["by_domain"] = self.by_domain
        return out


def make_kernel(spec: DomainSpec, hotplug: bool = False) -> Any:
    """The guest kernel a domain of the scenario runs (``hotplug``: a Python guest connects
    vifs the toolstack adds while it runs)."""
    if spec.kind == "py":
        from pvio.frontends.guests import ModelGuest

        return ModelGuest(spec.name, spec.ip, spec.nic.model, app=spec.app, hotplug=hotplug)
    if spec.kind == "x86" and spec.app == "echo":
        from pvio.cpu.guest import X86Guest

        words = f"mode=echo ip={spec.ip} nic={spec.nic.model} {spec.cmdline}".strip()
        return X86Guest(name=spec.name, cmdline=words)
    from pvio.harness.bench import GUEST_KINDS

    options = {"cmdline": spec.cmdline} if spec.cmdline else {}
    return GUEST_KINDS[spec.kind](spec.name, spec.nic.model, spec.ip, options)


async def boot(
    hv: Hypervisor, sc: Scenario, nursery: trio.Nursery, hotplug: bool = False
) -> tuple[Network, dict[str, Any]]:
    """Boot every domain of ``sc`` with its NIC on one switch, and its ports (their tasks in
    ``nursery``); returns the network and the kernels by domain name."""
    from pvio.harness.demo import wait_x86_ready

    kernels = {d.name: make_kernel(d, hotplug) for d in sc.domains}
    for d in sc.domains:
        if d.memory_mib is not None:
            kernels[d.name].memory_pages = d.memory_mib * MIB_PAGES
    drivers = {}
    if sc.drivers:
        from pvio.remote.backend import start_driver_domain

    for drv in sc.drivers:  # first: the vifs they serve are created with the guests
        vifs = sum(1 for d in sc.domains if d.nic.backend_domain == drv.name)
        drivers[drv.name] = await start_driver_domain(
            hv, name=drv.name, vifs=max(vifs, 1), backend=drv.backend,
            backend_options=drv.options or None, timeout_s=sc.timeout,
        )  # fmt: skip
    nics = [
        NicConfig(
            d.nic.model, d.nic.backend, d.nic.options, d.nic.mac, drivers.get(d.nic.backend_domain or "")
        )
        for d in sc.domains
    ]
    net = await start_network(hv, list(kernels.values()), nics=nics, settle_s=0.001, timeout_s=sc.timeout)
    for d in sc.domains:  # an x86 echo guest says so on its console, and announces itself
        if d.kind == "x86" and d.app == "echo":
            await wait_x86_ready(kernels[d.name], net.switch, sc.timeout)
    for port in sc.ports:
        add_port(net, port, kernels, nursery)
    return net, kernels


def add_port(net: Network, spec: PortSpec, kernels: dict[str, Any], nursery: trio.Nursery) -> None:
    """Create a ``[[port]]``: a capture starts now; a TAP or VXLAN port that cannot be created
    is reported in one line (why: permission, busy, address in use) and the network runs on."""
    import logging

    from pvio.backends.capture import Capture, format_for

    hv = net.hv
    if spec.type == "capture":
        port = None if spec.of == "switch" else net.port_of(kernels[spec.of].domain.domid)
        net.captures.append(
            Capture(net.switch, spec.file, port, counters=hv.counters, format=format_for(spec.file)).start()
        )
        return
    try:
        if spec.type == "tap":
            from pvio.backends.tap import TapError, TapPort

            try:
                edge: Any = TapPort(net.switch, spec.ifname, counters=hv.counters)
            except TapError as e:
                raise _PortError(str(e)) from None
        else:
            from pvio.backends.vxlan import VXLAN_PORT, VxlanError, VxlanPort
            from pvio.harness.net import _address

            try:
                remotes = [_address(r) for r in spec.remotes]
                edge = VxlanPort(
                    net.switch, spec.vni, local=_address(spec.local, VXLAN_PORT), remotes=remotes,
                    counters=hv.counters,
                )  # fmt: skip
            except (VxlanError, ValueError) as e:
                raise _PortError(str(e)) from None
    except _PortError as e:
        logging.getLogger("pvio.run").error("%s; running without it", e)
        return
    nursery.start_soon(edge.run, name=edge.name)
    net.edges.append(edge)


class _PortError(Exception):
    pass


async def run_traffic(net: Network, sc: Scenario, t: TrafficSpec, kernels: dict[str, Any]) -> TrafficResult:
    """Run one traffic item and measure it."""
    src, dst = kernels[t.src], kernels[t.dst]
    spec = sc.domain(t.src)
    result = TrafficResult(t, spec.nic.model, spec.kind)
    await settle()
    _drop_stale_frames(kernels)
    before = await net.gather()
    start = time.perf_counter()
    native = getattr(src, "native_scenario", None)
    if native is not None:  # x86 guests make and check their traffic themselves
        rate = t.rate or None
        with trio.move_on_after(sc.timeout) as scope:
            delivered, _, latency = await native(t.type, dst, t.packets, t.size, rate, 64)
        result.sent = t.packets
        if scope.cancelled_caught:
            result.lost = t.packets
        else:
            result.delivered, result.latency_us = delivered, latency
    elif t.type == "stream":
        await _stream(src, dst, t, sc.timeout, result)
    elif t.type == "pingpong":
        await _pingpong(src, dst, t, sc.timeout, result)
    else:
        await _probes(net, src, dst, sc.timeout, result)
    result.seconds = time.perf_counter() - start
    await settle()
    result.diff = (await net.gather()).diff(before)
    result.by_domain = per_domain(result.diff, net.domain_names())
    return result


def _drop_stale_frames(kernels: dict[str, Any]) -> None:
    """Frames a guest received before a traffic item and did not read (the ARP request another
    domain's probes flooded to it) are not the item's: they would be read as its first frames."""
    for kernel in kernels.values():
        nic = getattr(kernel, "nic", None)
        if isinstance(nic, GuestNic):
            nic.drop_pending()


async def _stream(src: Any, dst: Any, t: TrafficSpec, timeout: float, result: TrafficResult) -> None:
    frames = make_frames(src, dst, t.packets, t.size, STREAM_PORTS)
    received = await stream_frames(src, dst, frames, t.rate or None, 64, wait_s=timeout)
    result.sent = t.packets
    seqs = [seq_of(f) for f in received]
    result.delivered = len(received)
    result.lost = t.packets - len(set(seqs) & set(range(t.packets)))
    if seqs != sorted(seqs) or len(set(seqs)) != len(seqs):
        result.failed_checks.append("stream frames arrived out of order or twice")


async def _pingpong(src: Any, dst: Any, t: TrafficSpec, timeout: float, result: TrafficResult) -> None:
    requests = make_frames(src, dst, t.packets, t.size, PINGPONG_PORTS)
    trips = await pingpong_trips(src, dst, requests, t.rate or None, wait_s=timeout)
    result.sent = t.packets
    result.lost = 2 * trips.lost
    result.delivered = 2 * (t.packets - trips.lost)
    result.failed_checks += [f"trip {k}: the answer is not the echo of the request" for k in trips.wrong]
    if trips.rtts:
        result.latency_us = statistics.median(trips.rtts) * 1e6


async def _probes(net: Network, src: Any, dst: Any, timeout: float, result: TrafficResult) -> None:
    from pvio.harness.demo import DemoResult, build_traffic, exchange, x86_mac

    demo = DemoResult()
    dst_mac = dst.nic.mac if getattr(dst, "nic", None) is not None else x86_mac(dst)
    dst_ip = getattr(dst, "ip", None) or _cmdline_ip(dst)
    probes = build_traffic(src.nic.mac, dst_mac, src.ip, dst_ip)
    await exchange(net.hv, src, probes, demo, timeout)
    result.sent = demo.sent
    result.delivered = demo.delivered
    result.lost = 2 * demo.lost
    result.failed_checks += [f"probe {name!r}: wrong answer" for name, _, ok in demo.checked if not ok]
    result.spec.size = max((size for _, size, _ in demo.checked), default=0)


async def _live_status(hv: Hypervisor, show: Callable[[str], None], what: str) -> None:
    """Every 0.5 s: the traffic item and, per guest domain, interrupts and packets so far."""
    while True:
        await trio.sleep(0.5)
        snap = hv.snapshot()
        parts = []
        for dom in sorted(hv.domains.values(), key=lambda d: d.domid):
            if dom.domid == 0:
                continue
            c = snap.get(f"dom{dom.domid}", {})
            pkts = sum(
                v.get("packets.rx", 0) for o, v in snap.devices().items() if o.endswith(f"vif{dom.domid}.0")
            )
            parts.append(f"{dom.name}: {c.get('interrupts', 0)} irq {pkts} rx")
        show(f"[{what}] " + "  ".join(parts))


def _cmdline_ip(kernel: Any) -> str:
    words = dict(w.split("=", 1) for w in str(getattr(kernel, "cmdline", "")).split() if "=" in w)
    return words.get("ip", "")


@dataclass
class RunResult:
    """A whole scenario run."""

    scenario: Scenario
    traffic: list[TrafficResult]
    domains: list[dict[str, Any]]

    @property
    def ok(self) -> bool:
        return all(t.ok for t in self.traffic)

    def as_json(self) -> dict[str, Any]:
        sc = self.scenario
        return {
            "scenario": sc.name,
            "file": sc.path,
            "clock": sc.clock,
            "ok": self.ok,
            "domains": self.domains,
            "rows": [t.row(sc.report_counters, sc.report_by_domain) for t in self.traffic],
        }


def domain_table(hv: Hypervisor) -> list[dict[str, Any]]:
    """Every domain: id, name, state, memory, vifs (what ``pvio list`` shows)."""
    rows = []
    for dom in sorted(hv.domains.values(), key=lambda d: d.domid):
        vifs = []
        base = f"/local/domain/{dom.domid}/device/vif"
        try:
            for devid in hv.toolstack.directory(base):
                state = hv.toolstack.read(f"{base}/{devid}/state").decode()
                mac = hv.toolstack.read(f"{base}/{devid}/mac").decode()
                vifs.append({"devid": int(devid), "mac": mac, "state": int(state)})
        except Exception:  # no vif directory (or a guest's half-written one): none to show
            pass
        rows.append(
            {
                "domid": dom.domid,
                "name": dom.name,
                "state": domain_state(dom),
                "memory_mib": round(dom.mem.nr_pages / MIB_PAGES, 2),
                "kernel": type(dom.kernel).__name__,
                "vifs": vifs,
            }
        )
    return rows


def domain_state(dom: Any) -> str:
    """The domain's state in xl's words: running, paused, crashed, shutdown (or created, dying)."""
    if dom.crash_reason:
        return "crashed"
    return {"dead": "shutdown"}.get(dom.state, dom.state)


async def run(
    sc: Scenario,
    *,
    control: str | None = None,
    hold: bool = False,
    progress: Callable[[str], None] | None = None,
    trace: str | None = None,
    xenstore_socket: str | None = None,
    live: Callable[[str], None] | None = None,
) -> RunResult:
    """Boot ``sc``, run its traffic, return the result; serve ``control`` (a socket path)
    while it runs, and after the traffic too when ``hold``; ``trace`` records the whole run,
    boot included, as a Perfetto trace file; ``xenstore_socket`` serves the store in
    xenstored's socket protocol for Xen's own tools (``XENSTORED_PATH=... xenstore-ls``);
    ``live`` receives a one-line status (per-domain interrupts and packets) every 0.5 s of the
    scenario's clock while traffic runs."""
    from contextlib import nullcontext

    from pvio.harness.control import ControlServer

    async with Hypervisor(seed=sc.seed) as hv, trio.open_nursery() as nursery:
        with hv.trace(trace) if trace is not None else nullcontext():
            server = None
            if control is not None:
                server = ControlServer(hv, control)
                await nursery.start(server.serve)
            if xenstore_socket is not None:
                from pvio.xenstore.unix_socket import XenstoreSocketServer

                await nursery.start(XenstoreSocketServer(hv.store, xenstore_socket).serve)
            if progress:
                progress(f"booting {len(sc.domains)} domain(s)")
            net, kernels = await boot(hv, sc, nursery, hotplug=hold)
            if server is not None:
                server.network = net
            results = []
            for i, t in enumerate(sc.traffic):
                if progress:
                    progress(f"traffic {i + 1}/{len(sc.traffic)}: {t.type} {t.src} -> {t.dst}")
                if live is None:
                    results.append(await run_traffic(net, sc, t, kernels))
                    continue
                async with trio.open_nursery() as status:
                    status.start_soon(_live_status, hv, live, f"{i + 1}/{len(sc.traffic)} {t.type}")
                    results.append(await run_traffic(net, sc, t, kernels))
                    status.cancel_scope.cancel()
            result = RunResult(sc, results, domain_table(hv))
            if hold and server is not None:
                if progress:
                    progress(f"holding: control socket {control} (pvio shutdown to stop)")
                await server.shutdown_requested.wait()
            net.close()  # captures complete their files; TAP and VXLAN ports let go
            nursery.cancel_scope.cancel()
    return result
