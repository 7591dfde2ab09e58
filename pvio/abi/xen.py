"""Xen ABI numbers and byte layouts the hypervisor and guests share (x86_64).

Every value here is Xen's (its public headers: ``xen.h``, ``event_channel.h``, ``grant_table.h``,
``vcpu.h``, ``io/xs_wire.h``, ``io/xenbus.h``),
except the block marked *pvio-specific*, which documents pvio's own start-of-day
extension.  Each layout is defined once, as a :class:`struct.Struct` or an offset
constant, and ``tests/test_abi.py`` checks the sizes and offsets.
"""

from __future__ import annotations

import struct
from enum import IntEnum

from pvio.abi.cstruct import CStruct

PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT

DOMID_SELF = 0x7FF0
DOMID_IO = 0x7FF1  # "the I/O device": the smart NIC's buffers are granted to it
DOMID_FIRST_RESERVED = 0x7FF0


# --------------------------------------------------------------------------- hypercalls
class Hypercall(IntEnum):
    """Hypercall numbers (xen.h)."""

    set_trap_table = 0
    mmu_update = 1
    stack_switch = 3
    set_callbacks = 4
    sched_op_compat = 6
    memory_op = 12
    multicall = 13
    set_timer_op = 15
    xen_version = 17
    console_io = 18
    grant_table_op = 20
    vm_assist = 21
    iret = 23
    vcpu_op = 24
    mmuext_op = 26
    sched_op = 29
    callback_op = 30
    event_channel_op = 32


class Errno(IntEnum):
    """Xen errno values (x86: equal to Linux's); hypercalls return them negated."""

    EPERM = 1
    ENOENT = 2
    ESRCH = 3
    EIO = 5
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
VIRQ_DEBUG = 1  # pvio's bench harness rings an x86 guest with it (VIRQ_BENCH)
VIRQ_CONSOLE = 2
VIRQ_ARCH_0 = 16  # Xen's first arch-specific VIRQ; pvio: device IRQ line n is VIRQ_ARCH_0 + n
NR_VIRQS = 24

#: Ports in the 2-level ABI on 64-bit: sizeof(long)**2 * 64.
EVTCHN_2L_NR_CHANNELS = 4096
BITS_PER_WORD = 64

# Argument structs of event_channel_op (the out fields are written back in place).
EVTCHN_ALLOC_UNBOUND_T = CStruct(
    "evtchn_alloc_unbound", [("dom", "u16"), ("remote_dom", "u16"), ("port", "u32", "out")]
)
EVTCHN_ALLOC_UNBOUND = EVTCHN_ALLOC_UNBOUND_T.struct
EVTCHN_BIND_INTERDOMAIN_T = CStruct(
    "evtchn_bind_interdomain", [("remote_dom", "u16"), ("remote_port", "u32"), ("local_port", "u32", "out")]
)
EVTCHN_BIND_INTERDOMAIN = EVTCHN_BIND_INTERDOMAIN_T.struct
EVTCHN_BIND_VIRQ_T = CStruct("evtchn_bind_virq", [("virq", "u32"), ("vcpu", "u32"), ("port", "u32", "out")])
EVTCHN_BIND_VIRQ = EVTCHN_BIND_VIRQ_T.struct
EVTCHN_PORT = struct.Struct("<I")  # close / send / unmask: {port}: 4 B
# status: dom @0, port @4, status(out) @8, vcpu(out) @12, union(out) @16: 24 B; the union is
# unbound {dom u16 @16}, interdomain {dom u16 @16, port u32 @20}, virq u32 @16.
EVTCHN_STATUS = struct.Struct("<H2xIIIH2xI")

