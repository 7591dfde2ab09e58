"""The emulated NIC: a register-level network card in the monitor (full virtualization).

Design rationale
----------------
This is the baseline of the device-model comparison (docs/devices.md): a card in the
spirit of an NE2000 or an RTL8139, driven by an unmodified-style driver through its
registers, every access of which traps to the monitor.  Nothing is batched and nothing is
shared: a frame goes out as a length, then the frame's bytes through a 32-bit data port,
then a command; it comes in the same way; every transmit completion and every arrival is
an interrupt, read and acknowledged through the interrupt status register.  What that
costs — several exits and an interrupt per packet — is what the PV vif and the smart NIC
are measured against.

The device is emulated synchronously on the exit, as QEMU does on its vCPU thread: a
"transmit" command hands the frame to the switch before the ``out`` instruction returns.
It has a single TX buffer (NE2000 style), so its driver sends one frame, then waits for
the TX-complete interrupt before it may reuse the buffer, and a small RX FIFO.

Register map
------------
One window of ``EMUNIC_WINDOW`` (0x40) bytes, reachable both as ports (``EMUNIC_PIO_BASE
+ 0x40 * devid``) and as MMIO (``EMUNIC_MMIO_BASE + 0x1000 * devid``), same offsets.
Registers are 32-bit, little-endian; a narrower read of a register returns its low bytes
(or the bytes at the offset); a write must be at the register's offset (zero-extended).

======  ========  ===  ================================================================
offset  name      acc  meaning
======  ========  ===  ================================================================
0x00    CMD       W    commands, one bit each, applied in this order: RESET (0x01) clears
                       everything and disables; ENABLE (0x02) starts RX and TX (link up);
                       TX (0x04) transmits TXLEN bytes of the TX buffer; RX_POP (0x08)
                       drops the head frame of the RX FIFO (read it first); DISABLE (0x10)
0x04    STATUS    R    ENABLED (0x1), RX_READY (0x2: RX FIFO not empty), TX_READY (0x4)
0x08    ISR       R/W1C interrupt status: ROK (0x01) frame received, TOK (0x02) frame
                       transmitted, RXOVW (0x04) frame dropped (RX FIFO full), TER (0x08)
                       transmit error; writing 1s acknowledges (clears) those bits
0x0C    IMR       RW   interrupt mask: the IRQ is asserted while ISR & IMR != 0
0x10    TXLEN     RW   length of the frame to transmit (14..1518); a write rewinds the
                       TX data pointer to 0
0x14    TXDATA    W    1, 2 or 4 bytes written into the TX buffer at the data pointer,
                       which advances; beyond the 2048-byte buffer: dropped, counted
0x18    RXLEN     R    length of the frame at the head of the RX FIFO (0: empty)
0x1C    RXDATA    R    1, 2 or 4 bytes of the head frame at the RX data pointer, which
                       advances (0 past the frame's end); RX_POP rewinds it
0x20    MAC_LO    R    MAC bytes 0..3 (byte 0 in bits 0..7)
0x24    MAC_HI    R    MAC bytes 4..5
0x28    RXCOUNT   R    frames waiting in the RX FIFO (at most 32)
0x2C    IRQ       R    the VIRQ number the device raises (bind it with EVTCHNOP_bind_virq)
======  ========  ===  ================================================================

Interrupts: the device's IRQ line is a VIRQ, ``VIRQ_ARCH_0 + devid`` (Xen's arch-specific
VIRQs, which pvio gives to emulated device IRQ lines; a guest binds it and takes it as an
event-channel upcall, so each delivery is one counted ``interrupts``).  The line is
level-like: it is raised when ``ISR & IMR`` goes from zero to non-zero (and when ENABLE or
an IMR write makes it so), and stays up, raising nothing more, until the guest acknowledges.

Counters, owner ``emunic/<name>`` (``emu<domid>.<devid>``), besides the switch port's own:
``packets.tx``/``.rx``, ``bytes.*``, ``copies`` (frames moved between the device's
buffers and the switch: one per frame each way), ``irqs.raised``, ``irqs.unbound`` (raised
with no VIRQ bound: lost), ``drops.<reason>`` (``rx_disabled``, ``rx_oversize``,
``rx_fifo_full``), ``errors.<reason>`` (guest mistakes: ``bad_register``, ``bad_size``,
``tx_overrun``, ``tx_bad_length``, ``tx_short``, ``tx_disabled``, ``rx_empty_read``,
``rx_pop_empty``).  Nothing a guest writes raises.
"""

from __future__ import annotations

import logging
from collections import deque
from typing import TYPE_CHECKING

