"""The CPU half of virtualization: one guest kernel run three ways on a unicorn vCPU.

:class:`Monitor` runs pvio's teaching kernel (``frontends/x86os``, built by
:mod:`pvio.cpu.guestos`) in one of three modes:

``trap`` -- full virtualization by trap-and-emulate
    The kernel is the one written for bare hardware and runs deprivileged at CPL 1 with
    IOPL 0, so ``cli``/``sti``/``hlt``/``mov cr``/``invlpg``/``lidt``/``lgdt``/``ltr``
    raise #GP.  Each such trap is an exit: the monitor decodes the instruction with
    capstone and emulates it on the virtual CPU (virtual IF, CR0/2/3, IDTR, GDTR, TR).
    Memory goes through :mod:`pvio.cpu.shadow` (a p2m that is not the identity, shadow
    tables, guest page tables write-protected, hidden vs true page faults).  Interrupts,
    exceptions and ``int $0x80`` are delivered through the guest's *virtual* IDT and TSS
    (the monitor reads them from guest memory).  The frames it pushes carry the guest's
    own selectors, which are not present in the engine's GDT, so the guest's ``iretq``
    faults too and the monitor performs it: the return from trap "bounces back" through
    the monitor, which is also how the virtual IF is restored exactly.
``bt`` -- binary translation
    The same kernel image.  :mod:`pvio.cpu.bt` translates each kernel code page when it
    is first executed: ``cli``/``sti``/``pushf``/``popf`` become in-line sequences on a
    virtual-IF byte in the monitor window (no exit), the other sensitive instructions
    become call-outs (``int3``, decoded once, at translation time).  Translated pages are
    write-protected; a write discards the translation.
``pv`` -- paravirtualization
    The ``-DPVIO_PV`` build of the same source.  Its page tables are real (machine frames,
    read-only to the guest), changed through batched ``mmu_update`` and ``mmuext_op``,
    which validate every entry as Xen's type system does; traps are registered with
    ``set_trap_table``, the kernel stack with ``stack_switch``, system calls enter on the
    syscall callback, the virtual IF is ``vcpu_info.evtchn_upcall_mask``, the timer is
    ``set_timer_op`` + VIRQ_TIMER and idle is ``SCHEDOP_block``.  All of it goes through
    pvio's one :class:`pvio.core.hypercall.HypercallTable` with Xen's numbers.

What no mode can show: hardware-assisted virtualization (VT-x/AMD-V, EPT).  Unicorn
(qemu's TCG) has no VMX, so there is no VM exit in hardware; every "exit" here is the
engine stopping and Python running (docs/cpu.md).

Design
------
* **Privilege.**  The guest kernel runs at real CPL 1 (the CPL is patched in qemu's
  hflags, :func:`pvio.cpu.system._ctx_put`), user processes at CPL 3.  In 64-bit mode
  CPL 1 is supervisor for paging, so the U/S bits of the guest's tables protect its
  kernel from its processes unchanged; CPL 1 is not 0, so privileged instructions fault.
  Port I/O does not fault in unicorn (it runs the IN/OUT hook at any CPL, ignoring IOPL
  and the TSS bitmap), so the hook itself is the exit: the monitor checks the CPL there.
* **The monitor window.**  PML4 slot 511 of every address space (shadow roots; the
  pinned L4s of a PV guest, as Xen installs its own slots) maps the monitor's pages,
  supervisor-only: the engine's GDT (read-only) with the real selectors, the virtual-IF
  byte and the translation cache.  A guest cannot name those frames: they have no
  guest-physical address.
* **Time.**  Slices are instruction counts (``emu_start(count=N)``).  The virtual clock
  is trio's (MockClock in tests and in ``pvio bench --cpu``): a slice that ran all its
  instructions advances it by ``slice_insns`` ns (1 instruction = 1 ns), a slice stopped
  by an exit by :data:`EXIT_NS`.  The PIT (native) and ``set_timer_op`` (PV) fire from
  the same clock, so runs are deterministic and counts exact.
* **Phases.**  The kernel brackets each measured operation with a port write to
  ``PORT_PHASE`` (instrumentation, not counted); the monitor records the counter deltas,
  the virtual time and the wall time of each phase (:attr:`Monitor.phases`).
* **Refusals.**  A guest that names memory it does not own, loads CR3 outside its memory,
  executes a privileged instruction the monitor will not emulate, or cannot take a trap
  is stopped with a logged reason (:meth:`pvio.Hypervisor.crash_domain`); a PV guest's
  bad ``mmu_update``/``mmuext_op`` gets Xen's errno and the attempt is counted.

Counters (on the domain): ``exits`` and ``exits.<kind>`` (``privileged``, ``page_fault``,
``pio``, ``iret``, ``syscall``, ``callout``, ``exception``, ``hypercall``), ``halts``, ``traps.reflected``,
``interrupts``, ``decodes``, ``emulated.<instruction>``, ``transitions.user_to_kernel`` and
``transitions.kernel_to_user`` (the ones the monitor performs), ``phases.<name>.begin/end``
(marks for the trace timeline), ``vcpu.slices``, ``vcpu.busy_ns``, ``vcpu.idle_ns``, the
shadow pager's and the translator's (``bt.*``), ``pv.refused``.
"""

from __future__ import annotations

import contextlib
import logging
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import trio
from capstone import CS_ARCH_X86, CS_MODE_64, Cs, CsInsn
from capstone import x86_const as C
from elftools.elf.elffile import ELFFile
from unicorn import (
    UC_ARCH_X86,
    UC_ERR_INSN_INVALID,
    UC_HOOK_INSN,
    UC_HOOK_INSN_INVALID,
    UC_HOOK_INTR,
    UC_MODE_64,
    UC_PROT_ALL,
    Uc,
    UcError,
)
from unicorn import x86_const as X

from pvio.abi import PAGE_SIZE, VCPU_TIME_INFO, VCPU_UPCALL_MASK, Errno, Hypercall
from pvio.core import evtchn
from pvio.core.hypercall import HypercallError
from pvio.core.memory import GuestFault
from pvio.cpu.shadow import (
    ADDR_MASK,
    ERR_I,
    ERR_P,
    ERR_U,
    ERR_W,
    MONITOR_SLOT,
    P2M,
    PTE_NX,
    PTE_P,
    PTE_W,
    FramePool,
    ShadowError,
    ShadowPager,
)
from pvio.cpu.system import (
    CTX_ERROR_CODE,
    CTX_HFLAGS,
    CTX_OLD_EXCEPTION,
    HF_CPL_MASK,
    VirtualSpace,
    _ctx_i32,
    _ctx_put,
    _ctx_u32,
    host_address,
    self_test,
)

if TYPE_CHECKING:
    from pvio.core.domain import Domain
    from pvio.core.hypervisor import Hypervisor
    from pvio.cpu.bt import Translator

log = logging.getLogger("pvio.cpu.monitor")

MODES = ("trap", "bt", "pv")
GUEST_PAGES = 1024  # 4 MiB of guest-physical memory
DOMAIN_PAGES = 2048  # machine frames of the domain: guest pool, monitor pool, hypervisor pages
GUEST_POOL_FIRST = 16  # mfns below are never handed out
BOOT_INFO_GPA = 0x1000
BOOT_PT_GPFN = 2  # the builder's boot tables: L4, L3, L2, then the L1s
P2M_GPFN = 8  # PV: the p2m list (u64 per guest frame)
BOOT_MAGIC = 0x70766F73
BOOT_INFO = struct.Struct("<12Q")

WINDOW_VA = 0xFFFF_FFFF_C000_0000  # PML4 511, PDPT 511, PD 0
WINDOW_GDT = 0  # page index in the window
WINDOW_VIF = 1
WINDOW_TC = 2  # first translation-cache page
WINDOW_PAGES = 64

