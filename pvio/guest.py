"""PyGuest: a guest kernel written in Python, on the same ABI as an x86 guest.

A PyGuest boots from its start_info page, registers its event callback
(set_callbacks), unmasks events, and from then on its "CPU" is :class:`PyVcpu`: a trio
task that takes upcalls when the hypervisor marks them pending and otherwise blocks in
``SCHEDOP_block``.  Its upcall handler scans pending ports exactly as Mini-OS's
``do_hypervisor_callback`` does (clear upcall_pending, exchange the selector, walk
pending-and-not-masked bits, clear each port's pending bit, call its handler).  Every
service is reached through the hypercall table with Xen's argument structs written into
the guest's own memory, so a PyGuest pays (and is counted for) exactly what an x86 guest
would.

Subclass it and override :meth:`PyGuest.main`; use the kernel services
(``evtchn_*``, ``grant_*``, ``alloc_page``, ``xenbus``, ``spawn``) from there or from
drivers.  Port handlers run inside the upcall, so they must not block: set a trio Event
or push to a channel and let a task do the work.
"""

from __future__ import annotations

import contextlib
import logging
import struct
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import trio

from pvio.abi import (
    BITS_PER_WORD,
    DOMID_SELF,
    EVTCHN_ALLOC_UNBOUND,
    EVTCHN_BIND_INTERDOMAIN,
    EVTCHN_BIND_VIRQ,
    EVTCHN_PORT,
    GNTTAB_COPY,
    GNTTAB_COPY_STATUS_OFFSET,
    GNTTAB_MAP_GRANT_REF,
    GNTTAB_UNMAP_GRANT_REF,
    PAGE_SHIFT,
    PAGE_SIZE,
    SCHED_SHUTDOWN,
    SHARED_INFO_EVTCHN_MASK,
    SHARED_INFO_EVTCHN_PENDING,
    VCPU_PENDING_SEL,
    VCPU_UPCALL_MASK,
    VCPU_UPCALL_PENDING,
    CONSOLEIO_write,
    Errno,
    EvtchnOp,
    GNTCOPY_dest_gref,
    GNTCOPY_source_gref,
    GNTMAP_host_map,
    GNTMAP_readonly,
    GntSt,
    GnttabOp,
    Hypercall,
    SchedOp,
)
from pvio.core import evtchn as _ev
from pvio.core.domain import Domain, StartInfo
from pvio.core.grant_table import GrantMapping, GuestGrantTable
from pvio.core.hypervisor import Hypervisor
from pvio.xenstore.client import XenbusClient

log = logging.getLogger("pvio.guest")

_U64 = struct.Struct("<Q")
SCRATCH_PAGES = 16  # hypercall argument area: 64 KiB, e.g. 1638 grant-copy elements
PYGUEST_CALLBACK = 0xFFFF_8000_0000_1000  # the "address" a PyGuest registers: its handler is Python


_ZERO_PAGE = bytes(PAGE_SIZE)  # what alloc_page writes: one object, not one per call


class XenError(OSError):
    """A hypercall made by a guest kernel service failed with a Xen errno."""

    def __init__(self, errno: int, what: str) -> None:
        name = Errno(errno).name if errno in Errno._value2member_map_ else str(errno)
        super().__init__(errno, f"{what}: {name}")
        self.name = name


class GrantStatusError(Exception):
    """A grant map/unmap failed with a GNTST_* status."""

    def __init__(self, status: int, what: str) -> None:
        super().__init__(f"{what}: {GntSt(status).name}")
        self.status = status


CopyOp = tuple[tuple[bool, int, int, int], tuple[bool, int, int, int], int]
"""One grant copy element: ((is_gref, ref|gfn, domid, offset) source, ... dest, length)."""


