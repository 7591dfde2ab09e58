"""The hypervisor interface of HVM/PVH guests: HVM params, physmap, memory map, vCPU ops, console.

A PVH guest (an unmodified Linux or GRUB on the system-mode vCPU, ``pvio.cpu.system``)
finds its Xen services differently from a PV one: it reads ``HVM_PARAM_*`` with
``hvm_op`` instead of a start_info page, asks Xen to *place* shared_info and the grant
frames at guest frames it chooses (``XENMEM_add_to_physmap``), reads its memory map
with ``XENMEM_memory_map``, runs its clock-event device on ``VCPUOP_set_singleshot_timer``
and takes events as an interrupt vector (``HVM_PARAM_CALLBACK_IRQ``) rather than a
bounce to a callback address.  This module holds that interface's state
(:class:`HvmState`, hung on ``Domain.hvm`` by the guest kind) and its handlers; the
hypercall table delegates to them.  A PV domain has ``Domain.hvm is None`` and gets
``-ENOSYS`` from these hypercalls, as before.

Placement of shared pages: the hypervisor's own copies of shared_info and of the grant
frames stay where :class:`pvio.core.domain.Domain` put them (every service reads them
there); ``add_to_physmap`` asks the vCPU to *alias* the guest frame the guest chose onto
that page (``vcpu.alias_page``), so both sides see the same bytes, as on Xen where the
frame is remapped.  The guest frame's former RAM page is simply hidden while aliased.

The console ring (``xencons_interface``): :class:`ConsoleRing` is an in-hypervisor
service bound to a guest port, like the xenstore daemon; the guest's notification drains
``out`` into ``Domain.console_write`` and :meth:`ConsoleRing.feed` writes keystrokes into
``in`` and raises the port.  Indices are free-running u32s that the guest controls: they
are read once per drain, bounded by the ring size, and a ring that claims more than it
can hold is treated as empty and counted.
"""

from __future__ import annotations

import logging
import struct
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pvio.abi import PAGE_SHIFT, PAGE_SIZE, VCPU_INFO_SIZE, Errno
from pvio.abi.xen import (
    E820_ENTRY,
    EVTCHN_BIND_IPI,
    HVM_NR_PARAMS,
    HVM_PARAM_CALLBACK_IRQ,
    HVM_PARAM_CALLBACK_TYPE_VECTOR,
    HVM_PARAM_CONSOLE_EVTCHN,
    HVM_PARAM_CONSOLE_PFN,
    HVM_PARAM_STORE_EVTCHN,
    HVM_PARAM_STORE_PFN,
    VCPU_REGISTER_VCPU_INFO,
    VCPU_RUNSTATE_INFO_SIZE,
    VCPU_SET_SINGLESHOT_TIMER,
    XEN_ADD_TO_PHYSMAP,
    XEN_FEATURE_INFO,
    XEN_HVM_PARAM,
    XEN_MEMORY_MAP,
    XEN_MEMORY_RESERVATION,
    XENCONS_IN,
    XENCONS_IN_SIZE,
    XENCONS_INDEX_STRUCT,
    XENCONS_INDICES,
    XENCONS_OUT,
    XENCONS_OUT_SIZE,
    HVMOP_get_param,
    HVMOP_pagetable_dying,
    HVMOP_set_param,
    VCPUOP_get_runstate_info,
    VCPUOP_is_up,
    VCPUOP_register_runstate_memory_area,
    VCPUOP_register_vcpu_info,
    VCPUOP_set_periodic_timer,
    VCPUOP_set_singleshot_timer,
    VCPUOP_stop_periodic_timer,
    VCPUOP_stop_singleshot_timer,
    XENFEAT_auto_translated_physmap,
    XENFEAT_hvm_callback_vector,
    XENFEAT_hvm_safe_pvclock,
    XENMAPIDX_grant_table_status,
    XENMAPSPACE_grant_table,
    XENMAPSPACE_shared_info,
    XENMEM_add_to_physmap,
    XENMEM_current_reservation,
    XENMEM_decrease_reservation,
    XENMEM_maximum_reservation,
    XENMEM_memory_map,
    XENMEM_populate_physmap,
    XENVER_capabilities,
    XENVER_changeset,
    XENVER_compile_info,
    XENVER_extraversion,
    XENVER_get_features,
    XENVER_pagesize,
    XENVER_platform_parameters,
)
from pvio.core import evtchn
from pvio.core.evtchn import SERVICE, Channel

