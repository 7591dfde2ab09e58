"""Differential test: the C ring against the pure-Python model in ``tests/ringmodel.py``.

A hypothesis state machine drives a C FrontRing+BackRing on one page and the model's
front+back on another with the same operations, and after every step requires the two
pages to be equal byte for byte and every return value (or error kind) and private index
to agree.  Rings are set up fresh (index 0) or attached to a live ring at an index near
2**32, so indices wrap during a run; geometries range from one slot to a full netif page.
Hostile rules scribble producer indices, event indices and slots identically on both
pages, so the overflow paths are compared too, not only the happy path.

``PVIO_FUZZ=1`` (``make fuzz``) runs many more and longer examples.
"""

from __future__ import annotations

import os
import random
import struct
from collections.abc import Callable
from typing import Any

from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from pvio.ringbuf import NETIF_RX, NETIF_TX, BackRing, FrontRing, RingLayout, RingOverflowError
from tests import ringmodel
from tests.ringmodel import ModelBack, ModelFront, ModelOverflowError

FUZZ = os.environ.get("PVIO_FUZZ") == "1"
U32 = 1 << 32

# (layout, ring bytes): nr_ents from 1 slot to a full 256-slot netif page.
GEOMETRIES = [
    (NETIF_TX, 4096),  # 12-byte slots, 256 of them
    (NETIF_RX, 64 + 8 * 8),  # 8 slots
    (NETIF_TX, 64 + 12 * 7),  # 7 fit, rounded down to 4
    (RingLayout.generic("odd", 5, 9), 64 + 12 * 3),  # 12-byte slots (9 rounded to 4), 2 slots
    (RingLayout.generic("wide", 16, 16), 64 + 16),  # a single slot
    (RingLayout.generic("bytes", 1, 1, align=1), 64 + 16),  # 1-byte slots, 16 of them
]

START_INDICES = st.one_of(
    st.none(),  # SHARED_RING_INIT + FRONT_RING_INIT
    st.sampled_from([0, 1, U32 - 1, U32 - 2, U32 - 5, U32 - 200, (1 << 31) - 3]),
    st.integers(0, U32 - 1),
)

Outcome = tuple[Any, ...]


def outcome(call: Callable[[], Any]) -> Outcome:
    """The result of a call, or the kind of error it raised, in a form both sides share."""
    try:
        return ("ok", call())
    except (RingOverflowError, ModelOverflowError):
        return ("overflow",)
    except ValueError:
        return ("misuse",)


def first_difference(a: bytes | bytearray, b: bytes | bytearray) -> int:
    return next(i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y)


