"""The hypercall table: the one entry point from every guest into the hypervisor.

``HypercallTable.dispatch(domain, nr, a1..a5)`` is what an x86 guest's ``syscall`` trap
and a PyGuest's method call both reach: arguments are Xen's (numbers from ``xen.h``,
pointers are guest-physical addresses of Xen's argument structs in the caller's memory),
results are Xen's (0 or a positive value, or a negated errno).  Every argument is
untrusted: structs are copied out of guest memory once, every port, reference, domid,
frame, offset and length is range-checked, and a bad one returns the errno (or the
per-element GNTST status) and is counted; nothing a guest passes raises out of
``dispatch``.

Counters bumped on the caller: ``exits`` and ``exits.hypercall``, ``hypercalls``,
``hypercalls.<name>``, ``hypercalls.<name>.<subop>``, ``hypercall_errors`` and
``hypercall_errors.<ERRNO|GNTST>``, plus each service's own (``evtchn.sends``,
``grant.maps``, ``grant.copies``, ``grant.copy_bytes``, ...).
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Callable
from typing import TYPE_CHECKING

from pvio.abi import (
    CALLBACK_REGISTER,
    DOMID_FIRST_RESERVED,
    DOMID_SELF,
    EVTCHN_ALLOC_UNBOUND,
    EVTCHN_ALLOC_UNBOUND_T,
    EVTCHN_BIND_INTERDOMAIN,
    EVTCHN_BIND_INTERDOMAIN_T,
    EVTCHN_BIND_VIRQ,
    EVTCHN_BIND_VIRQ_T,
    EVTCHN_PORT,
    EVTCHN_STATUS,
    GNTTAB_COPY,
    GNTTAB_COPY_T,
    GNTTAB_MAP_GRANT_REF,
    GNTTAB_MAP_GRANT_REF_T,
    GNTTAB_QUERY_SIZE,
    GNTTAB_QUERY_SIZE_T,
    GNTTAB_SETUP_TABLE,
    GNTTAB_SETUP_TABLE_T,
    GNTTAB_UNMAP_GRANT_REF,
    GNTTAB_UNMAP_GRANT_REF_T,
    NR_VIRQS,
    SCHED_SHUTDOWN,
    CALLBACKOP_register,
    CALLBACKTYPE_event,
    CONSOLEIO_read,
    CONSOLEIO_write,
    Errno,
    EvtchnOp,
    EvtchnStat,
    GNTCOPY_dest_gref,
    GNTCOPY_source_gref,
    GNTMAP_host_map,
    GNTMAP_readonly,
    GntSt,
    GnttabOp,
    Hypercall,
    SchedOp,
)
from pvio.abi.xen import HYPERCALL_HVM_OP
from pvio.core import evtchn, fastpath, hvm
from pvio.core.evtchn import SERVICE, Channel
from pvio.core.grant_table import GrantError, copy_one, map_grant, unmap_grant
from pvio.core.memory import GuestFault

if TYPE_CHECKING:
    from pvio.abi.cstruct import CStruct
    from pvio.core.domain import Domain
    from pvio.core.hypervisor import Hypervisor
    from pvio.core.memory import GuestAddressSpace

log = logging.getLogger("pvio.hypercall")

MAX_BATCH = 4096  # elements of one grant_table_op call
CONSOLE_MAX = 4096  # bytes of one console_io write
XEN_VERSION = (4 << 16) | 17

# The counter keys of the sub-operations, made once (the hot path only looks them up).
_EVTCHN_KEYS = {int(op): f"hypercalls.event_channel_op.{op.name}" for op in EvtchnOp}
_GNTTAB_KEYS = {int(op): f"hypercalls.grant_table_op.{op.name}" for op in GnttabOp}
_SCHED_KEYS = {int(op): f"hypercalls.sched_op.{op.name.rstrip('_')}" for op in SchedOp}
_U64 = struct.Struct("<Q")


class HypercallError(Exception):
    """Raised inside a handler to return ``-errno`` to the guest."""

    def __init__(self, errno: Errno, message: str) -> None:
        super().__init__(message)
        self.errno = errno


def _fail(errno: Errno, message: str) -> HypercallError:
    return HypercallError(errno, message)


class HypercallTable:
    """Dispatch by hypercall number, with validation, Xen errno results and counters."""

    def __init__(self, hv: Hypervisor) -> None:
        self.hv = hv
        self._table: dict[int, Callable[[Domain, int, int, int, int, int], int]] = {
            Hypercall.set_callbacks: self.set_callbacks,
            Hypercall.callback_op: self.callback_op,
            Hypercall.console_io: self.console_io,
            Hypercall.sched_op: self.sched_op,
            Hypercall.set_timer_op: self.set_timer_op,
            Hypercall.xen_version: self.xen_version,
            Hypercall.event_channel_op: self.event_channel_op,
            Hypercall.grant_table_op: self.grant_table_op,
            Hypercall.iret: self.iret,
            Hypercall.memory_op: self.memory_op,
            Hypercall.vcpu_op: self.vcpu_op,
            HYPERCALL_HVM_OP: self.hvm_op,
        }
        self._names = {int(h): h.name for h in Hypercall}
        self._names[HYPERCALL_HVM_OP] = "hvm_op"
        self._keys = {nr: f"hypercalls.{name}" for nr, name in self._names.items()}

    def register(self, nr: int, handler: Callable[[Domain, int, int, int, int, int], int]) -> None:
        """Add (or replace) the handler of hypercall ``nr``: a service a vCPU provides (the PV MMU)."""
        self._table[nr] = handler

    def dispatch(
        self, dom: Domain, nr: int, a1: int = 0, a2: int = 0, a3: int = 0, a4: int = 0, a5: int = 0
    ) -> int:
        """Run hypercall ``nr`` for ``dom``; returns its result (negative errno on failure)."""
        c = dom.counters
        c["exits"] += 1
        c["exits.hypercall"] += 1
        c["hypercalls"] += 1
        c[self._keys.get(nr, "hypercalls.unknown")] += 1  # never a key per guest-chosen number
        handler = self._table.get(nr)
        try:
            if handler is None or not dom.alive:
                raise _fail(Errno.ENOSYS, f"hypercall {nr} not implemented")
            return handler(dom, a1, a2, a3, a4, a5)
        except Exception as e:
            return self._failed(dom, self._names.get(nr, "unknown"), e)

    def _failed(self, dom: Domain, name: str, exc: Exception) -> int:
        """The negative errno of hypercall ``name`` that raised ``exc`` (called in its except
        clause): its own errno, EFAULT for a bad guest address, EINVAL for a hypervisor bug,
        which is logged and counted and must not take the hypervisor down with the guest."""
        if isinstance(exc, HypercallError):
            return self._error(dom, exc.errno, f"{name}: {exc}")
        if isinstance(exc, GuestFault):
            return self._error(dom, Errno.EFAULT, f"{name}: {exc}")
        log.exception("dom%d: internal error in hypercall %s", dom.domid, name)
        dom.counters["hypercall_internal_errors"] += 1
        return self._error(dom, Errno.EINVAL, f"{name}: internal error")

    # ------------------------------------------------------------------ a PyGuest's hot calls
    # A kernel running in this process (a PyGuest) makes two hypercalls on every batch of its
    # data path: EVTCHNOP_send and SCHEDOP_block.  These enter the same handlers, counted and
    # checked as dispatch() does it, key for key; they only skip the table lookups and the
    # argument's round trip through the guest's own memory (the port is passed as it is).
    def evtchn_send_local(self, dom: Domain, port: int) -> int:
        """EVTCHNOP_send for a kernel in this process: 0 or a negative errno, as dispatch()."""
        c = dom.counters
        c["exits"] += 1
        c["exits.hypercall"] += 1
        c["hypercalls"] += 1
        c["hypercalls.event_channel_op"] += 1
        try:
            if not dom.alive:
                raise _fail(Errno.ENOSYS, f"hypercall {Hypercall.event_channel_op} not implemented")
            c["hypercalls.event_channel_op.send"] += 1
            self.evtchn_send(dom, port)
            return 0
        except Exception as e:
            return self._failed(dom, "event_channel_op", e)

    def block_local(self, dom: Domain) -> int:
        """SCHEDOP_block for a kernel in this process: 0 or a negative errno, as dispatch()."""
        c = dom.counters
        c["exits"] += 1
        c["exits.hypercall"] += 1
        c["hypercalls"] += 1
        c["hypercalls.sched_op"] += 1
        if not dom.alive:
            return self._error(dom, Errno.ENOSYS, f"sched_op: hypercall {Hypercall.sched_op} not implemented")
        c["hypercalls.sched_op.block"] += 1
        dom.vcpu_block()
        return 0

    def _error(self, dom: Domain, errno: Errno, message: str) -> int:
        dom.counters["hypercall_errors"] += 1
        dom.counters[f"hypercall_errors.{errno.name}"] += 1
        log.debug("dom%d: %s -> -%s", dom.domid, message, errno.name)
        return -int(errno)

    # ------------------------------------------------------------------ small hypercalls
    def set_callbacks(self, dom: Domain, event: int, failsafe: int, syscall: int, _a4: int, _a5: int) -> int:
        """set_callbacks(event_address, failsafe_address, syscall_address) (x86_64 form)."""
        dom.callbacks.update(event=event, failsafe=failsafe, syscall=syscall)
        return 0

    def callback_op(self, dom: Domain, cmd: int, arg: int, _a3: int, _a4: int, _a5: int) -> int:
        """callback_op(CALLBACKOP_register, struct callback_register *)."""
        dom.counters[
            "hypercalls.callback_op." + ("register" if cmd == CALLBACKOP_register else "unknown")
        ] += 1
        if cmd != CALLBACKOP_register:
            raise _fail(Errno.ENOSYS, f"callback_op {cmd}")
        cb_type, _flags, address = CALLBACK_REGISTER.unpack(dom.arg_mem.read(arg, CALLBACK_REGISTER.size))
        names = {CALLBACKTYPE_event: "event", 1: "failsafe", 2: "syscall"}
        if cb_type not in names:
            raise _fail(Errno.EINVAL, f"callback type {cb_type}")
        dom.callbacks[names[cb_type]] = address
        return 0

    def console_io(self, dom: Domain, cmd: int, count: int, buf: int, _a4: int, _a5: int) -> int:
        """console_io(CONSOLEIO_write, count, buffer): append to the domain's console."""
        if cmd == CONSOLEIO_read:
            return 0
        if cmd != CONSOLEIO_write:
            raise _fail(Errno.ENOSYS, f"console_io {cmd}")
        if not 0 <= count <= CONSOLE_MAX:
            raise _fail(Errno.EINVAL, f"console write of {count} bytes")
        dom.console_write(dom.arg_mem.read(buf, count))
        return 0

    def xen_version(self, dom: Domain, cmd: int, arg: int, _a3: int, _a4: int, _a5: int) -> int:
        """xen_version(XENVER_version): the Xen version pvio's ABI follows (HVM guests: more)."""
        if cmd == 0:
            return XEN_VERSION
        result = hvm.xen_version(dom, cmd, arg)
        return -int(Errno.ENOSYS) if result is None else result

    def memory_op(self, dom: Domain, cmd: int, arg: int, _a3: int, _a4: int, _a5: int) -> int:
        """memory_op (HVM/PVH domains: :func:`pvio.core.hvm.memory_op`)."""
        return hvm.memory_op(self, dom, cmd, arg)

    def vcpu_op(self, dom: Domain, cmd: int, vcpuid: int, arg: int, _a4: int, _a5: int) -> int:
        """vcpu_op (HVM/PVH domains: :func:`pvio.core.hvm.vcpu_op`)."""
        return hvm.vcpu_op(self, dom, cmd, vcpuid, arg)

    def hvm_op(self, dom: Domain, cmd: int, arg: int, _a3: int, _a4: int, _a5: int) -> int:
        """hvm_op (HVM/PVH domains: :func:`pvio.core.hvm.hvm_op`)."""
        return hvm.hvm_op(self, dom, cmd, arg)

    def sched_op(self, dom: Domain, cmd: int, arg: int, _a3: int, _a4: int, _a5: int) -> int:
        """sched_op: yield, block (re-enables delivery, returns at once if events wait), shutdown."""
        dom.counters[_SCHED_KEYS.get(cmd, "hypercalls.sched_op.unknown")] += 1
        if cmd == SchedOp.yield_:
            return 0
        if cmd == SchedOp.block:
            dom.vcpu_block()
            return 0
        if cmd == SchedOp.shutdown:
            (reason,) = SCHED_SHUTDOWN.unpack(dom.arg_mem.read(arg, SCHED_SHUTDOWN.size))
            self.hv.shutdown_domain(dom, reason)
            return 0
        raise _fail(Errno.ENOSYS, f"sched_op {cmd}")

    def set_timer_op(self, dom: Domain, timeout_ns: int, _a2: int, _a3: int, _a4: int, _a5: int) -> int:
        """set_timer_op(absolute system time in ns; 0 cancels): VIRQ_TIMER fires then."""
        self.hv.set_timer(dom, timeout_ns)
        return 0

    def iret(self, dom: Domain, _a1: int, _a2: int, _a3: int, _a4: int, _a5: int) -> int:
        """iret: return from an event upcall (x86 guests; the vCPU restores the frame)."""
        if dom.vcpu is None or not hasattr(dom.vcpu, "iret"):
            raise _fail(Errno.ENOSYS, "iret without an x86 vCPU")
        return int(dom.vcpu.iret())

    # ------------------------------------------------------------------ event channels
    @staticmethod
    def _put(mem: GuestAddressSpace, base: int, layout: CStruct, **fields: int) -> None:
        """Write a hypercall's out fields in place, each at its offset in ``layout``."""
        for name, value in fields.items():
            mem.write(base + layout.offset(name), layout.pack_field(name, value))

    def event_channel_op(self, dom: Domain, cmd: int, arg: int, _a3: int, _a4: int, _a5: int) -> int:
        """event_channel_op(cmd, arg): the 2-level ABI's channel operations."""
        dom.counters[_EVTCHN_KEYS.get(cmd, "hypercalls.event_channel_op.unknown")] += 1
        mem = dom.arg_mem
        if cmd == EvtchnOp.send:
            (port,) = EVTCHN_PORT.unpack(mem.read(arg, 4))
            self.evtchn_send(dom, port)
            return 0
        if cmd == EvtchnOp.alloc_unbound:
            d, remote, _ = EVTCHN_ALLOC_UNBOUND.unpack(mem.read(arg, EVTCHN_ALLOC_UNBOUND.size))
            port = self.evtchn_alloc_unbound(dom, d, remote)
            self._put(mem, arg, EVTCHN_ALLOC_UNBOUND_T, port=port)
            return 0
        if cmd == EvtchnOp.bind_interdomain:
            rdom, rport, _ = EVTCHN_BIND_INTERDOMAIN.unpack(mem.read(arg, EVTCHN_BIND_INTERDOMAIN.size))
            port = self.evtchn_bind_interdomain(dom, rdom, rport)
            self._put(mem, arg, EVTCHN_BIND_INTERDOMAIN_T, local_port=port)
            return 0
        if cmd == EvtchnOp.bind_virq:
            virq, vcpu, _ = EVTCHN_BIND_VIRQ.unpack(mem.read(arg, EVTCHN_BIND_VIRQ.size))
            port = self.evtchn_bind_virq(dom, virq, vcpu)
            self._put(mem, arg, EVTCHN_BIND_VIRQ_T, port=port)
            return 0
        if cmd == EvtchnOp.close:
            (port,) = EVTCHN_PORT.unpack(mem.read(arg, 4))
            self.evtchn_close(dom, port)
            return 0
        if cmd == EvtchnOp.unmask:
            (port,) = EVTCHN_PORT.unpack(mem.read(arg, 4))
            self._port(dom, port)
            evtchn.unmask(dom, port)
            return 0
        if cmd == EvtchnOp.bind_ipi:
            return hvm.bind_ipi(self, dom, arg)
        if cmd == EvtchnOp.bind_vcpu:
            return 0  # one vCPU: every port is bound to it already
        if cmd == EvtchnOp.status:
            d, port, *_ = EVTCHN_STATUS.unpack(mem.read(arg, EVTCHN_STATUS.size))
            target = self._target(dom, d)
            if not 0 < port < target.max_ports:
                raise _fail(Errno.EINVAL, f"dom{target.domid} has no port {port}")
            ch = target.ports.get(port) or Channel()  # a free port reports EVTCHNSTAT_closed
            state = EvtchnStat.interdomain if ch.state == SERVICE else ch.state
            if state in (EvtchnStat.unbound, EvtchnStat.interdomain):
                union = (ch.remote_dom, ch.remote_port)
            else:  # u.virq is a u32 at 16: its low half, then zeroes
                union = (max(ch.virq, 0), 0)
            mem.write(arg, EVTCHN_STATUS.pack(d, port, state, 0, *union))
            return 0
        raise _fail(Errno.ENOSYS, f"event_channel_op {cmd}")

    def _target(self, dom: Domain, domid: int) -> Domain:
        if domid in (DOMID_SELF, dom.domid):
            return dom
        if not dom.privileged:
            raise _fail(Errno.EPERM, f"dom{dom.domid} may not act for dom{domid}")
        target = self.hv.domains.get(domid)
        if target is None:
            raise _fail(Errno.ESRCH, f"no domain {domid}")
        return target

    def _port(self, dom: Domain, port: int) -> Channel:
        ch = dom.ports.get(port) if 0 < port < dom.max_ports else None
        if ch is None:
            raise _fail(Errno.EINVAL, f"dom{dom.domid} has no port {port}")
        return ch

    def free_port(self, dom: Domain) -> int:
        """The lowest unused port of ``dom`` (port 0 is never used); ENOSPC when all are taken."""
        for port in range(1, dom.max_ports):
            if port not in dom.ports:
                return port
        raise _fail(Errno.ENOSPC, f"dom{dom.domid} has no free port")

    def evtchn_alloc_unbound(self, dom: Domain, domid: int, remote: int) -> int:
        """EVTCHNOP_alloc_unbound: a port of ``domid`` (DOMID_SELF) that ``remote`` may bind."""
        target = self._target(dom, domid)
        if remote == DOMID_SELF:
            remote = dom.domid
        if not 0 <= remote < DOMID_FIRST_RESERVED:
            raise _fail(Errno.EINVAL, f"remote domid {remote}")
        port = self.free_port(target)
        target.ports[port] = Channel(EvtchnStat.unbound, remote_dom=remote)
        return port

    def evtchn_bind_interdomain(self, dom: Domain, remote_dom: int, remote_port: int) -> int:
        """EVTCHNOP_bind_interdomain: connect to an unbound port the remote offered us."""
        if remote_dom == DOMID_SELF:
            remote_dom = dom.domid
        remote = self.hv.domains.get(remote_dom)
        if remote is None or not remote.alive:
            raise _fail(Errno.ESRCH, f"no domain {remote_dom}")
        rch = self._port(remote, remote_port)
        if rch.state != EvtchnStat.unbound or rch.remote_dom != dom.domid:
            raise _fail(Errno.EINVAL, f"dom{remote_dom} port {remote_port} is not offered to dom{dom.domid}")
        port = self.free_port(dom)
        dom.ports[port] = Channel(EvtchnStat.interdomain, remote_dom=remote_dom, remote_port=remote_port)
        rch.state = EvtchnStat.interdomain
        rch.remote_port = port
        evtchn.set_pending(dom, port)  # in case the peer signalled before we bound
        return port

    def evtchn_bind_virq(self, dom: Domain, virq: int, vcpu: int) -> int:
        """EVTCHNOP_bind_virq: a port raised by the hypervisor for ``virq``."""
        if not 0 <= virq < NR_VIRQS:
            raise _fail(Errno.EINVAL, f"virq {virq}")
        if vcpu != 0:
            raise _fail(Errno.ENOENT, f"vcpu {vcpu}")
        if virq in dom.virqs:
            raise _fail(Errno.EEXIST, f"virq {virq} already bound to port {dom.virqs[virq]}")
        port = self.free_port(dom)
        dom.ports[port] = Channel(EvtchnStat.virq, virq=virq)
        dom.virqs[virq] = port
        return port

    def evtchn_close(self, dom: Domain, port: int) -> None:
        """EVTCHNOP_close: free the port; an interdomain peer goes back to unbound."""
        ch = self._port(dom, port)
        del dom.ports[port]
        evtchn.clear_port_bits(dom, port)
        if ch.state == EvtchnStat.interdomain:
            peer = self.hv.domains.get(ch.remote_dom)
            pch = peer.ports.get(ch.remote_port) if peer is not None else None
            if pch is not None and pch.state == EvtchnStat.interdomain:
                pch.state = EvtchnStat.unbound
                pch.remote_dom = dom.domid
                pch.remote_port = 0
        elif ch.state == EvtchnStat.virq:
            dom.virqs.pop(ch.virq, None)

    def evtchn_send(self, dom: Domain, port: int) -> None:
        """EVTCHNOP_send: raise the peer's port (unbound ports drop the event silently)."""
        ch = self._port(dom, port)
        dom.counters["evtchn.sends"] += 1
        if ch.state == EvtchnStat.interdomain:
            peer = self.hv.domains.get(ch.remote_dom)
            if peer is not None and peer.alive:
                evtchn.set_pending(peer, ch.remote_port)
        elif ch.state == SERVICE:
            assert ch.service is not None
            ch.service()
        elif ch.state == EvtchnStat.ipi:
            evtchn.set_pending(dom, port)
        elif ch.state != EvtchnStat.unbound:  # as Xen: only interdomain, IPI and unbound ports send
            raise _fail(Errno.EINVAL, f"dom{dom.domid} cannot send on port {port} (state {ch.state})")

    # ------------------------------------------------------------------ grant tables
    def grant_table_op(self, dom: Domain, cmd: int, arg: int, count: int, _a4: int, _a5: int) -> int:
        """grant_table_op(cmd, args, count): map, unmap, copy (batched, per-element status)."""
        dom.counters[_GNTTAB_KEYS.get(cmd, "hypercalls.grant_table_op.unknown")] += 1
        if not 0 <= count <= MAX_BATCH:
            raise _fail(Errno.EINVAL, f"grant_table_op count {count}")
        if cmd == GnttabOp.copy:
            return self._gnttab_copy(dom, arg, count)
        if cmd == GnttabOp.map_grant_ref:
            return self._gnttab_map(dom, arg, count)
        if cmd == GnttabOp.unmap_grant_ref:
            return self._gnttab_unmap(dom, arg, count)
        if cmd == GnttabOp.setup_table:
            return self._gnttab_setup_table(dom, arg, count)
        if cmd == GnttabOp.query_size:
            return self._gnttab_query_size(dom, arg, count)
        raise _fail(Errno.ENOSYS, f"grant_table_op {cmd}")

    def _grant_status(self, dom: Domain, e: GrantError) -> int:
        dom.counters["hypercall_errors"] += 1
        dom.counters[f"hypercall_errors.{GntSt(e.status).name}"] += 1
        log.debug("dom%d: grant op failed: %s", dom.domid, e)
        return e.status

    def _gnttab_copy(self, dom: Domain, arg: int, count: int) -> int:
        st = GNTTAB_COPY
        if fastpath.ENABLED:
            dom.mem.check(arg, count * st.size)
            copies, nbytes, errors = self.hv.native.grant_copy(dom, arg, count)
            fastpath.count_copies(dom.counters, copies, nbytes, errors)
            if errors:
                log.debug("dom%d: grant copy batch of %d: errors %s", dom.domid, count, errors)
            return 0
        blob = dom.arg_mem.read(arg, count * st.size)  # copy the batch once
        mem = dom.arg_mem
        domains = self.hv.domains
        c = dom.counters
        for i, (sref, sdom, soff, dref, ddom, doff, length, flags, _status) in enumerate(
            st.iter_unpack(blob)
        ):
            try:
                copy_one(
                    domains,
                    dom,
                    (bool(flags & GNTCOPY_source_gref), sref, sdom, soff),
                    (bool(flags & GNTCOPY_dest_gref), dref, ddom, doff),
                    length,
                )
                status = 0
                c["grant.copies"] += 1
                c["grant.copy_bytes"] += length
            except GrantError as e:
                status = self._grant_status(dom, e)
            self._put(mem, arg + i * st.size, GNTTAB_COPY_T, status=status)
        return 0

    def _gnttab_map(self, dom: Domain, arg: int, count: int) -> int:
        st = GNTTAB_MAP_GRANT_REF
        for i in range(count):
            at = arg + i * st.size
            host_addr, flags, ref, d, _s, _h, _b = st.unpack(dom.arg_mem.read(at, st.size))
            handle = 0
            try:
                if not flags & GNTMAP_host_map:
                    raise GrantError(GntSt.general_error, "only host mappings are supported")
                m = map_grant(self.hv.domains, dom, d, ref, bool(flags & GNTMAP_readonly))
                if dom.vcpu is not None and hasattr(dom.vcpu, "map_foreign_page"):
                    try:  # the vCPU (or a backend's process) cannot take it: no mapping is left
                        dom.vcpu.map_foreign_page(host_addr, m)
                    except GrantError:
                        unmap_grant(dom, m.handle)
                        raise
                handle = m.handle
                dom.counters["grant.maps"] += 1
                status = 0
            except GrantError as e:
                status = self._grant_status(dom, e)
            self._put(dom.arg_mem, at, GNTTAB_MAP_GRANT_REF_T, status=status, handle=handle, dev_bus_addr=0)
        return 0

    def _gnttab_unmap(self, dom: Domain, arg: int, count: int) -> int:
        st = GNTTAB_UNMAP_GRANT_REF
        for i in range(count):
            at = arg + i * st.size
            _host, _bus, handle, _s = st.unpack(dom.arg_mem.read(at, st.size))
            try:
                m = unmap_grant(dom, handle)
                dom.counters["grant.unmaps"] += 1
                if dom.vcpu is not None and hasattr(dom.vcpu, "unmap_foreign_page"):
                    dom.vcpu.unmap_foreign_page(m)
                status = 0
            except GrantError as e:
                status = self._grant_status(dom, e)
            self._put(dom.arg_mem, at, GNTTAB_UNMAP_GRANT_REF_T, status=status)
        return 0

    def _gnttab_setup_table(self, dom: Domain, arg: int, count: int) -> int:
        st = GNTTAB_SETUP_TABLE
        if count != 1:
            raise _fail(Errno.EINVAL, "setup_table takes one argument")
        d, nr_frames, _s, frame_list = st.unpack(dom.arg_mem.read(arg, st.size))
        target = self._target(dom, d)
        gt = target.grant_table
        if nr_frames > gt.nr_frames:
            status = GntSt.general_error
        else:
            frames = b"".join(_U64.pack(gt.first_gfn + i) for i in range(nr_frames))
            dom.arg_mem.write(frame_list, frames)
            status = GntSt.okay
        self._put(dom.arg_mem, arg, GNTTAB_SETUP_TABLE_T, status=status)
        return 0

    def _gnttab_query_size(self, dom: Domain, arg: int, count: int) -> int:
        st = GNTTAB_QUERY_SIZE
        if count != 1:
            raise _fail(Errno.EINVAL, "query_size takes one argument")
        d, *_ = st.unpack(dom.arg_mem.read(arg, st.size))
        gt = self._target(dom, d).grant_table
        self._put(
            dom.arg_mem,
            arg,
            GNTTAB_QUERY_SIZE_T,
            nr_frames=gt.nr_frames,
            max_nr_frames=gt.nr_frames,
            status=0,
        )
        return 0
