"""Ring layouts: entry sizes and named fields of a ring protocol's requests and responses.

A :class:`RingLayout` says how many bytes a request, a response and a slot take, and how
to pack and unpack them by field name.  The netif layouts are derived from the C structs
declared in ``ring.h`` (through cffi's type information), so the byte layout is defined
once, in C, and a test checks it against Xen's numbers.
"""

from __future__ import annotations

import struct
from collections import namedtuple
from collections.abc import Iterable
from typing import Any

from pvio.ringbuf._ringbuf import ffi, lib

PAGE_SIZE = 4096
HEADER_SIZE = 64

_CODES = {
    "uint8_t": "B",
    "int8_t": "b",
    "uint16_t": "H",
    "int16_t": "h",
    "uint32_t": "I",
    "int32_t": "i",
    "uint64_t": "Q",
    "int64_t": "q",
}


def struct_codec(c_type: str, record_name: str) -> tuple[struct.Struct, Any]:
    """Build a little-endian :class:`struct.Struct` and a namedtuple for a C struct in ring.h.

    Field order, offsets, padding and total size come from the compiled struct, so the
    Python view cannot drift from the C one.
    """
    ctype = ffi.typeof(c_type)
    fmt = "<"
    pos = 0
    names = []
    for name, field in ctype.fields:
        if field.offset > pos:
            fmt += f"{field.offset - pos}x"
        t = field.type
        if t.kind == "array":
            fmt += f"{t.length * ffi.sizeof(t.item)}s"
        else:
            fmt += _CODES[t.cname]
        names.append(name)
        pos = field.offset + ffi.sizeof(t)
    size = ffi.sizeof(ctype)
    if size > pos:
        fmt += f"{size - pos}x"
    st = struct.Struct(fmt)
    assert st.size == size, (c_type, st.size, size)
    return st, namedtuple(record_name, names)


