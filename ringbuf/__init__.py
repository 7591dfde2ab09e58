"""ringbuf: Xen's shared request/response ring (``io/ring.h``), in C behind a batch API.

The ring works on any caller-supplied writable buffer — a bytearray, an mmap, a
memoryview of guest memory — at an offset; it knows nothing of domains.  The byte layout
of the 64-byte header and the slots is Xen's, so a C program written against Xen's public
headers can share a page with it.

Public names (stable):

- :class:`FrontRing` — the frontend's end (writes requests, takes responses);
- :class:`BackRing` — the backend's end (takes requests, writes responses);
- :class:`RingLayout` — entry sizes and named fields of a protocol;
- :data:`NETIF_TX`, :data:`NETIF_RX` — the vif rings' layouts (256 slots per page);
- :class:`RingError`, :class:`RingOverflowError`.

Example::

    page = bytearray(4096)
    front = FrontRing(NETIF_RX, page)
    back = BackRing(NETIF_RX, page)
    front.send(NETIF_RX.pack_request(id=7, gref=42))
    [req] = NETIF_RX.unpack_requests(back.take_requests())
"""

from pvio.ringbuf.layout import HEADER_SIZE, NETIF_RX, NETIF_TX, PAGE_SIZE, RingLayout
from pvio.ringbuf.ring import BackRing, FrontRing, RingError, RingOverflowError

__all__ = [
    "HEADER_SIZE",
    "NETIF_RX",
    "NETIF_TX",
    "PAGE_SIZE",
    "BackRing",
    "FrontRing",
    "RingError",
    "RingLayout",
    "RingOverflowError",
]
