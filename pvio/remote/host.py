"""The hypervisor's side of a guest kernel that runs in its own OS process.

:class:`RemoteGuest` is a guest kernel (the core's ``GuestKernel``) like a PyGuest, given to
``hv.create_domain`` (or ``start_network``) the same way; its ``run`` starts the child
process (``python -m pvio.remote.child``), runs the handshake of :mod:`pvio.remote.wire`
and then serves the child until the domain is destroyed:

- the domain's RAM is a sealed memfd (``shared_memory``), mapped by both processes, so the
  guest's rings, grant table, xenstore page and shared_info are the same bytes in both;
- ``HYPERCALL`` messages are dispatched through the one hypercall table, on the domain,
  as if the guest had trapped in this process (it waits for the answer, as a vCPU does);
- ports raised on the domain go to the child (``Domain.raise_hook``: the RAISE doorbell and
  the upcall eventfd), which sets them pending with Xen's semantics in its own process;
- the guest's event sends arrive on the kick eventfd (the SEND doorbell) and are sent as
  ``EVTCHNOP_send`` from the domain, in order with its hypercalls (pending sends are taken
  before every hypercall is dispatched).

A *backend* (``foreign_memory=True``: a driver domain such as :mod:`pvio.remote.backend`)
also maps other domains' grants and grant-copies in its own process: when it maps a grant
of a domain for the first time, that domain's RAM memfd goes to it (``FOREIGN``), and each
mapping's frame (``MAPPED``) before the hypercall's answer.  The pin, the handle and every
check stay here; the child is trusted with those domains' memory as dom0 and a vhost-user
back end are (docs/architecture.md, "Processes").

A child that exits, is killed, sends a malformed message or breaks the handshake is a
crashed domain: the one-line reason is logged, the domain is destroyed (its ports, grants,
mappings and store presence go; netback tears its vif down as for any dead guest) and
every other domain runs on.  Nothing the child sends raises into the hypervisor, and the
host never blocks on the child: a child that stops reading only stalls its own task.
"""

from __future__ import annotations

import array
import collections
import contextlib
import itertools
import logging
import mmap
import os
import signal
import socket
import sys
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import trio

from pvio.abi import GntSt
from pvio.core.grant_table import GrantError, GrantMapping
from pvio.core.hypercall import HypercallError
from pvio.core.memory import sealed_memfd
from pvio.remote import wire
from pvio.remote.wire import Msg, ProtocolError

if TYPE_CHECKING:
    from pvio.core.domain import Domain
    from pvio.core.hypervisor import Hypervisor

log = logging.getLogger("pvio.remote")

EXIT_GRACE_S = 1.0  # a child given its socket's end has this long to exit before SIGKILL
HANDSHAKE_TIMEOUT_S = 30.0  # a child that has not said HELLO by then is refused
ANNOUNCE_ETHERTYPE = 0x88B5  # the toolstack's self-addressed frame (pvio.toolstack.announce)


class RemoteGuestError(Exception):
    """The remote guest's process broke the protocol, crashed or exited: why, in one line."""


@dataclass
class RemoteNic:
    """What the toolstack sees of a remote guest's NIC: its MAC (the toolstack's own, from the
    store, never the child's word)."""

    mac: bytes
    connected: bool = True


class RemoteVcpu:
    """The hypervisor's handle on the child's vCPU: a kick is a write to the upcall eventfd."""

    def __init__(self, guest: RemoteGuest) -> None:
        self.guest = guest

    def kick(self) -> None:
        """An upcall became pending: wake the child (it re-reads its shared_info)."""
        if self.guest.upcall_fd >= 0:
            wire.signal_eventfd(self.guest.upcall_fd)

    def block(self) -> None:
        """The child blocks in its own process (SCHEDOP_block is handled there)."""

    def map_foreign_page(self, _host_addr: int, mapping: GrantMapping) -> None:
        """The domain mapped a grant (inside its hypercall): a backend child is told the frame."""
        self.guest.mapped(mapping)

    def unmap_foreign_page(self, mapping: GrantMapping) -> None:
        """The domain unmapped a grant: a backend child lets go of its view."""
        self.guest.unmapped(mapping)


