"""A pure-Python reference model of a Xen shared ring, for differential tests of the C ring.

Written from Xen's ``io/ring.h`` semantics, not from ``ring.c``: the header is
four little-endian u32 words at Xen's offsets (req_prod @0, req_event @4, rsp_prod @8,
rsp_event @12) then a protocol-private word and padding up to 64 bytes; slot ``idx`` lives
at ``64 + (idx mod nr_ents) * ent_size``.  Every index is kept as an ordinary Python int
reduced modulo 2**32, and every comparison is done on unwrapped distances, so the model
states each rule in the plainest arithmetic there is.

The model mirrors the public operations of :class:`pvio.ringbuf.FrontRing` and
:class:`pvio.ringbuf.BackRing` (init/attach, write, push-and-check-notify, send, take,
unconsumed counts, final check with ``ahead``) and their two error kinds: a peer's
impossible producer index raises :class:`ModelOverflowError`, API misuse raises
``ValueError``.  It imports nothing from ``ringbuf`` on purpose, so it cannot inherit a bug.
"""

from __future__ import annotations

import struct

HEADER_SIZE = 64
U32 = 1 << 32

# Header word offsets, as DEFINE_RING_TYPES lays out the shared ring.
REQ_PROD = 0
REQ_EVENT = 4
RSP_PROD = 8
RSP_EVENT = 12
PVT = 16

_WORD = struct.Struct("<I")


class ModelOverflowError(Exception):
    """The peer's producer index is impossible (the model's RingOverflowError)."""


def nr_ents(ring_bytes: int, ent_size: int) -> int:
    """Slots after the 64-byte header, rounded down to a power of two (__RING_SIZE)."""
    if ring_bytes < HEADER_SIZE or ent_size <= 0:
        return 0
    fit = (ring_bytes - HEADER_SIZE) // ent_size
    if fit == 0:
        return 0
    return 1 << (fit.bit_length() - 1)


def dist(later: int, earlier: int) -> int:
    """How far ``later`` is ahead of ``earlier`` on the 2**32 circle (0 .. 2**32-1)."""
    return (later - earlier) % U32


class _ModelEnd:
    """The shared page and geometry both ends see."""

    def __init__(self, page: bytearray, offset: int, size: int, ent: int, req: int, rsp: int) -> None:
        self.page = page
        self.base = offset
        self.ent_size = ent
        self.req_size = req
        self.rsp_size = rsp
        self.nr_ents = nr_ents(size, ent)
        if self.nr_ents == 0 or offset % 4 or offset + size > len(page):
            raise ValueError("model ring does not fit")

    def word(self, at: int) -> int:
        return _WORD.unpack_from(self.page, self.base + at)[0]

    def set_word(self, at: int, value: int) -> None:
        _WORD.pack_into(self.page, self.base + at, value % U32)

    def slot_offset(self, idx: int) -> int:
        return self.base + HEADER_SIZE + (idx % self.nr_ents) * self.ent_size

    def put_slot(self, idx: int, data: bytes) -> None:
        """Write an entry into the start of its slot; the slot's other bytes keep their value."""
        at = self.slot_offset(idx)
        self.page[at : at + len(data)] = data

    def get_slot(self, idx: int, size: int) -> bytes:
        at = self.slot_offset(idx)
        return bytes(self.page[at : at + size])

    def push(self, prod_at: int, event_at: int, new: int) -> bool:
        """Publish ``new`` as the producer index; True when the peer's event is in (old, new]."""
        old = self.word(prod_at)
        self.set_word(prod_at, new)
        published = dist(new, old)
        event_after_old = dist(self.word(event_at), old)
        return 0 < event_after_old <= published


