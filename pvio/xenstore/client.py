"""The guest's end of the xenstore wire protocol (like Linux's xenbus_xs.c): :class:`XenbusClient`,
its transactions and watches, and :func:`loopback` (a client and a server connection on one page).

See :mod:`pvio.xenstore.server` for the design of the wire layer as a whole.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Sequence
from contextlib import asynccontextmanager, suppress
from typing import TypeVar

import trio

from pvio.xenstore.server import RingConnection
from pvio.xenstore.store import XSD_ERRORS, Store, XenstoreError
from pvio.xenstore.wire import (
    DECIMAL,
    MASK32,
    OFFSET_ERROR,
    OFFSET_REQ,
    OFFSET_REQ_CONS,
    OFFSET_REQ_PROD,
    OFFSET_RSP,
    OFFSET_RSP_CONS,
    OFFSET_RSP_PROD,
    PAGE_SIZE,
    U32,
    XENSTORE_PAYLOAD_MAX,
    XENSTORE_RING_SIZE,
    ByteRing,
    MessageReader,
    RingFault,
    XenbusState,
    XsHeader,
    XsType,
    as_page,
    decode_token,
    encode_message,
)

logger = logging.getLogger("pvio.xenstore")

T = TypeVar("T")

UNWATCH_TIMEOUT_S = 5.0  # how long leaving a ``with watch`` block waits for the store's answer
UNWATCH_CANCELLED_S = 0.1  # ... when it is left because the task was cancelled


# ----------------------------------------------------------------------------------------------
# The guest side


class _Waiter:
    __slots__ = ("error", "event", "reply")

    def __init__(self) -> None:
        self.event = trio.Event()
        self.reply: tuple[int, bytes] | None = None
        self.error: XenstoreError | None = None


def _arg(text: str, what: str = "path") -> bytes:
    if not isinstance(text, str):
        raise TypeError(f"xenstore {what} must be str, not {type(text).__name__}")
    if "\0" in text:
        raise ValueError(f"xenstore {what} {text!r} contains a NUL byte")
    return text.encode() + b"\0"


class _Operations:
    """Node operations shared by the client and its transactions (which differ only in tx_id)."""

    async def _request(self, msg_type: XsType, payload: bytes, path: str) -> bytes:
        raise NotImplementedError

    async def read_bytes(self, path: str) -> bytes:
        return await self._request(XsType.READ, _arg(path), path)

    async def read(self, path: str) -> str:
        """The node's value as text; EINVAL if it is not UTF-8 (use :meth:`read_bytes` for raw)."""
        raw = await self.read_bytes(path)
        try:
            return raw.decode()
        except UnicodeDecodeError:
            raise XenstoreError("EINVAL", path, f"value {raw[:32]!r} is not UTF-8") from None

    async def read_int(self, path: str) -> int:
        """The node's value as a decimal integer; EINVAL if it is not one."""
        text = await self.read(path)
        if not DECIMAL.fullmatch(text):
            raise XenstoreError("EINVAL", path, f"value {text[:32]!r} is not a decimal integer")
        return int(text)

    async def exists(self, path: str) -> bool:
        try:
            await self.read_bytes(path)
        except XenstoreError as err:
            if err.errno == "ENOENT":
                return False
            raise
        return True

    async def write(self, path: str, value: str | bytes) -> None:
        data = value.encode() if isinstance(value, str) else bytes(value)
        await self._request(XsType.WRITE, _arg(path) + data, path)

    async def mkdir(self, path: str) -> None:
        await self._request(XsType.MKDIR, _arg(path), path)

    async def rm(self, path: str) -> None:
        await self._request(XsType.RM, _arg(path), path)

    async def directory(self, path: str) -> list[str]:
        reply = await self._request(XsType.DIRECTORY, _arg(path), path)
        return _reply_strings(reply, path)

    async def get_perms(self, path: str) -> list[str]:
        reply = await self._request(XsType.GET_PERMS, _arg(path), path)
        return _reply_strings(reply, path)

    async def set_perms(self, path: str, perms: Sequence[str]) -> None:
        if isinstance(perms, str):
            raise TypeError("perms must be a list of entries such as ['n1', 'r0'], not one string")
        payload = _arg(path) + b"".join(_arg(p, "permission") for p in perms)
        await self._request(XsType.SET_PERMS, payload, path)


def _reply_strings(reply: bytes, path: str) -> list[str]:
    if not reply:
        return []
    if not reply.endswith(b"\0"):
        raise XenstoreError("EIO", path, "reply list is not NUL-terminated")
    try:
        return reply[:-1].decode("ascii").split("\0")
    except UnicodeDecodeError:
        raise XenstoreError("EIO", path, "reply list is not ASCII") from None


