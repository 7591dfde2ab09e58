"""The emulated NIC's guest-visible ABI: where its register window is, the registers, their bits.

The device (:mod:`pvio.backends.emulated_nic`, whose docstring has the register table) and
its drivers (the Python one in :mod:`pvio.frontends.emulated_nic_driver`, the C one in
``frontends/x86/emunic.c`` through the generated header) all read these names.
"""

from __future__ import annotations

from pvio.abi.xen import VIRQ_ARCH_0

EMUNIC_IRQ_BASE = VIRQ_ARCH_0  # emulated NIC devid n raises VIRQ_ARCH_0 + n (n < 4)
EMUNIC_PIO_BASE = 0xC000
EMUNIC_MMIO_BASE = 0xFEB0_0000
EMUNIC_WINDOW = 0x40
EMUNIC_MMIO_STRIDE = 0x1000
EMUNIC_MAX_DEVICES = 4
EMUNIC_OUI = b"\x52\x54\x00"  # QEMU's prefix: an emulated card

REG_CMD = 0x00
REG_STATUS = 0x04
REG_ISR = 0x08
REG_IMR = 0x0C
REG_TXLEN = 0x10
REG_TXDATA = 0x14
REG_RXLEN = 0x18
REG_RXDATA = 0x1C
REG_MAC_LO = 0x20
REG_MAC_HI = 0x24
REG_RXCOUNT = 0x28
REG_IRQ = 0x2C

CMD_RESET = 0x01
CMD_ENABLE = 0x02
CMD_TX = 0x04
CMD_RX_POP = 0x08
CMD_DISABLE = 0x10

ST_ENABLED = 0x1
ST_RX_READY = 0x2
ST_TX_READY = 0x4

ISR_ROK = 0x01
ISR_TOK = 0x02
ISR_RXOVW = 0x04
ISR_TER = 0x08
ISR_ALL = ISR_ROK | ISR_TOK | ISR_RXOVW | ISR_TER

TX_BUF_SIZE = 2048
MAX_FRAME = 1518  # Ethernet with a VLAN tag, no FCS
RX_FIFO_FRAMES = 32


def emunic_mac(domid: int, devid: int) -> bytes:
    """The default MAC of emulated NIC ``devid`` of ``domid``: 52:54:00:<domid hi>:<lo>:<devid>."""
    return EMUNIC_OUI + bytes([(domid >> 8) & 0xFF, domid & 0xFF, devid & 0xFF])
