"""Xen ABI numbers and byte layouts the hypervisor and guests share (x86_64).

Every value here is Xen's (see ``docs/`` and the fact sheet the project was built from),
except the block marked *pvio-specific*, which documents pvio's own start-of-day
extension.  Each layout is defined once, as a :class:`struct.Struct` or an offset
constant, and ``tests/test_abi.py`` checks the sizes and offsets.
"""

from __future__ import annotations

import struct
from enum import IntEnum

PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT

DOMID_SELF = 0x7FF0
DOMID_FIRST_RESERVED = 0x7FF0


# --------------------------------------------------------------------------- hypercalls
class Hypercall(IntEnum):
    """Hypercall numbers (xen.h)."""

    set_trap_table = 0
    mmu_update = 1
    set_callbacks = 4
    sched_op_compat = 6
    memory_op = 12
    set_timer_op = 15
    xen_version = 17
    console_io = 18
    grant_table_op = 20
    vm_assist = 21
    iret = 23
    vcpu_op = 24
    sched_op = 29
    callback_op = 30
    event_channel_op = 32


class Errno(IntEnum):
    """Xen errno values (x86: equal to Linux's); hypercalls return them negated."""

    EPERM = 1
    ENOENT = 2
    ESRCH = 3
    E2BIG = 7
    EAGAIN = 11
    ENOMEM = 12
    EACCES = 13
    EFAULT = 14
    EBUSY = 16
    EEXIST = 17
    EINVAL = 22
    ENOSPC = 28
    ENOSYS = 38


# --------------------------------------------------------------------------- event channels
class EvtchnOp(IntEnum):
    """EVTCHNOP_* commands of event_channel_op."""

    bind_interdomain = 0
    bind_virq = 1
    bind_pirq = 2
    close = 3
    send = 4
    status = 5
    alloc_unbound = 6
    bind_ipi = 7
    bind_vcpu = 8
    unmask = 9
    reset = 10


class EvtchnStat(IntEnum):
    """EVTCHNSTAT_* channel states, as event_channel_op(status) reports them."""

    closed = 0
    unbound = 1
    interdomain = 2
    pirq = 3
    virq = 4
    ipi = 5


VIRQ_TIMER = 0
VIRQ_CONSOLE = 2
NR_VIRQS = 24

#: Ports in the 2-level ABI on 64-bit: sizeof(long)**2 * 64.
EVTCHN_2L_NR_CHANNELS = 4096
BITS_PER_WORD = 64

# Argument structs of event_channel_op (the out fields are written back in place).
EVTCHN_ALLOC_UNBOUND = struct.Struct("<HHI")  # dom @0, remote_dom @2, port(out) @4: 8 B
EVTCHN_BIND_INTERDOMAIN = struct.Struct("<H2xII")  # remote_dom @0, remote_port @4, local_port(out) @8: 12 B
EVTCHN_BIND_VIRQ = struct.Struct("<III")  # virq @0, vcpu @4, port(out) @8: 12 B
EVTCHN_PORT = struct.Struct("<I")  # close / send / unmask: {port}: 4 B
# status: dom @0, port @4, status(out) @8, vcpu(out) @12, union(out) @16: 24 B; the union is
# unbound {dom u16 @16}, interdomain {dom u16 @16, port u32 @20}, virq u32 @16.
EVTCHN_STATUS = struct.Struct("<H2xIIIH2xI")

# shared_info page (x86_64): vcpu_info[32] at 0 (64 B each), then the 2-level bitmaps.
SHARED_INFO_VCPU_INFO = 0
VCPU_INFO_SIZE = 64
VCPU_UPCALL_PENDING = 0  # u8
VCPU_UPCALL_MASK = 1  # u8
VCPU_PENDING_SEL = 8  # u64 (xen_ulong_t)
VCPU_TIME_INFO = 32  # vcpu_time_info, 32 B
SHARED_INFO_EVTCHN_PENDING = 2048  # u64[64]
SHARED_INFO_EVTCHN_MASK = 2560  # u64[64]
SHARED_INFO_WC_VERSION = 3072
SHARED_INFO_SIZE = 3136
LEGACY_MAX_VCPUS = 32


# --------------------------------------------------------------------------- grant tables
class GnttabOp(IntEnum):
    """GNTTABOP_* commands of grant_table_op."""

    map_grant_ref = 0
    unmap_grant_ref = 1
    setup_table = 2
    dump_table = 3
    transfer = 4
    copy = 5
    query_size = 6
    unmap_and_replace = 7
    set_version = 8
    get_status_frames = 9
    get_version = 10


class GntSt(IntEnum):
    """GNTST_* per-operation status codes."""

    okay = 0
    general_error = -1
    bad_domain = -2
    bad_gntref = -3
    bad_handle = -4
    bad_virt_addr = -5
    bad_dev_addr = -6
    no_device_space = -7
    permission_denied = -8
    bad_page = -9
    bad_copy_arg = -10
    address_too_big = -11
    eagain = -12
    no_space = -13


