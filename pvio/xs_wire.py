"""The xenstore wire protocol (xs_wire) on a domain's ring page: xenstored's side and the guest's.

Design rationale
----------------
Xen's xenstore page (``xenstore_domain_interface``) holds two 1024-byte byte-stream rings with
free-running u32 indices: requests guest -> xenstored, replies and watch events back.  Messages are a
16-byte ``xsd_sockmsg`` header and at most 4096 payload bytes, so one message can be four times the
ring: both sides must stream, and messages span the wrap point.

* :class:`RingConnection` is xenstored's end for one guest.  It trusts nothing on the page: it keeps
  its own copies of the indices it owns (req_cons, rsp_prod), reads the guest's index once per pass
  and bounds it (prod - cons > 1024 is an impossible index, error 2), copies bytes out before parsing
  (XSA-155), and refuses an oversized header or an unknown type (error 3, as xenstored kills such a
  connection, XSA-38/72).  A fault disconnects this connection only, is logged with the domid and
  counted; ``process()`` never raises.  Memory per guest is bounded: one partial message in, and
  output up to a high-water mark before it stops reading requests (back-pressure through the guest's
  own ring) and a limit beyond which watch events are dropped and counted (XSA-349).
* :class:`XenbusClient` is the guest's end (like Linux's xenbus_xs.c): requests are serialised onto
  the ring under a lock, replies matched to waiters by req_id, watch events routed to
  :class:`Watch` objects by token.  A request longer than the free space is written in pieces,
  waiting for the server's consumption (which arrives as an event like any reply).  A hostile server
  (bad indices, oversized or unknown messages, garbage errors) kills the client with EIO instead of
  raising inside the event handler.
* Notifications: "signal the event channel after every update".  The server signals once per pass
  that produced or consumed bytes; the client kicks after publishing request bytes and after
  consuming reply bytes (the server may be waiting for room).
* Everything runs in one process, and the loopback wiring (:func:`loopback`) makes kick and notify
  plain synchronous calls, so ``process()`` can re-enter itself through the client.  Both ends guard
  against that with a busy flag and an "again" flag: a nested call just asks the running pass to loop
  once more.  The store delivers watch events from a FIFO outbox for the same reason.
* Barriers: the page is Python memory touched from one thread, so program order is the memory order.
  The code still follows Xen's ordering (data, then prod; read prod once, copy, then cons) so it stays
  right against a guest running C on another thread.
"""

from __future__ import annotations

import itertools
import logging
import re
import struct
import sys
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Sequence
from contextlib import asynccontextmanager, suppress
from enum import IntEnum
from typing import NamedTuple, TypeVar

import trio

from pvio.xenstore import XSD_ERRORS, Store, XenstoreError, is_privileged

logger = logging.getLogger("pvio.xenstore")

T = TypeVar("T")


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


XS_TYPE_COUNT = 27  # number of type slots; not a message
XS_INVALID = 0xFFFF  # guaranteed to remain an invalid type

XENSTORE_PAYLOAD_MAX = 4096
XENSTORE_RING_SIZE = 1024

# xsd_sockmsg: u32 type, u32 req_id, u32 tx_id, u32 len, then len payload bytes.
XSD_SOCKMSG = struct.Struct("<IIII")

# xenstore_domain_interface, at Xen's offsets within the page (2080 bytes).
OFFSET_REQ = 0  # char req[1024]: guest -> xenstored
OFFSET_RSP = 1024  # char rsp[1024]: xenstored -> guest
OFFSET_REQ_CONS = 2048  # u32, written by xenstored
OFFSET_REQ_PROD = 2052  # u32, written by the guest
OFFSET_RSP_CONS = 2056  # u32, written by the guest
OFFSET_RSP_PROD = 2060  # u32, written by xenstored
OFFSET_SERVER_FEATURES = 2064  # u32, XENSTORE_SERVER_FEATURE_* bits, written by xenstored
OFFSET_CONNECTION = 2068  # u32, XENSTORE_CONNECTED / XENSTORE_RECONNECT
OFFSET_ERROR = 2072  # u32, XENSTORE_ERROR_*, written by xenstored before it drops the connection
OFFSET_EVTCHN_PORT = 2076  # u32, the store event channel (informational)
XENSTORE_DOMAIN_INTERFACE_SIZE = 2080