if TYPE_CHECKING:
    from pvio.core.domain import Domain
    from pvio.core.hypercall import HypercallTable

log = logging.getLogger("pvio.hvm")

HVM_FEATURES = (
    (1 << XENFEAT_auto_translated_physmap)
    | (1 << XENFEAT_hvm_callback_vector)
    | (1 << XENFEAT_hvm_safe_pvclock)
)
MAX_MEMMAP_ENTRIES = 128
# The i386 layouts (a 32-bit guest's xen_ulong_t, xen_pfn_t and guest handles are 32-bit).
XEN_ADD_TO_PHYSMAP_32 = struct.Struct("<HHIII")
XEN_MEMORY_MAP_32 = struct.Struct("<II")
MAX_RESERVATION_EXTENTS = 1 << 20
_U64 = struct.Struct("<Q")


@dataclass
class HvmState:
    """What an HVM/PVH domain has set up with the hypervisor beyond a PV domain's state."""

    e820: list[tuple[int, int, int]]  # (addr, size, type): the memory map the guest is given
    params: dict[int, int] = field(default_factory=dict)
    callback_vector: int = 0  # 0: no vector registered (events are not delivered)
    console: ConsoleRing | None = None
    runstate_area: int = 0  # guest address the guest registered (never written: no steal time)
    ballooned: int = 0  # pages the guest handed back with decrease_reservation
    time_offset_ns: int = 0  # hypervisor time at the guest's system time 0 (its boot)
    vcpu_info_placed: bool = False
    compat: bool = False  # the current hypercall comes from 32-bit code (i386 argument layouts)


class ConsoleRing:
    """The PV console ring of one domain: a service on a guest port, drained into its console."""

    def __init__(self, dom: Domain, gfn: int, port: int) -> None:
        self.dom = dom
        self.page = dom.mem.page(gfn)
        self.port = port
        self.bytes_out = 0
        self.bytes_in = 0

    def drain(self) -> None:
        """The guest notified: move what it wrote in ``out`` to the domain's console."""
        page = self.page
        in_cons, in_prod, out_cons, out_prod = XENCONS_INDEX_STRUCT.unpack_from(page, XENCONS_INDICES)
        del in_cons, in_prod
        avail = (out_prod - out_cons) & 0xFFFF_FFFF
        if avail == 0:
            return
        if avail > XENCONS_OUT_SIZE:
            self.dom.counters["console.bad_indices"] += 1
            return
        chunks = []
        for i in range(avail):
            chunks.append(page[XENCONS_OUT + ((out_cons + i) % XENCONS_OUT_SIZE)])
        struct.pack_into("<I", page, XENCONS_INDICES + 8, out_prod)
        data = bytes(chunks)
        self.bytes_out += len(data)
        self.dom.counters["console.bytes_out"] += len(data)
        self.dom.console_write(data.replace(b"\r", b""))
        evtchn.set_pending(self.dom, self.port)  # room in the ring again: tell the guest

    def feed(self, data: bytes) -> int:
        """Type ``data`` into the guest's console input; returns how many bytes fit."""
        page = self.page
        in_cons, in_prod, _oc, _op = XENCONS_INDEX_STRUCT.unpack_from(page, XENCONS_INDICES)
        used = (in_prod - in_cons) & 0xFFFF_FFFF
        if used > XENCONS_IN_SIZE:
            self.dom.counters["console.bad_indices"] += 1
            return 0
        n = min(len(data), XENCONS_IN_SIZE - used)
        for i in range(n):
            page[XENCONS_IN + ((in_prod + i) % XENCONS_IN_SIZE)] = data[i]
        struct.pack_into("<I", page, XENCONS_INDICES + 4, (in_prod + n) & 0xFFFF_FFFF)
        self.bytes_in += n
        if n:
            evtchn.set_pending(self.dom, self.port)
        return n


