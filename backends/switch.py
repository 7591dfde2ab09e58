"""The dom0 virtual switch: an L2 learning bridge between vifs and other port types.

Design rationale
----------------
Every device model (PV vif, emulated NIC, smart NIC) and every host-side port (TAP,
VXLAN, pcap capture, a test's capture port) attaches to one :class:`Switch`, so any guest can
reach any other whatever its NIC (docs/devices.md).  The switch is on the data path
of every frame, so it is written for Python's per-packet budget (docs/architecture.md, "Performance"):

- **batch in, batch out.**  :meth:`Switch.input` takes the list of frames one ring
  drain produced; the output is grouped per egress port and each port's
  :meth:`SwitchPort.transmit` is called at most once per input batch, so a port (a vif's
  netback) can push all its frames onto its RX ring and notify the guest once.
- **bytes and dicts only.**  The destination and source MAC are two slices, learning and
  forwarding are dict look-ups; no scapy, no parsing beyond the Ethernet header.
- **batches in place.**  :meth:`Switch.input_batch` takes a netback vif's frames where they
  lie (a :class:`~pvio.core.netpath.FrameBatch`); for a port with a MAC policy the decision for
  the whole batch is one C call over a copy of the table, and ports that accept batches take
  their frames by index.  Other ports get ``bytes`` (one copy each, the switch's ``copies``).
- **mirrors cost nothing when off.**  Packet capture (:mod:`pvio.backends.capture`)
  registers a tap that sees each batch in and each batch delivered; with no tap, the
  cost is one test of an empty list per batch.
- **a port never stops the switch.**  A port whose ``transmit`` raises is counted and
  logged and the other ports still get their frames (never crash dom0 for one
  device's mistake).

Learning follows a classic bridge (802.1D, Linux ``br_fdb``): the source MAC of each
frame is learned on its ingress port, a MAC seen on another port moves there, group
(multicast/broadcast) source addresses are never learned.  The table is bounded
(``mac_table_size``); when full, the oldest entry learned on the port holding the most
learned entries is evicted, so one port flooding random source MACs only evicts its own.

MAC policy (a peer is hostile input).  A port with ``locked_macs`` (netback locks each vif
to the MAC the toolstack configured, as Xen's vif scripts and Linux bridge ports with
``locked`` do) may only send from those MACs; any other source is ``drops.spoofed_mac``.
Its MACs are static entries: installed at attach, never moved by another port's frame (such
a frame is ``drops.spoofed_mac`` too) and never evicted.  A learning port learns at most
``learn_limit`` MACs (default: the switch's ``port_learn_limit``, a quarter of the table);
beyond it, new sources are not learned (``learn_limit_drops``) but their frames still go
through, as Linux's ``br_fdb_max_learned``.  Entries are not
refreshed per frame: that would cost a reordering on every packet, and an evicted but
active station is simply re-learned from its next frame (its traffic is flooded
meanwhile).  There is no ageing timer: ports detach explicitly and take their MACs with
them.

Counters (pvio.core.counters; a key absent is zero)
----------------------------------------------------
Switch, owner ``switch/<switch name>`` — every input frame lands in exactly one of
``forwarded``, ``flooded`` or a ``drops.<reason>``:

=====================  ================================================================
``forwarded``          unicast frames sent to the one port their destination was learned on
``flooded``            frames sent to every other port (broadcast, multicast, unknown
                       unicast); counted once per frame, not per copy
``learned``            MAC table insertions, including a MAC re-learned on a new port
``mac_moves``          of those, MACs that moved from one port to another
``mac_evictions``      entries evicted because the table was full
``learn_limit_drops``  source MACs not learned because their port reached its learn limit
``port_errors``        ``transmit`` calls that raised (the port's frames are counted as
                       ``drops.port_error`` on the port)
``tap_errors``         mirror taps (capture) that raised; the traffic is unaffected
``drops.runt``         frames shorter than an Ethernet header (14 bytes)
``drops.oversize``     frames longer than 65535 + 14 bytes
``drops.same_port``    unicast frames whose destination was learned on the ingress port
                       (no hairpin)
``drops.no_egress``    frames to flood with no other port attached
``drops.port_detached``  frames handed in by a port that is not attached (a racing detach)
``drops.spoofed_mac``  frames whose source MAC the ingress port may not use (also counted on
                       the port)
=====================  ================================================================

Port, owner ``switch/<port name>``:

=====================  ================================================================
``packets.rx``         frames the port handed *into* the switch (all of them, dropped or not)
``bytes.rx``           their bytes
``packets.tx``         frames the switch handed *to* the port (successful ``transmit`` calls)
``bytes.tx``           their bytes
``flooded``            of ``packets.tx``, the frames that reached this port by flooding
``transmit_errors``    ``transmit`` calls that raised
``drops.port_error``   frames of those calls (counted lost: the port did not say how far it got)
=====================  ================================================================

A port's owner name shares the ``switch/`` namespace with the switch itself, so a port
may not be named like the switch it attaches to, and two attached ports may not share a name.
"""

