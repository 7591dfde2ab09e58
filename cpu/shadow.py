"""Machine memory, the p2m and shadow page tables: the MMU half of a full-virtualization monitor.

Design
------
* **Three address spaces.**  Guest-virtual (what the guest kernel's page tables map),
  guest-physical (the frames the guest believes it has: ``gpfn`` 0 .. ``nr_guest_pages``)
  and machine (the frames of the domain's RAM as the engine sees them: ``mfn``).  The
  :class:`P2M` maps guest-physical to machine and is deliberately *not* the identity:
  frames come from a pool in a scattered order, so a guest that confused the two would
  read the wrong page.  Frames outside the pool (the monitor's own frames: shadow
  tables, translated code, the monitor window; the hypervisor's shared pages) have no
  guest-physical name at all, which is what makes them unreachable.
* **Demand population and the double zero.**  Under full virtualization the guest cannot
  say which frames it will use, so the p2m is populated lazily: the first touch of a
  guest frame allocates a machine frame and scrubs it (``mem.scrubbed``) -- the monitor
  must, or the guest would see another tenant's data.  The guest kernel, written for
  hardware whose RAM is garbage, zeroes the same frame again when it hands it out.  A
  paravirtual guest is told frames are scrubbed and zeroes once (the information gap).
* **Shadow page tables.**  The engine never walks the guest's tables.  It walks shadows:
  one shadow frame per (guest table frame, level), whose entries are the guest's with
  guest-physical frames replaced by machine frames (leaves) or by the shadow of the next
  level (interior entries).  Shadows are filled lazily: a page fault the guest's own
  tables would not have taken is a *hidden* fault, fixed here and never shown to the
  guest (``shadow.fills``); one its tables would take is reflected (a *true* fault).
* **Coherence by write protection.**  Every guest frame that is shadowed as a page table
  is mapped read-only in every shadow leaf (a reverse map finds them), so a guest store
  to its own page table faults; the monitor decodes the store, performs it on the guest's
  table and drops the one shadow entry it changed (``shadow.pt_writes``).  Shadows are
  kept across CR3 switches (they stay coherent), so a process switch costs a root lookup,
  not a rebuild.
* **Refusals.**  A guest entry naming a frame beyond the guest's memory, or a large page
  (this monitor shadows 4 KiB pages only), is a :class:`ShadowError` with the reason: the
  monitor stops the guest; nothing is mapped.

Counters (on the domain): ``shadow.tables``, ``shadow.fills``, ``shadow.pt_writes``,
``shadow.write_protects``, ``mem.populated``, ``mem.scrubbed``.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, MutableMapping
from typing import TYPE_CHECKING

from pvio.abi import PAGE_SIZE

if TYPE_CHECKING:
    from pvio.core.memory import GuestMemory

PTE_P = 1
PTE_W = 2
PTE_U = 4
PTE_A = 1 << 5
PTE_D = 1 << 6
PTE_PS = 1 << 7
PTE_NX = 1 << 63
ADDR_MASK = 0x000F_FFFF_FFFF_F000
#: The guest-entry bits a shadow entry keeps (everything else is the monitor's to choose).
KEEP_FLAGS = PTE_P | PTE_W | PTE_U | PTE_NX
ERR_P, ERR_W, ERR_U, ERR_I = 1, 2, 4, 16
LEVEL_SHIFTS = {4: 39, 3: 30, 2: 21, 1: 12}
#: PML4 slot of the monitor window (VA 0xffffff8000000000 and up): the monitor's GDT,
#: the virtual-IF byte and the binary translator's code cache live there, in every
#: address space, supervisor-only.  A guest entry in that slot is ignored.
MONITOR_SLOT = 511
_Q = struct.Struct("<Q")


class ShadowError(Exception):
    """A guest page-table entry the monitor refuses to shadow (the reason is the message)."""


class FramePool:
    """Machine frames the monitor hands out, in a fixed scattered order (deterministic)."""

    def __init__(self, first: int, count: int, *, stride: int = 389) -> None:
        if count <= 0:
            raise ValueError(f"empty frame pool at mfn {first:#x}")
        while _gcd(stride, count) != 1:
            stride += 2
        self.first, self.count, self.stride = first, count, stride
        self._next = 0

    def contains(self, mfn: int) -> bool:
        """Is ``mfn`` one of this pool's frames (allocated or not)?"""
        return self.first <= mfn < self.first + self.count

    def take(self) -> int:
        """The next free frame; MemoryError when the pool is used up."""
        if self._next >= self.count:
            raise MemoryError(f"frame pool at mfn {self.first:#x} exhausted ({self.count} frames)")
        mfn = self.first + (self._next * self.stride) % self.count
        self._next += 1
        return mfn

    @property
    def used(self) -> int:
        """Frames handed out so far."""
        return self._next


def _gcd(a: int, b: int) -> int:
    while b:
        a, b = b, a % b
    return a


