"""Grant tables v1 (grant_table.h): zero-copy mappings, every check with its GNTST status, the
in-use bits that make revocation fail while mapped, batched copies, and domain destruction."""

from __future__ import annotations

import pytest

import pvio
from pvio.abi import (
    DOMID_SELF,
    GNTTAB_MAP_GRANT_REF,
    PAGE_SHIFT,
    GntSt,
    GnttabOp,
    GTF_permit_access,
    GTF_reading,
    GTF_readonly,
    GTF_writing,
    Hypercall,
)
from pvio.core.grant_table import GrantMapping
from tests.guests import Probe, boot, changes, settle

NR_REFS = 4 * 512  # a domain's default grant table: 4 frames of v1 entries


@pytest.fixture
async def a(hv: pvio.Hypervisor) -> Probe:
    return await boot(hv, Probe(), "a")


@pytest.fixture
async def b(hv: pvio.Hypervisor, a: Probe) -> Probe:
    return await boot(hv, Probe(), "b")


def shared_page(a: Probe, b: Probe, data: bytes = b"", readonly: bool = False) -> tuple[int, int]:
    """A page of a's, holding ``data``, granted to b: (gfn, ref)."""
    gfn = a.alloc_page()
    a.page(gfn)[: len(data)] = data
    return gfn, a.grant_access(b.domid, gfn, readonly=readonly)


def map_status(guest: Probe, domid: int, ref: int, readonly: bool = False) -> int:
    with pytest.raises(pvio.GrantStatusError) as info:
        guest.grant_map(domid, ref, readonly=readonly)
    return info.value.status


def map_calls(status: GntSt | None = None) -> dict[str, int]:
    """The counters one map_grant_ref of one element bumps on the caller."""
    c = {
        "exits": 1,
        "exits.hypercall": 1,
        "hypercalls": 1,
        "hypercalls.grant_table_op": 1,
        "hypercalls.grant_table_op.map_grant_ref": 1,
    }
    if status is None:
        return c | {"grant.maps": 1}
    return c | {"hypercall_errors": 1, f"hypercall_errors.{status.name}": 1}


# ---- mapping --------------------------------------------------------------------------------


async def test_rw_map_is_a_zero_copy_view_both_ways(hv: pvio.Hypervisor, a: Probe, b: Probe) -> None:
    gfn, ref = shared_page(a, b, b"from a")
    before = hv.snapshot()
    m = b.grant_map(a.domid, ref)
    assert changes(hv, before, b) == map_calls()
    assert (m.granter, m.grantee, m.ref, m.gfn, m.readonly) == (a.domain, b.domain, ref, gfn, False)
    assert bytes(m.view[:6]) == b"from a"
    a.page(gfn)[100:104] = b"late"
    assert bytes(m.view[100:104]) == b"late"
    m.view[200:206] = b"from b"
    assert bytes(a.page(gfn)[200:206]) == b"from b"


async def test_ro_map_sees_the_granters_writes_and_cannot_write(
    hv: pvio.Hypervisor, a: Probe, b: Probe
) -> None:
    gfn, ref = shared_page(a, b, b"ro data", readonly=True)
    m = b.grant_map(a.domid, ref, readonly=True)
    assert m.readonly and m.view.readonly
    assert bytes(m.view[:7]) == b"ro data"
    a.page(gfn)[0:2] = b"RO"
    assert bytes(m.view[:7]) == b"RO data"
    with pytest.raises(TypeError):
        m.view[0:1] = b"x"
    assert bytes(a.page(gfn)[:2]) == b"RO"


async def test_ro_map_of_a_rw_grant_is_allowed(hv: pvio.Hypervisor, a: Probe, b: Probe) -> None:
    _gfn, ref = shared_page(a, b)
    m = b.grant_map(a.domid, ref, readonly=True)
    assert m.view.readonly
    assert a.gnttab.flags(ref) == GTF_permit_access | GTF_reading


async def test_map_of_a_grant_to_self_through_domid_self(hv: pvio.Hypervisor, a: Probe) -> None:
    gfn = a.alloc_page()
    ref = a.grant_access(a.domid, gfn)
    m = a.grant_map(DOMID_SELF, ref)
    m.view[0:4] = b"self"
    assert bytes(a.page(gfn)[:4]) == b"self"


