"""Event channels, 2-level ABI: ports, their bindings, and pending/mask/selector semantics.

The pending and mask bitmaps and each vCPU's ``upcall_pending``/``upcall_mask``/
``pending_sel`` live in the domain's shared_info page at Xen's offsets (vcpu_info[0],
``Domain.vcpu_info``, unless an HVM guest moved it with VCPUOP_register_vcpu_info), so a guest
(Python or x86 machine code) reads and clears them exactly as a Xen PV guest does.
The per-port binding state (unbound, interdomain, virq, ...) is hypervisor-private.

Raising an event follows ``evtchn_2l_set_pending``: set the port's pending bit; if it
was already set, stop (the events coalesce); if the port is masked, stop; set the
selector bit of its word; if that bit was newly set, set ``upcall_pending``, and if
*that* went 0 -> 1, kick the vCPU.  The vCPU then delivers one upcall (an interrupt)
when ``upcall_mask`` is clear; one upcall may cover many ports.

"Atomic" read-modify-write of the bitmaps: every guest in pvio runs on the hypervisor's
thread (PyGuests between awaits, x86 guests between emulator slices), so no guest code
runs while these functions run; the guest side uses the same bit protocol.  A guest in
its own process (:mod:`pvio.remote`) is no exception: the hypervisor forwards each raise
to that process (``Domain.raise_hook``), which runs :func:`set_pending` itself, and
touches its shared_info otherwise only inside its hypercalls, while the guest waits.

Besides Xen's states there is one pvio-specific binding, *service*: a port whose peer is
a service inside the hypervisor (the xenstore daemon), so the guest's notifications on
it call that service instead of another domain.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pvio.abi import (
    BITS_PER_WORD,
    SHARED_INFO_EVTCHN_MASK,
    SHARED_INFO_EVTCHN_PENDING,
    VCPU_PENDING_SEL,
    VCPU_UPCALL_MASK,
    VCPU_UPCALL_PENDING,
    EvtchnStat,
)

if TYPE_CHECKING:
    from pvio.core.domain import Domain

_U64 = struct.Struct("<Q")
SERVICE = 100  # pvio-specific channel state: bound to an in-hypervisor service


@dataclass
class Channel:
    """The hypervisor's record of one port of one domain."""

    state: int = EvtchnStat.closed
    remote_dom: int = 0  # unbound: who may bind; interdomain: the peer domain
    remote_port: int = 0  # interdomain: the peer's port
    virq: int = -1  # virq: which VIRQ
    service: Callable[[], None] | None = None  # SERVICE: called on send


def _test_and_set(si: memoryview, off: int, bit: int) -> bool:
    """Set ``bit`` of the u64 at ``off``; return whether it was already set."""
    (word,) = _U64.unpack_from(si, off)
    m = 1 << bit
    if word & m:
        return True
    _U64.pack_into(si, off, word | m)
    return False


def _test(si: memoryview, off: int, bit: int) -> bool:
    return bool(_U64.unpack_from(si, off)[0] >> bit & 1)


def _clear(si: memoryview, off: int, bit: int) -> None:
    (word,) = _U64.unpack_from(si, off)
    _U64.pack_into(si, off, word & ~(1 << bit))


def mark_events_pending(dom: Domain) -> None:
    """vcpu_mark_events_pending: set upcall_pending; kick the vCPU if it went 0 -> 1."""
    vi = dom.vcpu_info
    if vi[VCPU_UPCALL_PENDING] == 0:
        vi[VCPU_UPCALL_PENDING] = 1
        dom.kick()


def set_pending(dom: Domain, port: int) -> None:
    """Raise ``port`` on ``dom`` (evtchn_2l_set_pending).

    A domain whose kernel runs in another process (``dom.raise_hook``, :mod:`pvio.remote`)
    has the port raised there, by this same function: its shared_info is then written by
    one process only, so the read-modify-writes below stay race-free across processes.
    """
    if dom.raise_hook is not None:
        dom.raise_hook(port)
        return
    si = dom.shared_info
    word, bit = divmod(port, BITS_PER_WORD)
    if _test_and_set(si, SHARED_INFO_EVTCHN_PENDING + 8 * word, bit):
        dom.counters["evtchn.coalesced"] += 1
        return
    dom.counters["evtchn.raised"] += 1
    if _test(si, SHARED_INFO_EVTCHN_MASK + 8 * word, bit):
        return
    if not _test_and_set(dom.vcpu_info, VCPU_PENDING_SEL, word):
        mark_events_pending(dom)


def unmask(dom: Domain, port: int) -> None:
    """evtchn_2l_unmask: clear the mask; re-deliver if pending and the selector bit is new."""
    si = dom.shared_info
    word, bit = divmod(port, BITS_PER_WORD)
    _clear(si, SHARED_INFO_EVTCHN_MASK + 8 * word, bit)
    if _test(si, SHARED_INFO_EVTCHN_PENDING + 8 * word, bit) and not _test_and_set(
        dom.vcpu_info, VCPU_PENDING_SEL, word
    ):
        mark_events_pending(dom)


def clear_port_bits(dom: Domain, port: int) -> None:
    """Forget a closed port's pending bit (its mask bit is the guest's and stays)."""
    _clear(dom.shared_info, SHARED_INFO_EVTCHN_PENDING + 8 * (port // BITS_PER_WORD), port % BITS_PER_WORD)


def upcall_deliverable(dom: Domain) -> bool:
    """Whether the vCPU has an upcall to take now: pending and not masked."""
    vi = dom.vcpu_info
    return bool(vi[VCPU_UPCALL_PENDING]) and not vi[VCPU_UPCALL_MASK]
