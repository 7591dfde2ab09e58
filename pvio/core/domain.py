"""Domains: one guest's memory, shared_info, start-of-day page, ports, grants and counters.

Memory map of a domain of ``nr_pages`` (pvio-specific, handed to the guest in its
start_info page; the x86 guests rely on it, ``docs/abi.md`` documents it):

=================================  ========================================
``nr_pages - 1``                   shared_info (vcpu_info, pending/mask bitmaps)
``nr_pages - 2``                   start_info (Xen's fields + pvio extension)
``nr_pages - 3``                   xenstore ring page (``xenstore_domain_interface``)
``nr_pages - 4``                   console page (reserved)
``nr_pages - 4 - gnttab_frames``   grant table frames (``gnttab_frames`` of them)
...                                the hypercall page, just below the grant table
``[first_free, free_end)``         the guest kernel's own pages
=================================  ========================================
"""

from __future__ import annotations

import logging
import struct
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

import trio

from pvio.abi import (
    PAGE_SHIFT,
    PVIO_SI_EXT,
    PVIO_SI_EXT_STRUCT,
    PVIO_SI_MAGIC,
    SI_CONSOLE_MFN,
    SI_FLAGS,
    SI_MAGIC,
    SI_NR_PAGES,
    SI_SHARED_INFO,
    SI_STORE_EVTCHN,
    SI_STORE_MFN,
    SIF_INITDOMAIN,
    SIF_PRIVILEGED,
    START_INFO_MAGIC,
    VCPU_INFO_SIZE,
    VCPU_UPCALL_MASK,
)
from pvio.core.counters import Counters
from pvio.core.evtchn import Channel
from pvio.core.grant_table import GrantMapping, GrantTable
from pvio.core.memory import GuestAddressSpace, GuestMemory

if TYPE_CHECKING:
    from pvio.core.hypervisor import Hypervisor

log = logging.getLogger("pvio.domain")

DEFAULT_GNTTAB_FRAMES = 4  # 2048 grant references
DEFAULT_MAX_PORTS = 1024
FIRST_FREE_GFN = 16  # frames below are left for a guest image's low memory
CONSOLE_LINES = 1000  # console lines kept per domain
CONSOLE_LINE_MAX = 4096  # bytes of one console line


class GuestKernel(Protocol):
    """What the hypervisor needs of a guest kernel (PyGuest, X86Guest, ...)."""

    def attach(self, hv: Hypervisor, dom: Domain) -> None:
        """Called once when the domain is created: the kernel learns its domain."""

    async def run(self) -> None:
        """Boot and run the guest until it stops; cancelled when the domain is destroyed."""


class Vcpu(Protocol):
    """A virtual CPU as the hypervisor drives it."""

    def kick(self) -> None:
        """An upcall became pending (upcall_pending went 0 -> 1): deliver it when possible."""

    def block(self) -> None:
        """SCHEDOP_block: park until an event arrives (returns at once; the vCPU waits)."""