async def test_maps_in_one_batch_get_per_element_status_and_handle(
    hv: pvio.Hypervisor, a: Probe, b: Probe
) -> None:
    _gfn, ref = shared_page(a, b)
    flags = 0x2  # GNTMAP_host_map
    batch = b"".join(
        GNTTAB_MAP_GRANT_REF.pack(0, f, r, d, 0, 0, 0)
        for f, r, d in [
            (flags, ref, a.domid),
            (flags, NR_REFS, a.domid),
            (0, ref, a.domid),
            (flags, ref, 999),
        ]
    )
    before = hv.snapshot()
    rc, out = b.raw_hypercall(Hypercall.grant_table_op, GnttabOp.map_grant_ref, batch, 4)
    assert rc == 0
    results = [GNTTAB_MAP_GRANT_REF.unpack_from(out, i * 32)[4:6] for i in range(4)]
    handle = results[0][1]
    assert results == [
        (GntSt.okay, handle),
        (GntSt.bad_gntref, 0),
        (GntSt.general_error, 0),  # not a host mapping
        (GntSt.bad_domain, 0),
    ]
    assert list(b.domain.maptrack) == [handle]
    assert changes(hv, before, b) == {
        "exits": 1,
        "exits.hypercall": 1,
        "hypercalls": 1,
        "hypercalls.grant_table_op": 1,
        "hypercalls.grant_table_op.map_grant_ref": 1,
        "grant.maps": 1,
        "hypercall_errors": 3,
        "hypercall_errors.bad_gntref": 1,
        "hypercall_errors.general_error": 1,
        "hypercall_errors.bad_domain": 1,
    }


# ---- every map check and its status ---------------------------------------------------------


async def test_map_from_an_unknown_domain_is_bad_domain(hv: pvio.Hypervisor, a: Probe, b: Probe) -> None:
    before = hv.snapshot()
    assert map_status(b, 999, 8) == GntSt.bad_domain
    assert changes(hv, before, b) == map_calls(GntSt.bad_domain)


@pytest.mark.parametrize("ref", [NR_REFS, NR_REFS + 1, 2**32 - 1])
async def test_map_of_a_ref_outside_the_table_is_bad_gntref(
    hv: pvio.Hypervisor, a: Probe, b: Probe, ref: int
) -> None:
    before = hv.snapshot()
    assert map_status(b, a.domid, ref) == GntSt.bad_gntref
    assert changes(hv, before, b) == map_calls(GntSt.bad_gntref)


async def test_map_of_an_entry_that_does_not_permit_access_is_general_error(
    hv: pvio.Hypervisor, a: Probe, b: Probe
) -> None:
    before = hv.snapshot()
    assert map_status(b, a.domid, 100) == GntSt.general_error  # never granted: flags 0
    assert map_status(b, a.domid, NR_REFS - 1) == GntSt.general_error  # the last entry
    assert changes(hv, before, b)["hypercall_errors.general_error"] == 2


async def test_map_of_a_grant_to_another_domain_is_permission_denied(
    hv: pvio.Hypervisor, a: Probe, b: Probe
) -> None:
    ref = a.grant_access(0, a.alloc_page())
    before = hv.snapshot()
    assert map_status(b, a.domid, ref) == GntSt.permission_denied
    assert changes(hv, before, b) == map_calls(GntSt.permission_denied)
    assert a.gnttab.flags(ref) == GTF_permit_access  # untouched


async def test_rw_map_of_a_readonly_grant_is_permission_denied(
    hv: pvio.Hypervisor, a: Probe, b: Probe
) -> None:
    _gfn, ref = shared_page(a, b, readonly=True)
    before = hv.snapshot()
    assert map_status(b, a.domid, ref) == GntSt.permission_denied
    assert changes(hv, before, b) == map_calls(GntSt.permission_denied)
    assert a.gnttab.flags(ref) == GTF_permit_access | GTF_readonly


async def test_map_of_a_frame_outside_the_granters_memory_is_bad_page(
    hv: pvio.Hypervisor, a: Probe, b: Probe
) -> None:
    ref = a.grant_access(b.domid, a.domain.mem.nr_pages)
    before = hv.snapshot()
    assert map_status(b, a.domid, ref) == GntSt.bad_page
    assert changes(hv, before, b) == map_calls(GntSt.bad_page)


