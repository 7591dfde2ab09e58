"""The guest's side of a remote guest: a PyGuest in its own process, ``python -m pvio.remote.child FD``.

The host (:mod:`pvio.remote.host`) starts this with one end of a ``SOCK_SEQPACKET`` socket
as file descriptor ``FD``.  The child says HELLO, maps what WELCOME hands it (the guest's
RAM and the doorbell page, both sealed memfds; the upcall and kick eventfds), makes the
guest kernel named in the config (``"module:factory"``, called with the config's ``args``)
and runs it on its own trio loop, unchanged: the PyGuest and its drivers (netfront,
xenbus) see a :class:`ChildDomain` and a :class:`ChildHypervisor` that offer what they use
of a ``Domain`` and a ``Hypervisor``:

- a hypercall is a ``HYPERCALL`` message and a blocking wait for its answer (a trap: the
  guest's loop stops until the hypervisor has done it), except two that need nothing of
  the hypervisor's state: ``SCHEDOP_block`` (re-enable delivery and park, done here) and,
  with FEATURE_POSTED_SEND, ``EVTCHNOP_send`` (the SEND doorbell and the kick eventfd);
- the upcall eventfd wakes a task that raises, with :func:`pvio.core.evtchn.set_pending`
  (Xen's masking, pending and coalescing), every port the hypervisor rang in the RAISE
  doorbell, so this process is the only writer of its shared_info outside its hypercalls;
- time is the hypervisor's (its trio clock's offset is in WELCOME).

A backend child (the config's ``foreign_memory``: a driver domain, :mod:`pvio.remote.backend`)
also holds the RAM of the domains whose grants it maps (``FOREIGN``), keeps a view of each
mapped frame the host names (``MAPPED``; ``maptrack`` as in one process) and runs
``GNTTABOP_copy`` here, with the same C code and checks as the hypervisor's fast path, over
its own RAM and those domains' (:class:`ForeignDomain`); a copy naming a domain it has no
RAM of fails with ``bad_domain``.  Without the C fast path (``PVIO_NO_NATIVE=1``) copies go
to the host as any hypercall does.

The host is trusted here; the child exits when the host's socket closes.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import mmap
import os
import socket
import struct
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import trio

from pvio.abi import (
    GNTTAB_COPY,
    VCPU_INFO_SIZE,
    VCPU_UPCALL_MASK,
    VCPU_UPCALL_PENDING,
    Errno,
    EvtchnOp,
    GnttabOp,
    Hypercall,
    SchedOp,
)
from pvio.core import evtchn, fastpath
from pvio.core.counters import CounterRegistry, Counters
from pvio.core.domain import StartInfo
from pvio.core.evtchn import Channel
from pvio.core.grant_table import GrantMapping
from pvio.core.memory import GuestFault, GuestMemory, check_sealed_memfd
from pvio.remote import wire
from pvio.remote.wire import Msg, ProtocolError

log = logging.getLogger("pvio.remote.child")

_U32 = struct.Struct("<I")


class HostConnection:
    """The child's end of the socket: blocking request/reply for hypercalls, queued host calls."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        #: Called with each host message that is not a hypercall's answer.
        self.on_message: Callable[[wire.Message], None] = self._unexpected

    @staticmethod
    def _unexpected(msg: wire.Message) -> None:
        wire.close_fds(msg.fds)
        raise ProtocolError(f"unexpected {msg.kind.name} from the hypervisor")

    def send(self, data: bytes) -> None:
        """Send one message (blocking: the host always reads)."""
        self.sock.sendall(data)

    def recv(self, *, block: bool = True) -> wire.Message | None:
        """One message from the host (None: none waiting, when not blocking); EOFError if it left."""
        try:
            data, anc, flags, _ = self.sock.recvmsg(
                wire.MAX_MESSAGE, wire.fd_space(), 0 if block else socket.MSG_DONTWAIT
            )
        except BlockingIOError:
            return None
        if not data and not anc:
            raise EOFError("the hypervisor closed the connection")
        return wire.parse(data, anc, flags)

    def call(self, nr: int, args: tuple[int, ...]) -> int:
        """One hypercall through the host; other messages that arrive meanwhile are handled."""
        self.send(
            wire.encode(
                Msg.HYPERCALL, wire.HYPERCALL.pack(nr & wire.U64_MASK, *(a & wire.U64_MASK for a in args))
            )
        )
        while True:
            msg = self.recv()
            assert msg is not None
            if msg.kind == Msg.HYPERCALL_REPLY:
                return int(wire.HYPERCALL_REPLY.unpack(msg.payload)[0])
            self.on_message(msg)