def setup_domain(table: HypercallTable, dom: Domain, e820: list[tuple[int, int, int]]) -> HvmState:
    """Make ``dom`` an HVM domain: its params, its console service and port."""
    state = HvmState(e820=e820, time_offset_ns=table.hv.now_ns())
    port = table.free_port(dom)
    console = ConsoleRing(dom, dom.console_gfn, port)
    dom.ports[port] = Channel(SERVICE, remote_dom=0, service=console.drain)
    state.console = console
    state.params.update(
        {
            HVM_PARAM_STORE_PFN: dom.store_gfn,
            HVM_PARAM_STORE_EVTCHN: dom.store_port,
            HVM_PARAM_CONSOLE_PFN: dom.console_gfn,
            HVM_PARAM_CONSOLE_EVTCHN: port,
        }
    )
    dom.hvm = state
    return state


def _state(dom: Domain) -> HvmState:
    from pvio.core.hypercall import HypercallError

    if dom.hvm is None:
        raise HypercallError(Errno.ENOSYS, "not an HVM domain")
    state: HvmState = dom.hvm
    return state


def _fail(errno: Errno, message: str) -> Exception:
    from pvio.core.hypercall import HypercallError

    return HypercallError(errno, message)


# --------------------------------------------------------------------------- hvm_op
def hvm_op(table: HypercallTable, dom: Domain, cmd: int, arg: int) -> int:
    """hvm_op: get/set_param (the guest's own domain only), pagetable_dying (a hint: ignored)."""
    state = _state(dom)
    dom.counters[f"hypercalls.hvm_op.{_HVMOP_NAMES.get(cmd, 'unknown')}"] += 1
    if cmd == HVMOP_pagetable_dying:
        return 0
    if cmd not in (HVMOP_get_param, HVMOP_set_param):
        raise _fail(Errno.ENOSYS, f"hvm_op {cmd}")
    domid, index, value = XEN_HVM_PARAM.unpack(dom.arg_mem.read(arg, XEN_HVM_PARAM.size))
    if domid not in (0x7FF0, dom.domid):
        raise _fail(Errno.EPERM, f"hvm_op for dom{domid}")
    if not 0 <= index < HVM_NR_PARAMS:
        raise _fail(Errno.EINVAL, f"HVM param {index}")
    if cmd == HVMOP_get_param:
        dom.arg_mem.write(arg + 8, _U64.pack(state.params.get(index, 0)))
        return 0
    if index == HVM_PARAM_CALLBACK_IRQ:
        kind, vector = value >> 56, value & 0xFF
        if value and (kind != HVM_PARAM_CALLBACK_TYPE_VECTOR or not 0x10 <= vector <= 0xFF):
            raise _fail(Errno.EINVAL, f"callback IRQ {value:#x}: only a vector (type 2) is supported")
        state.callback_vector = vector if value else 0
        state.params[index] = value
        dom.kick()  # events may already wait
        return 0
    if index in (
        HVM_PARAM_STORE_PFN,
        HVM_PARAM_STORE_EVTCHN,
        HVM_PARAM_CONSOLE_PFN,
        HVM_PARAM_CONSOLE_EVTCHN,
    ):
        raise _fail(Errno.EPERM, f"HVM param {index} is the toolstack's")
    state.params[index] = value
    return 0


_HVMOP_NAMES = {
    HVMOP_set_param: "set_param",
    HVMOP_get_param: "get_param",
    HVMOP_pagetable_dying: "pagetable_dying",
}


