"""PvhGuest: an unmodified kernel (Linux, GRUB) booted with Xen's PVH boot ABI on a SystemVcpu.

``PvhGuest(image, cmdline=..., modules=[initramfs], memory_pages=...)`` is a
:class:`pvio.core.domain.GuestKernel`: create a domain with it and start it.  The guest's
console (``hvc0``, the console ring) lands in ``Domain.console`` and :meth:`PvhGuest.type`
feeds its input.

Boot ABI (Xen's ``arch/x86/hvm/start_info.h``):

* the ELF image (32- or 64-bit) is loaded at its segments' physical addresses, and its
  ``XEN_ELFNOTE_PHYS32_ENTRY`` note gives the 32-bit entry point;
* the vCPU starts in 32-bit protected mode, paging off, flat CS/DS/ES/SS, with EBX =
  the guest-physical address of ``hvm_start_info`` (magic, version 1, the command line,
  the modules -- an initramfs is module 0 -- and the memory map);
* low memory holds what the guest finds without asking: the start info, command line,
  module list and memory map in page 6, the entry GDT in page 5, and an Intel MP table
  (one enabled boot processor, LAPIC 0; no buses, no I/O APIC) at 0xF0000, which is what
  makes Linux bring up its per-CPU timer through Xen (``VCPUOP_set_singleshot_timer``)
  instead of probing a PIT.  There is no ACPI.

Memory map: RAM [0, 0x9F000), the BIOS hole reserved up to 1 MiB, RAM from 1 MiB to the
hypervisor's special pages (hypercall page, grant frames, console, store, start_info,
shared_info), which are reserved.  Modules go at the top of RAM, below those pages.
"""

from __future__ import annotations

import io
import logging
import struct
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio
from elftools.common.exceptions import ELFError
from elftools.elf.elffile import ELFFile

from pvio.abi import PAGE_SIZE
from pvio.abi.xen import (
    HVM_MEMMAP_ENTRY,
    HVM_MODLIST_ENTRY,
    HVM_START_INFO,
    HVM_START_MAGIC,
    XEN_ELFNOTE_PHYS32_ENTRY,
)
from pvio.core import hvm
from pvio.cpu.loader import ImageError
from pvio.cpu.system import DEFAULT_MAX_SLICES_WITHOUT_EXIT, DEFAULT_SLICE_INSNS, LAPIC_BASE, SystemVcpu

if TYPE_CHECKING:
    from pvio.core.domain import Domain
    from pvio.core.hypervisor import Hypervisor

log = logging.getLogger("pvio.cpu.pvh")

GDT_AT = 0x5000
START_INFO_AT = 0x6000
MODLIST_AT = 0x6100
MEMMAP_AT = 0x6400
CMDLINE_AT = 0x6800
CMDLINE_MAX = 2047
MAX_MODULES = 8
MP_FLOATING_AT = 0xF0000
MP_CONFIG_AT = 0xF0010
CMOS_PORT = 0x70  # the CMOS clock's index port; its data port follows
IMAGE_FLOOR = 0x100000  # images load above the BIOS hole


def _checksum(data: bytes) -> int:
    return (-sum(data)) & 0xFF


def mp_table() -> tuple[bytes, bytes]:
    """(MP floating pointer, MP configuration table): one enabled BSP with LAPIC id 0."""
    cpu = struct.pack("<BBBBII8x", 0, 0, 0x14, 0x3, 0x600, 0x201)  # type 0, id 0, ver, enabled|BSP
    length = 44 + len(cpu)
    header = bytearray(
        struct.pack(
            "<4sHBB8s12sIHHIHBB",
            b"PCMP",
            length,
            4,
            0,
            b"PVIO    ",
            b"PVH         ",
            0,
            0,
            1,
            LAPIC_BASE,
            0,
            0,
            0,
        )
    )
    table = bytearray(header + cpu)
    table[7] = _checksum(bytes(table))
    floating = bytearray(struct.pack("<4sIBBB5x", b"_MP_", MP_CONFIG_AT, 1, 4, 0))
    floating[10] = _checksum(bytes(floating))
    return bytes(floating), bytes(table)


