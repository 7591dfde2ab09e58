"""The system-mode vCPU and the HVM interface, without Debian: hand-made machine code and pages.

Each test builds a domain whose kernel only owns a :class:`SystemVcpu` (it never runs by
itself) and drives slices by hand, so the exits, deliveries and counts are exact.
"""

from __future__ import annotations

import struct

import pytest
import trio
from unicorn import x86_const as X

import pvio
from pvio.abi import Errno, Hypercall
from pvio.abi.xen import (
    HVM_PARAM_CONSOLE_EVTCHN,
    HVM_PARAM_CONSOLE_PFN,
    HVM_PARAM_STORE_PFN,
    XEN_HVM_PARAM,
    XENCONS_INDICES,
    XENCONS_OUT,
)
from pvio.core import hvm
from pvio.core.hypercall import XEN_VERSION
from pvio.core.memory import GuestFault
from pvio.cpu import debian
from pvio.cpu.system import SystemVcpu, self_test

CODE = 0x10000
STACK_TOP = 0x20000
IDT = 0x30000
GDT = 0x31000
TSS = 0x32000
HANDLER = 0x11000
ARGS = 0x40000


class BareKernel:
    """A kernel that only owns a SystemVcpu and an HVM state; the test runs the slices."""

    memory_pages = 1024

    def attach(self, hv: pvio.Hypervisor, dom: pvio.Domain) -> None:
        self.vcpu = SystemVcpu(hv, dom, slice_insns=1000)
        dom.vcpu = self.vcpu
        self.hvm = hvm.setup_domain(hv.hypercalls, dom, hvm.e820_for(dom))

    async def run(self) -> None:
        await trio.sleep_forever()


def _long_mode_segments(vcpu: SystemVcpu) -> None:
    """A GDT with a 64-bit kernel code segment at 0x08 and data at 0x10, loaded."""
    mem = vcpu.dom.mem
    mem.write(GDT, struct.pack("<QQQ", 0, 0x00AF9A000000FFFF, 0x00CF92000000FFFF))
    uc = vcpu.uc
    uc.reg_write(X.UC_X86_REG_GDTR, (0, GDT, 23, 0))
    uc.reg_write(X.UC_X86_REG_CS, 0x08)
    uc.reg_write(X.UC_X86_REG_SS, 0x10)
    uc.reg_write(X.UC_X86_REG_RSP, STACK_TOP)


async def _bare(hv: pvio.Hypervisor) -> tuple[BareKernel, pvio.Domain]:
    kernel = BareKernel()
    dom = hv.create_domain(kernel, name="bare")
    return kernel, dom


def test_raw_context_offsets_self_test() -> None:
    self_test()  # raises SystemVcpuError naming the unicorn version if the offsets moved


async def test_vmcall_is_a_hypercall_into_the_shared_table(hv: pvio.Hypervisor) -> None:
    kernel, dom = await _bare(hv)
    vcpu = kernel.vcpu
    # mov eax, xen_version; xor edi, edi; vmcall; vmmcall (eax = 17 still: version again)
    code = b"\xb8" + struct.pack("<I", Hypercall.xen_version) + b"\x31\xff\x0f\x01\xc1"
    code += b"\xb8" + struct.pack("<I", Hypercall.xen_version) + b"\x0f\x01\xd9"
    dom.mem.write(CODE, code + b"\xeb\xfe")  # jmp .
    vcpu.rip = CODE
    vcpu._run_slice()
    assert vcpu.uc.reg_read(X.UC_X86_REG_RAX) == XEN_VERSION
    vcpu._run_slice()
    assert dom.counters["exits.hypercall"] == 2
    assert dom.counters["hypercalls.xen_version"] == 2
    assert vcpu.rip == CODE + len(code)