class ChildHypercalls:
    """``hv.hypercalls`` as the child's PyGuest reaches it."""

    def __init__(self, child: Child) -> None:
        self.child = child

    def dispatch(
        self, dom: ChildDomain, nr: int, a1: int = 0, a2: int = 0, a3: int = 0, a4: int = 0, a5: int = 0
    ) -> int:
        """Handle the two hypercalls that are local (see the module doc), send the rest."""
        c = dom.counters
        c["exits"] += 1  # a trap out of the guest, wherever its handler runs (as in one process)
        c["exits.hypercall"] += 1
        c["hypercalls"] += 1
        if nr == Hypercall.sched_op and a1 == SchedOp.block:
            c["hypercalls.local"] += 1
            dom.vcpu_block()
            return 0
        if nr == Hypercall.event_channel_op and a1 == EvtchnOp.send and self.child.posted_send:
            try:
                (port,) = _U32.unpack(dom.mem.read(a2, 4))
            except GuestFault:
                port = 0
            if 0 < port < dom.max_ports:
                c["hypercalls.posted"] += 1
                self.child.send_bell.ring(port)
                wire.signal_eventfd(self.child.kick_fd)
                return 0
        native = self.child.native
        if nr == Hypercall.grant_table_op and a1 == GnttabOp.copy and native is not None:
            c["hypercalls.local"] += 1
            try:
                dom.mem.check(a2, a3 * GNTTAB_COPY.size)
            except GuestFault:
                return -int(Errno.EFAULT)
            fastpath.count_copies(c, *native.grant_copy(dom, a2, a3))  # type: ignore[arg-type]
            return 0
        c["hypercalls.remote"] += 1
        return self.child.conn.call(nr, (a1, a2, a3, a4, a5))


class ChildHypervisor:
    """What a PyGuest uses of the Hypervisor, in the guest's own process."""

    def __init__(self, child: Child, clock_offset: float) -> None:
        self.counters = CounterRegistry()
        self.hypercalls = ChildHypercalls(child)
        self._clock_offset = clock_offset

    def now_ns(self) -> int:
        """The hypervisor's system time (its trio clock, through the offset WELCOME gave)."""
        return int((time.perf_counter() + self._clock_offset) * 1e9)


@dataclass(frozen=True)
class GrantFrames:
    """Where a domain's grant table lies in its RAM (what the C grant copy reads)."""

    first_gfn: int = 0
    nr_entries: int = 0


class ForeignDomain:
    """Another domain's RAM in a backend child (``FOREIGN``): its pages and grant table, for
    mappings' views and local grant copies.  ``alive`` goes False on ``FOREIGN_GONE``; the RAM
    is unmapped once no view of it is left."""

    def __init__(self, domid: int, mem: GuestMemory, grant_table: GrantFrames) -> None:
        self.domid = domid
        self.mem = mem
        self.grant_table = grant_table
        self.alive = True

    def release_memory(self) -> bool:
        """Unmap the RAM once the domain is gone and nothing points into it (True then)."""
        if self.alive:
            return False
        self.mem.close()
        return bool(self.mem.mmap.closed)