async def test_unmap_of_a_bad_handle_is_bad_handle(hv: pvio.Hypervisor, a: Probe, b: Probe) -> None:
    before = hv.snapshot()
    with pytest.raises(pvio.GrantStatusError) as info:
        b.grant_unmap(12345)
    assert info.value.status == GntSt.bad_handle
    assert changes(hv, before, b) == {
        "exits": 1,
        "exits.hypercall": 1,
        "hypercalls": 1,
        "hypercalls.grant_table_op": 1,
        "hypercalls.grant_table_op.unmap_grant_ref": 1,
        "hypercall_errors": 1,
        "hypercall_errors.bad_handle": 1,
    }


async def test_unmap_twice_is_bad_handle_and_releases_the_view(
    hv: pvio.Hypervisor, a: Probe, b: Probe
) -> None:
    _gfn, ref = shared_page(a, b)
    m = b.grant_map(a.domid, ref)
    b.grant_unmap(m)
    assert b.domain.counters["grant.unmaps"] == 1
    with pytest.raises(ValueError):
        m.view[0]  # released: no access through a stale mapping
    with pytest.raises(pvio.GrantStatusError) as info:
        b.grant_unmap(m)
    assert info.value.status == GntSt.bad_handle


async def test_a_third_domain_cannot_unmap_b_s_handle(hv: pvio.Hypervisor, a: Probe, b: Probe) -> None:
    _gfn, ref = shared_page(a, b)
    m = b.grant_map(a.domid, ref)
    with pytest.raises(pvio.GrantStatusError) as info:
        a.grant_unmap(m.handle)
    assert info.value.status == GntSt.bad_handle
    assert m.handle in b.domain.maptrack


# ---- in-use bits and revocation -------------------------------------------------------------


async def test_mapping_sets_reading_and_writing_until_unmapped(
    hv: pvio.Hypervisor, a: Probe, b: Probe
) -> None:
    _gfn, ref = shared_page(a, b)
    m = b.grant_map(a.domid, ref)
    assert a.gnttab.flags(ref) == GTF_permit_access | GTF_reading | GTF_writing
    b.grant_unmap(m)
    assert a.gnttab.flags(ref) == GTF_permit_access


async def test_in_use_bits_follow_the_last_mapping_of_each_kind(
    hv: pvio.Hypervisor, a: Probe, b: Probe
) -> None:
    _gfn, ref = shared_page(a, b)
    rw = b.grant_map(a.domid, ref)
    ro = b.grant_map(a.domid, ref, readonly=True)
    b.grant_unmap(rw)
    assert a.gnttab.flags(ref) == GTF_permit_access | GTF_reading
    b.grant_unmap(ro)
    assert a.gnttab.flags(ref) == GTF_permit_access


async def test_revoke_while_mapped_fails_and_leaves_the_flags(
    hv: pvio.Hypervisor, a: Probe, b: Probe
) -> None:
    _gfn, ref = shared_page(a, b, readonly=True)
    m = b.grant_map(a.domid, ref, readonly=True)
    flags = a.gnttab.flags(ref)
    assert flags == GTF_permit_access | GTF_readonly | GTF_reading
    free = a.gnttab.free_count
    assert a.end_access(ref) is False
    assert a.gnttab.flags(ref) == flags
    assert a.gnttab.free_count == free  # the ref stays owned by the grant
    b.grant_unmap(m)
    assert a.end_access(ref) is True
    assert a.gnttab.flags(ref) == 0
    assert a.gnttab.free_count == free + 1
    assert map_status(b, a.domid, ref) == GntSt.general_error


async def test_revoking_twice_frees_the_ref_once(hv: pvio.Hypervisor, a: Probe, b: Probe) -> None:
    gfn, ref = shared_page(a, b)
    free = a.gnttab.free_count
    assert a.end_access(ref) is True
    assert a.end_access(ref) is True  # nothing left to revoke
    assert a.gnttab.free_count == free + 1
    refs = {a.grant_access(b.domid, gfn) for _ in range(2)}
    assert len(refs) == 2  # never the same ref for two live grants


# ---- grant copy -----------------------------------------------------------------------------