class P2M:
    """Guest-physical -> machine frames of one domain; populated on first touch when ``lazy``."""

    def __init__(
        self,
        mem: GuestMemory,
        nr_guest_pages: int,
        pool: FramePool,
        counters: MutableMapping[str, int],
        *,
        lazy: bool,
    ) -> None:
        if pool.count < nr_guest_pages:
            raise ValueError(f"a pool of {pool.count} frames cannot back {nr_guest_pages} guest pages")
        self.mem = mem
        self.nr = nr_guest_pages
        self.pool = pool
        self.counters = counters
        self.lazy = lazy
        self._map: dict[int, int] = {}
        self._owner: dict[int, int] = {}  # mfn -> gpfn (the m2p)
        if not lazy:
            for gpfn in range(nr_guest_pages):
                self._populate(gpfn, scrub=True)

    def _populate(self, gpfn: int, *, scrub: bool) -> int:
        mfn = self.pool.take()
        if scrub:
            self.mem.write(mfn * PAGE_SIZE, bytes(PAGE_SIZE))
            self.counters["mem.scrubbed"] += 1
        self._map[gpfn] = mfn
        self._owner[mfn] = gpfn
        self.counters["mem.populated"] += 1
        return mfn

    def valid(self, gpfn: int) -> bool:
        """Is ``gpfn`` a frame of the guest's memory?"""
        return 0 <= gpfn < self.nr

    def mfn(self, gpfn: int, *, scrub: bool = True) -> int:
        """The machine frame of ``gpfn`` (populated, scrubbed, now if need be); ShadowError if invalid."""
        mfn = self._map.get(gpfn)
        if mfn is not None:
            return mfn
        if not self.valid(gpfn):
            raise ShadowError(f"guest frame {gpfn:#x} is outside the guest's {self.nr} pages")
        return self._populate(gpfn, scrub=scrub)

    def gpfn_of(self, mfn: int) -> int | None:
        """The guest frame ``mfn`` backs (the m2p), or None if it is not the guest's."""
        return self._owner.get(mfn)

    def mfns(self) -> list[int]:
        """Every populated machine frame, in guest-physical order (the PV guest's p2m list)."""
        return [self._map[g] for g in sorted(self._map)]

    def read(self, gpa: int, length: int) -> bytes:
        """Guest-physical read (within one page)."""
        return self.mem.read(self.mfn(gpa >> 12) * PAGE_SIZE + (gpa & 0xFFF), length)

    def write(self, gpa: int, data: bytes) -> None:
        """Guest-physical write (within one page)."""
        self.mem.write(self.mfn(gpa >> 12) * PAGE_SIZE + (gpa & 0xFFF), data)