async def test_ud2_is_delivered_through_the_idt_with_a_cpu_frame(hv: pvio.Hypervisor) -> None:
    kernel, dom = await _bare(hv)
    vcpu = kernel.vcpu
    _long_mode_segments(vcpu)
    gate = struct.pack("<HHBBHII", HANDLER & 0xFFFF, 0x08, 0, 0x8E, (HANDLER >> 16) & 0xFFFF, 0, 0)
    dom.mem.write(IDT + 6 * 16, gate)
    vcpu.uc.reg_write(X.UC_X86_REG_IDTR, (0, IDT, 256 * 16 - 1, 0))
    dom.mem.write(CODE, b"\x0f\x0b")  # ud2
    dom.mem.write(HANDLER, b"\xeb\xfe")
    vcpu.uc.reg_write(X.UC_X86_REG_RFLAGS, 0x202)
    vcpu.rip = CODE
    vcpu._run_slice()
    assert vcpu.rip == HANDLER
    rsp = vcpu.uc.reg_read(X.UC_X86_REG_RSP)
    assert rsp == STACK_TOP - 5 * 8  # no error code for #UD
    rip, cs, rflags, old_rsp, ss = struct.unpack("<5Q", dom.mem.read(rsp, 40))
    assert (rip, cs, old_rsp, ss) == (CODE, 0x08, STACK_TOP, 0x10)
    assert rflags & 0x200  # the interrupted IF, in the frame
    assert not vcpu.uc.reg_read(X.UC_X86_REG_RFLAGS) & 0x200  # an interrupt gate clears IF
    assert dom.counters["exits.exception"] == 1


async def test_a_missing_idt_gate_crashes_only_that_domain(hv: pvio.Hypervisor) -> None:
    kernel, dom = await _bare(hv)
    vcpu = kernel.vcpu
    _long_mode_segments(vcpu)
    vcpu.uc.reg_write(X.UC_X86_REG_IDTR, (0, IDT, 256 * 16 - 1, 0))  # all gates absent
    dom.mem.write(CODE, b"\x0f\x0b")
    vcpu.rip = CODE
    vcpu._run_slice()
    assert vcpu._crash is not None and "not present" in vcpu._crash
    vcpu._crash_domain(vcpu._crash)
    assert not dom.alive and hv.dom0 is not None and hv.dom0.alive


async def test_syscall_is_emulated_from_star_lstar_fmask(hv: pvio.Hypervisor) -> None:
    kernel, dom = await _bare(hv)
    vcpu = kernel.vcpu
    _long_mode_segments(vcpu)
    uc = vcpu.uc
    uc.msr_write(0xC0000081, (0x08 << 32) | (0x1B << 48))  # STAR: kernel CS 0x08
    uc.msr_write(0xC0000082, HANDLER)  # LSTAR
    uc.msr_write(0xC0000084, 0x200)  # FMASK: clear IF
    uc.reg_write(X.UC_X86_REG_RFLAGS, 0x202)
    dom.mem.write(CODE, b"\x0f\x05")
    dom.mem.write(HANDLER, b"\xeb\xfe")
    vcpu.rip = CODE
    vcpu._run_slice()
    assert vcpu.rip == HANDLER
    assert uc.reg_read(X.UC_X86_REG_RCX) == CODE + 2
    assert uc.reg_read(X.UC_X86_REG_R11) & 0x200
    assert not uc.reg_read(X.UC_X86_REG_RFLAGS) & 0x200
    assert dom.counters["exits.syscall"] == 1


async def test_page_walker_follows_4k_2m_pages_and_refuses_holes(hv: pvio.Hypervisor) -> None:
    kernel, dom = await _bare(hv)
    vcpu = kernel.vcpu
    mem = dom.mem
    pml4, pdpt, pd, pt = 0x50000, 0x51000, 0x52000, 0x53000
    mem.write(pml4 + 511 * 8, struct.pack("<Q", pdpt | 3))  # 0xffff_ff80_0000_0000
    mem.write(pdpt, struct.pack("<Q", pd | 3))
    mem.write(pd, struct.pack("<Q", pt | 3))  # first 2 MiB: 4 KiB pages
    mem.write(pd + 8, struct.pack("<Q", 0x200000 | 0x83))  # next 2 MiB: one large page
    mem.write(pt + 5 * 8, struct.pack("<Q", ARGS | 3 | (1 << 63)))  # NX is ignored
    uc = vcpu.uc
    uc.reg_write(X.UC_X86_REG_CR3, pml4)
    uc.reg_write(X.UC_X86_REG_CR4, 0x20)
    uc.msr_write(0xC0000080, 0x500)  # LME | LMA
    uc.reg_write(X.UC_X86_REG_CR0, 0x80000011)
    base = 0xFFFF_FF80_0000_0000
    assert vcpu.translate(base + 5 * 4096 + 12) == ARGS + 12
    assert vcpu.translate(base + 0x200000 + 0x1234) == 0x201234
    with pytest.raises(GuestFault):
        vcpu.translate(base + 6 * 4096)
    mem.write(ARGS + 4090, b"abcdef")  # a read that crosses into an unmapped page faults
    with pytest.raises(GuestFault):
        vcpu.space.read(base + 5 * 4096 + 4090, 12)
    assert vcpu.space.read(base + 5 * 4096 + 4090, 6) == b"abcdef"


