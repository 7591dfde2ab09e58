"""The remote-guest protocol: messages on a Unix socket, doorbells in a shared page, eventfds.

A guest kernel in its own OS process (the *child*) talks to the hypervisor process (the
*host*) over one ``AF_UNIX``/``SOCK_SEQPACKET`` socket: one datagram per message, so a
message is never split or merged and a reader never resynchronises.  Every message is a
12-byte header, :data:`HEADER` (``request``, ``flags``, ``size``: vhost-user's), then
``size`` bytes of payload, at most :data:`MAX_PAYLOAD`.  ``flags`` carries the protocol
version in its low two bits (:data:`VERSION`) and :data:`FLAG_REPLY` on answers.

Handshake (the child speaks first, as a vhost-user front end does)::

    child -> host   HELLO      u64 features wanted (a subset of FEATURES)
    host  -> child  WELCOME    JSON config, with SCM_RIGHTS: [guest RAM memfd, doorbell memfd,
                               upcall eventfd, kick eventfd]      (or REFUSE: utf-8 reason)
    child -> host   BOOTED     the guest kernel booted (its ``domain.booted``)
    child -> host   READY      the guest's ``ready`` event is set (its NIC is connected)

Then the child's hypercalls go as ``HYPERCALL`` (six u64: number, five arguments; pointers
are guest-physical addresses in the shared RAM, exactly as in one process) answered by
``HYPERCALL_REPLY`` (one i64).  ``APP_CALL``/``APP_REPLY`` carry JSON requests from the
host to the guest's application (``remote_call``) and their answers; ``CRASH`` is the
child's last word (a utf-8 reason) before it exits.

A *backend* child (a driver domain: its WELCOME config says ``"foreign_memory": true``)
maps other domains' grants and grant-copies in its own process, as a vhost-user back end
reads the guest memory it was handed.  The host keeps every check and all the state (the
pin, the maptrack handle, the destroy-time revocation) and tells the child what it needs,
each before the answer to the hypercall that caused it::

    host  -> child  FOREIGN       domid, pages, grant-table frame and entries (:data:`FOREIGN`),
                                  with SCM_RIGHTS: [that domain's RAM memfd]; once per granter,
                                  before the first MAPPED of its grants
    host  -> child  MAPPED        handle, granter, ref, readonly, gfn (:data:`MAPPED`): the frame
                                  the host pinned for that handle (never the child's own reading
                                  of the grant entry, which the granter can rewrite)
    host  -> child  UNMAPPED      handle: the host unmapped it
    host  -> child  FOREIGN_GONE  domid: the granter was destroyed; its grants and mappings are gone

Events never go through the socket.  The *doorbell* memfd has two areas of
:data:`DOORBELL_AREA` bytes, each a u32 counter per event-channel port and a u32 counter
per group of 64 ports (:class:`Doorbell`): the host bumps a port's counter in the RAISE
area and writes the upcall eventfd when it raises that port on the guest; the child bumps
the SEND area and writes the kick eventfd for ``EVTCHNOP_send``.  Each area has one
writer; the reader compares the counters with the values it saw last (groups first, so
a wake-up reads 16 words, not 1024) and treats every port whose counter moved as raised
once: eventfds and counters coalesce, as Xen's pending bits do.  The counters are u32
and wrap; only "changed or not" matters.

Everything the child sends is hostile: sizes and types are checked here, fds it attaches
are closed and refused, its doorbell counters are only ever compared.
"""

from __future__ import annotations

import array
import contextlib
import json
import os
import socket
import struct
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

HEADER = struct.Struct("<III")  # request, flags, payload size
VERSION = 1
VERSION_MASK = 0x3
FLAG_REPLY = 0x4
MAX_PAYLOAD = 4096
MAX_MESSAGE = HEADER.size + MAX_PAYLOAD
MAX_FDS = 4  # the most any message carries (WELCOME)


class Msg(IntEnum):
    """Message types (the header's ``request``)."""

    HELLO = 1
    WELCOME = 2
    REFUSE = 3
    BOOTED = 4
    READY = 5
    HYPERCALL = 6
    HYPERCALL_REPLY = 7
    APP_CALL = 8
    APP_REPLY = 9
    CRASH = 10
    FOREIGN = 11
    FOREIGN_GONE = 12
    MAPPED = 13
    UNMAPPED = 14


