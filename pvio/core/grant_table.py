"""Grant tables v1: sharing pages between domains with every check Xen makes.

The table of a domain is an array of 8-byte ``grant_entry_v1`` (flags, domid, frame) in
frames of *that domain's own memory*, written by the guest itself; the hypervisor only
reads an entry (once, into locals) when another domain uses the reference, and only
writes the ``GTF_reading``/``GTF_writing`` bits while the grant is mapped.  Because
those bits are set for as long as a mapping exists, the guest's atomic revoke (flags
-> 0 only if neither bit is set) cannot succeed while the page is mapped.

Hypervisor side (:class:`GrantTable` per domain, :func:`map_grant`, :func:`unmap_grant`,
:func:`copy_one`) and guest side (:class:`GuestGrantTable`: grant and revoke) share the
entry layout from :mod:`pvio.abi`.

Status codes follow Xen: a bad domid is ``bad_domain``, a reference outside the table
``bad_gntref``, a frame outside the granter's memory ``bad_page``, a copy crossing a page
``bad_copy_arg``; an entry that does not permit access (wrong type) is
``general_error``.  Where Xen also answers ``general_error`` for an entry granted to
another domain or for writing through a read-only grant, pvio answers the more precise
``permission_denied`` (``docs/abi.md``).
"""

from __future__ import annotations

import contextlib
import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pvio.abi import (
    DOMID_SELF,
    GNTTAB_NR_RESERVED_ENTRIES,
    GRANT_ENTRIES_PER_FRAME,
    GRANT_ENTRY_V1,
    PAGE_SHIFT,
    PAGE_SIZE,
    GntSt,
    GTF_invalid,
    GTF_permit_access,
    GTF_reading,
    GTF_readonly,
    GTF_type_mask,
    GTF_writing,
)

if TYPE_CHECKING:
    from pvio.core.domain import Domain

_U16 = struct.Struct("<H")
MAX_MAPTRACK = 4096  # mappings one domain may hold at once


def _store_flags(view: memoryview, gpa: int, flags: int) -> None:
    """Write an entry's u16 flags in one 16-bit store: the other side may be another process
    (a driver domain reading the entry), and ``struct.pack_into`` zeroes its target first."""
    view[gpa : gpa + 2].cast("H")[0] = flags


def _entry_gpa(first_gfn: int, ref: int) -> int:
    frame, idx = divmod(ref, GRANT_ENTRIES_PER_FRAME)
    return ((first_gfn + frame) << PAGE_SHIFT) + idx * GRANT_ENTRY_V1.size


class GrantError(Exception):
    """A grant operation failed; ``status`` is the GNTST_* code."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"{GntSt(status).name}: {message}")
        self.status = status


@dataclass
class GrantMapping:
    """One mapping held by a grantee: the zero-copy view of the granter's page."""

    handle: int
    grantee: Domain
    granter: Domain
    ref: int
    gfn: int
    readonly: bool
    view: memoryview


