"""Packet capture: mirror a switch port, a vif or the whole switch to a pcap file.

Design rationale
----------------
A capture is a *mirror* on the switch's data path, not a port: a port only sees what the
switch decides to send it (floods and frames addressed to it), so a capture port misses
every frame forwarded between two other ports.  A :class:`Capture` instead registers a
tap with :meth:`Switch.add_tap`; the switch hands every tap each batch it takes in
(``ingress``: the frames a port handed into the switch) and each batch it delivered
(``egress``: the frames a port's ``transmit`` accepted).

- **what is mirrored.**  A port (or a vif, which is the netback's port) is captured in
  both directions: its ingress and its egress, in the order the switch saw them.  The
  whole switch is captured at ingress only, so each frame appears once, however many
  ports a flood reached.  The capture's frame count therefore equals the port's
  ``packets.rx + packets.tx`` (or, for the whole switch, the sum of every port's
  ``packets.rx``) for the time it ran, and its bytes the matching ``bytes.*``.
- **frame bytes, not objects.**  Each record is a 16-byte header packed with one
  :class:`struct.Struct` and the frame's bytes; a batch is written with one ``write`` on
  a buffered file.  No parsing, no scapy.
- **nothing when off.**  With no tap registered the switch's only cost is one test of an
  empty list per batch; a capture that stops (or fails) unregisters itself.
- **a capture never stops the traffic.**  A write that fails (a full disk, a closed
  file) stops the capture, records why in :attr:`Capture.error`, counts the frames it
  could not write and logs one line; the switch goes on forwarding.

File formats (``format=``):

- ``"pcap"`` (the default): classic libpcap with nanosecond timestamps (magic
  ``0xa1b23c4d``, version 2.4), link type 1 (Ethernet), little-endian.  tcpdump,
  tshark, Wireshark and scapy read it.
- ``"pcapng"``: one interface description per switch port (named after the port,
  nanosecond resolution, Ethernet), declared when the port's first frame is written, and
  one enhanced packet block per frame with its direction in ``epb_flags``: *inbound*
  for frames the port handed into the switch, *outbound* for frames the switch
  delivered to it.  Wireshark then shows which port each frame crossed and which way.

Frames longer than ``snaplen`` are truncated in the file (the original length is kept),
as tcpdump does.

Counters, owner ``capture/<name>``: ``packets``/``bytes`` (frames and their original
bytes written), ``truncated`` (frames cut to ``snaplen``), ``drops.write_error``
(frames lost once a write failed), ``errors`` (failed writes: 0 or 1).
"""

from __future__ import annotations

import contextlib
import logging
import os
import struct
import time
from collections.abc import Callable
from typing import IO, TYPE_CHECKING

from pvio.core.counters import CounterRegistry, Counters

if TYPE_CHECKING:
    from pvio.backends.switch import Switch, SwitchPort

log = logging.getLogger("pvio.capture")

PCAP_MAGIC_NS = 0xA1B23C4D  # libpcap, timestamps in nanoseconds
PCAP_VERSION = (2, 4)
LINKTYPE_ETHERNET = 1
DEFAULT_SNAPLEN = 262144  # tcpdump's default
PCAP_HEADER = struct.Struct("<IHHiIII")  # magic, major, minor, thiszone, sigfigs, snaplen, linktype
PCAP_RECORD = struct.Struct("<IIII")  # ts_sec, ts_nsec, incl_len, orig_len

INGRESS = "ingress"  # a port handed the frames into the switch
EGRESS = "egress"  # the switch handed the frames to a port

# pcapng (the IETF pcapng draft): block types, options, and the layouts used here.
PCAPNG_SHB = 0x0A0D0D0A  # section header block
PCAPNG_IDB = 0x00000001  # interface description block
PCAPNG_EPB = 0x00000006  # enhanced packet block
PCAPNG_BYTE_ORDER_MAGIC = 0x1A2B3C4D
OPT_ENDOFOPT = 0
IF_NAME = 2
IF_TSRESOL = 9
EPB_FLAGS = 2
EPB_INBOUND, EPB_OUTBOUND = 0b01, 0b10  # epb_flags bits 0-1: the direction
_EPB_HEAD = struct.Struct("<IIIIIII")  # type, total length, interface, ts high, ts low, caplen, len
_EPB_TAIL = struct.Struct("<HHII")  # epb_flags option (code, length, value), end of options...
_EPB_END = struct.Struct("<I")  # ... and the trailing total length
_PADS = [b"", b"\0\0\0", b"\0\0", b"\0"]  # pads[len % 4]: to a 32-bit boundary