FEATURE_POSTED_SEND = 1 << 0  # EVTCHNOP_send through the doorbell, not a HYPERCALL
FEATURE_APP = 1 << 1  # APP_CALL / APP_REPLY
FEATURES = FEATURE_POSTED_SEND | FEATURE_APP

HELLO = struct.Struct("<Q")  # features
HYPERCALL = struct.Struct("<6Q")  # nr, a1..a5
HYPERCALL_REPLY = struct.Struct("<q")  # rc
FOREIGN = struct.Struct("<IIQI")  # domid, nr_pages, grant-table first gfn, grant entries (+ memfd)
FOREIGN_GONE = struct.Struct("<I")  # domid
MAPPED = struct.Struct("<IIIIQ")  # handle, granter domid, ref, readonly, gfn
UNMAPPED = struct.Struct("<I")  # handle
U64_MASK = (1 << 64) - 1

#: WELCOME's file descriptors, in order.
WELCOME_FDS = ("ram", "doorbell", "upcall", "kick")

DOORBELL_PORTS = 1024  # ports a doorbell area counts (a domain's max_ports must not exceed it)
DOORBELL_GROUP = 64  # ports per group counter
DOORBELL_GROUPS = DOORBELL_PORTS // DOORBELL_GROUP
DOORBELL_GROUPS_OFFSET = 4 * DOORBELL_PORTS  # the group counters follow the port counters
DOORBELL_AREA = 8192  # bytes of one area: port counters, group counters, padding
DOORBELL_RAISE = 0  # area written by the host: ports raised on the guest
DOORBELL_SEND = DOORBELL_AREA  # area written by the child: ports the guest sent on
DOORBELL_SIZE = 2 * DOORBELL_AREA


class ProtocolError(Exception):
    """The peer broke the protocol; the message is the one-line reason it is disconnected for."""


@dataclass(frozen=True)
class Message:
    """One received message (its fds are the receiver's to close)."""

    kind: Msg
    flags: int
    payload: bytes
    fds: tuple[int, ...] = ()

    def json(self) -> Any:
        """The payload as JSON (ProtocolError if it is not)."""
        try:
            return json.loads(self.payload.decode())
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ProtocolError(f"{self.kind.name} payload is not JSON ({e})") from None


def encode(kind: Msg, payload: bytes = b"", *, reply: bool = False) -> bytes:
    """One message's bytes."""
    if len(payload) > MAX_PAYLOAD:
        raise ValueError(f"{kind.name} payload of {len(payload)} bytes exceeds {MAX_PAYLOAD}")
    flags = VERSION | (FLAG_REPLY if reply else 0)
    return HEADER.pack(int(kind), flags, len(payload)) + payload


def encode_json(kind: Msg, obj: Any, *, reply: bool = False) -> bytes:
    """A message whose payload is ``obj`` as compact JSON."""
    return encode(kind, json.dumps(obj, separators=(",", ":")).encode(), reply=reply)


def fd_space() -> int:
    """Ancillary buffer size for :data:`MAX_FDS` descriptors."""
    return socket.CMSG_SPACE(MAX_FDS * array.array("i").itemsize)


def parse(data: bytes, ancdata: list[tuple[int, int, bytes]], msg_flags: int) -> Message:
    """Check one received datagram and return it as a Message (ProtocolError if malformed).

    File descriptors that came with it are returned in the Message even when the message
    is refused, so the caller can close them (:func:`close_fds`): a peer never leaks fds
    into the receiver by sending garbage.
    """
    fds: list[int] = []
    for level, kind, blob in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            arr = array.array("i")
            arr.frombytes(blob[: len(blob) - len(blob) % arr.itemsize])
            fds.extend(arr)
    try:
        if msg_flags & socket.MSG_CTRUNC:
            raise ProtocolError("too many file descriptors attached")
        if msg_flags & socket.MSG_TRUNC:
            raise ProtocolError(f"a message longer than {MAX_MESSAGE} bytes")
        if len(data) < HEADER.size:
            raise ProtocolError(f"a message of {len(data)} bytes (the header alone is {HEADER.size})")
        request, flags, size = HEADER.unpack_from(data)
        if flags & VERSION_MASK != VERSION:
            raise ProtocolError(f"protocol version {flags & VERSION_MASK} (this host speaks {VERSION})")
        if flags & ~(VERSION_MASK | FLAG_REPLY):
            raise ProtocolError(f"unknown flags {flags:#x}")
        if size != len(data) - HEADER.size:
            raise ProtocolError(
                f"header says {size} payload bytes, the message has {len(data) - HEADER.size}"
            )
        try:
            kind = Msg(request)
        except ValueError:
            raise ProtocolError(f"unknown message type {request}") from None
    except ProtocolError as e:
        raise _WithFds(str(e), tuple(fds)) from None
    return Message(kind, flags, data[HEADER.size :], tuple(fds))