# --------------------------------------------------------------------------- memory_op
def memory_op(table: HypercallTable, dom: Domain, cmd: int, arg: int) -> int:
    """memory_op: add_to_physmap, memory_map, reservations (the guest's own domain only)."""
    state = _state(dom)
    dom.counters[f"hypercalls.memory_op.{_MEMOP_NAMES.get(cmd, 'unknown')}"] += 1
    mem = dom.arg_mem
    if cmd == XENMEM_add_to_physmap:
        layout = XEN_ADD_TO_PHYSMAP_32 if state.compat else XEN_ADD_TO_PHYSMAP
        domid, _size, space, idx, gpfn = layout.unpack(mem.read(arg, layout.size))
        if domid not in (0x7FF0, dom.domid):
            raise _fail(Errno.EPERM, f"add_to_physmap for dom{domid}")
        if space == XENMAPSPACE_shared_info:
            if idx != 0:
                raise _fail(Errno.EINVAL, f"shared_info index {idx}")
            source = dom.shared_info_gfn
        elif space == XENMAPSPACE_grant_table:
            if idx & XENMAPIDX_grant_table_status:
                raise _fail(Errno.EINVAL, "grant status frames (v2) are not supported")
            if not 0 <= idx < dom.grant_table.nr_frames:
                raise _fail(Errno.EINVAL, f"grant frame {idx} of {dom.grant_table.nr_frames}")
            source = dom.grant_table.first_gfn + idx
        else:
            raise _fail(Errno.EINVAL, f"map space {space}")
        vcpu: Any = dom.vcpu
        if vcpu is None or not hasattr(vcpu, "alias_page"):
            raise _fail(Errno.ENOSYS, "no vCPU that can place pages")
        if not vcpu.alias_page(gpfn, source):
            raise _fail(Errno.EINVAL, f"gpfn {gpfn:#x} cannot be placed")
        return 0
    if cmd == XENMEM_memory_map:
        layout = XEN_MEMORY_MAP_32 if state.compat else XEN_MEMORY_MAP
        nr, buf = layout.unpack(mem.read(arg, layout.size))
        entries = state.e820[: min(nr, MAX_MEMMAP_ENTRIES)]
        mem.write(buf, b"".join(E820_ENTRY.pack(*e) for e in entries))
        mem.write(arg, struct.pack("<I", len(entries)))
        return 0
    if cmd in (XENMEM_current_reservation, XENMEM_maximum_reservation):
        return dom.mem.nr_pages - state.ballooned
    if cmd in (XENMEM_decrease_reservation, XENMEM_populate_physmap):
        _start, nr_extents, order, _flags, domid = XEN_MEMORY_RESERVATION.unpack(
            mem.read(arg, XEN_MEMORY_RESERVATION.size)
        )
        if domid not in (0x7FF0, dom.domid) or order > 18 or nr_extents > MAX_RESERVATION_EXTENTS:
            raise _fail(Errno.EINVAL, f"reservation of {nr_extents} x order {order} for dom{domid}")
        # The frames stay backed by the domain's RAM: giving a page back and taking it again
        # only moves the count (a balloon driver sees its request done).
        pages = nr_extents << order
        state.ballooned += pages if cmd == XENMEM_decrease_reservation else -min(pages, state.ballooned)
        return nr_extents
    raise _fail(Errno.ENOSYS, f"memory_op {cmd}")


_MEMOP_NAMES = {
    XENMEM_add_to_physmap: "add_to_physmap",
    XENMEM_memory_map: "memory_map",
    XENMEM_current_reservation: "current_reservation",
    XENMEM_maximum_reservation: "maximum_reservation",
    XENMEM_decrease_reservation: "decrease_reservation",
    XENMEM_populate_physmap: "populate_physmap",
}


# --------------------------------------------------------------------------- vcpu_op
def vcpu_op(table: HypercallTable, dom: Domain, cmd: int, vcpuid: int, arg: int) -> int:
    """vcpu_op for vCPU 0: vcpu_info placement, the singleshot timer, runstate, is_up."""
    state = _state(dom)
    dom.counters[f"hypercalls.vcpu_op.{_VCPUOP_NAMES.get(cmd, 'unknown')}"] += 1
    if vcpuid != 0:
        raise _fail(Errno.ENOENT, f"vcpu {vcpuid}")
    mem = dom.arg_mem
    if cmd == VCPUOP_set_singleshot_timer:
        deadline, _flags = VCPU_SET_SINGLESHOT_TIMER.unpack(mem.read(arg, VCPU_SET_SINGLESHOT_TIMER.size))
        table.hv.set_timer(dom, max(deadline + state.time_offset_ns, 1))  # the past fires at once
        dom.counters["timer.singleshot"] += 1
        return 0
    if cmd == VCPUOP_stop_singleshot_timer:
        table.hv.set_timer(dom, 0)
        return 0
    if cmd == VCPUOP_stop_periodic_timer:
        return 0  # never started: pvio has no periodic timer
    if cmd == VCPUOP_set_periodic_timer:
        raise _fail(Errno.ENOSYS, "periodic timer")
    if cmd == VCPUOP_is_up:
        return 1
    if cmd == VCPUOP_register_runstate_memory_area:
        (state.runstate_area,) = _U64.unpack(mem.read(arg, 8))
        return 0
    if cmd == VCPUOP_get_runstate_info:
        mem.write(arg, bytes(VCPU_RUNSTATE_INFO_SIZE))
        return 0
    if cmd == VCPUOP_register_vcpu_info:
        mfn, offset, _ = VCPU_REGISTER_VCPU_INFO.unpack(mem.read(arg, VCPU_REGISTER_VCPU_INFO.size))
        if offset + VCPU_INFO_SIZE > PAGE_SIZE or not 0 <= mfn < dom.hypercall_page_gfn:
            raise _fail(Errno.EINVAL, f"vcpu_info at frame {mfn:#x} + {offset:#x}")
        if state.vcpu_info_placed:
            raise _fail(Errno.EINVAL, "vcpu_info is already placed")
        new = dom.mem.page(mfn)[offset : offset + VCPU_INFO_SIZE]
        new[:] = dom.vcpu_info  # as Xen: the current contents move with it
        dom.vcpu_info = new
        state.vcpu_info_placed = True
        return 0
    raise _fail(Errno.ENOSYS, f"vcpu_op {cmd}")