class ModelFront(_ModelEnd):
    """The frontend: writes requests, takes responses."""

    def __init__(
        self,
        page: bytearray,
        offset: int,
        size: int,
        ent: int,
        req: int,
        rsp: int,
        attach_at: int | None = None,
    ) -> None:
        super().__init__(page, offset, size, ent, req, rsp)
        start = 0 if attach_at is None else attach_at % U32
        self.req_prod_pvt = start
        self.rsp_cons = start
        if attach_at is None:
            # SHARED_RING_INIT: producers 0, events 1, private word and padding zero.
            self.set_word(REQ_PROD, 0)
            self.set_word(RSP_PROD, 0)
            self.set_word(REQ_EVENT, 1)
            self.set_word(RSP_EVENT, 1)
            at = self.base + PVT
            self.page[at : self.base + HEADER_SIZE] = bytes(HEADER_SIZE - PVT)

    @property
    def free_requests(self) -> int:
        return self.nr_ents - dist(self.req_prod_pvt, self.rsp_cons)

    def write_requests(self, data: bytes) -> int:
        n, rem = divmod(len(data), self.req_size)
        if rem or n > self.free_requests:
            raise ValueError("requests do not fit")
        for i in range(n):
            self.put_slot(self.req_prod_pvt, data[i * self.req_size : (i + 1) * self.req_size])
            self.req_prod_pvt = (self.req_prod_pvt + 1) % U32
        return n

    def push_requests(self) -> bool:
        return self.push(REQ_PROD, REQ_EVENT, self.req_prod_pvt)

    def send(self, data: bytes) -> tuple[int, bool]:
        n, rem = divmod(len(data), self.req_size)
        if rem:
            raise ValueError("not whole requests")
        n = min(n, self.free_requests)
        self.write_requests(data[: n * self.req_size])
        return n, (self.push_requests() if n else False)

    def unconsumed_responses(self) -> int:
        """Published responses not yet taken; the backend may only answer requests we issued."""
        ready = dist(self.word(RSP_PROD), self.rsp_cons)
        issued = dist(self.req_prod_pvt, self.rsp_cons)
        if ready > self.nr_ents or ready > issued:
            raise ModelOverflowError("rsp_prod")
        return ready

    def take_responses(self, max_n: int | None = None) -> bytes:
        ready = self.unconsumed_responses()
        n = ready if max_n is None else min(ready, max_n)
        out = []
        for _ in range(n):
            out.append(self.get_slot(self.rsp_cons, self.rsp_size))
            self.rsp_cons = (self.rsp_cons + 1) % U32
        return b"".join(out)

    def final_check_for_responses(self, ahead: int = 1) -> int:
        ready = self.unconsumed_responses()
        if ready:
            return ready
        # ahead 0 would set rsp_event = rsp_cons, which no push can ever pass: treat it as 1.
        self.set_word(RSP_EVENT, self.rsp_cons + (ahead or 1))
        return self.unconsumed_responses()


class ModelBack(_ModelEnd):
    """The backend: takes requests, writes responses into the slots the requests used."""

    def __init__(
        self, page: bytearray, offset: int, size: int, ent: int, req: int, rsp: int, attach_at: int = 0
    ) -> None:
        super().__init__(page, offset, size, ent, req, rsp)
        self.rsp_prod_pvt = attach_at % U32
        self.req_cons = attach_at % U32

    def unconsumed_requests(self) -> int:
        """Published requests not yet taken, capped by the response slots left (RING_HAS_UNCONSUMED_REQUESTS).

        Impossible: req_prod more than a ring ahead of our responses
        (RING_REQUEST_PROD_OVERFLOW), or behind the requests we already took.
        """
        req_prod = self.word(REQ_PROD)
        unanswered = dist(req_prod, self.rsp_prod_pvt)
        taken = dist(self.req_cons, self.rsp_prod_pvt)
        if unanswered > self.nr_ents or unanswered < taken:
            raise ModelOverflowError("req_prod")
        return min(dist(req_prod, self.req_cons), self.nr_ents - taken)

    def take_requests(self, max_n: int | None = None) -> bytes:
        ready = self.unconsumed_requests()
        n = ready if max_n is None else min(ready, max_n)
        out = []
        for _ in range(n):
            out.append(self.get_slot(self.req_cons, self.req_size))
            self.req_cons = (self.req_cons + 1) % U32
        return b"".join(out)

    def write_responses(self, data: bytes) -> int:
        n, rem = divmod(len(data), self.rsp_size)
        if rem or n > dist(self.req_cons, self.rsp_prod_pvt):
            raise ValueError("more responses than requests taken")
        for i in range(n):
            self.put_slot(self.rsp_prod_pvt, data[i * self.rsp_size : (i + 1) * self.rsp_size])
            self.rsp_prod_pvt = (self.rsp_prod_pvt + 1) % U32
        return n

    def push_responses(self) -> bool:
        return self.push(RSP_PROD, RSP_EVENT, self.rsp_prod_pvt)

    def send(self, data: bytes) -> tuple[int, bool]:
        n = self.write_responses(data)
        return n, (self.push_responses() if n else False)

    def final_check_for_requests(self, ahead: int = 1) -> int:
        ready = self.unconsumed_requests()
        if ready:
            return ready
        self.set_word(REQ_EVENT, self.req_cons + (ahead or 1))
        return self.unconsumed_requests()