XENSTORE_SERVER_FEATURE_RECONNECTION = 1
XENSTORE_SERVER_FEATURE_ERROR = 2
XENSTORE_SERVER_FEATURE_WATCHDEPTH = 4
XENSTORE_SERVER_FEATURE_DOMID_ANY = 8

XENSTORE_CONNECTED = 0
XENSTORE_RECONNECT = 1

XENSTORE_ERROR_NONE = 0
XENSTORE_ERROR_COMMS = 1
XENSTORE_ERROR_RINGIDX = 2
XENSTORE_ERROR_PROTO = 3

PAGE_SIZE = 4096

# Server-side bounds on queued output per connection.
OUTPUT_HIGH_WATER = 2 * (XSD_SOCKMSG.size + XENSTORE_PAYLOAD_MAX)  # stop reading requests above this
OUTPUT_LIMIT = 16 * (XSD_SOCKMSG.size + XENSTORE_PAYLOAD_MAX)  # drop watch events above this

_U32 = struct.Struct("<I")
_MASK32 = 0xFFFFFFFF
_OK = b"OK\0"
_DECIMAL = re.compile(r"-?[0-9]+")
_UNLIMITED = sys.maxsize


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


class XsHeader(NamedTuple):
    """An ``xsd_sockmsg`` header."""

    type: int
    req_id: int
    tx_id: int
    len: int

    def pack(self) -> bytes:
        return XSD_SOCKMSG.pack(self.type, self.req_id, self.tx_id, self.len)

    @classmethod
    def unpack(cls, data: bytes | bytearray | memoryview) -> XsHeader:
        return cls(*XSD_SOCKMSG.unpack_from(data))


def encode_message(msg_type: int, req_id: int, tx_id: int, payload: bytes) -> bytes:
    """Header plus payload; ValueError when the payload exceeds XENSTORE_PAYLOAD_MAX."""
    if len(payload) > XENSTORE_PAYLOAD_MAX:
        raise ValueError(f"xenstore payload of {len(payload)} bytes exceeds {XENSTORE_PAYLOAD_MAX}")
    return XsHeader(msg_type, req_id, tx_id, len(payload)).pack() + payload


def _is_message_type(value: int) -> bool:
    return value in XsType._value2member_map_


def _as_page(page: memoryview | bytearray) -> memoryview:
    view = memoryview(page)
    if view.readonly:
        raise ValueError("the xenstore ring page must be writable")
    if view.format != "B" or view.ndim != 1:
        view = view.cast("B")
    if view.nbytes < XENSTORE_DOMAIN_INTERFACE_SIZE:
        raise ValueError(
            f"the xenstore ring page has {view.nbytes} bytes; "
            f"xenstore_domain_interface needs {XENSTORE_DOMAIN_INTERFACE_SIZE}"
        )
    return view


class _ByteRing:
    """One direction of the interface: 1024 data bytes at ``data`` and its cons/prod words."""

    def __init__(self, page: memoryview, data: int, cons: int, prod: int) -> None:
        self._page = page
        self._data = data
        self._cons = cons
        self._prod = prod

    def load_prod(self) -> int:
        return int(_U32.unpack_from(self._page, self._prod)[0])

    def load_cons(self) -> int:
        return int(_U32.unpack_from(self._page, self._cons)[0])

    def store_prod(self, idx: int) -> None:
        _U32.pack_into(self._page, self._prod, idx & _MASK32)

    def store_cons(self, idx: int) -> None:
        _U32.pack_into(self._page, self._cons, idx & _MASK32)

    def copy_out(self, idx: int, n: int) -> bytes:
        """``n`` bytes starting at free-running index ``idx`` (may wrap)."""
        start = idx & (XENSTORE_RING_SIZE - 1)
        first = min(n, XENSTORE_RING_SIZE - start)
        base = self._data
        head = bytes(self._page[base + start : base + start + first])
        return head + bytes(self._page[base : base + n - first])

    def copy_in(self, idx: int, data: bytes) -> None:
        start = idx & (XENSTORE_RING_SIZE - 1)
        first = min(len(data), XENSTORE_RING_SIZE - start)
        base = self._data
        self._page[base + start : base + start + first] = data[:first]
        rest = len(data) - first
        if rest:
            self._page[base : base + rest] = data[first:]


