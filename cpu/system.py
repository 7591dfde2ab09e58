"""SystemVcpu: an x86-64 vCPU in system mode (paging, rings, IDT) for unmodified PVH guests.

Beside :class:`pvio.cpu.vcpu.X86Vcpu` (flat PV mode, pvio's own guest kernel) this vCPU
runs real operating systems -- Debian's Linux and GRUB -- as Xen PVH guests.  Unicorn
(qemu's TCG) executes the instructions; everything a hypervisor adds to bare silicon is
done here, between ``emu_start`` slices.

Design
------
* **Slices by instruction count only.**  ``emu_start(rip, until=0, count=N)``; never
  ``timeout=`` or an asynchronous ``emu_stop``: stopping the engine from outside can land
  in the middle of the guest patching its own code, and ``until != 0`` makes qemu
  translate ``until - 1`` through the guest's page tables (a spurious page fault).
  Hooks that need the hypervisor record an *event* and stop the engine at the
  instruction; the slice loop handles it with the engine stopped.
* **Exits.**  VMCALL/VMMCALL arrive as invalid instructions (the hook returns False so
  the engine stops at RIP): they are hypercalls into the same
  :class:`pvio.core.hypercall.HypercallTable` as every other guest (64-bit convention
  RAX; RDI, RSI, RDX, R10, R8 -- or 32-bit EAX; EBX, ECX, EDX, ESI, EDI when the guest
  is not in long mode).  Other invalid opcodes (``ud2``: Linux's BUG/WARN) are #UD.
  Exceptions and ``int n`` arrive through ``UC_HOOK_INTR`` and are delivered through the
  guest's IDT by :meth:`SystemVcpu._deliver` (IST, TSS.RSP0 on a ring change, 16-byte
  alignment, SS/RSP/RFLAGS/CS/RIP and the error code, IF cleared for interrupt gates);
  a guest still in 32-bit protected mode gets the 32-bit form (8-byte gates, TSS.ESP0/SS0,
  32-bit words, flat segments).  ``syscall`` is a no-op in unicorn 2.1.4 and is emulated
  (STAR/LSTAR/FMASK, RCX/R11, CPL 0); ``sysret`` and ``iretq`` run natively.  ``hlt``
  makes the engine return after it: the vCPU then sleeps until an event is deliverable.
* **Engine state unicorn does not expose.**  Two fields of qemu's CPU state are patched
  in the raw context (:data:`CTX_OLD_EXCEPTION`, :data:`CTX_HFLAGS`): qemu never clears
  its "exception in progress" record, so without a reset the second page fault becomes
  a double fault and the third vanishes; and writing CS does not change the CPL, which
  lives in hflags.  Both offsets are specific to unicorn 2.1.4 (pinned in
  pyproject.toml) and are checked by :func:`self_test` before the first vCPU is built.
  The exception error code (:data:`CTX_ERROR_CODE`) is read from the same context.
* **Guest-virtual arguments.**  ``mem_read``/``mem_write`` are guest-physical; hypercall
  arguments are guest-virtual.  :class:`VirtualSpace` walks the guest's 4-level page
  tables (2 MiB and 1 GiB pages included; identity when paging is off) and is installed
  as ``Domain.arg_mem``, so the hypercall table reads arguments with no knowledge of
  paging.  Translations are cached per slice only (the guest may change its tables
  between slices).
* **Events.**  The HVM callback vector (``HVM_PARAM_CALLBACK_IRQ``) is injected when
  ``vcpu_info[0].evtchn_upcall_pending`` is set and the guest has IF = 1, at slice
  boundaries, after hypercalls and on wake-up from ``hlt``.  A ``syscall`` that stops
  with an event deliverable and user IF = 1 takes the interrupt first (RIP back over the
  ``syscall``, which re-runs after the guest's ``iretq``): otherwise a syscall-heavy loop
  starves the timer.
* **Time.**  The guest's RDTSC is the host TSC (unicorn cannot hook it), so
  ``vcpu_time_info`` is published at every slice as Xen does: ``tsc_timestamp`` (the
  host TSC, read by a one-instruction helper engine), ``system_time`` (the hypervisor's
  clock, which also fires the guest's timers) and the TSC→ns scale measured at start.
* **Memory.**  RAM is the domain's mmap, mapped at guest-physical 0.  Pages outside RAM
  are MMIO routed to ``hv.iobus`` (the devices registered for the domain); where no device
  claims an address it reads all-ones and ignores writes (Xen's "unpopulated"), and the
  pages mapped that way are bounded in number; the local
  APIC page is plain memory with ID 0 and a version register, which is what Linux needs
  to accept the MP table and use Xen's timer.  ``alias_page`` (XENMEM_add_to_physmap)
  shows a hypervisor page (shared_info, a grant frame) at a guest frame.
* **Watchdog.**  An engine error, an undeliverable exception (no IDT entry, a stack that
  does not translate), a slice that stops with nothing to show for it (qemu's silent
  triple fault) three times in a row, ``hlt`` with interrupts disabled, or too many slices
  without any exit crash *that* domain with a register dump and its last hypercalls in
  the log; the hypervisor and the other domains go on.

Counters (on the domain): ``exits.hypercall`` (the table), ``exits.page_fault``,
``exits.exception``, ``exits.syscall``, ``exits.pio``, ``exits.mmio``, ``exits.hlt``,
``exits.cpuid``, ``interrupts`` (callback-vector injections).
"""

from __future__ import annotations

import ctypes
import logging
import struct
import time
from collections import deque
from typing import TYPE_CHECKING, Any

import trio
from unicorn import (
    UC_ARCH_X86,
    UC_ERR_INSN_INVALID,
    UC_HOOK_CODE,
    UC_HOOK_INSN,
    UC_HOOK_INSN_INVALID,
    UC_HOOK_INTR,
    UC_HOOK_MEM_UNMAPPED,
    UC_MODE_64,
    UC_PROT_ALL,
    Uc,
    UcError,
)
from unicorn import __version__ as UNICORN_VERSION
from unicorn import x86_const as X

from pvio.abi import PAGE_SIZE, SHARED_INFO_WC_VERSION, VCPU_TIME_INFO, VCPU_UPCALL_PENDING
from pvio.abi.xen import (
    VCPU_TIME_INFO_STRUCT,
    XEN_CPUID_BASE,
    XEN_CPUID_MAX_LEAF,
    XEN_CPUID_SIGNATURE,
    XEN_HVM_CPUID_DOMID_PRESENT,
    XEN_HVM_CPUID_VCPU_ID_PRESENT,
    XEN_HYPERCALL_MSR,
)
from pvio.core.memory import GuestFault
from pvio.cpu.shadow import ADDR_MASK, PTE_P, PTE_PS  # the x86 page-table bits, defined once