# shared_info page (x86_64): vcpu_info[32] at 0 (64 B each), then the 2-level bitmaps.
VCPU_TIME_INFO_T = CStruct(
    "vcpu_time_info",
    [
        ("version", "u32", "odd while the hypervisor updates"),
        ("pad0", "u32"),
        ("tsc_timestamp", "u64"),
        ("system_time", "u64", "ns"),
        ("tsc_to_system_mul", "u32"),
        ("tsc_shift", "s8"),
        ("flags", "u8"),
        ("pad1", "u8[2]"),
    ],
    doc="Xen's vcpu_time_info: time = system_time + scaled TSC delta",
)
VCPU_INFO_T = CStruct(
    "vcpu_info",
    [
        ("evtchn_upcall_pending", "u8", "Xen sets; the guest clears at the start of its scan"),
        ("evtchn_upcall_mask", "u8", "guest: 1 = no upcalls"),
        ("pad", "u8[6]"),
        ("evtchn_pending_sel", "u64", "Xen sets bits; the guest exchanges it with 0"),
        ("arch", "u8[16]", "arch_vcpu_info: cr2, pad"),
        ("time", VCPU_TIME_INFO_T),
    ],
)
SHARED_INFO_T = CStruct(
    "shared_info",
    [
        ("vcpu_info", VCPU_INFO_T, 32),
        ("evtchn_pending", "u64[64]", "Xen sets, the guest clears"),
        ("evtchn_mask", "u64[64]", "guest-owned"),
        ("wc_version", "u32"),
        ("wc_sec", "u32"),
        ("wc_nsec", "u32"),
        ("wc_sec_hi", "u32"),
        ("arch", "u8[48]", "arch_shared_info"),
    ],
)
SHARED_INFO_VCPU_INFO = SHARED_INFO_T.offset("vcpu_info")
VCPU_INFO_SIZE = VCPU_INFO_T.size
VCPU_UPCALL_PENDING = VCPU_INFO_T.offset("evtchn_upcall_pending")  # u8
VCPU_UPCALL_MASK = VCPU_INFO_T.offset("evtchn_upcall_mask")  # u8
VCPU_PENDING_SEL = VCPU_INFO_T.offset("evtchn_pending_sel")  # u64 (xen_ulong_t)
VCPU_TIME_INFO = VCPU_INFO_T.offset("time")  # vcpu_time_info, 32 B
SHARED_INFO_EVTCHN_PENDING = SHARED_INFO_T.offset("evtchn_pending")  # u64[64]
SHARED_INFO_EVTCHN_MASK = SHARED_INFO_T.offset("evtchn_mask")  # u64[64]
SHARED_INFO_WC_VERSION = SHARED_INFO_T.offset("wc_version")
SHARED_INFO_SIZE = SHARED_INFO_T.size
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


GRANT_ENTRY_V1_T = CStruct("grant_entry_v1", [("flags", "u16", "GTF_*"), ("domid", "u16"), ("frame", "u32")])
GRANT_ENTRY_V1 = GRANT_ENTRY_V1_T.struct  # flags @0, domid @2, frame @4: 8 B
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