class _RingFault(Exception):
    """The peer broke the protocol; ``code`` is the XENSTORE_ERROR_* to report."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


class _MessageReader:
    """Reassembles messages from ring bytes; checks each header as soon as it is complete."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> None:
        self._buf += data

    def next(self) -> tuple[XsHeader, bytes] | None:
        if len(self._buf) < XSD_SOCKMSG.size:
            return None
        header = XsHeader.unpack(self._buf)
        if header.len > XENSTORE_PAYLOAD_MAX:
            raise _RingFault(
                XENSTORE_ERROR_PROTO, f"message length {header.len} exceeds {XENSTORE_PAYLOAD_MAX}"
            )
        if not _is_message_type(header.type):
            raise _RingFault(XENSTORE_ERROR_PROTO, f"unknown message type {header.type}")
        end = XSD_SOCKMSG.size + header.len
        if len(self._buf) < end:
            return None
        payload = bytes(self._buf[XSD_SOCKMSG.size : end])
        del self._buf[:end]
        return header, payload


class _BadPayload(Exception):
    """A request's payload cannot be parsed; answered with EINVAL."""


def _args(payload: bytes, least: int, most: int | None = None) -> list[bytes]:
    """The NUL-terminated strings of a payload; their count must lie in [least, most]."""
    if not payload.endswith(b"\0"):
        raise _BadPayload("payload is not NUL-terminated")
    parts = payload[:-1].split(b"\0")
    most = least if most is None else most
    if not least <= len(parts) <= most:
        raise _BadPayload(f"expected {least} argument(s), got {len(parts)}")
    return parts


def _text(raw: bytes) -> str:
    try:
        return raw.decode("ascii")
    except UnicodeDecodeError:
        raise _BadPayload("path or argument is not ASCII") from None


def _token(raw: bytes) -> str:
    # Tokens are opaque to xenstored: keep any bytes, and give them back unchanged in events.
    return raw.decode("utf-8", "surrogateescape")


def _decimal(raw: bytes, limit: int) -> int:
    if not raw.isdigit() or len(raw) > 10 or int(raw) > limit:
        raise _BadPayload(f"{raw[:16]!r} is not a decimal number up to {limit}")
    return int(raw)


def _strings(items: Sequence[str]) -> bytes:
    return b"".join(item.encode() + b"\0" for item in items)


Handler = Callable[[int, bytes], bytes]


