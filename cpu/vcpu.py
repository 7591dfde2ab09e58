"""X86Vcpu: one emulated x86-64 vCPU (unicorn) running a Xen-PV-style guest kernel.

Design
------
* **Memory.**  The domain's RAM is one anonymous ``mmap`` (:class:`pvio.core.memory.GuestMemory`);
  it is handed to unicorn with ``mem_map_ptr``, so the engine, the hypervisor, netback's
  grant copies and the guest all touch the same bytes, never a copy.  Guest-virtual equals
  guest-physical (unicorn's 64-bit mode runs without page tables), so the addresses a
  guest passes in hypercalls are the guest-physical addresses the hypercall table
  expects.  Page 0 is left unmapped so that a NULL dereference is a fault, not a read.
* **Hypercalls.**  The hypercall page holds 128 stubs of 32 bytes; stub N is Xen's
  64-bit PV stub (``push %rcx; push %r11; mov $N,%eax; syscall; pop %r11; pop %rcx;
  ret``); the iret stub (23) also pushes ``%rax`` and ends in ``ud2``, since iret never
  returns.  ``syscall`` is hooked (UC_HOOK_INSN) and dispatched to
  :meth:`pvio.core.hypercall.HypercallTable.dispatch` with Xen's register convention: number
  in RAX, arguments in RDI, RSI, RDX, R10, R8, result in RAX.
* **Upcalls.**  Unicorn cannot inject interrupts, so delivery is ours and happens only
  at instruction boundaries we control: between slices and right after a hypercall
  whose effects made an upcall deliverable (the hook then stops the engine).  A
  delivery builds Xen's x86-64 bounce frame on the guest stack (16-byte aligned, low to
  high: RCX, R11, RIP, CS with the saved upcall mask in bits 32-39, RFLAGS with IF =
  not mask, RSP, SS), sets ``upcall_mask`` and jumps to the event callback registered
  with set_callbacks.  The guest returns with the iret hypercall: its frame (low to
  high: RAX, R11, RCX, flags, RIP, CS, RFLAGS, RSP, SS, as the iret stub leaves it)
  restores the registers and the upcall mask (from CS bits 32-39).
* **Time slicing.**  The vCPU runs ``emu_start(..., count=slice_insns)`` slices on the
  hypervisor's trio thread, with a ``trio.lowlevel.checkpoint()`` between slices, so
  every other domain, backend and the store run in between.  No Python hook runs per
  instruction; the only hooks are ``syscall``, ``in``/``out``, interrupts/exceptions
  and unmapped accesses (MMIO).  Runs are deterministic: the same slices, in the same
  trio order (the hypervisor seeds trio's scheduler), give the same counts.
* **Time.**  At the start of every slice the vCPU publishes the hypervisor's system time
  (``Hypervisor.now_ns``: trio's clock, so MockClock in tests) in ``vcpu_info[0].time``,
  Xen's ``vcpu_time_info`` with its version protocol (odd while updating) and
  ``tsc_to_system_mul`` 0: the guest reads ``system_time`` as is, no TSC extrapolation.
  With ``set_timer_op`` / VIRQ_TIMER that is enough for a guest to pace itself.
* **Blocking.**  SCHEDOP_block (``Domain.vcpu_block``: re-enables delivery as Xen does)
  parks the vCPU on a trio Event until :meth:`X86Vcpu.kick`; if an upcall is already
  deliverable it is delivered instead of parking (Xen's block checks pending events).
* **Faults.**  An unmapped access, an invalid opcode, an exception vector, a bounce
  frame that does not fit the guest's RAM, a bad iret frame, or a runaway guest (too
  many slices in a row without any exit or ``hlt``) crashes *that* domain through
  :meth:`pvio.Hypervisor.crash_domain`, with a register dump in the log; other domains
  keep running.  ``hlt`` ends the slice early and acts as a yield (a PV guest blocks
  with SCHEDOP_block instead).
* **Port I/O and MMIO.**  ``in``/``out`` and accesses to addresses the I/O bus
  (``hv.iobus``, when the hypervisor has one) claims as MMIO are exits, counted
  ``exits.pio`` / ``exits.mmio`` (by the bus, which counts every access it routes) and
  routed to the bus; without a bus, port reads return all-ones (no device) and writes
  are dropped, counted here.  An MMIO page (outside RAM) is mapped into the engine on
  first touch, with per-access callbacks to the bus; a page stays mapped for the
  domain's life, so once a device is unregistered its accesses read all-ones (the bus's
  "unclaimed") rather than fault.

Counters (on the domain): ``exits`` and ``exits.hypercall`` (the hypercall table counts
these), ``exits.pio``, ``exits.mmio``, ``exits.fault``, ``interrupts`` (upcalls entered).
Instructions are not counted: unicorn cannot say how many instructions a slice that
stopped early ran, and counting them per instruction would cost the ~175x slowdown.
"""

