"""The smart NIC: a DMA-capable NIC that the monitor itself implements (DMA offload).

Design rationale
----------------
docs/devices.md: the guest sees a NIC with DMA although the wire below has none.  The
guest posts *descriptors* on two rings in its own memory; the monitor sends by reading
the guest's buffers directly (a DMA from guest memory to the switch: no copy into dom0,
no dom0 at all), receives by writing frames into buffers the guest posted, and writes
*completions* into the same shared rings.  The wire's interrupts (the switch handing
frames over) are absorbed by the monitor; the guest is interrupted only when it asked
(the ring's response event index) and moderation allows it.  Prior art: virtio-net's
event-index suppression, NAPI's "poll while busy, re-arm when idle", Intel's interrupt
throttling and Linux net_dim's adaptive moderation profiles.

Two paths keep both ends of the load curve cheap:

- **low load**: the guest's driver sleeps with the interrupt armed; a frame is written
  into its buffer on arrival and, at moderation level 0, interrupts it at once (one
  interrupt per frame, no added latency).  A send is a descriptor push plus one doorbell
  (an MMIO write: one exit), and the monitor sends inline on that exit.
- **high load**: the monitor's own task polls the TX ring while frames keep coming, so it
  leaves the TX doorbell disarmed (the ring's ``req_event`` lags) and pushes cost the guest
  nothing; the guest's driver polls completions while busy, so it leaves the interrupt
  disarmed; when it does arm it, adaptive moderation holds the interrupt back until
  enough frames (or enough time) have gathered.

Everything the guest writes is hostile input: registers are range-checked when the device
is enabled, descriptors are checked one by one (a bad one is completed with an error
status and counted, never raised), an impossible ring index stops the device (STATUS
ERROR, counted, logged); other devices and the guest go on.

Register map (MMIO, ``SNIC_MMIO_BASE + 0x1000 * devid``, 32-bit little-endian registers)
----------------------------------------------------------------------------------------

======  =============  ===  =========================================================
offset  name           acc  meaning
======  =============  ===  =========================================================
0x00    ID             R    0x43494e53 ("SNIC")
0x04    VERSION        R    1
0x08    CTRL           RW   ENABLE (0x1): check the configuration and start; RESET (0x2):
                            stop and forget the rings (config registers keep their values)
0x0C    STATUS         R    ENABLED (0x1), ERROR (0x2: configuration refused, or stopped
                            on a broken ring; cleared by RESET)
0x10    TX_RING_LO/HI  RW   guest-physical address of the TX ring page (0x14: high half)
0x18    RX_RING_LO/HI  RW   RX ring page (0x1C: high half)
0x20    POOL_LO/HI     RW   guest-physical base of the buffer pool (0x24: high; 0: none)
0x28    POOL_BUF_SIZE  RW   bytes per pool buffer, 64..65536
0x2C    POOL_COUNT     RW   buffers in the pool, 1..65536
0x30    IRQ            R    the VIRQ the device raises (VIRQ_ARCH_0 + 4 + devid)
0x34    GRANT_DOMID    R    the domid to grant buffers to: DOMID_IO (0x7ff1)
0x38    MAC_LO/HI      R    MAC bytes 0..3, 4..5 (0x3C)
0x40    DOORBELL       W    bit 0: new TX descriptors; bit 1: new RX buffers
0x44    MOD_MODE       RW   0 adaptive (default), 1 fixed (MOD_FRAMES, MOD_USECS), 2 off
0x48    MOD_FRAMES     RW   fixed mode: interrupt once this many completions wait (>= 1)
0x4C    MOD_USECS      RW   fixed mode: ... or this many µs after the first one
0x50    ERRORS         R    descriptors refused so far
0x54    MOD_LEVEL      R    the adaptive moderation level now (0..4)
0x58    RING_ORDER     RW   each ring spans 2**RING_ORDER contiguous pages (0..2; 0: one
                            page of 128 slots, 1: 256, 2: 512)
======  =============  ===  =========================================================

Configuration registers may only be written while the device is disabled (else ignored,
counted ``errors.config_while_enabled``).

Rings and descriptors
---------------------
Each ring is one page (or ``2**RING_ORDER`` contiguous pages) with Xen's shared-ring header
(``io/ring.h``: req_prod, req_event, rsp_prod, rsp_event, then 48 bytes of padding) and 128
slots of 16 bytes per page (:data:`SNIC_RING`; 256 in two pages, 512 in four).  The guest is
the front end: it initialises the ring, posts descriptors as requests; the monitor answers
each with a completion in the same slot.

``struct snic_desc`` (16 bytes, written by the guest)::

    u32 buf      @0   pool index, or a grant reference if flags & SNIC_F_GREF
    u16 offset   @4   byte offset in the pool buffer, or in the granted page
    u16 len      @6   TX: frame length; RX: bytes the buffer can take from offset
    u16 id       @8   the driver's cookie, echoed in the completion
    u16 flags    @10  SNIC_F_GREF (0x1); other bits must be 0
    u32 reserved @12  0

``struct snic_cmpl`` (8 bytes, written by the monitor)::

    u16 id       @0   the descriptor's id
    u16 len      @2   bytes transferred (RX: the frame's length)
    i16 status   @4   0 OK, or a negative SNIC_E_* code
    u16 flags    @6   0

A granted buffer must be granted to DOMID_IO (readable for TX, writable for RX); the
monitor checks the grant entry on each use, like a grant copy.  A pool buffer is
``POOL + index * POOL_BUF_SIZE``.  TX frames are 14..65535 bytes in one buffer (no
scatter-gather).  An RX buffer too small for the head frame drops that frame
(``drops.rx_too_big``) and is kept for the next.

Moderation
----------
When a completion push crosses the guest's ``rsp_event`` the guest "wants" an interrupt;
the monitor raises it once ``frames`` completions have been written since then, or
``usecs`` after the first of them, whichever comes first -- the timer only on a pass that
found no work, so while frames keep coming the budget is in frames and a busy phase takes
the same interrupts on any host.  Adaptive mode picks ``(frames, usecs)`` from a profile
table by level, net_dim style: a sample per window between interrupts (completions, the
pushes they came in, the window's duration), one level per step toward the level the sample
asks for (:func:`level_for_sample`): bursts (>= ``BURST_FRAMES`` per push) are saturation,
the top level, whatever the rate; otherwise the rate's band (:data:`RATE_LEVELS`), a sample
of fewer than ``SAMPLE_MIN_FRAMES`` never raising the level.  At low rates level 0 (1
frame, 0 µs: interrupt at once), at high rates up to 96 frames / 200 µs.  Under trio's
MockClock time stands still while tasks are busy, so a busy phase samples as a very high
rate: the counts are exactly reproducible.  docs/devices.md ("Moderation") has the details.

Data path
---------
TX descriptors are served in C (:mod:`pvio.backends.smartnic_dma`): ``tx_guest_batch`` checks
each one and snapshots only the frame's 14-byte header; the drained ring goes to the switch as
one :class:`GuestFrameBatch` (``Switch.input_batch``: one C decision for the MAC-locked port,
made on the snapshots) whose frames stay in guest memory.  As an egress port the device takes
batches in place (:meth:`SmartNic.transmit_batch`): frames go from where they lie -- the
sender's memory, under their checked headers -- straight into posted RX buffers, one DMA each.
A frame that must wait for a buffer, or goes to another kind of port, is first DMA'd into the
sender's :class:`TxArea` (the monitor's own memory; :meth:`GuestFrameBatch.settled`), where a
waiting receiver borrows it (the sender moves to a spare area); frames of an area that cannot be
lent (another kind of port's, or past ``MAX_LENT_AREAS``) are copied out, counted.  TX
completions are written once the switch has handed every frame on.

Counters, owner ``smartnic/<name>`` (``snic<domid>.<devid>``): ``packets.tx``/``.rx``,
``bytes.*``, ``copies`` / ``copy_bytes`` (DMA transfers: one per frame into an RX buffer; one
per frame settled into a TX area; plus a frame copied out of a batch that cannot be lent while
it waits for a buffer), ``header_bytes`` (the header snapshots), ``doorbells``,
``irqs.raised`` (``irqs.by_frames`` / ``irqs.by_timer``), ``irqs.unbound``, ``polls``,
``drops.<reason>``, ``errors.<reason>`` (``bad_config``, ``bad_buf``, ``bad_grant``,
``bad_len``, ``bad_flags``, ``ring_overflow``, ``config_while_enabled``,
``doorbell_disabled``, ``bad_register``, ``bad_size``).
"""