def pcap_header(snaplen: int = DEFAULT_SNAPLEN, linktype: int = LINKTYPE_ETHERNET) -> bytes:
    """The 24-byte global header of a nanosecond pcap file."""
    return PCAP_HEADER.pack(PCAP_MAGIC_NS, *PCAP_VERSION, 0, 0, snaplen, linktype)


def pcap_records(frames: list[bytes], ts_ns: int, snaplen: int = DEFAULT_SNAPLEN) -> bytes:
    """The pcap records of ``frames``, all stamped ``ts_ns`` (nanoseconds since the epoch)."""
    sec, nsec = divmod(ts_ns, 1_000_000_000)
    sec &= 0xFFFFFFFF
    pack = PCAP_RECORD.pack
    headers: dict[int, bytes] = {}  # one batch shares its timestamp: one header per frame size
    parts: list[bytes] = []
    for frame in frames:
        size = len(frame)
        header = headers.get(size)
        if header is None:
            header = headers[size] = pack(sec, nsec, min(size, snaplen), size)
        parts += (header, frame if size <= snaplen else frame[:snaplen])
    return b"".join(parts)


def _option(code: int, value: bytes) -> bytes:
    return struct.pack("<HH", code, len(value)) + value + _PADS[len(value) % 4]


def _block(block_type: int, body: bytes) -> bytes:
    total = 12 + len(body)
    return struct.pack("<II", block_type, total) + body + struct.pack("<I", total)


def pcapng_section_header() -> bytes:
    """A pcapng section header block (version 1.0, section length unknown)."""
    return _block(PCAPNG_SHB, struct.pack("<IHHq", PCAPNG_BYTE_ORDER_MAGIC, 1, 0, -1) + _option(0, b""))


def pcapng_interface(name: str, snaplen: int = DEFAULT_SNAPLEN) -> bytes:
    """An interface description block: Ethernet, nanosecond timestamps, named ``name``."""
    options = _option(IF_NAME, name.encode("utf-8", "replace")) + _option(IF_TSRESOL, b"\x09")
    return _block(PCAPNG_IDB, struct.pack("<HHI", LINKTYPE_ETHERNET, 0, snaplen) + options + _option(0, b""))


def pcapng_packets(
    frames: list[bytes], interface: int, inbound: bool, ts_ns: int, snaplen: int = DEFAULT_SNAPLEN
) -> bytes:
    """Enhanced packet blocks for ``frames`` on ``interface``, all stamped ``ts_ns``."""
    high, low = (ts_ns >> 32) & 0xFFFFFFFF, ts_ns & 0xFFFFFFFF
    tail = _EPB_TAIL.pack(EPB_FLAGS, 4, EPB_INBOUND if inbound else EPB_OUTBOUND, OPT_ENDOFOPT)
    head, end = _EPB_HEAD.pack, _EPB_END.pack
    parts: list[bytes] = []
    for frame in frames:
        size = len(frame)
        data = frame if size <= snaplen else frame[:snaplen]
        pad = _PADS[len(data) % 4]
        total = 28 + len(data) + len(pad) + _EPB_TAIL.size + 4
        parts += (head(PCAPNG_EPB, total, interface, high, low, len(data), size), data, pad, tail, end(total))
    return b"".join(parts)


def write_pcap(path: str | os.PathLike[str], frames: list[bytes], ts_ns: int | None = None) -> int:
    """Write ``frames`` (already kept somewhere) to a new pcap file at ``path``; return how many."""
    with open(path, "wb") as f:
        f.write(pcap_header())
        f.write(pcap_records(frames, time.time_ns() if ts_ns is None else ts_ns))
    return len(frames)


def format_for(path: str | os.PathLike[str]) -> str:
    """The format a file name asks for: ``"pcapng"`` for ``*.pcapng``, else ``"pcap"``."""
    return "pcapng" if os.fspath(path).lower().endswith(".pcapng") else "pcap"


