"""The PV demo with Debian's Linux as guest B: its real xen-netfront against pvio's netback.

``pvio demo --guest linux`` (add ``--json`` for the PV demo's JSON schema plus a ``linux``
section).  Guest A (a PyGuest, 10.0.0.1) sends scapy-built ARP, ICMP echo and UDP probes
to Linux (10.0.0.2) and checks every answer of Linux's own stack with scapy; before that
Linux pings guest C (a PyGuest echo responder, 10.0.0.3) from its own shell.  The table
adds what the real driver cost per frame delivered: the Linux domain's exits by kind,
hypercalls and upcalls.

Unlike the other demos this one runs on the real clock: Linux keeps time with the host's
TSC, which trio's MockClock cannot move.  Probes stay within one Ethernet frame (Linux
fragments larger datagrams at its MTU, which a one-frame check cannot follow).
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import trio
import trio.testing

from pvio.abi.vif import format_mac
from pvio.core.hypervisor import Hypervisor
from pvio.frontends.guests import EchoGuest, NicGuest
from pvio.toolstack import parse_mac, start_network

IP_C = "10.0.0.3"
LINUX_PINGS = 5
LINUX_EXITS = ("exits.hypercall", "exits.page_fault", "exits.syscall", "exits.pio", "exits.mmio", "exits.hlt")
SCENARIO = "pv: PyGuest A <-> Debian Linux B (real xen-netfront) through netback and the switch"


def _demo_base() -> Any:
    from pvio.harness import demo  # the shared demo pieces (probes, exchange, table)

    return demo


@dataclass
class LinuxDemoResult:
    """The PV demo's result plus what Linux itself reported."""

    base: Any
    boot_s: float = 0.0
    ping_sent: int = 0
    ping_received: int = 0
    ping_rtt_avg_ms: float | None = None
    linux_domain: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def linux_per_packet(self) -> dict[str, float]:
        """The Linux domain's exits by kind, hypercalls and upcalls per frame delivered."""
        c = self.base.counters
        if c is None or self.linux_domain not in c.domains():
            return {}
        dom = c.domains()[self.linux_domain]
        n = max(self.base.delivered, 1)
        keys = (*LINUX_EXITS, "hypercalls", "interrupts")
        return {k: round(dom.get(k, 0) / n, 3) for k in keys}

    def as_json(self) -> dict[str, Any]:
        """The ``pvio demo --guest linux --json`` object."""
        out: dict[str, Any] = self.base.as_json()
        out["scenario"] = SCENARIO
        out["linux"] = {
            "boot_to_shell_s": round(self.boot_s, 2),
            "ping": {
                "sent": self.ping_sent,
                "received": self.ping_received,
                "rtt_avg_ms": self.ping_rtt_avg_ms,
            },
            "per_packet": self.linux_per_packet(),
            **self.extra,
        }
        return out

    @property
    def ok(self) -> bool:
        """Every probe answered correctly and Linux's ping lost nothing."""
        base = self.base
        return (
            base.lost == 0
            and all(ok for _, _, ok in base.checked)
            and self.ping_sent == LINUX_PINGS
            and self.ping_received == LINUX_PINGS
        )


def linux_probes(mac_a: bytes, mac_b: bytes) -> list[Any]:
    """Scapy-built probes and the checks of Linux's real answers.

    ARP and ICMP echo (small and a full 1500-byte frame) are answered by Linux's stack;
    a UDP datagram to a closed port must come back as ICMP port unreachable quoting it
    (BusyBox has no UDP echo service, and Linux's answer is the interesting one).
    """
    from scapy.layers.inet import ICMP, IP, UDP, UDPerror
    from scapy.layers.l2 import ARP, Ether

    base = _demo_base()
    ip_a, ip_b = base.IP_A, base.IP_B
    a, b = format_mac(mac_a), format_mac(mac_b)
    probes = [
        base.Probe(
            f"arp who-has {ip_b}",
            Ether(src=a, dst="ff:ff:ff:ff:ff:ff") / ARP(op=1, hwsrc=a, psrc=ip_a, pdst=ip_b),
            lambda r: ARP in r and r[ARP].op == 2 and r[ARP].psrc == ip_b and r[ARP].hwsrc == b,
        )
    ]
    for size in (32, 512, 1472):
        payload = bytes((i * 5 + size) & 0xFF for i in range(size))
        probes.append(
            base.Probe(
                f"icmp echo {size} B",
                Ether(src=a, dst=b) / IP(src=ip_a, dst=ip_b) / ICMP(id=7, seq=size) / payload,
                lambda r, p=payload, q=size: (
                    ICMP in r and r[ICMP].type == 0 and r[ICMP].seq == q and bytes(r[ICMP].payload) == p
                ),
            )
        )
    for size in (18, 1024):
        probes.append(
            base.Probe(
                f"udp {size} B to a closed port",
                Ether(src=a, dst=b)
                / IP(src=ip_a, dst=ip_b)
                / UDP(sport=40000 + size, dport=9999)
                / bytes(size),
                lambda r, s=40000 + size: (
                    ICMP in r
                    and r[ICMP].type == 3
                    and r[ICMP].code == 3
                    and UDPerror in r
                    and r[UDPerror].sport == s
                ),
            )
        )
    return probes


