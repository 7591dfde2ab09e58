"""Hostile peers and API misuse (docs/architecture.md, "Hostile input").

A peer owns only its own producer index and the slots it fills, and may write anything
there at any time.  Each end must: refuse an impossible producer index with
RingOverflowError *before* reading any slot (and consume nothing, so its own indices stay
put); and copy each entry out exactly once, so rewriting a slot after it was taken changes
nothing the taker holds.  Misuse of the API by its own caller raises ValueError naming the
problem.
"""

from __future__ import annotations

import struct
from array import array

import pytest

from pvio.ringbuf import NETIF_RX, NETIF_TX, BackRing, FrontRing, RingError, RingLayout, RingOverflowError

U32 = 1 << 32
NR = 256
REQ_PROD, REQ_EVENT, RSP_PROD, RSP_EVENT = 0, 4, 8, 12


def req(i: int) -> bytes:
    return NETIF_TX.pack_request(gref=0x100 + i, offset=i, flags=0, id=i, size=60 + i)


def rsp(i: int) -> bytes:
    return NETIF_TX.pack_response(id=i, status=0)


def word(page: bytearray, at: int) -> int:
    return int(struct.unpack_from("<I", page, at)[0])


def set_word(page: bytearray, at: int, value: int) -> None:
    struct.pack_into("<I", page, at, value % U32)


def slot_at(idx: int) -> int:
    return 64 + (idx % NR) * NETIF_TX.ent_size


def ring_at(start: int) -> tuple[bytearray, FrontRing, BackRing]:
    page = bytearray(4096)
    struct.pack_into("<IIII", page, 0, start % U32, (start + 1) % U32, start % U32, (start + 1) % U32)
    return page, FrontRing(NETIF_TX, page, attach_at=start), BackRing(NETIF_TX, page, attach_at=start)


STARTS = [0, U32 - 3, U32 - NR]


# ---- a hostile frontend against the backend ------------------------------------------------


def impossible_req_prods(rsp_prod_pvt: int, req_cons: int) -> list[tuple[str, int]]:
    return [
        ("one more than a ring ahead of the responses", rsp_prod_pvt + NR + 1),
        ("half the index space ahead", rsp_prod_pvt + (1 << 31)),
        ("one behind the requests taken", req_cons - 1),
        ("far behind", req_cons - 1000),
    ]


@pytest.mark.parametrize("start", STARTS)
def test_backend_refuses_impossible_req_prod_without_consuming(start: int) -> None:
    page, front, back = ring_at(start)
    front.send(b"".join(req(i) for i in range(10)))
    assert back.take_requests(4) == b"".join(req(i) for i in range(4))
    back.send(rsp(0) + rsp(1))  # rsp_prod_pvt = start+2, req_cons = start+4
    honest = word(page, REQ_PROD)

    for why, bad in impossible_req_prods(start + 2, start + 4):
        set_word(page, REQ_PROD, bad)
        for call in (back.take_requests, back.unconsumed_requests, back.final_check_for_requests):
            with pytest.raises(RingOverflowError, match="impossible req_prod"):
                call()
        assert (back.req_cons, back.rsp_prod_pvt) == ((start + 4) % U32, (start + 2) % U32), why
        assert word(page, REQ_EVENT) == (start + 1) % U32, why  # the final check did not arm

    # The frontend comes back to its senses: nothing was consumed while it was impossible.
    set_word(page, REQ_PROD, honest)
    assert back.take_requests() == b"".join(req(i) for i in range(4, 10))


@pytest.mark.parametrize("start", STARTS)
def test_req_prod_a_full_ring_ahead_is_legal_and_one_more_is_not(start: int) -> None:
    page, front, back = ring_at(start)
    front.send(req(0) * 3)
    back.take_requests()  # 3 taken, none answered: rsp_prod_pvt = start
    set_word(page, REQ_PROD, start + NR)
    assert back.unconsumed_requests() == NR - 3
    set_word(page, REQ_PROD, start + NR + 1)
    with pytest.raises(RingOverflowError):
        back.take_requests()


def test_backend_never_takes_more_than_it_can_answer() -> None:
    """A frontend claiming a full ring while 3 requests are still unanswered gets 253, not 256."""
    page, front, back = ring_at(0)
    front.send(req(0) * 3)
    back.take_requests()
    set_word(page, REQ_PROD, NR)  # legal, but only 253 slots can still be answered
    assert len(back.take_requests()) == (NR - 3) * NETIF_TX.req_size
    assert back.unconsumed_requests() == 0


@pytest.mark.parametrize("start", STARTS)
def test_frontend_rewriting_a_taken_request_changes_nothing_the_backend_holds(start: int) -> None:
    page, front, back = ring_at(start)
    front.send(req(1) + req(2))
    held = back.take_requests()
    for i in range(2):  # the frontend scribbles both slots after the copy
        at = slot_at(start + i)
        page[at : at + 12] = b"\xff" * 12
    assert held == req(1) + req(2)
    assert NETIF_TX.unpack_requests(held)[1].gref == 0x102


