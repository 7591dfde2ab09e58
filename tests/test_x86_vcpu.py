"""The x86 vCPU and the C guest kernel's boot: image building and loading, the hypercall
page, console_io, upcalls and iret, blocking, and guest faults that stop only their domain.

Every scenario runs under trio's MockClock (``autojump_clock``); the hypervisor seeds
trio's scheduler, so the counts asserted here are the same on every run.
"""

from __future__ import annotations

import logging
import os
import struct
from pathlib import Path
from typing import Any

import pytest
import trio
from elftools.elf.elffile import ELFFile

from pvio import Hypervisor
from pvio.abi import PAGE_SIZE, VCPU_UPCALL_MASK, Hypercall
from pvio.cpu.build import BuildError, build_image
from pvio.cpu.guest import X86Guest
from pvio.cpu.loader import ImageError
from pvio.cpu.vcpu import HYPERCALL_STUB_SIZE, hypercall_page, hypercall_stub
from tests.guests import Probe

BANNER = "pvio x86 guest kernel: dom1, 2048 pages"


@pytest.fixture(scope="module")
def image() -> Path:
    """The C guest kernel, built once (cached by content across runs)."""
    return build_image()


async def boot(hv: Hypervisor, cmdline: str = "", **kw: Any) -> X86Guest:
    guest = X86Guest(name="x86", cmdline=cmdline, **kw)
    dom = hv.create_domain(guest, name="x86")
    await hv.start(dom)
    return guest


async def settle() -> None:
    """Run until every task is blocked (the x86 guest parked in SCHEDOP_block)."""
    await trio.sleep(0.1)


# ---------------------------------------------------------------------- building and loading
def test_the_image_is_a_static_x86_64_executable(image: Path) -> None:
    with image.open("rb") as f:
        elf = ELFFile(f)
        assert elf["e_machine"] == "EM_X86_64" and elf["e_type"] == "ET_EXEC"
        assert elf["e_entry"] == 0x10000


def test_an_unchanged_source_tree_is_not_rebuilt(image: Path) -> None:
    mtime = image.stat().st_mtime_ns
    assert build_image() == image
    assert image.stat().st_mtime_ns == mtime


def test_a_missing_compiler_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CC", "no-such-gcc")
    monkeypatch.setenv("PATH", os.devnull)
    with pytest.raises(BuildError, match="needs gcc"):
        build_image()


async def test_an_image_that_is_not_elf_is_refused(hv: Hypervisor) -> None:
    with pytest.raises(ImageError, match="not a valid ELF image"):
        hv.create_domain(X86Guest(b"\x7fELF nonsense" * 8, name="bad"))


async def test_a_segment_outside_the_guests_ram_is_refused(hv: Hypervisor, image: Path) -> None:
    data = bytearray(image.read_bytes())
    (phoff,) = struct.unpack_from("<Q", data, 0x20)
    struct.pack_into("<Q", data, phoff + 0x18, 0x7FFF_0000)  # first program header's p_paddr
    with pytest.raises(ImageError, match="does not fit"):
        hv.create_domain(X86Guest(bytes(data), name="bad"))


# ---------------------------------------------------------------------- the hypercall page
def test_each_stub_traps_with_syscall_and_its_number_in_eax() -> None:
    stub = hypercall_stub(Hypercall.console_io)
    assert len(stub) == HYPERCALL_STUB_SIZE
    # push rcx; push r11; mov $18, %eax; syscall; pop r11; pop rcx; ret
    assert stub.startswith(bytes.fromhex("51 4153 b812000000 0f05 415b 59 c3"))
    page = hypercall_page()
    assert len(page) == PAGE_SIZE
    # the iret stub also pushes rax, and never returns: ud2 after the syscall
    assert page[Hypercall.iret * 32 :][:13] == bytes.fromhex("51 4153 50 b817000000 0f05 0f0b")