class Transaction(_Operations):
    """A transaction's view of the store; get one from ``async with client.transaction() as t``."""

    def __init__(self, client: XenbusClient, tx_id: int) -> None:
        self.client = client
        self.tx_id = tx_id

    async def _request(self, msg_type: XsType, payload: bytes, path: str) -> bytes:
        return await self.client._call(msg_type, payload, self.tx_id, path)


class Watch:
    """A registered watch: ``async for path, token in watch`` or ``await watch.next()``.

    Events beyond ``backlog`` unread ones are dropped and counted in :attr:`dropped` (re-read the
    state when you see an event rather than counting events).  After :meth:`unwatch` iteration ends;
    if the connection dies, :meth:`next` raises the client's error.
    """

    def __init__(self, client: XenbusClient, path: str, token: str, backlog: int) -> None:
        self.client = client
        self.path = path
        self.token = token
        self.dropped = 0
        self._send, self._recv = trio.open_memory_channel[tuple[str, str]](backlog)

    def _deliver(self, path: str, token: str) -> None:
        try:
            self._send.send_nowait((path, token))
        except trio.WouldBlock:
            self.dropped += 1
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            pass

    def _close(self) -> None:
        self._send.close()

    async def next(self) -> tuple[str, str]:
        """The next event ``(path, token)``; trio.EndOfChannel once unwatched."""
        try:
            return await self._recv.receive()
        except trio.EndOfChannel:
            if self.client.error is not None:
                raise XenstoreError("EIO", self.path, self.client.error.detail) from None
            raise

    def __aiter__(self) -> Watch:
        return self

    async def __anext__(self) -> tuple[str, str]:
        try:
            return await self.next()
        except trio.EndOfChannel:
            raise StopAsyncIteration from None

    async def unwatch(self) -> None:
        await self.client._unwatch(self)

    async def __aenter__(self) -> Watch:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        # Unwatch even when cancelled, but never wait forever: when the guest is being torn
        # down the store may not answer any more (xenstored drops a dead connection's watches).
        cancelled = exc_type is not None and issubclass(exc_type, trio.Cancelled)
        with trio.CancelScope(shield=True) as scope:
            scope.deadline = trio.current_time() + (UNWATCH_CANCELLED_S if cancelled else UNWATCH_TIMEOUT_S)
            try:
                await self.unwatch()
            except (OSError, XenstoreError):
                if not cancelled:
                    raise
                # Cancelled because the domain is going: its store channel may be closed already.
        if scope.cancelled_caught or cancelled:
            self.client._forget(self)


