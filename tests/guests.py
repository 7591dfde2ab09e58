"""Test guests: small PyGuest kernels the tests boot, drive and observe."""

from __future__ import annotations

from typing import TypeVar

import trio
import trio.testing

import pvio
from pvio.abi import PAGE_SHIFT
from pvio.core.counters import Snapshot

PROBE_PAGES = 64  # the smallest comfortable PyGuest: 16 scratch pages, then 23 free frames


class Probe(pvio.PyGuest):
    """A guest that boots, sets :attr:`ready`, and records every port that fires, in order.

    Tests call its kernel services (``evtchn_*``, ``grant_*``, ``xenbus``) directly: they are
    the same hypercalls the guest's own code would make.
    """

    memory_pages = PROBE_PAGES

    def __init__(self, name: str | None = None, *, memory_pages: int | None = None) -> None:
        super().__init__(name, memory_pages=memory_pages)
        self.ready = trio.Event()
        self.fired: list[int] = []
        self._arg_gfn: int | None = None

    async def main(self) -> None:
        self.ready.set()

    def listen(self, port: int) -> int:
        """Record ``port`` in :attr:`fired` whenever it fires; returns the port."""
        self.bind_handler(port, self.fired.append)
        return port

    def arg_gpa(self) -> int:
        """The guest-physical address of a page of this guest's own, for raw hypercall arguments."""
        if self._arg_gfn is None:
            self._arg_gfn = self.alloc_page()
        return self._arg_gfn << PAGE_SHIFT

    def raw_hypercall(self, nr: int, cmd: int, arg: bytes, *rest: int) -> tuple[int, bytes]:
        """Hypercall ``nr(cmd, &arg, *rest)`` as a guest makes it: ``arg`` is written into guest
        memory first; returns the result and the argument bytes as the hypervisor left them."""
        gpa = self.arg_gpa()
        self.mem[gpa : gpa + len(arg)] = arg
        rc = self.hypercall(nr, cmd, gpa, *rest)
        return rc, bytes(self.mem[gpa : gpa + len(arg)])

    @property
    def interrupts(self) -> int:
        """Upcalls this guest's vCPU has taken so far."""
        return self.domain.counters["interrupts"]


G = TypeVar("G", bound=pvio.PyGuest)


async def boot(hv: pvio.Hypervisor, guest: G, name: str = "probe") -> G:
    """Create and start a domain for ``guest``; return it once it has booted and gone idle."""
    await hv.start(hv.create_domain(guest, name=name))
    await settle()
    return guest


async def settle() -> None:
    """Let every guest run until all tasks block (upcalls delivered, store replies taken)."""
    await trio.testing.wait_all_tasks_blocked()


def changes(hv: pvio.Hypervisor, before: Snapshot, guest: pvio.PyGuest) -> dict[str, int]:
    """The counters of ``guest``'s domain that changed since ``before``, and by how much."""
    return dict(hv.snapshot().diff(before)[f"dom{guest.domain.domid}"])


def dom0_probe(hv: pvio.Hypervisor) -> Probe:
    """dom0's kernel, which the ``hv`` fixture makes a Probe."""
    assert hv.dom0 is not None and isinstance(hv.dom0.kernel, Probe)
    return hv.dom0.kernel
