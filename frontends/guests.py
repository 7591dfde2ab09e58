"""Ready-made Python guest kernels with one vif: what demos, benchmarks and tests boot.

- :class:`NicGuest` connects its netfront and sets ``ready``; the caller drives ``nic``
  (``send``, ``recv``, ``send_batch``, ``recv_batch``).
- :class:`EchoGuest` also answers ARP, ICMP echo and UDP echo (port 7) with
  :class:`~pvio.frontends.netstack.NetStack`: bytes in, bytes out, no scapy.
"""

from __future__ import annotations

import trio

from pvio.frontends.netfront import Netfront
from pvio.frontends.netstack import NetStack
from pvio.guest import PyGuest


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
    """Answers ARP, ICMP echo and UDP echo with :class:`NetStack`."""

    async def main(self) -> None:
        await super().main()
        stack = NetStack(self.nic.mac, self.ip)
        while True:
            frames = await self.nic.recv_batch()
            replies = stack.handle_batch(frames)
            if replies:
                await self.nic.send_batch(replies)
