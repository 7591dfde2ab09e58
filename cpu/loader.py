"""Loading an x86-64 guest kernel ELF image into a domain's memory (pyelftools).

The image must be a static ELF64 executable for x86-64 (``ET_EXEC``).  Every ``PT_LOAD``
segment is copied to its *physical* address (``p_paddr``): file bytes, then zeroes up to
``p_memsz`` (the bss).  Guest-virtual equals guest-physical on pvio's vCPU, so an image
linked at its load address runs as linked.  Segments must lie in the guest's own RAM,
above page 0 and below the first page the hypervisor reserves (the hypercall page,
grant table and shared pages, ``Domain.free_end_gfn``), and the entry point must lie
inside a loaded segment: anything else is refused with an :class:`ImageError` that
names the image and the value at fault.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import TYPE_CHECKING

from elftools.common.exceptions import ELFError
from elftools.elf.elffile import ELFFile

from pvio.abi import PAGE_SIZE

if TYPE_CHECKING:
    from pvio.core.domain import Domain


class ImageError(ValueError):
    """A guest image that cannot be loaded (not an x86-64 ELF executable, or out of bounds)."""


@dataclass(frozen=True)
class LoadedImage:
    """Where an image went: its entry point and the end of its highest segment."""

    entry: int
    start: int
    end: int


def load_elf(dom: Domain, image: bytes, what: str = "guest image") -> LoadedImage:
    """Copy ``image``'s PT_LOAD segments into ``dom``'s memory at their physical addresses."""
    try:
        elf = ELFFile(io.BytesIO(image))
        if elf.elfclass != 64 or elf["e_machine"] != "EM_X86_64":
            raise ImageError(f"{what}: not an x86-64 ELF64 image ({elf['e_machine']}, {elf.elfclass}-bit)")
        if elf["e_type"] != "ET_EXEC":
            raise ImageError(f"{what}: not a static executable (e_type {elf['e_type']})")
        limit = dom.free_end_gfn * PAGE_SIZE
        lo, hi = limit, 0
        entry = elf["e_entry"]
        entry_ok = False
        segments = [s for s in elf.iter_segments() if s["p_type"] == "PT_LOAD" and s["p_memsz"]]
        if not segments:
            raise ImageError(f"{what}: no PT_LOAD segment")
        for seg in segments:
            paddr, filesz, memsz = seg["p_paddr"], seg["p_filesz"], seg["p_memsz"]
            if filesz > memsz or paddr < PAGE_SIZE or paddr + memsz > limit:
                raise ImageError(
                    f"{what}: segment at {paddr:#x}+{memsz:#x} does not fit dom{dom.domid}'s RAM "
                    f"[{PAGE_SIZE:#x}, {limit:#x})"
                )
            data = seg.data()
            if len(data) != filesz:
                raise ImageError(f"{what}: segment at {paddr:#x} is truncated")
            dom.mem.write(paddr, data)
            dom.mem.write(paddr + filesz, bytes(memsz - filesz))
            lo, hi = min(lo, paddr), max(hi, paddr + memsz)
            entry_ok = entry_ok or paddr <= entry < paddr + memsz
        if not entry_ok:
            raise ImageError(f"{what}: entry point {entry:#x} is outside every loaded segment")
        return LoadedImage(entry, lo, hi)
    except ELFError as e:
        raise ImageError(f"{what}: not a valid ELF image: {e}") from None
