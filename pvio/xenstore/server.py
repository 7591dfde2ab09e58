"""The xenstore wire protocol (xs_wire) on a domain's ring page: xenstored's side and the guest's.

Design rationale
----------------
Xen's xenstore page (``xenstore_domain_interface``) holds two 1024-byte byte-stream rings with
free-running u32 indices: requests guest -> xenstored, replies and watch events back.  Messages are a
16-byte ``xsd_sockmsg`` header and at most 4096 payload bytes, so one message can be four times the
ring: both sides must stream, and messages span the wrap point.

* :class:`XsConnection` is the request handling of one client, whatever carries its bytes:
  parse (bounded :class:`MessageReader`), execute on the store, queue replies and watch events.
  Two transports use it: a guest's ring page (:class:`RingConnection`, below) and a Unix
  socket for dom0's tools (:mod:`pvio.xenstore.unix_socket`).
* :class:`RingConnection` is xenstored's end for one guest.  It trusts nothing on the page: it keeps
  its own copies of the indices it owns (req_cons, rsp_prod), reads the guest's index once per pass
  and bounds it (prod - cons > 1024 is an impossible index, error 2), copies bytes out before parsing
  (XSA-155), and refuses an oversized header or an unknown type (error 3, as xenstored kills such a
  connection, XSA-38/72).  A fault disconnects this connection only, is logged with the domid and
  counted; ``process()`` never raises.  Memory per guest is bounded: one partial message in, and
  output up to a high-water mark before it stops reading requests (back-pressure through the guest's
  own ring) and a limit beyond which watch events are dropped and counted (XSA-349).
* Watch-event fairness (XSA-349).  A guest may change a node someone else watches (dom0's
  backends watch every frontend's ``state``) as fast as it likes.  Two rules keep that from
  costing the watcher other domains' events.  An event identical to one still queued (same path,
  same token) is coalesced: a watch event only says "look again", and the queued one arrives after
  the change.  And each unprivileged domain gets a share (:data:`EVENT_SHARE` bytes) of every
  other connection's queue for the events its own operations raised; beyond it, its events are
  dropped, counted at the watcher and as shed by the cause.  Events caused by dom0 are only
  bounded by :data:`OUTPUT_LIMIT`.  So a bystander's event waits behind at most one share per
  flooding domain, and the flooder pays for its own flood.
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

import logging
import sys
from collections import Counter, deque
from collections.abc import Callable, Sequence
from typing import TypeVar

from pvio.xenstore.store import Store, XenstoreError, is_privileged
from pvio.xenstore.wire import (
    MASK32,
    OFFSET_ERROR,
    OFFSET_REQ,
    OFFSET_REQ_CONS,
    OFFSET_REQ_PROD,
    OFFSET_RSP,
    OFFSET_RSP_CONS,
    OFFSET_RSP_PROD,
    OFFSET_SERVER_FEATURES,
    U32,
    XENSTORE_ERROR_COMMS,
    XENSTORE_ERROR_PROTO,
    XENSTORE_ERROR_RINGIDX,
    XENSTORE_PAYLOAD_MAX,
    XENSTORE_RING_SIZE,
    XENSTORE_SERVER_FEATURE_ERROR,
    XSD_SOCKMSG,
    ByteRing,
    MessageReader,
    RingFault,
    XsHeader,
    XsType,
    as_page,
    decode_token,
    encode_message,
)

logger = logging.getLogger("pvio.xenstore")

T = TypeVar("T")


# Server-side bounds on queued output per connection.
OUTPUT_HIGH_WATER = 2 * (XSD_SOCKMSG.size + XENSTORE_PAYLOAD_MAX)  # stop reading requests above this
OUTPUT_LIMIT = 16 * (XSD_SOCKMSG.size + XENSTORE_PAYLOAD_MAX)  # drop watch events above this
#: Bytes of queued watch events one unprivileged causing domain may hold in a connection's queue.
EVENT_SHARE = OUTPUT_LIMIT // 8
_OK = b"OK\0"
_UNLIMITED = sys.maxsize


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


def _decimal(raw: bytes, limit: int) -> int:
    if not raw.isdigit() or len(raw) > 10 or int(raw) > limit:
        raise _BadPayload(f"{raw[:16]!r} is not a decimal number up to {limit}")
    return int(raw)


def _strings(items: Sequence[str]) -> bytes:
    return b"".join(item.encode() + b"\0" for item in items)


Handler = Callable[[int, bytes], bytes]


class XsConnection:
    """One client's xenstore session, whatever carries its bytes: parse requests, run them on the
    store, queue replies and watch events.

    The transport (a guest's ring page: :class:`RingConnection`; a Unix socket:
    :mod:`pvio.xenstore.unix_socket`) feeds request bytes to :attr:`_reader`, calls
    :meth:`_handle` for each complete message while :attr:`_out_bytes` is below
    ``OUTPUT_HIGH_WATER``, and drains :attr:`_out`.  Watch events are queued from the store's
    callback, then :meth:`_output_queued` tells the transport there is something to send.
    """

    def __init__(self, store: Store, domid: int) -> None:
        self.domid = domid
        self.disconnect_reason: str | None = None
        self._reader = MessageReader()
        self._out: deque[bytes] = deque()
        self._out_offset = 0  # bytes of _out[0] already written
        self._out_bytes = 0
        self._deferred: list[
            tuple[bytes, int | None]
        ] = []  # own watch events raised while answering a request
        self._handling = False
        self._closed = False
        self._warned_drop = False
        self._warned_shed: set[int] = set()
        # Queued, not yet fully sent watch events: message -> causing domid (None: privileged).
        self._pending_events: dict[bytes, int | None] = {}
        self._event_bytes: Counter[int] = Counter()  # queued event bytes by unprivileged cause
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

    def close(self) -> None:
        """Stop serving: the store drops this connection's watches and transactions."""
        self._closed = True
        self._out.clear()
        self._pending_events.clear()
        self._event_bytes.clear()
        self._session.close()

    def _output_queued(self) -> None:
        """A watch event was queued outside a request: the transport should send it."""
        raise NotImplementedError

    def _queue(self, message: bytes) -> None:
        self._out.append(message)
        self._out_bytes += len(message)

    def _sent(self, message: bytes) -> None:
        """The transport finished writing ``message`` (popped from :attr:`_out`): release its
        accounting, so an identical later event is queued again."""
        if message in self._pending_events:
            cause = self._pending_events.pop(message)
            if cause is not None:
                self._event_bytes[cause] -= len(message)
                if self._event_bytes[cause] <= 0:
                    del self._event_bytes[cause]

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
        cause = self._store.event_cause
        if cause is not None and is_privileged(cause):
            cause = None
        if self._handling:
            self._deferred.append((message, cause))  # after the reply to the request that caused it
            return
        if self._queue_event(message, cause):
            self._output_queued()

    def _queue_event(self, message: bytes, cause: int | None) -> bool:
        """Queue one watch event unless an identical one is still queued, its cause has used
        up its share, or the queue is at its limit; True if queued."""
        if message in self._pending_events:
            self._store.count_coalesced_event(self.domid)
            return False
        if cause is not None and self._event_bytes[cause] + len(message) > EVENT_SHARE:
            self._store.count_dropped_event(self.domid, cause)
            if cause not in self._warned_shed:
                self._warned_shed.add(cause)
                logger.warning(
                    "xenstore: dom%d raises watch events for dom%d faster than it reads them; "
                    "dropping its events beyond %d queued bytes",
                    cause,
                    self.domid,
                    EVENT_SHARE,
                )
            return False
        if self._out_bytes + len(message) > OUTPUT_LIMIT:
            self._store.count_dropped_event(self.domid)
            if not self._warned_drop:
                self._warned_drop = True
                logger.warning(
                    "xenstore: dom%d is not consuming its ring; dropping watch events beyond %d queued bytes",
                    self.domid,
                    OUTPUT_LIMIT,
                )
            return False
        self._queue(message)
        self._pending_events[message] = cause
        if cause is not None:
            self._event_bytes[cause] += len(message)
        return True

    # -- requests ------------------------------------------------------------------------------

    def _handle(self, header: XsHeader, payload: bytes) -> None:
        self._handling = True
        try:
            reply_type, reply = self._execute(header, payload)
        finally:
            self._handling = False
        self._queue(encode_message(reply_type, header.req_id, header.tx_id, reply))
        deferred, self._deferred = self._deferred, []
        for message, cause in deferred:
            self._queue_event(message, cause)

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
        offset = _decimal(offset_raw, MASK32)
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
        self._session.watch(_text(path), decode_token(token))
        return _OK

    def _unwatch(self, tx: int, payload: bytes) -> bytes:
        path, token = _args(payload, 2)
        self._session.unwatch(_text(path), decode_token(token))
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