async def test_hvm_params_are_the_toolstacks_and_bad_ones_are_refused(hv: pvio.Hypervisor) -> None:
    kernel, dom = await _bare(hv)
    table = hv.hypercalls

    def get(index: int) -> tuple[int, int]:
        dom.mem.write(ARGS, XEN_HVM_PARAM.pack(0x7FF0, index, 0))
        rc = table.dispatch(dom, 34, 1, ARGS)  # hvm_op(get_param)
        return rc, XEN_HVM_PARAM.unpack(dom.mem.read(ARGS, XEN_HVM_PARAM.size))[2]

    assert get(HVM_PARAM_STORE_PFN) == (0, dom.store_gfn)
    assert get(HVM_PARAM_CONSOLE_PFN) == (0, dom.console_gfn)
    rc, port = get(HVM_PARAM_CONSOLE_EVTCHN)
    assert rc == 0 and port == kernel.hvm.params[HVM_PARAM_CONSOLE_EVTCHN]
    assert get(10_000)[0] == -Errno.EINVAL
    dom.mem.write(ARGS, XEN_HVM_PARAM.pack(0x7FF0, HVM_PARAM_STORE_PFN, 5))
    assert table.dispatch(dom, 34, 0, ARGS) == -Errno.EPERM  # set_param of the store page
    dom.mem.write(ARGS, XEN_HVM_PARAM.pack(0x7FF0, 0, (1 << 56) | 0xF3))  # CALLBACK_IRQ of type 1
    assert table.dispatch(dom, 34, 0, ARGS) == -Errno.EINVAL
    dom.mem.write(ARGS, XEN_HVM_PARAM.pack(0x7FF0, 0, (2 << 56) | 0xF3))
    assert table.dispatch(dom, 34, 0, ARGS) == 0 and kernel.hvm.callback_vector == 0xF3
    assert dom.counters["hypercall_internal_errors"] == 0


async def test_console_ring_drains_output_and_ignores_impossible_indices(hv: pvio.Hypervisor) -> None:
    kernel, dom = await _bare(hv)
    console = kernel.hvm.console
    assert console is not None
    page = dom.mem.page(dom.console_gfn)
    page[XENCONS_OUT : XENCONS_OUT + 6] = b"hello\n"
    struct.pack_into("<II", page, XENCONS_INDICES + 8, 0, 6)
    console.drain()
    assert dom.console_lines[-1] == "hello"
    struct.pack_into("<II", page, XENCONS_INDICES + 8, 0, 100_000)  # more than the ring holds
    console.drain()
    assert dom.counters["console.bad_indices"] == 1
    assert console.feed(b"ls\n") == 3
    assert struct.unpack_from("<II", page, XENCONS_INDICES) == (0, 3)


def test_initramfs_is_a_newc_archive_with_init_and_a_console_node() -> None:
    archive = debian.cpio_newc(
        [("init", 0o100755, b"#!/bin/sh\n", (0, 0)), ("dev/console", 0o020600, b"", (5, 1))]
    )
    names = []
    at = 0
    while True:
        header = archive[at : at + 110]
        assert header[:6] == b"070701"
        fields = [int(header[6 + 8 * i : 14 + 8 * i], 16) for i in range(13)]
        namesize, filesize = fields[11], fields[6]
        name = archive[at + 110 : at + 110 + namesize - 1].decode()
        names.append(name)
        at += 110 + namesize
        at += -at % 4
        at += filesize + (-filesize % 4)
        if name == "TRAILER!!!":
            break
    assert names == ["init", "dev/console", "TRAILER!!!"]
    assert at == len(archive)


