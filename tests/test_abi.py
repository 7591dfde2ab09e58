"""pvio.abi against Xen's public headers: hypercall numbers, errnos, GNTST codes, struct layouts.

Each struct is checked by packing distinct marker values and reading every field back at the
offset and width Xen's headers give, so a field that moved, shrank or
changed signedness fails here before any guest misreads it.
"""

from __future__ import annotations

import struct

import pytest

from pvio import abi
from pvio.abi import Errno, EvtchnOp, EvtchnStat, GntSt, GnttabOp, Hypercall, SchedOp, ShutdownReason

_MARKERS = {"B": 0xA5, "H": 0xBEEF, "h": -0x1234, "I": 0xDEADBEEF, "Q": 0x0102030405060708}


def check_layout(st: struct.Struct, size: int, fields: list[tuple[int, str]]) -> None:
    """``st`` is ``size`` bytes and packs its fields, in order, at ``fields`` = [(offset, fmt)]."""
    assert st.size == size
    values = [_MARKERS[fmt] + (i if fmt != "h" else -i) for i, (_off, fmt) in enumerate(fields)]
    blob = st.pack(*values)  # also fails if the struct has a different number of fields
    for (off, fmt), value in zip(fields, values, strict=True):
        assert struct.unpack_from("<" + fmt, blob, off)[0] == value, f"field at offset {off}"
    assert st.unpack(blob) == tuple(values)


# ---- hypercalls, errnos, sub-ops -----------------------------------


def test_hypercall_numbers_match_xen_h() -> None:
    assert {h.name: h.value for h in Hypercall} == {
        "set_trap_table": 0,
        "mmu_update": 1,
        "stack_switch": 3,
        "set_callbacks": 4,
        "sched_op_compat": 6,
        "memory_op": 12,
        "multicall": 13,
        "set_timer_op": 15,
        "xen_version": 17,
        "console_io": 18,
        "grant_table_op": 20,
        "vm_assist": 21,
        "iret": 23,
        "vcpu_op": 24,
        "mmuext_op": 26,
        "sched_op": 29,
        "callback_op": 30,
        "event_channel_op": 32,
    }


def test_errno_values_are_the_x86_linux_ones() -> None:
    assert {e.name: e.value for e in Errno} == {
        "EPERM": 1,
        "ENOENT": 2,
        "ESRCH": 3,
        "EIO": 5,
        "E2BIG": 7,
        "EAGAIN": 11,
        "ENOMEM": 12,
        "EACCES": 13,
        "EFAULT": 14,
        "EBUSY": 16,
        "EEXIST": 17,
        "EINVAL": 22,
        "ENOSPC": 28,
        "ENOSYS": 38,
    }


def test_sched_op_commands_and_shutdown_reasons() -> None:
    assert [(c.name, c.value) for c in SchedOp] == [("yield_", 0), ("block", 1), ("shutdown", 2), ("poll", 3)]
    assert {r.name: r.value for r in ShutdownReason} == {
        "poweroff": 0,
        "reboot": 1,
        "suspend": 2,
        "crash": 3,
        "watchdog": 4,
    }
    check_layout(abi.SCHED_SHUTDOWN, 4, [(0, "I")])


def test_console_and_callback_constants() -> None:
    assert (abi.CONSOLEIO_write, abi.CONSOLEIO_read) == (0, 1)
    assert (abi.CALLBACKTYPE_event, abi.CALLBACKTYPE_failsafe, abi.CALLBACKTYPE_syscall) == (0, 1, 2)
    assert abi.CALLBACKOP_register == 0
    check_layout(abi.CALLBACK_REGISTER, 16, [(0, "H"), (2, "H"), (8, "Q")])


def test_domid_self_and_page_size() -> None:
    assert abi.DOMID_SELF == abi.DOMID_FIRST_RESERVED == 0x7FF0
    assert abi.PAGE_SIZE == 4096 == 1 << abi.PAGE_SHIFT


# ---- event channels --------------------------------------------------------------


def test_event_channel_op_commands() -> None:
    assert {op.name: op.value for op in EvtchnOp} == {
        "bind_interdomain": 0,
        "bind_virq": 1,
        "bind_pirq": 2,
        "close": 3,
        "send": 4,
        "status": 5,
        "alloc_unbound": 6,
        "bind_ipi": 7,
        "bind_vcpu": 8,
        "unmask": 9,
        "reset": 10,
    }


