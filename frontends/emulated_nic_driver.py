"""The PyGuest driver of the emulated NIC: every register access is a real, counted exit.

It is written like an old ISA NIC driver (ne2k, 8139too without NAPI), against the register
map of :mod:`pvio.backends.emulated_nic`, through ``guest.inl``/``guest.outl`` (or MMIO loads and
stores with ``use_mmio=True``), so each access goes through the hypervisor's I/O bus and is
counted as ``exits.pio`` (``exits.mmio``) on the guest's domain:

* connect: RESET, read the MAC and the IRQ line, bind the line's VIRQ, unmask ROK, TOK,
  RXOVW and TER in IMR, ENABLE.
* TX, per frame: write TXLEN, the frame as 32-bit writes to TXDATA, then CMD TX; the card
  has one TX buffer, so the next frame waits for the TX-complete interrupt.
* The interrupt handler (it runs in the upcall, as an IRQ handler does): read ISR,
  acknowledge exactly those bits, wake the sender on TOK/TER, and on ROK/RXOVW drain the RX
  FIFO: RXLEN, the frame as 32-bit reads of RXDATA, CMD RX_POP, until RXLEN reads 0.

The application API is netfront's: ``send``, ``send_batch``, ``recv``, ``recv_batch``,
``pending``, ``mac``.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import trio

from pvio.abi.emunic import (
    CMD_ENABLE,
    CMD_RESET,
    CMD_RX_POP,
    CMD_TX,
    EMUNIC_MMIO_BASE,
    EMUNIC_MMIO_STRIDE,
    EMUNIC_PIO_BASE,
    EMUNIC_WINDOW,
    ISR_ROK,
    ISR_RXOVW,
    ISR_TER,
    ISR_TOK,
    MAX_FRAME,
    REG_CMD,
    REG_IMR,
    REG_IRQ,
    REG_ISR,
    REG_MAC_HI,
    REG_MAC_LO,
    REG_RXDATA,
    REG_RXLEN,
    REG_STATUS,
    REG_TXDATA,
    REG_TXLEN,
    ST_ENABLED,
)
from pvio.core.counters import Counters
from pvio.frontends.nic import GuestNic

if TYPE_CHECKING:
    from pvio.guest import PyGuest

log = logging.getLogger("pvio.emulated_nic_driver")

RX_QUEUE_MAX = 4096  # frames received but not yet read by the application


class EmulatedNicError(Exception):
    """The card is absent or refused to start."""


class EmulatedNicDriver(GuestNic):
    """One emulated NIC of a PyGuest: ``await nic.connect()``, then ``send``/``recv``."""

    def __init__(self, guest: PyGuest, devid: int = 0, *, use_mmio: bool = False) -> None:
        self.guest = guest
        self.devid = devid
        self.use_mmio = use_mmio
        self.base = (
            EMUNIC_MMIO_BASE + EMUNIC_MMIO_STRIDE * devid
            if use_mmio
            else EMUNIC_PIO_BASE + EMUNIC_WINDOW * devid
        )
        self.name = f"emu{guest.domain.domid}.{devid}"
        self.counters: Counters = guest.hv.counters.new(f"emunic_driver/{self.name}", "device")
        self.mac = b"\x00" * 6
        self.connected = False
        self.port = 0
        self._tx_busy = False
        self._tx_done = trio.Event()
        super().__init__()

    # ------------------------------------------------------------------ register access
    def _rd(self, reg: int) -> int:
        if self.use_mmio:
            return self.guest.mmio_read(self.base + reg, 4)
        return self.guest.inl(self.base + reg)

    def _wr(self, reg: int, value: int) -> None:
        if self.use_mmio:
            self.guest.mmio_write(self.base + reg, 4, value)
        else:
            self.guest.outl(self.base + reg, value)

    # ------------------------------------------------------------------ probe and start
    async def connect(self) -> None:
        """Reset the card, learn its MAC and IRQ, bind the IRQ and enable it."""
        self._wr(REG_CMD, CMD_RESET)
        if self._rd(REG_STATUS) == 0xFFFF_FFFF:
            raise EmulatedNicError(f"{self.name}: no card at {self.base:#x}")
        lo, hi = self._rd(REG_MAC_LO), self._rd(REG_MAC_HI)
        self.mac = lo.to_bytes(4, "little") + (hi & 0xFFFF).to_bytes(2, "little")
        virq = self._rd(REG_IRQ)
        self.port = self.guest.evtchn_bind_virq(virq)
        self.guest.bind_handler(self.port, self._on_irq)
        self._wr(REG_IMR, ISR_ROK | ISR_TOK | ISR_RXOVW | ISR_TER)
        self._wr(REG_CMD, CMD_ENABLE)
        if not self._rd(REG_STATUS) & ST_ENABLED:
            raise EmulatedNicError(f"{self.name}: the card did not enable")
        self.connected = True
        await trio.lowlevel.checkpoint()

    # ------------------------------------------------------------------ interrupt handler
    def _on_irq(self, _port: int) -> None:
        """The IRQ handler (in the upcall): read and acknowledge ISR, then serve it."""
        isr = self._rd(REG_ISR)
        if isr == 0:
            self.counters["irqs.spurious"] += 1
            return
        self._wr(REG_ISR, isr)  # acknowledge before serving, so a new event re-raises the line
        if isr & (ISR_TOK | ISR_TER):
            if isr & ISR_TER:
                self.counters["tx_errors"] += 1
            self._tx_busy = False
            self._tx_done.set()
        if isr & ISR_RXOVW:
            self.counters["rx_overruns"] += 1
        if isr & (ISR_ROK | ISR_RXOVW):
            self._drain_rx()

    def _drain_rx(self) -> None:
        frames = self._rx_frames
        n = 0
        while length := self._rd(REG_RXLEN):
            if length > MAX_FRAME:  # a card that says so is broken: drop its frame, go on
                self.counters["drops.rx_bad_length"] += 1
                self._wr(REG_CMD, CMD_RX_POP)
                continue
            words = [self._rd(REG_RXDATA) for _ in range((length + 3) // 4)]
            frame = b"".join(w.to_bytes(4, "little") for w in words)[:length]
            self._wr(REG_CMD, CMD_RX_POP)
            if len(frames) >= RX_QUEUE_MAX:
                self.counters["drops.rx_app_queue_full"] += 1
                continue
            frames.append(frame)
            n += 1
        if n:
            self.counters["packets.rx"] += n
            self._rx_ready.set()

    # ------------------------------------------------------------------ application API
    async def send_batch(self, frames: list[Any]) -> None:
        """Transmit frames one by one, each after the previous one's TX-complete interrupt."""
        for f in frames:
            frame = f if isinstance(f, bytes | bytearray) else bytes(f)
            size = len(frame)
            if not 14 <= size <= MAX_FRAME:
                raise ValueError(f"{self.name}: cannot send a frame of {size} bytes (14..{MAX_FRAME})")
            while self._tx_busy:
                if not self.connected:
                    raise EmulatedNicError(f"{self.name}: not connected")
                await self._tx_done.wait()
            padded = bytes(frame) + bytes(-size % 4)
            self._tx_busy = True
            self._tx_done = trio.Event()
            self._wr(REG_TXLEN, size)
            for i in range(0, size, 4):
                self._wr(REG_TXDATA, int.from_bytes(padded[i : i + 4], "little"))
            self._wr(REG_CMD, CMD_TX)
            self.counters["packets.tx"] += 1