class ChildDomain:
    """What a PyGuest and its drivers use of a Domain, in the guest's own process."""

    def __init__(
        self,
        hv: ChildHypervisor,
        domid: int,
        name: str,
        mem: GuestMemory,
        max_ports: int,
        grant_table: GrantFrames | None = None,
    ) -> None:
        self.hv = hv
        self.domid = domid
        self.name = name
        self.mem = mem
        self.max_ports = max_ports
        self.start_info_gfn = mem.nr_pages - 2  # pvio's memory map (pvio.core.domain)
        si = StartInfo(mem.page(self.start_info_gfn))
        self.shared_info_gfn = si.shared_info_gpa >> 12
        self.shared_info = mem.page(self.shared_info_gfn)
        self.vcpu_info = self.shared_info[:VCPU_INFO_SIZE]
        self.counters: Counters = hv.counters.new(f"dom{domid}")
        self.state = "running"
        self.vcpu: Any = None
        self.booted = trio.Event()
        self.on_destroy: list[Any] = []
        #: Grant mappings: a backend child's views of the frames the host mapped (``MAPPED``);
        #: for other children they stay empty (their mappings live in the host).
        self.maptrack: dict[int, GrantMapping] = {}
        self.grant_table = grant_table or GrantFrames()
        self.ports: dict[int, Channel] = {}
        self.raise_hook = None

    @property
    def alive(self) -> bool:
        """True while the process runs."""
        return self.state == "running"

    def kick(self) -> None:
        """An upcall is pending: wake the vCPU."""
        if self.vcpu is not None and self.alive:
            self.vcpu.kick()

    def vcpu_block(self) -> None:
        """SCHEDOP_block, as the hypervisor does it: re-enable delivery, park the vCPU."""
        self.shared_info[VCPU_UPCALL_MASK] = 0
        if self.vcpu is not None:
            self.vcpu.block()


def load_kernel(spec: str, args: dict[str, Any]) -> Any:
    """The guest kernel ``module:factory(**args)``."""
    module, _, attr = spec.partition(":")
    if not module or not attr:
        raise ValueError(f"kernel {spec!r} is not 'module:factory'")
    factory = getattr(importlib.import_module(module), attr)
    return factory(**args)


