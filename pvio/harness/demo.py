"""``pvio demo``: guests exchange scapy-built traffic through netfront -> netback -> switch.

``pvio demo`` (add ``--json`` for machine-readable output; ``--guest x86`` for an x86 guest B;
``examples/pv_demo.py`` is the same scenario as a short script to start from):

dom0 runs netback and the virtual switch; guest A (10.0.0.1) sends ARP, ICMP echo,
UDP of several sizes up to 1500 bytes and one 6000-byte frame that needs several ring
slots; guest B (10.0.0.2) runs a minimal network stack that answers each; A checks
every answer with scapy.  Then the counters of the exchange are divided by the frames
delivered end to end (A -> B and B -> A).  Scapy builds and checks packets here, in
the scenario, never on the data path: the drivers move bytes.

The run uses trio's MockClock, so the counters are the same on every run.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import trio
import trio.testing

from pvio import Hypervisor, Snapshot
from pvio.abi.vif import format_mac
from pvio.backends.switch import Switch
from pvio.frontends.guests import EchoGuest, NicGuest
from pvio.toolstack import boot_network, parse_mac

IP_A, IP_B = "10.0.0.1", "10.0.0.2"


@dataclass
class Probe:
    """One request A sends and how to check B's answer."""

    name: str
    packet: Any  # a scapy packet
    check: Callable[[Any], bool]


def _udp_echo_of(payload: bytes) -> Callable[[Any], bool]:
    """A check that an answer is the UDP echo (from port 7) of ``payload``."""
    from scapy.layers.inet import UDP

    return lambda r: UDP in r and r[UDP].sport == 7 and bytes(r[UDP].payload) == payload


def build_traffic(mac_a: bytes, mac_b: bytes, ip_a: str = IP_A, ip_b: str = IP_B) -> list[Probe]:
    """The scapy-built requests and their answer checks (built once, before the timed part)."""
    from scapy.layers.inet import ICMP, IP, UDP
    from scapy.layers.l2 import ARP, Ether

    a, b = format_mac(mac_a), format_mac(mac_b)
    probes = [
        Probe(
            f"arp who-has {ip_b}",
            Ether(src=a, dst="ff:ff:ff:ff:ff:ff") / ARP(op=1, hwsrc=a, psrc=ip_a, pdst=ip_b),
            lambda r: ARP in r and r[ARP].op == 2 and r[ARP].psrc == ip_b and r[ARP].hwsrc == b,
        ),
        Probe(
            "icmp echo",
            Ether(src=a, dst=b) / IP(src=ip_a, dst=ip_b) / ICMP(id=7, seq=1) / (b"ping" * 8),
            lambda r: (
                ICMP in r and r[ICMP].type == 0 and r[ICMP].id == 7 and bytes(r[ICMP].payload) == b"ping" * 8
            ),
        ),
    ]
    for size in (18, 64, 256, 512, 1024, 1472, 6000):
        payload = bytes((i * 7 + size) & 0xFF for i in range(size))
        probes.append(
            Probe(
                f"udp echo {size} B" + (" (multi-slot)" if size > 4096 else ""),
                Ether(src=a, dst=b)
                / IP(src=ip_a, dst=ip_b)
                / UDP(sport=40000 + size % 1000, dport=7)
                / payload,
                _udp_echo_of(payload),
            )
        )
    return probes