def pvh_entry(image: bytes, what: str) -> int:
    """The PHYS32 entry point in ``image``'s Xen ELF notes (ImageError if it has none)."""
    try:
        elf = ELFFile(io.BytesIO(image))
        for seg in elf.iter_segments():
            if seg["p_type"] != "PT_NOTE":
                continue
            notes: Any = seg  # a NoteSegment
            for note in notes.iter_notes():
                if note["n_name"] == "Xen" and note["n_type"] == XEN_ELFNOTE_PHYS32_ENTRY:
                    desc = note["n_desc"]
                    raw = (
                        desc
                        if isinstance(desc, bytes)
                        else bytes.fromhex(desc)
                        if isinstance(desc, str)
                        else b""
                    )
                    if len(raw) < 4:
                        raise ImageError(f"{what}: PHYS32_ENTRY note too short")
                    return int(struct.unpack_from("<I", raw)[0])
    except ELFError as e:
        raise ImageError(f"{what}: not a valid ELF image: {e}") from None
    raise ImageError(f"{what}: no XEN_ELFNOTE_PHYS32_ENTRY note: not a PVH kernel")


def load_segments(dom: Domain, image: bytes, what: str, limit: int) -> int:
    """Copy every PT_LOAD to its physical address (above 1 MiB, below ``limit``); the end."""
    try:
        elf = ELFFile(io.BytesIO(image))
        if elf["e_machine"] not in ("EM_386", "EM_X86_64"):
            raise ImageError(f"{what}: not an x86 image ({elf['e_machine']})")
        end = 0
        for seg in elf.iter_segments():
            if seg["p_type"] != "PT_LOAD" or not seg["p_memsz"]:
                continue
            paddr, filesz, memsz = seg["p_paddr"], seg["p_filesz"], seg["p_memsz"]
            if filesz > memsz or paddr < IMAGE_FLOOR or paddr + memsz > limit:
                raise ImageError(
                    f"{what}: segment {paddr:#x}+{memsz:#x} outside [{IMAGE_FLOOR:#x}, {limit:#x})"
                )
            data = seg.data()
            dom.mem.write(paddr, data)
            dom.mem.write(paddr + filesz, bytes(memsz - filesz))
            end = max(end, paddr + memsz)
        if not end:
            raise ImageError(f"{what}: no PT_LOAD segment")
        return end
    except ELFError as e:
        raise ImageError(f"{what}: not a valid ELF image: {e}") from None


