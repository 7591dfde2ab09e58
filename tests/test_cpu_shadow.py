"""The monitor's MMU and privilege pieces, one behaviour at a time (no guest kernel needed)."""

from __future__ import annotations

import struct
from collections import Counter

import pytest
import trio
from unicorn import x86_const as X

import pvio
from pvio.abi import PAGE_SIZE
from pvio.core.memory import GuestMemory
from pvio.cpu.monitor import GuestOS
from pvio.cpu.shadow import ERR_U, ERR_W, P2M, PTE_P, PTE_U, PTE_W, FramePool, ShadowError, ShadowPager

GUEST = 64


def _pager() -> tuple[GuestMemory, P2M, ShadowPager, Counter[str]]:
    mem = GuestMemory(256)
    counters: Counter[str] = Counter()
    p2m = P2M(mem, GUEST, FramePool(16, GUEST), counters, lazy=True)
    monitor_pool = FramePool(16 + GUEST, 100, stride=1)
    window_l3 = monitor_pool.take()
    return mem, p2m, ShadowPager(mem, p2m, monitor_pool, counters, window_l3), counters


def _entry(p2m: P2M, gpfn: int, index: int, value: int) -> None:
    p2m.write(gpfn * PAGE_SIZE + index * 8, struct.pack("<Q", value))


def _tables(p2m: P2M) -> int:
    """Guest tables L4=1, L3=2, L2=3, L1=4 mapping va 0x5000 -> guest frame 5 (user, writable)."""
    for gpfn in (1, 2, 3):
        _entry(p2m, gpfn, 0, (gpfn + 1) << 12 | PTE_P | PTE_W | PTE_U)
    _entry(p2m, 4, 5, 5 << 12 | PTE_P | PTE_W | PTE_U)
    _entry(p2m, 4, 4, 4 << 12 | PTE_P | PTE_W)  # the L1 maps itself (supervisor, writable)
    return 1 << 12


def test_the_p2m_is_not_the_identity_and_scrubs_on_first_touch() -> None:
    _mem, p2m, _shadow, counters = _pager()
    mfns = [p2m.mfn(g) for g in range(8)]
    assert mfns != list(range(8)) and len(set(mfns)) == 8
    assert all(16 <= m < 16 + GUEST for m in mfns)
    assert counters["mem.scrubbed"] == 8
    assert p2m.gpfn_of(mfns[3]) == 3
    with pytest.raises(ShadowError, match="outside the guest's 64 pages"):
        p2m.mfn(GUEST)


def test_a_hidden_fault_fills_the_shadow_and_a_true_one_does_not() -> None:
    _mem, p2m, pager, counters = _pager()
    cr3 = _tables(p2m)
    walk = pager.guest_walk(cr3, 0x5000)
    assert pager.guest_allows(walk, ERR_U | ERR_W)
    pager.fill(cr3, walk)
    assert counters["shadow.fills"] == 1 and counters["shadow.tables"] == 4
    assert not pager.guest_allows(pager.guest_walk(cr3, 0x6000), 0)  # not mapped: the guest's own fault


def test_guest_page_tables_are_mapped_read_only_in_the_shadow() -> None:
    mem, p2m, pager, _counters = _pager()
    cr3 = _tables(p2m)
    pager.fill(cr3, pager.guest_walk(cr3, 0x4000))  # the L1's own mapping of itself
    l1_shadow = pager.shadow_of(4, 1)
    leaf = struct.unpack("<Q", mem.read(l1_shadow * PAGE_SIZE + 4 * 8, 8))[0]
    assert leaf & PTE_P and not leaf & PTE_W  # the guest wanted it writable: it is a table
    assert (leaf >> 12) == p2m.mfn(4)


def test_a_guest_entry_naming_a_frame_outside_its_memory_is_refused() -> None:
    _mem, p2m, pager, _c = _pager()
    cr3 = _tables(p2m)
    _entry(p2m, 3, 1, (GUEST + 5) << 12 | PTE_P | PTE_W)
    with pytest.raises(ShadowError, match="outside the guest's 64 pages"):
        pager.guest_walk(cr3, 0x200000)


def test_a_guest_store_to_its_page_table_drops_the_shadow_entry() -> None:
    mem, p2m, pager, counters = _pager()
    cr3 = _tables(p2m)
    pager.fill(cr3, pager.guest_walk(cr3, 0x5000))
    l1_shadow = pager.shadow_of(4, 1)
    assert struct.unpack("<Q", mem.read(l1_shadow * PAGE_SIZE + 5 * 8, 8))[0] & PTE_P
    pager.guest_entry_written(4, 5)
    assert struct.unpack("<Q", mem.read(l1_shadow * PAGE_SIZE + 5 * 8, 8))[0] == 0
    assert counters["shadow.pt_writes"] == 1


async def test_popf_at_cpl_1_silently_keeps_if_the_popek_goldberg_hole(hv: pvio.Hypervisor) -> None:
    # popfq is sensitive (it writes IF) but not privileged: at CPL 1 it neither traps nor
    # changes IF.  Trap-and-emulate cannot see it; the translator rewrites it.
    kernel = GuestOS("trap")
    dom = hv.create_domain(kernel, name="popf")
    m = kernel.monitor

    stack = 0xC000  # frames the boot page tables map and do not use
    code = 0xA000
    m.p2m.write(code, b"\x6a\x02\x9d\xeb\xfe")  # push $2; popfq; jmp .
    for va in (code, stack - 8):
        walk = m.shadow.guest_walk(m.vcpu.cr3, va)
        m.shadow.fill(m.vcpu.cr3, walk)
    m.flush_tlb()
    m.uc.reg_write(X.UC_X86_REG_RSP, stack)
    m._set_vif(True)
    m.rip = code
    m.slice_insns = 3
    m._run_slice()
    assert m.rip == code + 3  # no trap: popfq ran
    assert m.uc.reg_read(X.UC_X86_REG_RFLAGS) & 0x200  # and IF is still set
    assert dom.counters["exits"] == 0
    await trio.lowlevel.checkpoint()