_VCPUOP_NAMES = {
    VCPUOP_set_singleshot_timer: "set_singleshot_timer",
    VCPUOP_stop_singleshot_timer: "stop_singleshot_timer",
    VCPUOP_stop_periodic_timer: "stop_periodic_timer",
    VCPUOP_set_periodic_timer: "set_periodic_timer",
    VCPUOP_is_up: "is_up",
    VCPUOP_register_runstate_memory_area: "register_runstate_memory_area",
    VCPUOP_get_runstate_info: "get_runstate_info",
    VCPUOP_register_vcpu_info: "register_vcpu_info",
}


# --------------------------------------------------------------------------- xen_version, IPIs
def xen_version(dom: Domain, cmd: int, arg: int) -> int | None:
    """The xen_version sub-commands an HVM guest asks for; None: not one of them."""
    if dom.hvm is None:
        return None
    mem = dom.arg_mem
    if cmd == XENVER_get_features:
        idx, _ = XEN_FEATURE_INFO.unpack(mem.read(arg, XEN_FEATURE_INFO.size))
        mem.write(arg + 4, struct.pack("<I", HVM_FEATURES if idx == 0 else 0))
        return 0
    if cmd == XENVER_extraversion:
        mem.write(arg, b".0-pvio".ljust(16, b"\0"))
        return 0
    if cmd == XENVER_capabilities:
        mem.write(arg, b"hvm-3.0-x86_64".ljust(1024, b"\0"))
        return 0
    if cmd == XENVER_compile_info:
        mem.write(arg, bytes(64 + 16 + 32 + 32))
        return 0
    if cmd == XENVER_changeset:
        mem.write(arg, b"pvio".ljust(64, b"\0"))
        return 0
    if cmd == XENVER_platform_parameters:
        mem.write(arg, _U64.pack(0xFFFF_8000_0000_0000))
        return 0
    if cmd == XENVER_pagesize:
        return PAGE_SIZE
    return None


def bind_ipi(table: HypercallTable, dom: Domain, arg: int) -> int:
    """EVTCHNOP_bind_ipi for vCPU 0: a port that raises itself when sent on."""
    vcpu, _ = EVTCHN_BIND_IPI.unpack(dom.arg_mem.read(arg, EVTCHN_BIND_IPI.size))
    if vcpu != 0:
        raise _fail(Errno.ENOENT, f"vcpu {vcpu}")
    port = table.free_port(dom)
    from pvio.abi import EvtchnStat

    dom.ports[port] = Channel(EvtchnStat.ipi)
    dom.arg_mem.write(arg + 4, struct.pack("<I", port))
    return 0


def e820_for(dom: Domain, low_reserved: tuple[int, int] = (0x9F000, 0x100000)) -> list[tuple[int, int, int]]:
    """The memory map of a PVH domain: RAM, minus the BIOS hole and pvio's special pages on top."""
    from pvio.abi.xen import E820_RAM, E820_RESERVED

    lo, hi = low_reserved
    top = dom.hypercall_page_gfn << PAGE_SHIFT
    return [
        (0, lo, E820_RAM),
        (lo, hi - lo, E820_RESERVED),
        (hi, top - hi, E820_RAM),
        (top, dom.mem.size - top, E820_RESERVED),
    ]