class PyVcpu:
    """The CPU of a PyGuest: delivers upcalls, and blocks in SCHEDOP_block when idle."""

    def __init__(self, guest: PyGuest) -> None:
        self.guest = guest
        self._wake = trio.Event()
        self.blocked = False

    def kick(self) -> None:
        """An upcall is pending: wake the vCPU task."""
        self._wake.set()

    def block(self) -> None:
        """SCHEDOP_block was called: the task parks until the next kick."""
        self.blocked = True

    def _deliverable(self) -> bool:
        dom = self.guest.domain
        return dom.state == "running" and _ev.upcall_deliverable(dom)

    def deliver(self) -> None:
        """One upcall: mask (as Xen's bounce does), count the interrupt, run the handler, iret."""
        dom = self.guest.domain
        si = dom.shared_info
        si[VCPU_UPCALL_MASK] = 1
        dom.counters["interrupts"] += 1
        self.guest.upcall()
        si[VCPU_UPCALL_MASK] = 0

    async def run(self) -> None:
        """The vCPU loop: deliver while deliverable, else block until kicked.

        After an upcall the vCPU blocks at once unless another is already pending (then it
        yields first, so one busy port cannot starve the others): the handlers did their work
        in the upcall, and what they woke runs whether or not the vCPU is blocked."""
        while True:
            self._wake = trio.Event()  # before testing, so a kick from here on is not lost
            if self._deliverable():
                self.deliver()
                if self._deliverable():  # another upcall at once: let the others run first
                    await trio.lowlevel.checkpoint()
                    continue
            self.guest.block()
            if self._deliverable():
                continue
            await self._wake.wait()
            self.blocked = False


