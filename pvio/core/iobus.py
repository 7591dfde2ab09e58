"""The I/O bus: routes a guest's port I/O and MMIO exits to device models in the monitor.

Design rationale
----------------
A trap-and-emulate device (``backends/emulated_nic.py``) and the register window of the
smart NIC (``backends/smartnic.py``) live in the monitor.  A guest reaches them with an
``in``/``out`` instruction or a load/store to an address that is not RAM; each such access
is an *exit*: control leaves the guest, the monitor decodes it and calls the device.  The
bus is the one place where that happens, for every kind of guest:

- a PyGuest calls ``inb``/``outl``/``mmio_read``... (:mod:`pvio.guest`), which call the
  bus directly;
- an x86 guest's vCPU (``cpu/``) traps ``in``/``out`` and faults on addresses for which
  :meth:`IoBus.is_mmio` is true, and calls the same four entry points.

So an access costs the same, and is counted the same, whoever makes it: each bumps the
domain's ``exits`` and ``exits.pio`` or ``exits.mmio`` (the counter schema of
:mod:`pvio.core.counters`).

Devices register ranges *per domain* (each guest has its own emulated NIC at the same
well-known port, as each PC has its own): ``register_pio(dom, base, length, device)`` and
``register_mmio(...)``.  A device is any object with ``read(offset, size) -> int`` and
``write(offset, size, value)`` (:class:`IoDevice`); the bus passes the offset from the
start of the range, so one device can be registered in both spaces with the same map.

Hostile or careless guests: an access nobody claims reads all-ones (what an ISA bus or a
PCI master abort gives) and a write to it is dropped, counted ``iobus.unclaimed_pio`` /
``iobus.unclaimed_mmio``; an access size other than 1, 2, 4 (or 8 for MMIO) is treated
the same and counted ``iobus.bad_size``; a device that raises is logged once per device
and counted ``iobus.device_errors``; nothing a guest does here raises into its path.
"""

from __future__ import annotations

import bisect
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from pvio.core.domain import Domain
    from pvio.core.hypervisor import Hypervisor

log = logging.getLogger("pvio.iobus")

PIO_SPACE = 0x10000  # x86 port space: 64 Ki ports
MMIO_SPACE = 1 << 52  # guest-physical addresses (x86-64's 52-bit physical address width)
PIO_SIZES = (1, 2, 4)
MMIO_SIZES = (1, 2, 4, 8)


def all_ones(size: int) -> int:
    """What a read of ``size`` bytes from nowhere returns (0xff, 0xffff, ...)."""
    return (1 << (8 * size)) - 1


class IoDevice(Protocol):
    """A device model reachable through the bus.

    ``offset`` is relative to the base of the registered range, ``size`` is 1, 2, 4 (or 8,
    MMIO only), ``value`` fits in ``size`` bytes.  Both run on the guest's exit path: they
    must not block.  A raise is contained by the bus (counted, logged).
    """

    def read(self, offset: int, size: int) -> int:
        """The value the guest reads."""
        ...

    def write(self, offset: int, size: int, value: int) -> None:
        """The guest wrote ``value``."""
        ...


@dataclass(frozen=True)
class IoRange:
    """One registered range of one domain: [base, base + length) -> device."""

    base: int
    length: int
    device: IoDevice

    @property
    def end(self) -> int:
        """One past the last address of the range."""
        return self.base + self.length


class _Space:
    """The ranges of one address space of one domain, sorted by base (non-overlapping)."""

    def __init__(self, name: str, limit: int) -> None:
        self.name = name
        self.limit = limit
        self.ranges: list[IoRange] = []
        self._bases: list[int] = []

    def add(self, dom: Domain, base: int, length: int, device: IoDevice) -> None:
        if length <= 0 or base < 0 or base + length > self.limit:
            raise ValueError(
                f"dom{dom.domid}: {self.name} range {base:#x}+{length:#x} is outside the "
                f"{self.limit:#x}-byte {self.name} space"
            )
        i = bisect.bisect_right(self._bases, base)
        for neighbour in self.ranges[max(0, i - 1) : i + 1]:
            if base < neighbour.end and neighbour.base < base + length:
                raise ValueError(
                    f"dom{dom.domid}: {self.name} range {base:#x}+{length:#x} overlaps "
                    f"{neighbour.base:#x}+{neighbour.length:#x} of {neighbour.device!r}"
                )
        self.ranges.insert(i, IoRange(base, length, device))
        self._bases.insert(i, base)

    def remove(self, device: IoDevice) -> int:
        keep = [r for r in self.ranges if r.device is not device]
        removed = len(self.ranges) - len(keep)
        self.ranges = keep
        self._bases = [r.base for r in keep]
        return removed

    def find(self, addr: int, size: int) -> IoRange | None:
        """The range that holds all of [addr, addr + size), if any."""
        i = bisect.bisect_right(self._bases, addr) - 1
        if i < 0:
            return None
        r = self.ranges[i]
        return r if addr + size <= r.end else None