GRANT_ENTRY_V1 = struct.Struct("<HHI")  # flags @0, domid @2, frame @4: 8 B
GRANT_ENTRIES_PER_FRAME = PAGE_SIZE // GRANT_ENTRY_V1.size  # 512
GNTTAB_NR_RESERVED_ENTRIES = 8
GNTTAB_RESERVED_CONSOLE = 0
GNTTAB_RESERVED_XENSTORE = 1

# grant entry flags
GTF_invalid = 0
GTF_permit_access = 1
GTF_accept_transfer = 2
GTF_transitive = 3
GTF_type_mask = 3
GTF_readonly = 1 << 2
GTF_reading = 1 << 3
GTF_writing = 1 << 4

# GNTMAP_* flags of map_grant_ref
GNTMAP_device_map = 0x1
GNTMAP_host_map = 0x2
GNTMAP_readonly = 0x4
GNTMAP_application_map = 0x8
GNTMAP_contains_pte = 0x10

# GNTCOPY_* flags of copy
GNTCOPY_source_gref = 0x1
GNTCOPY_dest_gref = 0x2

# host_addr @0, flags @8, ref @12, dom @16, status(out) @18, handle(out) @20, dev_bus_addr(out) @24: 32 B
GNTTAB_MAP_GRANT_REF = struct.Struct("<QIIHhIQ")
# host_addr @0, dev_bus_addr @8, handle @16, status(out) @20: 24 B
GNTTAB_UNMAP_GRANT_REF = struct.Struct("<QQIh2x")
# source {u64 ref|gmfn, domid u16, offset u16} @0, dest @16, len @32, flags @34, status(out) @36: 40 B
GNTTAB_COPY = struct.Struct("<QHH4xQHH4xHHh2x")
GNTTAB_COPY_STATUS_OFFSET = 36
# setup_table: dom @0, nr_frames @4, status(out) @8, frame_list handle (guest address) @16: 24 B
GNTTAB_SETUP_TABLE = struct.Struct("<H2xIh6xQ")
# query_size: dom @0, nr_frames(out) @4, max_nr_frames(out) @8, status(out) @12: 16 B
GNTTAB_QUERY_SIZE = struct.Struct("<H2xIIh2x")


# --------------------------------------------------------------------------- sched_op etc.
class SchedOp(IntEnum):
    """SCHEDOP_* commands of sched_op."""

    yield_ = 0
    block = 1
    shutdown = 2
    poll = 3


class ShutdownReason(IntEnum):
    """SHUTDOWN_* reasons of SCHEDOP_shutdown."""

    poweroff = 0
    reboot = 1
    suspend = 2
    crash = 3
    watchdog = 4


CONSOLEIO_write = 0
CONSOLEIO_read = 1
CALLBACKTYPE_event = 0
CALLBACKTYPE_failsafe = 1
CALLBACKTYPE_syscall = 2
CALLBACKOP_register = 0
# callback_register: type u16 @0, flags u16 @2, address u64 @8: 16 B
CALLBACK_REGISTER = struct.Struct("<HH4xQ")
SCHED_SHUTDOWN = struct.Struct("<I")


# --------------------------------------------------------------------------- start_info
# Xen's x86_64 start_info_t (the fields pvio fills in), then a pvio-specific extension.
START_INFO_MAGIC = b"xen-3.0-x86_64"
SI_MAGIC = 0  # char[32]
SI_NR_PAGES = 32  # u64
SI_SHARED_INFO = 40  # u64: guest-physical address of the shared_info page
SI_FLAGS = 48  # u32 (SIF_PRIVILEGED = 1, SIF_INITDOMAIN = 2)
SI_STORE_MFN = 56  # u64: frame of the xenstore ring page
SI_STORE_EVTCHN = 64  # u32
SI_CONSOLE_MFN = 72  # u64
SI_CONSOLE_EVTCHN = 80  # u32
SI_CMD_LINE = 128  # char[1024]
SIF_PRIVILEGED = 1
SIF_INITDOMAIN = 2

# *pvio-specific*: at offset 2048 of the start_info page, after Xen's fields.
#   magic u32 "PVIO" @2048, domid u16 @2052, gnttab frames u16 @2054,
#   first grant-table frame u64 @2056, hypercall page frame u64 @2064,
#   first free frame u64 @2072 (frames below belong to the image and the special pages),
#   last free frame (exclusive) u64 @2080.
PVIO_SI_EXT = 2048
PVIO_SI_EXT_STRUCT = struct.Struct("<4sHHQQQQ")
PVIO_SI_MAGIC = b"PVIO"
