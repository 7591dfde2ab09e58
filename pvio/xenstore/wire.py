"""The xs_wire protocol shared by both ends: message types and header, the xenstore ring page
(``xenstore_domain_interface``) and its byte rings, and message framing.

The design notes of the whole wire layer are in :mod:`pvio.xenstore.server` (xenstored's end)
and :mod:`pvio.xenstore.client` (the guest's end).
"""

from __future__ import annotations

import logging
import re
import struct
from typing import NamedTuple

from pvio.abi.xen import XENSTORE_PAYLOAD_MAX, XENSTORE_RING_SIZE, XsType
from pvio.abi.xen import XenbusState as XenbusState  # re-exported: the device handshake's states

logger = logging.getLogger("pvio.xenstore")

XS_TYPE_COUNT = 27  # number of type slots; not a message
XS_INVALID = 0xFFFF  # guaranteed to remain an invalid type


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


U32 = struct.Struct("<I")
MASK32 = 0xFFFFFFFF
DECIMAL = re.compile(r"-?[0-9]+")


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


def as_page(page: memoryview | bytearray) -> memoryview:
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


class ByteRing:
    """One direction of the interface: 1024 data bytes at ``data`` and its cons/prod words.

    The words are read and written as single 32-bit loads and stores (a ``cast("I")`` view):
    the other end may be another process, and ``struct.pack_into`` zeroes its target before
    writing it, so a reader there could see an index of 0 in between."""

    def __init__(self, page: memoryview, data: int, cons: int, prod: int) -> None:
        if cons % 4 or prod % 4:
            raise ValueError("ring index words must be 4-byte aligned")
        self._page = page
        self._data = data
        self._words = page[: len(page) - len(page) % 4].cast("I")
        self._cons = cons // 4
        self._prod = prod // 4

    def load_prod(self) -> int:
        return int(self._words[self._prod])

    def load_cons(self) -> int:
        return int(self._words[self._cons])

    def store_prod(self, idx: int) -> None:
        self._words[self._prod] = idx & MASK32

    def store_cons(self, idx: int) -> None:
        self._words[self._cons] = idx & MASK32

    def release(self) -> None:
        """Let go of the view of the index words (before the page's view is released)."""
        self._words.release()

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


class RingFault(Exception):
    """The peer broke the protocol; ``code`` is the XENSTORE_ERROR_* to report."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


class MessageReader:
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
            raise RingFault(
                XENSTORE_ERROR_PROTO, f"message length {header.len} exceeds {XENSTORE_PAYLOAD_MAX}"
            )
        if not _is_message_type(header.type):
            raise RingFault(XENSTORE_ERROR_PROTO, f"unknown message type {header.type}")
        end = XSD_SOCKMSG.size + header.len
        if len(self._buf) < end:
            return None
        payload = bytes(self._buf[XSD_SOCKMSG.size : end])
        del self._buf[:end]
        return header, payload


def decode_token(raw: bytes) -> str:
    """A watch token as text: tokens are opaque to xenstored, so any bytes are kept and given
    back unchanged in events."""
    return raw.decode("utf-8", "surrogateescape")
