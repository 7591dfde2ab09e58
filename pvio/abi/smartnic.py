"""The smart NIC's guest-visible ABI: register window, registers and bits, descriptor and
completion layouts, the descriptor ring.

The monitor-side device (:mod:`pvio.backends.smartnic`, whose docstring documents each
register and the descriptor format) and the drivers (:mod:`pvio.frontends.smartnic_driver`,
``frontends/x86/snic.c`` through the generated header) all read these names.
"""

from __future__ import annotations

from pvio.abi.cstruct import CStruct
from pvio.abi.xen import PAGE_SIZE as _PAGE_SIZE
from pvio.abi.xen import VIRQ_ARCH_0
from pvio.ringbuf import RingLayout

SNIC_MMIO_BASE = 0xFEC0_0000
SNIC_MMIO_STRIDE = 0x1000
SNIC_WINDOW = 0x100
SNIC_MAX_DEVICES = 4
SNIC_IRQ_BASE = VIRQ_ARCH_0 + 4  # smart NIC devid n raises VIRQ 20 + n
SNIC_ID = 0x43494E53  # "SNIC" read as a little-endian u32
SNIC_VERSION = 1
SNIC_OUI = b"\x02\x53\x4e"  # locally administered: 02:53:4e ("SN")

REG_ID = 0x00
REG_VERSION = 0x04
REG_CTRL = 0x08
REG_STATUS = 0x0C
REG_TX_RING_LO = 0x10
REG_TX_RING_HI = 0x14
REG_RX_RING_LO = 0x18
REG_RX_RING_HI = 0x1C
REG_POOL_LO = 0x20
REG_POOL_HI = 0x24
REG_POOL_BUF_SIZE = 0x28
REG_POOL_COUNT = 0x2C
REG_IRQ = 0x30
REG_GRANT_DOMID = 0x34
REG_MAC_LO = 0x38
REG_MAC_HI = 0x3C
REG_DOORBELL = 0x40
REG_MOD_MODE = 0x44
REG_MOD_FRAMES = 0x48
REG_MOD_USECS = 0x4C
REG_ERRORS = 0x50
REG_MOD_LEVEL = 0x54
REG_RING_ORDER = 0x58

CTRL_ENABLE = 0x1
CTRL_RESET = 0x2
ST_ENABLED = 0x1
ST_ERROR = 0x2
DB_TX = 0x1
DB_RX = 0x2
MOD_ADAPTIVE = 0
MOD_FIXED = 1
MOD_OFF = 2

SNIC_F_GREF = 0x1
SNIC_OK = 0
SNIC_E_BAD_BUF = -1
SNIC_E_BAD_GRANT = -2
SNIC_E_BAD_LEN = -3
SNIC_E_BAD_FLAGS = -4

#: struct snic_desc, written by the guest (16 bytes).
SNIC_DESC = CStruct(
    "snic_desc",
    [
        ("buf", "u32", "pool index, or a grant reference if flags & SNIC_F_GREF"),
        ("offset", "u16", "in the pool buffer or the granted page"),
        ("len", "u16", "TX: frame length; RX: room from offset"),
        ("id", "u16", "the driver's cookie, echoed in the completion"),
        ("flags", "u16", "SNIC_F_GREF; other bits 0"),
        ("reserved", "u32"),
    ],
)
#: struct snic_cmpl, written by the device (8 bytes): never trusted by a driver.
SNIC_CMPL = CStruct(
    "snic_cmpl",
    [
        ("id", "u16"),
        ("len", "u16"),
        ("status", "s16", "0 OK, or a negative SNIC_E_* code"),
        ("flags", "u16"),
    ],
)
DESC = SNIC_DESC.struct
CMPL = SNIC_CMPL.struct
#: The descriptor rings: 16-byte descriptors, 8-byte completions, 16-byte slots, 128 per page.
SNIC_RING = RingLayout.generic("snic", DESC.size, CMPL.size, align=4)
SNIC_RING_ENTRIES = SNIC_RING.nr_ents()
#: A ring may span 2**order contiguous pages (REG_RING_ORDER, as Xen's ``ring-page-order``):
#: 128 slots in one page, 256 in two, 512 in four.
SNIC_RING_ORDER_MAX = 2


def snic_ring_entries(order: int) -> int:
    """The slots of a ring of ``2**order`` pages."""
    return SNIC_RING.nr_ents(_PAGE_SIZE << order)


SNIC_RING_MAX_ENTRIES = snic_ring_entries(SNIC_RING_ORDER_MAX)


def snic_mac(domid: int, devid: int) -> bytes:
    """The default MAC of smart NIC ``devid`` of ``domid``: 02:53:4e:<domid hi>:<lo>:<devid>."""
    return SNIC_OUI + bytes([(domid >> 8) & 0xFF, domid & 0xFF, devid & 0xFF])
