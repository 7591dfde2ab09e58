"""The PV demo with an x86 guest: a PyGuest and a guest kernel in x86-64 machine code talk.

This is what ``pvio demo --guest x86`` runs (``python -m examples.x86_demo`` too; add
``--json`` for machine-readable output).  It is the PV demo (``examples/pv_demo.py``)
with guest B replaced by pvio's C guest kernel (``frontends/x86``) running on the
emulated x86-64 vCPU (``cpu/``): its own netfront, event-channel and grant code and its
own ARP / ICMP echo / UDP echo stack, in guest memory, against the same Python netback
and switch.  Guest A (a PyGuest, 10.0.0.1) sends the same scapy-built probes, and
checks every answer with scapy; the table and the ``--json`` schema are the PV demo's.

The run uses trio's MockClock, so the counters are the same on every run.
"""

from __future__ import annotations

import sys
from typing import Any

import trio
import trio.testing
from pvio.backends.switch import Switch
from pvio.cpu.guest import X86Guest

from examples.pv_demo import (
    IP_A,
    IP_B,
    DemoResult,
    NicGuest,
    build_traffic,
    capturing,
    exchange,
    format_table,
    run_main,
    start_guests,
    start_network,
)
from pvio import Hypervisor
from pvio.toolstack import parse_mac

SCENARIO = "pv: PyGuest A <-> x86 guest B (C netfront on the emulated vCPU) through netback and the switch"


class X86DemoResult(DemoResult):
    """The PV demo's result, naming its scenario."""

    def as_json(self) -> dict[str, Any]:
        """The ``pvio demo --guest x86 --json`` object (the PV demo's schema)."""
        out = super().as_json()
        out["scenario"] = SCENARIO
        return out


def x86_mac(guest: X86Guest, devid: int = 0) -> bytes:
    """The MAC the toolstack gave the x86 guest's vif (read from its xenstore directory)."""
    hv = guest.hv
    path = f"/local/domain/{guest.domain.domid}/device/vif/{devid}/mac"
    return parse_mac(hv.toolstack.read(path).decode())


def x86_ready(guest: X86Guest) -> bool:
    """Whether the x86 guest's netfront is connected and its application running."""
    return any(line.startswith("ready:") for line in guest.domain.console_lines)


async def wait_x86_ready(guest: X86Guest, switch: Switch, timeout_s: float = 10.0) -> bytes:
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


async def run_demo(timeout_s: float = 5.0, pcap: str | None = None) -> X86DemoResult:
    """Boot dom0 + PyGuest A + x86 guest B, exchange the traffic, return what was measured.

    With ``pcap``, every frame the switch sees is written to that pcap file.
    """
    result = X86DemoResult()
    async with Hypervisor() as hv:
        switch = start_network(hv)
        with capturing(hv, switch, pcap):
            a = NicGuest("guest-a", IP_A)
            b = X86Guest(name="guest-b-x86", cmdline=f"mode=echo ip={IP_B}")
            await start_guests(hv, a, b)
            with trio.fail_after(timeout_s):
                await a.ready.wait()
            mac_b = await wait_x86_ready(b, switch, timeout_s)
            await exchange(hv, a, build_traffic(a.nic.mac, mac_b), result, timeout_s)
    return result


def format_x86_table(r: DemoResult) -> str:
    """The PV demo's table, titled for this scenario."""
    lines = format_table(r).splitlines()
    lines[0] = "pvio demo: PyGuest A and an x86 guest B on the virtual switch, PV NIC (netfront/netback)"
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """``pvio demo --guest x86``: the PyGuest <-> x86 guest scenario."""
    return run_main(argv, "pvio demo --guest x86", run_demo, format_x86_table)


if __name__ == "__main__":
    sys.exit(main())
