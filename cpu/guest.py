"""X86Guest: a guest kernel that is x86-64 machine code, run on :class:`pvio.cpu.vcpu.X86Vcpu`.

``X86Guest(image, name=..., memory_pages=..., cmdline=...)`` is a
:class:`pvio.core.domain.GuestKernel`: give it to ``hv.create_domain`` and ``hv.start`` it
like a PyGuest.  ``image`` is an ELF path or the image's bytes; :func:`default_image`
builds (and caches) pvio's own C guest kernel from ``frontends/x86``.

Boot protocol (pvio's, after Xen's x86-64 PV one; ``docs/abi.md``): the image's
PT_LOAD segments are loaded at their physical addresses, the hypercall page is filled
with trapping stubs at ``Domain.hypercall_page_gfn`` (its frame is in the pvio start_info
extension), the command line goes into start_info's ``cmd_line``, and the vCPU starts at
the ELF entry point with RSI = the guest-physical address of start_info, events masked
(``upcall_mask = 1``) and every other register zero; the entry stub sets up its own
stack.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

from pvio.abi import PAGE_SIZE
from pvio.cpu.loader import LoadedImage, load_elf
from pvio.cpu.vcpu import DEFAULT_MAX_SLICES_WITHOUT_EXIT, DEFAULT_SLICE_INSNS, X86Vcpu

if TYPE_CHECKING:
    from pvio.core.domain import Domain
    from pvio.core.hypervisor import Hypervisor

log = logging.getLogger("pvio.cpu")

CMDLINE_MAX = 1023  # start_info.cmd_line is char[1024]


def default_image() -> Path:
    """pvio's C guest kernel (built with the system's gcc on first use, then cached)."""
    from pvio.cpu.build import build_image

    return build_image()


class X86Guest:
    """A guest kernel in x86-64 machine code (an ELF image) on an emulated vCPU."""

    memory_pages = 2048

    def __init__(
        self,
        image: str | Path | bytes | None = None,
        *,
        name: str | None = None,
        memory_pages: int | None = None,
        cmdline: str = "",
        slice_insns: int = DEFAULT_SLICE_INSNS,
        max_slices_without_exit: int = DEFAULT_MAX_SLICES_WITHOUT_EXIT,
    ) -> None:
        if image is None:
            image = default_image()
        if isinstance(image, bytes):
            self.image, self.image_name = image, "<bytes>"
        else:
            self.image, self.image_name = Path(image).read_bytes(), str(image)
        if len(cmdline.encode()) > CMDLINE_MAX:
            raise ValueError(f"x86 guest {name!r}: command line longer than {CMDLINE_MAX} bytes")
        self.name = name
        if memory_pages is not None:
            self.memory_pages = memory_pages
        self.cmdline = cmdline
        self.slice_insns = slice_insns
        self.max_slices_without_exit = max_slices_without_exit
        self.hv: Hypervisor
        self.domain: Domain
        self.vcpu: X86Vcpu
        self.loaded: LoadedImage

    def attach(self, hv: Hypervisor, dom: Domain) -> None:
        """Called at domain creation: load the image, the hypercall page and start_info."""
        self.hv = hv
        self.domain = dom
        self.vcpu = X86Vcpu(
            hv, dom, slice_insns=self.slice_insns, max_slices_without_exit=self.max_slices_without_exit
        )
        dom.vcpu = self.vcpu
        self.loaded = load_elf(dom, self.image, self.image_name)
        self.vcpu.write_hypercall_page()
        dom.write_start_info(dom.store_port, self.cmdline)
        self.vcpu.set_entry(self.loaded.entry, rsi=dom.start_info_gfn * PAGE_SIZE)

    async def run(self) -> None:
        """Run the vCPU until the domain stops."""
        log.info("dom%d: x86 guest %s, entry %#x", self.domain.domid, self.image_name, self.loaded.entry)
        self.domain.booted.set()
        await self.vcpu.run()
