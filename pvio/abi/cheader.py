"""Generates ``pvio_abi.h``, the x86 guest kernel's view of every ABI pvio defines in Python.

The guest kernel (``frontends/x86``) includes the generated header instead of copying
numbers and layouts: Xen's hypercall and sub-op numbers, errnos, VIRQs, the shared_info,
vcpu_info and start_info layouts, grant flags, xenstore message types and XenbusState
values, the netif flags and limits, the emulated NIC's and the smart NIC's register maps
and descriptors, the bench mailbox.  The ring and the netif structs come from
``ringbuf/ring.h`` itself, which the kernel includes and whose ``ring.c`` it links.

Every struct carries a ``_Static_assert`` per field offset, so if the C compiler ever laid
one out differently from :class:`pvio.abi.cstruct.CStruct`, the guest would not build.
:func:`generate` is pure (same modules, same text); :mod:`pvio.cpu.build` writes its output
into the build directory and hashes it into the image's cache key.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from enum import IntEnum

from pvio.abi import bench, emunic, smartnic, xen
from pvio.abi.cstruct import CStruct, c_defines
from pvio.ringbuf import netif

GUARD = "PVIO_ABI_H"


def _enum(enum: type[IntEnum], prefix: str) -> dict[str, int]:
    # Members named after Python keywords carry a trailing underscore (SchedOp.yield_).
    return {f"{prefix}{m.name.rstrip('_')}": int(m) for m in enum}


def _module_ints(module: object, names: Iterable[str], prefix: str = "") -> dict[str, int]:
    out: dict[str, int] = {}
    for name in names:
        value = getattr(module, name)
        c_name = name if name.startswith(prefix) else prefix + name
        out[c_name] = int(value)
    return out


def _public_ints(module: object, *, exclude: Iterable[str] = ()) -> list[str]:
    skip = set(exclude)
    return [
        n
        for n, v in vars(module).items()
        if n.isupper() and not n.startswith("_") and type(v) is int and n not in skip
    ]


def _camel(name: str) -> str:
    return "".join(part.capitalize() for part in name.split("_"))


def defines() -> dict[str, Mapping[str, int]]:
    """Every ``#define`` of the header, by section."""
    return {
        "Xen: hypercall numbers (xen.h)": _enum(xen.Hypercall, "HC_"),
        "Xen: sub-operations": {
            **_enum(xen.SchedOp, "SCHEDOP_"),
            **_enum(xen.ShutdownReason, "SHUTDOWN_"),
            **_enum(xen.EvtchnOp, "EVTCHNOP_"),
            **_enum(xen.GnttabOp, "GNTTABOP_"),
            "CONSOLEIO_write": xen.CONSOLEIO_write,
            "CONSOLEIO_read": xen.CONSOLEIO_read,
        },
        "Xen: errno values (hypercalls return them negated)": {m.name: int(m) for m in xen.Errno},
        "Xen: domains, VIRQs, event channels": {
            "PAGE_SHIFT": xen.PAGE_SHIFT,
            "DOMID_SELF": xen.DOMID_SELF,
            "DOMID_IO": xen.DOMID_IO,
            "VIRQ_TIMER": xen.VIRQ_TIMER,
            "VIRQ_DEBUG": xen.VIRQ_DEBUG,
            "VIRQ_ARCH_0": xen.VIRQ_ARCH_0,
            "EVTCHN_2L_NR_CHANNELS": xen.EVTCHN_2L_NR_CHANNELS,
            "LEGACY_MAX_VCPUS": xen.LEGACY_MAX_VCPUS,
            "PVIO_SI_EXT": xen.PVIO_SI_EXT,
        },
        "Xen: grant table v1": {
            **_module_ints(xen, [n for n in vars(xen) if n.startswith(("GTF_", "GNTMAP_", "GNTCOPY_"))]),
            "GNTTAB_NR_RESERVED_ENTRIES": xen.GNTTAB_NR_RESERVED_ENTRIES,
            "GRANT_ENTRIES_PER_FRAME": xen.GRANT_ENTRIES_PER_FRAME,
        },
        "Xen: xenstore (io/xs_wire.h) and xenbus states (io/xenbus.h)": {
            **{f"XS_{m.name}": int(m) for m in xen.XsType if m.name != "DEBUG"},
            "XENSTORE_PAYLOAD_MAX": xen.XENSTORE_PAYLOAD_MAX,
            "XENSTORE_RING_SIZE": xen.XENSTORE_RING_SIZE,
            **{f"XenbusState{_camel(m.name)}": int(m) for m in xen.XenbusState},
        },
        "Xen: netif flags, status codes and limits (io/netif.h)": _module_ints(
            netif,
            [
                n
                for n in _public_ints(netif)
                if n.startswith(("NETTXF_", "NETRXF_", "NETIF_RSP_", "XEN_NETIF_", "NET_"))
            ],
        ),
        "pvio: the emulated NIC": _module_ints(
            emunic, _public_ints(emunic, exclude=["VIRQ_ARCH_0"]), "EMUNIC_"
        ),
        "pvio: the smart NIC": _module_ints(
            smartnic, _public_ints(smartnic, exclude=["VIRQ_ARCH_0"]), "SNIC_"
        ),
        "pvio: the bench harness": _module_ints(bench, _public_ints(bench, exclude=["VIRQ_DEBUG"])),
    }


def structs() -> list[CStruct]:
    """Every struct of the header, in declaration order (nested ones first)."""
    top = [
        xen.SHARED_INFO_T,
        xen.START_INFO_T,
        xen.PVIO_START_EXT_T,
        xen.GRANT_ENTRY_V1_T,
        smartnic.SNIC_DESC,
        smartnic.SNIC_CMPL,
        bench.BENCH_MBOX,
        bench.NICDRV_STATS,
    ]
    ordered: list[CStruct] = []

    def add(s: CStruct) -> None:
        for inner in s.nested():
            add(inner)
        if s not in ordered:
            ordered.append(s)

    for s in top:
        add(s)
    return ordered


def generate() -> str:
    """The text of ``pvio_abi.h``."""
    parts = [
        "/* pvio_abi.h: GENERATED by pvio.abi.cheader from the pvio.abi modules -- do not edit.",
        " * The guest-visible ABI as the hypervisor defines it; every struct is checked against",
        " * Python's layout by _Static_assert. */",
        f"#ifndef {GUARD}",
        f"#define {GUARD}",
        "",
        "typedef unsigned char u8;",
        "typedef unsigned short u16;",
        "typedef unsigned int u32;",
        "typedef unsigned long u64;",
        "typedef signed char s8;",
        "typedef signed short s16;",
        "typedef signed int s32;",
        "typedef signed long s64;",
        "",
    ]
    for comment, values in defines().items():
        parts.append(c_defines(values, comment=comment))
        parts.append("")
    for s in structs():
        parts.append(s.c_decl())
        parts.append("")
    parts.append(f"#endif /* {GUARD} */")
    return "\n".join(parts) + "\n"