from pvio.abi.emunic import (
    CMD_DISABLE,
    CMD_ENABLE,
    CMD_RESET,
    CMD_RX_POP,
    CMD_TX,
    EMUNIC_IRQ_BASE,
    EMUNIC_MAX_DEVICES,
    EMUNIC_MMIO_BASE,
    EMUNIC_MMIO_STRIDE,
    EMUNIC_PIO_BASE,
    EMUNIC_WINDOW,
    ISR_ALL,
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
    REG_RXCOUNT,
    REG_RXDATA,
    REG_RXLEN,
    REG_STATUS,
    REG_TXDATA,
    REG_TXLEN,
    RX_FIFO_FRAMES,
    ST_ENABLED,
    ST_RX_READY,
    ST_TX_READY,
    TX_BUF_SIZE,
    emunic_mac,
)
from pvio.backends.switch import ETH_HEADER_LEN, Switch, SwitchPort

if TYPE_CHECKING:
    from pvio.core.domain import Domain
    from pvio.core.hypervisor import Hypervisor

log = logging.getLogger("pvio.emulated_nic")


class EmulatedNic(SwitchPort):
    """One emulated NIC of one domain: its registers (a :class:`pvio.core.iobus.IoDevice`), a switch port."""

    def __init__(
        self, hv: Hypervisor, dom: Domain, switch: Switch, *, devid: int = 0, mac: bytes | None = None
    ) -> None:
        if not 0 <= devid < EMUNIC_MAX_DEVICES:
            raise ValueError(f"dom{dom.domid}: emulated NIC devid {devid} not in 0..{EMUNIC_MAX_DEVICES - 1}")
        super().__init__(f"emu{dom.domid}.{devid}", hv.counters)
        self.hv = hv
        self.dom = dom
        self.switch = switch
        self.devid = devid
        self.mac = mac if mac is not None else emunic_mac(dom.domid, devid)
        if len(self.mac) != 6:
            raise ValueError(f"dom{dom.domid}: emulated NIC MAC must be 6 bytes, not {len(self.mac)}")
        # The guest writes its frames' source MAC: lock the port to the device's own, as netback
        # locks a vif (a frame from another source is dropped, drops.spoofed_mac), so a guest
        # cannot move a bystander's or the wire peer's MAC to its port.
        self.locked_macs = frozenset({self.mac})
        self.virq = EMUNIC_IRQ_BASE + devid
        self.dev = hv.counters.new(f"emunic/{self.name}", "device")
        self.tx_buf = bytearray(TX_BUF_SIZE)
        self.rx_fifo: deque[bytes] = deque()
        self._reset()

    def __repr__(self) -> str:
        return f"<EmulatedNic {self.name} mac {self.mac.hex(':')}>"

    def _reset(self) -> None:
        self.enabled = False
        self.isr = 0
        self.imr = 0
        self.tx_len = 0
        self.tx_ptr = 0
        self.rx_ptr = 0
        self.rx_fifo.clear()
        self._line = False

    # ------------------------------------------------------------------ the IRQ line
    def _update_irq(self) -> None:
        """Raise the VIRQ when ``ISR & IMR`` becomes non-zero (the line's rising edge)."""
        line = self.enabled and bool(self.isr & self.imr)
        if line and not self._line:
            self.dev["irqs.raised"] += 1
            if self.virq in self.dom.virqs:
                self.hv.send_virq(self.dom, self.virq)
            else:
                self.dev["irqs.unbound"] += 1
        self._line = line

    # ------------------------------------------------------------------ registers (IoDevice)
    def read(self, offset: int, size: int) -> int:
        """A guest read of a register (one exit, already counted by the bus)."""
        if size > 4:
            self.dev["errors.bad_size"] += 1
            return (1 << (8 * size)) - 1
        if offset == REG_RXDATA:
            return self._rx_data(size)
        reg, sub = offset & ~3, offset & 3
        if reg == REG_STATUS:
            value = (ST_ENABLED | ST_TX_READY if self.enabled else 0) | (ST_RX_READY if self.rx_fifo else 0)
        elif reg == REG_ISR:
            value = self.isr
        elif reg == REG_IMR:
            value = self.imr
        elif reg == REG_TXLEN:
            value = self.tx_len
        elif reg == REG_RXLEN:
            value = len(self.rx_fifo[0]) if self.rx_fifo else 0
        elif reg == REG_MAC_LO:
            value = int.from_bytes(self.mac[0:4], "little")
        elif reg == REG_MAC_HI:
            value = int.from_bytes(self.mac[4:6], "little")
        elif reg == REG_RXCOUNT:
            value = len(self.rx_fifo)
        elif reg == REG_IRQ:
            value = self.virq
        elif reg == REG_CMD:
            value = 0  # write-only
        else:
            self.dev["errors.bad_register"] += 1
            return (1 << (8 * size)) - 1
        return (value >> (8 * sub)) & ((1 << (8 * size)) - 1)

    def write(self, offset: int, size: int, value: int) -> None:
        """A guest write of a register (one exit, already counted by the bus)."""
        if size > 4:
            self.dev["errors.bad_size"] += 1
            return
        if offset == REG_TXDATA:
            self._tx_data(size, value)
        elif offset == REG_CMD:
            self._command(value)
        elif offset == REG_ISR:
            self.isr &= ~value  # write 1 to clear
            self._update_irq()
        elif offset == REG_IMR:
            self.imr = value & ISR_ALL
            self._update_irq()
        elif offset == REG_TXLEN:
            self.tx_len = value & 0xFFFF
            self.tx_ptr = 0
        else:
            self.dev["errors.bad_register"] += 1

    def _tx_data(self, size: int, value: int) -> None:
        ptr = self.tx_ptr
        if ptr + size > TX_BUF_SIZE:
            self.dev["errors.tx_overrun"] += 1
            return
        self.tx_buf[ptr : ptr + size] = value.to_bytes(size, "little")
        self.tx_ptr = ptr + size

    def _rx_data(self, size: int) -> int:
        if not self.rx_fifo:
            self.dev["errors.rx_empty_read"] += 1
            return 0
        frame = self.rx_fifo[0]
        ptr = self.rx_ptr
        self.rx_ptr = ptr + size
        return int.from_bytes(frame[ptr : ptr + size], "little")  # short (zero) past the end

    def _command(self, cmd: int) -> None:
        if cmd & CMD_RESET:
            self._reset()
        if cmd & CMD_ENABLE:
            self.enabled = True
            if self not in self.switch.ports:
                self.switch.attach(self)
        if cmd & CMD_TX:
            self._transmit_buffer()
        if cmd & CMD_RX_POP:
            if self.rx_fifo:
                self.rx_fifo.popleft()
            else:
                self.dev["errors.rx_pop_empty"] += 1
            self.rx_ptr = 0
        if cmd & CMD_DISABLE:
            self.enabled = False
        self._update_irq()

    def _transmit_buffer(self) -> None:
        """CMD TX: the frame in the TX buffer goes to the switch, now (on the guest's exit)."""
        n = self.tx_len
        reason = None
        if not self.enabled:
            reason = "tx_disabled"
        elif not ETH_HEADER_LEN <= n <= MAX_FRAME:
            reason = "tx_bad_length"
        elif self.tx_ptr < n:
            reason = "tx_short"  # the guest did not write the whole frame
        self.tx_ptr = 0
        if reason is not None:
            self.dev[f"errors.{reason}"] += 1
            self.isr |= ISR_TER
            return
        frame = bytes(self.tx_buf[:n])
        dev = self.dev
        dev["copies"] += 1
        dev["packets.tx"] += 1
        dev["bytes.tx"] += n
        self.isr |= ISR_TOK
        self.switch.input(self, [frame])

    # ------------------------------------------------------------------ RX: switch -> device
    def transmit(self, frames: list[bytes]) -> None:
        """Frames from the switch: into the RX FIFO (ROK), or dropped and counted (RXOVW)."""
        dev = self.dev
        fifo = self.rx_fifo
        for frame in frames:
            if not self.enabled:
                dev["drops.rx_disabled"] += 1
            elif len(frame) > MAX_FRAME:
                dev["drops.rx_oversize"] += 1
            elif len(fifo) >= RX_FIFO_FRAMES:
                dev["drops.rx_fifo_full"] += 1
                self.isr |= ISR_RXOVW
            else:
                fifo.append(frame)
                dev["copies"] += 1
                dev["packets.rx"] += 1
                dev["bytes.rx"] += len(frame)
                self.isr |= ISR_ROK
        self._update_irq()

    # ------------------------------------------------------------------ lifecycle
    def detach(self) -> None:
        """Remove the device from the bus and the switch (the domain is going away)."""
        self.hv.iobus.unregister(self.dom, self)
        if self in self.switch.ports:
            self.switch.detach(self)
        self.enabled = False


def add_emulated_nic(
    hv: Hypervisor,
    dom: Domain,
    switch: Switch,
    *,
    devid: int = 0,
    mac: bytes | None = None,
    pio: bool = True,
    mmio: bool = True,
) -> EmulatedNic:
    """Plug an emulated NIC into ``dom`` (what a toolstack does): its port and MMIO windows on the
    bus, its IRQ line, and a switch port it joins when the guest enables it."""
    nic = EmulatedNic(hv, dom, switch, devid=devid, mac=mac)
    if pio:
        hv.iobus.register_pio(dom, EMUNIC_PIO_BASE + EMUNIC_WINDOW * devid, EMUNIC_WINDOW, nic)
    if mmio:
        hv.iobus.register_mmio(dom, EMUNIC_MMIO_BASE + EMUNIC_MMIO_STRIDE * devid, EMUNIC_WINDOW, nic)
    dom.on_destroy.append(lambda _dom: nic.detach())
    return nic