class RingConnection(XsConnection):
    """xenstored's end of one guest's xenstore ring page.

    ``page`` is the guest's interface page (writable, at least 2080 bytes), ``notify()`` signals the
    guest's store event channel.  Call :meth:`process` whenever the guest kicks its store port.
    """

    def __init__(
        self, store: Store, domid: int, page: memoryview | bytearray, notify: Callable[[], None]
    ) -> None:
        self._page = as_page(page)
        self._notify = notify
        self._req = ByteRing(self._page, OFFSET_REQ, OFFSET_REQ_CONS, OFFSET_REQ_PROD)
        self._rsp = ByteRing(self._page, OFFSET_RSP, OFFSET_RSP_CONS, OFFSET_RSP_PROD)
        # The indices we own live here; the page only gets copies (a guest may scribble on them).
        self._req_cons = self._req.load_cons()
        self._rsp_prod = self._rsp.load_prod()
        U32.pack_into(self._page, OFFSET_SERVER_FEATURES, XENSTORE_SERVER_FEATURE_ERROR)
        self._busy = False
        self._again = False
        super().__init__(store, domid)

    def _output_queued(self) -> None:
        self.process()

    def close(self) -> None:
        """Stop serving, and let go of the guest's page (its RAM can be unmapped once nothing
        else points into it); while a request is being served, at the end of it."""
        super().close()
        if not self._busy:
            self._release_page()

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
        except RingFault as fault:
            self._disconnect(fault.code, fault.reason)
        except Exception:
            logger.exception("xenstore: internal error serving dom%d", self.domid)
            self._disconnect(XENSTORE_ERROR_COMMS, "internal error (see the traceback above)")
        finally:
            self._busy = False
            if self._closed:
                self._release_page()  # see close()

    def _release_page(self) -> None:
        self._req.release()
        self._rsp.release()
        self._page.release()

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
        avail = (prod - self._req_cons) & MASK32
        if avail > XENSTORE_RING_SIZE:
            raise RingFault(
                XENSTORE_ERROR_RINGIDX,
                f"impossible request ring indices req_prod={prod:#x} req_cons={self._req_cons:#x}",
            )
        if not avail:
            return False
        data = self._req.copy_out(self._req_cons, avail)
        self._req_cons = (self._req_cons + avail) & MASK32
        self._req.store_cons(self._req_cons)
        self._reader.feed(data)
        return True

    def _write_output(self) -> bool:
        if not self._out or self._closed:
            return False
        cons = self._rsp.load_cons()
        used = (self._rsp_prod - cons) & MASK32
        if used > XENSTORE_RING_SIZE:
            raise RingFault(
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
                self._sent(self._out.popleft())
                self._out_offset = 0
        if written:
            self._out_bytes -= written
            self._rsp_prod = (self._rsp_prod + written) & MASK32
            self._rsp.store_prod(self._rsp_prod)  # after the data
        return written > 0

    def _disconnect(self, code: int, reason: str) -> None:
        logger.warning("xenstore: disconnecting dom%d: %s (error %d)", self.domid, reason, code)
        self.disconnect_reason = reason
        self._store.count_disconnect(self.domid, _DISCONNECT_KEYS.get(code, "comms"))
        U32.pack_into(self._page, OFFSET_ERROR, code)
        self.close()
        try:
            self._notify()
        except Exception:
            logger.exception("xenstore: notifying dom%d of its disconnection failed", self.domid)


_DISCONNECT_KEYS = {
    XENSTORE_ERROR_COMMS: "comms",
    XENSTORE_ERROR_RINGIDX: "bad-ring-index",
    XENSTORE_ERROR_PROTO: "protocol",
}