from __future__ import annotations

import logging
import math
import mmap
from collections import deque
from typing import TYPE_CHECKING, Any

import trio

from pvio.abi import PAGE_SHIFT, PAGE_SIZE
from pvio.abi.smartnic import (
    CMPL,
    CTRL_ENABLE,
    CTRL_RESET,
    DB_RX,
    DB_TX,
    DESC,
    MOD_ADAPTIVE,
    MOD_FIXED,
    MOD_OFF,
    REG_CTRL,
    REG_DOORBELL,
    REG_ERRORS,
    REG_GRANT_DOMID,
    REG_ID,
    REG_IRQ,
    REG_MAC_HI,
    REG_MAC_LO,
    REG_MOD_FRAMES,
    REG_MOD_LEVEL,
    REG_MOD_MODE,
    REG_MOD_USECS,
    REG_POOL_BUF_SIZE,
    REG_POOL_COUNT,
    REG_POOL_HI,
    REG_POOL_LO,
    REG_RING_ORDER,
    REG_RX_RING_HI,
    REG_RX_RING_LO,
    REG_STATUS,
    REG_TX_RING_HI,
    REG_TX_RING_LO,
    REG_VERSION,
    SNIC_E_BAD_BUF,
    SNIC_E_BAD_FLAGS,
    SNIC_E_BAD_GRANT,
    SNIC_E_BAD_LEN,
    SNIC_F_GREF,
    SNIC_ID,
    SNIC_IRQ_BASE,
    SNIC_MAX_DEVICES,
    SNIC_MMIO_BASE,
    SNIC_MMIO_STRIDE,
    SNIC_OK,
    SNIC_RING,
    SNIC_RING_MAX_ENTRIES,
    SNIC_RING_ORDER_MAX,
    SNIC_VERSION,
    SNIC_WINDOW,
    ST_ENABLED,
    ST_ERROR,
    snic_mac,
    snic_ring_entries,
)
from pvio.abi.xen import DOMID_IO
from pvio.backends.smartnic_dma import (
    ETH_HEADER_LEN,
    HDR_STRIDE,
    NP_FRAME,
    STOP_FULL,
    STOP_GRANTED,
    area_bytes,
    area_copy,
    frame_entries,
    place,
    rx_area_batch,
    rx_batch,
    tx_guest_batch,
)
from pvio.backends.switch import Switch, SwitchPort
from pvio.core._native import ffi
from pvio.core.grant_table import GrantError
from pvio.core.netpath import Area, FrameBatch
from pvio.core.ratelimit import LogLimiter
from pvio.ringbuf import BackRing, RingOverflowError

if TYPE_CHECKING:
    from pvio.core.domain import Domain
    from pvio.core.hypervisor import Hypervisor

log = logging.getLogger("pvio.smartnic")

_REASON_STATUS = {
    "bad_buf": SNIC_E_BAD_BUF,
    "bad_grant": SNIC_E_BAD_GRANT,
    "bad_len": SNIC_E_BAD_LEN,
    "bad_flags": SNIC_E_BAD_FLAGS,
}

POOL_BUF_MIN, POOL_BUF_MAX, POOL_COUNT_MAX = 64, 65536, 65536
RX_QUEUE_MAX = 1024  # frames from the switch waiting for RX buffers
POLL_SPINS = 8  # empty polls (scheduler turns) before the device re-arms its doorbells and sleeps

#: Adaptive moderation profiles, by level: (frames, usecs).
MOD_PROFILES: tuple[tuple[int, int], ...] = ((1, 0), (8, 20), (32, 50), (64, 100), (96, 200))
#: Completion rates (per second) at which each level above 0 starts.
RATE_LEVELS: tuple[float, ...] = (20_000.0, 50_000.0, 100_000.0, 200_000.0)
#: Completions per push (on average over a sample) from which a sample counts as saturation: the
#: frames came in bursts, so they were paced by how fast the host runs, not by the sender.
BURST_FRAMES = 4
#: Completions a sample needs before it may raise the level (net_dim waits for a full sample):
#: one frame in no time at all is not a high rate.
SAMPLE_MIN_FRAMES = 8