def test_taken_requests_are_not_overwritten_by_the_next_take() -> None:
    """Each take returns its own copy, not a view of a buffer the ring reuses."""
    _, front, back = ring_at(0)
    front.send(req(1))
    first = back.take_requests()
    front.send(req(2))
    second = back.take_requests()
    assert (first, second) == (req(1), req(2))


# ---- a hostile backend against the frontend ------------------------------------------------


def impossible_rsp_prods(rsp_cons: int, issued: int) -> list[tuple[str, int]]:
    return [
        ("one past the requests issued", issued + 1),
        ("a ring ahead", rsp_cons + NR + 1),
        ("half the index space ahead", rsp_cons + (1 << 31)),
        ("one behind the responses consumed", rsp_cons - 1),
        ("far behind", rsp_cons - 1000),
    ]


@pytest.mark.parametrize("start", STARTS)
def test_frontend_refuses_impossible_rsp_prod_without_consuming(start: int) -> None:
    page, front, back = ring_at(start)
    front.send(b"".join(req(i) for i in range(6)))
    back.take_requests()
    back.send(b"".join(rsp(i) for i in range(4)))
    assert front.take_responses(1) == rsp(0)  # rsp_cons = start+1, requests issued up to start+6
    honest = word(page, RSP_PROD)

    for why, bad in impossible_rsp_prods(start + 1, start + 6):
        set_word(page, RSP_PROD, bad)
        for call in (front.take_responses, front.unconsumed_responses, front.final_check_for_responses):
            with pytest.raises(RingOverflowError, match="impossible rsp_prod"):
                call()
        assert (front.rsp_cons, front.req_prod_pvt) == ((start + 1) % U32, (start + 6) % U32), why
        assert word(page, RSP_EVENT) == (start + 1) % U32, why

    set_word(page, RSP_PROD, honest)
    assert front.take_responses() == rsp(1) + rsp(2) + rsp(3)


def test_responses_to_requests_written_but_unpublished_are_possible() -> None:
    """The bound is the requests the frontend has written, published or not."""
    page, front, _ = ring_at(0)
    front.write_requests(req(0) * 5)  # written, never pushed
    set_word(page, RSP_PROD, 5)
    assert front.unconsumed_responses() == 5
    set_word(page, RSP_PROD, 6)
    with pytest.raises(RingOverflowError):
        front.unconsumed_responses()


def test_responses_with_no_request_outstanding_are_impossible() -> None:
    page, front, _ = ring_at(U32 - 1)
    set_word(page, RSP_PROD, 0)  # one past start on the circle, but nothing was issued
    with pytest.raises(RingOverflowError):
        front.take_responses()
    assert front.rsp_cons == U32 - 1


@pytest.mark.parametrize("start", STARTS)
def test_backend_rewriting_a_taken_response_changes_nothing_the_frontend_holds(start: int) -> None:
    page, front, back = ring_at(start)
    front.send(req(0) + req(1))
    back.take_requests()
    back.send(rsp(7) + rsp(8))
    held = front.take_responses()
    for i in range(2):
        at = slot_at(start + i)
        page[at : at + 4] = b"\xee" * 4
    assert held == rsp(7) + rsp(8)
    assert [r.id for r in NETIF_TX.unpack_responses(held)] == [7, 8]


def test_taken_responses_are_not_overwritten_by_the_next_take() -> None:
    _, front, back = ring_at(0)
    front.send(req(0) + req(1))
    back.take_requests()
    back.send(rsp(1))
    first = front.take_responses()
    back.send(rsp(2))
    assert (first, front.take_responses()) == (rsp(1), rsp(2))


def test_hostile_event_index_only_changes_whether_we_notify() -> None:
    """A backend writing garbage into req_event cannot make the frontend misbehave."""
    page, front, back = ring_at(0)
    set_word(page, REQ_EVENT, 0xDEADBEEF)
    assert front.send(req(1)) == (1, False)
    assert word(page, REQ_PROD) == 1
    assert back.take_requests() == req(1)


# ---- misuse by the ring's own caller -------------------------------------------------------


def test_writing_more_requests_than_free_slots_is_refused_whole() -> None:
    page, front, _ = ring_at(0)
    front.write_requests(req(0) * 250)
    with pytest.raises(ValueError, match="7 requests do not fit: 6 slots free"):
        front.write_requests(req(1) * 7)
    assert front.req_prod_pvt == 250  # nothing of the refused batch was written
    assert page[slot_at(250) : slot_at(250) + 12] == bytes(12)


def test_send_sends_only_what_fits() -> None:
    _, front, back = ring_at(0)
    assert front.send(req(0) * 300) == (NR, True)
    assert front.send(req(0)) == (0, False)
    assert len(back.take_requests()) == NR * 12


def test_more_responses_than_requests_taken_is_refused() -> None:
    page, front, back = ring_at(0)
    front.send(req(0) * 3)
    back.take_requests(2)
    with pytest.raises(ValueError, match="3 responses but only 2 requests await one"):
        back.write_responses(rsp(0) * 3)
    with pytest.raises(ValueError, match="3 responses but only 2 requests await one"):
        back.send(rsp(0) * 3)
    assert back.rsp_prod_pvt == 0
    assert word(page, RSP_PROD) == 0