from __future__ import annotations

import ctypes
import logging
import struct
from typing import TYPE_CHECKING, Any

import trio
from unicorn import (
    UC_ARCH_X86,
    UC_HOOK_INSN,
    UC_HOOK_INTR,
    UC_HOOK_MEM_UNMAPPED,
    UC_MODE_64,
    UC_PROT_ALL,
    UC_PROT_READ,
    Uc,
    UcError,
)
from unicorn import x86_const as X

from pvio.abi import PAGE_SIZE, VCPU_TIME_INFO, VCPU_UPCALL_MASK, Hypercall
from pvio.core import evtchn
from pvio.core.memory import GuestFault

if TYPE_CHECKING:
    from pvio.core.domain import Domain
    from pvio.core.grant_table import GrantMapping
    from pvio.core.hypervisor import Hypervisor

log = logging.getLogger("pvio.cpu")

HYPERCALL_STUB_SIZE = 32
NR_HYPERCALL_STUBS = PAGE_SIZE // HYPERCALL_STUB_SIZE  # 128
FLAT_KERNEL_CS64 = 0xE033  # Xen's selectors for a 64-bit PV kernel
FLAT_KERNEL_SS64 = 0xE02B
RFLAGS_IF = 0x200
RFLAGS_FIXED = 0x2  # bit 1 always reads as 1
RFLAGS_GUEST = 0xCD5  # CF PF AF ZF SF DF OF: what a guest may restore through iret
BOUNCE_FRAME = struct.Struct("<7Q")  # RCX R11 RIP CS RFLAGS RSP SS, low to high
IRET_FRAME = struct.Struct("<9Q")  # RAX R11 RCX flags RIP CS RFLAGS RSP SS, low to high
TIME_VERSION = VCPU_TIME_INFO  # vcpu_time_info.version (u32), in vcpu_info[0]
TIME_SYSTEM_TIME = VCPU_TIME_INFO + 16  # vcpu_time_info.system_time (u64, ns)
DEFAULT_SLICE_INSNS = 200_000
DEFAULT_MAX_SLICES_WITHOUT_EXIT = 5_000  # 1e9 instructions: a guest spinning this long is stuck
FOREIGN_MAP_LIMIT = 1 << 40  # grant mappings must sit above RAM and below 1 TiB

_DUMP_REGS = (
    ("rip", X.UC_X86_REG_RIP),
    ("rsp", X.UC_X86_REG_RSP),
    ("rax", X.UC_X86_REG_RAX),
    ("rbx", X.UC_X86_REG_RBX),
    ("rcx", X.UC_X86_REG_RCX),
    ("rdx", X.UC_X86_REG_RDX),
    ("rsi", X.UC_X86_REG_RSI),
    ("rdi", X.UC_X86_REG_RDI),
    ("rbp", X.UC_X86_REG_RBP),
    ("r8", X.UC_X86_REG_R8),
    ("r9", X.UC_X86_REG_R9),
    ("r10", X.UC_X86_REG_R10),
    ("r11", X.UC_X86_REG_R11),
    ("r12", X.UC_X86_REG_R12),
    ("r13", X.UC_X86_REG_R13),
    ("r14", X.UC_X86_REG_R14),
    ("r15", X.UC_X86_REG_R15),
    ("rflags", X.UC_X86_REG_RFLAGS),
)
_EXCEPTION_NAMES = {
    0: "divide error",
    1: "debug",
    3: "breakpoint",
    4: "overflow",
    5: "bound range",
    6: "invalid opcode",
    8: "double fault",
    12: "stack fault",
    13: "general protection",
    14: "page fault",
    17: "alignment check",
}