GNTTAB_MAP_GRANT_REF_T = CStruct(
    "gnttab_map_grant_ref",
    [("host_addr", "u64"), ("flags", "u32"), ("ref", "u32"), ("dom", "u16"),
     ("status", "s16", "out"), ("handle", "u32", "out"), ("dev_bus_addr", "u64", "out")],
)  # fmt: skip
GNTTAB_MAP_GRANT_REF = GNTTAB_MAP_GRANT_REF_T.struct
GNTTAB_UNMAP_GRANT_REF_T = CStruct(
    "gnttab_unmap_grant_ref",
    [("host_addr", "u64"), ("dev_bus_addr", "u64"), ("handle", "u32"), ("status", "s16", "out")],
)
GNTTAB_UNMAP_GRANT_REF = GNTTAB_UNMAP_GRANT_REF_T.struct
# struct gnttab_copy: source and dest are each {union {u32 ref; u64 gmfn} u; domid u16; offset u16}.
GNTTAB_COPY_T = CStruct(
    "gnttab_copy",
    [("source_u", "u64"), ("source_domid", "u16"), ("source_offset", "u16"), ("source_pad", "pad[4]"),
     ("dest_u", "u64"), ("dest_domid", "u16"), ("dest_offset", "u16"), ("dest_pad", "pad[4]"),
     ("len", "u16"), ("flags", "u16", "GNTCOPY_*"), ("status", "s16", "out")],
)  # fmt: skip
GNTTAB_COPY = GNTTAB_COPY_T.struct
GNTTAB_COPY_STATUS_OFFSET = GNTTAB_COPY_T.offset("status")
GNTTAB_SETUP_TABLE_T = CStruct(
    "gnttab_setup_table",
    [("dom", "u16"), ("nr_frames", "u32"), ("status", "s16", "out"), ("frame_list", "u64", "guest handle")],
)
GNTTAB_SETUP_TABLE = GNTTAB_SETUP_TABLE_T.struct
GNTTAB_QUERY_SIZE_T = CStruct(
    "gnttab_query_size",
    [("dom", "u16"), ("nr_frames", "u32", "out"), ("max_nr_frames", "u32", "out"), ("status", "s16", "out")],
)
GNTTAB_QUERY_SIZE = GNTTAB_QUERY_SIZE_T.struct


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
START_INFO_T = CStruct(
    "start_info",
    [
        ("magic", "char[32]", '"xen-3.0-x86_64"'),
        ("nr_pages", "u64"),
        ("shared_info", "u64", "guest-physical address of the shared_info page"),
        ("flags", "u32", "SIF_*"),
        ("store_mfn", "u64", "frame of the xenstore ring page"),
        ("store_evtchn", "u32"),
        ("console_mfn", "u64"),
        ("console_evtchn", "u32"),
        ("pt_base", "u64"),
        ("nr_pt_frames", "u64"),
        ("mfn_list", "u64"),
        ("mod_start", "u64"),
        ("mod_len", "u64"),
        ("cmd_line", "char[1024]"),
        ("first_p2m_pfn", "u64"),
        ("nr_p2m_frames", "u64"),
    ],
    doc="Xen's x86_64 start_info_t (pvio fills in magic .. console_evtchn and cmd_line)",
)
SI_MAGIC = START_INFO_T.offset("magic")  # char[32]
SI_NR_PAGES = START_INFO_T.offset("nr_pages")  # u64
SI_SHARED_INFO = START_INFO_T.offset("shared_info")  # u64
SI_FLAGS = START_INFO_T.offset("flags")  # u32
SI_STORE_MFN = START_INFO_T.offset("store_mfn")  # u64
SI_STORE_EVTCHN = START_INFO_T.offset("store_evtchn")  # u32
SI_CONSOLE_MFN = START_INFO_T.offset("console_mfn")  # u64
SI_CONSOLE_EVTCHN = START_INFO_T.offset("console_evtchn")  # u32
SI_CMD_LINE = START_INFO_T.offset("cmd_line")  # char[1024]
SIF_PRIVILEGED = 1
SIF_INITDOMAIN = 2

# *pvio-specific*: pvio's start-of-day extension, at offset 2048 of the start_info page.
PVIO_SI_EXT = 2048
PVIO_START_EXT_T = CStruct(
    "pvio_start_ext",
    [
        ("magic", "char[4]", '"PVIO"'),
        ("domid", "u16"),
        ("gnttab_frames", "u16"),
        ("gnttab_gfn", "u64", "first grant-table frame"),
        ("hypercall_gfn", "u64", "the hypercall page"),
        ("first_free_gfn", "u64", "frames below belong to the image and the special pages"),
        ("free_end_gfn", "u64", "last free frame, exclusive"),
    ],
    packed=True,
    doc="pvio's start-of-day extension, at PVIO_SI_EXT in the start_info page",
)
PVIO_SI_EXT_STRUCT = PVIO_START_EXT_T.struct
PVIO_SI_MAGIC = b"PVIO"