class PyGuest:
    """A guest kernel in Python.  Override :meth:`main`; ``memory_pages`` sizes its RAM."""

    memory_pages = 2048

    def __init__(self, name: str | None = None, *, memory_pages: int | None = None) -> None:
        self.name = name
        if memory_pages is not None:
            self.memory_pages = memory_pages
        self.hv: Hypervisor
        self.domain: Domain
        self._handlers: dict[int, Callable[[int], None]] = {}
        self._nursery: trio.Nursery | None = None

    # ------------------------------------------------------------------ boot and run
    def attach(self, hv: Hypervisor, dom: Domain) -> None:
        """Called by the hypervisor at domain creation."""
        self.hv = hv
        self.domain = dom
        self.vcpu = PyVcpu(self)
        # The hypervisor's direct entries for the two hot hypercalls, where it has them (in the
        # hypervisor's process; a guest in a process of its own goes through dispatch()).
        self._send_local = getattr(hv.hypercalls, "evtchn_send_local", None)
        self._block_local = getattr(hv.hypercalls, "block_local", None)
        dom.vcpu = self.vcpu

    @property
    def domid(self) -> int:
        """This guest's domain id (from its start_info)."""
        return self.start_info.domid

    @property
    def mem(self) -> memoryview:
        """This guest's RAM (the kernel's view of its own physical memory)."""
        return self.domain.mem.view

    async def run(self) -> None:
        """Boot, then run :meth:`main` and the vCPU until the domain is destroyed."""
        self._boot()
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self.vcpu.run, name=f"dom{self.domain.domid}-vcpu")
            self.domain.booted.set()
            await self.main()
            await trio.sleep_forever()

    def _boot(self) -> None:
        dom = self.domain
        self.start_info = si = StartInfo(dom.mem.page(dom.start_info_gfn))
        self.shared_info = dom.mem.page(si.shared_info_gpa >> PAGE_SHIFT)
        self._page_free = list(range(si.free_end_gfn - 1, si.first_free_gfn - 1 + SCRATCH_PAGES, -1))
        self._scratch_gpa = si.first_free_gfn << PAGE_SHIFT
        self.gnttab = GuestGrantTable(self.mem, si.gnttab_gfn, si.gnttab_frames)
        self.xenbus = XenbusClient(dom.mem.page(si.store_gfn), kick=lambda: self.evtchn_send(si.store_evtchn))
        self.bind_handler(si.store_evtchn, lambda _port: self.xenbus.on_event())
        self._check(self.hypercall(Hypercall.set_callbacks, PYGUEST_CALLBACK, 0, 0), "set_callbacks")
        self.shared_info[VCPU_UPCALL_MASK] = 0  # enable event delivery (Mini-OS: __sti)
        if self.shared_info[VCPU_UPCALL_PENDING]:
            self.vcpu.kick()

    async def main(self) -> None:
        """The guest's init: override.  The guest stays up after it returns."""

    def spawn(self, fn: Callable[..., Awaitable[Any]], *args: Any, name: str | None = None) -> None:
        """Start a task inside this guest (it dies with the domain)."""
        if self._nursery is None:
            raise RuntimeError(f"dom{self.domain.domid} has not booted yet")
        self._nursery.start_soon(fn, *args, name=name)

    # ------------------------------------------------------------------ events
    def upcall(self) -> None:
        """The event callback: Mini-OS's 2-level scan (selector -> words -> ports)."""
        si = self.shared_info
        si[VCPU_UPCALL_PENDING] = 0
        (sel,) = _U64.unpack_from(si, VCPU_PENDING_SEL)
        _U64.pack_into(si, VCPU_PENDING_SEL, 0)  # xchg(pending_sel, 0)
        while sel:
            word = (sel & -sel).bit_length() - 1
            sel &= sel - 1
            p_off = SHARED_INFO_EVTCHN_PENDING + 8 * word
            m_off = SHARED_INFO_EVTCHN_MASK + 8 * word
            while True:
                pending = _U64.unpack_from(si, p_off)[0] & ~_U64.unpack_from(si, m_off)[0]
                if not pending:
                    break
                bit = (pending & -pending).bit_length() - 1
                (cur,) = _U64.unpack_from(si, p_off)
                _U64.pack_into(si, p_off, cur & ~(1 << bit))
                port = word * BITS_PER_WORD + bit
                handler = self._handlers.get(port)
                if handler is None:
                    self.domain.counters["evtchn.spurious"] += 1
                else:
                    handler(port)

    def bind_handler(self, port: int, handler: Callable[[int], None]) -> None:
        """Call ``handler(port)`` from the upcall whenever ``port`` fires."""
        self._handlers[port] = handler

    def unbind_handler(self, port: int) -> None:
        """Stop dispatching ``port``."""
        self._handlers.pop(port, None)

    def mask(self, port: int) -> None:
        """Mask a port (guest-side: set its bit in evtchn_mask; Xen has no mask hypercall)."""
        word, bit = divmod(port, BITS_PER_WORD)
        off = SHARED_INFO_EVTCHN_MASK + 8 * word
        (cur,) = _U64.unpack_from(self.shared_info, off)
        _U64.pack_into(self.shared_info, off, cur | (1 << bit))

    def unmask(self, port: int) -> None:
        """Unmask a port through EVTCHNOP_unmask (re-delivers if it is pending)."""
        self._evtchn_op(EvtchnOp.unmask, EVTCHN_PORT.pack(port), "unmask")

    def port_pending(self, port: int) -> bool:
        """Whether ``port``'s pending bit is set."""
        word, bit = divmod(port, BITS_PER_WORD)
        return bool(_U64.unpack_from(self.shared_info, SHARED_INFO_EVTCHN_PENDING + 8 * word)[0] >> bit & 1)

    # ------------------------------------------------------------------ port I/O and MMIO
    # Each is one exit to the monitor (counted exits.pio / exits.mmio by hv.iobus), as the
    # matching instruction of an x86 guest: a register access of an emulated device.
    def inb(self, port: int) -> int:
        """``in al, dx``: read one byte from ``port``."""
        return self.hv.iobus.pio_read(self.domain, port, 1)

    def inw(self, port: int) -> int:
        """``in ax, dx``: read two bytes from ``port``."""
        return self.hv.iobus.pio_read(self.domain, port, 2)

    def inl(self, port: int) -> int:
        """``in eax, dx``: read four bytes from ``port``."""
        return self.hv.iobus.pio_read(self.domain, port, 4)

    def outb(self, port: int, value: int) -> None:
        """``out dx, al``: write one byte to ``port``."""
        self.hv.iobus.pio_write(self.domain, port, 1, value)

    def outw(self, port: int, value: int) -> None:
        """``out dx, ax``: write two bytes to ``port``."""
        self.hv.iobus.pio_write(self.domain, port, 2, value)

    def outl(self, port: int, value: int) -> None:
        """``out dx, eax``: write four bytes to ``port``."""
        self.hv.iobus.pio_write(self.domain, port, 4, value)

    def mmio_read(self, addr: int, size: int = 4) -> int:
        """A load of ``size`` bytes from the device register at guest-physical ``addr``."""
        return self.hv.iobus.mmio_read(self.domain, addr, size)

    def mmio_write(self, addr: int, size: int, value: int) -> None:
        """A store of ``size`` bytes to the device register at guest-physical ``addr``."""
        self.hv.iobus.mmio_write(self.domain, addr, size, value)

    # ------------------------------------------------------------------ hypercalls
    def hypercall(self, nr: int, a1: int = 0, a2: int = 0, a3: int = 0, a4: int = 0, a5: int = 0) -> int:
        """Trap into the hypervisor's hypercall table (the same one x86 guests reach)."""
        return self.hv.hypercalls.dispatch(self.domain, nr, a1, a2, a3, a4, a5)

    def _check(self, rc: int, what: str) -> int:
        if rc < 0:
            raise XenError(-rc, f"dom{self.domain.domid} {what}")
        return rc

    def _args(self, data: bytes) -> int:
        """Write a hypercall's argument struct(s) into the scratch area; return its address."""
        if len(data) > SCRATCH_PAGES * PAGE_SIZE:
            raise ValueError(f"{len(data)} bytes of hypercall arguments exceed the scratch area")
        self.mem[self._scratch_gpa : self._scratch_gpa + len(data)] = data
        return self._scratch_gpa

    def _evtchn_op(self, cmd: int, arg: bytes, what: str) -> bytes:
        gpa = self._args(arg)
        self._check(self.hypercall(Hypercall.event_channel_op, cmd, gpa), what)
        return bytes(self.mem[gpa : gpa + len(arg)])

    def evtchn_alloc_unbound(self, remote_domid: int) -> int:
        """A new port that ``remote_domid`` may bind to."""
        out = self._evtchn_op(
            EvtchnOp.alloc_unbound, EVTCHN_ALLOC_UNBOUND.pack(DOMID_SELF, remote_domid, 0), "alloc_unbound"
        )
        return int(EVTCHN_ALLOC_UNBOUND.unpack(out)[2])

    def evtchn_bind_interdomain(self, remote_domid: int, remote_port: int) -> int:
        """Bind to a port another domain allocated for us; returns our local port."""
        out = self._evtchn_op(
            EvtchnOp.bind_interdomain,
            EVTCHN_BIND_INTERDOMAIN.pack(remote_domid, remote_port, 0),
            "bind_interdomain",
        )
        return int(EVTCHN_BIND_INTERDOMAIN.unpack(out)[2])

    def evtchn_bind_virq(self, virq: int) -> int:
        """Bind a VIRQ (e.g. VIRQ_TIMER) on vCPU 0; returns the port."""
        out = self._evtchn_op(EvtchnOp.bind_virq, EVTCHN_BIND_VIRQ.pack(virq, 0, 0), "bind_virq")
        return int(EVTCHN_BIND_VIRQ.unpack(out)[2])

    def evtchn_send(self, port: int) -> None:
        """Notify the other end of ``port`` (EVTCHNOP_send: no out fields to read back)."""
        local = self._send_local
        if local is not None:  # in the hypervisor's process: the port goes as it is
            rc = local(self.domain, port)
        else:
            gpa = self._scratch_gpa
            EVTCHN_PORT.pack_into(self.domain.mem.view, gpa, port)
            rc = self.hypercall(Hypercall.event_channel_op, EvtchnOp.send, gpa)
        self._check(rc, "send")

    def block(self) -> None:
        """SCHEDOP_block (the vCPU's idle: delivery re-enabled, parked until an event)."""
        local = self._block_local
        if local is not None:
            local(self.domain)
        else:
            self.hypercall(Hypercall.sched_op, SchedOp.block)

    def evtchn_close(self, port: int) -> None:
        """Close ``port`` (an interdomain peer goes back to unbound)."""
        self._evtchn_op(EvtchnOp.close, EVTCHN_PORT.pack(port), "close")
        self.unbind_handler(port)

    def set_timer(self, deadline_ns: int) -> None:
        """set_timer_op: VIRQ_TIMER fires at system time ``deadline_ns``."""
        self._check(self.hypercall(Hypercall.set_timer_op, deadline_ns), "set_timer_op")

    def now_ns(self) -> int:
        """System time in ns (what vcpu_time_info would say)."""
        return self.hv.now_ns()

    def console(self, text: str) -> None:
        """Print through console_io."""
        data = text.encode()
        for i in range(0, len(data), 4096):
            chunk = data[i : i + 4096]
            self._check(
                self.hypercall(Hypercall.console_io, CONSOLEIO_write, len(chunk), self._args(chunk)),
                "console",
            )

    def shutdown(self, reason: int = 0) -> None:
        """SCHEDOP_shutdown (poweroff by default)."""
        self.hypercall(Hypercall.sched_op, SchedOp.shutdown, self._args(SCHED_SHUTDOWN.pack(reason)))

    # ------------------------------------------------------------------ memory and grants
    def alloc_page(self) -> int:
        """A free frame of this guest's memory (zeroed): returns its gfn."""
        if not self._page_free:
            raise MemoryError(f"dom{self.domain.domid} is out of pages")
        gfn = self._page_free.pop()
        self.page(gfn)[:] = _ZERO_PAGE
        return gfn

    def free_pages(self) -> int:
        """How many frames :meth:`alloc_page` can still give (the toolstack sizes dom0 by it)."""
        return len(self._page_free)

    def free_page(self, gfn: int) -> None:
        """Return a frame to the allocator (only once no grant of it is live)."""
        self._page_free.append(gfn)

    def page(self, gfn: int) -> memoryview:
        """A view of one of this guest's own frames."""
        return self.domain.mem.page(gfn)

    def grant_access(self, domid: int, gfn: int, readonly: bool = False) -> int:
        """Grant ``domid`` access to our frame ``gfn``; returns the grant reference."""
        return self.gnttab.grant_access(domid, gfn, readonly)

    def end_access(self, ref: int) -> bool:
        """Revoke a grant atomically; False if the grantee still maps it."""
        return self.gnttab.end_access(ref)

    def grant_map(self, domid: int, ref: int, readonly: bool = False) -> GrantMapping:
        """Map another domain's grant: returns the mapping with its zero-copy ``view``."""
        flags = GNTMAP_host_map | (GNTMAP_readonly if readonly else 0)
        gpa = self._args(GNTTAB_MAP_GRANT_REF.pack(0, flags, ref, domid, 0, 0, 0))
        self._check(self.hypercall(Hypercall.grant_table_op, GnttabOp.map_grant_ref, gpa, 1), "map_grant_ref")
        *_, status, handle, _bus = GNTTAB_MAP_GRANT_REF.unpack(
            bytes(self.mem[gpa : gpa + GNTTAB_MAP_GRANT_REF.size])
        )
        if status != GntSt.okay:
            raise GrantStatusError(status, f"dom{self.domain.domid} map dom{domid} ref {ref}")
        return self.domain.maptrack[handle]

    def grant_unmap(self, mapping: GrantMapping | int) -> None:
        """Unmap a mapping made by :meth:`grant_map`.

        A mapping the hypervisor revoked when its granter was destroyed (while this guest
        still pointed into the page, e.g. with a ring) is let go of here too: its view is
        released and the dead granter's RAM unmapped if this was the last view of it; the
        hypercall then fails with GNTST_bad_handle, as before.
        """
        handle = mapping if isinstance(mapping, int) else mapping.handle
        if isinstance(mapping, GrantMapping) and self.domain.maptrack.get(handle) is not mapping:
            with contextlib.suppress(BufferError):  # still exported: it dies with its holder
                mapping.view.release()
            mapping.granter.release_memory()
        gpa = self._args(GNTTAB_UNMAP_GRANT_REF.pack(0, 0, handle, 0))
        self._check(
            self.hypercall(Hypercall.grant_table_op, GnttabOp.unmap_grant_ref, gpa, 1), "unmap_grant_ref"
        )
        (status,) = struct.unpack_from("<h", self.mem, gpa + 20)
        if status != GntSt.okay:
            raise GrantStatusError(status, f"dom{self.domain.domid} unmap handle {handle}")

    def grant_copy(self, ops: Sequence[CopyOp]) -> list[int]:
        """GNTTABOP_copy of a batch in one hypercall; returns each element's GNTST status."""
        if not ops:
            return []
        pack = GNTTAB_COPY.pack
        blob = b"".join(
            pack(
                s[1], s[2], s[3], d[1], d[2], d[3], length,
                (GNTCOPY_source_gref if s[0] else 0) | (GNTCOPY_dest_gref if d[0] else 0), 0,
            )
            for s, d, length in ops
        )  # fmt: skip
        return self.grant_copy_packed(blob)

    def grant_copy_packed(self, blob: bytes) -> list[int]:
        """GNTTABOP_copy of already packed ``gnttab_copy`` elements (40 bytes each), in one hypercall.

        The drivers' per-packet path: no tuple per element.  Returns each element's status.
        """
        count, rem = divmod(len(blob), GNTTAB_COPY.size)
        if rem:
            raise ValueError(f"{len(blob)} bytes are not whole {GNTTAB_COPY.size}-byte gnttab_copy elements")
        gpa = self._args(blob)
        self._check(self.hypercall(Hypercall.grant_table_op, GnttabOp.copy, gpa, count), "grant copy")
        words = self.mem[gpa : gpa + len(blob)].cast("h")  # status is int16 #18 of each 20
        try:
            return words[GNTTAB_COPY_STATUS_OFFSET // 2 :: GNTTAB_COPY.size // 2].tolist()
        finally:
            words.release()


class Dom0Kernel(PyGuest):
    """The default kernel of dom0: boots and idles; backends run as its tasks."""

    memory_pages = 4096


Hypervisor.default_dom0_kernel = Dom0Kernel