class GrantTable:
    """The hypervisor's handle on one domain's grant table (its frames and active pins)."""

    def __init__(self, dom: Domain, first_gfn: int, nr_frames: int) -> None:
        self.dom = dom
        self.first_gfn = first_gfn
        self.nr_frames = nr_frames
        self.nr_entries = nr_frames * GRANT_ENTRIES_PER_FRAME
        self.pins: dict[int, list[int]] = {}  # ref -> [read pins, write pins]

    def read_entry(self, ref: int) -> tuple[int, int, int]:
        """(flags, domid, frame) of ``ref``, read once from guest memory."""
        flags, domid, frame = GRANT_ENTRY_V1.unpack_from(self.dom.mem.view, _entry_gpa(self.first_gfn, ref))
        return flags, domid, frame

    def _set_flag_bits(self, ref: int, bits: int, on: bool) -> None:
        gpa = _entry_gpa(self.first_gfn, ref)
        (flags,) = _U16.unpack_from(self.dom.mem.view, gpa)
        _store_flags(self.dom.mem.view, gpa, (flags | bits) if on else (flags & ~bits))

    def acquire(self, grantee: int, ref: int, write: bool) -> int:
        """Check ``ref`` may be used by ``grantee`` (for writing if ``write``); return its frame.

        Raises GrantError with Xen's status on any failed check.
        """
        if not 0 <= ref < self.nr_entries:
            raise GrantError(GntSt.bad_gntref, f"ref {ref} outside dom{self.dom.domid}'s {self.nr_entries}")
        flags, domid, frame = self.read_entry(ref)
        if flags & GTF_type_mask != GTF_permit_access:
            raise GrantError(GntSt.general_error, f"dom{self.dom.domid} ref {ref} does not permit access")
        if domid != grantee:
            raise GrantError(
                GntSt.permission_denied,
                f"dom{self.dom.domid} ref {ref} is granted to dom{domid}, not {grantee}",
            )
        if write and flags & GTF_readonly:
            raise GrantError(GntSt.permission_denied, f"dom{self.dom.domid} ref {ref} is read-only")
        if frame >= self.dom.mem.nr_pages:
            raise GrantError(GntSt.bad_page, f"dom{self.dom.domid} ref {ref} names frame {frame:#x}")
        return frame

    def pin(self, ref: int, write: bool) -> None:
        """Count a mapping of ``ref`` and mark the entry in use (GTF_reading / GTF_writing)."""
        p = self.pins.setdefault(ref, [0, 0])
        p[0] += 1
        if write:
            p[1] += 1
        self._set_flag_bits(ref, GTF_reading | (GTF_writing if write else 0), True)

    def unpin(self, ref: int, write: bool) -> None:
        """Drop one mapping of ``ref``; clear the in-use bits when the last one goes."""
        p = self.pins[ref]
        p[0] -= 1
        if write:
            p[1] -= 1
            if p[1] == 0:
                self._set_flag_bits(ref, GTF_writing, False)
        if p[0] == 0:
            self._set_flag_bits(ref, GTF_reading, False)
            del self.pins[ref]


def _domain(hv_domains: dict[int, Domain], caller: Domain, domid: int) -> Domain:
    dom = caller if domid == DOMID_SELF else hv_domains.get(domid)
    if dom is None or not dom.alive:
        raise GrantError(GntSt.bad_domain, f"no domain {domid}")
    return dom


def map_grant(
    domains: dict[int, Domain], caller: Domain, domid: int, ref: int, readonly: bool
) -> GrantMapping:
    """GNTTABOP_map_grant_ref for a host mapping: pin the entry, return the mapping."""
    granter = _domain(domains, caller, domid)
    if len(caller.maptrack) >= MAX_MAPTRACK:
        raise GrantError(GntSt.no_space, f"dom{caller.domid} holds {MAX_MAPTRACK} mappings already")
    frame = granter.grant_table.acquire(caller.domid, ref, write=not readonly)
    granter.grant_table.pin(ref, write=not readonly)
    view = granter.mem.page(frame)
    handle = caller.next_map_handle()
    m = GrantMapping(handle, caller, granter, ref, frame, readonly, view.toreadonly() if readonly else view)
    caller.maptrack[handle] = m
    granter.mapped_by_others[(caller.domid, handle)] = m
    return m


def unmap_grant(caller: Domain, handle: int) -> GrantMapping:
    """GNTTABOP_unmap_grant_ref: unpin and invalidate the mapping's view."""
    m = caller.maptrack.pop(handle, None)
    if m is None:
        raise GrantError(GntSt.bad_handle, f"dom{caller.domid} has no mapping {handle}")
    m.granter.mapped_by_others.pop((caller.domid, handle), None)
    if m.granter.alive:
        m.granter.grant_table.unpin(m.ref, write=not m.readonly)
    with contextlib.suppress(BufferError):  # sub-views still exported: they die with the memory
        m.view.release()
    return m


