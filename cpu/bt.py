"""Binary translation of the guest kernel's sensitive instructions, one code page at a time.

Design
------
* **When.**  Under the ``bt`` mode every supervisor page is mapped non-executable in the
  shadow tables until it is translated, so the first instruction fetch from a kernel code
  page is a page fault (``I/D`` set): the translator decodes the page with capstone from
  the faulting address (a true instruction boundary) to the end of the page, builds a
  *copy* of the page with its sensitive instructions rewritten, and the shadow maps the
  copy -- read-only and executable -- at the guest's virtual address.  The guest's own
  frame is never modified.
* **How.**  ``cli``, ``sti``, ``pushfq`` and ``popfq`` act on the interrupt flag, which
  at CPL 1 they cannot (``cli``/``sti`` fault; ``pushfq`` reads the real IF; ``popfq``
  silently ignores it -- the instructions Popek and Goldberg's theorem is about).  Each is
  rewritten into an equivalent sequence on a virtual-IF byte in the monitor window (no
  exit): the site and enough neighbouring instructions to make room for a 5-byte
  ``jmp rel32`` are moved into a stub in the translation cache, which runs the
  translation, the moved instructions and jumps back.  Moving an instruction is safe only
  if it is position-independent (no branch, call, return or RIP-relative operand) and no
  known branch target or return address falls inside the moved range; where that cannot
  be had, and for every other sensitive instruction (``hlt``, ``mov cr``, ``invlpg``,
  ``lidt``/``lgdt``/``ltr``, ``iretq``, ``wrmsr``/``rdmsr``), the site becomes a
  *call-out*: ``int3`` over its first byte, and the monitor emulates the instruction it
  decoded at translation time (one exit, no decode at run time).  ``in``/``out`` are left
  alone: on this engine they are exits with or without translation.
* **Coherence.**  Translated frames are write-protected in every shadow; a guest store to
  one (self-modifying code) is emulated on the guest's frame and discards the
  translation with a logged reason (``bt.invalidations``); the next fetch translates the
  new code.  Branch targets seen on later pages that land inside a moved range of an
  earlier page make that page be translated again without the conflicting patch.
* **Honest limits.**  The translation is in place (same addresses), not a translation
  cache of whole blocks as VMware's was: the guest can read its patched code; a sweep
  only finds instructions reachable linearly from a known boundary (an unfound one
  still traps and is trap-and-emulated, counted ``exits.privileged``); indirect branch
  targets in the middle of a moved range are not known (gcc's kernel code has none: no
  jump tables in text, and return addresses are never moved).

Counters (on the domain): ``bt.translations``, ``bt.inline``, ``bt.callout_sites``,
``bt.invalidations``, ``exits.callout``.
"""

from __future__ import annotations

import logging
import struct
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from capstone import (
    CS_GRP_BRANCH_RELATIVE,
    CS_GRP_CALL,
    CS_GRP_INT,
    CS_GRP_IRET,
    CS_GRP_JUMP,
    CS_GRP_RET,
    CsInsn,
)
from capstone import x86_const as C

from pvio.abi import PAGE_SIZE

if TYPE_CHECKING:
    from pvio.cpu.monitor import Monitor

log = logging.getLogger("pvio.cpu.bt")

INLINE = frozenset({"cli", "sti", "pushfq", "popfq"})
CALLOUT = frozenset(
    {"hlt", "mov", "invlpg", "lidt", "lgdt", "ltr", "iretq", "wrmsr", "rdmsr", "lmsw", "clts"}
)
JMP_LEN = 5
_BRANCH_GROUPS = (CS_GRP_JUMP, CS_GRP_CALL, CS_GRP_RET, CS_GRP_IRET, CS_GRP_INT, CS_GRP_BRANCH_RELATIVE)


@dataclass
class Translation:
    """One translated code page: its copy, the call-out sites and the moved ranges."""

    gpfn: int
    copy_mfn: int
    callouts: dict[int, CsInsn] = field(default_factory=dict)  # site va -> the original instruction
    moved: list[tuple[int, int]] = field(default_factory=list)  # [start, end) va ranges now a jmp