def hypercall_stub(nr: int) -> bytes:
    """The 32-byte stub for hypercall ``nr`` (Xen's 64-bit PV sequence; iret never returns)."""
    mov_eax = b"\xb8" + struct.pack("<I", nr)
    if nr == Hypercall.iret:
        code = b"\x51\x41\x53\x50" + mov_eax + b"\x0f\x05\x0f\x0b"  # push rcx, r11, rax; syscall; ud2
    else:
        code = b"\x51\x41\x53" + mov_eax + b"\x0f\x05\x41\x5b\x59\xc3"  # ...; syscall; pop r11, rcx; ret
    return code.ljust(HYPERCALL_STUB_SIZE, b"\xcc")  # int3 padding: a jump into the middle faults


def hypercall_page() -> bytes:
    """The whole hypercall page: 128 stubs."""
    return b"".join(hypercall_stub(n) for n in range(NR_HYPERCALL_STUBS))


def host_address(buffer: Any) -> int:
    """The host address of a writable buffer (an mmap), without copying it."""
    return ctypes.addressof(ctypes.c_char.from_buffer(buffer))


class X86Vcpu:
    """The one vCPU of an x86 domain: runs the guest in slices, traps, delivers upcalls."""

    def __init__(
        self,
        hv: Hypervisor,
        dom: Domain,
        *,
        slice_insns: int = DEFAULT_SLICE_INSNS,
        max_slices_without_exit: int = DEFAULT_MAX_SLICES_WITHOUT_EXIT,
    ) -> None:
        if slice_insns <= 0:
            raise ValueError(f"dom{dom.domid}: slice_insns must be positive, not {slice_insns}")
        self.hv = hv
        self.dom = dom
        self.slice_insns = slice_insns
        self.max_slices_without_exit = max_slices_without_exit
        self.uc = Uc(UC_ARCH_X86, UC_MODE_64)
        self._ram_base = host_address(dom.mem.mmap)
        # Page 0 stays unmapped: a NULL pointer dereference in the guest is a fault.
        self.uc.mem_map_ptr(PAGE_SIZE, dom.mem.size - PAGE_SIZE, UC_PROT_ALL, self._ram_base + PAGE_SIZE)
        self.uc.hook_add(UC_HOOK_INSN, self._on_syscall, None, 1, 0, X.UC_X86_INS_SYSCALL)
        self.uc.hook_add(UC_HOOK_INSN, self._on_in, None, 1, 0, X.UC_X86_INS_IN)
        self.uc.hook_add(UC_HOOK_INSN, self._on_out, None, 1, 0, X.UC_X86_INS_OUT)
        self.uc.hook_add(UC_HOOK_INTR, self._on_interrupt)
        self.uc.hook_add(UC_HOOK_MEM_UNMAPPED, self._on_unmapped)
        self.rip = 0
        self.blocked = False
        self._wake = trio.Event()
        self._stop_requested = False  # a hook asked the slice loop to take over
        self._crash: str | None = None  # set by a hook: crash the domain after the slice
        self._iret_regs: tuple[int, int, int, int, int, int] | None = None
        self._idle_slices = 0
        self._mmio_pages: set[int] = set()
        self._foreign: dict[int, int] = {}  # grant handle -> guest address it is mapped at
        self.slices = 0

    # ------------------------------------------------------------------ set-up
    def set_entry(self, rip: int, **regs: int) -> None:
        """Where the guest starts, and its initial registers (``rsi=`` start_info, ...)."""
        self.rip = rip
        for name, value in regs.items():
            self.uc.reg_write(getattr(X, f"UC_X86_REG_{name.upper()}"), value)

    def write_hypercall_page(self) -> None:
        """Fill the domain's hypercall page with the 128 trapping stubs."""
        self.dom.mem.write(self.dom.hypercall_page_gfn * PAGE_SIZE, hypercall_page())

    # ------------------------------------------------------------------ the Vcpu protocol
    def kick(self) -> None:
        """An upcall became pending: wake the vCPU if it is parked."""
        self._wake.set()

    def block(self) -> None:
        """SCHEDOP_block (from the hypercall hook): park after this hypercall returns."""
        self.blocked = True
        self._stop_requested = True

    def iret(self) -> int:
        """The iret hypercall: read the frame the iret stub left at RSP; restored after the hook."""
        rsp = self.uc.reg_read(X.UC_X86_REG_RSP)
        try:
            frame = self.dom.mem.read(rsp, IRET_FRAME.size)
        except GuestFault:
            self._crash = f"iret with an unusable stack (rsp={rsp:#x})"
            self._stop_requested = True
            return 0
        rax, r11, rcx, _flags, rip, cs, rflags, new_rsp, _ss = IRET_FRAME.unpack(frame)
        self._iret_regs = (rax, r11, rcx, rip, rflags, new_rsp)
        self.dom.shared_info[VCPU_UPCALL_MASK] = 1 if (cs >> 32) & 0xFF else 0
        self._stop_requested = True
        return 0

    def map_foreign_page(self, host_addr: int, mapping: GrantMapping) -> None:
        """A grant map made by this guest: show the granter's page at ``host_addr``."""
        size = self.dom.mem.size
        if host_addr % PAGE_SIZE or not size <= host_addr < FOREIGN_MAP_LIMIT:
            log.warning("dom%d: grant map at %#x not shown to the vCPU (not a free page above RAM)",
                        self.dom.domid, host_addr)  # fmt: skip
            return
        base = host_address(mapping.granter.mem.mmap) + mapping.gfn * PAGE_SIZE
        perms = UC_PROT_READ if mapping.readonly else UC_PROT_ALL
        try:
            self.uc.mem_map_ptr(host_addr, PAGE_SIZE, perms, base)
        except UcError as e:
            log.warning("dom%d: cannot map grant at %#x: %s", self.dom.domid, host_addr, e)
            return
        self._foreign[mapping.handle] = host_addr

    def unmap_foreign_page(self, mapping: GrantMapping) -> None:
        """The guest unmapped a grant: remove its page from the engine."""
        addr = self._foreign.pop(mapping.handle, None)
        if addr is not None:
            self.uc.mem_unmap(addr, PAGE_SIZE)

    # ------------------------------------------------------------------ the run loop
    async def run(self) -> None:
        """Run the guest until its domain dies: slices, upcalls, parking."""
        dom = self.dom
        while dom.alive:
            if dom.state == "paused" or self.blocked:
                self._wake = trio.Event()  # before testing, so a kick from here on is not lost
                if dom.state == "running" and evtchn.upcall_deliverable(dom):
                    self.blocked = False
                else:
                    await self._wake.wait()
                    if dom.state == "running" and self.blocked and evtchn.upcall_deliverable(dom):
                        self.blocked = False
                    continue
            if evtchn.upcall_deliverable(dom):
                self._deliver_upcall()
            if self._crash is None:
                self._run_slice()
            if self._crash is not None:
                self._crash_domain(self._crash)
                return
            await trio.lowlevel.checkpoint()

    def _run_slice(self) -> None:
        dom = self.dom
        self._stop_requested = False
        exits_before = dom.counters["exits"]
        self._publish_time()
        try:
            self.uc.emu_start(self.rip, 0xFFFF_FFFF_FFFF_FFFF, count=self.slice_insns)
        except UcError as e:
            self._fault(str(e))
        self.slices += 1
        self.rip = self.uc.reg_read(X.UC_X86_REG_RIP)
        if self._iret_regs is not None:
            self._apply_iret()
        if dom.counters["exits"] != exits_before or self._ended_in_hlt():
            self._idle_slices = 0  # an exit, or a hlt (a yield: a polling driver, not a runaway loop)
        elif self._crash is None:
            self._idle_slices += 1
            if self._idle_slices >= self.max_slices_without_exit:
                self._crash = (
                    f"runaway guest: {self._idle_slices} slices of {self.slice_insns} instructions "
                    "without a hypercall or device access"
                )

    def _ended_in_hlt(self) -> bool:
        """Did the slice stop on a ``hlt`` (unicorn stops after it: the byte before RIP is 0xF4)?"""
        if self._stop_requested or self.rip < PAGE_SIZE + 1:
            return False
        try:
            return self.dom.mem.read(self.rip - 1, 1) == b"\xf4"
        except GuestFault:
            return False

    def _publish_time(self) -> None:
        """vcpu_time_info.system_time = now (version odd while writing, as Xen does)."""
        si = self.dom.shared_info
        version = (struct.unpack_from("<I", si, TIME_VERSION)[0] + 1) & 0xFFFF_FFFF
        struct.pack_into("<I", si, TIME_VERSION, version | 1)
        struct.pack_into("<Q", si, TIME_SYSTEM_TIME, self.hv.now_ns())
        struct.pack_into("<I", si, TIME_VERSION, ((version | 1) + 1) & 0xFFFF_FFFF)

    def _apply_iret(self) -> None:
        assert self._iret_regs is not None
        rax, r11, rcx, rip, rflags, rsp = self._iret_regs
        self._iret_regs = None
        uc = self.uc
        uc.reg_write(X.UC_X86_REG_RAX, rax)
        uc.reg_write(X.UC_X86_REG_R11, r11)
        uc.reg_write(X.UC_X86_REG_RCX, rcx)
        uc.reg_write(X.UC_X86_REG_RSP, rsp)
        # The guest may restore its arithmetic flags only: never TF (a trap per
        # instruction), IOPL or anything that would change how the engine runs it.
        uc.reg_write(X.UC_X86_REG_RFLAGS, (rflags & RFLAGS_GUEST) | RFLAGS_IF | RFLAGS_FIXED)
        self.rip = rip

    def _deliver_upcall(self) -> None:
        """Xen's event bounce: frame on the guest stack, mask events, enter the callback."""
        dom = self.dom
        callback = dom.callbacks.get("event", 0)
        if not callback:
            self._crash = "an event upcall is pending and unmasked but no event callback is registered"
            return
        uc = self.uc
        rsp = uc.reg_read(X.UC_X86_REG_RSP)
        frame_at = (rsp & ~15) - BOUNCE_FRAME.size
        si = dom.shared_info
        saved_mask = si[VCPU_UPCALL_MASK]
        rflags = uc.reg_read(X.UC_X86_REG_RFLAGS) & ~RFLAGS_IF
        if not saved_mask:
            rflags |= RFLAGS_IF
        frame = BOUNCE_FRAME.pack(
            uc.reg_read(X.UC_X86_REG_RCX),
            uc.reg_read(X.UC_X86_REG_R11),
            self.rip,
            FLAT_KERNEL_CS64 | (saved_mask << 32),
            rflags,
            rsp,
            FLAT_KERNEL_SS64,
        )
        if frame_at < PAGE_SIZE:
            self._crash = f"cannot deliver an event: unusable stack (rsp={rsp:#x})"
            return
        try:
            dom.mem.write(frame_at, frame)
        except GuestFault:
            self._crash = f"cannot deliver an event: unusable stack (rsp={rsp:#x})"
            return
        si[VCPU_UPCALL_MASK] = 1
        uc.reg_write(X.UC_X86_REG_RSP, frame_at)
        self.rip = callback
        dom.counters["interrupts"] += 1

    # ------------------------------------------------------------------ hooks (inside emu_start)
    def _on_syscall(self, uc: Uc, _user: Any) -> None:
        dom = self.dom
        try:
            regs = (
                X.UC_X86_REG_RAX,
                X.UC_X86_REG_RDI,
                X.UC_X86_REG_RSI,
                X.UC_X86_REG_RDX,
                X.UC_X86_REG_R10,
                X.UC_X86_REG_R8,
            )
            nr, a1, a2, a3, a4, a5 = (uc.reg_read(r) for r in regs)
            result = self.hv.hypercalls.dispatch(dom, nr, a1, a2, a3, a4, a5)
            uc.reg_write(X.UC_X86_REG_RAX, result & 0xFFFF_FFFF_FFFF_FFFF)
        except Exception as e:  # a bug of ours: stop this guest, never the hypervisor
            log.exception("dom%d: internal error in the hypercall trap", dom.domid)
            self._crash = f"internal error in the hypercall trap: {e!r}"
            self._stop_requested = True
        if self._stop_requested or not dom.alive or evtchn.upcall_deliverable(dom):
            uc.emu_stop()

    def _iobus(self) -> Any:
        return getattr(self.hv, "iobus", None)

    def _on_in(self, uc: Uc, port: int, size: int, _user: Any) -> int:
        bus = self._iobus()
        if bus is None:
            self._count_exit("exits.pio")
            return (1 << (8 * size)) - 1
        try:
            return int(bus.pio_read(self.dom, port, size)) & ((1 << (8 * size)) - 1)
        except Exception as e:
            self._device_error(f"port read {port:#x}/{size}", e)
            return (1 << (8 * size)) - 1

    def _on_out(self, uc: Uc, port: int, size: int, value: int, _user: Any) -> None:
        bus = self._iobus()
        if bus is None:
            self._count_exit("exits.pio")
            return
        try:
            bus.pio_write(self.dom, port, size, value)
        except Exception as e:
            self._device_error(f"port write {port:#x}/{size}", e)
        if evtchn.upcall_deliverable(self.dom) or not self.dom.alive:
            uc.emu_stop()

    def _count_exit(self, kind: str) -> None:
        """Count an exit the I/O bus did not see (the bus counts the ones it handles)."""
        c = self.dom.counters
        c["exits"] += 1
        c[kind] += 1

    def _device_error(self, what: str, e: Exception) -> None:
        log.exception("dom%d: device model failed on %s", self.dom.domid, what)
        self._crash = f"device model failed on {what}: {e!r}"
        self.uc.emu_stop()

    def _on_unmapped(self, uc: Uc, access: int, address: int, size: int, value: int, _user: Any) -> bool:
        """An access outside RAM: MMIO if the I/O bus claims the page, otherwise a fault."""
        bus = self._iobus()
        page = address & ~(PAGE_SIZE - 1)
        if bus is not None and page >= self.dom.mem.size and page not in self._mmio_pages:
            try:
                claimed = bool(bus.is_mmio(self.dom, address))
            except Exception as e:
                self._device_error(f"MMIO lookup {address:#x}", e)
                return False
            if claimed:
                try:
                    uc.mmio_map(page, PAGE_SIZE, self._mmio_read, page, self._mmio_write, page)
                except UcError as e:  # e.g. a grant mapping sits there: a fault, reported as such
                    log.warning("dom%d: cannot map MMIO page %#x: %s", self.dom.domid, page, e)
                    return False
                self._mmio_pages.add(page)
                return True
        return False  # the engine raises UC_ERR_*_UNMAPPED: _fault reports it

    def _mmio_read(self, uc: Uc, offset: int, size: int, page: int) -> int:
        try:
            return int(self._iobus().mmio_read(self.dom, page + offset, size)) & ((1 << (8 * size)) - 1)
        except Exception as e:
            self._device_error(f"MMIO read {page + offset:#x}/{size}", e)
            return 0

    def _mmio_write(self, uc: Uc, offset: int, size: int, value: int, page: int) -> None:
        try:
            self._iobus().mmio_write(self.dom, page + offset, size, value)
        except Exception as e:
            self._device_error(f"MMIO write {page + offset:#x}/{size}", e)
        if evtchn.upcall_deliverable(self.dom) or not self.dom.alive:
            uc.emu_stop()

    def _on_interrupt(self, uc: Uc, intno: int, _user: Any) -> None:
        name = _EXCEPTION_NAMES.get(intno, "software interrupt")
        self._fault(f"exception vector {intno} ({name})")
        uc.emu_stop()

    # ------------------------------------------------------------------ faults
    def _fault(self, what: str) -> None:
        self._count_exit("exits.fault")
        if self._crash is None:
            rip = self.uc.reg_read(X.UC_X86_REG_RIP)
            self._crash = f"guest fault: {what} at rip={rip:#x}"

    def register_dump(self) -> str:
        """The guest's registers and the top of its stack, for the crash log."""
        uc = self.uc
        values = {name: uc.reg_read(reg) for name, reg in _DUMP_REGS}
        lines = [
            "  " + "  ".join(f"{name:>6}={values[name]:016x}" for name, _ in _DUMP_REGS[i : i + 3])
            for i in range(0, len(_DUMP_REGS), 3)
        ]
        rsp = values["rsp"]
        try:
            if rsp < PAGE_SIZE:  # page 0 is RAM in the buffer but not mapped for the guest
                raise GuestFault(f"rsp {rsp:#x} in the unmapped page 0")
            words = struct.unpack("<4Q", self.dom.mem.read(rsp, 32))
            lines.append("  stack: " + " ".join(f"{w:016x}" for w in words))
        except GuestFault:
            lines.append("  stack: (rsp outside mapped RAM)")
        return "\n".join(lines)

    def _crash_domain(self, reason: str) -> None:
        dom = self.dom
        if dom.alive:
            log.error("dom%d (%s): %s; registers:\n%s", dom.domid, dom.name, reason, self.register_dump())
            self.hv.crash_domain(dom, reason)
