"""Guest memory: one host buffer per domain, addressed by guest frame number.

A domain's RAM is a single anonymous ``mmap``: the hypervisor, the domain's own kernel
(a PyGuest, or an x86 guest whose emulated CPU maps the very same buffer without
copying) and anyone holding a grant mapping all see the same bytes.  Guest-physical
addresses (``gpa``) and frame numbers (``gfn = gpa >> 12``) are plain ints; every access
made on a guest's behalf goes through the bounds checks here and raises
:class:`GuestFault` (which the hypercall layer turns into ``-EFAULT``) instead of ever
touching memory outside the domain.
"""

from __future__ import annotations

import contextlib
import mmap
from typing import Protocol

from pvio.abi import PAGE_SHIFT


class GuestFault(Exception):
    """A guest-supplied address or length lies outside the domain's memory."""


class GuestMemory:
    """The RAM of one domain: ``nr_pages`` pages in one anonymous mmap."""

    def __init__(self, nr_pages: int) -> None:
        if nr_pages <= 0:
            raise ValueError(f"a domain needs at least one page, not {nr_pages}")
        self.nr_pages = nr_pages
        self.size = nr_pages << PAGE_SHIFT
        self.mmap = mmap.mmap(-1, self.size)
        self.view = memoryview(self.mmap)

    def check(self, gpa: int, length: int) -> None:
        """Raise GuestFault unless [gpa, gpa + length) lies inside this memory."""
        if gpa < 0 or length < 0 or gpa + length > self.size:
            raise GuestFault(f"guest range {gpa:#x}+{length:#x} outside {self.size:#x} bytes of RAM")

    def page(self, gfn: int) -> memoryview:
        """A zero-copy view of one page."""
        if not 0 <= gfn < self.nr_pages:
            raise GuestFault(f"gfn {gfn:#x} outside {self.nr_pages} pages")
        return self.view[gfn << PAGE_SHIFT : (gfn + 1) << PAGE_SHIFT]

    def slice(self, gpa: int, length: int) -> memoryview:
        """A zero-copy view of [gpa, gpa + length)."""
        self.check(gpa, length)
        return self.view[gpa : gpa + length]

    def read(self, gpa: int, length: int) -> bytes:
        """A copy of [gpa, gpa + length): what the hypervisor validates and uses (copy once)."""
        self.check(gpa, length)
        return self.mmap[gpa : gpa + length]

    def write(self, gpa: int, data: bytes) -> None:
        """Copy ``data`` into guest memory at ``gpa``."""
        self.check(gpa, len(data))
        self.mmap[gpa : gpa + len(data)] = data

    def close(self) -> None:
        """Release the RAM (after the domain is destroyed and nothing maps it)."""
        self.view.release()
        with contextlib.suppress(BufferError):  # a view someone still holds: freed with it
            self.mmap.close()


class GuestAddressSpace(Protocol):
    """Where a domain's hypercall arguments live: guest-physical RAM (PV) or its virtual space (HVM)."""

    def read(self, addr: int, length: int) -> bytes:
        """A copy of ``length`` bytes at ``addr``; GuestFault if any byte is unreachable."""

    def write(self, addr: int, data: bytes) -> None:
        """Store ``data`` at ``addr``; GuestFault if any byte is unreachable."""