@dataclass
class DemoResult:
    """What the demo measured."""

    sent: int = 0
    received: int = 0
    checked: list[tuple[str, int, bool]] = field(default_factory=list)  # (probe, frame bytes, ok)
    counters: Snapshot | None = None

    @property
    def lost(self) -> int:
        return self.sent - self.received

    @property
    def delivered(self) -> int:
        """Frames delivered end to end: each request A -> B and each answer B -> A."""
        return 2 * self.received

    def per_packet(self) -> dict[str, Any]:
        """The counters of the exchange divided by the frames delivered end to end."""
        assert self.counters is not None
        c = self.counters
        n = max(self.delivered, 1)
        doms = c.domains()

        def per(total: int) -> float:
            return round(total / n, 4)

        return {
            "interrupts": per(c.total("interrupts", "domain")),
            "interrupts_by_domain": {d: per(v.get("interrupts", 0)) for d, v in doms.items()},
            "hypercalls": per(c.total("hypercalls", "domain")),
            "notifications": per(c.total("notifications.sent", "device")),
            "notifications_suppressed": per(c.total("notifications.suppressed", "device")),
            "grant_copies": per(c.total("grant.copies", "domain")),
            "bytes_copied": per(c.total("grant.copy_bytes", "domain")),
        }

    def as_json(self) -> dict[str, Any]:
        """The ``pvio demo --json`` object."""
        assert self.counters is not None
        return {
            "scenario": "pv: PyGuest A <-> PyGuest B through netfront/netback and the switch",
            "packets_sent": self.sent,
            "packets_received": self.received,
            "packets_lost": self.lost,
            "frames_delivered": self.delivered,
            "probes": [{"name": n, "bytes": size, "ok": ok} for n, size, ok in self.checked],
            "per_packet": self.per_packet(),
            "domains": {d: dict(v) for d, v in self.counters.domains().items()},
            "devices": {d: dict(v) for d, v in self.counters.devices().items()},
        }


async def exchange(
    hv: Hypervisor, sender: NicGuest, probes: list[Probe], result: DemoResult, timeout_s: float
) -> None:
    """Send each probe from ``sender``, wait for and check its answer; count what it cost."""
    from scapy.layers.l2 import Ether

    frames = [bytes(p.packet) for p in probes]  # scapy -> bytes once, outside the measured part
    # Let the control plane finish first: netback is still answering the handshake's
    # xenstore watch events, whose hypercalls and interrupts are not the exchange's.
    await trio.testing.wait_all_tasks_blocked()
    before = hv.snapshot()
    for probe, frame in zip(probes, frames, strict=True):
        await sender.nic.send(frame)
        result.sent += 1
        answer = None
        with trio.move_on_after(timeout_s):
            answer = await sender.nic.recv()
        if answer is None:
            result.checked.append((probe.name, len(frame), False))
            continue
        result.received += 1
        result.checked.append((probe.name, len(frame), bool(probe.check(Ether(answer)))))
    result.counters = hv.snapshot().diff(before)


async def run_demo(timeout_s: float = 5.0, pcap: str | None = None) -> DemoResult:
    """Boot dom0 + A + B, exchange the traffic, return what was measured; with ``pcap``,
    every frame the switch sees is written to that pcap file."""
    result = DemoResult()
    a, b = NicGuest("guest-a", IP_A), EchoGuest("guest-b", IP_B)
    async with boot_network([a, b], announce=False, timeout_s=timeout_s, pcap=pcap) as net:
        await exchange(net.hv, a, build_traffic(a.nic.mac, b.nic.mac), result, timeout_s)
    return result


def format_table(r: DemoResult) -> str:
    """The human-readable report."""
    pp = r.per_packet()
    lines = ["pvio demo: two PyGuests on the virtual switch, PV split-driver NIC (netfront/netback)", ""]
    lines.append(f"{'probe':<34}{'bytes':>7}  answer")
    for name, size, ok in r.checked:
        lines.append(f"{name:<34}{size:>7}  {'ok' if ok else 'WRONG/MISSING'}")
    lines += [
        "",
        f"packets sent {r.sent}, answered {r.received}, lost {r.lost}; "
        f"frames delivered end to end {r.delivered}",
        "",
        "per frame delivered:",
    ]
    for dom, v in pp["interrupts_by_domain"].items():
        lines.append(f"  interrupts {dom:<22}{v:>10.3f}")
    for key in (
        "interrupts",
        "hypercalls",
        "notifications",
        "notifications_suppressed",
        "grant_copies",
        "bytes_copied",
    ):
        label = "interrupts (all domains)" if key == "interrupts" else key.replace("_", " ")
        lines.append(f"  {label:<33}{pp[key]:>10.3f}")
    return "\n".join(lines)


