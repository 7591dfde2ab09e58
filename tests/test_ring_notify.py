"""Notification hold-off (io/ring.h): when a push notifies, and how the final check
closes the race between "I found no work" and "the peer skipped notifying me".

A push from ``old`` to ``new`` must notify exactly when the peer's event index lies in the
half-open window (old, new].  The expected answers here are computed on unwrapped integers
(``old < event <= new``), never with the modular formula the ring uses, and then placed on
the 2**32 circle at bases that make old, new and event wrap in every combination.
"""

from __future__ import annotations

import struct

import pytest

from pvio.ringbuf import NETIF_RX, BackRing, FrontRing

U32 = 1 << 32
NR = 8  # a small NETIF_RX ring: 8 slots of 8 bytes
RING_BYTES = 64 + NR * 8
REQ = NETIF_RX.pack_request(id=1, gref=2)
RSP = NETIF_RX.pack_response(id=1, status=8)

# Bases chosen so that old, new and event straddle 2**32 in every combination.
BASES = [0, 100, U32 - 1, U32 - 4, U32 - NR, U32 - 2 * NR]


def word(page: bytearray, at: int) -> int:
    return int(struct.unpack_from("<I", page, at)[0])


def set_word(page: bytearray, at: int, value: int) -> None:
    struct.pack_into("<I", page, at, value % U32)


def live_ring(start: int) -> tuple[bytearray, FrontRing, BackRing]:
    """A ring whose indices are all at ``start``, as if attached to a live ring."""
    page = bytearray(RING_BYTES)
    struct.pack_into("<IIII", page, 0, start % U32, (start + 1) % U32, start % U32, (start + 1) % U32)
    return (
        page,
        FrontRing(NETIF_RX, page, size=RING_BYTES, attach_at=start),
        BackRing(NETIF_RX, page, size=RING_BYTES, attach_at=start),
    )


def window_cases() -> list[tuple[int, int, int]]:
    """(already published, newly pushed, event offset from base): every small case."""
    return [
        (before, pushed, event)
        for before in range(3)
        for pushed in range(NR - before + 1)
        for event in range(-2, before + pushed + 3)
    ]


@pytest.mark.parametrize("base", BASES)
def test_request_push_notifies_iff_req_event_in_old_new(base: int) -> None:
    for before, pushed, event in window_cases():
        page, front, back = live_ring(base)
        front.write_requests(REQ * before)
        front.push_requests()
        back.take_requests()
        back.send(RSP * before)
        front.take_responses()
        set_word(page, 4, base + event)  # the backend's req_event
        old, new = base + before, base + before + pushed

        front.write_requests(REQ * pushed)
        notify = front.push_requests()

        assert notify is (old < base + event <= new), (before, pushed, event)
        assert word(page, 0) == new % U32


@pytest.mark.parametrize("base", BASES)
def test_response_push_notifies_iff_rsp_event_in_old_new(base: int) -> None:
    for before, pushed, event in window_cases():
        page, front, back = live_ring(base)
        front.send(REQ * (before + pushed))
        back.take_requests()
        back.send(RSP * before)
        set_word(page, 12, base + event)  # the frontend's rsp_event
        old, new = base + before, base + before + pushed

        back.write_responses(RSP * pushed)
        notify = back.push_responses()

        assert notify is (old < base + event <= new), (before, pushed, event)
        assert word(page, 8) == new % U32


@pytest.mark.parametrize("base", BASES)
def test_empty_send_neither_publishes_nor_notifies(base: int) -> None:
    page, front, back = live_ring(base)
    set_word(page, 4, base)  # even an event equal to req_prod gives no notification
    assert front.send(b"") == (0, False)
    assert back.send(b"") == (0, False)
    assert (word(page, 0), word(page, 8)) == (base % U32, base % U32)


# ---- final check: event = cons + ahead -----------------------------------------------------