def level_for_rate(rate: float) -> int:
    """The moderation level whose rate band holds ``rate`` completions per second."""
    return sum(rate >= r for r in RATE_LEVELS)


def level_for_sample(completions: int, pushes: int, seconds: float, current: int) -> int:
    """The level a sample window asks for (net_dim's sample, measured in frames first).

    A window whose completions came in bursts (``BURST_FRAMES`` or more per push) is
    saturation whatever its measured rate: that rate is the host's speed, and a slow host
    must not get a lower level (hence more interrupts) for the same traffic.  Otherwise the
    rate over the window picks the band; a window of no time (MockClock, busy) is infinite.
    """
    if pushes and completions >= BURST_FRAMES * pushes:
        return len(RATE_LEVELS)
    rate = completions / seconds if seconds > 0 else math.inf
    if completions < SAMPLE_MIN_FRAMES:
        return min(level_for_rate(rate), current)  # too small a sample to raise the level
    return level_for_rate(rate)


#: TX areas a smart NIC lends at once to receivers' RX queues (beyond: receivers copy).
MAX_LENT_AREAS = 4


class TxArea(Area):
    """One TX area of a smart NIC: the monitor's own memory (anonymous, untouched until a frame
    lands there), page i of the area at bytes ``i * 4096..``.  Its frames go to the switch as one
    batch; a receiver with no RX buffers for some of them may *borrow* the area (a pin) and keep
    them where they are instead of copying them out; the sender DMAs its next batch into another
    area while this one is lent."""

    def __init__(self, lender: TxAreas, npages: int) -> None:
        self.buffer = mmap.mmap(-1, npages * PAGE_SIZE)
        super().__init__(self.buffer, range(npages))
        self.lender = lender
        self.frames = ffi.new("struct np_frame[]", SNIC_RING_MAX_ENTRIES)
        self.fbuf = ffi.buffer(self.frames)
        self.pins = 0

    def pin(self) -> bool:
        """Borrow the area (its frames stay valid until :meth:`unpin`); False: too many are lent."""
        if not self.pins:
            if self.lender.lent >= MAX_LENT_AREAS:
                return False
            self.lender.lent += 1
        self.pins += 1
        return True

    def unpin(self) -> None:
        self.pins -= 1
        if not self.pins:
            self.lender.returned(self)


class TxAreas:
    """A smart NIC's TX areas: the one it DMAs into now, and spares while others are lent."""

    def __init__(self, npages: int) -> None:
        self.npages = npages
        self.lent = 0
        self.spare: list[TxArea] = []
        self.current = TxArea(self, npages)

    def fresh(self) -> TxArea:
        """The area for the next batch: the current one unless it is lent."""
        if self.current.pins:
            self.current = self.spare.pop() if self.spare else TxArea(self, self.npages)
        return self.current

    def returned(self, area: TxArea) -> None:
        self.lent -= 1
        if area is not self.current:
            self.spare.append(area)


class GuestFrameBatch(FrameBatch):
    """A smart NIC's TX batch whose frames still lie in the sender's guest memory (no DMA yet).

    As a :class:`FrameBatch` it is the frames' *headers*: ``area``/``frames`` are the snapshot
    ``tx_guest_batch`` took of each frame's first 14 bytes (frame k at ``HDR_STRIDE * k`` of the
    device's header area, with its real length), so the switch's decision reads bytes the
    guest can no longer change.  The frames themselves are ``gframes`` (``struct np_frame``
    entries whose position is the guest-physical address, in ``mem``, the sender's RAM), valid
    during the switch's call: the sender completes their descriptors after it returns.

    A smart NIC egress port copies each frame once, straight from ``mem`` into a posted RX
    buffer, with the snapshot over its header (``rx_area_batch`` with ``hdrs``).  Every other
    use copies it first: :meth:`materialize` into ``bytes`` (counted by the caller), or
    :meth:`settled` into one of the sender's TX areas (once per batch, counted by the sender).
    """

    __slots__ = ("_settled", "gfbuf", "hdrs", "mem", "nic")

    def __init__(self, nic: SmartNic, n: int) -> None:
        """The first ``n`` frames ``tx_guest_batch`` entered in ``nic``'s tables."""
        super().__init__(nic._heads_area, nic._heads, n)
        self.nic = nic
        self.mem = nic.dom.mem.view
        self.gfbuf = nic._gfbuf
        self.hdrs = nic._hdrs
        self._settled: FrameBatch | None = None

    def settled(self) -> FrameBatch:
        """The frames copied into the sender's TX area, once (counted as the sender's copies)."""
        if self._settled is None:
            self._settled = self.nic.settle(self)
        return self._settled

    def materialize(self, idx: Any = None, n: int | None = None) -> list[bytes]:
        """The frames (``idx[0..n)``, or all) as ``bytes`` with their checked headers: one copy each."""
        count = self.n if idx is None else (n or 0)
        ib = ffi.buffer(idx, count * 4) if idx is not None else None
        return area_bytes(self.mem, None, self.gfbuf, ib, count, self.hdrs)


class RxSegment:
    """Frames waiting in a smart NIC's RX queue, oldest first: a list of ``bytes`` (``area`` None),
    or frames where they lie in an area (``entries``: their ``struct np_frame`` entries, from
    ``off``) -- a borrowed TX area, or during :meth:`SmartNic.transmit_batch` the switch batch's."""

    __slots__ = ("area", "entries", "frames", "gfns", "left", "off", "pinned")

    def __init__(self, frames: list[bytes] | None, area: Area | None = None, entries: bytes = b"") -> None:
        self.frames = frames if frames is not None else []
        self.area = area
        self.entries = entries
        self.off = 0
        self.pinned = False  # the area is a TX area this segment borrowed (unpinned when it empties)
        self.left = len(entries) // NP_FRAME.size if area is not None else len(self.frames)  # frames waiting
        self.gfns = ffi.buffer(area.c.gfn, area.npages * 8) if area is not None else None

    def rest(self) -> memoryview:
        """The entries of the frames still waiting (an area segment)."""
        return memoryview(self.entries)[self.off * NP_FRAME.size :]

    def head(self) -> tuple[int, Any]:
        """The first frame waiting: (length, its bytes or, in an area, a view of them when it is
        at most a page long (one page of the area), else None: never read, as no granted page
        can take it)."""
        if self.area is None:
            return len(self.frames[0]), self.frames[0]
        pos, length, _pad = NP_FRAME.unpack_from(self.entries, self.off * NP_FRAME.size)
        if length > PAGE_SIZE:
            return length, None
        at = self.area.addr(pos)
        return length, memoryview(self.area.mem)[at : at + length]