class XenbusClient(_Operations):
    """The guest's xenstore client on its ring page (what Linux's xenbus_xs.c is to a PV guest).

    ``kick()`` signals the store event channel; call :meth:`on_event` (synchronously) from the
    guest's handler when that channel fires.  Operations raise :class:`XenstoreError`; a payload
    over 4096 bytes raises ValueError before anything touches the ring.
    """

    def __init__(
        self, page: memoryview | bytearray, kick: Callable[[], None], *, watch_backlog: int = 256
    ) -> None:
        self._page = as_page(page)
        self._kick = kick
        self._watch_backlog = watch_backlog
        self._req = ByteRing(self._page, OFFSET_REQ, OFFSET_REQ_CONS, OFFSET_REQ_PROD)
        self._rsp = ByteRing(self._page, OFFSET_RSP, OFFSET_RSP_CONS, OFFSET_RSP_PROD)
        self._req_prod = self._req.load_prod()
        self._rsp_cons = self._rsp.load_cons()
        self._reader = MessageReader()
        self._waiters: dict[int, _Waiter] = {}
        self._watches: dict[str, list[Watch]] = {}
        self._send_lock = trio.Lock()
        self._space = trio.Event()
        self._req_ids = itertools.count(1)
        self._tokens = itertools.count(1)
        self._in_event = False
        self._event_again = False
        self.error: XenstoreError | None = None

    # -- public API beyond node operations -----------------------------------------------------

    async def _request(self, msg_type: XsType, payload: bytes, path: str) -> bytes:
        return await self._call(msg_type, payload, 0, path)

    async def watch(self, path: str, token: str | None = None) -> Watch:
        """Watch ``path``; the first event arrives at once.  ``token`` defaults to a unique one."""
        if token is None:
            token = f"pvio-watch-{next(self._tokens)}"
        watch = Watch(self, path, token, self._watch_backlog)
        self._watches.setdefault(token, []).append(watch)
        try:
            await self._request(XsType.WATCH, _arg(path) + _arg(token, "token"), path)
        except BaseException:
            self._forget(watch)
            raise
        return watch

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[Transaction]:
        """``async with client.transaction() as t``: commit on exit (XenstoreError EAGAIN on
        conflict), abort if the block raises."""
        reply = await self._call(XsType.TRANSACTION_START, b"\0", 0, "")
        try:
            tx_id = int(reply.rstrip(b"\0"))
        except ValueError:
            raise XenstoreError("EIO", detail=f"bad transaction id {reply[:16]!r}") from None
        t = Transaction(self, tx_id)
        try:
            yield t
        except BaseException:
            with trio.CancelScope(shield=True), suppress(XenstoreError):
                await self._call(XsType.TRANSACTION_END, b"F\0", tx_id, "")
            raise
        await self._call(XsType.TRANSACTION_END, b"T\0", tx_id, "")

    async def retry_transaction(self, fn: Callable[[Transaction], Awaitable[T]], *, attempts: int = 64) -> T:
        """Run ``fn(t)`` in a transaction, starting over on EAGAIN (at most ``attempts`` times)."""
        for attempt in range(1, attempts + 1):
            try:
                async with self.transaction() as t:
                    result = await fn(t)
                return result
            except XenstoreError as err:
                if err.errno != "EAGAIN" or attempt == attempts:
                    raise
        raise ValueError(f"attempts must be at least 1, not {attempts}")

    async def get_domain_path(self, domid: int) -> str:
        reply = await self._request(XsType.GET_DOMAIN_PATH, _arg(str(domid), "domid"), "")
        return reply.rstrip(b"\0").decode("ascii", "replace")

    async def switch_state(self, dir: str, state: XenbusState | int) -> None:
        """Set ``<dir>/state``, in a transaction and only if it differs (no spurious watch events),
        as Linux's xenbus_switch_state does."""
        new = XenbusState(state)
        path = f"{dir}/state"

        async def switch(t: Transaction) -> None:
            try:
                current = await t.read(path)
            except XenstoreError as err:
                if err.errno != "ENOENT":
                    raise
                current = None
            if current != str(int(new)):
                await t.write(path, str(int(new)))

        await self.retry_transaction(switch)

    async def read_state(self, path: str) -> XenbusState:
        """A device's state (``path`` is its directory or its ``state`` node); missing, unreadable
        or garbage values read as UNKNOWN, as Linux's xenbus_read_driver_state.  (A node whose
        domain's directory is gone reads EACCES, as in C xenstored: the nearest ancestor left
        is not ours to read.)"""
        try:
            value = await self.read(_state_node(path))
            return XenbusState(int(value))
        except (XenstoreError, ValueError) as err:
            if isinstance(err, XenstoreError) and err.errno not in ("ENOENT", "EINVAL", "EACCES"):
                raise
            return XenbusState.UNKNOWN

    async def wait_for_state(
        self,
        path: str,
        predicate_or_states: Callable[[XenbusState], bool] | XenbusState | Collection[XenbusState],
    ) -> XenbusState:
        """Wait (with a watch) until the state at ``path`` (a device directory or its ``state``
        node) satisfies the predicate or is one of the states; return that state."""
        want = predicate_or_states
        if callable(want):
            accept = want
        elif isinstance(want, int):
            accept = XenbusState(want).__eq__
        else:
            states = frozenset(XenbusState(s) for s in want)
            accept = states.__contains__
        async with await self.watch(_state_node(path)) as watch:
            async for _ in watch:
                state = await self.read_state(path)
                if accept(state):
                    return state
        raise XenstoreError("EIO", path, "watch ended before the state was reached")

    # -- the event handler ---------------------------------------------------------------------

    def on_event(self) -> None:
        """The store event channel fired: take replies and watch events off the ring.  Never raises
        for anything the server wrote; a broken server kills the client (EIO)."""
        if self._in_event:
            self._event_again = True
            return
        self._in_event = True
        try:
            while True:
                self._event_again = False
                self._drain()
                if not self._event_again:
                    break
        finally:
            self._in_event = False

    def _drain(self) -> None:
        if self.error is not None:
            return
        error = int(U32.unpack_from(self._page, OFFSET_ERROR)[0])
        if error:
            self._die(f"xenstored closed the connection with error {error}")
            return
        prod = self._rsp.load_prod()
        avail = (prod - self._rsp_cons) & MASK32
        if avail > XENSTORE_RING_SIZE:
            self._die(f"impossible response ring indices rsp_prod={prod:#x} rsp_cons={self._rsp_cons:#x}")
            return
        if avail:
            data = self._rsp.copy_out(self._rsp_cons, avail)
            self._rsp_cons = (self._rsp_cons + avail) & MASK32
            self._rsp.store_cons(self._rsp_cons)
            self._reader.feed(data)
        try:
            while (message := self._reader.next()) is not None:
                self._dispatch(*message)
        except RingFault as fault:
            self._die(f"bad message from xenstored: {fault.reason}")
            return
        self._space.set()  # req_cons may have moved: let a blocked writer look again
        if avail:
            self._kick()  # the server may be waiting for room in the response ring

    def _dispatch(self, header: XsHeader, payload: bytes) -> None:
        if header.type == XsType.WATCH_EVENT:
            parts = payload.split(b"\0")
            if len(parts) < 2:
                logger.warning("xenstore client: malformed watch event %r ignored", payload[:64])
                return
            path = parts[0].decode("utf-8", "replace")
            token = decode_token(parts[1])
            for watch in self._watches.get(token, ()):
                watch._deliver(path, token)
            return
        waiter = self._waiters.pop(header.req_id, None)
        if waiter is None:
            logger.debug("xenstore client: reply to unknown req_id %d ignored", header.req_id)
            return
        waiter.reply = (header.type, payload)
        waiter.event.set()

    def _die(self, detail: str) -> None:
        logger.warning("xenstore client: connection lost: %s", detail)
        self.error = XenstoreError("EIO", detail=detail)
        for waiter in self._waiters.values():
            waiter.error = XenstoreError("EIO", detail=detail)
            waiter.event.set()
        self._waiters.clear()
        for watches in self._watches.values():
            for watch in watches:
                watch._close()
        self._space.set()

    # -- requests ------------------------------------------------------------------------------

    async def _call(self, msg_type: XsType, payload: bytes, tx_id: int, path: str) -> bytes:
        message_len = len(payload)
        if message_len > XENSTORE_PAYLOAD_MAX:
            raise ValueError(
                f"xenstore {msg_type.name} request for {path[:64]!r}: payload of {message_len} bytes "
                f"exceeds {XENSTORE_PAYLOAD_MAX}"
            )
        self._check_alive(path)
        req_id = self._new_req_id()
        waiter = _Waiter()
        self._waiters[req_id] = waiter
        try:
            async with self._send_lock:
                await self._send(encode_message(msg_type, req_id, tx_id, payload), path)
            await waiter.event.wait()
        finally:
            self._waiters.pop(req_id, None)
        if waiter.error is not None:
            raise XenstoreError(waiter.error.errno, path, waiter.error.detail)
        assert waiter.reply is not None
        reply_type, reply = waiter.reply
        if reply_type == XsType.ERROR:
            name = reply.rstrip(b"\0").decode("ascii", "replace")
            raise XenstoreError(name if name in XSD_ERRORS else "EIO", path)
        if reply_type != msg_type:
            raise XenstoreError("EIO", path, f"reply of type {reply_type} to a {msg_type.name} request")
        return reply

    async def _send(self, message: bytes, path: str) -> None:
        """Write one message, in pieces if the ring lacks room; once started, finish it (shielded)
        so a cancellation cannot leave half a message on the ring."""
        sent = 0
        while sent < len(message):
            self._check_alive(path)
            cons = self._req.load_cons()
            used = (self._req_prod - cons) & MASK32
            if used > XENSTORE_RING_SIZE:
                self._die(f"impossible request ring indices req_prod={self._req_prod:#x} req_cons={cons:#x}")
                self._check_alive(path)
            free = XENSTORE_RING_SIZE - used
            if not free:
                self._space = trio.Event()
                with trio.CancelScope(shield=sent > 0):
                    await self._space.wait()
                continue
            chunk = message[sent : sent + free]
            self._req.copy_in(self._req_prod, chunk)
            self._req_prod = (self._req_prod + len(chunk)) & MASK32
            self._req.store_prod(self._req_prod)  # after the data
            sent += len(chunk)
            self._kick()

    def _check_alive(self, path: str) -> None:
        if self.error is not None:
            raise XenstoreError("EIO", path, self.error.detail)

    def _new_req_id(self) -> int:
        while True:
            req_id = next(self._req_ids) & MASK32
            if req_id and req_id not in self._waiters:
                return req_id

    async def _unwatch(self, watch: Watch) -> None:
        try:
            if self.error is None and watch in self._watches.get(watch.token, ()):
                await self._request(XsType.UNWATCH, _arg(watch.path) + _arg(watch.token, "token"), watch.path)
        finally:
            self._forget(watch)

    def _forget(self, watch: Watch) -> None:
        watches = self._watches.get(watch.token, [])
        if watch in watches:
            watches.remove(watch)
        if not watches:
            self._watches.pop(watch.token, None)
        watch._close()


def _state_node(path: str) -> str:
    return path if path == "state" or path.endswith("/state") else f"{path}/state"


def loopback(
    store: Store, domid: int, page: memoryview | bytearray | None = None
) -> tuple[XenbusClient, RingConnection]:
    """A guest client and its server connection on one in-memory page, kick and notify wired as
    direct calls.  Pass ``page`` to start from a prepared page (e.g. indices near the wrap)."""
    view = as_page(bytearray(PAGE_SIZE) if page is None else page)
    clients: list[XenbusClient] = []
    connection = RingConnection(store, domid, view, notify=lambda: clients[0].on_event())
    client = XenbusClient(view, kick=connection.process)
    clients.append(client)
    return client, connection