class RingConnection:
    """xenstored's end of one guest's xenstore ring page.

    ``page`` is the guest's interface page (writable, at least 2080 bytes), ``notify()`` signals the
    guest's store event channel.  Call :meth:`process` whenever the guest kicks its store port.
    """

    def __init__(
        self, store: Store, domid: int, page: memoryview | bytearray, notify: Callable[[], None]
    ) -> None:
        self.domid = domid
        self.disconnect_reason: str | None = None
        self._page = _as_page(page)
        self._notify = notify
        self._req = _ByteRing(self._page, OFFSET_REQ, OFFSET_REQ_CONS, OFFSET_REQ_PROD)
        self._rsp = _ByteRing(self._page, OFFSET_RSP, OFFSET_RSP_CONS, OFFSET_RSP_PROD)
        # The indices we own live here; the page only gets copies (a guest may scribble on them).
        self._req_cons = self._req.load_cons()
        self._rsp_prod = self._rsp.load_prod()
        _U32.pack_into(self._page, OFFSET_SERVER_FEATURES, XENSTORE_SERVER_FEATURE_ERROR)
        self._reader = _MessageReader()
        self._out: deque[bytes] = deque()
        self._out_offset = 0  # bytes of _out[0] already written
        self._out_bytes = 0
        self._deferred: list[bytes] = []  # own watch events raised while answering a request
        self._handling = False
        self._busy = False
        self._again = False
        self._closed = False
        self._warned_drop = False
        self._store = store
        self._session = store.connect(domid, self._on_watch_event)
        self._handlers: dict[int, Handler] = {
            XsType.READ: self._read,
            XsType.WRITE: self._write,
            XsType.MKDIR: self._mkdir,
            XsType.RM: self._rm,
            XsType.DIRECTORY: self._directory,
            XsType.DIRECTORY_PART: self._directory_part,
            XsType.GET_PERMS: self._get_perms,
            XsType.SET_PERMS: self._set_perms,
            XsType.WATCH: self._watch,
            XsType.UNWATCH: self._unwatch,
            XsType.RESET_WATCHES: self._reset_watches,
            XsType.TRANSACTION_START: self._transaction_start,
            XsType.TRANSACTION_END: self._transaction_end,
            XsType.GET_DOMAIN_PATH: self._get_domain_path,
            XsType.IS_DOMAIN_INTRODUCED: self._is_domain_introduced,
        }

    @property
    def closed(self) -> bool:
        return self._closed

    def process(self) -> None:
        """Serve the ring: execute every complete request, write replies and queued watch events,
        and notify the guest once if anything was written or consumed.  Never raises."""
        if self._closed:
            return
        if self._session.closed:  # the store released the domain
            self._closed = True
            return
        if self._busy:
            self._again = True
            return
        self._busy = True
        try:
            while True:
                self._again = False
                progressed = self._consume_requests()
                progressed = self._write_output() or progressed
                if progressed:
                    self._notify()
                if not self._again or self._closed:
                    break
        except _RingFault as fault:
            self._disconnect(fault.code, fault.reason)
        except Exception:
            logger.exception("xenstore: internal error serving dom%d", self.domid)
            self._disconnect(XENSTORE_ERROR_COMMS, "internal error (see the traceback above)")
        finally:
            self._busy = False

    def close(self) -> None:
        """Stop serving (domain teardown): the store drops this connection's watches and transactions."""
        self._closed = True
        self._out.clear()
        self._session.close()

    # -- the rings -----------------------------------------------------------------------------

    def _consume_requests(self) -> bool:
        consumed = False
        while self._out_bytes < OUTPUT_HIGH_WATER and not self._closed:
            message = self._reader.next()
            if message is None:
                if not self._pull():
                    break
                consumed = True
                continue
            self._handle(*message)
        return consumed

    def _pull(self) -> bool:
        prod = self._req.load_prod()  # read once; everything below uses this copy
        avail = (prod - self._req_cons) & _MASK32
        if avail > XENSTORE_RING_SIZE:
            raise _RingFault(
                XENSTORE_ERROR_RINGIDX,
                f"impossible request ring indices req_prod={prod:#x} req_cons={self._req_cons:#x}",
            )
        if not avail:
            return False
        data = self._req.copy_out(self._req_cons, avail)
        self._req_cons = (self._req_cons + avail) & _MASK32
        self._req.store_cons(self._req_cons)
        self._reader.feed(data)
        return True

    def _write_output(self) -> bool:
        if not self._out or self._closed:
            return False
        cons = self._rsp.load_cons()
        used = (self._rsp_prod - cons) & _MASK32
        if used > XENSTORE_RING_SIZE:
            raise _RingFault(
                XENSTORE_ERROR_RINGIDX,
                f"impossible response ring indices rsp_prod={self._rsp_prod:#x} rsp_cons={cons:#x}",
            )
        free = XENSTORE_RING_SIZE - used
        written = 0
        while self._out and free:
            head = self._out[0]
            chunk = head[self._out_offset : self._out_offset + free]
            self._rsp.copy_in(self._rsp_prod + written, chunk)
            written += len(chunk)
            free -= len(chunk)
            self._out_offset += len(chunk)
            if self._out_offset == len(head):
                self._out.popleft()
                self._out_offset = 0
        if written:
            self._out_bytes -= written
            self._rsp_prod = (self._rsp_prod + written) & _MASK32
            self._rsp.store_prod(self._rsp_prod)  # after the data
        return written > 0

    def _queue(self, message: bytes) -> None:
        self._out.append(message)
        self._out_bytes += len(message)

    def _on_watch_event(self, path: str, token: str) -> None:
        if self._closed:
            return
        payload = path.encode() + b"\0" + token.encode("utf-8", "surrogateescape") + b"\0"
        if len(payload) > XENSTORE_PAYLOAD_MAX:
            self._store.count_dropped_event(self.domid)
            logger.warning(
                "xenstore: dom%d: watch event for %r does not fit in a message; dropped", self.domid, path
            )
            return
        message = encode_message(XsType.WATCH_EVENT, 0, 0, payload)
        if self._handling:
            self._deferred.append(message)  # after the reply to the request that caused it
            return
        self._queue_event(message)
        self.process()

    def _queue_event(self, message: bytes) -> None:
        if self._out_bytes + len(message) > OUTPUT_LIMIT:
            self._store.count_dropped_event(self.domid)
            if not self._warned_drop:
                self._warned_drop = True
                logger.warning(
                    "xenstore: dom%d is not consuming its ring; dropping watch events beyond %d queued bytes",
                    self.domid,
                    OUTPUT_LIMIT,
                )
            return
        self._queue(message)

    def _disconnect(self, code: int, reason: str) -> None:
        logger.warning("xenstore: disconnecting dom%d: %s (error %d)", self.domid, reason, code)
        self.disconnect_reason = reason
        self._store.count_disconnect(self.domid, _DISCONNECT_KEYS.get(code, "comms"))
        _U32.pack_into(self._page, OFFSET_ERROR, code)
        self.close()
        try:
            self._notify()
        except Exception:
            logger.exception("xenstore: notifying dom%d of its disconnection failed", self.domid)

    # -- requests ------------------------------------------------------------------------------

    def _handle(self, header: XsHeader, payload: bytes) -> None:
        self._handling = True
        try:
            reply_type, reply = self._execute(header, payload)
        finally:
            self._handling = False
        self._queue(encode_message(reply_type, header.req_id, header.tx_id, reply))
        deferred, self._deferred = self._deferred, []
        for message in deferred:
            self._queue_event(message)

    def _execute(self, header: XsHeader, payload: bytes) -> tuple[int, bytes]:
        msg_type = XsType(header.type)
        session = self._session
        try:
            handler = self._handlers.get(msg_type)
            if handler is None:
                if msg_type in (XsType.WATCH_EVENT, XsType.ERROR):
                    raise session.reject(msg_type.name, "EINVAL", detail="not a request type")
                errno = "ENOSYS" if is_privileged(self.domid) else "EACCES"
                raise session.reject(msg_type.name, errno, detail="not supported by pvio's xenstored")
            try:
                reply = handler(header.tx_id, payload)
            except _BadPayload as bad:
                raise session.reject(msg_type.name, "EINVAL", detail=str(bad)) from None
            if len(reply) > XENSTORE_PAYLOAD_MAX:
                session.count_error("E2BIG")
                raise XenstoreError("E2BIG", detail="reply does not fit in one message")
            return msg_type, reply
        except XenstoreError as err:
            return XsType.ERROR, err.errno.encode() + b"\0"

    def _read(self, tx: int, payload: bytes) -> bytes:
        (path,) = _args(payload, 1)
        return self._session.read(_text(path), tx)

    def _write(self, tx: int, payload: bytes) -> bytes:
        path, sep, value = payload.partition(b"\0")
        if not sep:
            raise _BadPayload("WRITE needs path NUL value")
        self._session.write(_text(path), value, tx)
        return _OK

    def _mkdir(self, tx: int, payload: bytes) -> bytes:
        (path,) = _args(payload, 1)
        self._session.mkdir(_text(path), tx)
        return _OK

    def _rm(self, tx: int, payload: bytes) -> bytes:
        (path,) = _args(payload, 1)
        self._session.rm(_text(path), tx)
        return _OK

    def _directory(self, tx: int, payload: bytes) -> bytes:
        (path,) = _args(payload, 1)
        return _strings(self._session.directory(_text(path), tx))

    def _directory_part(self, tx: int, payload: bytes) -> bytes:
        path, offset_raw = _args(payload, 2)
        offset = _decimal(offset_raw, _MASK32)
        generation, children = self._session.directory_part(_text(path), tx)
        head = f"{generation}".encode() + b"\0"
        listing = _strings(children)[offset:]
        room = XENSTORE_PAYLOAD_MAX - len(head) - 1
        if len(listing) <= room:
            return head + listing + b"\0"  # the empty name ends the list
        cut = listing.rfind(b"\0", 0, room) + 1  # whole names only
        return head + listing[:cut]

    def _get_perms(self, tx: int, payload: bytes) -> bytes:
        (path,) = _args(payload, 1)
        return _strings(self._session.get_perms(_text(path), tx))

    def _set_perms(self, tx: int, payload: bytes) -> bytes:
        path, *perms = _args(payload, 2, _UNLIMITED)
        self._session.set_perms(_text(path), [_text(p) for p in perms], tx)
        return _OK

    def _watch(self, tx: int, payload: bytes) -> bytes:
        path, token, *_depth = _args(payload, 2, 3)  # an optional depth is accepted and ignored
        self._session.watch(_text(path), _token(token))
        return _OK

    def _unwatch(self, tx: int, payload: bytes) -> bytes:
        path, token = _args(payload, 2)
        self._session.unwatch(_text(path), _token(token))
        return _OK

    def _reset_watches(self, tx: int, payload: bytes) -> bytes:
        self._session.reset_watches()
        return _OK

    def _transaction_start(self, tx: int, payload: bytes) -> bytes:
        if tx:
            raise self._session.reject("TRANSACTION_START", "EBUSY", detail="already inside a transaction")
        return f"{self._session.transaction_start()}".encode() + b"\0"

    def _transaction_end(self, tx: int, payload: bytes) -> bytes:
        (flag,) = _args(payload, 1)
        if flag not in (b"T", b"F"):
            raise _BadPayload("TRANSACTION_END takes T (commit) or F (abort)")
        self._session.transaction_end(tx, commit=flag == b"T")
        return _OK

    def _get_domain_path(self, tx: int, payload: bytes) -> bytes:
        (domid,) = _args(payload, 1)
        return self._session.get_domain_path(_decimal(domid, 0xFFFF)).encode() + b"\0"

    def _is_domain_introduced(self, tx: int, payload: bytes) -> bytes:
        (domid,) = _args(payload, 1)
        return b"T\0" if self._session.is_domain_introduced(_decimal(domid, 0xFFFF)) else b"F\0"


