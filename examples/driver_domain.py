"""A driver domain: the vifs' backend (netback and a switch) in an OS process of its own.

Run it: ``python examples/driver_domain.py``.  Two Python guests in the hypervisor's process
exchange scapy-built packets through a driver domain, which grant-copies every frame in its
own process over the guests' RAM the hypervisor handed it.  Then the driver domain's process
is killed: only that domain stops, its mappings of the guests' pages are revoked, and the
hypervisor and the guests run on.
"""

import os
import signal

import trio
from scapy.layers.inet import ICMP, IP, UDP
from scapy.layers.l2 import Ether

from pvio import Hypervisor, format_mac
from pvio.frontends.guests import EchoGuest, NicGuest
from pvio.remote.backend import add_driver_vif, start_driver_domain


async def main() -> None:
    a = NicGuest("a", "10.0.0.1")
    b = EchoGuest("b", "10.0.0.2")  # answers ARP, ICMP echo and UDP echo (port 7)
    async with Hypervisor() as hv:
        driver = await start_driver_domain(hv, vifs=2)
        for guest in (a, b):
            guest.shared_memory = True  # its RAM a memfd: the driver domain's process maps it
            dom = hv.create_domain(guest, name=guest.name)
            add_driver_vif(hv, dom, driver)  # the vif's backend is the driver domain
            await hv.start(dom)
        with trio.fail_after(30):
            await a.ready.wait()
            await b.ready.wait()
        print(f"driver domain dom{driver.domain.domid} (process {driver.process.pid}) serves "
              f"{sorted(await driver.call('vifs'))}")  # fmt: skip
        before = await driver.call("counters")
        probes = [
            IP(src=a.ip, dst=b.ip) / ICMP(id=1, seq=1) / b"hello driver domain",
            IP(src=a.ip, dst=b.ip) / UDP(sport=4000, dport=7) / (b"x" * 1000),
        ]
        for probe in probes:
            frame = Ether(src=format_mac(a.nic.mac), dst=format_mac(b.nic.mac)) / probe
            await a.nic.send(bytes(frame))
            with trio.fail_after(30):
                answer = Ether(await a.nic.recv())
            print(f"sent {probe.summary()!r}\n  got {answer.summary()!r}")
        after = await driver.call("counters")
        own = f"dom{driver.domain.domid}"
        copies = after["domains"][own]["grant.copies"] - before["domains"][own].get("grant.copies", 0)
        frames = 2 * len(probes)
        print(f"per frame: {copies / frames:.2f} grant copies, made in the driver domain's process")

        os.kill(driver.process.pid, signal.SIGKILL)
        with trio.fail_after(30):
            while driver.domain.alive:
                await trio.sleep(0.01)
        print(f"driver domain stopped: {driver.domain.crash_reason}")
        mapped = len(a.domain.mapped_by_others) + len(b.domain.mapped_by_others)
        print(f"guests still running: {a.domain.alive and b.domain.alive}; "
              f"their pages still mapped by others: {mapped}")  # fmt: skip


if __name__ == "__main__":
    trio.run(main)
