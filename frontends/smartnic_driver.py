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
* RX, NAPI style: the service task reaps RX completions and re-posts the buffers while
  there is work; after ``POLL_SPINS`` empty polls it re-arms the interrupt (the RX ring's
  ``rsp_event``, with the final check that closes the race) and sleeps.  The interrupt
  handler only wakes it.
* Busy polling for an answer: a send made while the service task sleeps (the first frame
  after a pause: a request, most likely, whose answer comes next) disarms the RX interrupt
  (``rsp_event`` half the index space ahead, which no push crosses) and wakes the service
  task for ``BUSY_POLL`` more polls, so the answer is found by polling instead of costing
  an interrupt; when the polls run out it re-arms as usual.  Linux's busy polling
  (``SO_BUSY_POLL`` with ``prefer_busy_poll``), with the budget in polls, not µs, so it
  is the same on any host.

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
    REG_RX_RING_LO,
    REG_STATUS,
    REG_TX_RING_LO,
    SNIC_ID,
    SNIC_MMIO_BASE,
    SNIC_MMIO_STRIDE,
    SNIC_OK,
    SNIC_RING,
    SNIC_RING_ENTRIES,
    ST_ENABLED,
)
from pvio.core.counters import Counters
from pvio.frontends.nic import GuestNic
from pvio.ringbuf import FrontRing, RingOverflowError

if TYPE_CHECKING:
    from pvio.guest import PyGuest

log = logging.getLogger("pvio.smartnic_driver")

RX_QUEUE_MAX = 4096  # frames received but not yet read by the application
POLL_SPINS = 4  # empty polls (scheduler turns) before the driver re-arms the interrupt
BUSY_POLL = 32  # polls (scheduler turns) spent waiting for an answer after a send from idle
RX_DISARMED = 1 << 31  # an rsp_event this far ahead of rsp_cons is never crossed: no interrupt


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
        nr_tx: int = SNIC_RING_ENTRIES,
        nr_rx: int = SNIC_RING_ENTRIES,
        moderation: tuple[int, int, int] | None = None,
    ) -> None:
        if not (1 <= nr_tx <= SNIC_RING_ENTRIES and 1 <= nr_rx <= SNIC_RING_ENTRIES):
            raise ValueError(f"nr_tx and nr_rx must be in 1..{SNIC_RING_ENTRIES}")
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
        self.tx_gfn, self.rx_gfn = g.alloc_page(), g.alloc_page()
        self.tx = FrontRing(SNIC_RING, g.page(self.tx_gfn))
        self.rx = FrontRing(SNIC_RING, g.page(self.rx_gfn))
        g.domain.on_destroy.append(lambda _dom: self._release_rings())
        nbufs = self.nr_tx + self.nr_rx
        self.pool_gfn = self._alloc_contiguous(-(-nbufs * self.buf_size // PAGE_SIZE))
        self.pool_gpa = self.pool_gfn << PAGE_SHIFT
        mem = g.mem
        size = self.buf_size
        self.views = [mem[self.pool_gpa + i * size : self.pool_gpa + (i + 1) * size] for i in range(nbufs)]
        self.tx_free = list(range(self.nr_tx - 1, -1, -1))
        self.tx_outstanding = [False] * self.nr_tx
        self.rx_posted = [False] * nbufs
        self._wr64(REG_TX_RING_LO, self.tx_gfn << PAGE_SHIFT)
        self._wr64(REG_RX_RING_LO, self.rx_gfn << PAGE_SHIFT)
        self._wr64(REG_POOL_LO, self.pool_gpa)
        self._wr(REG_POOL_BUF_SIZE, size)
        self._wr(REG_POOL_COUNT, nbufs)
        if self.moderation is not None:
            mode, frames, usecs = self.moderation
            self._wr(REG_MOD_MODE, mode)
            self._wr(REG_MOD_FRAMES, frames)
            self._wr(REG_MOD_USECS, usecs)
        # Every RX buffer is posted before ENABLE: the device finds them when it attaches.
        self.rx.send(b"".join(self._rx_desc(i) for i in range(self.nr_tx, nbufs)))
        for i in range(self.nr_tx, nbufs):
            self.rx_posted[i] = True
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
        return DESC.pack(i, 0, self.buf_size, i, 0, 0)

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
            self._wake = trio.Event()
            try:
                work = self._reap_tx() + self._receive()
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
        n = 0
        for cid, _length, status, _flags in CMPL.iter_unpack(data):
            if cid >= self.nr_tx or not self.tx_outstanding[cid]:
                self.counters["errors.bad_completion"] += 1
                continue
            self.tx_outstanding[cid] = False
            self.tx_free.append(cid)
            n += 1
            if status != SNIC_OK:
                self.counters[f"tx_errors.{status}"] += 1
        if n:
            self._tx_space.set()
        return n

    def _receive(self) -> int:
        data = self.rx.take_responses()
        if not data:
            return 0
        frames = self._rx_frames
        views = self.views
        repost: list[int] = []
        n = 0
        for cid, length, status, _flags in CMPL.iter_unpack(data):
            if not self.nr_tx <= cid < len(views) or not self.rx_posted[cid]:
                self.counters["errors.bad_completion"] += 1
                continue
            self.rx_posted[cid] = False
            repost.append(cid)
            if status != SNIC_OK or length > self.buf_size:
                self.counters[f"rx_errors.{status}"] += 1
                continue
            if len(frames) >= RX_QUEUE_MAX:
                self.counters["drops.rx_app_queue_full"] += 1
                continue
            frames.append(views[cid][:length].tobytes())  # copy out once, then re-post the buffer
            n += 1
        if repost:
            for cid in repost:
                self.rx_posted[cid] = True
            _, notify = self.rx.send(b"".join(map(self._rx_desc, repost)))
            if notify:
                self._doorbell(DB_RX)
        if n:
            self.counters["packets.rx"] += n
            self._rx_ready.set()
        return len(repost)

    # ------------------------------------------------------------------ application API
    async def send_batch(self, frames: list[Any]) -> None:
        """Transmit frames: as many per push as there are free TX buffers."""
        pending = [f if isinstance(f, bytes | bytearray) else bytes(f) for f in frames]
        for f in pending:
            if not 14 <= len(f) <= self.buf_size:
                raise ValueError(f"{self.name}: cannot send a frame of {len(f)} bytes (14..{self.buf_size})")
        i = 0
        spins = 0
        while i < len(pending):
            if self.error is not None or not self.connected:
                raise SmartNicError(f"{self.name}: not connected ({self.error or 'not enabled'})")
            if not self.tx_free:
                self._reap_tx()
            if self.tx_free:
                spins = 0
                descs = []
                free = self.tx_free
                views = self.views
                while i < len(pending) and free:
                    frame = pending[i]
                    idx = free.pop()
                    self.tx_outstanding[idx] = True
                    views[idx][: len(frame)] = frame
                    descs.append(DESC.pack(idx, 0, len(frame), idx, 0, 0))
                    i += 1
                _, notify = self.tx.send(b"".join(descs))
                self.counters["packets.tx"] += len(descs)
                if notify:
                    self._doorbell(DB_TX)
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