class RingVersusModel(RuleBasedStateMachine):
    """The C ring and the model, moved in lockstep over two identical pages."""

    def __init__(self) -> None:
        super().__init__()
        self.front: FrontRing
        self.back: BackRing
        self.mfront: ModelFront
        self.mback: ModelBack

    @initialize(
        geometry=st.sampled_from(GEOMETRIES),
        start=START_INDICES,
        offset=st.sampled_from([0, 4, 64, 100]),
        seed=st.integers(0, 2**32),
    )
    def set_up(self, geometry: tuple[RingLayout, int], start: int | None, offset: int, seed: int) -> None:
        layout, ring_bytes = geometry
        self.layout = layout
        self.offset = offset
        # Random bytes everywhere, 16 spare bytes past the ring: nothing may write outside it.
        fill = random.Random(seed).randbytes(offset + ring_bytes + 16)
        self.page_c = bytearray(fill)
        self.page_m = bytearray(fill)
        self.nr = ringmodel.nr_ents(ring_bytes, layout.ent_size)
        args = (offset, ring_bytes, layout.ent_size, layout.req_size, layout.rsp_size)
        if start is not None:
            # A live ring to reconnect to: both producers at `start`, events one past it.
            for page in (self.page_c, self.page_m):
                struct.pack_into("<IIII", page, offset, start, (start + 1) % U32, start, (start + 1) % U32)
        self.front = FrontRing(layout, self.page_c, offset, ring_bytes, attach_at=start)
        self.back = BackRing(layout, self.page_c, offset, ring_bytes, attach_at=start or 0)
        self.mfront = ModelFront(self.page_m, *args, attach_at=start)
        self.mback = ModelBack(self.page_m, *args, attach_at=start or 0)
        assert self.front.nr_ents == self.nr

    # ---- helpers ---------------------------------------------------------------------------

    def same(self, c: Callable[[], Any], m: Callable[[], Any]) -> Any:
        got_c, got_m = outcome(c), outcome(m)
        assert got_c == got_m, f"C ring {got_c!r} != model {got_m!r}"
        # Coverage labels (--hypothesis-show-statistics): which outcomes were compared.
        result = got_c[1] if got_c[0] == "ok" else None
        notify = f" notify={result[1]}" if isinstance(result, tuple) else ""
        event(f"{got_c[0]}{notify}")
        if self.front.req_prod_pvt < self.front.rsp_cons or self.back.req_cons < self.back.rsp_prod_pvt:
            event("indices wrapped past 2**32")
        return got_c

    def entries(self, data: st.DataObject, size: int, most: int) -> bytes:
        n = data.draw(st.integers(0, most), label="entries")
        return random.Random(data.draw(st.integers(0, 2**32), label="seed")).randbytes(n * size)

    def max_n(self, data: st.DataObject) -> int | None:
        return data.draw(st.none() | st.integers(0, self.nr + 1), label="max_n")

    # ---- frontend --------------------------------------------------------------------------

    @rule(data=st.data())
    def front_write_requests(self, data: st.DataObject) -> None:
        # Up to one more than fits, so the "does not fit" error is compared as well.
        reqs = self.entries(data, self.layout.req_size, self.mfront.free_requests + 1)
        self.same(lambda: self.front.write_requests(reqs), lambda: self.mfront.write_requests(reqs))

    @rule()
    def front_push_requests(self) -> None:
        self.same(self.front.push_requests, self.mfront.push_requests)

    @rule(data=st.data())
    def front_send(self, data: st.DataObject) -> None:
        reqs = self.entries(data, self.layout.req_size, self.nr + 2)
        self.same(lambda: self.front.send(reqs), lambda: self.mfront.send(reqs))

    @rule(data=st.data())
    def front_take_responses(self, data: st.DataObject) -> None:
        n = self.max_n(data)
        self.same(lambda: self.front.take_responses(n), lambda: self.mfront.take_responses(n))

    @rule()
    def front_unconsumed_responses(self) -> None:
        self.same(self.front.unconsumed_responses, self.mfront.unconsumed_responses)

    @rule(ahead=st.integers(0, 3) | st.integers(0, U32 - 1))
    def front_final_check(self, ahead: int) -> None:
        self.same(
            lambda: self.front.final_check_for_responses(ahead),
            lambda: self.mfront.final_check_for_responses(ahead),
        )

    # ---- backend ---------------------------------------------------------------------------

    @rule(data=st.data())
    def back_take_requests(self, data: st.DataObject) -> None:
        n = self.max_n(data)
        self.same(lambda: self.back.take_requests(n), lambda: self.mback.take_requests(n))

    @rule()
    def back_unconsumed_requests(self) -> None:
        self.same(self.back.unconsumed_requests, self.mback.unconsumed_requests)

    @rule(data=st.data())
    def back_write_responses(self, data: st.DataObject) -> None:
        awaiting = (self.mback.req_cons - self.mback.rsp_prod_pvt) % U32
        rsps = self.entries(data, self.layout.rsp_size, awaiting + 1)
        self.same(lambda: self.back.write_responses(rsps), lambda: self.mback.write_responses(rsps))

    @rule()
    def back_push_responses(self) -> None:
        self.same(self.back.push_responses, self.mback.push_responses)

    @rule(data=st.data())
    def back_send(self, data: st.DataObject) -> None:
        awaiting = (self.mback.req_cons - self.mback.rsp_prod_pvt) % U32
        rsps = self.entries(data, self.layout.rsp_size, awaiting + 1)
        self.same(lambda: self.back.send(rsps), lambda: self.mback.send(rsps))

    @rule(ahead=st.integers(0, 3) | st.integers(0, U32 - 1))
    def back_final_check(self, ahead: int) -> None:
        self.same(
            lambda: self.back.final_check_for_requests(ahead),
            lambda: self.mback.final_check_for_requests(ahead),
        )

    @rule(data=st.data())
    def misshapen_entries(self, data: st.DataObject) -> None:
        """Byte strings that are not whole entries are refused by every writer, on both sides."""
        junk = bytes(data.draw(st.integers(1, 3 * self.layout.ent_size), label="bytes"))
        if len(junk) % self.layout.req_size:
            self.same(lambda: self.front.write_requests(junk), lambda: self.mfront.write_requests(junk))
            assert self.same(lambda: self.front.send(junk), lambda: self.mfront.send(junk)) == ("misuse",)
        if len(junk) % self.layout.rsp_size:
            self.same(lambda: self.back.write_responses(junk), lambda: self.mback.write_responses(junk))
            assert self.same(lambda: self.back.send(junk), lambda: self.mback.send(junk)) == ("misuse",)

    # ---- hostile peers: the same scribble on both pages ------------------------------------

    def scribble_word(self, at: int, value: int) -> None:
        for page in (self.page_c, self.page_m):
            struct.pack_into("<I", page, self.offset + at, value % U32)

    def near_or_anywhere(self, data: st.DataObject, around: int) -> int:
        """A u32 close to ``around`` (just inside and just outside the legal range) or anything."""
        delta = st.integers(-self.nr - 2, self.nr + 2).map(lambda d: around + d)
        return data.draw(delta | st.integers(0, U32 - 1), label="value") % U32

    @rule(data=st.data())
    def hostile_front_sets_req_prod(self, data: st.DataObject) -> None:
        self.scribble_word(ringmodel.REQ_PROD, self.near_or_anywhere(data, self.mback.rsp_prod_pvt))

    @rule(data=st.data())
    def hostile_back_sets_rsp_prod(self, data: st.DataObject) -> None:
        self.scribble_word(ringmodel.RSP_PROD, self.near_or_anywhere(data, self.mfront.rsp_cons))

    @rule(data=st.data(), which=st.sampled_from([ringmodel.REQ_EVENT, ringmodel.RSP_EVENT]))
    def hostile_peer_sets_event(self, data: st.DataObject, which: int) -> None:
        around = self.mback.req_cons if which == ringmodel.REQ_EVENT else self.mfront.rsp_cons
        self.scribble_word(which, self.near_or_anywhere(data, around))

    @rule(data=st.data())
    def hostile_peer_rewrites_slot(self, data: st.DataObject) -> None:
        i = data.draw(st.integers(0, self.nr - 1), label="slot")
        junk = data.draw(st.binary(min_size=1, max_size=self.layout.ent_size), label="junk")
        at = self.offset + ringmodel.HEADER_SIZE + i * self.layout.ent_size
        for page in (self.page_c, self.page_m):
            page[at : at + len(junk)] = junk

    # ---- after every step ------------------------------------------------------------------

    @invariant()
    def pages_are_identical(self) -> None:
        if self.page_c != self.page_m:
            at = first_difference(self.page_c, self.page_m)
            raise AssertionError(
                f"pages differ first at byte {at}: C {self.page_c[at]} model {self.page_m[at]}"
            )

    @invariant()
    def private_indices_agree(self) -> None:
        c = (self.front.req_prod_pvt, self.front.rsp_cons, self.back.rsp_prod_pvt, self.back.req_cons)
        m = (self.mfront.req_prod_pvt, self.mfront.rsp_cons, self.mback.rsp_prod_pvt, self.mback.req_cons)
        assert c == m
        assert self.front.free_requests == self.mfront.free_requests


RingVersusModel.TestCase.settings = settings(
    max_examples=1500 if FUZZ else 200,
    stateful_step_count=100 if FUZZ else 50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
TestRingVersusModel = RingVersusModel.TestCase