class RemoteGuest:
    """A guest kernel run by another process: ``kernel`` is ``"module:factory"`` there, called
    with ``args`` (JSON) to make a PyGuest (``pvio.remote.guests`` has ready-made ones).

    ``ready`` is set when the child's guest reports its own ``ready``; :meth:`call` asks the
    guest's application something (``remote_call`` in the child) and returns its JSON answer.
    ``cpus`` pins the child to those CPUs (the hypervisor's process may pin itself elsewhere,
    so that waking the child never preempts the hypervisor).  ``foreign_memory`` makes it a
    backend that maps and grant-copies other domains' pages in its own process (the module
    doc); only domains whose RAM is a memfd (a kernel with ``shared_memory``) can be mapped.
    """

    shared_memory = True  # the domain's RAM is a memfd (pvio.core.domain)
    announces_itself = True  # the child sends the toolstack's announce frame itself

    def __init__(
        self,
        kernel: str,
        name: str | None = None,
        *,
        args: dict[str, Any] | None = None,
        memory_pages: int = 2048,
        features: int = wire.FEATURES,
        handshake_timeout_s: float = HANDSHAKE_TIMEOUT_S,
        command: list[str] | None = None,
        cpus: set[int] | None = None,
        foreign_memory: bool = False,
    ) -> None:
        self.kernel = kernel
        self.foreign_memory = foreign_memory
        self.name = name
        self.args = dict(args or {})
        self.memory_pages = memory_pages
        self.features = features  # what this host offers (tests narrow it)
        self.handshake_timeout_s = handshake_timeout_s
        self.command = command or [sys.executable, "-m", "pvio.remote.child"]
        self.cpus = cpus  # the CPUs the child may run on (sched_setaffinity); None: any
        self.ready = trio.Event()
        self.nic: RemoteNic | None = None
        self.process: trio.Process | None = None
        self.upcall_fd = -1
        self.kick_fd = -1
        self.disconnect_reason: str | None = None
        self.hv: Hypervisor
        self.domain: Domain
        self._sock: trio.socket.SocketType | None = None
        self._raise_bell: wire.Doorbell | None = None
        self._send_bell: wire.Doorbell | None = None
        self._doorbell_map: mmap.mmap | None = None
        self._doorbell_view: memoryview | None = None
        self._doorbell_fd = -1
        self._calls: dict[int, tuple[trio.Event, list[Any]]] = {}
        self._call_ids = itertools.count(1)
        self._booted = False
        self._features = 0
        # Messages made inside a hypercall (FOREIGN, MAPPED, ...) or by another domain's
        # destruction (FOREIGN_GONE): (bytes, fds to send and then close).  Sent in order,
        # under the send lock, before any hypercall's answer.
        self._outbox: collections.deque[tuple[bytes, list[int]]] = collections.deque()
        self._outbox_ready = trio.Event()
        self._send_lock = trio.Lock()
        self._foreign: set[int] = set()  # domids whose RAM the child has

    # ------------------------------------------------------------------ GuestKernel
    def attach(self, hv: Hypervisor, dom: Domain) -> None:
        """Called at domain creation: take over the domain's vCPU and event delivery."""
        self.hv = hv
        self.domain = dom
        if dom.mem.fd is None:
            raise ValueError(f"dom{dom.domid}: a remote guest needs its RAM in a memfd")
        if dom.max_ports > wire.DOORBELL_PORTS:
            raise ValueError(
                f"dom{dom.domid}: {dom.max_ports} ports exceed the doorbell's {wire.DOORBELL_PORTS}"
            )
        # The doorbell and the eventfds exist from the start: ports raised before the child
        # has connected (the store's at boot) are counted and delivered once it has.
        doorbell_fd = sealed_memfd("pvio-doorbell", wire.DOORBELL_SIZE)
        try:
            self._doorbell_map = mmap.mmap(doorbell_fd, wire.DOORBELL_SIZE)
        except BaseException:
            os.close(doorbell_fd)
            raise
        self._doorbell_fd = doorbell_fd
        view = self._doorbell_view = memoryview(self._doorbell_map)
        self._raise_bell = wire.Doorbell(view[wire.DOORBELL_RAISE : wire.DOORBELL_RAISE + wire.DOORBELL_AREA])
        self._send_bell = wire.Doorbell(view[wire.DOORBELL_SEND : wire.DOORBELL_SEND + wire.DOORBELL_AREA])
        self.upcall_fd = wire.new_eventfd()
        self.kick_fd = wire.new_eventfd()
        dom.vcpu = RemoteVcpu(self)
        dom.raise_hook = self._raise
        # A domain destroyed before it ever ran leaves no descriptor behind either.
        dom.on_destroy.append(lambda _dom: self._release() if self.process is None else None)

    async def run(self) -> None:
        """Start the child, shake hands, serve it; its death or misbehaviour raises
        RemoteGuestError (the hypervisor crashes the domain with that reason)."""
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            with child:
                self.process = await trio.lowlevel.open_process(
                    [*self.command, str(child.fileno())], pass_fds=(child.fileno(),)
                )
            self._sock = trio.socket.from_stdlib_socket(parent)
            try:
                await self._serve()
            except ProtocolError as e:
                self.disconnect_reason = f"disconnected for breaking the protocol: {e}"
                raise RemoteGuestError(self.disconnect_reason) from None
            except RemoteGuestError as e:
                self.disconnect_reason = str(e)
                raise
        finally:
            with trio.CancelScope(shield=True):
                await self._teardown()

    # ------------------------------------------------------------------ serving
    async def _serve(self) -> None:
        """Run the process watcher, the kick watcher and the message loop; the first of them
        to fail stops the others, and its reason is the one raised."""
        failures: list[Exception] = []
        async with trio.open_nursery() as nursery:

            async def guard(fn: Any) -> None:
                try:
                    await fn()
                except (ProtocolError, RemoteGuestError) as e:
                    failures.append(e)
                    nursery.cancel_scope.cancel()

            async def messages() -> None:
                await self._handshake()
                nursery.start_soon(guard, self._watch_kicks)
                if self.foreign_memory:
                    nursery.start_soon(guard, self._post_outbox)
                while True:
                    await self._handle(await self._recv())

            nursery.start_soon(guard, self._watch_process)
            nursery.start_soon(guard, messages)
        if failures:
            raise failures[0]

    async def _handshake(self) -> None:
        hello: wire.Message | None = None
        with trio.move_on_after(self.handshake_timeout_s):
            hello = await self._recv()
        if hello is None:
            await self._refuse(f"no HELLO within {self.handshake_timeout_s:g} s")
        assert hello is not None
        if hello.kind != Msg.HELLO:
            await self._refuse(f"the first message is {hello.kind.name}, not HELLO")
        if len(hello.payload) != wire.HELLO.size:
            await self._refuse(f"HELLO of {len(hello.payload)} bytes, not {wire.HELLO.size}")
        (wanted,) = wire.HELLO.unpack(hello.payload)
        if wanted & ~self.features:
            await self._refuse(
                f"features {wanted & ~self.features:#x} are not offered (offered {self.features:#x})"
            )
        self._features = wanted
        dom = self.domain
        assert dom.mem.fd is not None
        config = {
            "domid": dom.domid,
            "name": dom.name,
            "nr_pages": dom.mem.nr_pages,
            "max_ports": dom.max_ports,
            "features": wanted,
            "memory": [{"gpa": 0, "size": dom.mem.size, "fd": 0, "offset": 0}],
            "clock_offset": trio.current_time() - time.perf_counter(),
            "kernel": self.kernel,
            "args": self.args,
            "announce_ethertype": ANNOUNCE_ETHERTYPE,
            "cpus": sorted(self.cpus) if self.cpus is not None else None,
            "foreign_memory": self.foreign_memory,
            "gnttab_gfn": dom.grant_table.first_gfn,
            "gnttab_entries": dom.grant_table.nr_entries,
        }
        fds = [dom.mem.fd, self._doorbell_fd, self.upcall_fd, self.kick_fd]
        await self._send_with_fds(wire.encode_json(Msg.WELCOME, config, reply=True), fds)
        if self._doorbell_fd >= 0:  # the child has its own now; the mapping stays
            os.close(self._doorbell_fd)
            self._doorbell_fd = -1
        # The RAM's memfd stays open while the domain lives: a backend in another process
        # (a driver domain) is handed it when it maps this guest's grants.
        wire.signal_eventfd(self.upcall_fd)  # what was raised before it connected

    async def _handle(self, msg: wire.Message) -> None:
        kind = msg.kind
        if kind == Msg.HYPERCALL:
            wire.expect_size(msg, wire.HYPERCALL.size)
            nr, a1, a2, a3, a4, a5 = wire.HYPERCALL.unpack(msg.payload)
            self._drain_sends()
            dom = self.domain
            dom.counters["remote.hypercalls"] += 1
            rc = self.hv.hypercalls.dispatch(dom, nr, a1, a2, a3, a4, a5)
            if dom.alive:
                async with self._send_lock:  # what the hypercall made goes first (MAPPED, ...)
                    await self._flush_outbox()
                    await self._send_unlocked(
                        wire.encode(Msg.HYPERCALL_REPLY, wire.HYPERCALL_REPLY.pack(rc), reply=True)
                    )
        elif kind == Msg.BOOTED:
            wire.expect_size(msg, 0)
            if self._booted:
                raise ProtocolError("BOOTED twice")
            self._booted = True
            self.domain.booted.set()
        elif kind == Msg.READY:
            wire.expect_size(msg, 0)
            self.nic = RemoteNic(self._vif_mac())
            self.ready.set()
        elif kind == Msg.APP_REPLY:
            if not self._features & wire.FEATURE_APP:
                raise ProtocolError("APP_REPLY without the app feature")
            self._app_reply(msg.json())
        elif kind == Msg.CRASH:
            reason = msg.payload[:200].decode("utf-8", "replace").replace("\n", " ")
            raise RemoteGuestError(f"the guest's process reported a crash: {reason}")
        else:
            raise ProtocolError(f"unexpected {kind.name} from the guest")

    def _vif_mac(self) -> bytes:
        from pvio.abi.vif import parse_mac

        try:
            text = self.hv.toolstack.read(f"/local/domain/{self.domain.domid}/device/vif/0/mac")
            return parse_mac(text.decode())
        except Exception:  # no vif: nothing for the switch to learn
            return b""

    def _app_reply(self, reply: Any) -> None:
        if not isinstance(reply, dict) or not isinstance(reply.get("id"), int):
            raise ProtocolError("APP_REPLY is not an object with an integer id")
        waiter = self._calls.pop(reply["id"], None)
        if waiter is None:
            raise ProtocolError(f"APP_REPLY for call {reply['id']}, which is not outstanding")
        waiter[1].append(reply)
        waiter[0].set()

    async def call(self, op: str, **params: Any) -> Any:
        """Ask the child's guest application ``op`` (its ``remote_call``); its JSON result.

        Raises RemoteGuestError with the guest's message if it answered an error, or if the
        guest is gone before it answered."""
        if self._sock is None or not self._features & wire.FEATURE_APP:
            raise RemoteGuestError(f"{self.name}: not connected (or no app feature)")
        call_id = next(self._call_ids)
        done = trio.Event()
        box: list[Any] = []
        self._calls[call_id] = (done, box)
        await self._send(wire.encode_json(Msg.APP_CALL, {"id": call_id, "op": op, "params": params}))
        await done.wait()
        if not box:
            raise RemoteGuestError(f"{self.name}: gone before answering {op!r}: {self.disconnect_reason}")
        reply = box[0]
        if "error" in reply:
            raise RemoteGuestError(f"{self.name}: {op!r} failed: {str(reply['error'])[:200]}")
        return reply.get("result")

    # ------------------------------------------------------------------ foreign memory
    def mapped(self, m: GrantMapping) -> None:
        """The child (a backend) mapped grant ``m``: hand it the granter's RAM the first time,
        then the frame (inside the hypercall; sent before its answer).  A granter whose RAM is
        not a memfd cannot be handed over: GrantError (the map fails with general_error)."""
        if not self.foreign_memory:
            return
        granter = m.granter
        if granter.domid not in self._foreign:
            if granter.mem.fd is None:
                raise GrantError(
                    GntSt.general_error,
                    f"dom{granter.domid}'s RAM is not shared (its kernel has no shared_memory): "
                    f"a backend in another process cannot map it",
                )
            gt = granter.grant_table
            payload = wire.FOREIGN.pack(granter.domid, granter.mem.nr_pages, gt.first_gfn, gt.nr_entries)
            self._post(wire.encode(Msg.FOREIGN, payload), [os.dup(granter.mem.fd)])
            self._foreign.add(granter.domid)
            granter.on_destroy.append(self._granter_gone)
        mapped = wire.MAPPED.pack(m.handle, granter.domid, m.ref, m.readonly, m.gfn)
        self._post(wire.encode(Msg.MAPPED, mapped))

    def unmapped(self, m: GrantMapping) -> None:
        """The child unmapped ``m`` (inside the hypercall): it lets go of its view."""
        if self.foreign_memory:
            self._post(wire.encode(Msg.UNMAPPED, wire.UNMAPPED.pack(m.handle)))

    def _granter_gone(self, granter: Domain) -> None:
        """A domain the child has the RAM of was destroyed: its grants and mappings are gone."""
        if granter.domid in self._foreign and self.domain.alive:
            self._foreign.discard(granter.domid)
            self._post(wire.encode(Msg.FOREIGN_GONE, wire.FOREIGN_GONE.pack(granter.domid)))

    def _post(self, data: bytes, fds: list[int] | None = None) -> None:
        self._outbox.append((data, fds or []))
        self._outbox_ready.set()

    async def _post_outbox(self) -> None:
        """Send what was posted outside a hypercall (FOREIGN_GONE) as soon as it is."""
        while True:
            await self._outbox_ready.wait()
            self._outbox_ready = trio.Event()
            async with self._send_lock:
                await self._flush_outbox()

    async def _flush_outbox(self) -> None:
        """Send the posted messages in order (the caller holds the send lock)."""
        while self._outbox:
            data, fds = self._outbox.popleft()
            try:
                if fds:
                    await self._send_with_fds(data, fds)
                else:
                    await self._send_unlocked(data)
            finally:
                wire.close_fds(fds)

    # ------------------------------------------------------------------ events
    def _raise(self, port: int) -> None:
        """Domain.raise_hook: count the raise in the doorbell, wake the child."""
        bell = self._raise_bell
        if bell is None or not 0 <= port < wire.DOORBELL_PORTS:  # torn down already
            return
        self.domain.counters["remote.raises"] += 1
        bell.ring(port)
        wire.signal_eventfd(self.upcall_fd)

    async def _watch_kicks(self) -> None:
        fd = self.kick_fd
        while True:
            await trio.lowlevel.wait_readable(fd)
            if wire.drain_eventfd(fd):
                self.domain.counters["remote.kick_wakeups"] += 1
                self._drain_sends()

    def _drain_sends(self) -> None:
        """Send every port the guest rang since the last look, once each (they coalesce)."""
        bell = self._send_bell
        dom = self.domain
        if bell is None or not dom.alive:
            return
        for port in bell.changed():
            dom.counters["remote.sends"] += 1
            try:
                self.hv.hypercalls.evtchn_send(dom, port)
            except HypercallError:  # a port it does not have: as the hypercall would, counted
                dom.counters["remote.bad_sends"] += 1
            if not dom.alive:
                return

    # ------------------------------------------------------------------ process and socket
    async def _watch_process(self) -> None:
        assert self.process is not None
        status = await self.process.wait()
        raise RemoteGuestError(f"the guest's process {self.process.pid} {_describe_exit(status)}")

    async def _recv(self) -> wire.Message:
        assert self._sock is not None
        try:
            data, anc, flags, _ = await self._sock.recvmsg(wire.MAX_MESSAGE, wire.fd_space())
        except OSError as e:
            raise RemoteGuestError(f"the guest's socket failed: {e}") from None
        if not data and not anc:
            await self._exit_reason("closed its socket")
        try:
            msg = wire.parse(data, anc, flags)
        except ProtocolError as e:
            wire.close_fds(wire.refused_fds(e))
            raise
        if msg.fds:
            wire.close_fds(msg.fds)
            raise ProtocolError(f"{msg.kind.name} carried {len(msg.fds)} file descriptors")
        return msg

    async def _exit_reason(self, what: str) -> None:
        """The socket ended: give the process a moment to be reaped, then say how it ended."""
        assert self.process is not None
        with trio.move_on_after(1.0):
            status = await self.process.wait()
            raise RemoteGuestError(f"the guest's process {self.process.pid} {_describe_exit(status)}")
        raise RemoteGuestError(f"the guest's process {self.process.pid} {what}")

    async def _send(self, data: bytes) -> None:
        async with self._send_lock:
            await self._send_unlocked(data)

    async def _send_unlocked(self, data: bytes) -> None:
        assert self._sock is not None
        try:
            await self._sock.send(data)
        except OSError as e:
            raise RemoteGuestError(f"the guest's socket failed: {e}") from None

    async def _send_with_fds(self, data: bytes, fds: list[int]) -> None:
        assert self._sock is not None
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
        try:
            await self._sock.sendmsg([data], anc)
        except OSError as e:
            raise RemoteGuestError(f"the guest's socket failed: {e}") from None

    async def _refuse(self, reason: str) -> None:
        with contextlib.suppress(OSError, RemoteGuestError):
            await self._send(wire.encode(Msg.REFUSE, reason.encode()[: wire.MAX_PAYLOAD], reply=True))
        raise ProtocolError(f"handshake refused: {reason}")

    async def _teardown(self) -> None:
        """Stop the child and let go of every descriptor and mapping (idempotent)."""
        for waiter in self._calls.values():
            waiter[0].set()
        self._calls.clear()
        while self._outbox:  # fds posted and never sent
            wire.close_fds(self._outbox.popleft()[1])
        proc = self.process
        if self._sock is not None:
            self._sock.close()  # the child's cue to exit
        if proc is not None and proc.returncode is None:
            with trio.move_on_after(EXIT_GRACE_S):
                await proc.wait()
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            with trio.move_on_after(5.0):
                await proc.wait()
        self._release()

    def _release(self) -> None:
        """Close the eventfds, the doorbell and the memfds (idempotent)."""
        for fd in (self.upcall_fd, self.kick_fd):
            if fd >= 0:
                os.close(fd)
        self.upcall_fd = self.kick_fd = -1
        for bell in (self._raise_bell, self._send_bell):
            if bell is not None:
                bell.release()
        self._raise_bell = self._send_bell = None
        if self._doorbell_view is not None:
            self._doorbell_view.release()
            self._doorbell_view = None
        if self._doorbell_map is not None:
            self._doorbell_map.close()
            self._doorbell_map = None
        self._close_memfds()
        self.domain.release_memory()  # the RAM's mapping too, once the domain is dead and nothing maps it

    def _close_memfds(self) -> None:
        mem = self.domain.mem
        if mem.fd is not None:
            os.close(mem.fd)
            mem.fd = None
        if self._doorbell_fd >= 0:
            os.close(self._doorbell_fd)
            self._doorbell_fd = -1


def _describe_exit(status: int) -> str:
    if status < 0:
        try:
            return f"was killed by {signal.Signals(-status).name}"
        except ValueError:
            return f"was killed by signal {-status}"
    return f"exited with status {status}"