class IoBus:
    """Port I/O and MMIO routing for every domain of one hypervisor (``hv.iobus``)."""

    def __init__(self, hv: Hypervisor) -> None:
        self.hv = hv
        self._pio: dict[int, _Space] = {}
        self._mmio: dict[int, _Space] = {}
        self._failed_once: set[int] = set()  # id() of devices whose first error was logged in full

    # ------------------------------------------------------------------ registration
    def _space(self, table: dict[int, _Space], dom: Domain, name: str, limit: int) -> _Space:
        space = table.get(dom.domid)
        if space is None:
            if dom.domid not in self._pio and dom.domid not in self._mmio:
                dom.on_destroy.append(self._forget)  # the first range of this domain
            space = table[dom.domid] = _Space(name, limit)
        return space

    def _forget(self, dom: Domain) -> None:
        """The domain is gone: its devices leave the bus with it."""
        self._pio.pop(dom.domid, None)
        self._mmio.pop(dom.domid, None)

    def register_pio(self, dom: Domain, base: int, length: int, device: IoDevice) -> None:
        """Route ports [base, base + length) of ``dom`` to ``device`` (ValueError on overlap)."""
        self._space(self._pio, dom, "port I/O", PIO_SPACE).add(dom, base, length, device)

    def register_mmio(self, dom: Domain, base: int, length: int, device: IoDevice) -> None:
        """Route guest-physical [base, base + length) of ``dom`` to ``device`` (ValueError on overlap).

        The range must not be RAM: an MMIO access is one that misses the domain's memory.
        """
        if base < dom.mem.size:
            raise ValueError(
                f"dom{dom.domid}: MMIO range {base:#x}+{length:#x} overlaps its RAM (0..{dom.mem.size:#x})"
            )
        self._space(self._mmio, dom, "MMIO", MMIO_SPACE).add(dom, base, length, device)

    def unregister(self, dom: Domain, device: IoDevice) -> int:
        """Remove every range of ``device`` in ``dom`` (both spaces); returns how many."""
        removed = 0
        for table in (self._pio, self._mmio):
            space = table.get(dom.domid)
            if space is not None:
                removed += space.remove(device)
        return removed

    def pio_ranges(self, dom: Domain) -> list[IoRange]:
        """The port ranges registered for ``dom``, by base."""
        space = self._pio.get(dom.domid)
        return list(space.ranges) if space else []

    def mmio_ranges(self, dom: Domain) -> list[IoRange]:
        """The MMIO ranges registered for ``dom``, by base."""
        space = self._mmio.get(dom.domid)
        return list(space.ranges) if space else []

    def is_mmio(self, dom: Domain, addr: int) -> bool:
        """Whether ``addr`` lies in an MMIO range of ``dom`` (the x86 vCPU routes such faults here)."""
        space = self._mmio.get(dom.domid)
        return space is not None and space.find(addr, 1) is not None

    # ------------------------------------------------------------------ accesses (exits)
    def pio_read(self, dom: Domain, port: int, size: int) -> int:
        """``in`` of ``size`` bytes from ``port``: one exit; all-ones if unclaimed."""
        c = dom.counters
        c["exits"] += 1
        c["exits.pio"] += 1
        return self._read(dom, self._pio, "pio", port, size, PIO_SIZES)

    def pio_write(self, dom: Domain, port: int, size: int, value: int) -> None:
        """``out`` of ``size`` bytes to ``port``: one exit; dropped if unclaimed."""
        c = dom.counters
        c["exits"] += 1
        c["exits.pio"] += 1
        self._write(dom, self._pio, "pio", port, size, value, PIO_SIZES)

    def mmio_read(self, dom: Domain, addr: int, size: int) -> int:
        """A load of ``size`` bytes from MMIO address ``addr``: one exit; all-ones if unclaimed."""
        c = dom.counters
        c["exits"] += 1
        c["exits.mmio"] += 1
        return self._read(dom, self._mmio, "mmio", addr, size, MMIO_SIZES)

    def mmio_write(self, dom: Domain, addr: int, size: int, value: int) -> None:
        """A store of ``size`` bytes to MMIO address ``addr``: one exit; dropped if unclaimed."""
        c = dom.counters
        c["exits"] += 1
        c["exits.mmio"] += 1
        self._write(dom, self._mmio, "mmio", addr, size, value, MMIO_SIZES)

    def _route(
        self, dom: Domain, table: dict[int, _Space], kind: str, addr: int, size: int, sizes: tuple[int, ...]
    ) -> IoRange | None:
        if size not in sizes:
            dom.counters["iobus.bad_size"] += 1
            return None
        space = table.get(dom.domid)
        r = space.find(addr, size) if space is not None else None
        if r is None:
            dom.counters[f"iobus.unclaimed_{kind}"] += 1
        return r

    def _read(
        self, dom: Domain, table: dict[int, _Space], kind: str, addr: int, size: int, sizes: tuple[int, ...]
    ) -> int:
        r = self._route(dom, table, kind, addr, size, sizes)
        if r is None:
            return all_ones(size) if size in sizes else all_ones(max(sizes))
        try:
            return int(r.device.read(addr - r.base, size)) & all_ones(size)
        except Exception:
            self._device_failed(dom, r, kind, addr, "read")
            return all_ones(size)

    def _write(
        self,
        dom: Domain,
        table: dict[int, _Space],
        kind: str,
        addr: int,
        size: int,
        value: int,
        sizes: tuple[int, ...],
    ) -> None:
        r = self._route(dom, table, kind, addr, size, sizes)
        if r is None:
            return
        try:
            r.device.write(addr - r.base, size, value & all_ones(size))
        except Exception:
            self._device_failed(dom, r, kind, addr, "write")

    def _device_failed(self, dom: Domain, r: IoRange, kind: str, addr: int, what: str) -> None:
        """A device model raised on a guest access: count it, log it, keep the guest going."""
        dom.counters["iobus.device_errors"] += 1
        key = id(r.device)
        if key not in self._failed_once:
            self._failed_once.add(key)
            log.error(
                "dom%d: %s %s at %#x: device %r raised (further errors of it are logged at DEBUG)",
                dom.domid,
                kind,
                what,
                addr,
                r.device,
                exc_info=True,
            )
        else:
            log.debug("dom%d: %s %s at %#x: device %r raised again", dom.domid, kind, what, addr, r.device)