class Child:
    """One remote guest's process: the connection, the doorbells, the guest kernel."""

    def __init__(self, sock: socket.socket, features: int = wire.FEATURES) -> None:
        self.conn = HostConnection(sock)
        self.features = features
        self.posted_send = False
        self.kick_fd = -1
        self.upcall_fd = -1
        self.kernel: Any = None
        self.foreign_memory = False
        self.foreign: dict[int, ForeignDomain] = {}
        #: The C grant copy over this domain's RAM and the foreign domains' (a backend child
        #: with the fast path), else None: copies then go to the host.
        self.native: fastpath.NativeDomains | None = None

    def handshake(self) -> dict[str, Any]:
        """HELLO, then WELCOME (or REFUSE: ProtocolError with the host's reason)."""
        self.conn.send(wire.encode(Msg.HELLO, wire.HELLO.pack(self.features)))
        msg = self.conn.recv()
        assert msg is not None
        if msg.kind == Msg.REFUSE:
            raise ProtocolError(f"the hypervisor refused: {msg.payload.decode('utf-8', 'replace')}")
        if msg.kind != Msg.WELCOME or len(msg.fds) != len(wire.WELCOME_FDS):
            wire.close_fds(msg.fds)
            raise ProtocolError(f"expected WELCOME with {len(wire.WELCOME_FDS)} fds, got {msg.kind.name}")
        config = msg.json()
        ram_fd, doorbell_fd, self.upcall_fd, self.kick_fd = msg.fds
        self.posted_send = bool(config["features"] & wire.FEATURE_POSTED_SEND)
        self.foreign_memory = bool(config.get("foreign_memory"))
        self.mem = GuestMemory(config["nr_pages"], fd=ram_fd)
        os.close(ram_fd)  # the mapping stays
        self.mem.fd = None
        check_sealed_memfd(doorbell_fd, wire.DOORBELL_SIZE)
        self._doorbell = mmap.mmap(doorbell_fd, wire.DOORBELL_SIZE)
        os.close(doorbell_fd)
        view = memoryview(self._doorbell)
        self.raise_bell = wire.Doorbell(view[wire.DOORBELL_RAISE : wire.DOORBELL_RAISE + wire.DOORBELL_AREA])
        self.send_bell = wire.Doorbell(view[wire.DOORBELL_SEND : wire.DOORBELL_SEND + wire.DOORBELL_AREA])
        return dict(config)

    async def run(self) -> None:
        """Shake hands, boot the guest kernel and serve until the host goes away."""
        config = self.handshake()
        if config.get("cpus"):
            try:
                os.sched_setaffinity(0, set(config["cpus"]))
            except (OSError, ValueError) as e:  # a CPU this machine lacks: run anywhere
                log.warning("cannot pin to CPUs %s: %s", config["cpus"], e)
        self.hv = ChildHypervisor(self, float(config["clock_offset"]))
        frames = GrantFrames(int(config.get("gnttab_gfn", 0)), int(config.get("gnttab_entries", 0)))
        self.dom = dom = ChildDomain(
            self.hv, config["domid"], config["name"], self.mem, config["max_ports"], frames
        )
        if self.foreign_memory and fastpath.ENABLED:
            self.native = fastpath.NativeDomains()
            self._rebuild_native()
        self.kernel = kernel = load_kernel(config["kernel"], config.get("args") or {})
        kernel.attach(self.hv, dom)
        try:
            async with trio.open_nursery() as nursery:
                self.conn.on_message = lambda msg: self._host_message(msg, nursery)
                nursery.start_soon(self._deliver_upcalls)
                nursery.start_soon(self._serve_host)
                nursery.start_soon(self._report_booted)
                if isinstance(getattr(kernel, "ready", None), trio.Event):
                    nursery.start_soon(self._report_ready, config.get("announce_ethertype"))
                await kernel.run()
        except EOFError:
            return

    async def _report_booted(self) -> None:
        await self.dom.booted.wait()
        self.conn.send(wire.encode(Msg.BOOTED))

    async def _report_ready(self, ethertype: int | None) -> None:
        kernel = self.kernel
        await kernel.ready.wait()
        nic = getattr(kernel, "nic", None)
        if ethertype is not None and nic is not None:  # what the toolstack's announce sends
            await nic.send(nic.mac + nic.mac + struct.pack("!H", ethertype) + bytes(46))
        self.conn.send(wire.encode(Msg.READY))

    async def _deliver_upcalls(self) -> None:
        """Raise, in this process, every port the hypervisor rang; kick the vCPU for the rest."""
        fd = self.upcall_fd
        dom = self.dom
        bell = self.raise_bell
        while True:
            await trio.lowlevel.wait_readable(fd)
            if not wire.drain_eventfd(fd):
                continue
            dom.counters["remote.upcall_wakeups"] += 1
            for port in bell.changed():
                if 0 < port < dom.max_ports:
                    evtchn.set_pending(dom, port)  # type: ignore[arg-type]
            if dom.vcpu_info[VCPU_UPCALL_PENDING]:  # set by the hypervisor (EVTCHNOP_unmask)
                dom.kick()

    async def _serve_host(self) -> None:
        """Host messages outside hypercalls (APP_CALLs, each answered by a task)."""
        conn = self.conn
        while True:
            await trio.lowlevel.wait_readable(conn.sock)
            msg = conn.recv(block=False)
            if msg is not None:
                conn.on_message(msg)

    def _host_message(self, msg: wire.Message, nursery: trio.Nursery) -> None:
        if msg.kind == Msg.FOREIGN and self.foreign_memory:
            self._foreign_memory(msg)
            return
        wire.close_fds(msg.fds)
        if msg.kind == Msg.APP_CALL:
            nursery.start_soon(self._app_call, msg.json())
        elif msg.kind == Msg.MAPPED and self.foreign_memory:
            self._mapped(*wire.MAPPED.unpack(_sized(msg, wire.MAPPED.size)))
        elif msg.kind == Msg.UNMAPPED and self.foreign_memory:
            (handle,) = wire.UNMAPPED.unpack(_sized(msg, wire.UNMAPPED.size))
            m = self.dom.maptrack.pop(handle, None)
            if m is not None:
                with contextlib.suppress(BufferError):  # sub-views still held die with the RAM
                    m.view.release()
        elif msg.kind == Msg.FOREIGN_GONE and self.foreign_memory:
            (domid,) = wire.FOREIGN_GONE.unpack(_sized(msg, wire.FOREIGN_GONE.size))
            self._foreign_gone(domid)
        else:
            raise ProtocolError(f"unexpected {msg.kind.name} from the hypervisor")

    # ------------------------------------------------------------------ foreign memory
    def _foreign_memory(self, msg: wire.Message) -> None:
        """FOREIGN: map a granter's RAM (its memfd, checked as the guest's own RAM is)."""
        if len(msg.fds) != 1 or len(msg.payload) != wire.FOREIGN.size:
            wire.close_fds(msg.fds)
            raise ProtocolError(f"FOREIGN with {len(msg.fds)} fds and {len(msg.payload)} bytes")
        domid, nr_pages, gnttab_gfn, nr_entries = wire.FOREIGN.unpack(msg.payload)
        (fd,) = msg.fds
        try:
            mem = GuestMemory(nr_pages, fd=fd)
        finally:
            os.close(fd)  # the mapping stays
        mem.fd = None
        old = self.foreign.get(domid)
        if old is not None:  # a domid reused after FOREIGN_GONE was lost: the new one wins
            self._foreign_gone(domid)
        self.foreign[domid] = ForeignDomain(domid, mem, GrantFrames(gnttab_gfn, nr_entries))
        self._rebuild_native()

    def _mapped(self, handle: int, domid: int, ref: int, readonly: int, gfn: int) -> None:
        """MAPPED: the host pinned ``gfn`` of ``domid`` for ``handle``: keep a view of it."""
        granter = self.foreign.get(domid)
        if granter is None:
            raise ProtocolError(f"MAPPED of dom{domid}, whose RAM was never handed over")
        try:
            view = granter.mem.page(gfn)
        except GuestFault:
            raise ProtocolError(f"MAPPED of frame {gfn:#x} outside dom{domid}'s RAM") from None
        self.dom.maptrack[handle] = GrantMapping(
            handle, self.dom, granter, ref, gfn, bool(readonly),  # type: ignore[arg-type]
            view.toreadonly() if readonly else view,
        )  # fmt: skip

    def _foreign_gone(self, domid: int) -> None:
        """FOREIGN_GONE: the domain was destroyed; its mappings are revoked (a driver that still
        holds one lets go of it in grant_unmap, as in one process), its RAM goes with the last view."""
        granter = self.foreign.pop(domid, None)
        if granter is None:
            return
        granter.alive = False
        for handle, m in list(self.dom.maptrack.items()):
            if m.granter is granter:
                del self.dom.maptrack[handle]
        self._rebuild_native()
        granter.release_memory()

    def _rebuild_native(self) -> None:
        if self.native is not None:
            self.native.rebuild([self.dom, *self.foreign.values()])  # type: ignore[list-item]

    async def _app_call(self, request: dict[str, Any]) -> None:
        call_id = request.get("id")
        handler = getattr(self.kernel, "remote_call", None)
        try:
            if handler is None:
                raise ValueError(f"{type(self.kernel).__name__} answers no calls")
            reply: dict[str, Any] = {
                "id": call_id,
                "result": await handler(request.get("op"), **request.get("params", {})),
            }
        except Exception as e:  # the guest's own failure: the host gets it as an error
            reply = {"id": call_id, "error": f"{type(e).__name__}: {e}"}
        self.conn.send(wire.encode_json(Msg.APP_REPLY, reply, reply=True))


