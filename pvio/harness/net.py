"""A pvio network that meets the host: guests on the switch, plus TAP, VXLAN, capture and xenstore.

This is what ``pvio net`` runs.  It boots dom0
(netback and the switch) and ``--guests`` echo guests (PyGuests answering ARP, ICMP echo
and UDP echo on port 7, at 10.0.0.1, 10.0.0.2, ... or from ``--first-ip``; ``--x86`` adds
pvio's x86 guest kernel at the next address; guest 10.0.0.N has MAC 00:16:3e:00:00:N),
then attaches what was asked for:

- ``--tap IFNAME``: a TAP device on the switch; give it an address on the host
  (``ip addr add 10.0.0.254/24 dev IFNAME; ip link set IFNAME up``) and ``ping 10.0.0.1``;
- ``--vxlan VNI --local HOST:PORT --remote HOST:PORT``: a VXLAN port to another pvio or
  a Linux ``vxlan`` device (``--remote`` may repeat);
- ``--pcap PATH``: a capture of the whole switch (pcapng if PATH ends in ``.pcapng``);
- ``--xenstore-socket PATH``: the live store for ``XENSTORED_PATH=PATH xenstore-ls``.

A port that cannot be created is reported in one line and the rest runs on.  It prints
one line per guest and port, then ``ready``, and runs (real clock) until SIGINT/SIGTERM
or ``--duration`` seconds; then it prints the edge ports' counters.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from typing import Any

import trio

from pvio import Hypervisor
from pvio.backends.capture import Capture, format_for
from pvio.backends.tap import TapError, TapPort
from pvio.backends.vxlan import VXLAN_PORT, VxlanError, VxlanPort
from pvio.cpu.guest import X86Guest
from pvio.frontends.guests import EchoGuest
from pvio.harness.demo import wait_x86_ready
from pvio.toolstack import NicConfig, start_network
from pvio.xenstore.unix_socket import XenstoreSocketServer


def _address(text: str, default_port: int = VXLAN_PORT) -> tuple[str, int]:
    """``HOST``, ``HOST:PORT``, ``IPV6`` or ``[IPV6]:PORT`` as (host, port)."""
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        return host, int(rest[1:]) if rest.startswith(":") else default_port
    if text.count(":") > 1:  # a bare IPv6 address
        return text, default_port
    host, sep, port = text.rpartition(":")
    return (host, int(port)) if sep else (text, default_port)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from pvio.harness.cli import OneLineParser

    parser = OneLineParser(prog="pvio net", description=__doc__.splitlines()[0])
    parser.add_argument("--guests", type=int, default=1, help="echo PyGuests (default 1, at most 200)")
    parser.add_argument("--x86", action="store_true", help="add an x86 echo guest")
    parser.add_argument(
        "--first-ip", type=int, default=1, metavar="N", help="guests from 10.0.0.N (default 1)"
    )
    parser.add_argument("--tap", metavar="IFNAME", help="attach a TAP device")
    parser.add_argument("--vxlan", type=int, metavar="VNI", help="attach a VXLAN port for network VNI")
    parser.add_argument(
        "--local", default=f"0.0.0.0:{VXLAN_PORT}", help="the VXLAN port's HOST:PORT ([IPV6]:PORT)"
    )
    parser.add_argument(
        "--remote", action="append", default=[], help="a remote VTEP HOST[:PORT] (repeatable)"
    )
    parser.add_argument("--pcap", metavar="PATH", help="capture the whole switch")
    parser.add_argument("--xenstore-socket", metavar="PATH", help="serve the store on a Unix socket")
    parser.add_argument("--duration", type=float, help="stop after this many seconds")
    args = parser.parse_args(argv)
    if not 0 <= args.guests <= 200 or not 1 <= args.first_ip <= 254 - args.guests - args.x86:
        parser.error("the guests' addresses must fit in 10.0.0.1-254")
    return args


async def run(args: argparse.Namespace) -> int:
    edges: list[Any] = []
    async with Hypervisor() as hv, trio.open_nursery() as nursery:
        guests: list[Any] = [
            EchoGuest(f"guest-{i + 1}", f"10.0.0.{args.first_ip + i}") for i in range(args.guests)
        ]
        if args.x86:
            ip = f"10.0.0.{args.first_ip + args.guests}"
            x86 = X86Guest(name="guest-x86", cmdline=f"mode=echo ip={ip}")
            x86.ip = ip  # type: ignore[attr-defined]
            guests.append(x86)
        # The MAC follows the address (00:16:3e:00:00:N for 10.0.0.N), so pvio instances on
        # several hosts joined by VXLAN never share one as long as their addresses differ.
        nics = [NicConfig(mac=f"00:16:3e:00:00:{args.first_ip + i:02x}") for i in range(len(guests))]
        net = await start_network(hv, guests, nics=nics, announce=False, timeout_s=30)
        switch = net.switch
        with trio.fail_after(30):
            for g in guests:
                if isinstance(g, X86Guest):
                    mac = await wait_x86_ready(g, switch, 30)
                    print(f"guest {g.name} {getattr(g, 'ip', '')} mac {mac.hex(':')} (x86)", flush=True)
                else:
                    await g.ready.wait()
                    print(f"guest {g.name} {g.ip} mac {g.nic.mac.hex(':')}", flush=True)
        if args.tap:
            try:
                tap = TapPort(switch, args.tap, counters=hv.counters)
            except TapError as e:
                print(f"error: {e}; running without it", flush=True)
            else:
                edges.append(tap)
                nursery.start_soon(tap.run)
                print(f"tap {tap.ifname}", flush=True)
        if args.vxlan is not None:
            try:
                remotes = [_address(r) for r in args.remote]
                vx = VxlanPort(
                    switch, args.vxlan, local=_address(args.local), remotes=remotes, counters=hv.counters
                )
            except (VxlanError, ValueError) as e:
                print(f"error: {e}; running without it", flush=True)
            else:
                edges.append(vx)
                nursery.start_soon(vx.run)
                print(f"vxlan {vx.vni} on {vx.local[0]}:{vx.local[1]} to {remotes}", flush=True)
        capture = None
        if args.pcap:
            try:
                fmt = format_for(args.pcap)
                capture = Capture(switch, args.pcap, counters=hv.counters, format=fmt).start()
                print(f"capture to {args.pcap}", flush=True)
            except OSError as e:
                print(f"error: capture {args.pcap}: {e.strerror or e}; running without it", flush=True)
        if args.xenstore_socket:
            server = XenstoreSocketServer(hv.store, args.xenstore_socket)
            try:
                await nursery.start(server.serve)
                print(f"xenstore on {args.xenstore_socket}", flush=True)
            except OSError as e:
                print(f"error: {e}; running without it", flush=True)
        print("ready", flush=True)
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            with trio.move_on_after(args.duration if args.duration is not None else float("inf")):
                async for _ in signals:
                    break
        if capture is not None:
            capture.stop()
            print(f"capture: {capture.counters['packets']} frames", flush=True)
        for port in edges:
            print(f"{port.name}: {dict(sorted(port.counters.items()))}", flush=True)
            port.close()
        nursery.cancel_scope.cancel()
    return 0


def main(argv: list[str] | None = None) -> int:
    """``pvio net``: run until interrupted."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    return trio.run(run, args)


if __name__ == "__main__":
    sys.exit(main())
