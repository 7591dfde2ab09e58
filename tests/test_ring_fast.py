"""The fast send/take (``ringbuf/ringfast.c``) against ring.py's Python versions of the same calls.

FrontRing.send / take_responses and BackRing.send / take_requests are C methods that handle
``bytes`` (and any other contiguous buffer) and plain int limits and hand every other case to
``_send_slow`` / ``_take_slow``.
Two rings on two identical pages, one driven through the fast methods and one through the
slow ones, must return the same values and leave the same bytes in their pages; the cases the
fast path hands over (other buffers, odd limits, errors) must behave as documented.
"""

from __future__ import annotations

import array
import random

import pytest

from pvio.ringbuf import NETIF_TX, BackRing, FrontRing, RingError, RingOverflowError

REQ, RSP = NETIF_TX.req_size, NETIF_TX.rsp_size


def test_fast_and_slow_calls_agree_on_random_batches() -> None:
    rng = random.Random(14)
    page_f, page_s = bytearray(4096), bytearray(4096)
    ff, fb = FrontRing(NETIF_TX, page_f), BackRing(NETIF_TX, page_f)
    sf, sb = FrontRing(NETIF_TX, page_s), BackRing(NETIF_TX, page_s)
    for _ in range(2000):
        reqs = rng.randbytes(REQ * rng.randrange(0, 300))
        assert ff.send(reqs) == sf._send_slow(reqs)
        limit = rng.choice([None, 0, 1, 7, 64, 255, 256, 10**12])
        got = fb.take_requests(limit)
        assert got == sb._take_slow(limit)
        rsps = rng.randbytes(RSP * (len(got) // REQ))
        assert fb.send(rsps) == sb._send_slow(rsps)
        limit = rng.choice([None, 0, 3, 256])
        assert ff.take_responses(limit) == sf._take_slow(limit)
        assert page_f == page_s
    assert ff.rsp_cons == sf.rsp_cons > 0


def test_other_buffers_count_in_bytes_and_odd_limits_or_arguments_behave_as_documented() -> None:
    page = bytearray(4096)
    front, back = FrontRing(NETIF_TX, page), BackRing(NETIF_TX, page)
    data = bytes(range(REQ * 4))
    assert front.send(bytearray(data[:REQ])) == (1, True)
    assert front.send(memoryview(data)[REQ : 2 * REQ]) == (1, False)
    assert front.send(array.array("I", data[2 * REQ :])) == (2, False)  # counted in bytes, not items
    assert back.take_requests(True) == data[:REQ]  # a bool is an int, like min() took it
    assert back.take_requests(2**70) == data[REQ:]
    with pytest.raises(OverflowError):
        back.take_requests(-1)
    with pytest.raises(TypeError):
        back.take_requests("2")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="13 bytes are not whole 12-byte requests"):
        front.send(bytes(13))
    with pytest.raises(TypeError):
        front.send("not a buffer")
    with pytest.raises(TypeError):
        front.send()  # type: ignore[call-arg]


def test_errors_from_the_c_ring_raise_through_the_fast_path() -> None:
    page = bytearray(4096)
    front, back = FrontRing(NETIF_TX, page), BackRing(NETIF_TX, page)
    front.send(bytes(REQ * 2))
    back.take_requests()
    with pytest.raises(ValueError, match="3 responses but only 2 requests await one"):
        back.send(bytes(RSP * 3))
    page[0:4] = (10_000).to_bytes(4, "little")  # a hostile req_prod, far past the ring
    with pytest.raises(RingOverflowError, match="impossible req_prod"):
        back.take_requests()
    front.release()
    back.release()
    with pytest.raises(RingError, match="released"):
        front.send(bytes(REQ))
    with pytest.raises(RingError, match="released"):
        back.take_requests(1)