async def test_the_hypercall_page_is_written_into_guest_memory(hv: Hypervisor, image: Path) -> None:
    guest = X86Guest(image, name="x86")
    dom = hv.create_domain(guest)
    assert dom.mem.read(dom.hypercall_page_gfn * PAGE_SIZE, PAGE_SIZE) == hypercall_page()


# ---------------------------------------------------------------------- boot
async def test_the_guest_prints_its_banner_through_console_io(autojump_clock: Any, hv: Hypervisor) -> None:
    guest = await boot(hv, "mode=echo")
    await settle()
    assert guest.domain.console_lines[0] == f'{BANNER}, cmdline "mode=echo"'
    assert guest.domain.counters["hypercalls.console_io"] >= 1


async def test_booting_without_a_vif_takes_exact_counts(autojump_clock: Any, hv: Hypervisor) -> None:
    """Banner, set_callbacks, one xenstore read (one store kick, one upcall + iret), the
    failure message, then SCHEDOP_block for good."""
    guest = await boot(hv)
    await settle()
    c = guest.domain.counters
    assert list(guest.domain.console_lines)[1:] == [
        "netfront: vif1.0 disconnected: no usable backend in xenstore",
        "netfront: no network (no usable backend in xenstore)",
    ]
    assert (c["interrupts"], c["exits"], c["exits.hypercall"]) == (1, 7, 7)
    assert c["hypercalls.iret"] == 1 and c["hypercalls.sched_op.block"] == 1
    assert c["exits.fault"] == 0
    assert guest.vcpu.blocked
    assert guest.domain.shared_info[VCPU_UPCALL_MASK] == 0


async def test_a_parked_vcpu_wakes_for_an_event_and_takes_one_upcall(
    autojump_clock: Any, hv: Hypervisor
) -> None:
    guest = await boot(hv)
    await settle()
    dom = guest.domain
    before = dom.counters["interrupts"]
    hv.hypercalls._port(dom, dom.store_port)  # the store port exists
    from pvio.core import evtchn

    evtchn.set_pending(dom, dom.store_port)
    await settle()
    assert dom.counters["interrupts"] == before + 1
    assert dom.counters["hypercalls.iret"] == before + 1
    assert guest.vcpu.blocked


# ---------------------------------------------------------------------- faults
@pytest.mark.parametrize(
    ("mode", "reason"),
    [
        ("fault-read", "Invalid memory read"),
        ("fault-ud", "Invalid instruction"),
        ("fault-stack", "Invalid memory write"),
    ],
)
async def test_a_guest_fault_stops_only_that_domain_with_a_register_dump(
    autojump_clock: Any, caplog: pytest.LogCaptureFixture, mode: str, reason: str
) -> None:
    async with Hypervisor(dom0=Probe("dom0")) as hv:
        bystander = Probe("bystander")
        other = hv.create_domain(bystander, name="bystander")
        await hv.start(other)
        with caplog.at_level(logging.ERROR):
            guest = await boot(hv, f"mode={mode}")
            await settle()
        dom = guest.domain
        assert not dom.alive
        assert dom.crash_reason is not None and reason in dom.crash_reason
        assert dom.counters["exits.fault"] == 1
        assert "registers:" in caplog.text and "rip=" in caplog.text
        assert f"fault mode {mode}: misbehaving now" in dom.console
        assert other.alive and hv.dom0 is not None and hv.dom0.alive
        bystander.console("still here\n")
        assert list(other.console_lines) == ["still here"]


async def test_a_runaway_guest_is_stopped(autojump_clock: Any, hv: Hypervisor) -> None:
    guest = await boot(hv, "mode=spin", slice_insns=10_000, max_slices_without_exit=50)
    await settle()
    assert not guest.domain.alive
    assert guest.domain.crash_reason is not None and "runaway guest" in guest.domain.crash_reason


