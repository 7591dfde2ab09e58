"""Ready-made Python guest kernels with one vif: what demos, benchmarks and tests boot.

- :class:`NicGuest` connects its netfront and sets ``ready``; the caller drives ``nic``
  (``send``, ``recv``, ``send_batch``, ``recv_batch``).
- :class:`EchoGuest` also answers ARP, ICMP echo and UDP echo (port 7) with
  :class:`~pvio.frontends.netstack.NetStack`: bytes in, bytes out, no scapy.
- :class:`ModelGuest` is either of them with a NIC of any device model (``pv``,
  ``emulated``, ``smartnic``): what the benchmark and scenario files boot.
"""

from __future__ import annotations

import logging
from typing import Any

import trio

from pvio.frontends.netfront import Netfront, NetfrontError
from pvio.frontends.netstack import NetStack
from pvio.guest import PyGuest
from pvio.xenstore.store import XenstoreError
from pvio.xenstore.wire import XenbusState

log = logging.getLogger("pvio.guests")


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
        await echo_forever(self.nic, self.ip)


async def echo_forever(nic: Any, ip: str) -> None:
    """Answer ARP, ICMP echo and UDP echo arriving on ``nic`` until cancelled."""
    stack = NetStack(nic.mac, ip)
    while True:
        frames = await nic.recv_batch()
        replies = stack.handle_batch(frames)
        if replies:
            await nic.send_batch(replies)


class ModelGuest(PyGuest):
    """A PyGuest with one NIC of ``model``; ``ready`` once its driver is connected.

    ``app="echo"`` makes it answer like :class:`EchoGuest`.  Driver options:
    ``use_mmio=True`` (emulated NIC through MMIO instead of ports), ``moderation=(mode,
    frames, usecs)`` (smart NIC).
    """

    def __init__(
        self,
        name: str,
        ip: str,
        model: str = "pv",
        *,
        app: str = "nic",
        hotplug: bool = False,
        **options: Any,
    ) -> None:
        super().__init__(name)
        self.ip = ip
        self.model = model
        self.app = app
        self.hotplug = hotplug
        self.options = options
        self.ready = trio.Event()
        self.nic: Any = None
        #: Every connected vif by device id (``nic`` is vif 0); hot-plugged ones join it.
        self.nics: dict[int, Any] = {}

    async def main(self) -> None:
        if self.model == "pv":
            self.nic = Netfront(self)
        elif self.model == "emulated":
            from pvio.frontends.emulated_nic_driver import EmulatedNicDriver

            self.nic = EmulatedNicDriver(self, use_mmio=bool(self.options.get("use_mmio", False)))
        else:
            from pvio.frontends.smartnic_driver import SmartNicDriver

            self.nic = SmartNicDriver(self, moderation=self.options.get("moderation"))
        await self.nic.connect()
        self.nics[0] = self.nic
        self.ready.set()
        if self.hotplug and self.model == "pv":
            self.spawn(self._hotplug, name=f"{self.name}-hotplug")
        if self.app == "echo":
            await echo_forever(self.nic, self.ip)

    async def _hotplug(self) -> None:
        """Like Linux's xenbus frontend probe: watch ``device/vif`` and connect each vif the
        toolstack adds (``pvio network-attach``); close a vif whose backend starts closing
        (``pvio network-detach``)."""
        xb = self.xenbus
        base = f"/local/domain/{self.domain.domid}/device/vif"
        unplugged: set[int] = set()  # closed vifs whose directories are not gone yet
        self.spawn(self._until_unplugged, self.nic, name=f"{self.nic.name}-unplug")
        async with await xb.watch(base) as watch:
            async for _ in watch:
                try:
                    present = {int(d) for d in await xb.directory(base)}
                except Exception:  # the directory went away with the last vif
                    present = set()
                unplugged &= present  # a device id whose directory went away may come back
                for devid in sorted(present - set(self.nics) - unplugged):
                    nic = Netfront(self, devid)
                    self.nics[devid] = nic
                    self.spawn(self._plug, nic, unplugged, name=f"{nic.name}-plug")

    async def _plug(self, nic: Netfront, unplugged: set[int]) -> None:
        """Connect a hot-plugged vif and serve it until it is unplugged.  A vif the toolstack
        takes away (or a backend refuses) while it connects is given up, logged: never a crash."""
        try:
            await nic.connect()
            await self._until_unplugged(nic)
        except (XenstoreError, NetfrontError) as e:
            log.warning("%s: hot-plugged vif %d given up: %s", self.name, nic.devid, e)
        finally:
            self.nics.pop(nic.devid, None)
            unplugged.add(nic.devid)

    async def _until_unplugged(self, nic: Netfront) -> None:
        """Wait for the toolstack to unplug the vif (backend Closing with ``online`` 0), then close
        it from this side and forget it.  A backend that closes with ``online`` still 1 lost its
        driver: the netfront reconnects by itself."""
        xb = self.xenbus
        while True:
            await xb.wait_for_state(f"{nic.backend}/state", {XenbusState.CLOSING, XenbusState.CLOSED})
            try:
                if (await xb.read(f"{nic.backend}/online")).strip() == "0":
                    break
            except XenstoreError:
                break
            await xb.wait_for_state(f"{nic.backend}/state", {XenbusState.CONNECTED, XenbusState.UNKNOWN})
        await nic.close()
        self.nics.pop(nic.devid, None)