def test_evtchn_stat_values() -> None:
    assert {s.name: s.value for s in EvtchnStat} == {
        "closed": 0,
        "unbound": 1,
        "interdomain": 2,
        "pirq": 3,
        "virq": 4,
        "ipi": 5,
    }


def test_evtchn_alloc_unbound_is_8_bytes_dom_remote_dom_port() -> None:
    check_layout(abi.EVTCHN_ALLOC_UNBOUND, 8, [(0, "H"), (2, "H"), (4, "I")])


def test_evtchn_bind_interdomain_is_12_bytes_with_remote_port_at_4() -> None:
    check_layout(abi.EVTCHN_BIND_INTERDOMAIN, 12, [(0, "H"), (4, "I"), (8, "I")])


def test_evtchn_bind_virq_is_12_bytes_virq_vcpu_port() -> None:
    check_layout(abi.EVTCHN_BIND_VIRQ, 12, [(0, "I"), (4, "I"), (8, "I")])


def test_evtchn_port_struct_is_4_bytes() -> None:
    check_layout(abi.EVTCHN_PORT, 4, [(0, "I")])


def test_evtchn_status_is_24_bytes_with_the_interdomain_union_dom_at_16_port_at_20() -> None:
    # dom, port, status(out), vcpu(out), u.interdomain {dom u16, port u32} (also u.unbound.dom)
    check_layout(abi.EVTCHN_STATUS, 24, [(0, "H"), (4, "I"), (8, "I"), (12, "I"), (16, "H"), (20, "I")])


def test_two_level_abi_has_4096_ports_in_64_bit_words() -> None:
    assert abi.EVTCHN_2L_NR_CHANNELS == 4096 == abi.BITS_PER_WORD**2
    assert abi.BITS_PER_WORD == 64


def test_virq_numbers() -> None:
    assert (abi.VIRQ_TIMER, abi.VIRQ_CONSOLE, abi.NR_VIRQS) == (0, 2, 24)


def test_shared_info_offsets() -> None:
    assert abi.SHARED_INFO_VCPU_INFO == 0
    assert abi.LEGACY_MAX_VCPUS * abi.VCPU_INFO_SIZE == 2048 == abi.SHARED_INFO_EVTCHN_PENDING
    assert abi.SHARED_INFO_EVTCHN_MASK == 2560 == 2048 + 64 * 8
    assert abi.SHARED_INFO_WC_VERSION == 3072 == 2560 + 64 * 8
    assert abi.SHARED_INFO_SIZE == 3136


def test_vcpu_info_fields() -> None:
    assert abi.VCPU_INFO_SIZE == 64
    assert (abi.VCPU_UPCALL_PENDING, abi.VCPU_UPCALL_MASK, abi.VCPU_PENDING_SEL) == (0, 1, 8)
    assert abi.VCPU_TIME_INFO == 32


# ---- grant tables ----------------------------------------------------------------------


def test_grant_table_op_commands() -> None:
    assert {op.name: op.value for op in GnttabOp} == {
        "map_grant_ref": 0,
        "unmap_grant_ref": 1,
        "setup_table": 2,
        "dump_table": 3,
        "transfer": 4,
        "copy": 5,
        "query_size": 6,
        "unmap_and_replace": 7,
        "set_version": 8,
        "get_status_frames": 9,
        "get_version": 10,
    }


def test_gntst_codes() -> None:
    assert [(s.name, s.value) for s in GntSt] == [
        ("okay", 0),
        ("general_error", -1),
        ("bad_domain", -2),
        ("bad_gntref", -3),
        ("bad_handle", -4),
        ("bad_virt_addr", -5),
        ("bad_dev_addr", -6),
        ("no_device_space", -7),
        ("permission_denied", -8),
        ("bad_page", -9),
        ("bad_copy_arg", -10),
        ("address_too_big", -11),
        ("eagain", -12),
        ("no_space", -13),
    ]