def test_without_apt_the_error_is_one_line_naming_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(debian.shutil, "which", lambda name: None)
    debian._apt_updated.cache_clear()
    with pytest.raises(debian.DebianUnavailable) as info:
        debian.fetch("busybox-static")
    message = str(info.value)
    assert "\n" not in message and "install" in message


def _protected_mode(vcpu: SystemVcpu, entry: int) -> None:
    """32-bit protected mode, paging off, flat CS 0x08 / data 0x10 (the PVH entry state), an IDT."""
    vcpu.enter_protected_mode(entry, 0, GDT)
    vcpu.uc.reg_write(X.UC_X86_REG_ESP, STACK_TOP)
    vcpu.uc.reg_write(X.UC_X86_REG_IDTR, (0, IDT, 256 * 8 - 1, 0))


def _gate32(vcpu: SystemVcpu, vector: int, handler: int, kind: int = 0x8E) -> None:
    gate = struct.pack("<HHBBH", handler & 0xFFFF, 0x08, 0, kind, handler >> 16)
    vcpu.dom.mem.write(IDT + vector * 8, gate)


async def test_a_32_bit_guest_takes_ud2_through_its_idt(hv: pvio.Hypervisor) -> None:
    kernel, dom = await _bare(hv)
    vcpu = kernel.vcpu
    dom.mem.write(CODE, b"\xfb\x0f\x0b")  # sti; ud2
    dom.mem.write(HANDLER, b"\xeb\xfe")
    _protected_mode(vcpu, CODE)
    _gate32(vcpu, 6, HANDLER)
    vcpu._run_slice()
    assert vcpu._crash is None and vcpu.rip == HANDLER
    esp = vcpu.uc.reg_read(X.UC_X86_REG_ESP)
    assert esp == STACK_TOP - 3 * 4  # same ring: EIP, CS, EFLAGS; #UD has no error code
    eip, cs, eflags = struct.unpack("<3I", dom.mem.read(esp, 12))
    assert (eip, cs) == (CODE + 1, 0x08) and eflags & 0x200
    assert not vcpu.uc.reg_read(X.UC_X86_REG_EFLAGS) & 0x200  # an interrupt gate clears IF
    assert dom.counters["exits.exception"] == 1


async def test_a_32_bit_general_protection_fault_pushes_its_error_code(hv: pvio.Hypervisor) -> None:
    kernel, dom = await _bare(hv)
    vcpu = kernel.vcpu
    dom.mem.write(CODE, b"\x66\xb8\x37\x12\x8e\xd8")  # mov ax, 0x1237; mov ds, ax: beyond the GDT
    dom.mem.write(HANDLER, b"\xeb\xfe")
    _protected_mode(vcpu, CODE)
    _gate32(vcpu, 13, HANDLER, 0x8F)  # a trap gate keeps IF
    vcpu.uc.reg_write(X.UC_X86_REG_EFLAGS, 0x202)
    vcpu._run_slice()
    assert vcpu._crash is None and vcpu.rip == HANDLER
    esp = vcpu.uc.reg_read(X.UC_X86_REG_ESP)
    assert esp == STACK_TOP - 4 * 4
    error, eip, cs, _eflags = struct.unpack("<4I", dom.mem.read(esp, 16))
    assert (error, eip, cs) == (0x1234, CODE + 4, 0x08)  # the selector (RPL bits clear), the mov
    assert vcpu.uc.reg_read(X.UC_X86_REG_EFLAGS) & 0x200
    assert dom.counters["exits.exception"] == 1


async def test_a_32_bit_vector_without_a_gate_crashes_only_that_domain(hv: pvio.Hypervisor) -> None:
    kernel, dom = await _bare(hv)
    vcpu = kernel.vcpu
    dom.mem.write(CODE, b"\x0f\x0b")
    _protected_mode(vcpu, CODE)
    vcpu._run_slice()
    assert vcpu._crash is not None and "32-bit IDT gate not present" in vcpu._crash
    vcpu._crash_domain(vcpu._crash)
    assert not dom.alive and hv.dom0 is not None and hv.dom0.alive