def _sized(msg: wire.Message, size: int) -> bytes:
    wire.expect_size(msg, size)
    return msg.payload


def child_counters(kernel: Any) -> dict[str, Any]:
    """The child's counters (``Snapshot.as_dict``: what ``remote_call("counters")`` answers)."""
    return dict(kernel.hv.counters.snapshot().as_dict())


def main(argv: list[str] | None = None) -> int:
    """``python -m pvio.remote.child FD``: run the remote guest on socket FD."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or not argv[0].isdigit():
        print("usage: python -m pvio.remote.child FD", file=sys.stderr)
        return 2
    logging.basicConfig(level=os.environ.get("PVIO_REMOTE_LOG", "WARNING"), format="%(name)s: %(message)s")
    sock = socket.socket(fileno=int(argv[0]))
    child = Child(sock)
    try:
        trio.run(child.run)
    except KeyboardInterrupt:
        return 130
    except BaseException as e:  # the guest crashed: say why to the host, then exit
        leaf = e
        while isinstance(leaf, BaseExceptionGroup) and len(leaf.exceptions) == 1:
            leaf = leaf.exceptions[0]
        if isinstance(leaf, EOFError):
            return 0
        reason = f"{type(leaf).__name__}: {leaf}"
        traceback.print_exception(e, file=sys.stderr)
        with contextlib.suppress(OSError):
            sock.sendall(wire.encode(Msg.CRASH, reason.encode()[: wire.MAX_PAYLOAD]))
        return 1
    return 0


if __name__ == "__main__":
    # Leave without the interpreter's teardown, as multiprocessing's children do: the guest's
    # ring and mapping views still lend their buffers to C, and clearing them in a garbage
    # cycle at exit only prints noise (or, before CPython 3.12, can crash: gh-77894).
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