def _bcd(v: int) -> int:
    return (v // 10) << 4 | (v % 10)


class CmosRtc:
    """The PC's CMOS clock at ports 0x70 (index) and 0x71 (data), as a PVH kernel expects one.

    Linux reads the wall clock from it at boot and, finding every register all-ones (no device),
    waits for an update-in-progress bit that never clears: 20,000 port reads.  This model answers
    with the time (BCD, 24-hour, register B 0x02), never an update in progress (register A's bit
    7 clear), a valid battery (register D 0x80), and 128 bytes of NVRAM that writes go to.  The
    time is the host's UTC clock when the domain was created plus the hypervisor clock's advance
    since, so it moves with trio's (possibly mocked) clock.
    """

    def __init__(self) -> None:
        self.index = 0
        self.nvram = bytearray(128)
        self.nvram[0x0A], self.nvram[0x0B], self.nvram[0x0D] = 0x26, 0x02, 0x80
        self._epoch = time.time()
        self._t0 = trio.current_time()

    def _clock(self) -> time.struct_time:
        return time.gmtime(self._epoch + trio.current_time() - self._t0)

    def read(self, offset: int, size: int) -> int:
        """Port 0x70 reads back the index; 0x71 the register it names."""
        if offset == 0:
            return self.index
        t = self._clock()
        fields = {0x00: t.tm_sec, 0x02: t.tm_min, 0x04: t.tm_hour, 0x06: t.tm_wday + 1,
                  0x07: t.tm_mday, 0x08: t.tm_mon, 0x09: t.tm_year % 100, 0x32: t.tm_year // 100}  # fmt: skip
        if self.index in fields:
            return _bcd(fields[self.index])
        return self.nvram[self.index]

    def write(self, offset: int, size: int, value: int) -> None:
        """Port 0x70 selects a register (bit 7 is the NMI mask, ignored); 0x71 writes NVRAM."""
        if offset == 0:
            self.index = value & 0x7F
        elif self.index not in (0x0A, 0x0C, 0x0D):  # status registers stay as the model keeps them
            self.nvram[self.index] = value & 0xFF


class PvhGuest:
    """An unmodified PVH kernel image on a :class:`pvio.cpu.system.SystemVcpu`."""

    memory_pages = 65536  # 256 MiB

    def __init__(
        self,
        image: str | Path | bytes,
        *,
        name: str | None = None,
        cmdline: str = "",
        modules: list[bytes] | None = None,
        memory_pages: int | None = None,
        slice_insns: int = DEFAULT_SLICE_INSNS,
        max_slices_without_exit: int = DEFAULT_MAX_SLICES_WITHOUT_EXIT,
    ) -> None:
        if isinstance(image, bytes):
            self.image, self.image_name = image, "<bytes>"
        else:
            self.image, self.image_name = Path(image).read_bytes(), str(image)
        if len(cmdline.encode()) > CMDLINE_MAX:
            raise ValueError(f"PVH guest {name!r}: command line longer than {CMDLINE_MAX} bytes")
        self.modules = list(modules or [])
        if len(self.modules) > MAX_MODULES:
            raise ValueError(f"PVH guest {name!r}: at most {MAX_MODULES} modules")
        self.name = name
        self.cmdline = cmdline
        if memory_pages is not None:
            self.memory_pages = memory_pages
        self.slice_insns = slice_insns
        self.max_slices_without_exit = max_slices_without_exit
        self.entry = pvh_entry(self.image, self.image_name)
        self.hv: Hypervisor
        self.domain: Domain
        self.vcpu: SystemVcpu
        self.hvm: hvm.HvmState

    def attach(self, hv: Hypervisor, dom: Domain) -> None:
        """At domain creation: the vCPU, the image, modules, start info, MP table, HVM params."""
        self.hv = hv
        self.domain = dom
        self.vcpu = SystemVcpu(
            hv, dom, slice_insns=self.slice_insns, max_slices_without_exit=self.max_slices_without_exit
        )
        dom.vcpu = self.vcpu
        e820 = hvm.e820_for(dom)
        self.hvm = hvm.setup_domain(hv.hypercalls, dom, e820)
        ram_top = dom.hypercall_page_gfn * PAGE_SIZE
        image_end = load_segments(dom, self.image, self.image_name, ram_top)
        # Modules from the top of RAM down, page-aligned.
        at = ram_top
        placed = []
        for i, module in enumerate(self.modules):
            at = (at - len(module)) & ~(PAGE_SIZE - 1)
            if at < image_end:
                raise ImageError(f"{self.image_name}: module {i} ({len(module)} bytes) does not fit in RAM")
            dom.mem.write(at, module)
            placed.append((at, len(module)))
        dom.mem.write(MODLIST_AT, b"".join(HVM_MODLIST_ENTRY.pack(a, n, 0, 0) for a, n in placed))
        dom.mem.write(MEMMAP_AT, b"".join(HVM_MEMMAP_ENTRY.pack(a, n, t, 0) for a, n, t in e820))
        dom.mem.write(CMDLINE_AT, self.cmdline.encode() + b"\0")
        dom.mem.write(
            START_INFO_AT,
            HVM_START_INFO.pack(
                HVM_START_MAGIC,
                1,
                0,
                len(placed),
                MODLIST_AT if placed else 0,
                CMDLINE_AT,
                0,
                MEMMAP_AT,
                len(e820),
                0,
            ),
        )
        floating, table = mp_table()
        dom.mem.write(MP_FLOATING_AT, floating)
        dom.mem.write(MP_CONFIG_AT, table)
        bus = getattr(hv, "iobus", None)
        if bus is not None:
            self.rtc = CmosRtc()
            bus.register_pio(dom, CMOS_PORT, 2, self.rtc)
        self.vcpu.enter_protected_mode(self.entry, START_INFO_AT, GDT_AT)

    def type(self, text: str | bytes) -> int:
        """Feed ``text`` to the guest's console input ring; returns how many bytes fit."""
        data = text.encode() if isinstance(text, str) else text
        console = self.hvm.console
        return console.feed(data) if console is not None else 0

    async def wait_for(self, text: str, timeout: float, start: int = 0) -> bool:
        """Poll the console until ``text`` appears after character ``start`` (False: timeout or death)."""
        with trio.move_on_after(timeout):
            while self.domain.alive:
                if text in self.domain.console[start:]:
                    return True
                await trio.sleep(0.05)
        return text in self.domain.console[start:]

    async def run(self) -> None:
        """Run the vCPU until the domain stops."""
        log.info("dom%d: PVH guest %s, entry %#x", self.domain.domid, self.image_name, self.entry)
        self.domain.booted.set()
        await self.vcpu.run()
