"""The PyGuest driver of the smart NIC: post descriptors, reap completions, poll while busy.

Against the register map and descriptor format of :mod:`pvio.backends.smartnic`:

* connect: check ID, read the MAC, the IRQ line and DOMID_IO; allocate the TX and RX ring
  pages (initialised as front rings) and a buffer pool of ``nr_tx + nr_rx`` buffers in
  contiguous pages of its own memory (pool index i < nr_tx: TX buffer i; the rest: RX
  buffers); post every RX buffer; program the registers; bind the IRQ's VIRQ; ENABLE.
  That is a dozen MMIO exits, once.
* TX: copy the frame into a free TX pool buffer, write a descriptor, push.  The push asks
  for a doorbell (one MMIO write, one exit) only when the device armed its ``req_event``,
  i.e. only when the device went idle; while it polls, sends cost no exit.  Completed TX
  buffers are reaped from shared memory by the sender itself; a sender that finds none
  free polls a few scheduler turns, then arms the TX completion event (half the
  outstanding) and sleeps until the interrupt.
* RX, NAPI style: the service task reaps RX completions (and TX completions, unless a
  send is under way: the sender reaps its own) and re-posts the buffers while there is
  work; after ``POLL_SPINS`` empty polls it re-arms the interrupt (the RX ring's
  ``rsp_event``, with the final check that closes the race) and sleeps.  The interrupt
  handler only wakes it.
* Busy polling for an answer: a send from idle (the service task sleeps and no TX buffer
  is in flight: the first frame after a pause, a request most likely, whose answer comes
  next) disarms the RX interrupt (``rsp_event`` half the index space ahead, which no push
  crosses) and wakes the service task for ``BUSY_POLL`` more polls, so the answer is found
  by polling instead of costing an interrupt; when the polls run out it re-arms as usual.
  Linux's busy polling (``SO_BUSY_POLL`` with ``prefer_busy_poll``), with the budget in
  polls, not µs, so it is the same on any host.

Hostile device?  The device is the monitor here, but the driver still range-checks every
completion (id, length, status) and counts what it refuses.

The application API is netfront's: ``send``, ``send_batch``, ``recv``, ``recv_batch``,
``pending``, ``mac``.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import trio

from pvio.abi import PAGE_SHIFT, PAGE_SIZE
from pvio.abi.smartnic import (
    CMPL,
    CTRL_ENABLE,
    DB_RX,
    DB_TX,
    DESC,
    REG_CTRL,
    REG_DOORBELL,
    REG_GRANT_DOMID,
    REG_ID,
    REG_IRQ,
    REG_MAC_HI,
    REG_MAC_LO,
    REG_MOD_FRAMES,
    REG_MOD_MODE,
    REG_MOD_USECS,
    REG_POOL_BUF_SIZE,
    REG_POOL_COUNT,
    REG_POOL_LO,
    REG_RING_ORDER,
    REG_RX_RING_LO,
    REG_STATUS,
    REG_TX_RING_LO,
    SNIC_ID,
    SNIC_MMIO_BASE,
    SNIC_MMIO_STRIDE,
    SNIC_OK,
    SNIC_RING,
    SNIC_RING_ENTRIES,
    SNIC_RING_MAX_ENTRIES,
    SNIC_RING_ORDER_MAX,
    ST_ENABLED,
    snic_ring_entries,
)
from pvio.core.counters import Counters
from pvio.frontends import _snic_driver
from pvio.frontends.nic import GuestNic
from pvio.ringbuf import FrontRing, RingOverflowError

if TYPE_CHECKING:
    from pvio.guest import PyGuest

log = logging.getLogger("pvio.smartnic_driver")

ETH_HEADER_LEN = 14  # the shortest frame the device sends
RX_QUEUE_MAX = 4096  # frames received but not yet read by the application
#: TX buffers: 256, as a netif ring (on two-page rings).
DEFAULT_BUFFERS = 2 * SNIC_RING_ENTRIES
#: RX buffers: twice the TX burst (512, four-page rings), so a receiver still holding one full
#: burst has buffers for the next: its frames then go from the sender's memory straight into
#: them (one copy) instead of waiting in the sender's TX area (two).
DEFAULT_RX_BUFFERS = 2 * DEFAULT_BUFFERS
POLL_SPINS = 4  # empty polls (scheduler turns) before the driver re-arms the interrupt
BUSY_POLL = 32  # polls (scheduler turns) spent waiting for an answer after a send from idle
RX_DISARMED = 1 << 31  # an rsp_event this far ahead of rsp_cons is never crossed: no interrupt


def stage_tx_py(
    frames: list[Any],
    start: int,
    mem: Any,
    pool_gpa: int,
    buf_size: int,
    free: list[int],
    outstanding: bytearray,
) -> tuple[bytes, int, int]:
    """Copy ``frames[start:]`` into free TX buffers (popped from ``free``'s end) while any are
    free and write their descriptors: (packed descriptors, index of the first frame not staged,
    bytes copied).  The reference of ``_snic_driver.stage_tx``; frames were checked to fit by
    the caller."""
    n = min(len(frames) - start, len(free))
    descs: list[bytes] = []
    nbytes = 0
    for k in range(n):
        frame, idx = frames[start + k], free[-1 - k]
        at = pool_gpa + idx * buf_size
        if not 0 <= idx < len(outstanding) or len(frame) > min(buf_size, 0xFFFF) or at + buf_size > len(mem):
            for j in range(k):  # leave the state as it was: nothing staged is published
                outstanding[free[-1 - j]] = 0
            raise ValueError(f"stage_tx: frame {start + k} ({len(frame)} bytes) does not fit TX buffer {idx}")
        mem[at : at + len(frame)] = frame  # the driver's copy into its buffer
        descs.append(DESC.pack(idx, 0, len(frame), idx, 0, 0))
        outstanding[idx] = 1
        nbytes += len(frame)
    del free[len(free) - n :]
    return b"".join(descs), start + n, nbytes


def check_frames_py(frames: list[Any], min_len: int, max_len: int) -> int:
    """The index of the first frame that is not ``bytes`` or a ``bytearray`` of ``min_len..max_len``
    bytes, or -1: the reference of ``_snic_driver.check_frames``."""
    for i, frame in enumerate(frames):
        if type(frame) not in (bytes, bytearray) or not min_len <= len(frame) <= max_len:
            return i
    return -1


def reap_tx_py(cmpls: bytes, outstanding: bytearray, free: list[int]) -> tuple[int, int, list[int]]:
    """Take back the TX buffers that completions name: (reaped, refused, error statuses).
    The reference of ``_snic_driver.reap_tx``."""
    reaped = bad = 0
    errors = []
    for cid, _length, status, _flags in CMPL.iter_unpack(cmpls):
        if cid >= len(outstanding) or not outstanding[cid]:
            bad += 1
            continue
        outstanding[cid] = 0
        free.append(cid)
        reaped += 1
        if status != SNIC_OK:
            errors.append(status)
    return reaped, bad, errors


def reap_rx_py(
    cmpls: bytes, mem: Any, pool_gpa: int, buf_size: int, nr_tx: int, posted: bytearray, room: int
) -> tuple[list[bytes], bytes, int, list[int], int, int]:
    """Copy each received frame out of its buffer once and write the descriptors that re-post the
    buffers: (frames, re-post descriptors, refused, error statuses, dropped for want of ``room``,
    bytes copied out).
    An id repeated within the batch is refused the second time (buffers are re-posted after it).
    The reference of ``_snic_driver.reap_rx``."""
    frames: list[bytes] = []
    repost: list[int] = []
    errors: list[int] = []
    bad = full = 0
    for cid, length, status, _flags in CMPL.iter_unpack(cmpls):
        if not nr_tx <= cid < len(posted) or not posted[cid]:
            bad += 1
            continue
        posted[cid] = 0
        repost.append(cid)
        at = pool_gpa + cid * buf_size
        if status != SNIC_OK or length > buf_size or at + length > len(mem):
            errors.append(status)
            continue
        if room <= 0:
            full += 1
            continue
        frames.append(bytes(mem[at : at + length]))  # copy out once, then re-post the buffer
        room -= 1
    for cid in repost:
        posted[cid] = 1
    room_desc = min(buf_size, 0xFFFF)
    descs = b"".join(DESC.pack(i, 0, room_desc, i, 0, 0) for i in repost)
    return frames, descs, bad, errors, full, sum(map(len, frames))


class SmartNicError(Exception):
    """The card is absent, refused its configuration, or stopped."""


class SmartNicDriver(GuestNic):
    """One smart NIC of a PyGuest: ``await nic.connect()``, then ``send``/``recv``.

    ``moderation`` = (mode, frames, usecs) programs MOD_MODE/MOD_FRAMES/MOD_USECS before
    ENABLE (default: the device's adaptive mode).
    """

    error_type = SmartNicError
    log = log
    failure_verb = "stopped"

    def __init__(
        self,
        guest: PyGuest,
        devid: int = 0,
        *,
        buf_size: int = 2048,
        nr_tx: int = DEFAULT_BUFFERS,
        nr_rx: int = DEFAULT_RX_BUFFERS,
        moderation: tuple[int, int, int] | None = None,
    ) -> None:
        if not (1 <= nr_tx <= SNIC_RING_MAX_ENTRIES and 1 <= nr_rx <= SNIC_RING_MAX_ENTRIES):
            raise ValueError(f"nr_tx and nr_rx must be in 1..{SNIC_RING_MAX_ENTRIES}")
        #: Pages per ring, as a power of two: the smallest ring with a slot for every buffer.
        self.ring_order = next(
            o for o in range(SNIC_RING_ORDER_MAX + 1) if snic_ring_entries(o) >= max(nr_tx, nr_rx)
        )
        self.guest = guest
        self.devid = devid
        self.base = SNIC_MMIO_BASE + SNIC_MMIO_STRIDE * devid
        self.buf_size = buf_size
        self.nr_tx = nr_tx
        self.nr_rx = nr_rx
        self.moderation = moderation
        self.name = f"snic{guest.domain.domid}.{devid}"
        self.counters: Counters = guest.hv.counters.new(f"smartnic_driver/{self.name}", "device")
        self.mac = b"\x00" * 6
        super().__init__()
        self._wake = trio.Event()
        self._sending = False  # a send_batch is running: it reaps the TX completions
        self._sleeping = False  # the service task sleeps with the RX interrupt armed
        self._busy_polls = 0  # polls left of a busy-poll window

    # ------------------------------------------------------------------ registers
    def _rd(self, reg: int) -> int:
        return self.guest.mmio_read(self.base + reg, 4)

    def _wr(self, reg: int, value: int) -> None:
        self.guest.mmio_write(self.base + reg, 4, value)

    def _wr64(self, lo: int, value: int) -> None:
        self._wr(lo, value & 0xFFFF_FFFF)
        self._wr(lo + 4, value >> 32)

    # ------------------------------------------------------------------ probe and start
    async def connect(self) -> None:
        """Probe the card, set up rings and pool, post RX buffers, enable; start the service task."""
        g = self.guest
        if self._rd(REG_ID) != SNIC_ID:
            raise SmartNicError(f"{self.name}: no smart NIC at {self.base:#x}")
        lo, hi = self._rd(REG_MAC_LO), self._rd(REG_MAC_HI)
        self.mac = lo.to_bytes(4, "little") + (hi & 0xFFFF).to_bytes(2, "little")
        self.grant_domid = self._rd(REG_GRANT_DOMID)
        ring_bytes = PAGE_SIZE << self.ring_order
        self.tx_gfn = self._alloc_contiguous(1 << self.ring_order)
        self.rx_gfn = self._alloc_contiguous(1 << self.ring_order)
        mem = g.domain.mem
        self.tx = FrontRing(SNIC_RING, mem.slice(self.tx_gfn << PAGE_SHIFT, ring_bytes), size=ring_bytes)
        self.rx = FrontRing(SNIC_RING, mem.slice(self.rx_gfn << PAGE_SHIFT, ring_bytes), size=ring_bytes)
        g.domain.on_destroy.append(lambda _dom: self._release_rings())
        nbufs = self.nr_tx + self.nr_rx
        self.pool_gfn = self._alloc_contiguous(-(-nbufs * self.buf_size // PAGE_SIZE))
        self.pool_gpa = self.pool_gfn << PAGE_SHIFT
        size = self.buf_size
        self.tx_free = list(range(self.nr_tx - 1, -1, -1))
        self.tx_outstanding = bytearray(self.nr_tx)  # 1: the device holds this TX buffer
        self.rx_posted = bytearray(nbufs)  # 1: this RX buffer is posted (may be answered once)
        self._wr64(REG_TX_RING_LO, self.tx_gfn << PAGE_SHIFT)
        self._wr64(REG_RX_RING_LO, self.rx_gfn << PAGE_SHIFT)
        self._wr64(REG_POOL_LO, self.pool_gpa)
        self._wr(REG_POOL_BUF_SIZE, size)
        self._wr(REG_POOL_COUNT, nbufs)
        self._wr(REG_RING_ORDER, self.ring_order)
        if self.moderation is not None:
            mode, frames, usecs = self.moderation
            self._wr(REG_MOD_MODE, mode)
            self._wr(REG_MOD_FRAMES, frames)
            self._wr(REG_MOD_USECS, usecs)
        # Every RX buffer is posted before ENABLE: the device finds them when it attaches.
        self.rx.send(b"".join(self._rx_desc(i) for i in range(self.nr_tx, nbufs)))
        for i in range(self.nr_tx, nbufs):
            self.rx_posted[i] = 1
        self.port = g.evtchn_bind_virq(self._rd(REG_IRQ))
        g.bind_handler(self.port, self._on_irq)
        self._wr(REG_CTRL, CTRL_ENABLE)
        if not self._rd(REG_STATUS) & ST_ENABLED:
            raise SmartNicError(f"{self.name}: the card refused its configuration")
        self.connected = True
        g.spawn(self._service, name=f"{self.name}-napi")
        await trio.lowlevel.checkpoint()

    def _alloc_contiguous(self, npages: int) -> int:
        """``npages`` frames in a row (the pool is one DMA region); returns the first gfn."""
        gfns = [self.guest.alloc_page() for _ in range(npages)]
        if gfns != list(range(gfns[0], gfns[0] + npages)):
            for gfn in gfns:
                self.guest.free_page(gfn)
            raise SmartNicError(f"{self.name}: no {npages} contiguous free pages for the buffer pool")
        return gfns[0]

    def _rx_desc(self, i: int) -> bytes:
        return DESC.pack(i, 0, min(self.buf_size, 0xFFFF), i, 0, 0)

    def _release_rings(self) -> None:
        self.tx.release()
        self.rx.release()

    # ------------------------------------------------------------------ interrupt and NAPI poll
    def _on_irq(self, _port: int) -> None:
        """The IRQ handler (in the upcall): wake the poller and any waiting sender; no register access."""
        self._wake.set()
        self._tx_space.set()

    def _doorbell(self, bits: int) -> None:
        self.counters["doorbells"] += 1
        self._wr(REG_DOORBELL, bits)

    async def _service(self) -> None:
        idle = 0
        while self.error is None:
            if self._wake.is_set():  # a fresh, unset event for this pass (as a new one would be)
                self._wake = trio.Event()
            try:
                # TX completions are the sender's to reap while it is sending (it reaps them
                # itself when it runs out of buffers): polling for them too would keep this
                # task spinning for a device that receives nothing.
                work = (0 if self._sending else self._reap_tx()) + self._receive()
            except RingOverflowError as e:
                self._fail(f"impossible completion index ({e})")
                break
            if work:
                idle = 0
                await trio.lowlevel.checkpoint()
                continue
            idle += 1
            if idle <= POLL_SPINS or self._busy_polls > 0:
                if idle > POLL_SPINS:
                    self._busy_polls -= 1
                await trio.lowlevel.checkpoint()
                continue
            try:
                if self.rx.final_check_for_responses(1):  # re-arm the interrupt (closes the race)
                    continue
            except RingOverflowError as e:
                self._fail(f"impossible completion index ({e})")
                break
            self.counters["rearms"] += 1
            self._sleeping = True
            await self._wake.wait()
            self._sleeping = False
            idle = 0

    def _busy_poll(self) -> None:
        """A send from idle: disarm the RX interrupt and poll ``BUSY_POLL`` times for the answer."""
        if not self._sleeping:
            return
        self._sleeping = False
        self.rx.final_check_for_responses(RX_DISARMED)  # a completion already waiting: polled now
        self.counters["busy_polls"] += 1
        self._busy_polls = BUSY_POLL
        self._wake.set()

    def _reap_tx(self) -> int:
        data = self.tx.take_responses()
        if not data:
            return 0
        n, bad, errors = _snic_driver.reap_tx(data, self.tx_outstanding, self.tx_free)
        if bad:
            self.counters["errors.bad_completion"] += bad
        for status in errors:
            self.counters[f"tx_errors.{status}"] += 1
        if n:
            self._tx_space.set()
        return n

    def _receive(self) -> int:
        data = self.rx.take_responses()
        if not data:
            return 0
        queue = self._rx_frames
        frames, repost, bad, errors, full, nbytes = _snic_driver.reap_rx(
            data,
            self.guest.mem,
            self.pool_gpa,
            self.buf_size,
            self.nr_tx,
            self.rx_posted,
            RX_QUEUE_MAX - len(queue),
        )
        if bad:
            self.counters["errors.bad_completion"] += bad
        for status in errors:
            self.counters[f"rx_errors.{status}"] += 1
        if full:
            self.counters["drops.rx_app_queue_full"] += full
        if repost:
            _, notify = self.rx.send(repost)
            if notify:
                self._doorbell(DB_RX)
        if frames:
            queue.extend(frames)
            c = self.counters
            c["packets.rx"] += len(frames)
            c["guest_copies"] += len(frames)  # each frame copied out of its RX buffer once
            c["guest_copy_bytes"] += nbytes
            self._rx_ready.set()
        return len(repost) // DESC.size

    # ------------------------------------------------------------------ application API
    async def send_batch(self, frames: list[Any]) -> None:
        """Transmit frames: as many per push as there are free TX buffers."""
        pending = list(frames)
        size = self.buf_size
        if _snic_driver.check_frames(pending, ETH_HEADER_LEN, size) >= 0:  # one C pass; the rare rest here
            pending = [f if isinstance(f, bytes | bytearray) else bytes(f) for f in pending]
            bad = next((n for n in map(len, pending) if not ETH_HEADER_LEN <= n <= size), None)
            if bad is not None:
                sizes = f"{ETH_HEADER_LEN}..{size}"
                raise ValueError(f"{self.name}: cannot send a frame of {bad} bytes ({sizes})")
        self._sending = True
        try:
            await self._send_pending(pending, size)
        finally:
            self._sending = False

    async def _send_pending(self, pending: list[Any], size: int) -> None:
        # A send from idle (the poller sleeps and nothing is in flight) is most likely a
        # request whose answer comes next: busy-poll for it.  A sender with frames in flight
        # is streaming: its poller may sleep.
        from_idle = False
        if self._sleeping:
            self._reap_tx()
            from_idle = len(self.tx_free) == self.nr_tx
        i = 0
        spins = 0
        while i < len(pending):
            if self.error is not None or not self.connected:
                raise SmartNicError(f"{self.name}: not connected ({self.error or 'not enabled'})")
            if not self.tx_free:
                self._reap_tx()
            if self.tx_free:
                spins = 0
                descs, upto, nbytes = _snic_driver.stage_tx(
                    pending, i, self.guest.mem, self.pool_gpa, size, self.tx_free, self.tx_outstanding
                )
                c = self.counters
                c["packets.tx"] += upto - i
                c["guest_copies"] += upto - i  # the driver's copy of each frame into its TX buffer
                c["guest_copy_bytes"] += nbytes
                i = upto
                _, notify = self.tx.send(descs)
                if notify:
                    self._doorbell(DB_TX)
                if from_idle:
                    from_idle = False
                    self._busy_poll()
                continue
            # Every TX buffer is in flight: poll a little, then ask for an interrupt and sleep.
            spins += 1
            if spins <= POLL_SPINS:
                await trio.lowlevel.checkpoint()
                continue
            outstanding = self.nr_tx - len(self.tx_free)
            if self.tx.final_check_for_responses(max(1, outstanding // 2)):
                continue
            self.counters["tx_waits"] += 1
            self._tx_space = trio.Event()
            await self._tx_space.wait()
            spins = 0