class RingLayout:
    """The geometry and field codec of one ring protocol.

    ``req_size`` and ``rsp_size`` are the bytes a request or response occupies; ``ent_size``
    is the slot size (the size of the C union of the two).  When the layout has named
    fields, ``Request``/``Response`` are namedtuple types and :meth:`pack_request`,
    :meth:`unpack_responses` and friends convert between them and ring bytes.
    """

    def __init__(
        self,
        name: str,
        req_size: int,
        rsp_size: int,
        ent_size: int,
        req_codec: tuple[struct.Struct, Any] | None = None,
        rsp_codec: tuple[struct.Struct, Any] | None = None,
    ) -> None:
        if req_size <= 0 or rsp_size <= 0:
            raise ValueError(f"ring layout {name}: entry sizes must be positive")
        if ent_size < max(req_size, rsp_size):
            raise ValueError(f"ring layout {name}: slot of {ent_size} bytes is smaller than its entries")
        self.name = name
        self.req_size = req_size
        self.rsp_size = rsp_size
        self.ent_size = ent_size
        self._req = req_codec
        self._rsp = rsp_codec

        self.Request: Any = req_codec[1] if req_codec else None
        self.Response: Any = rsp_codec[1] if rsp_codec else None

    @classmethod
    def generic(cls, name: str, req_size: int, rsp_size: int, align: int = 4) -> RingLayout:
        """A layout for any entry sizes: the slot is max(req, rsp) rounded up to ``align``.

        ``align`` is the alignment of the C union of request and response (the largest
        alignment of their members): 4 for structs of u32 and smaller, 8 with a u64.
        """
        if align <= 0 or align & (align - 1):
            raise ValueError(f"ring layout {name}: alignment {align} is not a power of two")
        ent = -(-max(req_size, rsp_size) // align) * align
        return cls(name, req_size, rsp_size, ent)

    @classmethod
    def from_c(cls, name: str, req_type: str, rsp_type: str, slot_type: str) -> RingLayout:
        """A layout whose fields are the C structs ``req_type``/``rsp_type`` declared in ring.h."""
        req = struct_codec(req_type, _camel(req_type))
        rsp = struct_codec(rsp_type, _camel(rsp_type))
        return cls(name, req[0].size, rsp[0].size, ffi.sizeof(slot_type), req, rsp)

    def nr_ents(self, ring_bytes: int = PAGE_SIZE) -> int:
        """Slots in a ring of ``ring_bytes`` (header included): rounded down to a power of two."""
        return int(lib.pvio_ring_nr_ents(ring_bytes, self.ent_size))

    # -- field codec -------------------------------------------------------------------------

    @property
    def req_struct(self) -> struct.Struct:
        """The request codec itself, for hot paths (``iter_unpack``, ``pack`` of plain tuples)."""
        return self._codec(self._req)[0]

    @property
    def rsp_struct(self) -> struct.Struct:
        """The response codec itself, for hot paths."""
        return self._codec(self._rsp)[0]

    def _codec(self, which: tuple[struct.Struct, Any] | None) -> tuple[struct.Struct, Any]:
        if which is None:
            raise TypeError(f"ring layout {self.name} has no named fields (a generic layout)")
        return which

    def _pack_fields(self, which: tuple[struct.Struct, Any] | None, fields: dict[str, int]) -> bytes:
        st, rec = self._codec(which)
        names: tuple[str, ...] = rec._fields
        unknown = set(fields) - set(names)
        if unknown:
            raise TypeError(f"{rec.__name__} has no field(s) {sorted(unknown)}; its fields are {names}")
        return st.pack(*[fields.get(f, 0) for f in names])

    def pack_request(self, **fields: int) -> bytes:
        """Bytes of one request built from its fields by name (missing fields are 0)."""
        return self._pack_fields(self._req, fields)

    def pack_response(self, **fields: int) -> bytes:
        """Bytes of one response built from its fields by name (missing fields are 0)."""
        return self._pack_fields(self._rsp, fields)

    def pack_requests(self, records: Iterable[tuple[Any, ...]]) -> bytes:
        """Bytes of many requests, each a tuple in field order (a ``Request`` works)."""
        st, _ = self._codec(self._req)
        return b"".join(st.pack(*r) for r in records)

    def pack_responses(self, records: Iterable[tuple[Any, ...]]) -> bytes:
        """Bytes of many responses, each a tuple in field order (a ``Response`` works)."""
        st, _ = self._codec(self._rsp)
        return b"".join(st.pack(*r) for r in records)

    def unpack_requests(self, data: bytes) -> list[Any]:
        """The ``Request`` records in packed request bytes (as returned by ``take_requests``)."""
        st, rec = self._codec(self._req)
        return [rec._make(t) for t in st.iter_unpack(data)]

    def unpack_responses(self, data: bytes) -> list[Any]:
        """The ``Response`` records in packed response bytes (as returned by ``take_responses``)."""
        st, rec = self._codec(self._rsp)
        return [rec._make(t) for t in st.iter_unpack(data)]

    def __repr__(self) -> str:
        return (
            f"RingLayout({self.name!r}, req={self.req_size}, rsp={self.rsp_size}, "
            f"slot={self.ent_size}, nr_ents={self.nr_ents()})"
        )


def _camel(c_type: str) -> str:
    return "".join(p.capitalize() for p in c_type.split()[-1].split("_"))


#: netif TX ring: 12-byte request (gref, offset, flags, id, size), 4-byte response (id, status).
NETIF_TX = RingLayout.from_c(
    "netif_tx", "struct netif_tx_request", "struct netif_tx_response", "union netif_tx_sring_entry"
)
#: netif RX ring: 8-byte request (id, pad, gref), 8-byte response (id, offset, flags, status).
NETIF_RX = RingLayout.from_c(
    "netif_rx", "struct netif_rx_request", "struct netif_rx_response", "union netif_rx_sring_entry"
)