class Capture:
    """A mirror of one port (both directions) or of the whole switch (ingress) to a pcap file.

    ``Capture(switch, path)`` captures the whole switch; ``Capture(switch, path, port)``
    one port (a :class:`SwitchPort`, e.g. a netback vif, or its name); ``format`` is
    ``"pcap"`` or ``"pcapng"`` (see the module notes).  The capture runs
    from :meth:`start` (or entering ``with``) to :meth:`stop`; the file is complete and
    flushed once stopped.  ``clock`` gives the timestamps (nanoseconds since the epoch).
    """

    def __init__(
        self,
        switch: Switch,
        path: str | os.PathLike[str],
        port: SwitchPort | str | None = None,
        *,
        snaplen: int = DEFAULT_SNAPLEN,
        name: str | None = None,
        counters: CounterRegistry | None = None,
        clock: Callable[[], int] = time.time_ns,
        format: str = "pcap",
    ) -> None:
        if snaplen < 1:
            raise ValueError(f"capture: snaplen must be >= 1, got {snaplen}")
        if format not in ("pcap", "pcapng"):
            raise ValueError(f"capture: format must be 'pcap' or 'pcapng', not {format!r}")
        if isinstance(port, str):
            found = [p for p in switch.ports if p.name == port]
            if not found:
                raise ValueError(f"capture: switch {switch.name} has no port named {port!r}")
            port = found[0]
        self.switch = switch
        self.path = os.fspath(path)
        self.port = port
        self.snaplen = snaplen
        self.clock = clock
        self.format = format
        self._interfaces: dict[SwitchPort, int] = {}  # pcapng: port -> interface id
        self.name = name or (port.name if port is not None else switch.name)
        owner = f"capture/{self.name}"
        self.counters: Counters = (
            counters.new(owner, "device") if counters is not None else Counters(owner, "device")
        )
        self.error: str | None = None
        self._file: IO[bytes] | None = None

    @property
    def running(self) -> bool:
        """True between :meth:`start` and :meth:`stop` (or a failed write)."""
        return self._file is not None

    def start(self) -> Capture:
        """Create the file, write its header and start mirroring (OSError if it cannot be created)."""
        if self._file is not None:
            raise RuntimeError(f"capture {self.name} is already running")
        f = open(self.path, "wb", buffering=1 << 16)  # noqa: SIM115 - closed by stop()
        self._interfaces = {}
        try:
            f.write(pcap_header(self.snaplen) if self.format == "pcap" else pcapng_section_header())
        except OSError:
            f.close()
            raise
        self._file = f
        self.error = None
        self.switch.add_tap(self._tap)
        return self

    def stop(self) -> None:
        """Stop mirroring, flush and close the file (never raises; a failure lands in :attr:`error`)."""
        f = self._file
        if f is None:
            return
        self._file = None
        self.switch.remove_tap(self._tap)
        try:
            f.close()
        except OSError as e:
            self._fail(e, 0)

    def flush(self) -> None:
        """Push what is buffered to the file (so a reader sees it while the capture runs)."""
        f = self._file
        if f is not None:
            try:
                f.flush()
            except OSError as e:
                self._stop_on_error(e, 0)

    def __enter__(self) -> Capture:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- the tap: called by the switch for every batch ----------------------------------

    def _tap(self, port: SwitchPort, direction: str, frames: list[bytes]) -> None:
        """Write ``frames`` if they belong to this capture (never raises)."""
        mine = self.port
        if mine is None:
            if direction != INGRESS:
                return
        elif port is not mine:
            return
        f = self._file
        if f is None or not frames:
            return
        snaplen = self.snaplen
        try:
            if self.format == "pcap":
                f.write(pcap_records(frames, self.clock(), snaplen))
            else:
                interface = self._interfaces.get(port)
                if interface is None:
                    interface = self._interfaces[port] = len(self._interfaces)
                    f.write(pcapng_interface(port.name, snaplen))
                f.write(pcapng_packets(frames, interface, direction == INGRESS, self.clock(), snaplen))
        except (OSError, ValueError) as e:
            self._stop_on_error(e, len(frames))
            return
        c = self.counters
        sizes = list(map(len, frames))
        c["packets"] += len(sizes)
        c["bytes"] += sum(sizes)
        if max(sizes) > snaplen:
            c["truncated"] += sum(1 for size in sizes if size > snaplen)

    def _stop_on_error(self, e: Exception, lost: int) -> None:
        f, self._file = self._file, None
        self.switch.remove_tap(self._tap)
        if f is not None:
            with contextlib.suppress(OSError, ValueError):  # the error that matters is the first
                f.close()
        self._fail(e, lost)

    def _fail(self, e: Exception, lost: int) -> None:
        self.error = f"{self.path}: {e.strerror if isinstance(e, OSError) and e.strerror else e}"
        c = self.counters
        c["errors"] += 1
        if lost:
            c["drops.write_error"] += lost
        log.error("capture %s stopped: %s (traffic continues)", self.name, self.error)