async def linux_exchange(
    hv: Hypervisor, sender: Any, probes: list[Any], result: Any, timeout_s: float
) -> int:
    """Send each probe, wait for the frame its check accepts; answer Linux's own ARP requests.

    Linux may ARP for the sender or re-check a neighbour while the probes run; such frames
    are answered (ARP for the sender's address) or set aside, not taken as the answer.
    Returns the number of frames set aside.
    """
    from scapy.layers.l2 import ARP, Ether

    ip_a = _demo_base().IP_A
    frames = [bytes(p.packet) for p in probes]
    await trio.testing.wait_all_tasks_blocked()
    before = hv.snapshot()
    aside = 0
    for probe, frame in zip(probes, frames, strict=True):
        await sender.nic.send(frame)
        result.sent += 1
        ok = False
        answered = False
        with trio.move_on_after(timeout_s):
            while True:
                answer = Ether(await sender.nic.recv())
                if probe.check(answer):
                    ok = answered = True
                    break
                if ARP in answer and answer[ARP].op == 1 and answer[ARP].pdst == ip_a:
                    mac = format_mac(sender.nic.mac)
                    reply = Ether(src=mac, dst=answer.src) / ARP(
                        op=2, hwsrc=mac, psrc=ip_a, hwdst=answer[ARP].hwsrc, pdst=answer[ARP].psrc
                    )
                    await sender.nic.send(bytes(reply))
                aside += 1
        result.received += int(answered)
        result.checked.append((probe.name, len(frame), ok))
    result.counters = hv.snapshot().diff(before)
    return aside


def parse_ping(text: str) -> tuple[int, int, float | None]:
    """(transmitted, received, average RTT ms) from BusyBox ping's summary."""
    m = re.search(r"(\d+) packets transmitted, (\d+) packets received", text)
    rtt = re.search(r"min/avg/max = [\d.]+/([\d.]+)/", text)
    if m is None:
        return 0, 0, None
    return int(m.group(1)), int(m.group(2)), float(rtt.group(1)) if rtt else None


async def run_demo(boot_timeout_s: float = 240.0, timeout_s: float = 10.0) -> LinuxDemoResult:
    """Boot dom0, PyGuests A and C and Linux B; Linux pings C; A probes Linux."""
    from pvio.cpu.linux import LinuxGuest

    base_mod = _demo_base()
    result = LinuxDemoResult(base=base_mod.DemoResult())
    async with Hypervisor() as hv:
        a = NicGuest("guest-a", base_mod.IP_A)
        c = EchoGuest("guest-c", IP_C)
        b = LinuxGuest(
            name="guest-b-linux",
            ip=f"{base_mod.IP_B}/24",
            scenario=f"ping -c {LINUX_PINGS} -W 5 {IP_C}\n",
        )
        t0 = time.monotonic()
        net = await start_network(hv, [a, c, b], announce=False, wait_ready=[a, c], timeout_s=timeout_s)
        switch = net.switch
        if not await b.wait_for("PVIO-END", boot_timeout_s):
            raise RuntimeError(f"Linux did not finish its scenario: {b.domain.crash_reason or 'timeout'}")
        result.boot_s = time.monotonic() - t0
        result.linux_domain = f"dom{b.domain.domid}"
        result.ping_sent, result.ping_received, result.ping_rtt_avg_ms = parse_ping(b.scenario_output() or "")
        mac_b = parse_mac(hv.toolstack.read(f"/local/domain/{b.domain.domid}/device/vif/0/mac").decode())
        # Teach the switch A's MAC, and let Linux learn it, before the measured exchange.
        await a.nic.send(a.nic.mac + a.nic.mac + b"\x88\xb5" + bytes(46))
        while mac_b not in switch.mac_table:
            await trio.sleep(0.01)
        result.extra["frames_set_aside"] = await linux_exchange(
            hv, a, linux_probes(a.nic.mac, mac_b), result.base, timeout_s
        )
    return result


def format_table(r: LinuxDemoResult) -> str:
    """The PV demo's table, titled for Linux, plus Linux's own figures."""
    lines = _demo_base().format_table(r.base).splitlines()
    lines[0] = "pvio demo: PyGuest A and Debian's Linux B on the virtual switch, Linux's own xen-netfront"
    lines += [
        "",
        f"Linux: shell after {r.boot_s:.1f} s; ping guest C: {r.ping_received}/{r.ping_sent} answered",
    ]
    if r.ping_rtt_avg_ms is not None:
        lines[-1] += f", average RTT {r.ping_rtt_avg_ms:.2f} ms"
    lines.append(f"Linux domain ({r.linux_domain}) per frame delivered:")
    for key, value in r.linux_per_packet().items():
        lines.append(f"  {key:<33}{value:>10.3f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """``pvio demo --guest linux``: exit status 1 if a probe or a ping went unanswered."""
    from pvio.cpu.debian import DebianUnavailable

    parser = argparse.ArgumentParser(prog="pvio demo --guest linux", description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        result = trio.run(run_demo)
    except DebianUnavailable as e:
        print(f"pvio demo --guest linux: {e}", file=sys.stderr)
        return 2
    print(json.dumps(result.as_json(), indent=2, sort_keys=True) if args.json else format_table(result))
    return 0 if result.ok else 1