class _WithFds(ProtocolError):
    """A refused message that carried descriptors (so they can be closed)."""

    def __init__(self, reason: str, fds: tuple[int, ...]) -> None:
        super().__init__(reason)
        self.fds = fds


def refused_fds(exc: ProtocolError) -> tuple[int, ...]:
    """The descriptors a refused message carried."""
    return exc.fds if isinstance(exc, _WithFds) else ()


def close_fds(fds: tuple[int, ...] | list[int]) -> None:
    """Close received descriptors (errors ignored: a bad fd is already gone)."""
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


def expect_size(msg: Message, size: int) -> None:
    """ProtocolError unless the payload has exactly ``size`` bytes."""
    if len(msg.payload) != size:
        raise ProtocolError(f"{msg.kind.name} of {len(msg.payload)} bytes, not {size}")


def new_eventfd() -> int:
    """A non-blocking, close-on-exec eventfd starting at 0."""
    return os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)


def signal_eventfd(fd: int) -> None:
    """Add 1 to an eventfd; a counter the peer drove to its maximum is already signalled."""
    with contextlib.suppress(OSError):  # BlockingIOError included
        os.eventfd_write(fd, 1)


def drain_eventfd(fd: int) -> bool:
    """Read (and so reset) an eventfd; False if it was not signalled."""
    try:
        os.eventfd_read(fd)
    except BlockingIOError:
        return False
    return True


class Doorbell:
    """One area of the doorbell page: a u32 counter per port and per group of 64 ports.

    The writer calls :meth:`ring`; the reader calls :meth:`changed`.  Each side keeps its
    own copy of what it wrote or saw, so whatever the other process writes into the area
    can at worst make a port look raised.
    """

    def __init__(self, area: memoryview) -> None:
        if len(area) != DOORBELL_AREA:
            raise ValueError(f"a doorbell area is {DOORBELL_AREA} bytes, not {len(area)}")
        self._counts = area[:DOORBELL_GROUPS_OFFSET].cast("I")
        self._groups = area[DOORBELL_GROUPS_OFFSET : DOORBELL_GROUPS_OFFSET + 4 * DOORBELL_GROUPS].cast("I")
        self._my_counts = [0] * DOORBELL_PORTS  # the writer's values, or what the reader saw
        self._my_groups = [0] * DOORBELL_GROUPS

    def ring(self, port: int) -> None:
        """Writer: count one raise of ``port`` (0 <= port < DOORBELL_PORTS); the port's
        counter is stored before its group's, so a reader that sees the group move sees it."""
        c = self._my_counts[port] = (self._my_counts[port] + 1) & 0xFFFFFFFF
        g = port // DOORBELL_GROUP
        gv = self._my_groups[g] = (self._my_groups[g] + 1) & 0xFFFFFFFF
        self._counts[port] = c
        self._groups[g] = gv

    def changed(self) -> list[int]:
        """Reader: the ports whose counters moved since the last call, in port order."""
        groups = self._groups.tolist()
        seen = self._my_groups
        if groups == seen:
            return []
        ports: list[int] = []
        for g in range(DOORBELL_GROUPS):
            if groups[g] == seen[g]:
                continue
            seen[g] = groups[g]
            lo = g * DOORBELL_GROUP
            now = self._counts[lo : lo + DOORBELL_GROUP].tolist()
            mine = self._my_counts
            for i, value in enumerate(now):
                if value != mine[lo + i]:
                    mine[lo + i] = value
                    ports.append(lo + i)
        return ports

    def release(self) -> None:
        """Let go of the views (before the mapping is closed)."""
        self._counts.release()
        self._groups.release()
