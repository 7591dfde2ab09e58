"""io/netif.h constants: flags, status codes and limits of the vif wire format.

The structures themselves are declared in ``ring.h`` and exposed as the
:data:`pvio.ringbuf.NETIF_TX` / :data:`pvio.ringbuf.NETIF_RX` layouts; their codecs and the ring
sizes are re-exported here, derived from those layouts, for the drivers' hot paths.
"""

from pvio.ringbuf.layout import NETIF_RX, NETIF_TX

# TX request flags (NETTXF_*).  Bits 0 and 1 are swapped between TX and RX.
NETTXF_CSUM_BLANK = 0x1
NETTXF_DATA_VALIDATED = 0x2
NETTXF_MORE_DATA = 0x4
NETTXF_EXTRA_INFO = 0x8

# RX response flags (NETRXF_*).
NETRXF_DATA_VALIDATED = 0x1
NETRXF_CSUM_BLANK = 0x2
NETRXF_MORE_DATA = 0x4
NETRXF_EXTRA_INFO = 0x8
NETRXF_GSO_PREFIX = 0x10

# Response status codes (NETIF_RSP_*).
NETIF_RSP_DROPPED = -2
NETIF_RSP_ERROR = -1
NETIF_RSP_OKAY = 0
NETIF_RSP_NULL = 1  # "no response": auxiliary slots such as extra info

# netif_extra_info types and flags.
XEN_NETIF_EXTRA_TYPE_NONE = 0
XEN_NETIF_EXTRA_TYPE_GSO = 1
XEN_NETIF_EXTRA_TYPE_MCAST_ADD = 2
XEN_NETIF_EXTRA_TYPE_MCAST_DEL = 3
XEN_NETIF_EXTRA_TYPE_HASH = 4
XEN_NETIF_EXTRA_FLAG_MORE = 0x1

# Limits.
XEN_NETIF_NR_SLOTS_MIN = 18  # every backend accepts packets of up to 18 slots
XEN_NETIF_MAX_TX_SIZE = 0xFFFF  # the 16-bit size field
NET_TX_RING_SIZE = NETIF_TX.nr_ents()  # 256: 12-byte slots in a page, rounded to a power of two
NET_RX_RING_SIZE = NETIF_RX.nr_ents()  # 256: 8-byte slots

# The struct codecs of netif_tx_request/response and netif_rx_request/response (ring.h),
# for ``iter_unpack`` over taken entries and ``pack`` of plain tuples.
TX_REQUEST = NETIF_TX.req_struct
TX_RESPONSE = NETIF_TX.rsp_struct
RX_REQUEST = NETIF_RX.req_struct
RX_RESPONSE = NETIF_RX.rsp_struct


# Validation every implementation applies to what its peer wrote (the C netfront applies the
# same rules in frontends/x86/netfront.c; tests hold them equal).
RX_PACKET_MAX_SLOTS = XEN_NETIF_NR_SLOTS_MIN  # a received packet takes at most 18 slots
PAGE_BYTES = 4096


def rx_slot_problem(offset: int, status: int) -> str | None:
    """Why an RX response carrying data (``status`` >= 0 bytes at ``offset``) is impossible,
    or None: a slot holds 1..4096 bytes inside its page (0 bytes is a protocol error)."""
    if status == 0:
        return "RX response of 0 bytes"
    if offset + status > PAGE_BYTES:
        return f"RX response offset {offset} + size {status} crosses the page"
    return None


def tx_slot_problem(offset: int, size: int) -> str | None:
    """Why one TX slot's data (``size`` bytes at ``offset``) is impossible, or None."""
    if size <= 0 or offset + size > PAGE_BYTES:
        return f"TX slot offset {offset} + size {size} crosses the page"
    return None


def complete_checksum(frame: bytes) -> bytes:
    """Finish the TCP/UDP checksum of an IPv4 frame sent with NETTXF_CSUM_BLANK.

    A frontend with checksum offload (Linux's xen-netfront always offers it for IPv4) leaves
    the transport checksum holding only the pseudo-header sum; the backend must complete it,
    as Linux's netback does with skb_checksum_help: sum the transport header and payload
    (that partial value included), fold, complement.  Frames that are not IPv4 TCP/UDP, or
    are too short to be, come back unchanged.
    """
    if len(frame) < 34 or frame[12:14] != b"\x08\x00":
        return frame
    ihl = (frame[14] & 0x0F) * 4
    proto = frame[23]
    l4 = 14 + ihl
    field = {6: l4 + 16, 17: l4 + 6}.get(proto)
    total = int.from_bytes(frame[16:18], "big")
    end = min(len(frame), 14 + total)
    if field is None or ihl < 20 or field + 2 > end:
        return frame
    data = frame[l4:end]
    if len(data) % 2:
        data += b"\x00"
    s = sum(int.from_bytes(data[k : k + 2], "big") for k in range(0, len(data), 2))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    csum = ~s & 0xFFFF
    if proto == 17 and csum == 0:
        csum = 0xFFFF  # UDP: 0 means "no checksum"
    return frame[:field] + csum.to_bytes(2, "big") + frame[field + 2 :]