async def test_copy_batch_gives_each_element_its_own_status(hv: pvio.Hypervisor, a: Probe, b: Probe) -> None:
    a_gfn, ref = shared_page(a, b, bytes(range(64)))
    _ro_gfn, ro_ref = shared_page(a, b, b"ro", readonly=True)
    b_gfn = b.alloc_page()
    b.page(b_gfn)[100:108] = b"B->A....."[:8]
    bad_gfn = b.domain.mem.nr_pages
    ops = [
        ((True, ref, a.domid, 0), (False, b_gfn, DOMID_SELF, 0), 16),  # 0 okay: 16 bytes a -> b
        ((True, NR_REFS, a.domid, 0), (False, b_gfn, DOMID_SELF, 0), 4),  # 1 bad_gntref
        ((False, b_gfn, DOMID_SELF, 4000), (True, ref, a.domid, 0), 200),  # 2 crosses a page
        ((False, b_gfn, b.domid, 100), (True, ref, a.domid, 1000), 8),  # 3 okay: 8 bytes b -> a
        ((True, ref, 999, 0), (False, b_gfn, DOMID_SELF, 0), 4),  # 4 bad_domain
        ((False, b_gfn, DOMID_SELF, 0), (True, ro_ref, a.domid, 0), 2),  # 5 write via a ro grant
        ((False, a_gfn, a.domid, 0), (False, b_gfn, DOMID_SELF, 2000), 4),  # 6 a's frame, no grant
        ((False, bad_gfn, DOMID_SELF, 0), (True, ref, a.domid, 0), 4),  # 7 bad_page
        ((True, 100, a.domid, 0), (False, b_gfn, DOMID_SELF, 0), 4),  # 8 entry not permit_access
    ]
    before = hv.snapshot()
    statuses = b.grant_copy(ops)
    assert statuses == [
        GntSt.okay,
        GntSt.bad_gntref,
        GntSt.bad_copy_arg,
        GntSt.okay,
        GntSt.bad_domain,
        GntSt.permission_denied,
        GntSt.permission_denied,
        GntSt.bad_page,
        GntSt.general_error,
    ]
    assert bytes(b.page(b_gfn)[:16]) == bytes(range(16))
    assert bytes(a.page(a_gfn)[1000:1008]) == b"B->A...."
    assert bytes(a.page(a_gfn)[16:64]) == bytes(range(16, 64))
    assert bytes(b.page(b_gfn)[2000:2004]) == bytes(4)
    assert changes(hv, before, b) == {
        "exits": 1,
        "exits.hypercall": 1,
        "hypercalls": 1,
        "hypercalls.grant_table_op": 1,
        "hypercalls.grant_table_op.copy": 1,
        "grant.copies": 2,
        "grant.copy_bytes": 24,
        "hypercall_errors": 7,
        "hypercall_errors.bad_gntref": 1,
        "hypercall_errors.bad_copy_arg": 1,
        "hypercall_errors.bad_domain": 1,
        "hypercall_errors.permission_denied": 2,
        "hypercall_errors.bad_page": 1,
        "hypercall_errors.general_error": 1,
    }
    assert changes(hv, before, a) == {}  # copies pin nothing and cost the granter nothing
    assert a.gnttab.flags(ref) == GTF_permit_access


@pytest.mark.parametrize(
    ("src_off", "dst_off", "length"),
    [(4096 - 7, 0, 8), (0, 4096 - 7, 8), (0, 0, 4097), (4096, 0, 1)],
    ids=["source", "dest", "too-long", "source-offset-at-end"],
)
async def test_copy_crossing_a_page_is_bad_copy_arg(
    hv: pvio.Hypervisor, a: Probe, b: Probe, src_off: int, dst_off: int, length: int
) -> None:
    _gfn, ref = shared_page(a, b, b"x" * 4096)
    b_gfn = b.alloc_page()
    before = hv.snapshot()
    ops = [((True, ref, a.domid, src_off), (False, b_gfn, DOMID_SELF, dst_off), length)]
    assert b.grant_copy(ops) == [GntSt.bad_copy_arg]
    assert bytes(b.page(b_gfn)) == bytes(4096)
    assert changes(hv, before, b)["hypercall_errors.bad_copy_arg"] == 1


async def test_copy_to_the_last_byte_of_a_page_is_fine(hv: pvio.Hypervisor, a: Probe, b: Probe) -> None:
    _gfn, ref = shared_page(a, b, b"x" * 4096)
    b_gfn = b.alloc_page()
    assert b.grant_copy([((True, ref, a.domid, 4088), (False, b_gfn, DOMID_SELF, 4088), 8)]) == [GntSt.okay]
    assert bytes(b.page(b_gfn)[4088:]) == b"x" * 8