@pytest.mark.parametrize("length", [1, 11, 13, 23])
def test_requests_of_the_wrong_byte_length_are_refused(length: int) -> None:
    _, front, _ = ring_at(0)
    for call in (front.write_requests, front.send):
        with pytest.raises(ValueError, match=f"{length} bytes are not whole 12-byte requests"):
            call(b"\x01" * length)
        with pytest.raises(ValueError, match=f"{length} bytes are not whole 12-byte requests"):
            call(bytearray(length))
    assert front.req_prod_pvt == 0


@pytest.mark.parametrize("length", [1, 3, 5, 6])
def test_responses_of_the_wrong_byte_length_are_refused(length: int) -> None:
    _, front, back = ring_at(0)
    front.send(req(0) * 4)
    back.take_requests()
    for call in (back.write_responses, back.send):
        with pytest.raises(ValueError, match=f"{length} bytes are not whole 4-byte responses"):
            call(b"\x01" * length)
    assert back.rsp_prod_pvt == 0


def test_typed_buffers_are_counted_in_bytes_not_items() -> None:
    """An array('Q') of 16 items is 128 bytes: eight 16-byte requests, not one."""
    layout = RingLayout.generic("seq", 16, 16)
    page = bytearray(4096)
    front, back = FrontRing(layout, page), BackRing(layout, page)
    entries = array("Q", range(16))
    assert front.send(entries) == (8, True)
    assert back.take_requests() == entries.tobytes()
    assert back.send(memoryview(entries.tobytes()).cast("I")) == (8, True)
    assert front.take_responses() == entries.tobytes()


@pytest.mark.parametrize("offset", [1, 2, 3, 6, -4])
def test_misaligned_ring_offset_is_refused(offset: int) -> None:
    with pytest.raises(ValueError, match=f"ring offset {offset} must be a non-negative multiple of 4"):
        FrontRing(NETIF_TX, bytearray(8192), offset=offset)
    with pytest.raises(ValueError, match=f"ring offset {offset} must be a non-negative multiple of 4"):
        BackRing(NETIF_TX, bytearray(8192), offset=offset)


def test_misaligned_buffer_is_refused() -> None:
    odd = memoryview(bytearray(4097))[1:]
    with pytest.raises(ValueError, match="ring memory must be 4-byte aligned"):
        FrontRing(NETIF_TX, odd)
    with pytest.raises(ValueError, match="ring memory must be 4-byte aligned"):
        BackRing(NETIF_TX, odd)


@pytest.mark.parametrize(
    ("buffer_len", "offset", "size", "message"),
    [
        (4095, 0, 4096, "ring of 4096 bytes at offset 0 does not fit in a buffer of 4095"),
        (4096, 4, 4096, "ring of 4096 bytes at offset 4 does not fit in a buffer of 4096"),
        (100, 0, 4096, "ring of 4096 bytes at offset 0 does not fit in a buffer of 100"),
        (4096, 0, 64, "64 bytes hold no 12-byte slot after the 64-byte header"),
        (4096, 0, 75, "75 bytes hold no 12-byte slot after the 64-byte header"),
    ],
)
def test_too_small_buffer_is_refused(buffer_len: int, offset: int, size: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        FrontRing(NETIF_TX, bytearray(buffer_len), offset=offset, size=size)
    with pytest.raises(ValueError, match=message):
        BackRing(NETIF_TX, bytearray(buffer_len), offset=offset, size=size)


def test_read_only_buffer_is_refused() -> None:
    with pytest.raises(BufferError, match="not writable"):
        FrontRing(NETIF_RX, bytes(4096))


def test_layout_must_be_a_ring_layout() -> None:
    with pytest.raises(TypeError, match="layout must be a RingLayout, not str"):
        FrontRing("netif_tx", bytearray(4096))  # type: ignore[arg-type]


@pytest.mark.parametrize("end", ["front", "back"])
def test_released_ring_end_refuses_every_operation(end: str) -> None:
    """After release() no operation touches the (possibly freed) memory: each raises RingError."""
    page = bytearray(4096)
    front = FrontRing(NETIF_TX, page)
    back = BackRing(NETIF_TX, page)
    front.send(NETIF_TX.pack_request(id=1, size=60))
    ring = front if end == "front" else back
    ring.release()
    ring.release()  # idempotent
    if end == "front":
        ops = [
            lambda: front.send(NETIF_TX.pack_request(id=2)),
            lambda: front.write_requests(NETIF_TX.pack_request(id=2)),
            front.push_requests,
            front.take_responses,
            front.unconsumed_responses,
            front.final_check_for_responses,
        ]
    else:
        ops = [
            back.take_requests,
            back.unconsumed_requests,
            lambda: back.send(NETIF_TX.pack_response(id=1)),
            lambda: back.write_responses(NETIF_TX.pack_response(id=1)),
            back.push_responses,
            back.final_check_for_requests,
        ]
    for op in ops:
        with pytest.raises(RingError, match="released"):
            op()
