"""The hypervisor's native fast path: batched GNTTABOP_copy in C (``pvio/native/gnttab.c``).

:class:`NativeDomains` keeps a C array describing every live domain (its RAM pointer and
where its grant table lives), rebuilt whenever a domain is created or destroyed, and
runs a copy batch in one call.  ``pvio.core.grant_table.copy_one`` is the readable Python
reference of the same checks; ``tests/test_fastpath.py`` holds the two equal.
Set ``PVIO_NO_NATIVE=1`` to run the Python reference instead (for debugging).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from pvio.abi import GntSt
from pvio.core._native import ffi, lib

if TYPE_CHECKING:
    from pvio.core.counters import Counters
    from pvio.core.domain import Domain

ENABLED = os.environ.get("PVIO_NO_NATIVE", "") != "1"
_ERROR_NAMES = {-int(s): s.name for s in GntSt if s < 0}
_NO_ERRORS = bytes(ffi.sizeof("uint32_t[16]"))


class NativeDomains:
    """The live domains as the C fast path sees them."""

    def __init__(self) -> None:
        self._doms: Any = ffi.new("struct pvio_gt_dom[]", 0)
        self._index: dict[int, int] = {}
        self._keep: list[Any] = []
        self._stats = ffi.new("struct pvio_copy_stats *")
        self._errors = ffi.buffer(self._stats.errors)  # the error counts as bytes

    def rebuild(self, domains: list[Domain]) -> None:
        """Describe ``domains`` (call after every create and destroy)."""
        live = [d for d in domains if d.alive]
        arr = ffi.new("struct pvio_gt_dom[]", len(live))
        keep = []
        index = {}
        for i, d in enumerate(live):
            buf = ffi.from_buffer(d.mem.mmap)
            keep.append(buf)
            e = arr[i]
            e.mem = ffi.cast("uint8_t *", buf)
            e.nr_pages = d.mem.nr_pages
            e.gnttab_gfn = d.grant_table.first_gfn
            e.nr_entries = d.grant_table.nr_entries
            e.domid = d.domid
            index[d.domid] = i
        self._doms, self._keep, self._index = arr, keep, index

    def grant_copy(self, caller: Domain, arg: int, count: int) -> tuple[int, int, dict[str, int]]:
        """Run ``count`` gnttab_copy elements at ``arg`` (already bounds-checked) for ``caller``.

        Returns (copies, bytes, errors by GNTST name).
        """
        i = self._index[caller.domid]
        st = self._stats
        st.copies = 0
        st.bytes = 0
        raw = self._errors
        raw[:] = _NO_ERRORS
        lib.pvio_gnttab_copy(self._doms, len(self._index), i, self._doms[i].mem + arg, count, st)
        if raw[:] == _NO_ERRORS:  # the common case: one comparison, not sixteen cdata reads
            return int(st.copies), int(st.bytes), {}
        errors = {_ERROR_NAMES[k]: int(st.errors[k]) for k in range(1, 16) if st.errors[k]}
        return int(st.copies), int(st.bytes), errors


def count_copies(c: Counters, copies: int, nbytes: int, errors: dict[str, int]) -> None:
    """Count a grant-copy batch on the caller's counters, as the hypercall does in either
    process (``grant.copies``, ``grant.copy_bytes``, ``hypercall_errors.<GNTST name>``)."""
    c["grant.copies"] += copies
    c["grant.copy_bytes"] += nbytes
    for name, n in errors.items():
        c["hypercall_errors"] += n
        c[f"hypercall_errors.{name}"] += n
