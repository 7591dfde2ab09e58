"""Guest memory: one host buffer per domain, addressed by guest frame number.

A domain's RAM is a single ``mmap``: the hypervisor, the domain's own kernel
(a PyGuest, or an x86 guest whose emulated CPU maps the very same buffer without
copying) and anyone holding a grant mapping all see the same bytes.  By default it is
anonymous; ``shared=True`` backs it with a sealed memfd instead, so a guest kernel in
another OS process can map the same pages (:mod:`pvio.remote`).  The memfd is sealed
against shrinking and growing before anyone else sees it: a process holding it can write
the guest's bytes, never make the hypervisor's mapping fault (SIGBUS) by truncating it.  Guest-physical
addresses (``gpa``) and frame numbers (``gfn = gpa >> 12``) are plain ints; every access
made on a guest's behalf goes through the bounds checks here and raises
:class:`GuestFault` (which the hypercall layer turns into ``-EFAULT``) instead of ever
touching memory outside the domain.
"""

from __future__ import annotations

import contextlib
import fcntl
import mmap
import os
from typing import Protocol

from pvio.abi import PAGE_SHIFT


class GuestFault(Exception):
    """A guest-supplied address or length lies outside the domain's memory."""


#: The seals of a shared memory's memfd: its size is fixed for good (no shrink, no grow,
#: no removing the seals), so every process mapping it may touch every page it mapped.
MEMFD_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL


def sealed_memfd(name: str, size: int) -> int:
    """A new memfd of ``size`` bytes (zeroed), sealed with :data:`MEMFD_SEALS`; close-on-exec."""
    fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, size)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, MEMFD_SEALS)
    except BaseException:
        os.close(fd)
        raise
    return fd


def check_sealed_memfd(fd: int, size: int) -> None:
    """Raise ValueError unless ``fd`` is a memfd of at least ``size`` bytes that can never shrink."""
    try:
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
    except OSError as e:
        raise ValueError(f"fd {fd} is not a sealable memfd ({e.strerror})") from None
    if seals & (fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_SEAL) != fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_SEAL:
        raise ValueError(f"memfd {fd} is not sealed against shrinking (seals {seals:#x})")
    actual = os.fstat(fd).st_size
    if actual < size:
        raise ValueError(f"memfd {fd} holds {actual} bytes, not the {size} announced")


class GuestMemory:
    """The RAM of one domain: ``nr_pages`` pages in one mmap (anonymous, or a sealed memfd)."""

    def __init__(self, nr_pages: int, *, shared: bool = False, fd: int | None = None) -> None:
        """``shared``: back the pages with a new sealed memfd (``fd`` then names it);
        ``fd``: map an existing one (the other process's side), which is checked first."""
        if nr_pages <= 0:
            raise ValueError(f"a domain needs at least one page, not {nr_pages}")
        self.nr_pages = nr_pages
        self.size = nr_pages << PAGE_SHIFT
        self.fd: int | None = None
        if fd is not None:
            check_sealed_memfd(fd, self.size)
            self.fd = fd
        elif shared:
            self.fd = sealed_memfd("pvio-guest-ram", self.size)
        self.mmap = mmap.mmap(-1 if self.fd is None else self.fd, self.size)
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
        if self.fd is not None:  # the mapping (if still held) outlives the descriptor
            os.close(self.fd)
            self.fd = None


class GuestAddressSpace(Protocol):
    """Where a domain's hypercall arguments live: guest-physical RAM (PV) or its virtual space (HVM)."""

    def read(self, addr: int, length: int) -> bytes:
        """A copy of ``length`` bytes at ``addr``; GuestFault if any byte is unreachable."""

    def write(self, addr: int, data: bytes) -> None:
        """Store ``data`` at ``addr``; GuestFault if any byte is unreachable."""
