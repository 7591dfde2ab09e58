"""A switch port that carries Ethernet frames in VXLAN (RFC 7348) to switches on other hosts.

Design rationale
----------------
VXLAN puts an Ethernet frame in a UDP datagram behind an 8-byte header (flags with the
I bit, a 24-bit VXLAN Network Identifier, reserved fields), so two L2 segments on hosts
that only share an IP network become one.  Linux's ``vxlan`` device and Open vSwitch
speak it; a :class:`VxlanPort` makes pvio's switch a VTEP (VXLAN tunnel end point) that
interoperates with them.

- **a port like any other.**  ``transmit`` encapsulates and sends with a non-blocking
  UDP socket; :meth:`VxlanPort.run` receives datagrams in batches (``wait_readable``,
  then drain), decapsulates and hands the inner frames to the switch.  Forwarding
  between the guests of one host never touches the tunnel.
- **where a frame goes.**  Each remote VTEP is an IP address (and UDP port).  The port
  keeps a forwarding table of remote MACs -> VTEP, learned from the outer source address
  of each valid datagram (Linux's ``learning``); a unicast frame to a known MAC goes to
  its VTEP only.  Broadcast, multicast and unknown unicast go to every *static* remote
  (head-end replication, like Linux's all-zeros fdb entries); learned VTEPs receive only
  unicast.  A learned VTEP is sent to on the UDP port of the static remote with the same
  address, else on ``dst_port`` (peers listen on the VXLAN port, whatever source port
  they send from).  The table is bounded (``fdb_size``; oldest evicted).
- **hostile input.**  Every datagram is checked before use and a bad one is counted and
  dropped: shorter than the VXLAN header plus an Ethernet header (``drops.short``), the I
  flag clear or any reserved bit set (``drops.bad_flags``: Linux drops these too), a VNI
  other than ours (``drops.unknown_vni``), a group source MAC (never learned; the frame
  is still switched).  Nothing from the socket raises into dom0.
- **never blocks the switch.**  A datagram the kernel cannot queue now is dropped and
  counted (``drops.tx_full``); a send error (no route, ...) counts ``drops.tx_error``.
- **says why it cannot be created.**  :class:`VxlanError` carries a one-line reason
  (address in use, no permission, address not available).

MTU: the encapsulation adds 50 bytes on an IPv4 underlay (outer Ethernet 14, IPv4 20,
UDP 8, VXLAN 8), so on a 1500-byte underlay the guests' MTU should be 1450, as Linux
sets it on a ``vxlan`` device (an IPv6 underlay adds 70).  Larger frames are sent and
fragmented by the underlay's IP layer (Linux's vxlan device instead drops them); frames
whose datagram would exceed UDP's 65507-byte limit are dropped (``drops.oversize``).

Counters, owner ``switch/<port name>`` (besides the switch's ``packets.*``/``bytes.*``):
``datagrams.rx``/``datagrams.tx`` (including replicated copies), the ``drops.*`` above,
``drops.no_remote`` (a frame to flood with no static remote), ``fdb.learned``,
``fdb.moves``, ``fdb.evictions``.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import socket
import struct
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from types import MappingProxyType

import trio

from pvio.backends.switch import ETH_HEADER_LEN, Switch, SwitchPort
from pvio.core.counters import CounterRegistry

log = logging.getLogger("pvio.vxlan")

VXLAN_PORT = 4789  # IANA
VXLAN_HEADER = struct.Struct("!II")  # flags(8) reserved(24), VNI(24) reserved(8)
VXLAN_FLAG_I = 0x08000000  # the I flag: the VNI is valid
VXLAN_OVERHEAD = 50  # outer Ethernet + IPv4 + UDP + VXLAN headers on an IPv4 underlay
MAX_VNI = (1 << 24) - 1
MAX_UDP_PAYLOAD = 65507
DEFAULT_BATCH = 64
DEFAULT_FDB_SIZE = 4096

Address = tuple[str, int]


class VxlanError(OSError):
    """A VXLAN port could not be created; ``str()`` is a one-line reason."""

    def __str__(self) -> str:
        return str(self.strerror)


def _reason(e: OSError, local: Address) -> str:
    where = f"vxlan {local[0]}:{local[1]}"
    if e.errno == errno.EADDRINUSE:
        return f"{where}: address in use (another VTEP or program has this UDP port)"
    if e.errno in (errno.EACCES, errno.EPERM):
        return f"{where}: no permission (UDP ports below 1024 need CAP_NET_BIND_SERVICE)"
    if e.errno == errno.EADDRNOTAVAIL:
        return f"{where}: address not available on this host"
    return f"{where}: {e.strerror or e}"


def vxlan_header(vni: int) -> bytes:
    """The 8-byte VXLAN header for ``vni`` (I flag set, reserved fields zero)."""
    if not 0 <= vni <= MAX_VNI:
        raise ValueError(f"a VNI is 24 bits (0..{MAX_VNI}), not {vni}")
    return VXLAN_HEADER.pack(VXLAN_FLAG_I, vni << 8)


def open_vxlan_socket(local: Address) -> socket.socket:
    """A non-blocking UDP socket bound to ``local``; :class:`VxlanError` says why not."""
    try:
        family = socket.AF_INET6 if ":" in local[0] else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_DGRAM)
    except OSError as e:
        raise VxlanError(e.errno, _reason(e, local)) from None
    try:
        sock.bind(local)
    except OSError as e:
        sock.close()
        raise VxlanError(e.errno, _reason(e, local)) from None
    except (OverflowError, socket.gaierror) as e:
        sock.close()
        raise VxlanError(errno.EINVAL, f"vxlan {local[0]}:{local[1]}: not a local address ({e})") from None
    sock.setblocking(False)
    return sock


class VxlanPort(SwitchPort):
    """A switch port whose frames travel in VXLAN network ``vni`` to ``remotes``.

    ``local`` is the UDP address to listen on (default: every address, port 4789), or
    pass an already bound ``sock``.  ``remotes`` are the static VTEPs (flood targets);
    more may be added with :meth:`add_remote`.  Run :meth:`run` in a task; :meth:`close`
    detaches and closes the socket.
    """

    def __init__(
        self,
        switch: Switch,
        vni: int,
        *,
        local: Address = ("0.0.0.0", VXLAN_PORT),
        remotes: Iterable[Address] = (),
        sock: socket.socket | None = None,
        dst_port: int = VXLAN_PORT,
        name: str | None = None,
        batch: int = DEFAULT_BATCH,
        fdb_size: int = DEFAULT_FDB_SIZE,
        counters: CounterRegistry | None = None,
    ) -> None:
        super().__init__(name or f"vxlan{vni}", counters)
        if batch < 1 or fdb_size < 1:
            raise ValueError(f"vxlan {vni}: batch and fdb_size must be >= 1")
        self.vni = vni
        self._header = vxlan_header(vni)
        self.dst_port = dst_port
        self.batch = batch
        self.fdb_size = fdb_size
        self.switch = switch
        self._remotes: dict[Address, None] = {}
        self._port_of: dict[str, int] = {}
        for remote in remotes:
            self.add_remote(*remote)
        self._fdb: OrderedDict[bytes, str] = OrderedDict()  # remote MAC -> VTEP address
        if sock is None:
            sock = open_vxlan_socket(local)
        else:
            sock.setblocking(False)
        self.sock: socket.socket | None = sock
        self.local: Address = sock.getsockname()[:2]
        try:
            switch.attach(self)
        except Exception:
            sock.close()
            self.sock = None
            raise

    # -- configuration -------------------------------------------------------------------

    @property
    def remotes(self) -> tuple[Address, ...]:
        """The static remote VTEPs, in the order added (the flood list)."""
        return tuple(self._remotes)

    @property
    def fdb(self) -> Mapping[bytes, str]:
        """A read-only view of the learned table: remote MAC -> VTEP address, oldest first."""
        return MappingProxyType(self._fdb)

    def add_remote(self, address: str, port: int = VXLAN_PORT) -> None:
        """Add a static remote VTEP (a flood target); ``port`` is the UDP port it listens on."""
        self._remotes[(address, port)] = None
        self._port_of[address] = port

    # -- to the tunnel ---------------------------------------------------------------------

    def transmit(self, frames: list[bytes]) -> None:
        """Encapsulate each frame and send it to its VTEP (known unicast) or every static remote."""
        sock = self.sock
        c = self.counters
        if sock is None:
            c["drops.closed"] += len(frames)
            return
        header = self._header
        fdb = self._fdb.get
        port_of = self._port_of.get
        dst_port = self.dst_port
        flood = list(self._remotes)
        sendto = sock.sendto
        sent = full = failed = oversize = no_remote = 0
        for frame in frames:
            if len(frame) + 8 > MAX_UDP_PAYLOAD:
                oversize += 1
                continue
            datagram = header + frame
            vtep = None if frame[0] & 1 else fdb(frame[0:6])
            targets = [(vtep, port_of(vtep, dst_port))] if vtep is not None else flood
            if not targets:
                no_remote += 1
                continue
            for target in targets:
                try:
                    sendto(datagram, target)
                    sent += 1
                except BlockingIOError:
                    full += 1
                except OSError:
                    failed += 1
        if sent:
            c["datagrams.tx"] += sent
        if full:
            c["drops.tx_full"] += full
        if failed:
            c["drops.tx_error"] += failed
        if oversize:
            c["drops.oversize"] += oversize
        if no_remote:
            c["drops.no_remote"] += no_remote

    # -- from the tunnel -------------------------------------------------------------------

    async def run(self) -> None:
        """Receive, check and decapsulate datagrams, in batches, until closed or cancelled."""
        while self.sock is not None:
            sock = self.sock
            try:
                await trio.lowlevel.wait_readable(sock)
            except (trio.ClosedResourceError, OSError, ValueError):
                return
            datagrams: list[tuple[bytes, str]] = []
            while len(datagrams) < self.batch and self.sock is not None:
                try:
                    data, peer = sock.recvfrom(65535)
                except (BlockingIOError, InterruptedError):
                    break
                except OSError as e:  # e.g. an ICMP port unreachable reported on the socket
                    self.counters["errors.rx"] += 1
                    log.debug("vxlan %d: recvfrom: %s", self.vni, e)
                    break
                datagrams.append((data, peer[0]))
            frames = self.decapsulate(datagrams)
            if frames:
                self.switch.input(self, frames)

    def decapsulate(self, datagrams: list[tuple[bytes, str]]) -> list[bytes]:
        """The inner frames of the valid ``(datagram, source address)`` pairs; learns their MACs."""
        c = self.counters
        c["datagrams.rx"] += len(datagrams)
        frames: list[bytes] = []
        min_len = VXLAN_HEADER.size + ETH_HEADER_LEN
        expected_vni = self.vni << 8
        unpack = VXLAN_HEADER.unpack_from
        fdb = self._fdb
        for data, source in datagrams:
            if len(data) < min_len:
                c["drops.short"] += 1
                continue
            flags, vni_word = unpack(data)
            if flags != VXLAN_FLAG_I or vni_word & 0xFF:
                c["drops.bad_flags"] += 1
                continue
            if vni_word != expected_vni:
                c["drops.unknown_vni"] += 1
                continue
            frame = data[VXLAN_HEADER.size :]
            src = frame[6:12]
            if not src[0] & 1 and fdb.get(src) != source:
                self._learn(src, source)
            frames.append(frame)
        return frames

    def _learn(self, mac: bytes, vtep: str) -> None:
        fdb = self._fdb
        c = self.counters
        if mac in fdb:
            del fdb[mac]
            c["fdb.moves"] += 1
        elif len(fdb) >= self.fdb_size:
            fdb.popitem(last=False)
            c["fdb.evictions"] += 1
        fdb[mac] = vtep
        c["fdb.learned"] += 1

    def close(self) -> None:
        """Detach from the switch and close the socket."""
        sock, self.sock = self.sock, None
        if self in self.switch.ports:
            self.switch.detach(self)
        if sock is not None:
            with contextlib.suppress(RuntimeError):  # outside trio.run nobody can be waiting
                trio.lowlevel.notify_closing(sock)
            sock.close()

    def __enter__(self) -> VxlanPort:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