# The engine's GDT (the monitor's): the guest's own selector values (0x08-0x2b, 0xe0xx)
# are not present in it, so a guest iretq with them faults and the monitor performs it.
SEL_KCS, SEL_KSS, SEL_USS, SEL_UCS = 0x49, 0x51, 0x5B, 0x63
GDT_ENTRIES = (
    0, 0, 0, 0, 0, 0, 0, 0, 0x00AF9A000000FFFF,
    0x00AFBB000000FFFF,  # 0x48: 64-bit code, DPL 1, accessed
    0x00CFB3000000FFFF,  # 0x50: data, DPL 1, accessed
    0x00CFF3000000FFFF,  # 0x58: data, DPL 3, accessed
    0x00AFFB000000FFFF,  # 0x60: 64-bit code, DPL 3, accessed
)  # fmt: skip
# The selectors the guest kernel sees in its trap frames.
# A PV kernel is told the real ones (its ABI) and may return to them with a native iretq.
VIRTUAL_SELECTORS = {"native": (0x08, 0x10, 0x23, 0x1B), "pv": (SEL_KCS, SEL_KSS, SEL_UCS, SEL_USS)}

RFLAGS_CF = 1
RFLAGS_IF = 1 << 9
RFLAGS_USER = 0xCD5 | (1 << 10)  # CF PF AF ZF SF OF DF: what a guest's iret may set
CR0_VALUE = 0x80010033  # PG WP NE ET MP PE
EFER_VALUE = 0xD00  # LMA LME NXE
MSR_EFER = 0xC0000080

PORT_CONSOLE = 0xE9
PORT_PHASE = 0x510
PORT_EXIT = 0x501
PIT_HZ = 1_193_182
EXIT_NS = 1_000  # virtual time charged for a slice an exit stopped
DEFAULT_SLICE_INSNS = 100_000
MAX_REPEATS = 64  # the same exit at the same RIP this many times in a row: stuck
VECTOR_TIMER = 32
VECTOR_SYSCALL = 0x80
PHASE_NAMES = {1: "cli_sti", 2: "port_write", 3: "pte_update", 4: "syscall", 5: "demand_zero",
               6: "process_switch", 7: "timer", 8: "idle", 9: "null"}  # fmt: skip

# Xen's mmuext_op commands (xen.h) and the MMU_NORMAL_PT_UPDATE request type.
MMUEXT_PIN_L1, MMUEXT_PIN_L4, MMUEXT_UNPIN = 0, 3, 4
MMUEXT_NEW_BASEPTR, MMUEXT_TLB_FLUSH_LOCAL, MMUEXT_INVLPG_LOCAL = 5, 6, 7
MMU_NORMAL_PT_UPDATE = 0
MMUEXT_OP = struct.Struct("<IIQQ")
MMU_UPDATE = struct.Struct("<QQ")
TRAP_INFO = struct.Struct("<BBHIQ")
MAX_BATCH = 512
XEN_IRET_FRAME = struct.Struct("<9Q")  # rax r11 rcx flags rip cs rflags rsp ss

_REG_NAMES = {  # capstone register name -> unicorn register
    n: getattr(X, f"UC_X86_REG_{n.upper()}")
    for n in ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp", "r8", "r9", "r10", "r11", "r12",
              "r13", "r14", "r15", "eax", "ebx", "ecx", "edx", "esi", "edi", "ebp", "esp", "ax", "bx",
              "cx", "dx", "al", "bl", "cl", "dl")
}  # fmt: skip
for _n in range(8, 16):
    _REG_NAMES[f"r{_n}d"] = getattr(X, f"UC_X86_REG_R{_n}D")


class MonitorStop(Exception):
    """The guest must be stopped; the message is the logged reason."""


@dataclass
class Phase:
    """One measured operation: counter deltas, virtual and wall time between the kernel's markers."""

    name: str
    counters: dict[str, int] = field(default_factory=dict)
    virtual_ns: int = 0
    wall_s: float = 0.0


@dataclass
class VirtualCpu:
    """What the guest believes its CPU is (trap and bt modes)."""

    cr0: int = CR0_VALUE
    cr2: int = 0
    cr3: int = 0
    cr4: int = 0x20
    idt: tuple[int, int] = (0, 0)  # base, limit
    gdt: tuple[int, int] = (0, 0)
    tr: int = 0
    vif: bool = False