class Domain:
    """A guest domain: memory, shared pages, event channel ports, grants, counters."""

    def __init__(
        self,
        hv: Hypervisor,
        domid: int,
        name: str,
        kernel: GuestKernel,
        nr_pages: int,
        *,
        privileged: bool = False,
        gnttab_frames: int = DEFAULT_GNTTAB_FRAMES,
        max_ports: int = DEFAULT_MAX_PORTS,
    ) -> None:
        min_pages = FIRST_FREE_GFN + 6 + gnttab_frames
        if nr_pages < min_pages:
            raise ValueError(f"domain {name!r}: {nr_pages} pages is too small (at least {min_pages})")
        self.hv = hv
        self.domid = domid
        self.name = name
        self.kernel = kernel
        self.privileged = privileged
        # A kernel that runs in another OS process (pvio.remote) needs its RAM in a memfd.
        self.mem = GuestMemory(nr_pages, shared=bool(getattr(kernel, "shared_memory", False)))
        # Hypercall arguments are read through this: RAM itself for a PV guest, the guest's
        # page tables for an HVM/PVH vCPU (which replaces it).
        self.arg_mem: GuestAddressSpace = self.mem
        self.hvm: Any = None  # pvio.core.hvm.HvmState for an HVM/PVH domain
        self.shared_info_gfn = nr_pages - 1
        self.start_info_gfn = nr_pages - 2
        self.store_gfn = nr_pages - 3
        self.console_gfn = nr_pages - 4
        self.gnttab_gfn = self.console_gfn - gnttab_frames
        self.hypercall_page_gfn = self.gnttab_gfn - 1
        self.first_free_gfn = FIRST_FREE_GFN
        self.free_end_gfn = self.hypercall_page_gfn
        self.shared_info = self.mem.page(self.shared_info_gfn)
        self.shared_info[VCPU_UPCALL_MASK] = 1  # a vCPU boots with events masked, like Xen's
        # vCPU 0's vcpu_info: in shared_info, unless the guest registers another place for it.
        self.vcpu_info = self.shared_info[:VCPU_INFO_SIZE]
        self.max_ports = max_ports
        self.ports: dict[int, Channel] = {}
        self.virqs: dict[int, int] = {}
        self.grant_table = GrantTable(self, self.gnttab_gfn, gnttab_frames)
        self.maptrack: dict[int, GrantMapping] = {}
        self.mapped_by_others: dict[tuple[int, int], GrantMapping] = {}
        self._next_handle = 1
        self.counters: Counters = hv.counters.new(f"dom{domid}")
        self.callbacks: dict[str, int] = {}
        self.vcpu: Any = None
        # Set for a domain whose kernel runs in another process: raising one of its ports is
        # forwarded there (evtchn.set_pending), so only that process writes its shared_info.
        self.raise_hook: Callable[[int], None] | None = None
        self.state = "created"
        self.store_port = 0
        self.console_lines: deque[str] = deque(maxlen=CONSOLE_LINES)
        self.console_count = 0  # lines ever written (console_lines keeps the last CONSOLE_LINES)
        self._console_partial = b""
        self.shutdown_reason: int | None = None
        self.crash_reason: str | None = None
        self.cancel_scope = trio.CancelScope()
        self.timer_scope: trio.CancelScope | None = None
        self.timer_deadline_ns = 0  # the pending set_timer_op deadline (0: none)
        self.timer_wake: trio.Event | None = None  # set when the deadline changes under the timer task
        self.on_destroy: list[Callable[[Domain], None]] = []
        # Set by the kernel once it has booted (or by the hypervisor if it stops first).
        self.booted = trio.Event()

    def __repr__(self) -> str:
        return f"<Domain {self.domid} {self.name!r} {self.state}>"

    @property
    def alive(self) -> bool:
        """False once destruction has begun."""
        return self.state not in ("dying", "dead")

    def release_memory(self) -> bool:
        """Unmap a dead domain's RAM once nothing points into it; True once it is unmapped.

        The hypervisor's own views of the domain (shared_info, vcpu_info) go first.  A view
        someone else still holds (a backend's ring on a page it had mapped) keeps the RAM;
        whoever lets go of the last one calls this again (:meth:`pvio.guest.PyGuest.grant_unmap`,
        :mod:`pvio.remote`).  Harmless to repeat; refused (False) while the domain lives.
        """
        if self.alive:
            return False
        for view in (self.vcpu_info, self.shared_info):
            view.release()
        self.mem.close()
        return bool(self.mem.mmap.closed)

    def next_map_handle(self) -> int:
        """A fresh grant-mapping handle of this domain."""
        h = self._next_handle
        self._next_handle += 1
        return h

    def kick(self) -> None:
        """Tell the vCPU an upcall is pending (the hypervisor delivers it when it can)."""
        if self.vcpu is not None and self.alive:
            self.vcpu.kick()

    def vcpu_block(self) -> None:
        """SCHEDOP_block: re-enable delivery (as Xen does when blocking masked) and park."""
        self.shared_info[VCPU_UPCALL_MASK] = 0
        if self.vcpu is not None:
            self.vcpu.block()

    def console_write(self, data: bytes) -> None:
        """Bytes the guest wrote with console_io; complete lines are logged and kept.

        Bounded: the last CONSOLE_LINES lines are kept, and a line longer than
        CONSOLE_LINE_MAX bytes is cut there (the guest controls both).
        """
        text = self._console_partial + data
        *lines, self._console_partial = text.split(b"\n")
        if len(self._console_partial) > CONSOLE_LINE_MAX:
            lines.append(self._console_partial[:CONSOLE_LINE_MAX])
            self._console_partial = b""
        for raw in lines:
            line = raw[:CONSOLE_LINE_MAX].decode("utf-8", "replace")
            self.console_lines.append(line)
            self.console_count += 1
            log.info("dom%d console: %s", self.domid, line)

    @property
    def console(self) -> str:
        """Everything the guest printed, complete lines joined by newlines."""
        return "\n".join(self.console_lines)

    def write_start_info(self, store_port: int, cmdline: str = "") -> None:
        """Fill the start-of-day page: Xen's start_info fields and pvio's extension."""
        page = self.mem.page(self.start_info_gfn)
        page[:] = bytes(len(page))
        page[SI_MAGIC : SI_MAGIC + len(START_INFO_MAGIC)] = START_INFO_MAGIC
        struct.pack_into("<Q", page, SI_NR_PAGES, self.mem.nr_pages)
        struct.pack_into("<Q", page, SI_SHARED_INFO, self.shared_info_gfn << PAGE_SHIFT)
        flags = (SIF_PRIVILEGED | SIF_INITDOMAIN) if self.privileged else 0
        struct.pack_into("<I", page, SI_FLAGS, flags)
        struct.pack_into("<Q", page, SI_STORE_MFN, self.store_gfn)
        struct.pack_into("<I", page, SI_STORE_EVTCHN, store_port)
        struct.pack_into("<Q", page, SI_CONSOLE_MFN, self.console_gfn)
        cmd = cmdline.encode()[:1023]
        page[128 : 128 + len(cmd)] = cmd
        PVIO_SI_EXT_STRUCT.pack_into(
            page,
            PVIO_SI_EXT,
            PVIO_SI_MAGIC,
            self.domid,
            self.grant_table.nr_frames,
            self.gnttab_gfn,
            self.hypercall_page_gfn,
            self.first_free_gfn,
            self.free_end_gfn,
        )


