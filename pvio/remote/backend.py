"""A driver domain: netback and its switch in an OS process of their own.

Xen lets a vif's backend live in a domain other than dom0 (a *driver domain*: the vif's
``backend`` names it).  :class:`DriverDomain` is that domain's kernel, run by
:class:`~pvio.remote.RemoteGuest` with ``foreign_memory``: an unchanged
:class:`~pvio.backends.netback.NetBack` and :class:`~pvio.backends.switch.Switch` on the
child's trio loop, serving every vif whose backend directory the toolstack puts under
``/local/domain/<its domid>/backend/vif``.  Its grant copies run in its own process (the C
fast path over its RAM and the frontends', which the host hands it as it maps their rings),
so a stream's per-frame backend work leaves the hypervisor's CPU; the frontends, the
hypercall table and the event channels stay with the hypervisor.

:func:`start_driver_domain` boots one; :func:`add_driver_vif` gives a domain a vif served
by it (the domain's kernel must have ``shared_memory``: a backend in another process can
map only RAM that is a memfd).  The host reaches the driver domain's application through
``RemoteGuest.call``: ``counters`` (its process's counters: netback's vifs, the switch,
its domain's grant copies), ``macs`` (what the switch has learnt), ``mappings`` (the grant
mappings its process holds) and ``vifs`` (each vif's connection and error).

Its process crashing or being killed is that domain's crash: the hypervisor destroys it
(its ports, mappings and store presence go), the frontends see their backend vanish, and
the hypervisor and every other domain run on.
"""

from __future__ import annotations

from typing import Any

import trio

from pvio.backends.netback import RX_QUEUE_BYTES, RX_QUEUE_MAX, NetBack
from pvio.backends.switch import Switch
from pvio.core.domain import Domain
from pvio.core.hypervisor import Hypervisor
from pvio.guest import PyGuest
from pvio.remote.child import child_counters
from pvio.remote.host import RemoteGuest
from pvio.toolstack import VifConfig, add_vif, dom0_pages_for

KERNEL = "pvio.remote.backend:DriverDomain"


class DriverDomain(PyGuest):
    """The kernel of a driver domain (in its own process): a switch and netback.

    ``busy_poll``: netback's empty polls before it re-arms and sleeps (a domain with a CPU
    of its own: while it polls, the frontends need not notify it)."""

    def __init__(
        self,
        name: str = "driver",
        rx_queue_max: int = RX_QUEUE_MAX,
        rx_queue_bytes: int = RX_QUEUE_BYTES,
        busy_poll: int = 0,
        backend: str | None = None,
        backend_options: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(name)
        self.ready = trio.Event()
        self.switch: Switch
        self.netback: NetBack
        self._options: dict[str, Any] = {
            "rx_queue_max": rx_queue_max,
            "rx_queue_bytes": rx_queue_bytes,
            "backend": backend,
            "backend_options": backend_options,
        }
        self.busy_poll = busy_poll

    async def main(self) -> None:
        self.switch = Switch(self.hv.counters)
        self.netback = NetBack(self, self.switch, **self._options)
        self.netback.busy_poll = self.busy_poll
        self.spawn(self.netback.run, name="netback")
        self.ready.set()

    async def remote_call(self, op: str, **params: Any) -> Any:
        """One request from the host (see the module doc)."""
        if op == "counters":
            return child_counters(self)
        if op == "macs":
            return sorted(mac.hex() for mac in self.switch.mac_table)
        if op == "mappings":  # the grant mappings this process holds: [granter domid, ref]
            return sorted([m.granter.domid, m.ref] for m in self.domain.maptrack.values())
        if op == "vifs":
            return {
                vif.vif_name: {"connected": vif.connected, "error": vif.error}
                for vif in [*self.netback.vifs.values(), *self.netback.ended]
            }
        raise ValueError(f"unknown call {op!r}")


async def start_driver_domain(
    hv: Hypervisor,
    *,
    name: str = "driver",
    vifs: int = 2,
    rx_queue_max: int = RX_QUEUE_MAX,
    rx_queue_bytes: int = RX_QUEUE_BYTES,
    busy_poll: int = 0,
    backend: str | None = None,
    backend_options: dict[str, Any] | None = None,
    cpus: set[int] | None = None,
    timeout_s: float = 30.0,
) -> RemoteGuest:
    """Create and boot a driver domain sized for ``vifs`` vifs; returns once its netback runs.

    ``backend``/``backend_options``: a custom backend (a ``pvio.backends`` entry-point name)
    for its vifs, as netback's in dom0 takes them; it runs in the driver domain's process, so
    a backend that crashes that process stops only the driver domain."""
    guest = RemoteGuest(
        KERNEL,
        name,
        args={
            "name": name,
            "rx_queue_max": rx_queue_max,
            "rx_queue_bytes": rx_queue_bytes,
            "busy_poll": busy_poll,
            "backend": backend,
            "backend_options": backend_options,
        },
        memory_pages=dom0_pages_for(vifs, rx_queue_bytes),
        foreign_memory=True,
        cpus=cpus,
    )
    dom = hv.create_domain(guest, name=name)
    await hv.start(dom)
    with trio.fail_after(timeout_s):
        while not guest.ready.is_set():
            if not dom.alive:
                raise RuntimeError(f"driver domain {name} stopped while booting: {dom.crash_reason}")
            await trio.sleep(0.01)
    return guest


def add_driver_vif(hv: Hypervisor, frontend: Domain, driver: RemoteGuest, devid: int = 0) -> VifConfig:
    """Give ``frontend`` a vif whose backend is the driver domain (xl's ``vif = ['backend=...']``)."""
    if frontend.mem.fd is None:
        raise ValueError(
            f"{frontend.name}: a vif served from another process needs the guest's RAM in a memfd "
            f"(give its kernel shared_memory = True)"
        )
    return add_vif(hv, frontend, devid, backend=driver.domain)