@pytest.mark.parametrize("base", BASES)
@pytest.mark.parametrize("ahead", [1, 2, NR - 1, NR, 1000, U32 - 1])
def test_final_check_sets_event_to_consumer_plus_ahead(base: int, ahead: int) -> None:
    page, front, back = live_ring(base)
    front.send(REQ * 3)
    assert back.take_requests() == REQ * 3
    back.send(RSP * 2)
    assert front.take_responses() == RSP * 2

    assert back.final_check_for_requests(ahead) == 0
    assert word(page, 4) == (base + 3 + ahead) % U32  # req_event = req_cons + ahead
    assert front.final_check_for_responses(ahead) == 0
    assert word(page, 12) == (base + 2 + ahead) % U32  # rsp_event = rsp_cons + ahead


def test_final_check_with_work_waiting_leaves_the_event_alone() -> None:
    page, front, back = live_ring(U32 - 1)
    set_word(page, 4, 12345)
    front.send(REQ * 2)
    assert back.final_check_for_requests(5) == 2
    assert word(page, 4) == 12345


def test_final_check_ahead_batches_notifications() -> None:
    """With ahead=4 the producer's 1st-3rd pushes stay silent and the 4th notifies."""
    _, front, back = live_ring(U32 - 2)
    assert back.final_check_for_requests(ahead=4) == 0
    assert [front.send(REQ)[1] for _ in range(4)] == [False, False, False, True]
    assert back.take_requests() == REQ * 4


# ---- the sleep/notify race, step by step ---------------------------------------------------


def test_race_consumer_misses_the_push_but_its_final_check_sees_the_work() -> None:
    """Interleaving: back finds nothing; front pushes without notifying; back's final check.

    The backend's req_event is stale (still 1 from SHARED_RING_INIT, far behind), so the
    frontend's push of request 6 is not in its window and notifies nobody.  Had the backend
    slept after its empty take, request 6 would sit unserved; the final check re-reads
    req_prod after arming the event and returns the work instead.
    """
    page = bytearray(RING_BYTES)
    front = FrontRing(NETIF_RX, page, size=RING_BYTES)
    back = BackRing(NETIF_RX, page, size=RING_BYTES)
    assert front.send(REQ * 5) == (5, True)  # req_event was 1: the first push notifies
    assert back.take_requests() == REQ * 5
    back.send(RSP * 5)
    front.take_responses()

    assert back.take_requests() == b""  # 1. consumer: nothing to do, about to sleep
    assert front.send(REQ) == (1, False)  # 2. producer: req_event 1 not in (5, 6]: no notify
    assert back.final_check_for_requests() == 1  # 3. consumer: final check finds request 6
    assert word(page, 4) == 1  # ... and, finding work, did not move req_event
    assert back.take_requests() == REQ


def test_race_push_after_the_consumer_armed_its_event_notifies() -> None:
    """Interleaving: back finds nothing and arms req_event; then front pushes: notify=True."""
    page = bytearray(RING_BYTES)
    front = FrontRing(NETIF_RX, page, size=RING_BYTES)
    back = BackRing(NETIF_RX, page, size=RING_BYTES)
    front.send(REQ * 5)
    back.take_requests()
    back.send(RSP * 5)
    front.take_responses()

    assert back.take_requests() == b""  # 1. consumer: nothing to do
    assert back.final_check_for_requests() == 0  # 2. consumer: arms req_event = 6, still nothing: sleeps
    assert word(page, 4) == 6
    assert front.send(REQ) == (1, True)  # 3. producer: 6 in (5, 6]: must wake the consumer


def test_race_in_the_response_direction() -> None:
    """The same two interleavings for a frontend sleeping on responses."""
    page, front, back = live_ring(U32 - 3)
    front.send(REQ * 4)
    back.take_requests()
    back.send(RSP)
    assert front.take_responses() == RSP

    # Missed push: rsp_event is still start+1 (behind), so the push is silent ...
    assert front.take_responses() == b""
    assert back.send(RSP) == (1, False)
    assert front.final_check_for_responses() == 1  # ... and the final check catches it.
    assert front.take_responses() == RSP

    # Armed first: the next push must notify.
    assert front.final_check_for_responses() == 0
    assert word(page, 12) == (U32 - 3 + 3) % U32
    assert back.send(RSP) == (1, True)