class StartInfo:
    """A guest's reading of its start-of-day page (what a PyGuest boots from)."""

    def __init__(self, page: memoryview) -> None:
        if bytes(page[: len(START_INFO_MAGIC)]) != START_INFO_MAGIC:
            raise ValueError("start_info page has no Xen magic")
        self.nr_pages = struct.unpack_from("<Q", page, SI_NR_PAGES)[0]
        self.shared_info_gpa = struct.unpack_from("<Q", page, SI_SHARED_INFO)[0]
        self.flags = struct.unpack_from("<I", page, SI_FLAGS)[0]
        self.store_gfn = struct.unpack_from("<Q", page, SI_STORE_MFN)[0]
        self.store_evtchn = struct.unpack_from("<I", page, SI_STORE_EVTCHN)[0]
        self.console_gfn = struct.unpack_from("<Q", page, SI_CONSOLE_MFN)[0]
        magic, domid, gt_frames, gt_gfn, hc_gfn, first, end = PVIO_SI_EXT_STRUCT.unpack_from(
            page, PVIO_SI_EXT
        )
        if magic != PVIO_SI_MAGIC:
            raise ValueError("start_info page has no pvio extension")
        self.domid = domid
        self.gnttab_frames = gt_frames
        self.gnttab_gfn = gt_gfn
        self.hypercall_page_gfn = hc_gfn
        self.first_free_gfn = first
        self.free_end_gfn = end