@pytest.mark.parametrize(
    "src",
    [(True, 7, 999, 0), (True, NR_REFS, 1, 0), (False, 10**6, DOMID_SELF, 0), (False, 16, DOMID_SELF, 65535)],
    ids=["bad-domain", "bad-ref", "bad-frame", "offset-past-the-page"],
)
async def test_zero_length_copy_is_ignored_entirely(
    hv: pvio.Hypervisor, a: Probe, b: Probe, src: tuple[bool, int, int, int]
) -> None:
    b_gfn = b.alloc_page()
    before = hv.snapshot()
    assert b.grant_copy([(src, (False, b_gfn, DOMID_SELF, 0), 0)]) == [GntSt.okay]
    got = changes(hv, before, b)
    assert "hypercall_errors" not in got
    assert (got["grant.copies"], got.get("grant.copy_bytes", 0)) == (1, 0)


async def test_copy_from_another_domains_frame_without_a_grant_is_permission_denied(
    hv: pvio.Hypervisor, a: Probe, b: Probe
) -> None:
    a_gfn = a.alloc_page()
    a.page(a_gfn)[:6] = b"secret"
    b_gfn = b.alloc_page()
    ops = [
        ((False, a_gfn, a.domid, 0), (False, b_gfn, DOMID_SELF, 0), 6),
        ((False, b_gfn, DOMID_SELF, 0), (False, a_gfn, a.domid, 0), 6),
    ]
    assert b.grant_copy(ops) == [GntSt.permission_denied] * 2
    assert bytes(b.page(b_gfn)[:6]) == bytes(6)
    assert bytes(a.page(a_gfn)[:6]) == b"secret"


async def test_copy_with_a_grant_to_another_domain_is_permission_denied(
    hv: pvio.Hypervisor, a: Probe, b: Probe
) -> None:
    ref = a.grant_access(0, a.alloc_page())
    b_gfn = b.alloc_page()
    assert b.grant_copy([((True, ref, a.domid, 0), (False, b_gfn, DOMID_SELF, 0), 4)]) == [
        GntSt.permission_denied
    ]


async def test_copy_batch_outside_guest_memory_is_efault(hv: pvio.Hypervisor, a: Probe, b: Probe) -> None:
    end = b.domain.mem.nr_pages << PAGE_SHIFT
    before = hv.snapshot()
    assert b.hypercall(Hypercall.grant_table_op, GnttabOp.copy, end - 40, 2) == -pvio.abi.Errno.EFAULT
    got = changes(hv, before, b)
    assert (got["hypercall_errors.EFAULT"], got.get("grant.copies", 0)) == (1, 0)


# ---- destruction ----------------------------------------------------------------------------


async def test_destroying_the_granter_revokes_the_grantees_mapping(
    hv: pvio.Hypervisor, a: Probe, b: Probe
) -> None:
    _gfn, ref = shared_page(a, b, b"soon gone")
    m: GrantMapping = b.grant_map(a.domid, ref)
    before = hv.snapshot()
    hv.destroy(a.domain)
    await settle()
    assert b.domain.maptrack == {}
    with pytest.raises(ValueError):
        bytes(m.view)
    assert changes(hv, before, b) == {"grant.revoked_by_destroy": 1}
    with pytest.raises(pvio.GrantStatusError) as info:
        b.grant_unmap(m)
    assert info.value.status == GntSt.bad_handle


async def test_destroying_the_grantee_unpins_so_the_granter_can_revoke(
    hv: pvio.Hypervisor, a: Probe, b: Probe
) -> None:
    _gfn, ref = shared_page(a, b)
    b.grant_map(a.domid, ref)
    b.grant_map(a.domid, ref, readonly=True)
    hv.destroy(b.domain)
    assert a.domain.mapped_by_others == {}
    assert a.gnttab.flags(ref) == GTF_permit_access
    assert a.end_access(ref) is True


async def test_map_from_a_destroyed_domain_is_bad_domain(hv: pvio.Hypervisor, a: Probe, b: Probe) -> None:
    _gfn, ref = shared_page(a, b)
    hv.destroy(a.domain)
    assert map_status(b, a.domid, ref) == GntSt.bad_domain
