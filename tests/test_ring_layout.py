"""The ring's byte layout against Xen's public headers (io/ring.h and io/netif.h).

Sizes and offsets are read from the compiled C structs through cffi, so these tests pin the
ABI the C code actually uses; the Python layouts are then checked against the same numbers,
and the bytes a ring writes are checked at the offsets a Xen peer would read them from.
"""

from __future__ import annotations

import struct

import pytest

from pvio.ringbuf import HEADER_SIZE, NETIF_RX, NETIF_TX, PAGE_SIZE, BackRing, FrontRing, RingLayout
from pvio.ringbuf._ringbuf import ffi, lib


def offsets(c_type: str) -> dict[str, int]:
    return {name: field.offset for name, field in ffi.typeof(c_type).fields}


# ---- the shared header ---------------------------------------------------------------------


def test_shared_header_is_64_bytes_with_xen_field_offsets() -> None:
    assert ffi.sizeof("struct pvio_sring") == 64 == HEADER_SIZE
    assert offsets("struct pvio_sring") == {
        "req_prod": 0,
        "req_event": 4,
        "rsp_prod": 8,
        "rsp_event": 12,
        "pvt": 16,
        "pad": 20,
    }
    assert ffi.sizeof(ffi.typeof("struct pvio_sring").fields[4][1].type) == 4  # pvt
    assert ffi.sizeof(ffi.typeof("struct pvio_sring").fields[5][1].type) == 44  # __pad


def test_ring_indices_are_32_bit() -> None:
    assert ffi.sizeof("RING_IDX") == 4
    assert int(ffi.cast("RING_IDX", -1)) == 0xFFFFFFFF