_DISCONNECT_KEYS = {
    XENSTORE_ERROR_COMMS: "comms",
    XENSTORE_ERROR_RINGIDX: "bad-ring-index",
    XENSTORE_ERROR_PROTO: "protocol",
}


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
        if not _DECIMAL.fullmatch(text):
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

    async def __aexit__(self, *exc: object) -> None:
        with trio.CancelScope(shield=True):
            await self.unwatch()


class XenbusClient(_Operations):
    """The guest's xenstore client on its ring page (what Linux's xenbus_xs.c is to a PV guest).

    ``kick()`` signals the store event channel; call :meth:`on_event` (synchronously) from the
    guest's handler when that channel fires.  Operations raise :class:`XenstoreError`; a payload
    over 4096 bytes raises ValueError before anything touches the ring.
    """

    def __init__(
        self, page: memoryview | bytearray, kick: Callable[[], None], *, watch_backlog: int = 256
    ) -> None:
        self._page = _as_page(page)
        self._kick = kick
        self._watch_backlog = watch_backlog
        self._req = _ByteRing(self._page, OFFSET_REQ, OFFSET_REQ_CONS, OFFSET_REQ_PROD)
        self._rsp = _ByteRing(self._page, OFFSET_RSP, OFFSET_RSP_CONS, OFFSET_RSP_PROD)
        self._req_prod = self._req.load_prod()
        self._rsp_cons = self._rsp.load_cons()
        self._reader = _MessageReader()
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
        """A device's state (``path`` is its directory or its ``state`` node); missing or garbage
        values read as UNKNOWN, as Linux's xenbus_read_driver_state."""
        try:
            value = await self.read(_state_node(path))
            return XenbusState(int(value))
        except (XenstoreError, ValueError) as err:
            if isinstance(err, XenstoreError) and err.errno not in ("ENOENT", "EINVAL"):
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
        error = int(_U32.unpack_from(self._page, OFFSET_ERROR)[0])
        if error:
            self._die(f"xenstored closed the connection with error {error}")
            return
        prod = self._rsp.load_prod()
        avail = (prod - self._rsp_cons) & _MASK32
        if avail > XENSTORE_RING_SIZE:
            self._die(f"impossible response ring indices rsp_prod={prod:#x} rsp_cons={self._rsp_cons:#x}")
            return
        if avail:
            data = self._rsp.copy_out(self._rsp_cons, avail)
            self._rsp_cons = (self._rsp_cons + avail) & _MASK32
            self._rsp.store_cons(self._rsp_cons)
            self._reader.feed(data)
        try:
            while (message := self._reader.next()) is not None:
                self._dispatch(*message)
        except _RingFault as fault:
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
            token = _token(parts[1])
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
            used = (self._req_prod - cons) & _MASK32
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
            self._req_prod = (self._req_prod + len(chunk)) & _MASK32
            self._req.store_prod(self._req_prod)  # after the data
            sent += len(chunk)
            self._kick()

    def _check_alive(self, path: str) -> None:
        if self.error is not None:
            raise XenstoreError("EIO", path, self.error.detail)

    def _new_req_id(self) -> int:
        while True:
            req_id = next(self._req_ids) & _MASK32
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
    view = _as_page(bytearray(PAGE_SIZE) if page is None else page)
    clients: list[XenbusClient] = []
    connection = RingConnection(store, domid, view, notify=lambda: clients[0].on_event())
    client = XenbusClient(view, kick=connection.process)
    clients.append(client)
    return client, connection