def copy_side(
    domains: dict[int, Domain], caller: Domain, is_gref: bool, ref_or_gfn: int, domid: int, write: bool
) -> memoryview:
    """Resolve one side of a GNTTABOP_copy element to the page it names, after every check.

    A gref side is the union's ``u.ref``: Xen reads a 32-bit grant_ref_t, so only the low 32
    bits of the 64-bit field count; a frame side (``u.gmfn``) uses all 64."""
    if is_gref:
        granter = _domain(domains, caller, domid)
        frame = granter.grant_table.acquire(caller.domid, ref_or_gfn & 0xFFFFFFFF, write=write)
        return granter.mem.page(frame)
    if domid not in (DOMID_SELF, caller.domid):
        raise GrantError(
            GntSt.permission_denied, f"dom{caller.domid} names a frame of dom{domid} without a grant"
        )
    if not 0 <= ref_or_gfn < caller.mem.nr_pages:
        raise GrantError(GntSt.bad_page, f"dom{caller.domid} has no frame {ref_or_gfn:#x}")
    return caller.mem.page(ref_or_gfn)


def copy_one(
    domains: dict[int, Domain],
    caller: Domain,
    src: tuple[bool, int, int, int],
    dst: tuple[bool, int, int, int],
    length: int,
) -> None:
    """One GNTTABOP_copy element; ``src``/``dst`` are (is_gref, ref or gfn, domid, offset)."""
    if length == 0:  # Xen ignores zero-length copies entirely (hardening after XSA-448)
        return
    if src[3] + length > PAGE_SIZE or dst[3] + length > PAGE_SIZE:
        raise GrantError(GntSt.bad_copy_arg, f"copy of {length} bytes crosses a page")
    s = copy_side(domains, caller, src[0], src[1], src[2], write=False)
    d = copy_side(domains, caller, dst[0], dst[1], dst[2], write=True)
    d[dst[3] : dst[3] + length] = s[src[3] : src[3] + length]


class GuestGrantTable:
    """The guest kernel's side: allocate references, grant and revoke access.

    Grant: write domid and frame, then (after a write barrier) the flags, so the
    hypervisor never sees valid flags over a half-written entry.  Revoke: only if neither
    GTF_reading nor GTF_writing is set, flags go to 0 in one step (the cmpxchg of Xen's
    protocol; in a PyGuest nothing can run between the check and the write).  A revoke
    that fails leaves the reference and the page owned by the grant: reuse neither.
    """

    def __init__(self, mem_view: memoryview, first_gfn: int, nr_frames: int) -> None:
        self._view = mem_view
        self.first_gfn = first_gfn
        self.nr_entries = nr_frames * GRANT_ENTRIES_PER_FRAME
        self._free = list(range(self.nr_entries - 1, GNTTAB_NR_RESERVED_ENTRIES - 1, -1))

    def grant_access(self, domid: int, gfn: int, readonly: bool = False, ref: int | None = None) -> int:
        """Grant ``domid`` access to frame ``gfn``; returns the grant reference."""
        if ref is None:
            if not self._free:
                raise RuntimeError("grant table full: no free grant references")
            ref = self._free.pop()
        gpa = _entry_gpa(self.first_gfn, ref)
        struct.pack_into("<HI", self._view, gpa + 2, domid, gfn)
        _store_flags(self._view, gpa, GTF_permit_access | (GTF_readonly if readonly else 0))
        return ref

    def end_access(self, ref: int) -> bool:
        """Revoke ``ref`` atomically; False (and nothing changed) if it is mapped or in use.

        Revoking a ref that is already revoked does nothing and returns True.
        """
        gpa = _entry_gpa(self.first_gfn, ref)
        (flags,) = _U16.unpack_from(self._view, gpa)
        if flags & (GTF_reading | GTF_writing):
            return False
        if flags & GTF_type_mask == GTF_invalid:  # revoked already: the ref is free, don't free it twice
            return True
        _store_flags(self._view, gpa, 0)
        if ref >= GNTTAB_NR_RESERVED_ENTRIES:
            self._free.append(ref)
        return True

    def flags(self, ref: int) -> int:
        """The entry's current flags (for tests and diagnostics)."""
        return int(_U16.unpack_from(self._view, _entry_gpa(self.first_gfn, ref))[0])

    @property
    def free_count(self) -> int:
        """References available for new grants."""
        return len(self._free)