from __future__ import annotations

import logging
from collections import OrderedDict, deque
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any

import trio

from pvio.core import netpath
from pvio.core._native import ffi, lib
from pvio.core.counters import CounterRegistry, Counters
from pvio.core.netpath import FrameBatch

log = logging.getLogger("pvio.switch")

Tap = Callable[["SwitchPort", str, list[bytes]], None]

ETH_HEADER_LEN = 14
MAX_FRAME_LEN = 65535 + ETH_HEADER_LEN  # the largest frame a netif packet (u16 size) can carry


class SwitchPort:
    """One attachment point of a :class:`Switch` (a vif, a TAP, a capture, a device model).

    Subclasses implement :meth:`transmit`.  The switch owns the port's traffic counters
    (``packets.rx``/``tx``, ``bytes.*``, ``flooded``, errors); a subclass may add its own
    keys (e.g. ``drops.<reason>`` for frames it could not queue).
    """

    #: The only source MACs this port may send from (static entries); None: it learns.
    locked_macs: frozenset[bytes] | None = None
    #: At most this many learned MACs for this port; None: the switch's ``port_learn_limit``.
    learn_limit: int | None = None
    #: The port takes frames of a :class:`~pvio.core.netpath.FrameBatch` in place (it implements
    #: ``transmit_batch``); otherwise the switch hands it ``bytes`` (one counted copy each).
    accepts_batches: bool = False
    #: The port's ``transmit_batch`` also takes batches whose frames still lie in the sender's
    #: guest memory (``pvio.backends.smartnic.GuestFrameBatch``: the smart NIC's), copying each
    #: once with its checked header; any other port gets such a batch settled (one counted copy).
    accepts_guest_batches: bool = False

    def __init__(self, name: str, counters: CounterRegistry | None = None) -> None:
        if not name:
            raise ValueError("a switch port needs a non-empty name")
        self.name = name
        owner = f"switch/{name}"
        self.counters: Counters = (
            counters.new(owner, "device") if counters is not None else Counters(owner, "device")
        )

    def transmit(self, frames: list[bytes]) -> None:
        """Take ``frames`` from the switch (one batch, in order) and queue or deliver them.

        Called from the switch's data path: it must not block and should not raise (a raise
        is counted as ``drops.port_error`` for the whole batch and logged; other ports are
        unaffected).  The list belongs to the port once handed over.
        """
        raise NotImplementedError(f"{type(self).__name__} must implement transmit()")

    def transmit_batch(self, batch: FrameBatch, idx: Any, n: int) -> None:
        """Take frames ``idx[0..n)`` of ``batch`` (valid only during the call: copy to keep).

        Only called on ports with ``accepts_batches``; the same contract as :meth:`transmit`."""
        raise NotImplementedError(f"{type(self).__name__} must implement transmit_batch()")

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r}>"