class Register:
    """An MMIO device: one 32-bit register that reads back what was written, plus a log."""

    def __init__(self) -> None:
        self.value = 0x600DF00D
        self.log: list[tuple[str, int, int]] = []

    def read(self, offset: int, size: int) -> int:
        self.log.append(("r", offset, size))
        return self.value

    def write(self, offset: int, size: int, value: int) -> None:
        self.log.append(("w", offset, size))
        self.value = value


async def test_mmio_outside_ram_goes_to_the_iobus_device(hv: pvio.Hypervisor) -> None:
    kernel, dom = await _bare(hv)
    vcpu = kernel.vcpu
    base = 0xFEB0_0000
    dev = Register()
    hv.iobus.register_mmio(dom, base, 16, dev)
    # mov eax, [base+4]; mov [base+8], 0xabcd1234 (imm32); mov ebx, [base+8]; mov ecx, [base+0x100]
    code = b"\x8b\x05" + struct.pack("<I", base + 4)
    code += b"\xc7\x05" + struct.pack("<II", base + 8, 0xABCD1234)
    code += b"\x8b\x1d" + struct.pack("<I", base + 8)
    code += b"\x8b\x0d" + struct.pack("<I", base + 0x100)
    dom.mem.write(CODE, code + b"\xf4")  # hlt (IF = 0: the slice ends there)
    _protected_mode(vcpu, CODE)
    vcpu._run_slice()
    uc = vcpu.uc
    assert uc.reg_read(X.UC_X86_REG_EAX) == 0x600DF00D
    assert uc.reg_read(X.UC_X86_REG_EBX) == 0xABCD1234
    assert uc.reg_read(X.UC_X86_REG_ECX) == 0xFFFF_FFFF  # on the page but no device there: all-ones
    assert dev.log == [("r", 4, 4), ("w", 8, 4), ("r", 8, 4)]
    assert dom.counters["exits.mmio"] == 4 and dom.counters["iobus.unclaimed_mmio"] == 1


async def test_cpuid_names_the_processor_frequency_so_linux_need_not_time_a_pit(hv: pvio.Hypervisor) -> None:
    kernel, _dom = await _bare(hv)
    vcpu = kernel.vcpu
    assert vcpu.cpuid(0, 0)[0] == 0x16
    mhz = vcpu.tsc_khz // 1000
    assert vcpu.cpuid(0x16, 0) == (mhz, mhz, 100, 0)
    assert vcpu.cpuid(0x14, 0) == (0, 0, 0, 0)  # between the model's last leaf and 0x16: empty


async def test_cmos_clock_reads_bcd_time_that_moves_with_the_hypervisor_clock(
    hv: pvio.Hypervisor, autojump_clock: trio.testing.MockClock
) -> None:
    from pvio.cpu.pvh import CMOS_PORT, CmosRtc

    _kernel, dom = await _bare(hv)
    rtc = CmosRtc()
    hv.iobus.register_pio(dom, CMOS_PORT, 2, rtc)

    def reg(index: int) -> int:
        hv.iobus.pio_write(dom, CMOS_PORT, 1, 0x80 | index)  # bit 7: the NMI mask, ignored
        return hv.iobus.pio_read(dom, CMOS_PORT + 1, 1)

    def bcd(v: int) -> int:
        return (v >> 4) * 10 + (v & 0xF)

    assert reg(0x0A) & 0x80 == 0  # never an update in progress
    assert reg(0x0B) == 0x02 and reg(0x0D) == 0x80  # BCD, 24-hour; battery good
    seconds = lambda: bcd(reg(0x04)) * 3600 + bcd(reg(0x02)) * 60 + bcd(reg(0x00))  # noqa: E731
    before = seconds()
    await trio.sleep(61)
    assert (seconds() - before) % 86400 in (61, 62)  # the clock's second may tick between reads
    assert 1 <= bcd(reg(0x08)) <= 12 and bcd(reg(0x32)) >= 20
    hv.iobus.pio_write(dom, CMOS_PORT, 1, 0x40)
    hv.iobus.pio_write(dom, CMOS_PORT + 1, 1, 0xAB)
    assert reg(0x40) == 0xAB  # NVRAM keeps what is written
    hv.iobus.pio_write(dom, CMOS_PORT, 1, 0x0A)
    hv.iobus.pio_write(dom, CMOS_PORT + 1, 1, 0xFF)
    assert reg(0x0A) & 0x80 == 0  # status registers are the model's