# --------------------------------------------------------------------------- xenstore, xenbus
class XsType(IntEnum):
    """``xsd_sockmsg_type``: message type numbers (io/xs_wire.h)."""

    CONTROL = 0
    DEBUG = 0  # the old name of CONTROL
    DIRECTORY = 1
    READ = 2
    GET_PERMS = 3
    WATCH = 4
    UNWATCH = 5
    TRANSACTION_START = 6
    TRANSACTION_END = 7
    INTRODUCE = 8
    RELEASE = 9
    GET_DOMAIN_PATH = 10
    WRITE = 11
    MKDIR = 12
    RM = 13
    SET_PERMS = 14
    WATCH_EVENT = 15
    ERROR = 16
    IS_DOMAIN_INTRODUCED = 17
    RESUME = 18
    SET_TARGET = 19
    # 20 was XS_RESTRICT, removed from the protocol: a message of type 20 is invalid.
    RESET_WATCHES = 21
    DIRECTORY_PART = 22
    GET_FEATURE = 23
    SET_FEATURE = 24
    GET_QUOTA = 25
    SET_QUOTA = 26


XENSTORE_PAYLOAD_MAX = 4096  # bytes of payload in one xs_wire message
XENSTORE_RING_SIZE = 1024  # each byte ring of the xenstore page


class XenbusState(IntEnum):
    """A xenbus device's ``state`` node (io/xenbus.h), stored as decimal ASCII."""

    UNKNOWN = 0
    INITIALISING = 1
    INIT_WAIT = 2
    INITIALISED = 3
    CONNECTED = 4
    CLOSING = 5
    CLOSED = 6
    RECONFIGURING = 7
    RECONFIGURED = 8


# --------------------------------------------------------------------------- HVM / PVH guests
# Hypercall numbers an HVM/PVH guest uses besides the PV ones above (xen.h).
HYPERCALL_HVM_OP = 34
HYPERCALL_PHYSDEV_OP = 33

# hvm_op commands (hvm/hvm_op.h) and xen_hvm_param: domid u16 @0, index u32 @4, value u64 @8: 16 B.
HVMOP_set_param = 0
HVMOP_get_param = 1
HVMOP_pagetable_dying = 9
XEN_HVM_PARAM = struct.Struct("<H2xIQ")
HVM_PARAM_CALLBACK_IRQ = 0
HVM_PARAM_STORE_PFN = 1
HVM_PARAM_STORE_EVTCHN = 2
HVM_PARAM_CONSOLE_PFN = 17
HVM_PARAM_CONSOLE_EVTCHN = 18
HVM_NR_PARAMS = 39
HVM_PARAM_CALLBACK_TYPE_VECTOR = 2  # in bits 63:56 of CALLBACK_IRQ; the vector in bits 7:0

# memory_op commands (memory.h).
XENMEM_increase_reservation = 0
XENMEM_decrease_reservation = 1
XENMEM_maximum_ram_page = 2
XENMEM_current_reservation = 3
XENMEM_maximum_reservation = 4
XENMEM_populate_physmap = 6
XENMEM_add_to_physmap = 7
XENMEM_memory_map = 9
XENMEM_get_sharing_freed_pages = 18
XENMAPSPACE_shared_info = 0
XENMAPSPACE_grant_table = 1
XENMAPIDX_grant_table_status = 0x80000000
# xen_add_to_physmap: domid u16 @0, size u16 @2, space u32 @4, idx u64 @8, gpfn u64 @16: 24 B
XEN_ADD_TO_PHYSMAP = struct.Struct("<HHIQQ")
# xen_memory_map: nr_entries u32 @0, buffer (guest handle) u64 @8: 16 B
XEN_MEMORY_MAP = struct.Struct("<I4xQ")
# xen_memory_reservation: extent_start u64 @0, nr_extents u64 @8, extent_order u32 @16,
# mem_flags u32 @20, domid u16 @24: 32 B
XEN_MEMORY_RESERVATION = struct.Struct("<QQIIH6x")
E820_ENTRY = struct.Struct("<QQI")  # addr, size, type: 20 B, packed
E820_RAM = 1
E820_RESERVED = 2