class Translator:
    """The binary translator of one ``bt``-mode monitor."""

    def __init__(self, monitor: Monitor) -> None:
        from pvio.cpu.monitor import WINDOW_PAGES, WINDOW_TC, WINDOW_VIF

        self.m = monitor
        self.counters = monitor.counters
        self.vif_va = monitor.window_va(WINDOW_VIF)
        self._tc_frames = monitor.window_frames[WINDOW_TC:WINDOW_PAGES]
        self._tc_va = monitor.window_va(WINDOW_TC)
        self._tc_used = 0
        self.pages: dict[int, Translation] = {}  # gpfn -> translation
        self._entries: dict[int, set[int]] = {}  # gpfn -> known entry offsets
        self._targets: set[int] = set()  # direct branch targets and return addresses seen anywhere
        self._forbidden: dict[int, set[int]] = {}  # gpfn -> site vas not to inline (conflicts)

    # ------------------------------------------------------------------ the shadow pager's questions
    def is_translated(self, gpfn: int) -> bool:
        """Is ``gpfn`` a translated code page (write-protected)?"""
        return gpfn in self.pages

    def needs_translation(self, gpfn: int, _entry: int) -> bool:
        """Must a supervisor leaf of ``gpfn`` stay non-executable (not translated yet)?"""
        return gpfn not in self.pages

    def copy_of(self, gpfn: int) -> int | None:
        """The machine frame the shadow maps for ``gpfn`` (its translated copy), if any."""
        t = self.pages.get(gpfn)
        return t.copy_mfn if t is not None else None

    # ------------------------------------------------------------------ translating
    def translate_page(self, va_page: int, gpfn: int, entry_va: int) -> None:
        """Translate guest code page ``gpfn`` (mapped at ``va_page``), first entered at ``entry_va``."""
        m = self.m
        self._entries.setdefault(gpfn, set()).add(entry_va - va_page)
        original = m.dom.mem.read(m.p2m.mfn(gpfn) * PAGE_SIZE, PAGE_SIZE)
        insns = self._sweep(original, va_page, self._entries[gpfn])
        for insn in insns.values():
            self._note_targets(insn)
        copy = bytearray(original)
        t = Translation(gpfn, m.monitor_pool.take())
        boundaries = sorted(insns)
        for pos, va in enumerate(boundaries):
            insn = insns[va]
            name = insn.mnemonic
            inlinable = name in INLINE and va not in self._forbidden.get(gpfn, set())
            if inlinable and self._inline(t, copy, insns, boundaries, pos, va_page):
                continue
            if name in INLINE or (name in CALLOUT and self._sensitive(insn)):
                copy[va - va_page] = 0xCC  # int3: a call-out
                t.callouts[va] = insn
                self.counters["bt.callout_sites"] += 1
        m.dom.mem.write(t.copy_mfn * PAGE_SIZE, bytes(copy))
        self.pages[gpfn] = t
        self.counters["bt.translations"] += 1
        m.shadow.drop_leaves(gpfn)
        m.uc.ctl_flush_tb()  # type: ignore[attr-defined]  # in unicorn 2.1, not in its stubs
        self._resolve_conflicts(gpfn)

    def _sweep(self, code: bytes, va_page: int, entries: set[int]) -> dict[int, CsInsn]:
        out: dict[int, CsInsn] = {}
        md = self.m._md
        for off in sorted(entries):
            for insn in md.disasm(code[off:], va_page + off):
                if insn.address in out:
                    break  # joined an earlier sweep: in step from here on
                out[insn.address] = insn
        self.counters["decodes"] += len(out)
        return out

    def _note_targets(self, insn: CsInsn) -> None:
        if insn.group(CS_GRP_CALL):
            self._targets.add(insn.address + insn.size)  # the return address
        if insn.group(CS_GRP_JUMP) or insn.group(CS_GRP_CALL):
            ops = insn.operands
            if ops and ops[0].type == C.X86_OP_IMM:
                self._targets.add(ops[0].imm & 0xFFFF_FFFF_FFFF_FFFF)

    @staticmethod
    def _sensitive(insn: CsInsn) -> bool:
        if insn.mnemonic != "mov":
            return True
        return any(op.type == C.X86_OP_REG and insn.reg_name(op.reg).startswith("cr") for op in insn.operands)

    @staticmethod
    def _movable(insn: CsInsn) -> bool:
        name = insn.mnemonic
        if name in INLINE or (name in CALLOUT and Translator._sensitive(insn)):
            return False
        if any(insn.group(g) for g in _BRANCH_GROUPS):
            return False
        return not any(op.type == C.X86_OP_MEM and op.mem.base == C.X86_REG_RIP for op in insn.operands)

    def _inline(
        self,
        t: Translation,
        copy: bytearray,
        insns: dict[int, CsInsn],
        order: list[int],
        pos: int,
        va_page: int,
    ) -> bool:
        """Move the site (and neighbours) into a stub and jump there; False if there is no safe room."""
        site = order[pos]
        start = end = pos
        length = insns[site].size
        # Grow forward first, then backward, over movable instructions with no target inside.
        while length < JMP_LEN and end + 1 < len(order):
            nxt = order[end + 1]
            if nxt != order[end] + insns[order[end]].size or not self._movable(insns[nxt]):
                break
            if nxt in self._targets or (nxt - va_page) + insns[nxt].size > PAGE_SIZE:
                break
            end += 1
            length += insns[nxt].size
        while length < JMP_LEN and start > 0:
            prev = order[start - 1]
            if prev + insns[prev].size != order[start] or not self._movable(insns[prev]):
                break
            if order[start] in self._targets:
                break
            start -= 1
            length += insns[prev].size
        if length < JMP_LEN or order[start] + length - va_page > PAGE_SIZE:
            return False
        region = order[start : end + 1]
        if any(va in self._targets for va in region[1:]):
            return False
        stub = bytearray()
        for va in region:
            insn = insns[va]
            stub += self._translation(insn.mnemonic) if va == site else bytes(insn.bytes)
        back = region[-1] + insns[region[-1]].size
        stub_va = self._tc_va + self._tc_used
        if self._tc_used + len(stub) + JMP_LEN > len(self._tc_frames) * PAGE_SIZE:
            return False  # the cache is full: call-outs from here on
        stub += b"\xe9" + struct.pack("<i", _rel32(back, stub_va + len(stub) + JMP_LEN))
        if (stub_va & 0xFFF) + len(stub) > PAGE_SIZE:  # keep a stub in one frame
            self._tc_used += PAGE_SIZE - (stub_va & 0xFFF)
            stub_va = self._tc_va + self._tc_used
            stub[-4:] = struct.pack("<i", _rel32(back, stub_va + len(stub)))
        frame = self._tc_frames[self._tc_used // PAGE_SIZE]
        self.m.dom.mem.write(frame * PAGE_SIZE + (self._tc_used & 0xFFF), bytes(stub))
        self._tc_used += len(stub)
        first = order[start]
        patch = b"\xe9" + struct.pack("<i", _rel32(stub_va, first + JMP_LEN))
        patch += b"\x90" * (length - JMP_LEN)  # never executed: the jmp skips them
        copy[first - va_page : first - va_page + length] = patch
        t.moved.append((first, first + length))
        self.counters["bt.inline"] += 1
        return True

    def _translation(self, name: str) -> bytes:
        """The in-line sequence for a sensitive flag instruction (flags preserved, no exit)."""
        vif = struct.pack("<i", _rel32(self.vif_va, 0))  # the window is in the top 2 GiB: disp32
        if name == "cli":
            return b"\xc6\x04\x25" + vif + b"\x00"  # movb $0, vif
        if name == "sti":
            return b"\xc6\x04\x25" + vif + b"\x01"  # movb $1, vif
        if name == "pushfq":
            # pushfq (the value); pushfq (to restore); IF of the value := vif; popfq
            return (b"\x9c\x9c" + b"\x48\x81\x64\x24\x08\xff\xfd\xff\xff" + b"\x80\x3c\x25" + vif + b"\x00"
                    + b"\x74\x09" + b"\x48\x81\x4c\x24\x08\x00\x02\x00\x00" + b"\x9d")  # fmt: skip
        if name == "popfq":
            # bt $9, (%rsp); setc vif; popfq (CPL 1 ignores IF; the arithmetic flags come back)
            return b"\x48\x0f\xba\x24\x24\x09" + b"\x0f\x92\x04\x25" + vif + b"\x9d"
        raise ValueError(name)

    def _resolve_conflicts(self, new_gpfn: int) -> None:
        for gpfn, t in list(self.pages.items()):
            if gpfn == new_gpfn:
                continue
            bad = [r for r in t.moved if any(r[0] < x < r[1] for x in self._targets)]
            if bad:
                for start, end in bad:
                    self._forbidden.setdefault(gpfn, set()).update(range(start, end))
                self.invalidate(gpfn, "a branch target lands inside a moved range")

    # ------------------------------------------------------------------ running
    def is_site(self, va: int) -> bool:
        """Is ``va`` a call-out site of a current translation?"""
        return any(va in t.callouts for t in self.pages.values())

    def callout(self, site: int) -> bool:
        """An ``int3`` at ``site`` stopped the engine: emulate the instruction it stands for."""
        for t in self.pages.values():
            insn = t.callouts.get(site)
            if insn is not None:
                self.m.rip = site
                self.m.emulate(insn)
                return True
        return False

    def invalidate(self, gpfn: int, reason: str) -> None:
        """Discard the translation of ``gpfn`` (its next fetch translates again)."""
        t = self.pages.pop(gpfn, None)
        if t is None:
            return
        self.counters["bt.invalidations"] += 1
        message = f"translation of code page {gpfn:#x} discarded: {reason}"
        self.m.log.append(message)
        log.info("dom%d: %s", self.m.dom.domid, message)
        self.m.shadow.drop_leaves(gpfn)
        self.m.flush_tlb()
        self.m.uc.ctl_flush_tb()  # type: ignore[attr-defined]  # in unicorn 2.1, not in its stubs


def _rel32(target: int, next_va: int) -> int:
    """``target - next_va`` as a signed 32-bit displacement (addresses wrap at 2**64)."""
    d = (target - next_va) & 0xFFFF_FFFF_FFFF_FFFF
    if d >= 1 << 63:
        d -= 1 << 64
    if not -(1 << 31) <= d < 1 << 31:
        raise ValueError(f"{target:#x} is out of rel32 reach of {next_va:#x}")
    return d