@pytest.mark.parametrize("c_type", ["struct pvio_front_ring", "struct pvio_back_ring"])
def test_private_ring_state_starts_with_ring_h_fields_in_order(c_type: str) -> None:
    """The first four fields are Xen's front/back ring struct: two indices, nr_ents, sring."""
    first = "req_prod_pvt rsp_cons" if "front" in c_type else "rsp_prod_pvt req_cons"
    expected = [*first.split(), "nr_ents", "sring"]
    fields = ffi.typeof(c_type).fields
    assert [name for name, _ in fields[:4]] == expected
    ptr_align = ffi.alignof("void *")
    sring_at = -(-12 // ptr_align) * ptr_align  # after three u32s, at pointer alignment
    assert [f.offset for _, f in fields[:4]] == [0, 4, 8, sring_at]
    assert ffi.sizeof(fields[2][1].type) == 4  # nr_ents is an unsigned int


# ---- netif wire structures -----------------------------------------------------------------


def test_netif_tx_request_is_12_bytes() -> None:
    assert ffi.sizeof("struct netif_tx_request") == 12
    assert offsets("struct netif_tx_request") == {"gref": 0, "offset": 4, "flags": 6, "id": 8, "size": 10}


def test_netif_tx_response_is_4_bytes() -> None:
    assert ffi.sizeof("struct netif_tx_response") == 4
    assert offsets("struct netif_tx_response") == {"id": 0, "status": 2}


def test_netif_rx_request_is_8_bytes_with_gref_at_4() -> None:
    assert ffi.sizeof("struct netif_rx_request") == 8
    assert offsets("struct netif_rx_request") == {"id": 0, "pad": 2, "gref": 4}


def test_netif_rx_response_is_8_bytes() -> None:
    assert ffi.sizeof("struct netif_rx_response") == 8
    assert offsets("struct netif_rx_response") == {"id": 0, "offset": 2, "flags": 4, "status": 6}


def test_netif_extra_info_is_8_bytes() -> None:
    assert ffi.sizeof("struct netif_extra_info") == 8
    assert offsets("struct netif_extra_info") == {"type": 0, "flags": 1, "u": 2}


def test_netif_slot_sizes_are_12_for_tx_and_8_for_rx() -> None:
    assert ffi.sizeof("union netif_tx_sring_entry") == 12
    assert ffi.sizeof("union netif_rx_sring_entry") == 8
    assert (NETIF_TX.req_size, NETIF_TX.rsp_size, NETIF_TX.ent_size) == (12, 4, 12)
    assert (NETIF_RX.req_size, NETIF_RX.rsp_size, NETIF_RX.ent_size) == (8, 8, 8)


def test_status_is_signed_and_the_other_fields_unsigned() -> None:
    assert ffi.typeof("struct netif_tx_response").fields[1][1].type.cname == "int16_t"
    assert ffi.typeof("struct netif_rx_response").fields[3][1].type.cname == "int16_t"
    assert ffi.typeof("struct netif_tx_request").fields[0][1].type.cname == "uint32_t"


# ---- number of entries ---------------------------------------------------------------------


def test_netif_rings_hold_256_entries_per_page() -> None:
    assert NETIF_TX.nr_ents() == 256  # 336 slots of 12 B fit
    assert NETIF_RX.nr_ents() == 256  # 504 slots of 8 B fit
    assert FrontRing(NETIF_TX, bytearray(PAGE_SIZE)).nr_ents == 256
    assert BackRing(NETIF_RX, bytearray(PAGE_SIZE)).nr_ents == 256


def test_16_byte_entries_give_128_per_page() -> None:
    assert RingLayout.generic("ctrl", 16, 12).nr_ents() == 128  # 252 fit


@pytest.mark.parametrize(
    ("ring_bytes", "ent_size", "expected"),
    [
        (63, 4, 0),  # not even a header
        (64, 4, 0),  # a header and no slot
        (64 + 3, 4, 0),
        (64 + 4, 4, 1),
        (64 + 12, 4, 2),  # 3 fit -> 2
        (64 + 16, 4, 4),
        (64 + 31 * 4, 4, 16),  # 31 fit -> 16
        (PAGE_SIZE, 12, 256),
        (PAGE_SIZE, 8, 256),
        (PAGE_SIZE, 16, 128),
        (PAGE_SIZE, 1, 2048),  # 4032 fit -> 2048
        (2 * PAGE_SIZE, 12, 512),
        (64 + 1000, 0, 0),  # a zero-sized entry is no layout
    ],
)
def test_nr_ents_rounds_down_to_a_power_of_two(ring_bytes: int, ent_size: int, expected: int) -> None:
    assert lib.pvio_ring_nr_ents(ring_bytes, ent_size) == expected


# ---- pack / unpack by field name -----------------------------------------------------------


def test_netif_field_names_follow_netif_h() -> None:
    assert NETIF_TX.Request._fields == ("gref", "offset", "flags", "id", "size")
    assert NETIF_TX.Response._fields == ("id", "status")
    assert NETIF_RX.Request._fields == ("id", "pad", "gref")
    assert NETIF_RX.Response._fields == ("id", "offset", "flags", "status")


def test_tx_request_packs_little_endian_at_netif_offsets() -> None:
    raw = NETIF_TX.pack_request(gref=0x11223344, offset=0x5566, flags=0x0004, id=0x0102, size=0xFFFF)
    assert raw == bytes.fromhex("44332211 6655 0400 0201 ffff")
    assert NETIF_TX.unpack_requests(raw) == [NETIF_TX.Request(0x11223344, 0x5566, 4, 0x0102, 0xFFFF)]


def test_tx_response_status_is_signed() -> None:
    raw = NETIF_TX.pack_response(id=0xBEEF, status=-2)
    assert raw == bytes.fromhex("efbe feff")
    assert NETIF_TX.unpack_responses(raw)[0].status == -2


def test_rx_request_keeps_gref_after_the_pad() -> None:
    assert NETIF_RX.pack_request(id=7, gref=0xA0B0C0D0) == bytes.fromhex("0700 0000 d0c0b0a0")


def test_rx_response_round_trips_every_field() -> None:
    rsp = NETIF_RX.Response(id=3, offset=0x0FFF, flags=0x15, status=-1)
    raw = NETIF_RX.pack_responses([rsp, rsp._replace(id=4, status=1514)])
    assert raw == bytes.fromhex("0300ff0f1500ffff 0400ff0f1500ea05")
    assert NETIF_RX.unpack_responses(raw) == [rsp, rsp._replace(id=4, status=1514)]


def test_missing_fields_pack_as_zero() -> None:
    assert NETIF_TX.pack_request(id=1) == bytes.fromhex("00000000 0000 0000 0100 0000")


def test_unknown_field_is_refused_by_name() -> None:
    with pytest.raises(TypeError, match=r"no field\(s\) \['grefs'\]"):
        NETIF_TX.pack_request(grefs=1)


def test_out_of_range_field_value_is_refused() -> None:
    with pytest.raises(struct.error):
        NETIF_TX.pack_request(id=0x10000)


def test_pack_requests_concatenates_in_order() -> None:
    reqs = [NETIF_TX.Request(gref=i, offset=0, flags=0, id=i, size=60) for i in range(3)]
    raw = NETIF_TX.pack_requests(reqs)
    assert len(raw) == 36
    assert raw[12:24] == NETIF_TX.pack_request(gref=1, id=1, size=60)
    assert NETIF_TX.unpack_requests(raw) == reqs


# ---- generic layouts -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("req", "rsp", "align", "slot"),
    [(16, 16, 4, 16), (5, 9, 4, 12), (12, 4, 4, 12), (12, 4, 8, 16), (1, 1, 1, 1), (3, 2, 2, 4)],
)
def test_generic_slot_is_the_larger_entry_rounded_to_alignment(
    req: int, rsp: int, align: int, slot: int
) -> None:
    layout = RingLayout.generic("g", req, rsp, align=align)
    assert (layout.req_size, layout.rsp_size, layout.ent_size) == (req, rsp, slot)


