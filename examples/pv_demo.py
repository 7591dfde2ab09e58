"""Two Python guests on pvio's virtual switch: A sends scapy-built packets, B answers them.

Run it: ``python examples/pv_demo.py``.  The whole stack is real: each guest's netfront
grants its buffers and posts them on shared rings, netback in dom0 grant-copies the frames,
the switch forwards them; every interrupt, hypercall and copy is counted.  ``pvio demo``
runs a longer version of this scenario and prints a table.
"""

import trio
from scapy.layers.inet import ICMP, IP, UDP
from scapy.layers.l2 import Ether

from pvio import format_mac
from pvio.frontends.guests import EchoGuest, NicGuest
from pvio.toolstack import boot_network


async def main() -> None:
    a = NicGuest("a", "10.0.0.1")
    b = EchoGuest("b", "10.0.0.2")  # answers ARP, ICMP echo and UDP echo (port 7)
    async with boot_network([a, b]) as net:
        before = net.snapshot()
        probes = [
            IP(src=a.ip, dst=b.ip) / ICMP(id=1, seq=1) / b"hello pvio",
            IP(src=a.ip, dst=b.ip) / UDP(sport=4000, dport=7) / (b"x" * 1000),
        ]
        for probe in probes:
            frame = Ether(src=format_mac(a.nic.mac), dst=format_mac(b.nic.mac)) / probe
            await a.nic.send(bytes(frame))  # scapy builds the bytes; the drivers move bytes
            answer = Ether(await a.nic.recv())
            print(f"sent {probe.summary()!r}\n  got {answer.summary()!r}")
        cost = net.snapshot().diff(before)
        frames = 2 * len(probes)  # each probe and its answer
        print(
            f"per frame: {cost.total('interrupts', 'domain') / frames:.2f} interrupts, "
            f"{cost.total('hypercalls', 'domain') / frames:.2f} hypercalls, "
            f"{cost.total('grant.copies', 'domain') / frames:.2f} grant copies"
        )


if __name__ == "__main__":
    trio.run(main)