def run_main(
    argv: list[str] | None,
    prog: str,
    run: Callable[..., Awaitable[DemoResult]],
    table: Callable[[DemoResult], str],
) -> int:
    """A demo's command line: run it under MockClock, print the table or ``--json``.

    Exit status 1 if an answer was lost or wrong.
    """
    from pvio.harness.cli import OneLineParser

    parser = OneLineParser(prog=prog, description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    parser.add_argument("--pcap", metavar="PATH", help="capture the switch's traffic to a pcap file")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    clock = trio.testing.MockClock(autojump_threshold=0)
    result = trio.run(functools.partial(run, pcap=args.pcap), clock=clock)
    if args.json:
        print(json.dumps(result.as_json(), indent=2, sort_keys=True))
    else:
        print(table(result))
    ok = result.lost == 0 and all(ok for _, _, ok in result.checked)
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    """``pvio demo``: the PyGuest <-> PyGuest scenario."""
    return run_main(argv, "pvio demo", run_demo, format_table)


# ---------------------------------------------------------------------- guest B an x86 guest
SCENARIO = "pv: PyGuest A <-> x86 guest B (C netfront on the emulated vCPU) through netback and the switch"


class X86DemoResult(DemoResult):
    """The PV demo's result, naming its scenario."""

    def as_json(self) -> dict[str, Any]:
        """The ``pvio demo --guest x86 --json`` object (the PV demo's schema)."""
        out = super().as_json()
        out["scenario"] = SCENARIO
        return out


def x86_mac(guest: Any, devid: int = 0) -> bytes:
    """The MAC the toolstack gave the x86 guest's vif (read from its xenstore directory)."""
    hv = guest.hv
    path = f"/local/domain/{guest.domain.domid}/device/vif/{devid}/mac"
    return parse_mac(hv.toolstack.read(path).decode())


def x86_ready(guest: Any) -> bool:
    """Whether the x86 guest's netfront is connected and its application running."""
    return any(line.startswith("ready:") for line in guest.domain.console_lines)


async def wait_x86_ready(guest: Any, switch: Switch, timeout_s: float = 10.0) -> bytes:
    """Wait for the x86 guest to be up and the switch to know its MAC; returns the MAC."""
    with trio.fail_after(timeout_s):
        while not x86_ready(guest):
            if not guest.domain.alive:
                raise RuntimeError(f"x86 guest stopped while booting: {guest.domain.crash_reason}")
            await trio.sleep(0.001)
        mac = x86_mac(guest)
        while mac not in switch.mac_table:
            await trio.sleep(0.001)
    return mac


async def run_x86_demo(timeout_s: float = 5.0, pcap: str | None = None) -> X86DemoResult:
    """Boot dom0 + PyGuest A + x86 guest B, exchange the traffic, return what was measured."""
    result = X86DemoResult()
    from pvio.cpu.guest import X86Guest

    a = NicGuest("guest-a", IP_A)
    b = X86Guest(name="guest-b-x86", cmdline=f"mode=echo ip={IP_B}")
    async with boot_network([a, b], announce=False, timeout_s=timeout_s, pcap=pcap) as net:
        mac_b = await wait_x86_ready(b, net.switch, timeout_s)
        await exchange(net.hv, a, build_traffic(a.nic.mac, mac_b), result, timeout_s)
    return result


def format_x86_table(r: DemoResult) -> str:
    """The PV demo's table, titled for this scenario."""
    lines = format_table(r).splitlines()
    lines[0] = "pvio demo: PyGuest A and an x86 guest B on the virtual switch, PV NIC (netfront/netback)"
    return "\n".join(lines)


def x86_main(argv: list[str] | None = None) -> int:
    """``pvio demo --guest x86``: the PyGuest <-> x86 guest scenario."""
    return run_main(argv, "pvio demo --guest x86", run_x86_demo, format_x86_table)