async def test_an_upcall_without_a_callback_stops_the_domain(autojump_clock: Any, hv: Hypervisor) -> None:
    guest = await boot(hv)
    await settle()
    dom = guest.domain
    dom.callbacks["event"] = 0
    from pvio.core import evtchn

    evtchn.set_pending(dom, dom.store_port)
    await settle()
    assert not dom.alive
    assert dom.crash_reason is not None and "no event callback" in dom.crash_reason


async def test_an_unusable_stack_at_upcall_time_stops_the_domain(autojump_clock: Any, hv: Hypervisor) -> None:
    guest = await boot(hv)
    await settle()
    dom = guest.domain
    from unicorn.x86_const import UC_X86_REG_RSP

    guest.vcpu.uc.reg_write(UC_X86_REG_RSP, dom.mem.size + 0x10000)
    from pvio.core import evtchn

    evtchn.set_pending(dom, dom.store_port)
    await settle()
    assert not dom.alive
    assert dom.crash_reason is not None and "unusable stack" in dom.crash_reason


# ---------------------------------------------------------------------- port I/O and MMIO
IO_TEST_ASM = """
    .text
    .globl _start
_start:
    lea     stack_top(%rip), %rsp
    mov     2064(%rsi), %rbx        # the hypercall page's frame (pvio start_info extension)
    shl     $12, %rbx
    mov     $0x5a, %al
    out     %al, $0x60              # exit: port write
    in      $0x61, %al              # exit: port read (the device answers 0x42)
    mov     %eax, %r12d
    mov     $0xfeb00000, %rcx
    movl    $0xabcd, (%rcx)         # exit: MMIO write
    mov     8(%rcx), %r13d          # exit: MMIO read (the device answers 0x1234)
    mov     $1, %edi                # SCHEDOP_block: park for good
    lea     29*32(%rbx), %rax
    call    *%rax
1:  jmp     1b
    .bss
    .skip   4096
stack_top:
    .section .note.GNU-stack, "", @progbits
"""
IO_TEST_LD = "ENTRY(_start)\nSECTIONS { . = 0x10000; .text : { *(.text) } .bss : { *(.bss) } }\n"


class RecordingDevice:
    """A device model that answers fixed values and records every access."""

    def __init__(self, answer: int) -> None:
        self.answer = answer
        self.accesses: list[tuple[str, int, int, int]] = []

    def read(self, offset: int, size: int) -> int:
        self.accesses.append(("read", offset, size, 0))
        return self.answer

    def write(self, offset: int, size: int, value: int) -> None:
        self.accesses.append(("write", offset, size, value))


async def test_port_io_and_mmio_are_exits_routed_to_the_iobus(
    autojump_clock: Any, hv: Hypervisor, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "io.S").write_text(IO_TEST_ASM)
    (src / "main.c").write_text("void unused(void);\nvoid unused(void) {}\n")
    (src / "linker.ld").write_text(IO_TEST_LD)
    monkeypatch.setenv("PVIO_X86_CACHE", str(tmp_path / "cache"))
    guest = X86Guest(build_image(src), name="io")
    dom = hv.create_domain(guest, name="io")
    port, mmio = RecordingDevice(0x42), RecordingDevice(0x1234)
    hv.iobus.register_pio(dom, 0x60, 2, port)
    hv.iobus.register_mmio(dom, 0xFEB0_0000, 0x1000, mmio)
    await hv.start(dom)
    await settle()
    from unicorn.x86_const import UC_X86_REG_R12, UC_X86_REG_R13

    assert port.accesses == [("write", 0, 1, 0x5A), ("read", 1, 1, 0)]
    assert mmio.accesses == [("write", 0, 4, 0xABCD), ("read", 8, 4, 0)]
    assert guest.vcpu.uc.reg_read(UC_X86_REG_R12) & 0xFF == 0x42
    assert guest.vcpu.uc.reg_read(UC_X86_REG_R13) == 0x1234
    c = dom.counters
    assert (c["exits"], c["exits.pio"], c["exits.mmio"], c["exits.hypercall"]) == (5, 2, 2, 1)
    assert dom.alive and guest.vcpu.blocked