if TYPE_CHECKING:
    from pvio.core.domain import Domain
    from pvio.core.hypervisor import Hypervisor

log = logging.getLogger("pvio.cpu.system")

SUPPORTED_UNICORN = "2.1.4"
CTX_HFLAGS = 216  # qemu env->hflags (u32): CPL in bits 0-1, LMA bit 14, CS64 bit 15
CTX_ERROR_CODE = 5424  # qemu env->error_code (i32) of the last exception
CTX_OLD_EXCEPTION = 5536  # qemu env->old_exception (i32): -1 when no exception is in progress
HF_CPL_MASK = 3
HF_LMA = 1 << 14
HF_CS64 = 1 << 15

DEFAULT_SLICE_INSNS = 200_000
DEFAULT_MAX_SLICES_WITHOUT_EXIT = 20_000
MAX_NO_PROGRESS = 3
SOFT_HALT_S = 0.001
MAX_UNPOPULATED_PAGES = 4096
LAPIC_BASE = 0xFEE00000
LAPIC_VERSION = 0x50014
HYPERCALL_STUB_SIZE = 32
LAST_HYPERCALLS = 16

RFLAGS_TF = 1 << 8
RFLAGS_IF = 1 << 9
RFLAGS_NT = 1 << 14
RFLAGS_RF = 1 << 16
RFLAGS_VM = 1 << 17
CR0_PG = 1 << 31
CR4_PAE = 1 << 5
MSR_EFER = 0xC0000080
MSR_STAR = 0xC0000081
MSR_LSTAR = 0xC0000082
MSR_FMASK = 0xC0000084
EXC_UD = 6
EXC_DF = 8
EXC_PF = 14
_ERROR_CODE_VECTORS = frozenset({8, 10, 11, 12, 13, 14, 17, 21, 29, 30})
_EXCEPTION_NAMES = {0: "#DE", 1: "#DB", 3: "#BP", 6: "#UD", 8: "#DF", 13: "#GP", 14: "#PF", 18: "#MC"}

_EV_INVALID = "invalid"
_EV_INTR = "intr"
_EV_SYSCALL = "syscall"
_EV_CPUID_HCPAGE = "cpuid-hypercall-page"
_EV_WRMSR = "wrmsr"

_DUMP_REGS = (
    "rip", "rsp", "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "r8", "r9", "r10", "r11",
    "r12", "r13", "r14", "r15", "rflags", "cr0", "cr2", "cr3", "cr4", "cs", "ss",
)  # fmt: skip


#: The CPUID leaf pvio adds after the engine's CPU model's last basic leaf: the processor's frequency.
CPUID_FREQ_LEAF = 0x16


class SystemVcpuError(RuntimeError):
    """The installed unicorn does not have the internals this vCPU relies on."""


def host_address(buffer: Any) -> int:
    """The host address of a writable buffer (an mmap), without copying it."""
    return ctypes.addressof(ctypes.c_char.from_buffer(buffer))


_SELF_TESTED = False


def self_test() -> None:
    """Check the raw-context offsets on a scratch engine; SystemVcpuError says what is wrong."""
    global _SELF_TESTED
    if _SELF_TESTED:
        return
    hint = f"pvio's system vCPU needs unicorn=={SUPPORTED_UNICORN} (installed: {UNICORN_VERSION})"
    uc = Uc(UC_ARCH_X86, UC_MODE_64)
    uc.mem_map(0x1000, 0x1000)
    uc.mem_write(0x1000, b"\x31\xc9\xf7\xf1")  # xor ecx, ecx; div ecx: #DE
    ctx = uc.context_save()
    if ctx.size < CTX_OLD_EXCEPTION + 4:
        raise SystemVcpuError(f"{hint}: its CPU context is {ctx.size} bytes")
    hflags = _ctx_u32(ctx, CTX_HFLAGS)
    if hflags & (HF_LMA | HF_CS64) != HF_LMA | HF_CS64 or hflags & HF_CPL_MASK:
        raise SystemVcpuError(f"{hint}: hflags not at context offset {CTX_HFLAGS} ({hflags:#x})")
    if _ctx_i32(ctx, CTX_OLD_EXCEPTION) != -1:
        raise SystemVcpuError(f"{hint}: old_exception not at context offset {CTX_OLD_EXCEPTION}")
    uc.hook_add(UC_HOOK_INTR, lambda u, n, d: u.emu_stop())
    uc.emu_start(0x1000, 0, count=4)
    uc.context_update(ctx)
    if _ctx_i32(ctx, CTX_OLD_EXCEPTION) != 0:
        raise SystemVcpuError(f"{hint}: a #DE did not show at context offset {CTX_OLD_EXCEPTION}")
    _SELF_TESTED = True


def _ctx_i32(ctx: Any, off: int) -> int:
    return int(struct.unpack("<i", ctypes.string_at(ctx.context.value + off, 4))[0])


def _ctx_u32(ctx: Any, off: int) -> int:
    return int(struct.unpack("<I", ctypes.string_at(ctx.context.value + off, 4))[0])


def _ctx_put(ctx: Any, off: int, fmt: str, value: int) -> None:
    data = struct.pack(fmt, value)
    ctypes.memmove(ctx.context.value + off, data, len(data))


class _Helper:
    """A scratch engine that runs one instruction natively: the host TSC, the CPU model's CPUID."""

    def __init__(self) -> None:
        self.uc = Uc(UC_ARCH_X86, UC_MODE_64)
        self.uc.mem_map(0x1000, 0x1000)
        self.uc.mem_write(0x1000, b"\x0f\x31\x0f\xa2")  # rdtsc; cpuid
        self._cpuid: dict[tuple[int, int], tuple[int, int, int, int]] = {}

    def rdtsc(self) -> int:
        self.uc.emu_start(0x1000, 0, count=1)
        return int(self.uc.reg_read(X.UC_X86_REG_RDX) << 32 | self.uc.reg_read(X.UC_X86_REG_RAX))

    def cpuid(self, leaf: int, sub: int) -> tuple[int, int, int, int]:
        key = (leaf, sub)
        if key not in self._cpuid:
            uc = self.uc
            uc.reg_write(X.UC_X86_REG_RAX, leaf)
            uc.reg_write(X.UC_X86_REG_RCX, sub)
            uc.emu_start(0x1002, 0, count=1)
            a, b, c, d = (
                uc.reg_read(r) & 0xFFFF_FFFF
                for r in (X.UC_X86_REG_RAX, X.UC_X86_REG_RBX, X.UC_X86_REG_RCX, X.UC_X86_REG_RDX)
            )
            self._cpuid[key] = (a, b, c, d)
        return self._cpuid[key]