class Monitor:
    """The vCPU and monitor of one teaching-kernel domain, in ``mode`` ("trap", "bt", "pv")."""

    def __init__(
        self,
        hv: Hypervisor,
        dom: Domain,
        mode: str,
        *,
        slice_insns: int = DEFAULT_SLICE_INSNS,
        guest_pages: int = GUEST_PAGES,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"dom{dom.domid}: unknown mode {mode!r} (one of {MODES})")
        self_test()
        self.hv, self.dom, self.mode = hv, dom, mode
        self.flavour = "pv" if mode == "pv" else "native"
        self.slice_insns = slice_insns
        self.counters = dom.counters
        self.vcpu = VirtualCpu()
        self.phases: dict[str, Phase] = {}
        self._phase_open: dict[int, tuple[dict[str, int], int, float]] = {}
        self._console = bytearray()
        self._event: tuple[str, int, int, int] | None = None
        self._crash: str | None = None
        self._repeat: tuple[int, str] = (0, "")
        self._repeats = 0
        self.halted = False
        self._wake = trio.Event()
        self._iret: tuple[int, ...] | None = None
        # PIT (native) and PIC state
        self._pit_period = 0
        self._pit_deadline = 0
        self._pit_bytes: list[int] = []
        self._irq_pending = False
        self._in_service = False
        # PV state
        self.trap_table: dict[int, int] = {}
        self.kernel_stack = 0
        self.pt_type: dict[int, int] = {}  # mfn -> page-table level it is pinned/validated as
        self.wcount: dict[int, int] = {}  # mfn -> writable mappings in validated L1 tables
        self.log: list[str] = []  # refusals and translator events, for tests and the bench
        # memory
        free_end = dom.free_end_gfn
        if GUEST_POOL_FIRST + guest_pages + WINDOW_PAGES + 64 > free_end:
            raise ValueError(f"dom{dom.domid}: {dom.mem.size // PAGE_SIZE} pages cannot hold the monitor")
        self.guest_pages = guest_pages
        self.p2m = P2M(dom.mem, guest_pages, FramePool(GUEST_POOL_FIRST, guest_pages), self.counters,
                       lazy=mode != "pv")  # fmt: skip
        first = GUEST_POOL_FIRST + guest_pages
        self.monitor_pool = FramePool(first, free_end - first, stride=1)
        uc = self.uc = Uc(UC_ARCH_X86, UC_MODE_64)
        uc.mem_map_ptr(0, dom.mem.size, UC_PROT_ALL, host_address(dom.mem.mmap))
        self._ctx = uc.context_save()
        self._md = Cs(CS_ARCH_X86, CS_MODE_64)
        self._md.detail = True
        self._build_window()
        self.translator: Translator | None = None
        if mode == "bt":
            from pvio.cpu.bt import Translator

            self.translator = Translator(self)
        tr = self.translator
        self.shadow = ShadowPager(
            dom.mem, self.p2m, self.monitor_pool, self.counters, self.window_l3,
            protect=tr.is_translated if tr else None,
            exec_guard=tr.needs_translation if tr else None,
            leaf_target=tr.copy_of if tr else None,
        )  # fmt: skip
        uc.hook_add(UC_HOOK_INTR, self._on_intr)
        uc.hook_add(UC_HOOK_INSN_INVALID, self._on_invalid)
        uc.hook_add(UC_HOOK_INSN, self._on_out, None, 1, 0, X.UC_X86_INS_OUT)
        uc.hook_add(UC_HOOK_INSN, self._on_in, None, 1, 0, X.UC_X86_INS_IN)
        uc.hook_add(UC_HOOK_INSN, self._on_syscall, None, 1, 0, X.UC_X86_INS_SYSCALL)
        dom.arg_mem = VirtualSpace(self)  # type: ignore[arg-type]  # duck-typed: translate(va), dom
        self.rip = 0

    # ------------------------------------------------------------------ the monitor window
    def _build_window(self) -> None:
        take = self.monitor_pool.take
        mem = self.dom.mem
        self.window_l3, l2, l1 = take(), take(), take()
        self.window_frames = [take() for _ in range(WINDOW_PAGES)]
        for mfn in (self.window_l3, l2, l1, *self.window_frames):
            mem.write(mfn * PAGE_SIZE, bytes(PAGE_SIZE))
        mem.write(self.window_l3 * PAGE_SIZE + 511 * 8, struct.pack("<Q", l2 << 12 | PTE_P | PTE_W))
        mem.write(l2 * PAGE_SIZE, struct.pack("<Q", l1 << 12 | PTE_P | PTE_W))
        for i, mfn in enumerate(self.window_frames):
            writable = PTE_W if i == WINDOW_VIF else 0  # GDT and code cache: read-only to the guest
            nx = PTE_NX if i < WINDOW_TC else 0
            mem.write(l1 * PAGE_SIZE + i * 8, struct.pack("<Q", mfn << 12 | PTE_P | writable | nx))
        gdt = struct.pack(f"<{len(GDT_ENTRIES)}Q", *GDT_ENTRIES)
        mem.write(self.window_frames[WINDOW_GDT] * PAGE_SIZE, gdt)
        self._gdt_limit = len(gdt) - 1

    def window_va(self, page: int) -> int:
        """The guest-virtual address of monitor-window page ``page``."""
        return WINDOW_VA + page * PAGE_SIZE

    # ------------------------------------------------------------------ building the guest
    def load(self, image: bytes, boot: dict[str, int]) -> None:
        """Load the kernel ELF at its physical addresses, build boot tables and boot info, set the entry."""
        elf = ELFFile(__import__("io").BytesIO(image))
        for seg in elf.iter_segments():
            if seg["p_type"] != "PT_LOAD":
                continue
            data = seg.data().ljust(seg["p_memsz"], b"\0")
            gpa = seg["p_paddr"]
            if gpa < 0x100000 or gpa + len(data) > self.guest_pages * PAGE_SIZE:
                raise ValueError(f"dom{self.dom.domid}: segment at {gpa:#x} outside the guest's memory")
            self._phys_write(gpa, data)
        npt = (self.guest_pages + 511) // 512
        pv = self.mode == "pv"
        p2m = self.p2m.mfn if pv else (lambda g: g)
        l4, l3, l2 = BOOT_PT_GPFN, BOOT_PT_GPFN + 1, BOOT_PT_GPFN + 2
        boot_tables = list(range(BOOT_PT_GPFN, BOOT_PT_GPFN + 3 + npt))
        self._phys_write(l4 * PAGE_SIZE, struct.pack("<Q", p2m(l3) << 12 | PTE_P | PTE_W))
        self._phys_write(l3 * PAGE_SIZE, struct.pack("<Q", p2m(l2) << 12 | PTE_P | PTE_W))
        self._phys_write(
            l2 * PAGE_SIZE,
            b"".join(struct.pack("<Q", p2m(l2 + 1 + i) << 12 | PTE_P | PTE_W) for i in range(npt)),
        )
        entries = []
        for gpfn in range(npt * 512):
            if gpfn == 0 or gpfn >= self.guest_pages:
                entries.append(0)
            elif pv and gpfn == self.guest_pages - 1:
                entries.append(self.dom.shared_info_gfn << 12 | PTE_P | PTE_W)
            else:
                w = 0 if pv and gpfn in boot_tables else PTE_W
                entries.append(p2m(gpfn) << 12 | PTE_P | w)
        self._phys_write((l2 + 1) * PAGE_SIZE, struct.pack(f"<{len(entries)}Q", *entries))
        first_free = max((seg["p_paddr"] + seg["p_memsz"] + PAGE_SIZE - 1) // PAGE_SIZE
                         for seg in elf.iter_segments() if seg["p_type"] == "PT_LOAD")  # fmt: skip
        if pv:
            p2m_list = struct.pack(f"<{self.guest_pages}Q", *self.p2m.mfns())
            self._phys_write(P2M_GPFN * PAGE_SIZE, p2m_list)
        info = BOOT_INFO.pack(
            BOOT_MAGIC, self.guest_pages, boot.get("ops", 8), boot.get("idle_ticks", 4),
            boot.get("idle_spin", 0), boot.get("hostile", 0), 1 if pv else 0,
            self.dom.shared_info_gfn if pv else 0, P2M_GPFN * PAGE_SIZE if pv else 0,
            BOOT_PT_GPFN * PAGE_SIZE, first_free, boot.get("timer_ns", 1_000_000),
        )  # fmt: skip
        self._phys_write(BOOT_INFO_GPA, info)
        self.rip = elf.header["e_entry"]
        uc = self.uc
        if pv:
            for level, gpfns in ((1, range(l2 + 1, l2 + 1 + npt)), (2, [l2]), (3, [l3]), (4, [l4])):
                for g in gpfns:
                    err = self._pin(self.p2m.mfn(g), level)
                    if err:
                        raise ValueError(f"dom{self.dom.domid}: builder's boot table {g:#x} invalid: {err}")
            root = self.p2m.mfn(l4) << 12
        else:
            self.vcpu.cr3 = l4 << 12
            root = self.shadow.root(self.vcpu.cr3)
        uc.reg_write(X.UC_X86_REG_CR4, 0x20)
        uc.msr_write(MSR_EFER, EFER_VALUE)
        uc.reg_write(X.UC_X86_REG_CR3, root)
        uc.reg_write(X.UC_X86_REG_CR0, CR0_VALUE)
        uc.reg_write(X.UC_X86_REG_GDTR, (0, self.window_va(WINDOW_GDT), self._gdt_limit, 0))
        self._set_cpl(1)
        uc.reg_write(X.UC_X86_REG_CS, SEL_KCS)
        uc.reg_write(X.UC_X86_REG_SS, SEL_KSS)
        uc.reg_write(X.UC_X86_REG_RFLAGS, 0x2)
        self._set_vif(False)

    def _phys_write(self, gpa: int, data: bytes) -> None:
        pos = 0
        while pos < len(data):
            n = min(len(data) - pos, PAGE_SIZE - ((gpa + pos) & 0xFFF))
            self.p2m.write(gpa + pos, data[pos : pos + n])
            pos += n

    # ------------------------------------------------------------------ engine state
    def _ctx_round_trip(self, cpl: int | None) -> int:
        uc, ctx = self.uc, self._ctx
        uc.context_update(ctx)
        error = _ctx_i32(ctx, CTX_ERROR_CODE)
        _ctx_put(ctx, CTX_OLD_EXCEPTION, "<i", -1)
        if cpl is not None:
            _ctx_put(ctx, CTX_HFLAGS, "<I", (_ctx_u32(ctx, CTX_HFLAGS) & ~HF_CPL_MASK) | cpl)
        uc.context_restore(ctx)
        return error & 0xFFFF_FFFF

    def _set_cpl(self, cpl: int) -> None:
        self._ctx_round_trip(cpl)

    def cpl(self) -> int:
        """The engine's current privilege level (1: guest kernel, 3: guest user)."""
        self.uc.context_update(self._ctx)
        return _ctx_u32(self._ctx, CTX_HFLAGS) & HF_CPL_MASK

    def flush_tlb(self) -> None:
        """Drop the engine's TLB (rewriting CR3 does, as on hardware)."""
        self.uc.reg_write(X.UC_X86_REG_CR3, self.uc.reg_read(X.UC_X86_REG_CR3))

    def reg(self, name: str) -> int:
        """A general register by capstone's name (sub-registers read from the full one)."""
        return int(self.uc.reg_read(_REG_NAMES[name]))

    # ------------------------------------------------------------------ the virtual IF
    def vif(self) -> bool:
        """The guest's interrupt flag as the guest believes it is."""
        if self.mode == "pv":
            return not self.dom.vcpu_info[VCPU_UPCALL_MASK]
        if self.mode == "bt":
            return bool(self.dom.mem.read(self.window_frames[WINDOW_VIF] * PAGE_SIZE, 1)[0])
        return self.vcpu.vif

    def _set_vif(self, on: bool) -> None:
        if self.mode == "pv":
            self.dom.vcpu_info[VCPU_UPCALL_MASK] = 0 if on else 1
            return
        self.vcpu.vif = on
        if self.mode == "bt":
            self.dom.mem.write(self.window_frames[WINDOW_VIF] * PAGE_SIZE, b"\x01" if on else b"\x00")
        flags = self.uc.reg_read(X.UC_X86_REG_RFLAGS)
        # The real IF mirrors the virtual one so the guest's pushf reads what it expects.
        self.uc.reg_write(X.UC_X86_REG_RFLAGS, (flags | RFLAGS_IF) if on else (flags & ~RFLAGS_IF))

    # ------------------------------------------------------------------ guest-virtual memory
    def translate(self, va: int, *, write: bool = False) -> int:
        """Guest-virtual -> machine address, as the guest kernel may access it; GuestFault if not."""
        if va >> 39 & 511 == MONITOR_SLOT and va >> 47:
            raise GuestFault(f"va {va:#x} is the monitor's window")
        try:
            if self.mode == "pv":
                return self._walk_machine(va, write)
            walk = self.shadow.guest_walk(self.vcpu.cr3, va)
            if not self.shadow.guest_allows(walk, ERR_W if write else 0):
                raise GuestFault(f"va {va:#x} is not mapped")
            return self.p2m.mfn(walk[-1][2] >> 12 & 0xFFFFFFFFFF) * PAGE_SIZE + (va & 0xFFF)
        except ShadowError as e:
            raise GuestFault(str(e)) from None

    def _walk_machine(self, va: int, write: bool) -> int:
        table = self.uc.reg_read(X.UC_X86_REG_CR3) & ADDR_MASK
        for shift in (39, 30, 21, 12):
            entry = struct.unpack("<Q", self.dom.mem.read(table + ((va >> shift) & 511) * 8, 8))[0]
            if not entry & PTE_P or (write and not entry & PTE_W):
                raise GuestFault(f"va {va:#x} is not mapped")
            table = entry & ADDR_MASK
        mfn = table >> 12
        if self.p2m.gpfn_of(mfn) is None and mfn != self.dom.shared_info_gfn:
            raise GuestFault(f"va {va:#x} maps frame {mfn:#x}, not the guest's")
        return table + (va & 0xFFF)

    def gread(self, va: int, n: int) -> bytes:
        """Read guest-virtual memory (the monitor acting as the CPU would)."""
        out = b""
        while n > 0:
            k = min(n, PAGE_SIZE - (va & 0xFFF))
            out += self.dom.mem.read(self.translate(va), k)
            va, n = va + k, n - k
        return out

    def gwrite(self, va: int, data: bytes) -> None:
        """Write guest-virtual memory (trap frames: the guest's stack)."""
        pos = 0
        while pos < len(data):
            k = min(len(data) - pos, PAGE_SIZE - ((va + pos) & 0xFFF))
            self.dom.mem.write(self.translate(va + pos, write=True), data[pos : pos + k])
            pos += k

    def decode(self, va: int) -> CsInsn:
        """Decode the instruction at guest-virtual ``va`` (capstone; counted as ``decodes``)."""
        code = self.gread(va, 15) if (va & 0xFFF) <= PAGE_SIZE - 15 else self._gread_partial(va)
        self.counters["decodes"] += 1
        for insn in self._md.disasm(code, va, 1):
            return insn
        raise MonitorStop(f"undecodable instruction {code[:4].hex()} at {va:#x}")

    def _gread_partial(self, va: int) -> bytes:
        first = PAGE_SIZE - (va & 0xFFF)
        data = self.gread(va, first)
        with contextlib.suppress(GuestFault):  # an instruction at a page's end: the next may be unmapped
            data += self.gread(va + first, 15 - first)
        return data

    # ------------------------------------------------------------------ the Vcpu protocol
    def kick(self) -> None:
        """An event became pending (PV): wake the vCPU if it blocks."""
        self._wake.set()

    def block(self) -> None:
        """SCHEDOP_block: sleep until an event (the table has already unmasked events)."""
        self.halted = True

    # ------------------------------------------------------------------ the run loop
    async def run(self) -> None:
        """Run the guest until its domain stops: slices, exits, interrupts, idle."""
        dom = self.dom
        while dom.alive:
            if self.halted:
                await self._idle()
                continue
            try:
                self._inject()
                if self._crash is None:
                    full = self._run_slice()
                    cost = self.slice_insns if full else EXIT_NS
                    self.counters["vcpu.busy_ns"] += cost
            except MonitorStop as e:
                self._crash = str(e)
            except (ShadowError, GuestFault) as e:
                self._crash = str(e)
            if self._crash is not None:
                self._stop(self._crash)
                return
            await trio.sleep(cost / 1e9)

    def _stop(self, reason: str) -> None:
        log.error("dom%d (%s, %s mode) stopped: %s at rip=%#x", self.dom.domid, self.dom.name, self.mode,
                  reason, self.rip)  # fmt: skip
        self.log.append(f"stopped: {reason}")
        self.hv.crash_domain(self.dom, reason)

    async def _idle(self) -> None:
        start = self.hv.now_ns()
        if self.mode == "pv":
            self._wake = trio.Event()
            if not evtchn.upcall_deliverable(self.dom):
                await self._wake.wait()
        else:
            await trio.sleep(max(0, self._pit_deadline - self.hv.now_ns()) / 1e9)
            self._pit_tick()
        self.counters["vcpu.idle_ns"] += self.hv.now_ns() - start
        self.halted = False

    def _pit_tick(self) -> None:
        if not self._pit_period:
            return
        now = self.hv.now_ns()
        if now >= self._pit_deadline:
            self._irq_pending = True
            missed = (now - self._pit_deadline) // self._pit_period + 1
            self._pit_deadline += missed * self._pit_period

    def _inject(self) -> None:
        """Deliver a pending interrupt the guest has enabled (slice boundaries only)."""
        if self.mode == "pv":
            if evtchn.upcall_deliverable(self.dom):
                handler = self.dom.callbacks.get("event", 0)
                if not handler:
                    raise MonitorStop("an event is pending and no event callback is registered")
                self._bounce(handler, VECTOR_TIMER, None)
                self.counters["interrupts"] += 1
            return
        self._pit_tick()
        if self._irq_pending and not self._in_service and self.vif():
            self._irq_pending = False
            self._in_service = True
            self._deliver_vector(VECTOR_TIMER, None, software=False)
            self.counters["interrupts"] += 1

    def _publish_time(self) -> None:
        if self.mode == "pv":
            struct.pack_into("<Q", self.dom.vcpu_info, VCPU_TIME_INFO + 16, self.hv.now_ns())

    def _run_slice(self) -> bool:
        """One slice; True if it ran all its instructions (no exit)."""
        uc = self.uc
        self._event = None
        self._publish_time()
        error: UcError | None = None
        try:
            uc.emu_start(self.rip, 0, count=self.slice_insns)
        except UcError as e:
            error = e
        self.counters["vcpu.slices"] += 1
        self.rip = uc.reg_read(X.UC_X86_REG_RIP)
        event, self._event = self._event, None
        if error is not None and not (event and event[0] == "invalid" and error.errno == UC_ERR_INSN_INVALID):
            raise MonitorStop(f"engine error: {error}")
        if event is None:
            return not self.halted
        self._check_repeat(event[0])
        kind = event[0]
        if kind == "intr":
            self._exception(event[1])
        elif kind == "invalid":
            self._invalid()
        elif kind == "out":
            self._port_out(event[1], event[2], event[3])
        elif kind == "syscall":
            self._syscall()
        return False

    def _check_repeat(self, kind: str) -> None:
        key = (self.rip, kind)
        self._repeats = self._repeats + 1 if key == self._repeat else 0
        self._repeat = key
        if self._repeats >= MAX_REPEATS and kind != "out":
            raise MonitorStop(f"stuck: {kind} at the same rip {MAX_REPEATS} times")

    def count_exit(self, kind: str) -> None:
        """One exit to the monitor, of ``kind``."""
        self.counters["exits"] += 1
        self.counters[f"exits.{kind}"] += 1

    # ------------------------------------------------------------------ hooks (engine running)
    def _on_intr(self, uc: Uc, intno: int, _user: Any) -> None:
        self._event = ("intr", intno, 0, 0)
        uc.emu_stop()

    def _on_invalid(self, uc: Uc, _user: Any) -> bool:
        self._event = ("invalid", 0, 0, 0)
        return False

    def _on_out(self, uc: Uc, port: int, size: int, value: int, _user: Any) -> None:
        self._event = ("out", port, size, value)
        uc.emu_stop()

    def _on_in(self, uc: Uc, port: int, size: int, _user: Any) -> int:
        self.count_exit("pio")
        return (1 << (8 * size)) - 1  # no device: all-ones

    def _on_syscall(self, uc: Uc, _user: Any) -> None:
        self._event = ("syscall", 0, 0, 0)
        uc.emu_stop()

    # ------------------------------------------------------------------ exceptions
    def _exception(self, vector: int) -> None:
        error = self._ctx_round_trip(None)
        if vector == 8:  # qemu's stale "exception in progress": the real fault comes on re-run
            self.counters["exits.df_retry"] += 1
            return
        cpl = self.cpl()
        if vector == 14:
            self.count_exit("page_fault")
            self._page_fault(error, cpl)
        elif vector == 13:
            if cpl == 1 and self.mode != "pv":
                self._privileged(error)
            else:
                self.count_exit("exception")
                if self.mode == "pv" and cpl == 1:
                    insn = self.decode(self.rip)
                    self.log.append(f"privileged instruction {insn.mnemonic} {insn.op_str} in a PV guest")
                    log.warning("dom%d: privileged %s %s in a PV kernel: #GP reflected", self.dom.domid,
                                insn.mnemonic, insn.op_str)  # fmt: skip
                self._reflect(13, error)
        elif (
            vector == 3 and self.translator is not None and cpl == 1 and self.translator.is_site(self.rip - 1)
        ):
            self.count_exit("callout")
            self.translator.callout(self.rip - 1)
        elif vector == VECTOR_SYSCALL and cpl == 3 and self.mode != "pv":
            self.count_exit("syscall")
            self.counters["traps.reflected"] += 1
            self._deliver_vector(VECTOR_SYSCALL, None, software=True)
        else:
            self.count_exit("exception")
            software = vector in (3, 4) or vector >= 32
            self._reflect(vector, error if vector in (8, 10, 11, 12, 13, 14, 17) and not software else None,
                          software=software)  # fmt: skip

    def _reflect(self, vector: int, error: int | None, *, software: bool = False) -> None:
        """Show the guest kernel an exception of its own (a true fault, a #GP, an int n)."""
        self.counters["traps.reflected"] += 1
        if self.mode == "pv":
            handler = self.trap_table.get(vector)
            if not handler:
                raise MonitorStop(f"vector {vector} at {self.rip:#x} and no handler in the trap table")
            self._bounce(handler, vector, error)
            return
        self._deliver_vector(vector, error, software=software)

    def _page_fault(self, error: int, cpl: int) -> None:
        cr2 = self.uc.reg_read(X.UC_X86_REG_CR2)
        if self.mode == "pv":
            struct.pack_into("<Q", self.dom.vcpu_info, 16, cr2)  # vcpu_info.arch.cr2, as Xen writes it
            self._reflect(14, error)
            return
        if cr2 >> 39 & 511 == MONITOR_SLOT and cr2 >> 47:
            raise MonitorStop(f"the guest touched the monitor window at {cr2:#x} (error {error:#x})")
        walk = self.shadow.guest_walk(self.vcpu.cr3, cr2)
        if self.shadow.guest_allows(walk, error):
            target = walk[-1][2] >> 12 & 0xFFFFFFFFFF
            tr = self.translator
            if (
                error & ERR_P
                and error & ERR_W
                and (self.shadow.is_table(target) or (tr and tr.is_translated(target)))
            ):
                self._emulate_store(cr2, target)
                return
            if tr is not None and error & ERR_P and error & ERR_I and not error & ERR_U:
                tr.translate_page(cr2 & ~0xFFF, target, cr2)
                self.shadow.fill(self.vcpu.cr3, walk)
                self.flush_tlb()
                return
            self.shadow.fill(self.vcpu.cr3, walk)
            self.flush_tlb()
            return
        self.vcpu.cr2 = cr2
        self._reflect(14, error)

    def _emulate_store(self, va: int, gpfn: int) -> None:
        """A guest store to a write-protected frame (its page table, a translated code page)."""
        insn = self.decode(self.rip)
        ops = insn.operands
        if insn.id != C.X86_INS_MOV or len(ops) != 2 or ops[0].type != C.X86_OP_MEM:
            raise MonitorStop(
                f"unemulated store {insn.mnemonic} {insn.op_str} to a protected page at {va:#x}"
            )
        size = ops[0].size
        src = ops[1]
        value = self.reg(insn.reg_name(src.reg)) if src.type == C.X86_OP_REG else src.imm
        value &= (1 << (8 * size)) - 1
        if (va & 0xFFF) + size > PAGE_SIZE:
            raise MonitorStop(f"store across a page boundary into a protected page at {va:#x}")
        self.dom.mem.write(self.p2m.mfn(gpfn) * PAGE_SIZE + (va & 0xFFF), value.to_bytes(size, "little"))
        if self.shadow.is_table(gpfn):
            self.shadow.guest_entry_written(gpfn, (va & 0xFFF) // 8)
        if self.translator is not None and self.translator.is_translated(gpfn):
            self.translator.invalidate(gpfn, f"store to code page {gpfn:#x} at {va:#x}")
        self.flush_tlb()
        self.rip += insn.size

    # ------------------------------------------------------------------ trap-and-emulate
    def _privileged(self, error: int) -> None:
        insn = self.decode(self.rip)
        self.count_exit("iret" if insn.mnemonic == "iretq" else "privileged")
        self.emulate(insn)

    def emulate(self, insn: CsInsn) -> None:
        """Perform one privileged instruction on the virtual CPU (``self.rip`` is at it)."""
        name = insn.mnemonic
        ops = insn.operands
        after = self.rip + insn.size
        v = self.vcpu
        crs = [insn.reg_name(op.reg) for op in ops if op.type == C.X86_OP_REG]
        cr = next((r for r in crs if r.startswith("cr")), None)
        self.counters[f"emulated.{name}" + (f"_{cr}" if name == "mov" and cr else "")] += 1
        if name == "cli":
            self._set_vif(False)
        elif name == "sti":
            self._set_vif(True)
        elif name == "hlt":
            if not self.vif():
                raise MonitorStop("hlt with interrupts disabled")
            self.counters["halts"] += 1  # the hlt's own exit is already counted (privileged or callout)
            self.halted = True
        elif name == "mov" and ops[0].type == C.X86_OP_REG and insn.reg_name(ops[0].reg).startswith("cr"):
            self._write_cr(insn.reg_name(ops[0].reg), self.reg(insn.reg_name(ops[1].reg)))
        elif name == "mov" and insn.reg_name(ops[1].reg).startswith("cr"):
            cr = insn.reg_name(ops[1].reg)
            self.uc.reg_write(_REG_NAMES[insn.reg_name(ops[0].reg)], getattr(v, cr, 0))
        elif name in ("lidt", "lgdt"):
            limit, base = struct.unpack("<HQ", self.gread(self.effective_address(insn, ops[0]), 10))
            setattr(v, name[1:], (base, limit))
        elif name == "ltr":
            v.tr = self.reg(insn.reg_name(ops[0].reg)) & 0xFFFF if ops[0].type == C.X86_OP_REG else 0
        elif name == "invlpg":
            self.flush_tlb()  # the shadows are coherent (write protection); only the engine's TLB caches
        elif name == "iretq":
            self._iret_frame()
            return
        else:
            raise MonitorStop(f"privileged instruction {name} {insn.op_str} at {self.rip:#x} is not emulated")
        self.rip = after

    def effective_address(self, insn: CsInsn, op: Any) -> int:
        """The linear address of a memory operand (flat segments)."""
        m = op.mem
        addr = m.disp
        if m.base:
            base = insn.reg_name(m.base)
            addr += insn.address + insn.size if base == "rip" else self.reg(base)
        if m.index:
            addr += self.reg(insn.reg_name(m.index)) * m.scale
        return addr & 0xFFFF_FFFF_FFFF_FFFF

    def _write_cr(self, cr: str, value: int) -> None:
        v = self.vcpu
        if cr == "cr3":
            gpfn = (value & ADDR_MASK) >> 12
            if not self.p2m.valid(gpfn):
                raise MonitorStop(f"mov to CR3 of {value:#x}: outside the guest's memory")
            v.cr3 = value
            self.uc.reg_write(X.UC_X86_REG_CR3, self.shadow.root(value))
        elif cr == "cr0":
            if value & 0x80000001 != 0x80000001:
                raise MonitorStop(f"mov to CR0 of {value:#x}: paging or protection off is not virtualized")
            v.cr0 = value
        elif cr == "cr2":
            v.cr2 = value
        elif cr == "cr4":
            if not value & 0x20:
                raise MonitorStop(f"mov to CR4 of {value:#x}: PAE off in long mode")
            v.cr4 = value
        else:
            raise MonitorStop(f"mov to {cr} is not virtualized")

    def _deliver_vector(self, vector: int, error: int | None, *, software: bool) -> None:
        """Enter the guest kernel's handler for ``vector`` through its virtual IDT and TSS."""
        base, limit = self.vcpu.idt
        if vector * 16 + 15 > limit:
            raise MonitorStop(f"vector {vector}: beyond the guest's IDT limit {limit:#x}")
        lo, _sel, _ist, attr, mid, hi, _r = struct.unpack("<HHBBHII", self.gread(base + vector * 16, 16))
        if not attr & 0x80 or attr & 0xF not in (0xE, 0xF):
            raise MonitorStop(f"vector {vector}: the guest's IDT gate is not present")
        if software and (attr >> 5) & 3 < 3 and self.cpl() == 3:
            self._reflect(13, vector * 8 + 2)
            return
        handler = lo | mid << 16 | hi << 32
        self._bounce(handler, vector, error, gate_clears_if=attr & 0xF == 0xE)

    def _guest_tss_rsp0(self) -> int:
        gdt_base, gdt_limit = self.vcpu.gdt
        index = self.vcpu.tr & ~7
        if not index or index + 15 > gdt_limit:
            raise MonitorStop(f"a ring change with no usable TSS (TR {self.vcpu.tr:#x})")
        lo, hi = struct.unpack("<QQ", self.gread(gdt_base + index, 16))
        tss = (lo >> 16 & 0xFFFFFF) | (lo >> 56 & 0xFF) << 24 | (hi & 0xFFFFFFFF) << 32
        return int(struct.unpack("<Q", self.gread(tss + 4, 8))[0])

    def _bounce(self, handler: int, vector: int, error: int | None, *, gate_clears_if: bool = True) -> None:
        """Push a trap frame with the guest's selectors and enter its kernel at ``handler`` (CPL 1)."""
        uc = self.uc
        user = self.cpl() == 3
        kcs, kss, ucs, uss = VIRTUAL_SELECTORS[self.flavour]
        rsp = uc.reg_read(X.UC_X86_REG_RSP)
        rflags = uc.reg_read(X.UC_X86_REG_RFLAGS)
        if user:
            new_rsp = self.kernel_stack if self.mode == "pv" else self._guest_tss_rsp0()
            if not new_rsp:
                raise MonitorStop("a trap from user mode and no kernel stack registered")
        else:
            new_rsp = rsp
        vif = True if user else self.vif()
        vflags = (rflags & ~RFLAGS_IF) | (RFLAGS_IF if vif else 0)
        words = [uss if user else kss, rsp, vflags, ucs if user else kcs, self.rip]
        if error is not None:
            words.append(error)
        frame_at = (new_rsp & ~0xF) - 8 * len(words)
        try:
            self.gwrite(frame_at, struct.pack(f"<{len(words)}Q", *reversed(words)))
        except GuestFault as e:
            raise MonitorStop(f"cannot push the vector {vector} frame at {frame_at:#x}: {e}") from None
        if user:
            self.counters["transitions.user_to_kernel"] += 1
            self._set_cpl(1)
            uc.reg_write(X.UC_X86_REG_CS, SEL_KCS)
            uc.reg_write(X.UC_X86_REG_SS, SEL_KSS)
        uc.reg_write(X.UC_X86_REG_RSP, frame_at)
        uc.reg_write(X.UC_X86_REG_RFLAGS, rflags & ~((1 << 8) | (1 << 14) | (1 << 16)))
        if gate_clears_if:
            self._set_vif(False)
        self.rip = handler

    def _iret_frame(self) -> None:
        """The guest kernel's iretq (it faulted on the guest's own selectors): return as the CPU would."""
        uc = self.uc
        rsp = uc.reg_read(X.UC_X86_REG_RSP)
        rip, cs, rflags, new_rsp, _ss = struct.unpack("<5Q", self.gread(rsp, 40))
        self._return_to(rip, cs, rflags, new_rsp)

    def _return_to(self, rip: int, cs: int, rflags: int, rsp: int) -> None:
        uc = self.uc
        kcs, _kss, ucs, _uss = VIRTUAL_SELECTORS[self.flavour]
        if cs & 0xFFFF == ucs:
            self.counters["transitions.kernel_to_user"] += 1
            self._set_cpl(3)
            uc.reg_write(X.UC_X86_REG_CS, SEL_UCS)
            uc.reg_write(X.UC_X86_REG_SS, SEL_USS)
            to_user = True
        elif cs & 0xFFFF == kcs:
            to_user = False
        else:
            raise MonitorStop(f"iret to selector {cs:#x}: neither the guest's kernel nor its user code")
        if rip >> 47 not in (0, 0x1FFFF):
            raise MonitorStop(f"iret to non-canonical rip {rip:#x}")
        uc.reg_write(X.UC_X86_REG_RSP, rsp)
        uc.reg_write(X.UC_X86_REG_RFLAGS, (rflags & RFLAGS_USER) | 0x2 | RFLAGS_IF)
        self._set_vif(True if to_user else bool(rflags & RFLAGS_IF))
        if to_user:
            uc.reg_write(X.UC_X86_REG_RFLAGS, (rflags & RFLAGS_USER) | 0x2 | RFLAGS_IF)
        self.rip = rip

    # ------------------------------------------------------------------ port I/O
    def _port_out(self, port: int, size: int, value: int) -> None:
        if self.cpl() == 3:
            insn_len = 1 if self._byte_at(self.rip - 1) in (0xEE, 0xEF) else 2
            self.rip -= insn_len
            self.count_exit("exception")
            self._reflect(13, 0)
            return
        if port == PORT_PHASE:
            self._phase(value)
            return
        self.count_exit("pio")
        if port == PORT_CONSOLE:
            self._console_byte(value & 0xFF)
        elif port == PORT_EXIT:
            self._flush_console()
            if value:
                raise MonitorStop(f"the guest kernel panicked (exit code {value})")
            self.hv.shutdown_domain(self.dom, 0)
        elif port == 0x43:
            self._pit_bytes = []
        elif port == 0x40:
            self._pit_bytes.append(value & 0xFF)
            if len(self._pit_bytes) == 2:
                divisor = self._pit_bytes[0] | self._pit_bytes[1] << 8 or 0x10000
                self._pit_period = divisor * 1_000_000_000 // PIT_HZ
                self._pit_deadline = self.hv.now_ns() + self._pit_period
        elif port == 0x20 and value == 0x20:
            self._in_service = False

    def _byte_at(self, va: int) -> int:
        try:
            return self.gread(va, 1)[0]
        except GuestFault:
            return 0

    def _console_byte(self, b: int) -> None:
        self._console.append(b)
        if b == 0x0A or len(self._console) >= 256:
            self._flush_console()

    def _flush_console(self) -> None:
        if self._console:
            self.dom.console_write(bytes(self._console))
            self._console.clear()

    def _phase(self, value: int) -> None:
        pid = value & 0x7F
        snap = dict(self.counters)
        name = PHASE_NAMES.get(pid, f"phase{pid}")
        if not value & 0x80:
            self._phase_open[pid] = (snap, self.hv.now_ns(), time.perf_counter())
            self.counters[f"phases.{name}.begin"] += 1  # a mark in the trace timeline
            return
        self.counters[f"phases.{name}.end"] += 1
        opened = self._phase_open.pop(pid, None)
        if opened is None:
            return
        before, t0, w0 = opened
        delta = {k: v - before.get(k, 0) for k, v in snap.items() if v != before.get(k, 0)}
        self.phases[name] = Phase(name, delta, self.hv.now_ns() - t0, time.perf_counter() - w0)

    # ------------------------------------------------------------------ hypercalls, syscalls (PV)
    def _invalid(self) -> None:
        try:
            code = self.gread(self.rip, 3)
        except GuestFault:
            code = b""
        if code != b"\x0f\x01\xc1" or self.mode != "pv":
            self.count_exit("exception")
            self._ctx_round_trip(None)
            self._reflect(6, None)
            return
        if self.cpl() != 1:
            self.count_exit("exception")
            self.log.append(f"hypercall from user mode at {self.rip:#x} refused")
            self._reflect(6, None)
            return
        uc = self.uc
        regs = (X.UC_X86_REG_RAX, X.UC_X86_REG_RDI, X.UC_X86_REG_RSI, X.UC_X86_REG_RDX, X.UC_X86_REG_R10,
                X.UC_X86_REG_R8)  # fmt: skip
        nr, a1, a2, a3, a4, a5 = (uc.reg_read(r) for r in regs)
        self._iret = None
        result = self.hv.hypercalls.dispatch(self.dom, nr, a1, a2, a3, a4, a5)
        if self._iret is not None:
            rax, r11, rcx, _flags, rip, cs, rflags, rsp, _ss = self._iret
            uc.reg_write(X.UC_X86_REG_RAX, rax)
            uc.reg_write(X.UC_X86_REG_R11, r11)
            uc.reg_write(X.UC_X86_REG_RCX, rcx)
            self._return_to(rip, cs, rflags, rsp)
            self._iret = None
            return
        uc.reg_write(X.UC_X86_REG_RAX, result & 0xFFFF_FFFF_FFFF_FFFF)
        self.rip += 3

    def iret(self) -> int:
        """HYPERVISOR_iret (from the table): the frame at RSP is restored after the hypercall."""
        rsp = self.uc.reg_read(X.UC_X86_REG_RSP)
        try:
            self._iret = XEN_IRET_FRAME.unpack(self.gread(rsp, XEN_IRET_FRAME.size))
        except GuestFault as e:
            self._crash = f"iret with an unusable frame at {rsp:#x}: {e}"
        return 0

    def _syscall(self) -> None:
        if self.mode != "pv" or self.cpl() != 3:
            self.count_exit("exception")
            self.rip -= 2
            self._reflect(6, None)
            return
        self.count_exit("syscall")
        self.counters["traps.reflected"] += 1
        handler = self.dom.callbacks.get("syscall", 0)
        if not handler:
            raise MonitorStop("syscall from user mode and no syscall callback registered")
        self._bounce(handler, VECTOR_SYSCALL, None)

    # ------------------------------------------------------------------ the PV MMU (Xen's type rules)
    def _owned(self, mfn: int) -> bool:
        return self.p2m.gpfn_of(mfn) is not None

    def _entries(self, mfn: int) -> list[int]:
        return list(struct.unpack("<512Q", self.dom.mem.read(mfn * PAGE_SIZE, PAGE_SIZE)))

    def _check_entry(self, level: int, index: int, entry: int) -> str | None:
        """Why ``entry`` may not sit at ``index`` of a level-``level`` table (None: it may)."""
        if not entry & PTE_P:
            return None
        target = (entry & ADDR_MASK) >> 12
        if level == 4 and index == MONITOR_SLOT:
            return "slot 511 of an L4 is the hypervisor's"
        if level == 1:
            if target == self.dom.shared_info_gfn:
                return None
            if not self._owned(target):
                return f"L1 entry {entry:#x} maps machine frame {target:#x}, which this domain does not own"
            if entry & PTE_W and target in self.pt_type:
                return f"L1 entry {entry:#x} would map page-table frame {target:#x} writable"
            return None
        if entry & (1 << 7):
            return f"level-{level} entry {entry:#x}: large pages are not supported"
        if self.pt_type.get(target) != level - 1:
            return (
                f"level-{level} entry {entry:#x} points at frame {target:#x}, not a pinned L{level - 1} table"
            )
        return None

    def _pin(self, mfn: int, level: int) -> str | None:
        if not self._owned(mfn):
            return f"frame {mfn:#x} is not this domain's"
        if self.pt_type.get(mfn) == level:
            return None
        if mfn in self.pt_type:
            return f"frame {mfn:#x} is already an L{self.pt_type[mfn]} table"
        if self.wcount.get(mfn, 0):
            return f"frame {mfn:#x} has {self.wcount[mfn]} writable mapping(s)"
        entries = self._entries(mfn)
        for i, e in enumerate(entries):
            why = self._check_entry(level, i, e)
            if why is not None:
                return why
        self.pt_type[mfn] = level
        if level == 1:
            for e in entries:
                if e & PTE_P and e & PTE_W:
                    t = (e & ADDR_MASK) >> 12
                    self.wcount[t] = self.wcount.get(t, 0) + 1
        if level == 4:
            self.dom.mem.write(
                mfn * PAGE_SIZE + MONITOR_SLOT * 8, struct.pack("<Q", self.window_l3 << 12 | PTE_P | PTE_W)
            )
        return None

    def _refuse(self, what: str, why: str, errno: Errno = Errno.EINVAL) -> HypercallError:
        self.counters["pv.refused"] += 1
        self.log.append(f"{what} refused: {why}")
        log.warning("dom%d: %s refused: %s", self.dom.domid, what, why)
        return HypercallError(errno, why)

    def mmu_update(self, reqs: int, count: int, done_ptr: int, domid: int) -> int:
        """HYPERVISOR_mmu_update: a batch of page-table writes, each validated before it is made."""
        if not 0 <= count <= MAX_BATCH:
            raise self._refuse("mmu_update", f"batch of {count}")
        data = self.dom.arg_mem.read(reqs, count * MMU_UPDATE.size)
        done = 0
        try:
            for i in range(count):
                ptr, val = MMU_UPDATE.unpack_from(data, i * MMU_UPDATE.size)
                if ptr & 3 != MMU_NORMAL_PT_UPDATE or ptr & 7:
                    raise self._refuse("mmu_update", f"request type {ptr & 3} / unaligned pointer {ptr:#x}")
                table = ptr >> 12
                level = self.pt_type.get(table)
                if level is None:
                    raise self._refuse("mmu_update", f"frame {table:#x} is not a pinned page table")
                index = (ptr & 0xFFF) // 8
                why = self._check_entry(level, index, val)
                if why is not None:
                    raise self._refuse("mmu_update", why)
                old = struct.unpack("<Q", self.dom.mem.read(ptr & ~7, 8))[0]
                if level == 1:
                    for e, d in ((old, -1), (val, 1)):
                        if e & PTE_P and e & PTE_W:
                            t = (e & ADDR_MASK) >> 12
                            self.wcount[t] = self.wcount.get(t, 0) + d
                self.dom.mem.write(ptr & ~7, struct.pack("<Q", val))
                done += 1
        finally:
            if done_ptr:
                self.dom.arg_mem.write(done_ptr, struct.pack("<Q", done))
            self.counters["pv.pt_updates"] += done
            self.flush_tlb()
        return 0

    def mmuext_op(self, ops: int, count: int, done_ptr: int, domid: int) -> int:
        """HYPERVISOR_mmuext_op: pin tables, switch the base pointer, flush the TLB."""
        if not 0 <= count <= MAX_BATCH:
            raise self._refuse("mmuext_op", f"batch of {count}")
        data = self.dom.arg_mem.read(ops, count * MMUEXT_OP.size)
        done = 0
        for i in range(count):
            cmd, _pad, arg1, _arg2 = MMUEXT_OP.unpack_from(data, i * MMUEXT_OP.size)
            if MMUEXT_PIN_L1 <= cmd <= MMUEXT_PIN_L4:
                why = self._pin(arg1, cmd + 1)
                if why is not None:
                    raise self._refuse("mmuext_op pin", why)
            elif cmd == MMUEXT_NEW_BASEPTR:
                if self.pt_type.get(arg1) != 4:
                    raise self._refuse("mmuext_op new_baseptr", f"frame {arg1:#x} is not a pinned L4 table")
                self.uc.reg_write(X.UC_X86_REG_CR3, arg1 << 12)
            elif cmd in (MMUEXT_TLB_FLUSH_LOCAL, MMUEXT_INVLPG_LOCAL):
                self.flush_tlb()
            else:
                raise self._refuse("mmuext_op", f"command {cmd}", Errno.ENOSYS)
            done += 1
        if done_ptr:
            self.dom.arg_mem.write(done_ptr, struct.pack("<Q", done))
        return 0

    def set_trap_table(self, table: int) -> int:
        """HYPERVISOR_set_trap_table: the guest's exception handlers (vector, cs, address), 0-terminated."""
        entries: dict[int, int] = {}
        for i in range(256):
            vector, _flags, cs, _pad, address = TRAP_INFO.unpack(self.dom.arg_mem.read(table + i * 16, 16))
            if address == 0:
                break
            if cs & 3 != 1:
                raise self._refuse("set_trap_table", f"vector {vector}: selector {cs:#x} is not ring 1")
            entries[vector] = address
        self.trap_table = entries
        return 0

    def stack_switch(self, ss: int, rsp: int) -> int:
        """HYPERVISOR_stack_switch: the kernel stack for the next entry from user mode."""
        if ss & 3 != 1:
            raise self._refuse("stack_switch", f"selector {ss:#x} is not ring 1")
        self.kernel_stack = rsp
        return 0


MULTICALL_ENTRY = struct.Struct("<8Q")  # op, result, args[6]
MAX_MULTICALL = 32


def multicall(dom: Domain, calls: int, count: int, _a3: int, _a4: int, _a5: int) -> int:
    """HYPERVISOR_multicall: several hypercalls for the price of one exit (results written back)."""
    table = dom.hv.hypercalls
    if not 0 <= count <= MAX_MULTICALL:
        raise HypercallError(Errno.EINVAL, f"multicall of {count} entries")
    for i in range(count):
        at = calls + i * MULTICALL_ENTRY.size
        op, _result, *args = MULTICALL_ENTRY.unpack(dom.arg_mem.read(at, MULTICALL_ENTRY.size))
        if op in (Hypercall.multicall, Hypercall.iret):
            result = -int(Errno.EINVAL)
        else:
            result = table.dispatch(dom, op, *args[:5])
            dom.counters["exits"] -= 1  # the inner calls ride on the multicall's exit
            dom.counters["exits.hypercall"] -= 1
        dom.arg_mem.write(at + 8, struct.pack("<q", result))
    return 0


def _pv_handler(name: str) -> Callable[..., int]:
    def handler(dom: Domain, a1: int, a2: int, a3: int, a4: int, a5: int) -> int:
        vcpu = dom.vcpu
        if not isinstance(vcpu, Monitor) or vcpu.mode != "pv":
            raise HypercallError(Errno.ENOSYS, f"{name} needs a paravirtualized teaching-kernel vCPU")
        fn = getattr(vcpu, name)
        args = {"mmu_update": (a1, a2, a3, a4), "mmuext_op": (a1, a2, a3, a4), "set_trap_table": (a1,),
                "stack_switch": (a1, a2)}[name]  # fmt: skip
        return int(fn(*args))

    handler.__name__ = name
    handler.__doc__ = f"{name} for a PV teaching kernel (:meth:`Monitor.{name}`)."
    return handler


def register_pv_hypercalls(hv: Hypervisor) -> None:
    """Add the PV MMU and trap hypercalls to the hypervisor's table (idempotent)."""
    table = hv.hypercalls
    for nr, name in (
        (Hypercall.mmu_update, "mmu_update"),
        (Hypercall.mmuext_op, "mmuext_op"),
        (Hypercall.set_trap_table, "set_trap_table"),
        (Hypercall.stack_switch, "stack_switch"),
    ):
        table.register(nr, _pv_handler(name))  # fmt: skip
    table.register(Hypercall.multicall, multicall)


class GuestOS:
    """pvio's teaching kernel as a domain's kernel: ``hv.create_domain(GuestOS("trap"))``."""

    memory_pages = DOMAIN_PAGES

    def __init__(
        self,
        mode: str,
        *,
        ops: int = 8,
        idle_ticks: int = 4,
        idle_spin: bool = False,
        hostile: int = 0,
        timer_ns: int = 1_000_000,
        slice_insns: int = DEFAULT_SLICE_INSNS,
        image: bytes | None = None,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r} (one of {MODES})")
        if not 1 <= ops <= 64:
            raise ValueError(f"ops must be 1..64, not {ops}")
        self.mode = mode
        self.boot = {"ops": ops, "idle_ticks": idle_ticks, "idle_spin": int(idle_spin), "hostile": hostile,
                     "timer_ns": timer_ns}  # fmt: skip
        self.slice_insns = slice_insns
        self.image = image
        self.monitor: Monitor

    def attach(self, hv: Hypervisor, dom: Domain) -> None:
        """Build the vCPU and monitor and load the kernel (the flavour the mode needs)."""
        from pvio.cpu.guestos import build_guestos

        if self.mode == "pv":
            register_pv_hypercalls(hv)
        image = self.image or build_guestos("pv" if self.mode == "pv" else "native").read_bytes()
        self.monitor = Monitor(hv, dom, self.mode, slice_insns=self.slice_insns)
        dom.vcpu = self.monitor
        self.monitor.load(image, self.boot)

    async def run(self) -> None:
        """Run the monitor until the domain stops."""
        self.monitor.dom.booted.set()
        await self.monitor.run()
