"""Two Python guests exchange scapy-built traffic through netfront -> netback -> switch.

This is the scenario ``pvio demo`` runs; read it, change it, run it with
``python -m examples.pv_demo`` (add ``--json`` for machine-readable output).

dom0 runs netback and the virtual switch; guest A (10.0.0.1) sends ARP, ICMP echo,
UDP of several sizes up to 1500 bytes and one 6000-byte frame that needs several ring
slots; guest B (10.0.0.2) runs a minimal network stack that answers each; A checks
every answer with scapy.  Then the counters of the exchange are divided by the frames
delivered end to end (A -> B and B -> A).  Scapy builds and checks packets here, in
the scenario, never on the data path: the drivers move bytes.

The run uses trio's MockClock, so the counters are the same on every run.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import sys
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import trio
import trio.testing
from pvio.backends.capture import Capture, format_for
from pvio.backends.netback import NetBack
from pvio.backends.switch import Switch
from pvio.frontends.netfront import Netfront
from pvio.frontends.netstack import NetStack

from pvio import Hypervisor, PyGuest, Snapshot
from pvio.toolstack import add_vif

IP_A, IP_B = "10.0.0.1", "10.0.0.2"


class NicGuest(PyGuest):
    """A guest with one vif; ``ready`` is set once its netfront is Connected."""

    def __init__(self, name: str, ip: str) -> None:
        super().__init__(name)
        self.ip = ip
        self.ready = trio.Event()
        self.nic: Netfront

    async def main(self) -> None:
        self.nic = Netfront(self)
        await self.nic.connect()
        self.ready.set()


class EchoGuest(NicGuest):
    """Guest B: answers ARP, ICMP echo and UDP echo with :class:`NetStack` (bytes in, bytes out)."""

    async def main(self) -> None:
        await super().main()
        stack = NetStack(self.nic.mac, self.ip)
        while True:
            frames = await self.nic.recv_batch()
            replies = stack.handle_batch(frames)
            if replies:
                await self.nic.send_batch(replies)


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


def build_traffic(mac_a: bytes, mac_b: bytes) -> list[Probe]:
    """The scapy-built requests and their answer checks (built once, before the timed part)."""
    from scapy.layers.inet import ICMP, IP, UDP
    from scapy.layers.l2 import ARP, Ether

    a = ":".join(f"{x:02x}" for x in mac_a)
    b = ":".join(f"{x:02x}" for x in mac_b)
    probes = [
        Probe(
            "arp who-has 10.0.0.2",
            Ether(src=a, dst="ff:ff:ff:ff:ff:ff") / ARP(op=1, hwsrc=a, psrc=IP_A, pdst=IP_B),
            lambda r: ARP in r and r[ARP].op == 2 and r[ARP].psrc == IP_B and r[ARP].hwsrc == b,
        ),
        Probe(
            "icmp echo",
            Ether(src=a, dst=b) / IP(src=IP_A, dst=IP_B) / ICMP(id=7, seq=1) / (b"ping" * 8),
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
                / IP(src=IP_A, dst=IP_B)
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


def start_network(hv: Hypervisor) -> Switch:
    """dom0's side: the switch and netback (serving every vif the toolstack creates)."""
    assert hv.dom0 is not None
    switch = Switch(hv.counters)
    netback = NetBack(hv.dom0.kernel, switch)  # type: ignore[arg-type]
    hv.dom0.kernel.spawn(netback.run, name="netback")  # type: ignore[attr-defined]
    return switch


async def start_guests(hv: Hypervisor, *guests: Any) -> None:
    """Create, give a vif to, and boot each guest kernel."""
    for guest in guests:
        dom = hv.create_domain(guest, name=guest.name)
        add_vif(hv, dom)
        await hv.start(dom)


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


@contextmanager
def capturing(hv: Hypervisor, switch: Switch, pcap: str | None) -> Iterator[Capture | None]:
    """A whole-switch capture to ``pcap`` for the block (none when ``pcap`` is None; pcapng
    when the name ends in ``.pcapng``)."""
    if pcap is None:
        yield None
        return
    with Capture(switch, pcap, counters=hv.counters, format=format_for(pcap)) as capture:
        yield capture


async def run_demo(timeout_s: float = 5.0, pcap: str | None = None) -> DemoResult:
    """Boot dom0 + A + B, exchange the traffic, return what was measured.

    With ``pcap``, every frame the switch sees is written to that pcap file.
    """
    result = DemoResult()
    async with Hypervisor() as hv:
        switch = start_network(hv)
        with capturing(hv, switch, pcap):
            a, b = NicGuest("guest-a", IP_A), EchoGuest("guest-b", IP_B)
            await start_guests(hv, a, b)
            with trio.fail_after(timeout_s):
                await a.ready.wait()
                await b.ready.wait()
            await exchange(hv, a, build_traffic(a.nic.mac, b.nic.mac), result, timeout_s)
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

    ``--pcap PATH`` captures every frame the switch sees to a pcap file (tcpdump,
    Wireshark).  Exit status 1 if an answer was lost or wrong.
    """
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
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


if __name__ == "__main__":
    sys.exit(main())