class ShadowPager:
    """The shadow page tables of one guest: roots per guest CR3, lazy fill, write protection.

    ``monitor_l3`` is the machine frame of the monitor window's level-3 table, installed in
    slot :data:`MONITOR_SLOT` of every shadow root.  ``protect(gpfn)`` (from the binary
    translator) says whether a guest frame must be mapped read-only for a reason of its
    own (a translated code page); ``exec_guard(gpfn, guest_entry)`` whether a supervisor
    leaf must be non-executable until translated.
    """

    def __init__(
        self,
        mem: GuestMemory,
        p2m: P2M,
        pool: FramePool,
        counters: MutableMapping[str, int],
        monitor_l3: int,
        *,
        protect: Callable[[int], bool] | None = None,
        exec_guard: Callable[[int, int], bool] | None = None,
        leaf_target: Callable[[int], int | None] | None = None,
    ) -> None:
        self.mem = mem
        self.p2m = p2m
        self.pool = pool
        self.counters = counters
        self.monitor_l3 = monitor_l3
        self.protect = protect or (lambda gpfn: False)
        self.exec_guard = exec_guard or (lambda gpfn, entry: False)
        self.leaf_target = leaf_target or (lambda gpfn: None)
        self._shadows: dict[tuple[int, int], int] = {}  # (guest table gpfn, level) -> shadow mfn
        self._levels: dict[int, set[int]] = {}  # guest table gpfn -> levels it is shadowed at
        self._rmap: dict[int, set[tuple[int, int]]] = {}  # gpfn -> shadow leaf (mfn, index) mapping it

    # ------------------------------------------------------------------ tables
    def _entry(self, mfn: int, index: int) -> int:
        return int(_Q.unpack(self.mem.read(mfn * PAGE_SIZE + index * 8, 8))[0])

    def _set(self, mfn: int, index: int, value: int) -> None:
        self.mem.write(mfn * PAGE_SIZE + index * 8, _Q.pack(value))

    def is_table(self, gpfn: int) -> bool:
        """Is ``gpfn`` shadowed as a page table (and therefore write-protected)?"""
        return gpfn in self._levels

    def shadow_of(self, gpfn: int, level: int) -> int:
        """The shadow of guest table ``gpfn`` at ``level``, created (empty) on first use."""
        key = (gpfn, level)
        smfn = self._shadows.get(key)
        if smfn is not None:
            return smfn
        self.p2m.mfn(gpfn)  # a table must be guest memory (ShadowError otherwise)
        smfn = self.pool.take()
        self.mem.write(smfn * PAGE_SIZE, bytes(PAGE_SIZE))
        if level == 4:
            self._set(smfn, MONITOR_SLOT, self.monitor_l3 << 12 | PTE_P | PTE_W)
        self._shadows[key] = smfn
        self.counters["shadow.tables"] += 1
        if gpfn not in self._levels:
            self._levels[gpfn] = set()
            self.write_protect(gpfn)
        self._levels[gpfn].add(level)
        return smfn

    def write_protect(self, gpfn: int) -> bool:
        """Clear W in every shadow leaf that maps ``gpfn``; True if one was writable."""
        changed = False
        for smfn, index in self._rmap.get(gpfn, ()):
            entry = self._entry(smfn, index)
            if entry & PTE_W:
                self._set(smfn, index, entry & ~PTE_W)
                changed = True
        if changed:
            self.counters["shadow.write_protects"] += 1
        return changed

    def drop_leaves(self, gpfn: int) -> None:
        """Forget every shadow leaf mapping ``gpfn`` (they refill on the next touch)."""
        for smfn, index in self._rmap.pop(gpfn, set()):
            self._set(smfn, index, 0)

    def root(self, guest_cr3: int) -> int:
        """The shadow root (machine address) for guest CR3 ``guest_cr3``."""
        return self.shadow_of((guest_cr3 & ADDR_MASK) >> 12, 4) << 12

    # ------------------------------------------------------------------ faults
    def guest_walk(self, guest_cr3: int, va: int) -> list[tuple[int, int, int]]:
        """The guest's own walk of ``va``: [(table gpfn, index, entry)] from level 4 down.

        Stops at the first non-present entry (the list is then shorter than 4).
        """
        out = []
        table = (guest_cr3 & ADDR_MASK) >> 12
        for level in (4, 3, 2, 1):
            index = (va >> LEVEL_SHIFTS[level]) & 511
            entry = int(_Q.unpack(self.p2m.read(table * PAGE_SIZE + index * 8, 8))[0])
            out.append((table, index, entry))
            if not entry & PTE_P:
                break
            if level in (3, 2) and entry & PTE_PS:
                raise ShadowError(
                    f"va {va:#x}: a large page at level {level} (this monitor shadows 4 KiB pages)"
                )
            table = (entry & ADDR_MASK) >> 12
            if not self.p2m.valid(table):
                raise ShadowError(
                    f"va {va:#x}: level-{level} entry {entry:#x} names frame {table:#x}, "
                    f"outside the guest's {self.p2m.nr} pages"
                )
        return out

    def guest_allows(self, walk: list[tuple[int, int, int]], err: int) -> bool:
        """Would the guest's own tables allow the access ``err`` describes?"""
        if len(walk) < 4 or not walk[-1][2] & PTE_P:
            return False
        for _t, _i, entry in walk:
            if err & ERR_W and not entry & PTE_W:
                return False
            if err & ERR_U and not entry & PTE_U:
                return False
            if err & ERR_I and entry & PTE_NX:
                return False
        return True

    def fill(self, guest_cr3: int, walk: list[tuple[int, int, int]]) -> None:
        """Build the shadow path for a complete guest walk (the hidden fault's fix)."""
        smfn = self.shadow_of((guest_cr3 & ADDR_MASK) >> 12, 4)
        for depth, (_table, index, entry) in enumerate(walk):
            level = 4 - depth
            if level == 4 and index == MONITOR_SLOT:
                raise ShadowError("the guest mapped the monitor window's slot")
            target = (entry & ADDR_MASK) >> 12
            if level > 1:
                child = self.shadow_of(target, level - 1)
                self._set(smfn, index, child << 12 | (entry & KEEP_FLAGS & ~PTE_NX) | PTE_A)
                smfn = child
                continue
            mfn = self.leaf_target(target)
            if mfn is None:
                mfn = self.p2m.mfn(target)
            flags = entry & KEEP_FLAGS
            if self.is_table(target) or self.protect(target):
                flags &= ~PTE_W
            if not entry & PTE_U and self.exec_guard(target, entry):
                flags |= PTE_NX
            self._set(smfn, index, mfn << 12 | flags | PTE_A | PTE_D)
            self._rmap.setdefault(target, set()).add((smfn, index))
        self.counters["shadow.fills"] += 1

    def guest_entry_written(self, gpfn: int, index: int) -> None:
        """The guest's table ``gpfn`` changed at ``index``: drop the shadow entries made from it."""
        for level in self._levels.get(gpfn, ()):
            smfn = self._shadows[(gpfn, level)]
            if level == 4 and index == MONITOR_SLOT:
                continue
            old = self._entry(smfn, index)
            if level == 1 and old & PTE_P:
                old_gpfn = self.p2m.gpfn_of((old & ADDR_MASK) >> 12)
                if old_gpfn is not None:
                    self._rmap.get(old_gpfn, set()).discard((smfn, index))
            self._set(smfn, index, 0)
        self.counters["shadow.pt_writes"] += 1