def _tsc_scale(helper: _Helper) -> tuple[int, int, int]:
    """(kHz, tsc_to_system_mul, tsc_shift) of the host TSC, measured over ~20 ms."""
    t0, c0 = time.perf_counter_ns(), helper.rdtsc()
    time.sleep(0.02)
    t1, c1 = time.perf_counter_ns(), helper.rdtsc()
    hz = max(1, (c1 - c0) * 1_000_000_000 // max(1, t1 - t0))
    shift = 0
    # ns = ((delta << shift) * mul) >> 32, with mul < 2**32.
    while (1_000_000_000 << 32) // (hz << shift if shift >= 0 else hz >> -shift) >= 1 << 32:
        shift += 1
    while shift > -31 and (1_000_000_000 << 32) // (hz << shift if shift >= 0 else hz >> -shift) < 1 << 31:
        shift -= 1
    denom = hz << shift if shift >= 0 else hz >> -shift
    return hz // 1000, (1_000_000_000 << 32) // denom, shift


class VirtualSpace:
    """A domain's guest-virtual address space as its vCPU sees it now (Domain.arg_mem)."""

    def __init__(self, vcpu: SystemVcpu) -> None:
        self.vcpu = vcpu

    def _chunks(self, addr: int, length: int) -> list[tuple[int, int]]:
        if length < 0 or addr < 0:
            raise GuestFault(f"guest range {addr:#x}+{length:#x}")
        out = []
        while length > 0:
            n = min(length, PAGE_SIZE - (addr & (PAGE_SIZE - 1)))
            out.append((self.vcpu.translate(addr), n))
            addr, length = addr + n, length - n
        return out

    def read(self, addr: int, length: int) -> bytes:
        """A copy of ``length`` guest-virtual bytes at ``addr`` (GuestFault if unmapped)."""
        mem = self.vcpu.dom.mem
        return b"".join(mem.read(pa, n) for pa, n in self._chunks(addr, length))

    def write(self, addr: int, data: bytes) -> None:
        """Store ``data`` at guest-virtual ``addr`` (GuestFault if any page is unmapped)."""
        mem = self.vcpu.dom.mem
        pos = 0
        for pa, n in self._chunks(addr, len(data)):
            mem.write(pa, data[pos : pos + n])
            pos += n


class SystemVcpu:
    """The one vCPU of a PVH domain: slices, exits, IDT delivery, the HVM callback vector."""

    def __init__(
        self,
        hv: Hypervisor,
        dom: Domain,
        *,
        slice_insns: int = DEFAULT_SLICE_INSNS,
        max_slices_without_exit: int = DEFAULT_MAX_SLICES_WITHOUT_EXIT,
    ) -> None:
        self_test()
        if slice_insns <= 0:
            raise ValueError(f"dom{dom.domid}: slice_insns must be positive, not {slice_insns}")
        self.hv = hv
        self.dom = dom
        self.slice_insns = slice_insns
        self.max_slices_without_exit = max_slices_without_exit
        uc = self.uc = Uc(UC_ARCH_X86, UC_MODE_64)
        self._ram_base = host_address(dom.mem.mmap)
        uc.mem_map_ptr(0, dom.mem.size, UC_PROT_ALL, self._ram_base)
        self._lapic = bytearray(PAGE_SIZE)
        struct.pack_into("<I", self._lapic, 0x30, LAPIC_VERSION)
        self._lapic_buf = (ctypes.c_char * PAGE_SIZE).from_buffer(self._lapic)
        uc.mem_map_ptr(LAPIC_BASE, PAGE_SIZE, UC_PROT_ALL, ctypes.addressof(self._lapic_buf))
        uc.hook_add(UC_HOOK_INSN_INVALID, self._on_invalid)
        uc.hook_add(UC_HOOK_INTR, self._on_intr)
        uc.hook_add(UC_HOOK_INSN, self._on_syscall, None, 1, 0, X.UC_X86_INS_SYSCALL)
        uc.hook_add(UC_HOOK_INSN, self._on_cpuid, None, 1, 0, X.UC_X86_INS_CPUID)
        uc.hook_add(UC_HOOK_INSN, self._on_in, None, 1, 0, X.UC_X86_INS_IN)
        uc.hook_add(UC_HOOK_INSN, self._on_out, None, 1, 0, X.UC_X86_INS_OUT)
        uc.hook_add(UC_HOOK_MEM_UNMAPPED, self._on_unmapped)
        self._ctx = uc.context_save()
        self._helper = _Helper()
        self.tsc_khz, self.tsc_mul, self.tsc_shift = _tsc_scale(self._helper)
        self.space = VirtualSpace(self)
        dom.arg_mem = self.space
        self.rip = 0
        self.halted = False
        self.slices = 0
        self.last_hypercalls: deque[tuple[int, int, tuple[int, ...], int]] = deque(maxlen=LAST_HYPERCALLS)
        self._wake = trio.Event()
        self._event: tuple[str, int] | None = None
        self._crash: str | None = None
        self._tlb: dict[int, int] = {}
        self._aliases: dict[int, int] = {}  # guest frame -> hypervisor frame shown there
        self._unpopulated: set[int] = set()
        self._no_progress = 0
        self._idle_slices = 0
        self._hcpage_hook: Any = None
        self._hcpage_budget = 0
        self._wall_set = False
        self._halt_deadline: float | None = None
        self._halt_suspect = 0
        self._halt_rip = -1
        self._df_retries = 0

    # ------------------------------------------------------------------ set-up
    def enter_protected_mode(self, entry: int, ebx: int, gdt_at: int) -> None:
        """The PVH entry state: 32-bit protected mode, paging off, flat segments, EBX = start info.

        The engine is created in long mode; turning paging on and off again is what
        clears EFER.LMA (writing EFER cannot).  The flat GDT is written at ``gdt_at``.
        """
        uc = self.uc
        gdt = struct.pack("<QQQ", 0, 0x00CF9A000000FFFF, 0x00CF92000000FFFF)
        self.dom.mem.write(gdt_at, gdt)
        uc.reg_write(X.UC_X86_REG_CR4, CR4_PAE)
        uc.reg_write(X.UC_X86_REG_CR0, 0x80000011)
        uc.reg_write(X.UC_X86_REG_CR0, 0x11)
        uc.msr_write(MSR_EFER, 0)
        uc.reg_write(X.UC_X86_REG_CR4, 0)
        uc.reg_write(X.UC_X86_REG_GDTR, (0, gdt_at, len(gdt) - 1, 0))
        uc.reg_write(X.UC_X86_REG_CS, 0x08)
        for reg in (X.UC_X86_REG_DS, X.UC_X86_REG_ES, X.UC_X86_REG_SS, X.UC_X86_REG_FS, X.UC_X86_REG_GS):
            uc.reg_write(reg, 0x10)
        uc.reg_write(X.UC_X86_REG_RFLAGS, 0x2)
        uc.reg_write(X.UC_X86_REG_RBX, ebx)
        self.rip = entry
        uc.context_update(self._ctx)
        if _ctx_u32(self._ctx, CTX_HFLAGS) & HF_LMA:
            raise SystemVcpuError("the engine stayed in long mode: cannot enter PVH's 32-bit entry")

    def alias_page(self, gfn: int, source_gfn: int) -> bool:
        """Show hypervisor frame ``source_gfn`` of this domain at guest frame ``gfn``."""
        addr = gfn * PAGE_SIZE
        if not 0 < gfn < (1 << 36) or LAPIC_BASE <= addr < LAPIC_BASE + PAGE_SIZE:
            return False
        try:
            if gfn in self._aliases or addr < self.dom.mem.size or gfn in self._unpopulated:
                self.uc.mem_unmap(addr, PAGE_SIZE)
            self._unpopulated.discard(gfn)
            self.uc.mem_map_ptr(addr, PAGE_SIZE, UC_PROT_ALL, self._ram_base + source_gfn * PAGE_SIZE)
        except UcError as e:
            log.warning("dom%d: cannot place frame %#x at gfn %#x: %s", self.dom.domid, source_gfn, gfn, e)
            return False
        self._aliases[gfn] = source_gfn
        self._tlb.clear()
        return True

    # ------------------------------------------------------------------ the Vcpu protocol
    def kick(self) -> None:
        """An upcall became pending: wake the vCPU if it sleeps in ``hlt``."""
        self._wake.set()

    def block(self) -> None:
        """SCHEDOP_block: an HVM guest idles with ``hlt``; treat block as one."""
        self.halted = True

    # ------------------------------------------------------------------ paging
    def translate(self, va: int) -> int:
        """Guest-virtual ``va`` -> guest-physical (RAM) address; GuestFault if not mapped."""
        page = va & ~(PAGE_SIZE - 1)
        pa = self._tlb.get(page)
        if pa is None:
            pa = self._walk(page)
            self._tlb[page] = pa
        return pa | (va & (PAGE_SIZE - 1))

    def _walk(self, va: int) -> int:
        uc = self.uc
        cr0 = uc.reg_read(X.UC_X86_REG_CR0)
        if not cr0 & CR0_PG:
            pa = va & 0xFFFF_FFFF
        else:
            efer = uc.msr_read(MSR_EFER)
            if not efer & (1 << 10):  # LMA: only long-mode paging is walked
                raise GuestFault(f"va {va:#x}: 32-bit paging is not supported for hypercall arguments")
            table = uc.reg_read(X.UC_X86_REG_CR3) & ADDR_MASK
            pa = -1
            for level, shift in enumerate((39, 30, 21, 12)):
                entry = struct.unpack("<Q", self._phys_read(table + ((va >> shift) & 511) * 8, 8))[0]
                if not entry & PTE_P:
                    raise GuestFault(f"va {va:#x} is not mapped (level {4 - level})")
                if level in (1, 2) and entry & PTE_PS:
                    size = 1 << shift
                    pa = (entry & ADDR_MASK & ~(size - 1)) | (va & (size - 1))
                    break
                table = entry & ADDR_MASK
            if pa < 0:
                pa = table
        gfn = pa >> 12
        if gfn in self._aliases:
            pa = (self._aliases[gfn] << 12) | (pa & (PAGE_SIZE - 1))
        self.dom.mem.check(pa, 1)
        return pa

    def _phys_read(self, pa: int, n: int) -> bytes:
        gfn = pa >> 12
        if gfn in self._aliases:
            pa = (self._aliases[gfn] << 12) | (pa & (PAGE_SIZE - 1))
        return self.dom.mem.read(pa, n)

    def vread(self, va: int, n: int) -> bytes:
        """Guest-virtual read (hypervisor side)."""
        return self.space.read(va, n)

    # ------------------------------------------------------------------ the run loop
    async def run(self) -> None:
        """Run the guest until its domain dies: slices, exits, event injection, ``hlt``."""
        dom = self.dom
        while dom.alive:
            if dom.state == "paused" or self.halted:
                self._wake = trio.Event()
                if dom.state == "running" and self._deliverable():
                    self.halted = False
                elif self.halted and self._halt_deadline is not None:
                    with trio.move_on_after(self._halt_deadline):
                        await self._wake.wait()
                    self.halted = False
                    continue
                else:
                    await self._wake.wait()
                    continue
            if self._deliverable():
                self._inject_callback()
            if self._crash is None:
                self._run_slice()
            if self._crash is not None:
                self._crash_domain(self._crash)
                return
            await trio.lowlevel.checkpoint()

    def _deliverable(self) -> bool:
        hvm = self.dom.hvm
        if hvm is None or not hvm.callback_vector or not self.dom.vcpu_info[VCPU_UPCALL_PENDING]:
            return False
        return bool(self.uc.reg_read(X.UC_X86_REG_RFLAGS) & RFLAGS_IF)

    def _inject_callback(self) -> None:
        if self._deliver(self.dom.hvm.callback_vector, None):
            self.dom.counters["interrupts"] += 1

    def _run_slice(self) -> None:
        uc = self.uc
        dom = self.dom
        self._event = None
        self._tlb.clear()
        self._publish_time()
        exits_before = dom.counters["exits"]
        state_before = self._progress_state()
        error: UcError | None = None
        try:
            uc.emu_start(self.rip, 0, count=self.slice_insns)
        except UcError as e:
            error = e
        self.slices += 1
        self.rip = uc.reg_read(X.UC_X86_REG_RIP)
        event = self._event
        self._event = None
        if (
            event is not None
            and event[0] == _EV_INVALID
            and error is not None
            and error.errno == UC_ERR_INSN_INVALID
        ):
            self._invalid_instruction()
        elif error is not None:
            self._crash = f"engine error: {error} at rip={self.rip:#x}"
        elif event is not None:
            kind, value = event
            if kind == _EV_INTR:
                self._exception(value)
            elif kind == _EV_SYSCALL:
                self._syscall()
            elif kind == _EV_CPUID_HCPAGE:
                self._watch_hypercall_page()
            elif kind == _EV_WRMSR:
                self._stop_watching_hypercall_page()
        else:
            self._maybe_halted()
        if dom.counters["exits"] != exits_before or event is not None or self.halted:
            self._idle_slices = 0
            self._no_progress = 0
        elif self._crash is None:
            self._idle_slices += 1
            # RIP alone is not progress: a ``rep stos`` stays at one RIP for millions of steps.
            self._no_progress = self._no_progress + 1 if self._progress_state() == state_before else 0
            if self._no_progress >= MAX_NO_PROGRESS:
                self._crash = (
                    f"no progress for {self._no_progress} slices (a triple fault or a lost exception)"
                )
            elif self._idle_slices >= self.max_slices_without_exit:
                self._crash = f"runaway guest: {self._idle_slices} slices without an exit"

    def _progress_state(self) -> tuple[int, ...]:
        uc = self.uc
        return (self.rip, *(uc.reg_read(r) for r in (X.UC_X86_REG_RCX, X.UC_X86_REG_RSI, X.UC_X86_REG_RDI,
                                                      X.UC_X86_REG_RSP, X.UC_X86_REG_RAX)))  # fmt: skip

    def _maybe_halted(self) -> None:
        """Did the slice end on ``hlt``?  Unicorn returns right after it, with no hook.

        The byte before RIP being 0xF4 is not proof: a slice that ran out of instructions
        after, say, ``mov -12(%ebp), %eax`` (8b 45 f4) looks the same.  ``sti; hlt`` (the
        idle loop) is taken as certain: the vCPU sleeps until an event.  Any other 0xF4
        with IF = 1 sleeps until an event or :data:`SOFT_HALT_S`, so a false alarm costs a
        moment, never a hang; with IF = 0 it is ignored unless it repeats at the same RIP
        (a guest halted for good: crashed, as Xen takes such a vCPU down).
        """
        try:
            before = self.vread(self.rip - 2, 2)
        except GuestFault:
            return
        if before[1] != 0xF4:
            self._halt_suspect = 0
            return
        if self.uc.reg_read(X.UC_X86_REG_RFLAGS) & RFLAGS_IF:
            self._count("exits.hlt")
            self.halted = True
            self._halt_deadline = None if before[0] == 0xFB else SOFT_HALT_S
            return
        self._halt_suspect = self._halt_suspect + 1 if self.rip == self._halt_rip else 1
        self._halt_rip = self.rip
        if self._halt_suspect >= MAX_NO_PROGRESS and not self.dom.vcpu_info[VCPU_UPCALL_PENDING]:
            self._count("exits.hlt")
            self._crash = "the guest halted with interrupts disabled"

    def _count(self, kind: str) -> None:
        c = self.dom.counters
        c["exits"] += 1
        c[kind] += 1

    def _publish_time(self) -> None:
        si = self.dom.vcpu_info
        off = VCPU_TIME_INFO
        version = (struct.unpack_from("<I", si, off)[0] + 1) | 1
        struct.pack_into("<I", si, off, version & 0xFFFF_FFFF)
        hvm = self.dom.hvm
        now = self.hv.now_ns() - (hvm.time_offset_ns if hvm is not None else 0)  # from boot, as Xen's
        VCPU_TIME_INFO_STRUCT.pack_into(
            si, off, version & 0xFFFF_FFFF, self._helper.rdtsc(), now, self.tsc_mul, self.tsc_shift, 0
        )
        struct.pack_into("<I", si, off, (version + 1) & 0xFFFF_FFFF)
        if not self._wall_set:  # wall clock at system time 0
            self._wall_set = True
            boot_ns = time.time_ns() - now  # wall clock at the guest's system time 0
            sec, nsec = divmod(boot_ns, 1_000_000_000)
            struct.pack_into(
                "<IIII", self.dom.shared_info, SHARED_INFO_WC_VERSION, 2, sec & 0xFFFF_FFFF, nsec, sec >> 32
            )

    # ------------------------------------------------------------------ context patches
    def _ctx_round_trip(self, cpl: int | None) -> int:
        """Clear qemu's exception-in-progress state (and set the CPL); returns the error code."""
        uc, ctx = self.uc, self._ctx
        uc.context_update(ctx)
        error_code = _ctx_i32(ctx, CTX_ERROR_CODE)
        _ctx_put(ctx, CTX_OLD_EXCEPTION, "<i", -1)
        if cpl is not None:
            hflags = _ctx_u32(ctx, CTX_HFLAGS)
            _ctx_put(ctx, CTX_HFLAGS, "<I", (hflags & ~HF_CPL_MASK) | cpl)
        uc.context_restore(ctx)
        return error_code & 0xFFFF_FFFF

    def _long_mode(self) -> bool:
        self.uc.context_update(self._ctx)
        return bool(_ctx_u32(self._ctx, CTX_HFLAGS) & HF_CS64)

    # ------------------------------------------------------------------ delivery through the IDT
    def _deliver(self, vector: int, error_code: int | None) -> bool:
        """Enter the guest's handler for ``vector`` as the CPU would (its IDT); False: crashed."""
        uc = self.uc
        self.uc.context_update(self._ctx)
        if not _ctx_u32(self._ctx, CTX_HFLAGS) & HF_LMA:
            return self._deliver_32(vector, error_code)
        cpl = _ctx_u32(self._ctx, CTX_HFLAGS) & HF_CPL_MASK
        _sel, idt_base, idt_limit, _f = uc.reg_read(X.UC_X86_REG_IDTR)
        if vector * 16 + 15 > idt_limit:
            self._crash = f"vector {vector} beyond the IDT limit {idt_limit:#x}"
            return False
        try:
            gate = self.vread(idt_base + vector * 16, 16)
            lo, selector, ist, attr, mid, hi, _r = struct.unpack("<HHBBHII", gate)
            if not attr & 0x80 or (attr & 0xF) not in (0xE, 0xF):
                self._crash = f"vector {vector}: IDT gate not present or not an interrupt/trap gate"
                return False
            handler = lo | mid << 16 | hi << 32
            rsp = uc.reg_read(X.UC_X86_REG_RSP)
            rflags = uc.reg_read(X.UC_X86_REG_RFLAGS)
            cs = uc.reg_read(X.UC_X86_REG_CS)
            ss = uc.reg_read(X.UC_X86_REG_SS)
            new_cpl = selector & 3
            if ist & 7 or new_cpl != cpl:
                _tsel, tss, _tl, _tf = uc.reg_read(X.UC_X86_REG_TR)
                slot = 0x24 + 8 * ((ist & 7) - 1) if ist & 7 else 4
                new_rsp = struct.unpack("<Q", self.vread(tss + slot, 8))[0]
            else:
                new_rsp = rsp
            new_rsp &= ~0xF
            words = [ss, rsp, rflags, cs, self.rip]
            if error_code is not None:
                words.append(error_code)
            frame_at = new_rsp - 8 * len(words)
            self.space.write(frame_at, struct.pack(f"<{len(words)}Q", *reversed(words)))
        except GuestFault as e:
            self._crash = f"cannot deliver vector {vector}: {e}"
            return False
        return self._enter_handler(vector, cpl, new_cpl, selector, new_cpl, attr, rflags, frame_at, handler)

    def _deliver_32(self, vector: int, error_code: int | None) -> bool:
        """Protected-mode delivery: an 8-byte gate (32-bit interrupt or trap gate), TSS.ESP0/SS0 on
        a ring change, EFLAGS/CS/EIP (and SS/ESP from an outer ring) and the error code pushed as
        32-bit words.  Segments are taken as flat (base 0), as every PVH guest sets them up."""
        uc = self.uc
        cpl = _ctx_u32(self._ctx, CTX_HFLAGS) & HF_CPL_MASK
        _sel, idt_base, idt_limit, _f = uc.reg_read(X.UC_X86_REG_IDTR)
        if vector * 8 + 7 > idt_limit:
            self._crash = f"vector {vector} beyond the IDT limit {idt_limit:#x} (32-bit)"
            return False
        try:
            lo, selector, _zero, attr, hi = struct.unpack("<HHBBH", self.vread(idt_base + vector * 8, 8))
            if not attr & 0x80 or (attr & 0xF) not in (0xE, 0xF):
                self._crash = f"vector {vector}: 32-bit IDT gate not present or not an interrupt/trap gate"
                return False
            handler = lo | hi << 16
            esp = uc.reg_read(X.UC_X86_REG_ESP) & 0xFFFF_FFFF
            eflags = uc.reg_read(X.UC_X86_REG_EFLAGS) & 0xFFFF_FFFF
            cs = uc.reg_read(X.UC_X86_REG_CS)
            ss = uc.reg_read(X.UC_X86_REG_SS)
            new_cpl = selector & 3
            words = [eflags, cs, self.rip & 0xFFFF_FFFF]
            new_ss = ss
            if new_cpl != cpl:
                _tsel, tss, _tl, _tf = uc.reg_read(X.UC_X86_REG_TR)
                new_esp, new_ss = struct.unpack("<IH", self.vread(tss + 4, 6))
                words = [ss, esp, *words]
            else:
                new_esp = esp
            if error_code is not None:
                words.append(error_code & 0xFFFF_FFFF)
            frame_at = (new_esp - 4 * len(words)) & 0xFFFF_FFFF
            self.space.write(frame_at, struct.pack(f"<{len(words)}I", *reversed(words)))
        except GuestFault as e:
            self._crash = f"cannot deliver vector {vector} (32-bit): {e}"
            return False
        return self._enter_handler(vector, cpl, new_cpl, selector, new_ss, attr, eflags, frame_at, handler)

    def _enter_handler(
        self,
        vector: int,
        cpl: int,
        new_cpl: int,
        selector: int,
        new_ss: int,
        attr: int,
        flags: int,
        frame_at: int,
        handler: int,
    ) -> bool:
        """The end of a delivery through an IDT gate, in either mode, once its frame is pushed:
        the engine's privilege level, flags (TF/NT/RF/VM cleared, IF too through an interrupt
        gate), CS (and SS on a ring change), the stack pointer at the frame, the handler."""
        uc = self.uc
        self._ctx_round_trip(new_cpl)
        new_flags = flags & ~(RFLAGS_TF | RFLAGS_NT | RFLAGS_RF | RFLAGS_VM)
        if attr & 0xF == 0xE:
            new_flags &= ~RFLAGS_IF
        try:
            uc.reg_write(X.UC_X86_REG_CS, selector)
            if new_cpl != cpl:
                uc.reg_write(X.UC_X86_REG_SS, new_ss)
        except UcError as e:
            self._crash = f"vector {vector}: cannot load CS {selector:#x}: {e}"
            return False
        uc.reg_write(X.UC_X86_REG_RSP, frame_at)  # ESP's upper half is 0 in protected mode
        uc.reg_write(X.UC_X86_REG_RFLAGS, new_flags)
        self.rip = handler
        self._tlb.clear()
        return True

    def _exception(self, vector: int) -> None:
        software = vector == 3 or vector == 4 or vector >= 32
        error_code = self._ctx_round_trip(None)
        if vector == EXC_DF:
            # The vCPU delivers every exception itself, so qemu never nests one: a #DF is
            # qemu's stale "exception in progress" record (it is also set by faults qemu
            # handles internally, without the hook) turning a fault into a double fault.
            # The record is now clear: run the instruction again to see the real fault.
            self._df_retries += 1
            self.dom.counters["exits.df_retry"] += 1
            if self._df_retries > MAX_NO_PROGRESS:
                self._crash = f"double fault at {self.rip:#x}"
            return
        self._df_retries = 0
        self._count("exits.page_fault" if vector == EXC_PF else "exits.exception")
        self._deliver(vector, error_code if vector in _ERROR_CODE_VECTORS and not software else None)

    # ------------------------------------------------------------------ instruction exits
    def _on_invalid(self, uc: Uc, _user: Any) -> bool:
        self._event = (_EV_INVALID, 0)
        return False

    def _invalid_instruction(self) -> None:
        try:
            insn = self.vread(self.rip, 3)
        except GuestFault:
            insn = b""
        if insn in (b"\x0f\x01\xc1", b"\x0f\x01\xd9"):
            self._hypercall()
            return
        self._count("exits.exception")
        self._ctx_round_trip(None)
        self._deliver(EXC_UD, None)

    def _hypercall(self) -> None:
        uc = self.uc
        dom = self.dom
        if self._long_mode():
            regs = (X.UC_X86_REG_RAX, X.UC_X86_REG_RDI, X.UC_X86_REG_RSI, X.UC_X86_REG_RDX,
                    X.UC_X86_REG_R10, X.UC_X86_REG_R8)  # fmt: skip
            mask = 0xFFFF_FFFF_FFFF_FFFF
        else:
            regs = (X.UC_X86_REG_EAX, X.UC_X86_REG_EBX, X.UC_X86_REG_ECX, X.UC_X86_REG_EDX,
                    X.UC_X86_REG_ESI, X.UC_X86_REG_EDI)  # fmt: skip
            mask = 0xFFFF_FFFF
        nr, a1, a2, a3, a4, a5 = (uc.reg_read(r) & mask for r in regs)
        if dom.hvm is not None:
            dom.hvm.compat = mask == 0xFFFF_FFFF
        try:
            result = self.hv.hypercalls.dispatch(dom, nr, a1, a2, a3, a4, a5)
        except Exception as e:  # a bug of ours: stop this guest, never the hypervisor
            log.exception("dom%d: internal error in the hypercall exit", dom.domid)
            self._crash = f"internal error in the hypercall exit: {e!r}"
            return
        self.last_hypercalls.append((self.slices, nr, (a1, a2, a3, a4, a5), result))
        if not dom.alive and dom.crash_reason is not None:  # the guest reported its own crash
            log.error("dom%d (%s) stopped: %s; registers:\n%s", dom.domid, dom.name, dom.crash_reason,
                      self.register_dump())  # fmt: skip
        uc.reg_write(X.UC_X86_REG_RAX, result & mask)
        self.rip += 3

    def _on_syscall(self, uc: Uc, _user: Any) -> None:
        self._event = (_EV_SYSCALL, 0)
        uc.emu_stop()

    def _syscall(self) -> None:
        """SYSCALL as the CPU does it (unicorn 2.1.4 runs it as a no-op); RIP is after it."""
        uc = self.uc
        self._count("exits.syscall")
        rflags = uc.reg_read(X.UC_X86_REG_RFLAGS)
        if rflags & RFLAGS_IF and self._deliverable():
            self.rip -= 2  # take the interrupt first; the syscall runs again after the iretq
            self._inject_callback()
            return
        star, lstar, fmask = (uc.msr_read(m) for m in (MSR_STAR, MSR_LSTAR, MSR_FMASK))
        uc.reg_write(X.UC_X86_REG_RCX, self.rip)
        uc.reg_write(X.UC_X86_REG_R11, rflags)
        self._ctx_round_trip(0)
        cs = (star >> 32) & 0xFFFC
        try:
            uc.reg_write(X.UC_X86_REG_CS, cs)
            uc.reg_write(X.UC_X86_REG_SS, cs + 8)
        except UcError as e:
            self._crash = f"syscall: cannot load CS {cs:#x} from STAR: {e}"
            return
        uc.reg_write(X.UC_X86_REG_RFLAGS, (rflags & ~fmask & ~RFLAGS_RF) | 0x2)
        self.rip = lstar

    def _on_intr(self, uc: Uc, intno: int, _user: Any) -> None:
        self._event = (_EV_INTR, intno)
        uc.emu_stop()

    # ------------------------------------------------------------------ CPUID and the hypercall page
    def _on_cpuid(self, uc: Uc, _user: Any) -> int:
        self._count("exits.cpuid")
        leaf = uc.reg_read(X.UC_X86_REG_RAX) & 0xFFFF_FFFF
        sub = uc.reg_read(X.UC_X86_REG_RCX) & 0xFFFF_FFFF
        a, b, c, d = self.cpuid(leaf, sub)
        for reg, v in zip((X.UC_X86_REG_RAX, X.UC_X86_REG_RBX, X.UC_X86_REG_RCX, X.UC_X86_REG_RDX),
                          (a, b, c, d), strict=True):  # fmt: skip
            uc.reg_write(reg, v)
        if leaf == XEN_CPUID_BASE + 2 and self._hcpage_hook is None:
            self._event = (_EV_CPUID_HCPAGE, 0)  # the guest is about to write the hypercall MSR
            uc.emu_stop()
        return 1

    def cpuid(self, leaf: int, sub: int) -> tuple[int, int, int, int]:
        """What CPUID ``leaf``/``sub`` returns to the guest: the CPU model's, plus Xen's leaves."""
        base = XEN_CPUID_BASE
        if base <= leaf < base + 0x10000:
            if leaf == base:
                sig = struct.unpack("<3I", XEN_CPUID_SIGNATURE)
                return base + XEN_CPUID_MAX_LEAF, sig[0], sig[1], sig[2]
            if leaf == base + 1:
                return (4 << 16) | 17, 0, 0, 0
            if leaf == base + 2:
                return 1, XEN_HYPERCALL_MSR, 0, 0
            if leaf == base + 3:
                if sub == 0:
                    return 0, 0, self.tsc_khz, 0
                if sub == 1:
                    return 0, 0, self.tsc_mul, self.tsc_shift & 0xFFFF_FFFF
                if sub == 2:
                    return self.tsc_khz, 0, 0, 0
                return 0, 0, 0, 0
            if leaf == base + 4:
                return XEN_HVM_CPUID_VCPU_ID_PRESENT | XEN_HVM_CPUID_DOMID_PRESENT, 0, self.dom.domid, 0
            return 0, 0, 0, 0
        if self._helper.cpuid(0, 0)[0] < leaf <= CPUID_FREQ_LEAF:
            # Leaf 0x16 (processor frequency) lets Linux take the CPU's speed without timing
            # the PIT: with no PIT to count, its quick calibration polls port 0x42 100,000 times.
            # The leaves between the engine's last and it exist, empty (no feature uses them).
            if leaf == CPUID_FREQ_LEAF:
                mhz = self.tsc_khz // 1000
                return mhz, mhz, 100, 0
            return 0, 0, 0, 0
        a, b, c, d = self._helper.cpuid(leaf, sub)
        if leaf == 0:
            a = max(a, CPUID_FREQ_LEAF)
        elif leaf == 1:
            c = (c | (1 << 31)) & ~((1 << 30) | (1 << 21) | (1 << 24) | (1 << 3))  # hypervisor; no rdrand,
            # x2apic, tsc-deadline, monitor: Linux then idles in hlt and uses Xen's timer
        elif leaf == 7 and sub == 0:
            b &= ~(1 << 18)  # no rdseed
        return a, b, c, d

    def _watch_hypercall_page(self) -> None:
        """Watch the next instructions for the WRMSR that names the hypercall page (unicorn hides it)."""
        self._hcpage_budget = 10_000
        self._hcpage_hook = self.uc.hook_add(UC_HOOK_CODE, self._on_code_hcpage, None, 1, 0)

    def _stop_watching_hypercall_page(self) -> None:
        if self._hcpage_hook is not None:
            self.uc.hook_del(self._hcpage_hook)
            self._hcpage_hook = 0  # watched once

    def _on_code_hcpage(self, uc: Uc, address: int, size: int, _user: Any) -> None:
        self._hcpage_budget -= 1
        if self._hcpage_budget <= 0:
            self._event = (_EV_WRMSR, 0)
            uc.emu_stop()
            return
        if size != 2:
            return
        try:
            insn = self.vread(address, 2)
        except GuestFault:
            return
        if insn != b"\x0f\x30" or uc.reg_read(X.UC_X86_REG_ECX) & 0xFFFF_FFFF != XEN_HYPERCALL_MSR:
            return
        gpa = (uc.reg_read(X.UC_X86_REG_EDX) & 0xFFFF_FFFF) << 32 | uc.reg_read(
            X.UC_X86_REG_EAX
        ) & 0xFFFF_FFFF
        self.write_hypercall_page(gpa & ~(PAGE_SIZE - 1))
        self._event = (_EV_WRMSR, 0)
        uc.emu_stop()

    def write_hypercall_page(self, gpa: int) -> None:
        """Fill the guest's hypercall page: stub N is ``mov $N, %eax; vmcall; ret``."""
        stubs = b"".join(
            (b"\xb8" + struct.pack("<I", n) + b"\x0f\x01\xc1\xc3").ljust(HYPERCALL_STUB_SIZE, b"\xcc")
            for n in range(PAGE_SIZE // HYPERCALL_STUB_SIZE)
        )
        try:
            self.dom.mem.write(gpa, stubs)
            self.dom.counters["hypercall_page.writes"] += 1
        except GuestFault:
            self._crash = f"hypercall page at {gpa:#x} outside RAM"

    # ------------------------------------------------------------------ port I/O and unpopulated memory
    def _on_in(self, uc: Uc, port: int, size: int, _user: Any) -> int:
        bus = getattr(self.hv, "iobus", None)
        ones = (1 << (8 * size)) - 1
        if bus is None:
            self._count("exits.pio")
            return ones
        try:
            return int(bus.pio_read(self.dom, port, size)) & ones
        except Exception:
            log.exception("dom%d: device model failed on port read %#x", self.dom.domid, port)
            return ones

    def _on_out(self, uc: Uc, port: int, size: int, value: int, _user: Any) -> None:
        bus = getattr(self.hv, "iobus", None)
        if bus is None:
            self._count("exits.pio")
            return
        try:
            bus.pio_write(self.dom, port, size, value)
        except Exception:
            log.exception("dom%d: device model failed on port write %#x", self.dom.domid, port)

    def _on_unmapped(self, uc: Uc, access: int, address: int, size: int, value: int, _user: Any) -> bool:
        """Guest-physical space outside RAM: a page of MMIO whose accesses go to ``hv.iobus`` (the
        devices registered for this domain; unclaimed addresses read all-ones and drop writes),
        mapped on first touch, at most :data:`MAX_UNPOPULATED_PAGES` pages."""
        gfn = address >> 12
        if gfn in self._unpopulated or len(self._unpopulated) >= MAX_UNPOPULATED_PAGES:
            return False
        try:
            uc.mmio_map(gfn << 12, PAGE_SIZE, self._unpop_read, gfn << 12, self._unpop_write, gfn << 12)
        except UcError:
            return False
        self._unpopulated.add(gfn)
        return True

    def _unpop_read(self, uc: Uc, offset: int, size: int, base: int) -> int:
        ones = (1 << (8 * size)) - 1
        bus = getattr(self.hv, "iobus", None)
        if bus is None:
            self._count("exits.mmio")
            return ones
        try:  # the bus counts the exit; a range no device claims reads all-ones there too
            return int(bus.mmio_read(self.dom, base + offset, size)) & ones
        except Exception:
            log.exception("dom%d: device model failed on MMIO read %#x", self.dom.domid, base + offset)
            return ones

    def _unpop_write(self, uc: Uc, offset: int, size: int, value: int, base: int) -> None:
        bus = getattr(self.hv, "iobus", None)
        if bus is None:
            self._count("exits.mmio")
            return
        try:
            bus.mmio_write(self.dom, base + offset, size, value)
        except Exception:
            log.exception("dom%d: device model failed on MMIO write %#x", self.dom.domid, base + offset)

    # ------------------------------------------------------------------ crash reports
    def register_dump(self) -> str:
        """Registers, the last hypercalls and the top of the stack, for the crash log."""
        uc = self.uc
        values = {}
        for name in _DUMP_REGS:
            try:
                values[name] = int(uc.reg_read(getattr(X, f"UC_X86_REG_{name.upper()}")))
            except (UcError, AttributeError):
                values[name] = -1
        values["rip"] = self.rip
        lines = [
            "  "
            + "  ".join(f"{n:>6}={values[n] & 0xFFFF_FFFF_FFFF_FFFF:016x}" for n in _DUMP_REGS[i : i + 3])
            for i in range(0, len(_DUMP_REGS), 3)
        ]
        try:
            words = struct.unpack("<4Q", self.vread(values["rsp"], 32))
            lines.append("  stack: " + " ".join(f"{w:016x}" for w in words))
        except GuestFault:
            lines.append("  stack: (rsp does not translate)")
        names = getattr(self.hv.hypercalls, "_names", {})
        for slice_no, nr, args, result in self.last_hypercalls:
            arg_text = ", ".join(f"{a:#x}" for a in args[:3])
            lines.append(f"  slice {slice_no}: {names.get(nr, nr)}({arg_text}) = {result}")
        return "\n".join(lines)

    def _crash_domain(self, reason: str) -> None:
        dom = self.dom
        if dom.alive:
            log.error("dom%d (%s): %s; registers:\n%s", dom.domid, dom.name, reason, self.register_dump())
            self.hv.crash_domain(dom, reason)