# vcpu_op commands (vcpu.h).
VCPUOP_initialise = 0
VCPUOP_up = 1
VCPUOP_down = 2
VCPUOP_is_up = 3
VCPUOP_get_runstate_info = 4
VCPUOP_register_runstate_memory_area = 5
VCPUOP_set_periodic_timer = 6
VCPUOP_stop_periodic_timer = 7
VCPUOP_set_singleshot_timer = 8
VCPUOP_stop_singleshot_timer = 9
VCPUOP_register_vcpu_info = 10
VCPUOP_get_physid = 12
# vcpu_set_singleshot_timer: timeout_abs_ns u64 @0, flags u32 @8: 16 B
VCPU_SET_SINGLESHOT_TIMER = struct.Struct("<QI4x")
# vcpu_register_vcpu_info: mfn u64 @0, offset u32 @8, rsvd u32 @12: 16 B
VCPU_REGISTER_VCPU_INFO = struct.Struct("<QII")
VCPU_RUNSTATE_INFO_SIZE = 48  # state i32, pad, state_entry_time u64, time[4] u64

# xen_version commands (version.h) and XENFEAT_* bits (features.h).
XENVER_version = 0
XENVER_extraversion = 1
XENVER_compile_info = 2
XENVER_capabilities = 3
XENVER_changeset = 4
XENVER_platform_parameters = 5
XENVER_get_features = 6
XENVER_pagesize = 7
XENFEAT_writable_page_tables = 0
XENFEAT_auto_translated_physmap = 2
XENFEAT_supervisor_mode_kernel = 3
XENFEAT_hvm_callback_vector = 8
XENFEAT_hvm_safe_pvclock = 9
XENFEAT_hvm_pirqs = 10
XEN_FEATURE_INFO = struct.Struct("<II")  # submap_idx u32 @0, submap u32 @4 (out)

# EVTCHNOP_bind_ipi: vcpu u32 @0, port(out) u32 @4: 8 B.
EVTCHN_BIND_IPI = struct.Struct("<II")
EVTCHNOP_init_control = 11

# vcpu_time_info (32 B, in vcpu_info at +32): version u32 @0, pad, tsc_timestamp u64 @8,
# system_time u64 @16, tsc_to_system_mul u32 @24, tsc_shift i8 @28, flags u8 @29.
VCPU_TIME_INFO_STRUCT = struct.Struct("<I4xQQIbB2x")
XEN_PVCLOCK_TSC_STABLE_BIT = 1

# The console ring page (io/console.h, xencons_interface): in[1024] @0, out[2048] @1024,
# in_cons @3072, in_prod @3076, out_cons @3080, out_prod @3084 (u32 each).
XENCONS_IN = 0
XENCONS_IN_SIZE = 1024
XENCONS_OUT = 1024
XENCONS_OUT_SIZE = 2048
XENCONS_INDICES = 3072
XENCONS_INDEX_STRUCT = struct.Struct("<IIII")  # in_cons, in_prod, out_cons, out_prod

# PVH boot (arch/x86/hvm/start_info.h, elfnote.h).
XEN_ELFNOTE_PHYS32_ENTRY = 18
HVM_START_MAGIC = 0x336EC578
# hvm_start_info: magic u32 @0, version u32 @4, flags u32 @8, nr_modules u32 @12,
# modlist_paddr u64 @16, cmdline_paddr u64 @24, rsdp_paddr u64 @32, memmap_paddr u64 @40,
# memmap_entries u32 @48, reserved u32 @52: 56 B
HVM_START_INFO = struct.Struct("<IIIIQQQQII")
HVM_MODLIST_ENTRY = struct.Struct("<QQQQ")  # paddr, size, cmdline_paddr, reserved: 32 B
HVM_MEMMAP_ENTRY = struct.Struct("<QQII")  # addr, size, type, reserved: 24 B

# The Xen CPUID leaves (arch-x86/cpuid.h), at the base 0x40000000.
XEN_CPUID_BASE = 0x40000000
XEN_CPUID_SIGNATURE = b"XenVMMXenVMM"
XEN_CPUID_MAX_LEAF = 5  # base + 0 .. base + 5
XEN_HYPERCALL_MSR = 0x40000000  # the MSR a guest writes its hypercall page's address to
XEN_HVM_CPUID_VCPU_ID_PRESENT = 1 << 3
XEN_HVM_CPUID_DOMID_PRESENT = 1 << 4