class RxQueue:
    """A smart NIC's frames from the switch waiting for RX buffers: segments, oldest first."""

    def __init__(self) -> None:
        self.segs: deque[RxSegment] = deque()
        self.n = 0

    def __len__(self) -> int:
        return self.n

    def __bool__(self) -> bool:
        return self.n > 0

    def append(self, seg: RxSegment) -> None:
        if seg.left:
            self.segs.append(seg)
            self.n += seg.left

    def extend(self, frames: list[bytes]) -> None:
        """Queue ``frames`` (bytes) behind what waits."""
        last = self.segs[-1] if self.segs else None
        if last is not None and last.area is None:
            last.frames.extend(frames)
            last.left += len(frames)
            self.n += len(frames)
        else:
            self.append(RxSegment(list(frames)))

    def consumed(self, seg: RxSegment, k: int) -> None:
        """``k`` frames of the head segment ``seg`` are gone (delivered or dropped)."""
        if seg.area is None:
            del seg.frames[:k]
        else:
            seg.off += k
        seg.left -= k
        self.n -= k
        if not seg.left:
            self.segs.popleft()
            if seg.pinned and isinstance(seg.area, TxArea):
                seg.pinned = False
                seg.area.unpin()

    def clear(self) -> None:
        while self.segs:
            seg = self.segs[0]
            self.consumed(seg, seg.left)


