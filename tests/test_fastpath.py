"""The C grant-copy fast path equals the Python reference, element for element.

A batch of random gnttab_copy elements — good and bad references, frames, domids,
offsets, lengths, read-only grants — runs once through ``pvio.core.grant_table.copy_one``
(the reference) and once through ``pvio/native/gnttab.c`` on the same memory; statuses,
every byte of both domains' RAM and the counters must be identical.
"""

from __future__ import annotations

import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pvio
from pvio.abi import DOMID_SELF, GNTTAB_COPY, GnttabOp, Hypercall
from pvio.core import fastpath
from tests.guests import Probe, boot

COUNT_KEYS = ("grant.copies", "grant.copy_bytes", "hypercall_errors")


def _element(draw: st.DrawFn, refs: list[int], frames: int) -> bytes:
    def side() -> tuple[int, int, int, int]:
        is_gref = draw(st.booleans())
        if is_gref:
            ref = draw(st.sampled_from([*refs, *refs, 0, 5, 3000, 2**40, refs[0] | 0xDEAD << 32]))
            domid = draw(st.sampled_from([2, 2, 2, 1, 7, DOMID_SELF]))
        else:
            ref = draw(st.sampled_from([20, 21, 20, 21, frames - 1, frames, 2**40]))
            domid = draw(st.sampled_from([DOMID_SELF, DOMID_SELF, 1, 2]))
        offset = draw(st.sampled_from([0, 0, 1, 100, 100, 4000, 4095, 4096, 65535]))
        return int(is_gref), ref, domid, offset

    s, d = side(), side()
    length = draw(st.sampled_from([0, 1, 96, 96, 96, 4096, 4097]))
    flags = s[0] | (d[0] << 1)
    return GNTTAB_COPY.pack(s[1], s[2], s[3], d[1], d[2], d[3], length, flags, 0)


@st.composite
def batches(draw: st.DrawFn, refs: list[int], frames: int) -> bytes:
    n = draw(st.integers(1, 12))
    return b"".join(_element(draw, refs, frames) for _ in range(n))


async def test_fast_path_equals_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    async with pvio.Hypervisor() as hv:
        a = await boot(hv, Probe(), "a")  # dom1: the caller
        b = await boot(hv, Probe(), "b")  # dom2: grants pages to dom1
        frames = a.domain.mem.nr_pages
        pages = [b.alloc_page() for _ in range(3)]
        for i, gfn in enumerate(pages):
            b.page(gfn)[:] = bytes([i + 1]) * 4096
        refs = [
            b.grant_access(1, pages[0]),
            b.grant_access(1, pages[1], readonly=True),
            b.grant_access(3, pages[2]),  # granted to someone else
        ]
        for gfn in (20, 21):
            a.page(gfn)[:] = bytes([0xA0 | gfn & 0xF]) * 4096
        gpa = a.arg_gpa()

        @settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
        @given(batch=batches(refs, frames))
        def check(batch: bytes) -> None:
            mems = (a.domain.mem.mmap, b.domain.mem.mmap)
            start = [bytes(m) for m in mems]
            results = []
            for native in (False, True):
                for m, image in zip(mems, start, strict=True):
                    m[:] = image
                a.mem[gpa : gpa + len(batch)] = batch
                monkeypatch.setattr(fastpath, "ENABLED", native)
                before = dict(a.domain.counters)
                rc = a.hypercall(Hypercall.grant_table_op, GnttabOp.copy, gpa, len(batch) // 40)
                statuses = [
                    struct.unpack_from("<h", a.mem, gpa + i * 40 + 36)[0] for i in range(len(batch) // 40)
                ]
                delta = {
                    k: v - before.get(k, 0)
                    for k, v in a.domain.counters.items()
                    if k.startswith(COUNT_KEYS) and v != before.get(k, 0)
                }
                results.append((rc, statuses, delta, [bytes(m) for m in mems]))
            assert results[0] == results[1]

        check()


@pytest.mark.parametrize("native", [False, True])
async def test_a_grant_reference_is_the_low_32_bits_of_the_union(
    monkeypatch: pytest.MonkeyPatch, native: bool
) -> None:
    """Xen reads a gref side as ``u.ref`` (grant_ref_t, 32 bits of the 64-bit union): junk a
    guest leaves in the upper bytes does not matter; a frame side uses all 64 bits."""
    monkeypatch.setattr(fastpath, "ENABLED", native)
    async with pvio.Hypervisor() as hv:
        a = await boot(hv, Probe(), "a")
        b = await boot(hv, Probe(), "b")
        page = b.alloc_page()
        b.page(page)[:] = b"\x5a" * 4096
        ref = b.grant_access(1, page)
        junk = 0xDEADBEEF << 32
        gpa = a.arg_gpa()
        ops = [
            GNTTAB_COPY.pack(ref | junk, 2, 0, 20, DOMID_SELF, 0, 64, 1, 0),  # gref source: ok
            GNTTAB_COPY.pack(20 | junk, DOMID_SELF, 0, 21, DOMID_SELF, 0, 64, 0, 0),  # gfn: bad_page
        ]
        a.mem[gpa : gpa + 80] = b"".join(ops)
        assert a.hypercall(Hypercall.grant_table_op, GnttabOp.copy, gpa, 2) == 0
        statuses = [struct.unpack_from("<h", a.mem, gpa + i * 40 + 36)[0] for i in range(2)]
        assert statuses == [0, -9]  # GNTST_okay, GNTST_bad_page
        assert bytes(a.page(20)[:64]) == b"\x5a" * 64