def test_generic_layout_has_no_named_fields() -> None:
    with pytest.raises(TypeError, match="no named fields"):
        RingLayout.generic("g", 16, 16).pack_request(seq=1)


@pytest.mark.parametrize(("req", "rsp", "align"), [(0, 4, 4), (4, -1, 4), (4, 4, 3), (4, 4, 0)])
def test_generic_layout_refuses_impossible_geometry(req: int, rsp: int, align: int) -> None:
    with pytest.raises(ValueError, match="ring layout g"):
        RingLayout.generic("g", req, rsp, align=align)


def test_slot_smaller_than_its_entries_is_refused() -> None:
    with pytest.raises(ValueError, match="slot of 8 bytes is smaller than its entries"):
        RingLayout("x", 12, 4, 8)


# ---- the bytes a ring writes are where Xen reads them --------------------------------------


def test_front_init_writes_shared_ring_init_and_nothing_else() -> None:
    page = bytearray(b"\xaa" * PAGE_SIZE)
    FrontRing(NETIF_TX, page)
    assert struct.unpack_from("<IIII", page, 0) == (0, 1, 0, 1)  # req_prod, req_event, rsp_prod, rsp_event
    assert page[16:64] == bytes(48)  # pvt and padding zeroed
    assert page[64:] == b"\xaa" * (PAGE_SIZE - 64)  # slots untouched


def test_attach_touches_no_shared_byte() -> None:
    page = bytearray(b"\x55" * PAGE_SIZE)
    FrontRing(NETIF_TX, page, attach_at=7)
    BackRing(NETIF_TX, page, attach_at=7)
    assert page == b"\x55" * PAGE_SIZE


def test_entries_land_at_64_plus_slot_times_entry_size_and_wrap() -> None:
    """Attached at 2**32-2, request i goes to slot (2**32-2+i) mod 256: 254, 255, 0, 1."""
    page = bytearray(PAGE_SIZE)
    start = 2**32 - 2
    struct.pack_into("<IIII", page, 0, start, start + 1, start, start + 1)
    front = FrontRing(NETIF_TX, page, attach_at=start)
    reqs = [NETIF_TX.pack_request(gref=0x1000 + i, id=i) for i in range(4)]
    assert front.send(b"".join(reqs)) == (4, True)
    for req, slot in zip(reqs, [254, 255, 0, 1], strict=True):
        at = 64 + slot * 12
        assert page[at : at + 12] == req
    assert struct.unpack_from("<I", page, 0)[0] == 2  # req_prod wrapped past 2**32


def test_tx_response_overwrites_only_its_4_bytes_of_the_request_slot() -> None:
    page = bytearray(PAGE_SIZE)
    front, back = FrontRing(NETIF_TX, page), BackRing(NETIF_TX, page)
    req = NETIF_TX.pack_request(gref=0xDDCCBBAA, offset=0x1234, flags=1, id=9, size=100)
    front.send(req)
    back.take_requests()
    back.send(NETIF_TX.pack_response(id=9, status=0))
    assert page[64:76] == NETIF_TX.pack_response(id=9, status=0) + req[4:]
    assert struct.unpack_from("<I", page, 8)[0] == 1  # rsp_prod


def test_ring_at_an_offset_uses_only_its_own_bytes() -> None:
    buf = bytearray(b"\xee" * (100 + 64 + 8 * 8 + 100))
    front = FrontRing(NETIF_RX, buf, offset=100, size=64 + 8 * 8)
    assert front.nr_ents == 8
    front.send(NETIF_RX.pack_request(id=1, gref=2) * 8)
    assert buf[:100] == b"\xee" * 100
    assert buf[100 + 64 + 64 :] == b"\xee" * 100
    assert struct.unpack_from("<I", buf, 100)[0] == 8