class Switch:
    """An L2 learning bridge: learn source MACs, forward known unicast, flood the rest."""

    def __init__(
        self,
        counters: CounterRegistry | None = None,
        name: str = "switch0",
        mac_table_size: int = 4096,
        port_learn_limit: int | None = None,
    ) -> None:
        if mac_table_size < 1:
            raise ValueError(f"switch {name}: mac_table_size must be >= 1, got {mac_table_size}")
        self.name = name
        self.mac_table_size = mac_table_size
        if port_learn_limit is None:  # a quarter of the table; small tables: up to 64, all of it
            port_learn_limit = max(mac_table_size // 4, min(mac_table_size, 64))
        self.port_learn_limit = port_learn_limit
        # Learned (not static) MACs per port, oldest first: the eviction and limit bookkeeping.
        self._learned: dict[SwitchPort, OrderedDict[bytes, None]] = {}
        self._static: dict[bytes, SwitchPort] = {}
        self._registry = counters
        owner = f"switch/{name}"
        self.counters: Counters = (
            counters.new(owner, "device") if counters is not None else Counters(owner, "device")
        )
        # MAC -> port, in learning order (the first entry is the oldest: evicted first).
        self._table: OrderedDict[bytes, SwitchPort] = OrderedDict()
        # Attach order is flood order; a dict keeps it and gives O(1) membership.
        self._ports: dict[SwitchPort, None] = {}
        self._names: set[str] = set()
        self._failed_once: set[str] = set()  # ports whose first transmit error was logged in full
        # Mirror taps (packet capture, pvio.backends.capture): called with (port, direction,
        # frames) for every batch in and every batch delivered.  Empty: one test per batch.
        self._taps: list[Tap] = []
        #: The forwarding decision for batches: netpath.C (native/netpath.c's pvio_np_switch) or
        #: netpath.PYTHON (the reference: :meth:`input` on the frames as ``bytes``).
        self.datapath = netpath.default_path()
        self._ctable: _CTable | None = None  # the C decision's copy of the table; None: stale

    # -- topology ---------------------------------------------------------------------

    @property
    def ports(self) -> tuple[SwitchPort, ...]:
        """The attached ports, in attach (and flood) order."""
        return tuple(self._ports)

    @property
    def mac_table(self) -> Mapping[bytes, str]:
        """A read-only snapshot of the learned table: MAC (6 bytes) -> port name, oldest first."""
        return MappingProxyType({mac: port.name for mac, port in self._table.items()})

    def attach(self, port: SwitchPort) -> None:
        """Connect ``port``: it receives floods from now on and its MACs can be learned.

        If the switch was given a :class:`CounterRegistry`, the port's counters are
        registered there (counts the port already had are kept).
        """
        if port in self._ports:
            raise ValueError(f"switch {self.name}: port {port.name!r} is already attached")
        if port.name == self.name or port.name in self._names:
            raise ValueError(
                f"switch {self.name}: cannot attach port {port.name!r}: the name is already used "
                f"by {'the switch' if port.name == self.name else 'another attached port'}"
            )
        if self._registry is not None:
            registered = self._registry.new(port.counters.owner, "device")
            if registered is not port.counters:
                for key, value in port.counters.items():
                    registered[key] += value
                port.counters = registered
        self._ctable = None
        self._ports[port] = None
        self._names.add(port.name)
        self._learned[port] = OrderedDict()
        for mac in port.locked_macs or ():
            self._forget(mac)
            if len(self._table) >= self.mac_table_size:
                self._evict()
            self._table[mac] = port
            self._static[mac] = port

    def detach(self, port: SwitchPort) -> None:
        """Disconnect ``port`` and forget every MAC learned on it."""
        if port not in self._ports:
            raise ValueError(f"switch {self.name}: port {port.name!r} is not attached")
        self._ctable = None
        del self._ports[port]
        self._names.discard(port.name)
        self._failed_once.discard(port.name)
        self._learned.pop(port, None)
        for mac in [mac for mac, owner in self._table.items() if owner is port]:
            del self._table[mac]
            self._static.pop(mac, None)

    def add_tap(self, tap: Tap) -> None:
        """Mirror traffic to ``tap(port, "ingress" | "egress", frames)`` (must not block or keep the list)."""
        self._taps = [*self._taps, tap]

    def remove_tap(self, tap: Tap) -> None:
        """Stop mirroring to ``tap`` (no error if it is not registered)."""
        self._taps = [t for t in self._taps if t != tap]  # == : bound methods are made anew

    # -- data path --------------------------------------------------------------------

    def input(self, port: SwitchPort, frames: list[bytes]) -> None:
        """Switch a batch of ``frames`` that arrived from ``port``.

        Each frame is validated, its source learned, and it is forwarded or flooded; then
        every egress port's :meth:`SwitchPort.transmit` is called once with its frames in
        input order.  Never raises for bad frames or failing ports (they are counted).
        """
        pc = port.counters
        n_in = len(frames)
        pc["packets.rx"] += n_in
        pc["bytes.rx"] += sum(map(len, frames))
        sc = self.counters
        if port not in self._ports:
            sc["drops.port_detached"] += n_in
            return
        if self._taps:
            self._mirror(port, "ingress", frames)

        table = self._table
        lookup = table.get
        ports = self._ports
        out: dict[SwitchPort, list[bytes]] = {}
        flooded_to: dict[SwitchPort, int] = {}
        forwarded = flooded = runt = oversize = same_port = no_egress = spoofed = 0
        others: list[SwitchPort] | None = None  # flood targets, computed on first flood
        locked = port.locked_macs
        static = self._static

        for frame in frames:
            size = len(frame)
            if size < ETH_HEADER_LEN:
                runt += 1
                continue
            if size > MAX_FRAME_LEN:
                oversize += 1
                continue
            # The source: a locked port's must be its own; a learning port's is learned
            # (bit 0 of the first octet set = group address: never learned), unless it is
            # another port's static MAC.
            src = frame[6:12]
            if locked is not None:
                if src not in locked:
                    spoofed += 1
                    continue
            elif lookup(src) is not port:
                if src in static:
                    spoofed += 1
                    continue
                if not src[0] & 1:
                    self._learn(src, port)
            dst = frame[0:6]
            if not dst[0] & 1:
                egress = lookup(dst)
                if egress is port:
                    same_port += 1
                    continue
                if egress is not None:
                    forwarded += 1
                    batch = out.get(egress)
                    if batch is None:
                        out[egress] = [frame]
                    else:
                        batch.append(frame)
                    continue
            # Broadcast, multicast or unknown unicast: flood to every other port.
            if others is None:
                others = [p for p in ports if p is not port]
            if not others:
                no_egress += 1
                continue
            flooded += 1
            for egress in others:
                batch = out.get(egress)
                if batch is None:
                    out[egress] = [frame]
                else:
                    batch.append(frame)
                flooded_to[egress] = flooded_to.get(egress, 0) + 1

        if forwarded:
            sc["forwarded"] += forwarded
        if flooded:
            sc["flooded"] += flooded
        if runt:
            sc["drops.runt"] += runt
        if oversize:
            sc["drops.oversize"] += oversize
        if same_port:
            sc["drops.same_port"] += same_port
        if no_egress:
            sc["drops.no_egress"] += no_egress
        if spoofed:
            sc["drops.spoofed_mac"] += spoofed
            pc["drops.spoofed_mac"] += spoofed

        for egress, batch in out.items():
            self._transmit(egress, batch, flooded_to.get(egress, 0))

    def input_batch(self, port: SwitchPort, batch: FrameBatch) -> None:
        """Switch the frames of a :class:`~pvio.core.netpath.FrameBatch` from ``port`` in place.

        The same decisions and counters as :meth:`input`.  A port with a MAC policy
        (``locked_macs``) learns nothing, so the decision for its whole batch is one C call
        (``pvio_np_switch``) over the frames where they lie; each egress port that accepts
        batches takes its frames by index, others get ``bytes`` (one copy each, counted as the
        switch's ``copies``).  Mirror taps get the batch as ``bytes`` (one counted copy each,
        shared by the ingress and egress mirrors) while the ports still get it in place.  A
        learning port or the Python data path takes :meth:`input` on the frames as ``bytes``
        (the readable reference of the decision).
        """
        n = batch.n
        if not n:
            return
        locked = port.locked_macs
        if port not in self._ports or locked is None or self.datapath is not netpath.C:
            self.input(port, self._copy_out(batch))
            return
        mirror: list[bytes] | None = None
        if self._taps:  # the taps see bytes (one counted copy each); the ports still get the batch
            mirror = self._copy_out(batch)
            self._mirror(port, "ingress", mirror)
        ct = self._ctable
        if ct is None:
            ct = self._ctable = _CTable(self._table, tuple(self._ports))
        plist = ct.ports
        nports = len(plist)
        ct.ensure(n)
        lk = ct.locked_of(port, locked)
        done = ct.done
        lib.pvio_np_switch(
            batch.area.c, batch.frames, n, ct.table, ct.index[port], nports, lk, len(locked),
            ct.dest, ct.idx, ct.counts, ct.bytes_to, ct.flooded_to, ct.order, done,
        )  # fmt: skip
        pc = port.counters
        pc["packets.rx"] += n
        pc["bytes.rx"] += done.in_bytes
        sc = self.counters
        if done.forwarded:
            sc["forwarded"] += done.forwarded
        if done.flooded:
            sc["flooded"] += done.flooded
        if done.runt:
            sc["drops.runt"] += done.runt
        if done.oversize:
            sc["drops.oversize"] += done.oversize
        if done.same_port:
            sc["drops.same_port"] += done.same_port
        if done.no_egress:
            sc["drops.no_egress"] += done.no_egress
        if done.spoofed:
            sc["drops.spoofed_mac"] += done.spoofed
            pc["drops.spoofed_mac"] += done.spoofed
        order, counts, idx = ct.order, ct.counts, ct.idx
        for k in range(done.norder):
            p = order[k]
            sent = self._transmit_batch(
                plist[p], batch, idx + p * n, counts[p], ct.bytes_to[p], ct.flooded_to[p]
            )
            if mirror is not None and sent:  # as _transmit mirrors what a port took
                self._mirror(plist[p], "egress", [mirror[i] for i in ffi.unpack(idx + p * n, counts[p])])

    def _copy_out(self, batch: FrameBatch, idx: Any = None, n: int | None = None) -> list[bytes]:
        """The batch's frames (``idx[0..n)`` of them, or all) as ``bytes``: one copy each, counted
        as the switch's ``copies`` / ``copy_bytes``."""
        frames = batch.materialize(idx, n)
        self.counters["copies"] += len(frames)
        self.counters["copy_bytes"] += sum(map(len, frames))
        return frames

    def _transmit_batch(
        self, port: SwitchPort, batch: FrameBatch, idx: Any, n: int, nbytes: int, n_flooded: int
    ) -> bool:
        """:meth:`_transmit` for frames of a batch: in place if the port takes batches.  True if
        the port took them in place (the caller mirrors them); a port that gets ``bytes`` is
        mirrored by :meth:`_transmit`, and one that raised is not."""
        if not port.accepts_batches:
            self._transmit(port, self._copy_out(batch, idx, n), n_flooded)
            return False
        try:
            port.transmit_batch(batch if port.accepts_guest_batches else batch.settled(), idx, n)
        except Exception:
            self._port_failed(port, "transmit_batch", n)
            return False
        self._port_sent(port, n, nbytes, n_flooded)
        return True

    def _port_failed(self, port: SwitchPort, call: str, n: int) -> None:
        """Count and log (once per port at ERROR, then at DEBUG) a port whose ``call`` raised:
        its ``n`` frames are dropped, nothing else is."""
        port.counters["transmit_errors"] += 1
        port.counters["drops.port_error"] += n
        self.counters["port_errors"] += 1
        if port.name not in self._failed_once:
            self._failed_once.add(port.name)
            log.error(
                "switch %s: port %r raised in %s(); %d frames dropped "
                "(further errors of this port are logged at DEBUG)",
                self.name,
                port.name,
                call,
                n,
                exc_info=True,
            )
        else:
            log.debug("switch %s: port %r raised again; %d frames dropped", self.name, port.name, n)

    @staticmethod
    def _port_sent(port: SwitchPort, n: int, nbytes: int, n_flooded: int) -> None:
        """Count ``n`` frames (``nbytes``, ``n_flooded`` of them flooded) handed to ``port``."""
        pc = port.counters
        pc["packets.tx"] += n
        pc["bytes.tx"] += nbytes
        if n_flooded:
            pc["flooded"] += n_flooded

    def _learn(self, mac: bytes, port: SwitchPort) -> None:
        """Record that ``mac`` lives behind the learning ``port`` (new, or moved from another
        port), within the port's learn limit."""
        table = self._table
        sc = self.counters
        mine = self._learned[port]
        limit = self.port_learn_limit if port.learn_limit is None else port.learn_limit
        if len(mine) >= limit:
            sc["learn_limit_drops"] += 1
            return
        if mac in table:
            # Moved: re-learn as the newest entry on its new port.
            self._forget(mac)
            sc["mac_moves"] += 1
        elif len(table) >= self.mac_table_size:
            self._evict()
        table[mac] = port
        mine[mac] = None
        sc["learned"] += 1
        self._ctable = None

    def _forget(self, mac: bytes) -> None:
        """Remove a learned ``mac`` from the table and its port's bookkeeping (if present)."""
        owner = self._table.pop(mac, None)
        self._ctable = None
        if owner is not None:
            learned = self._learned.get(owner)
            if learned is not None:
                learned.pop(mac, None)

    def _evict(self) -> None:
        """Make room: drop the oldest entry learned on the port that holds the most."""
        hog = max(self._learned.values(), key=len, default=None)
        if not hog:
            return  # only static entries: the table may exceed its size by locked ports' MACs
        mac, _ = hog.popitem(last=False)
        del self._table[mac]
        self._ctable = None
        self.counters["mac_evictions"] += 1

    def _transmit(self, port: SwitchPort, frames: list[bytes], n_flooded: int) -> None:
        """Hand ``frames`` to ``port``, containing and counting whatever it raises."""
        n = len(frames)
        nbytes = sum(map(len, frames))
        mirrored = list(frames) if self._taps else None  # the port owns `frames` once handed over
        try:
            port.transmit(frames)
        except Exception:
            self._port_failed(port, "transmit", n)
            return
        self._port_sent(port, n, nbytes, n_flooded)
        if mirrored is not None:
            self._mirror(port, "egress", mirrored)

    def _mirror(self, port: SwitchPort, direction: str, frames: list[bytes]) -> None:
        """Hand ``frames`` to every tap; a tap that raises is counted, never propagated."""
        for tap in self._taps:
            try:
                tap(port, direction, frames)
            except Exception:
                self.counters["tap_errors"] += 1
                log.debug("switch %s: a tap raised", self.name, exc_info=True)


def mac_key(mac: bytes) -> int:
    """A 6-byte MAC as the C table's key: little-endian in the low 48 bits."""
    return int.from_bytes(mac, "little")


class _CTable:
    """The switch's table and ports as ``pvio_np_switch`` reads them (rebuilt when either changes)."""

    def __init__(self, table: Mapping[bytes, SwitchPort], ports: tuple[SwitchPort, ...]) -> None:
        self.ports = ports
        self.index = {p: i for i, p in enumerate(ports)}
        size = 16
        while size < 2 * len(table) + 2:
            size *= 2
        self._key = ffi.new("uint64_t[]", size)
        self._port = ffi.new("int32_t[]", size)
        self.table = ffi.new("struct np_mac_table *")
        self.table.key, self.table.port, self.table.mask = self._key, self._port, size - 1
        for mac, owner in table.items():
            key = mac_key(mac)
            h = _mac_hash(key, size - 1)
            while self._key[h]:
                h = (h + 1) & (size - 1)
            self._key[h] = key | (1 << 63)
            self._port[h] = self.index[owner]
        self._locked: dict[SwitchPort, tuple[frozenset[bytes], Any]] = {}
        self.done = ffi.new("struct np_sw_done *")
        nports = max(1, len(ports))
        self.counts = ffi.new("uint32_t[]", nports)
        self.bytes_to = ffi.new("uint64_t[]", nports)
        self.flooded_to = ffi.new("uint32_t[]", nports)
        self.order = ffi.new("uint32_t[]", nports)
        self._cap = 0
        self.ensure(256)

    def ensure(self, n: int) -> None:
        """Room for a batch of ``n`` frames."""
        if n > self._cap:
            self._cap = max(n, 2 * self._cap)
            self.dest = ffi.new("int32_t[]", self._cap)
            self.idx = ffi.new("uint32_t[]", self._cap * max(1, len(self.ports)))

    def locked_of(self, port: SwitchPort, locked: frozenset[bytes]) -> Any:
        """The port's locked MACs as a C array (cached while the set is the same)."""
        cached = self._locked.get(port)
        if cached is None or cached[0] is not locked:
            cached = (locked, ffi.new("uint64_t[]", [mac_key(m) for m in locked] or [0]))
            self._locked[port] = cached
        return cached[1]


def _mac_hash(key: int, mask: int) -> int:
    """netpath.c's mac_hash: the table's probe start for a key."""
    return ((key * 0x9E3779B97F4A7C15) & 0xFFFF_FFFF_FFFF_FFFF) >> 40 & mask


class CapturePort(SwitchPort):
    """A port that keeps what it receives: the last ``maxlen`` frames, and optionally a channel.

    For tests (a mirror of the traffic to a file is :mod:`pvio.backends.capture`).
    ``frames`` is a bounded deque (oldest frames fall out, counted ``capture.evicted``).
    With ``channel``, every frame is also sent with ``send_nowait`` (never blocking the
    switch): a full channel counts ``drops.channel_full``, a closed one
    ``drops.channel_closed``.
    """

    def __init__(
        self,
        name: str,
        maxlen: int = 1024,
        channel: trio.MemorySendChannel[bytes] | None = None,
        counters: CounterRegistry | None = None,
    ) -> None:
        super().__init__(name, counters)
        if maxlen < 1:
            raise ValueError(f"capture port {name}: maxlen must be >= 1, got {maxlen}")
        self.frames: deque[bytes] = deque(maxlen=maxlen)
        self.channel = channel

    def transmit(self, frames: list[bytes]) -> None:
        """Keep ``frames`` (and send them on the channel, if any)."""
        kept = self.frames
        overflow = len(kept) + len(frames) - (kept.maxlen or 0)
        if overflow > 0:
            self.counters["capture.evicted"] += overflow
        kept.extend(frames)
        channel = self.channel
        if channel is None:
            return
        for i, frame in enumerate(frames):
            try:
                channel.send_nowait(frame)
            except trio.WouldBlock:
                self.counters["drops.channel_full"] += 1
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                self.counters["drops.channel_closed"] += len(frames) - i
                self.channel = None
                return

    def clear(self) -> None:
        """Forget the captured frames."""
        self.frames.clear()