class SmartNic(SwitchPort):
    """One smart NIC of one domain: its register window, its DMA engine and a switch port."""

    accepts_batches = True  # frames of a switch batch are DMA'd from where they lie (transmit_batch)
    accepts_guest_batches = True  # ... even from another smart NIC's guest memory (GuestFrameBatch)

    def __init__(
        self, hv: Hypervisor, dom: Domain, switch: Switch, *, devid: int = 0, mac: bytes | None = None
    ) -> None:
        if not 0 <= devid < SNIC_MAX_DEVICES:
            raise ValueError(f"dom{dom.domid}: smart NIC devid {devid} not in 0..{SNIC_MAX_DEVICES - 1}")
        super().__init__(f"snic{dom.domid}.{devid}", hv.counters)
        self.hv = hv
        self.dom = dom
        self.switch = switch
        self.devid = devid
        self.mac = mac if mac is not None else snic_mac(dom.domid, devid)
        if len(self.mac) != 6:
            raise ValueError(f"dom{dom.domid}: smart NIC MAC must be 6 bytes, not {len(self.mac)}")
        # The guest writes its frames' source MAC: lock the port to the device's own, as netback
        # locks a vif (a frame from another source is dropped, drops.spoofed_mac), so a guest
        # cannot move a bystander's or the wire peer's MAC to its port.
        self.locked_macs = frozenset({self.mac})
        self.virq = SNIC_IRQ_BASE + devid
        self.dev = hv.counters.new(f"smartnic/{self.name}", "device")
        self._warn = LogLimiter(log, self.dev).warning  # the guest can write ENABLE at will
        self.regs: dict[int, int] = dict.fromkeys(
            (REG_TX_RING_LO, REG_TX_RING_HI, REG_RX_RING_LO, REG_RX_RING_HI, REG_POOL_LO, REG_POOL_HI), 0
        )
        self.regs.update(
            {REG_POOL_BUF_SIZE: 0, REG_POOL_COUNT: 0, REG_MOD_FRAMES: 1, REG_MOD_USECS: 0, REG_RING_ORDER: 0}
        )
        self.mod_mode = MOD_ADAPTIVE
        self.level = 0
        self.enabled = False
        self.error = False
        self.errors = 0
        self._tx: BackRing | None = None
        self._rx: BackRing | None = None
        self._pool = (0, 0, 0)  # base gpa, buffer size, count
        self._rx_queue = RxQueue()  # frames from the switch waiting for RX buffers, oldest first
        self._rx_held = b""  # RX descriptors taken off the ring (copied once), not used yet
        # TX: frames are DMA'd into an area (the monitor's own memory, not dom0's), one switch
        # batch (FrameBatch) per ring drain: the switch decides in C and hands them on in place.
        self._tx_areas: TxAreas | None = None
        # A TX batch left in guest memory (GuestFrameBatch): where its frames lie, and the
        # snapshot of their headers the switch decides on (frame k's at HDR_STRIDE * k).
        self._gframes = ffi.new("struct np_frame[]", SNIC_RING_MAX_ENTRIES)
        self._gfbuf = ffi.buffer(self._gframes)
        self._hdrs = bytearray(-(-SNIC_RING_MAX_ENTRIES * HDR_STRIDE // PAGE_SIZE) * PAGE_SIZE)
        self._heads_area = Area(self._hdrs, range(len(self._hdrs) // PAGE_SIZE))
        self._heads = ffi.new("struct np_frame[]", SNIC_RING_MAX_ENTRIES)
        self._hbuf = ffi.buffer(self._heads)
        self._wake = trio.Event()
        self._irq_wanted = False
        self._wanted_since = 0.0
        self._since_wanted = 0  # completions written since the guest asked
        self._since_irq = 0  # completions written since the last interrupt (the rate sample)
        self._pushes = 0  # completion pushes since the last interrupt (the burst sample)
        self._busy = False  # the last pass found work: moderation timers wait for an idle pass
        self._last_irq = 0.0
        self.scope = trio.CancelScope()

    def __repr__(self) -> str:
        return f"<SmartNic {self.name} mac {self.mac.hex(':')}>"

    # ------------------------------------------------------------------ registers (IoDevice)
    def read(self, offset: int, size: int) -> int:
        """A guest load from the register window (one exit, counted by the bus)."""
        if size != 4 or offset & 3:
            self.dev["errors.bad_size"] += 1
            return (1 << (8 * size)) - 1
        if offset in self.regs:
            return self.regs[offset]
        value = {
            REG_ID: SNIC_ID,
            REG_VERSION: SNIC_VERSION,
            REG_CTRL: CTRL_ENABLE if self.enabled else 0,
            REG_STATUS: (ST_ENABLED if self.enabled else 0) | (ST_ERROR if self.error else 0),
            REG_IRQ: self.virq,
            REG_GRANT_DOMID: DOMID_IO,
            REG_MAC_LO: int.from_bytes(self.mac[0:4], "little"),
            REG_MAC_HI: int.from_bytes(self.mac[4:6], "little"),
            REG_DOORBELL: 0,
            REG_MOD_MODE: self.mod_mode,
            REG_ERRORS: self.errors & 0xFFFF_FFFF,
            REG_MOD_LEVEL: self.level,
        }.get(offset)
        if value is None:
            self.dev["errors.bad_register"] += 1
            return 0xFFFF_FFFF
        return value

    def write(self, offset: int, size: int, value: int) -> None:
        """A guest store to the register window (one exit, counted by the bus)."""
        if size != 4 or offset & 3:
            self.dev["errors.bad_size"] += 1
            return
        if offset == REG_DOORBELL:
            self._doorbell(value)
        elif offset == REG_CTRL:
            if value & CTRL_RESET:
                self.reset()
            if value & CTRL_ENABLE and not self.enabled:
                self._enable()
        elif offset in self.regs or offset == REG_MOD_MODE:
            if self.enabled:
                self.dev["errors.config_while_enabled"] += 1
            elif offset == REG_MOD_MODE:
                self.mod_mode = value if value in (MOD_ADAPTIVE, MOD_FIXED, MOD_OFF) else MOD_ADAPTIVE
            else:
                self.regs[offset] = value
        else:
            self.dev["errors.bad_register"] += 1

    def _gpa(self, lo: int) -> int:
        return self.regs[lo] | self.regs[lo + 4] << 32

    def _enable(self) -> None:
        """CTRL ENABLE: check every configuration register, attach the rings, join the switch."""
        mem = self.dom.mem
        tx, rx, pool = self._gpa(REG_TX_RING_LO), self._gpa(REG_RX_RING_LO), self._gpa(REG_POOL_LO)
        size, count = self.regs[REG_POOL_BUF_SIZE], self.regs[REG_POOL_COUNT]
        order = self.regs[REG_RING_ORDER]
        ring_bytes = PAGE_SIZE << min(order, SNIC_RING_ORDER_MAX)
        problem = None
        if order > SNIC_RING_ORDER_MAX:
            problem = f"ring order {order} (at most {SNIC_RING_ORDER_MAX})"
        for what, gpa in (("TX ring", tx), ("RX ring", rx)):
            if problem is None and (gpa % PAGE_SIZE or gpa + ring_bytes > mem.size):
                problem = f"{what} at {gpa:#x} is not {ring_bytes // PAGE_SIZE} page(s) of its RAM"
        if problem is None and abs(tx - rx) < ring_bytes:
            problem = f"TX and RX rings overlap (at {tx:#x} and {rx:#x}, {ring_bytes} bytes each)"
        if problem is None and pool:
            if not (POOL_BUF_MIN <= size <= POOL_BUF_MAX and 1 <= count <= POOL_COUNT_MAX):
                problem = f"buffer pool of {count} x {size} bytes"
            elif pool + size * count > mem.size:
                problem = f"buffer pool {pool:#x}+{size * count:#x} outside its RAM"
        if problem is not None:
            self.error = True
            self.dev["errors.bad_config"] += 1
            self._warn("%s: ENABLE refused: %s", self.name, problem)
            return
        self._tx = BackRing(SNIC_RING, mem.slice(tx, ring_bytes), size=ring_bytes)
        self._rx = BackRing(SNIC_RING, mem.slice(rx, ring_bytes), size=ring_bytes)
        self._pool = (pool, size, count) if pool else (0, 0, 0)
        self._tx_area_for(size if pool else PAGE_SIZE, snic_ring_entries(order))
        self.enabled = True
        self.error = False
        self.level = 0
        self._irq_wanted = False
        self._since_wanted = self._since_irq = self._pushes = 0
        self._last_irq = trio.current_time()
        if self not in self.switch.ports:
            self.switch.attach(self)
        self._wake.set()  # the task starts serving (descriptors may be posted already)
        log.info(
            "%s enabled (TX ring %#x, RX ring %#x, pool %#x %dx%d)", self.name, tx, rx, pool, count, size
        )

    def _tx_area_for(self, buf_size: int, entries: int) -> None:
        """TX areas with room for a full ring (``entries`` slots) of frames of up to
        ``buf_size`` bytes each (a page at least: a granted page)."""
        npages = entries * -(-max(buf_size, PAGE_SIZE) // PAGE_SIZE)
        if self._tx_areas is None or self._tx_areas.npages < npages:
            self._tx_areas = TxAreas(npages)  # areas lent meanwhile stay alive with their borrowers

    def reset(self) -> None:
        """CTRL RESET (and teardown): stop, let go of the rings, leave the switch."""
        if self._rx_queue:
            self.dev["drops.reset"] += len(self._rx_queue)
        self._rx_queue.clear()
        self._rx_held = b""
        self.enabled = False
        self.error = False
        self._release_rings()
        if self in self.switch.ports:
            self.switch.detach(self)
        self._wake.set()

    def _release_rings(self) -> None:
        for ring in (self._tx, self._rx):
            if ring is not None:
                ring.release()
        self._tx = self._rx = None

    def _fault(self, reason: str) -> None:
        """The guest broke a ring: stop this device (ERROR), count and log why."""
        self.dev[f"errors.{reason}"] += 1
        log.error("%s stopped: %s", self.name, reason)
        self.reset()
        self.error = True

    def _doorbell(self, value: int) -> None:
        """DOORBELL: the guest posted descriptors; send at once (on this exit), then poll."""
        if not self.enabled:
            self.dev["errors.doorbell_disabled"] += 1
            return
        self.dev["doorbells"] += 1
        if value & DB_TX:
            self._tx_work()
        if value & DB_RX:
            self._rx_work()
        self._moderate()
        self._wake.set()

    # ------------------------------------------------------------------ DMA
    def _buffer(self, buf: int, offset: int, length: int, flags: int, write: bool) -> memoryview | str:
        """The guest memory a descriptor names (a DMA window), or why it names none."""
        if flags & ~SNIC_F_GREF:
            return "bad_flags"
        if length == 0:
            return "bad_len"
        if flags & SNIC_F_GREF:
            try:
                frame = self.dom.grant_table.acquire(DOMID_IO, buf, write=write)
            except GrantError:
                return "bad_grant"
            if offset + length > PAGE_SIZE:
                return "bad_len"
            gpa = (frame << PAGE_SHIFT) + offset
        else:
            base, size, count = self._pool
            if buf >= count:
                return "bad_buf"
            if offset + length > size:
                return "bad_len"
            gpa = base + buf * size + offset
        return self.dom.mem.view[gpa : gpa + length]

    def _refuse(self, reason: str, desc_id: int) -> bytes:
        self.errors += 1
        self.dev[f"errors.{reason}"] += 1
        return CMPL.pack(desc_id, 0, _REASON_STATUS[reason], 0)

    def _count_refused(self, bad_len: int, bad_buf: int, bad_flags: int) -> None:
        """Count the descriptors a DMA batch refused (each already completed with its status)."""
        for reason, n in (("bad_len", bad_len), ("bad_buf", bad_buf), ("bad_flags", bad_flags)):
            if n:
                self.errors += n
                self.dev[f"errors.{reason}"] += n

    def _tx_work(self) -> int:
        """Send every posted TX descriptor.  Pool buffers (``tx_guest_batch``, in C, one call per
        batch) go to the switch as one :class:`GuestFrameBatch`: their frames stay in guest
        memory, the switch decides on a snapshot of their headers, and each egress port copies
        them from there (one DMA per frame and receiver).  A granted page is served here, DMA'd
        into a TX area and sent as a batch of its own, in order.  The completions are written
        once every frame has been switched: the guest gets no buffer back the device may still
        read."""
        ring = self._tx
        if ring is None or self._tx_areas is None:
            return 0
        try:
            data = ring.take_requests()
        except RingOverflowError:
            self._fault("ring_overflow")
            return 0
        if not data:
            return 0
        mem = self.dom.mem.view
        base, size, count = self._pool
        n = len(data) // DESC.size
        cmpls: list[bytes] = []
        start = nf = nbytes = 0
        granted: tuple[TxArea, int, int, int] | None = None  # a TX area batch of granted pages
        while start < n:
            done, start, stop, nf, nb, bad_len, bad_buf, bad_flags = tx_guest_batch(
                data, mem, base, size, count, start, self._gfbuf, self._hbuf, self._hdrs, nf
            )
            cmpls.append(done)
            nbytes += nb
            if bad_len or bad_buf or bad_flags:
                self._count_refused(bad_len, bad_buf, bad_flags)
            if stop != STOP_GRANTED and stop != STOP_FULL:
                break
            if nf:  # what is entered goes now (STOP_FULL cannot happen: a drain is at most a ring)
                if granted is not None:  # after the granted pages before it
                    self._send_batch(*granted)
                    granted = None
                self._send_guest_batch(nf, nbytes)
                nf = nbytes = 0
            if stop == STOP_GRANTED:  # a granted page: the grant table is Python's
                if granted is None:
                    granted = (self._tx_areas.fresh(), 0, 0, 0)
                done, area, anf, ahead, abytes = self._tx_granted(data, start, *granted)
                granted = (area, anf, ahead, abytes)
                cmpls.append(done)
                start += 1
        if granted is not None:
            self._send_batch(*granted)
        self._send_guest_batch(nf, nbytes)
        self._complete(ring, b"".join(cmpls))
        return n

    def _send_guest_batch(self, nf: int, nbytes: int) -> None:
        """Hand the ``nf`` frames ``tx_guest_batch`` entered to the switch as one
        :class:`GuestFrameBatch` (valid during the call)."""
        if not nf:
            return
        dev = self.dev
        dev["packets.tx"] += nf
        dev["bytes.tx"] += nbytes
        dev["header_bytes"] += nf * ETH_HEADER_LEN  # the header snapshots the decision reads
        self.switch.input_batch(self, GuestFrameBatch(self, nf))

    def settle(self, batch: GuestFrameBatch) -> FrameBatch:
        """Copy the frames of ``batch`` (this device's, still in guest memory) with their checked
        headers into a TX area: the batch a port that keeps frames, or reads them from an area,
        is handed (:meth:`GuestFrameBatch.settled`).  Counted as this device's DMA reads."""
        assert self._tx_areas is not None
        area = self._tx_areas.fresh()
        copied, head, nbytes = area_copy(
            batch.mem, None, batch.gfbuf, None, batch.n, batch.hdrs, area.buffer, area.fbuf, 0
        )  # the area holds a full ring of the largest frames ENABLE allows: every frame fits
        self.dev["copies"] += copied  # the DMA reads: guest memory -> the TX area
        self.dev["copy_bytes"] += nbytes
        area.c.head = head
        area.c.tail = 0
        return FrameBatch(area, area.frames, copied)

    def _send_batch(self, area: TxArea, nf: int, head: int, nbytes: int) -> None:
        """Hand the ``nf`` frames DMA'd into ``area`` to the switch (one batch; valid during the
        call, or while a receiver borrows the area)."""
        if not nf:
            return
        dev = self.dev
        dev["copies"] += nf  # the DMA reads: guest memory -> the TX area
        dev["copy_bytes"] += nbytes
        dev["packets.tx"] += nf
        dev["bytes.tx"] += nbytes
        area.c.head = head
        area.c.tail = 0
        self.switch.input_batch(self, FrameBatch(area, area.frames, nf))

    def _tx_granted(
        self, data: bytes, index: int, area: TxArea, nf: int, head: int, nbytes: int
    ) -> tuple[bytes, TxArea, int, int, int]:
        """Send descriptor ``index`` of ``data``, which names a granted page, into ``area`` as frame
        ``nf`` at ``head`` (``nbytes`` there so far): (completion, area, frames, head, bytes)."""
        buf, offset, length, desc_id, flags, _rsvd = DESC.unpack_from(data, index * DESC.size)
        window = self._buffer(buf, offset, length, flags, write=False)
        if isinstance(window, str):
            return self._refuse(window, desc_id), area, nf, head, nbytes
        pos = place(head, length)
        if nf == SNIC_RING_MAX_ENTRIES or pos + length > len(area.buffer):  # full: send what is there first
            self._send_batch(area, nf, head, nbytes)
            assert self._tx_areas is not None
            area, nf, pos, nbytes = self._tx_areas.fresh(), 0, 0, 0
        area.buffer[pos : pos + length] = window  # the DMA read: guest memory -> the TX area
        NP_FRAME.pack_into(area.fbuf, nf * NP_FRAME.size, pos, length, 0)
        return CMPL.pack(desc_id, length, SNIC_OK, 0), area, nf + 1, pos + length, nbytes + length

    def _rx_work(self) -> int:
        """Write queued frames into posted RX buffers (DMA into guest memory, in C, one call per
        batch: ``rx_batch`` for frames as ``bytes``, ``rx_area_batch`` for frames where they lie
        in an area; a granted page served here)."""
        ring = self._rx
        q = self._rx_queue
        if ring is None or not q.n:
            return 0
        mem = self.dom.mem.view
        base, size, count = self._pool
        held = self._rx_held
        cmpls: list[bytes] = []
        delivered = nbytes = too_big = 0
        while q.n:
            if not held:
                try:
                    held = ring.take_requests(q.n)
                except RingOverflowError:
                    self._fault("ring_overflow")
                    return 0
                if not held:
                    break  # starved: the frames wait for buffers
            seg = q.segs[0]
            if seg.area is None:
                result = rx_batch(held, seg.frames, mem, base, size, count)
            else:
                result = rx_area_batch(
                    held, seg.area.mem, seg.gfns, seg.rest(), None, seg.left, mem, base, size, count
                )
            done, used, taken, dl, nb, tb, bad_len, bad_buf, bad_flags = result
            cmpls.append(done)
            delivered += dl
            nbytes += nb
            too_big += tb
            if bad_len or bad_buf or bad_flags:
                self._count_refused(bad_len, bad_buf, bad_flags)
            left = seg.left - taken
            q.consumed(seg, taken)
            held = held[used * DESC.size :]
            if held and left:  # stopped at a granted page: the grant table is Python's
                buf, offset, length, desc_id, flags, _rsvd = DESC.unpack_from(held)
                window = self._buffer(buf, offset, length, flags, write=True)
                if isinstance(window, str):
                    held = held[DESC.size :]
                    cmpls.append(self._refuse(window, desc_id))
                    continue
                flen, frame = seg.head()
                if flen > length:
                    q.consumed(seg, 1)
                    too_big += 1  # the frame cannot fit the buffer it is due in: drop it, keep the buffer
                    continue
                held = held[DESC.size :]
                window[:flen] = frame  # the DMA write: wire -> guest memory
                q.consumed(seg, 1)
                cmpls.append(CMPL.pack(desc_id, flen, SNIC_OK, 0))
                delivered += 1
                nbytes += flen
        self._rx_held = held
        done_all = b"".join(cmpls)
        self._rx_done(done_all, delivered, nbytes, too_big)
        return len(done_all) // CMPL.size

    def _rx_done(self, cmpls: bytes, delivered: int, nbytes: int, too_big: int) -> None:
        """Publish an RX pass's completions and count what it delivered and dropped."""
        dev = self.dev
        if too_big:
            dev["drops.rx_too_big"] += too_big
        if self._rx is not None:
            self._complete(self._rx, cmpls)
        if delivered:
            dev["copies"] += delivered  # the DMA writes: into guest memory
            dev["copy_bytes"] += nbytes
            dev["packets.rx"] += delivered
            dev["bytes.rx"] += nbytes

    def _complete(self, ring: BackRing, cmpls: bytes) -> None:
        """Publish packed completions; note whether the guest asked to be interrupted by them."""
        if not cmpls:
            return
        _, notify = ring.send(cmpls)
        n = len(cmpls) // CMPL.size
        self._since_irq += n
        self._pushes += 1
        if notify and not self._irq_wanted:
            self._irq_wanted = True
            self._wanted_since = trio.current_time()
            self._since_wanted = 0
        if self._irq_wanted:
            self._since_wanted += n

    # ------------------------------------------------------------------ moderation
    def profile(self) -> tuple[int, int]:
        """(frames, usecs) in force now."""
        if self.mod_mode == MOD_OFF:
            return 1, 0
        if self.mod_mode == MOD_FIXED:
            return max(1, self.regs[REG_MOD_FRAMES]), self.regs[REG_MOD_USECS]
        return MOD_PROFILES[self.level]

    def _irq_deadline(self) -> float:
        if not self._irq_wanted:
            return math.inf
        return self._wanted_since + self.profile()[1] * 1e-6

    def _moderate(self, idle: bool = False) -> None:
        """Raise the interrupt the guest asked for, if the moderation thresholds allow it now.

        The frame threshold applies at once; the timer only on an ``idle`` pass (one that
        found no work): while frames keep coming, the budget is in frames, so how many
        interrupts a busy phase takes does not depend on how fast the host runs it.
        """
        if not self._irq_wanted:
            return
        frames, _usecs = self.profile()
        if self._since_wanted >= frames:
            self._raise_irq("by_frames")
        elif idle and trio.current_time() >= self._irq_deadline():
            self._raise_irq("by_timer")

    def _raise_irq(self, why: str) -> None:
        now = trio.current_time()
        dev = self.dev
        dev["irqs.raised"] += 1
        dev[f"irqs.{why}"] += 1
        if self.virq in self.dom.virqs:
            self.hv.send_virq(self.dom, self.virq)
        else:
            dev["irqs.unbound"] += 1
        if self.mod_mode == MOD_ADAPTIVE:  # net_dim: a sample per interrupt, one level per step
            target = level_for_sample(self._since_irq, self._pushes, now - self._last_irq, self.level)
            self.level += (target > self.level) - (target < self.level)
        self._last_irq = now
        self._since_irq = self._pushes = 0
        self._irq_wanted = False
        self._since_wanted = 0

    # ------------------------------------------------------------------ the monitor's task
    async def run(self) -> None:
        """Serve the device for as long as the domain lives: poll while busy, sleep when idle."""
        with self.scope:
            idle = 0
            while True:
                if self._wake.is_set():  # a fresh, unset event for this pass (as a new one would be)
                    self._wake = trio.Event()
                if not self.enabled:
                    idle = 0
                    await self._wake.wait()
                    continue
                self.dev["polls"] += 1
                work = self._tx_work() + self._rx_work()
                if self._irq_wanted:
                    self._moderate(idle=not work)
                if work:
                    idle = 0
                    await trio.lowlevel.checkpoint()
                    continue
                idle += 1
                if idle <= POLL_SPINS:
                    await trio.lowlevel.checkpoint()
                    continue
                if self._arm():
                    continue
                with trio.move_on_at(self._irq_deadline()):
                    await self._wake.wait()
                idle = 0

    def _arm(self) -> bool:
        """Going idle: ask for doorbells (TX always, RX when frames wait for buffers); True if
        the final checks found work after all."""
        tx, rx = self._tx, self._rx
        if tx is None or rx is None:
            return False
        try:
            more = tx.final_check_for_requests(1)
            if self._rx_queue:
                more += rx.final_check_for_requests(1)
        except RingOverflowError:
            self._fault("ring_overflow")
            return False
        return more > 0

    # ------------------------------------------------------------------ RX: switch -> device
    def transmit(self, frames: list[bytes]) -> None:
        """Frames from the wire: the monitor absorbs the "interrupt" and DMAs them in now."""
        if not self.enabled:
            self.dev["drops.rx_disabled"] += len(frames)
            return
        q = self._rx_queue
        room = RX_QUEUE_MAX - len(q)
        if len(frames) > room:
            self.dev["drops.rx_queue_full"] += len(frames) - room
            frames = frames[:room]
        q.extend(frames)
        self._rx_work()
        self._moderate()
        if q or self._irq_wanted:
            self._wake.set()  # the task waits for buffers, or for the moderation deadline

    def transmit_batch(self, batch: FrameBatch, idx: Any, n: int) -> None:
        """Frames ``idx[0..n)`` of a switch batch (``idx`` None: the first ``n``), valid during this
        call, DMA'd into the buffers the guest posted (``rx_area_batch``, in C).

        Frames of a :class:`GuestFrameBatch` go straight from the sender's guest memory into
        the buffers, each with its checked header (one copy), while nothing waits before them.
        The rest queue where they lie (behind what waits; a guest batch settled first into the
        sender's TX area) and are DMA'd from there; those still without a buffer when the call
        ends borrow the area when it is a smart NIC's TX area (no copy); otherwise, or when too
        many areas are lent, they are copied out as ``bytes`` (``area_bytes``, one counted copy
        each)."""
        if not self.enabled:
            self.dev["drops.rx_disabled"] += n
            return
        q = self._rx_queue
        room = RX_QUEUE_MAX - q.n
        if n > room:  # as transmit: the queue holds no more
            self.dev["drops.rx_queue_full"] += n - room
            n = room
        ib = ffi.buffer(idx, n * 4) if idx is not None else None
        taken = 0
        if isinstance(batch, GuestFrameBatch):
            if q.n:  # frames waiting go first, into buffers posted since: then maybe none waits
                self._rx_work()
            if not q.n and self.enabled:
                taken = self._rx_direct(batch, ib, n)
        if taken < n and not self.enabled:  # the guest broke its RX ring meanwhile (stopped)
            self.dev["drops.rx_disabled"] += n - taken
        elif taken < n:
            src = batch.settled()
            frames = ffi.buffer(src.frames, src.n * NP_FRAME.size)
            seg = RxSegment(None, src.area, frame_entries(frames, ib, n)[taken * NP_FRAME.size :])
            q.append(seg)
            self._rx_work()
            if seg.left:  # no buffers for these yet: keep them past this call
                area = seg.area
                if isinstance(area, TxArea) and area.pin():
                    seg.pinned = True
                else:
                    assert area is not None
                    rest = area_bytes(area.mem, seg.gfns, seg.rest(), None, seg.left)
                    seg.frames, seg.area, seg.entries, seg.gfns = rest, None, b"", None
                    self.dev["copies"] += len(rest)
                    self.dev["copy_bytes"] += sum(map(len, rest))
        self._moderate()
        if q.n or self._irq_wanted:
            self._wake.set()  # the task waits for buffers, or for the moderation deadline

    def _rx_direct(self, batch: GuestFrameBatch, ib: Any, n: int) -> int:
        """DMA frames ``ib[0..n)`` of a guest batch (``ib`` None: the first ``n``) from the
        sender's memory into the buffers posted here, with their checked headers, until the
        buffers run out or one names a granted page (left to the queue's path): frames taken."""
        ring = self._rx
        if ring is None:
            return 0
        mem = self.dom.mem.view
        base, size, count = self._pool
        held = self._rx_held
        cmpls: list[bytes] = []
        taken = delivered = nbytes = too_big = 0
        while taken < n:
            if not held:
                try:
                    held = ring.take_requests(n - taken)
                except RingOverflowError:
                    self._fault("ring_overflow")
                    return 0
                if not held:
                    break  # starved: the rest wait for buffers
            if ib is not None:  # the rest of the index, or the rest of the frames and their headers
                fr, ix, hd = batch.gfbuf, memoryview(ib)[taken * 4 :], memoryview(batch.hdrs)
            else:
                fr, ix = memoryview(batch.gfbuf)[taken * NP_FRAME.size :], None
                hd = memoryview(batch.hdrs)[taken * HDR_STRIDE :]
            done, used, took, dl, nb, tb, bad_len, bad_buf, bad_flags = rx_area_batch(
                held, batch.mem, None, fr, ix, n - taken, mem, base, size, count, hd
            )
            cmpls.append(done)
            taken += took
            delivered += dl
            nbytes += nb
            too_big += tb
            if bad_len or bad_buf or bad_flags:
                self._count_refused(bad_len, bad_buf, bad_flags)
            held = held[used * DESC.size :]
            if held:
                break  # stopped at a granted page: the queue's path serves it
        self._rx_held = held
        self._rx_done(b"".join(cmpls), delivered, nbytes, too_big)
        return taken

    # ------------------------------------------------------------------ lifecycle
    def detach(self) -> None:
        """The domain is going away: stop the task, let go of its memory, leave bus and switch."""
        self.scope.cancel()
        self.reset()
        self.hv.iobus.unregister(self.dom, self)


def add_smartnic(
    hv: Hypervisor, dom: Domain, switch: Switch, *, devid: int = 0, mac: bytes | None = None
) -> SmartNic:
    """Plug a smart NIC into ``dom``: its register window on the bus and its task in the monitor."""
    if hv.nursery is None:
        raise RuntimeError("the hypervisor is not running: use `async with Hypervisor() as hv:`")
    nic = SmartNic(hv, dom, switch, devid=devid, mac=mac)
    hv.iobus.register_mmio(dom, SNIC_MMIO_BASE + SNIC_MMIO_STRIDE * devid, SNIC_WINDOW, nic)
    dom.on_destroy.append(lambda _dom: nic.detach())
    hv.nursery.start_soon(nic.run, name=f"smartnic-{nic.name}")
    return nic