def test_grant_entry_v1_is_8_bytes_flags_domid_frame() -> None:
    check_layout(abi.GRANT_ENTRY_V1, 8, [(0, "H"), (2, "H"), (4, "I")])
    assert abi.GRANT_ENTRIES_PER_FRAME == 512
    assert abi.GNTTAB_NR_RESERVED_ENTRIES == 8
    assert (abi.GNTTAB_RESERVED_CONSOLE, abi.GNTTAB_RESERVED_XENSTORE) == (0, 1)


def test_grant_entry_flags() -> None:
    types = (abi.GTF_invalid, abi.GTF_permit_access, abi.GTF_accept_transfer, abi.GTF_transitive)
    assert types == (0, 1, 2, 3)
    assert abi.GTF_type_mask == 0x3
    assert (abi.GTF_readonly, abi.GTF_reading, abi.GTF_writing) == (1 << 2, 1 << 3, 1 << 4)


def test_gntmap_and_gntcopy_flags() -> None:
    assert (abi.GNTMAP_device_map, abi.GNTMAP_host_map, abi.GNTMAP_readonly) == (0x1, 0x2, 0x4)
    assert (abi.GNTMAP_application_map, abi.GNTMAP_contains_pte) == (0x8, 0x10)
    assert (abi.GNTCOPY_source_gref, abi.GNTCOPY_dest_gref) == (0x1, 0x2)


def test_gnttab_map_grant_ref_is_32_bytes_status_at_18_handle_at_20() -> None:
    check_layout(
        abi.GNTTAB_MAP_GRANT_REF,
        32,
        [(0, "Q"), (8, "I"), (12, "I"), (16, "H"), (18, "h"), (20, "I"), (24, "Q")],
    )


def test_gnttab_unmap_grant_ref_is_24_bytes_handle_at_16_status_at_20() -> None:
    check_layout(abi.GNTTAB_UNMAP_GRANT_REF, 24, [(0, "Q"), (8, "Q"), (16, "I"), (20, "h")])


def test_gnttab_copy_is_40_bytes_dest_at_16_len_32_flags_34_status_36() -> None:
    check_layout(
        abi.GNTTAB_COPY,
        40,
        # source {ref|gmfn u64, domid, offset}, dest {...} at 16, len, flags, status
        [(0, "Q"), (8, "H"), (10, "H"), (16, "Q"), (24, "H"), (26, "H"), (32, "H"), (34, "H"), (36, "h")],
    )
    assert abi.GNTTAB_COPY_STATUS_OFFSET == 36


@pytest.mark.parametrize(
    ("st", "size", "fields"),
    [
        (abi.GNTTAB_SETUP_TABLE, 24, [(0, "H"), (4, "I"), (8, "h"), (16, "Q")]),
        (abi.GNTTAB_QUERY_SIZE, 16, [(0, "H"), (4, "I"), (8, "I"), (12, "h")]),
    ],
    ids=["setup_table", "query_size"],
)
def test_gnttab_setup_table_and_query_size_layouts(
    st: struct.Struct, size: int, fields: list[tuple[int, str]]
) -> None:
    check_layout(st, size, fields)


# ---- start_info (docs/abi.md) ----------------------------------


def test_start_info_offsets() -> None:
    assert abi.START_INFO_MAGIC == b"xen-3.0-x86_64"
    assert (abi.SI_MAGIC, abi.SI_NR_PAGES, abi.SI_SHARED_INFO, abi.SI_FLAGS) == (0, 32, 40, 48)
    assert (abi.SI_STORE_MFN, abi.SI_STORE_EVTCHN) == (56, 64)
    assert (abi.SI_CONSOLE_MFN, abi.SI_CONSOLE_EVTCHN) == (72, 80)
    assert abi.SI_CMD_LINE == 128
    assert (abi.SIF_PRIVILEGED, abi.SIF_INITDOMAIN) == (1, 2)


def test_pvio_start_info_extension_layout() -> None:
    assert abi.PVIO_SI_EXT == 2048
    assert abi.PVIO_SI_MAGIC == b"PVIO"
    st = abi.PVIO_SI_EXT_STRUCT
    assert st.size == 40
    blob = st.pack(b"PVIO", 0xBEEF, 0xCAFE, 1, 2, 3, 4)
    assert blob[0:4] == b"PVIO"
    assert struct.unpack_from("<HHQQQQ", blob, 4) == (0xBEEF, 0xCAFE, 1, 2, 3, 4)
