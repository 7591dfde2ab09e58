"""FrontRing and BackRing: the two ends of a Xen shared ring over any writable buffer.

The ring itself (indices, barriers, copies, overflow checks) is C (``ring.c``); these
classes hold its private state and translate between Python bytes and the C batch calls.
Entries travel as packed bytes — ``n * req_size`` or ``n * rsp_size`` — so moving a batch
costs one crossing into C whatever its length.  The two hot calls, ``send`` and the takes,
are methods of small CPython base types (``ringfast.c``) that call ring.c on the same state
without cffi's per-argument conversions; every other call, and every case those fast
methods do not handle (other buffer types, errors), runs the Python code below.  Use the
layout's ``pack_*``/``unpack_*`` to go between bytes and named fields when you need them;
keep them off hot paths.

Operation names follow ring.h (and MirageOS's ring): a producer *writes* entries
privately and *pushes* them (publishes and checks whether the peer wants a notification);
a consumer *takes* entries (each copied out of the shared page once) and, before
sleeping, runs the *final check* that closes the sleep/notify race.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pvio.ringbuf._ringbuf import ffi, lib
from pvio.ringbuf._ringfast import BackCore, FrontCore
from pvio.ringbuf.layout import PAGE_SIZE, RingLayout


class RingError(Exception):
    """Base class of ring errors."""


class RingOverflowError(RingError):
    """The peer published an impossible producer index (a hostile or broken peer).

    Raised instead of reading past the ring: ``RING_REQUEST_PROD_OVERFLOW`` seen by a
    backend, ``RING_RESPONSE_PROD_OVERFLOW`` (or responses to requests never issued) seen
    by a frontend.  The ring is unusable afterwards; disconnect the peer.
    """


def _check(rc: int, what: str) -> int:
    if rc >= 0:
        return rc
    if rc == lib.PVIO_RING_EOVERFLOW:
        raise RingOverflowError(what)
    if rc == lib.PVIO_RING_ERELEASED:
        raise RingError("the ring end has been released")
    raise ValueError(what)


def _entries(data: Any, entry_size: int, what: str) -> tuple[Any, int]:
    """Packed entries as something a ``const char *`` accepts, and how many there are.

    The count comes from the byte length: ``len()`` of a typed buffer (an ``array('Q')``, a
    cast memoryview) counts items, not bytes.
    """
    if type(data) is not bytes:
        data = ffi.from_buffer(data)
    n, rem = divmod(len(data), entry_size)
    if rem:
        raise ValueError(f"{len(data)} bytes are not whole {entry_size}-byte {what}")
    return data, n


def _address(cdata: Any) -> int:
    """The address of C memory cffi owns, for the fast send/take (which keep the cdata alive)."""
    return int(ffi.cast("uintptr_t", cdata))


class _RingEnd:
    """What both ends share: the buffer, its pointer and the header fields for inspection."""

    _state_type = ""

    def __init__(self, layout: RingLayout, buffer: Any, offset: int, size: int) -> None:
        if not isinstance(layout, RingLayout):
            raise TypeError(f"layout must be a RingLayout, not {type(layout).__name__}")
        if offset < 0 or offset % 4:
            raise ValueError(f"ring offset {offset} must be a non-negative multiple of 4")
        self._cbuf = ffi.from_buffer(buffer, require_writable=True)
        if offset + size > len(self._cbuf):
            raise ValueError(
                f"ring of {size} bytes at offset {offset} does not fit in a buffer of {len(self._cbuf)}"
            )
        address = int(ffi.cast("uintptr_t", self._cbuf))
        if address % 4:
            raise ValueError(f"ring memory must be 4-byte aligned: the buffer starts at {address:#x}")
        if layout.nr_ents(size) == 0:
            raise ValueError(f"{size} bytes hold no {layout.ent_size}-byte slot after the 64-byte header")
        self.layout = layout
        self.size = size
        self._buffer = buffer  # keep the memory alive as long as the ring
        self._sring = self._cbuf + offset
        self._r = ffi.new(self._state_type)
        # Hot-path constants, cached so a one-entry call costs as little Python as possible.
        self._req_size = layout.req_size
        self._rsp_size = layout.rsp_size
        self._cap = layout.nr_ents(size)
        self._notify = ffi.new("int *")

    @property
    def nr_ents(self) -> int:
        """RING_SIZE: the number of slots (a power of two)."""
        return int(self._r.nr_ents)

    # The shared header, read for inspection and tests (never for decisions: the C does those).
    @property
    def req_prod(self) -> int:
        return int(self._r.sring.req_prod)

    @property
    def req_event(self) -> int:
        return int(self._r.sring.req_event)

    @property
    def rsp_prod(self) -> int:
        return int(self._r.sring.rsp_prod)

    @property
    def rsp_event(self) -> int:
        return int(self._r.sring.rsp_event)

    def release(self) -> None:
        """Let go of the buffer (an mmap can only be closed once no ring points into it).

        The ring end is unusable afterwards: every operation raises :class:`RingError`
        instead of touching memory that may be gone.  Releasing twice is harmless.
        """
        if self._r.sring != ffi.NULL:
            self._r.sring = ffi.NULL
            ffi.release(self._cbuf)
        self._buffer = None  # nor keep the memory alive: its owner may unmap it now


class FrontRing(_RingEnd, FrontCore):
    """The frontend's end: writes requests, takes responses.

    With ``attach_at=None`` (the default) the shared page is initialised
    (``SHARED_RING_INIT`` + ``FRONT_RING_INIT``); with an index the frontend reconnects to
    a live ring with both private indices at that index (``FRONT_RING_ATTACH``).
    """

    _state_type = "struct pvio_front_ring *"

    def __init__(
        self,
        layout: RingLayout,
        buffer: Any,
        offset: int = 0,
        size: int = PAGE_SIZE,
        *,
        attach_at: int | None = None,
    ) -> None:
        super().__init__(layout, buffer, offset, size)
        L = layout
        if attach_at is None:
            rc = lib.pvio_front_init(self._r, self._sring, size, L.ent_size, L.req_size, L.rsp_size)
        else:
            idx = attach_at & 0xFFFFFFFF
            rc = lib.pvio_front_attach(self._r, self._sring, size, L.ent_size, L.req_size, L.rsp_size, idx)
        _check(rc, f"cannot set up a {L.name} front ring")
        self._out = ffi.new("char[]", self.nr_ents * L.rsp_size)
        self._c_send = lib.pvio_front_send
        self._c_take = lib.pvio_front_take_responses
        self._bind(
            _address(self._r), _address(self._out), L.req_size, L.rsp_size, self._cap, (self._r, self._out)
        )

    @property
    def req_prod_pvt(self) -> int:
        """Requests written (published or not)."""
        return int(self._r.req_prod_pvt)

    @property
    def rsp_cons(self) -> int:
        """Responses consumed."""
        return int(self._r.rsp_cons)

    @property
    def free_requests(self) -> int:
        """RING_FREE_REQUESTS: slots available for new requests."""
        return int(lib.pvio_front_free_requests(self._r))

    def write_requests(self, data: Any) -> int:
        """Write packed requests into free slots without publishing them; returns the count.

        Raises ValueError if they do not all fit (see :attr:`free_requests`).
        """
        data, n = _entries(data, self.layout.req_size, "requests")
        return _check(
            lib.pvio_front_put_requests(self._r, data, n),
            f"{n} requests do not fit: {self.free_requests} slots free",
        )

    def push_requests(self) -> bool:
        """RING_PUSH_REQUESTS_AND_CHECK_NOTIFY: publish; True if the backend must be notified."""
        return bool(_check(lib.pvio_front_push_requests(self._r), "cannot push requests"))

    def _send_slow(self, data: Any) -> tuple[int, bool]:
        """``send`` for what the fast path does not take (see :meth:`send`).

        Write as many of the packed requests as fit and publish them, in one call.
        Returns (requests sent, notify).  Requests beyond the free slots are not sent.
        """
        size = self._req_size
        n = len(data) // size
        if type(data) is not bytes or n * size != len(data):
            data, n = _entries(data, size, "requests")
        sent = self._c_send(self._r, data, n, self._notify)
        if sent < 0:
            _check(sent, "cannot send")
        return sent, self._notify[0] != 0

    def unconsumed_responses(self) -> int:
        """RING_HAS_UNCONSUMED_RESPONSES. Raises RingOverflowError for an impossible rsp_prod."""
        return _check(lib.pvio_front_unconsumed_responses(self._r), "impossible rsp_prod from the backend")

    if TYPE_CHECKING:  # the fast versions are FrontCore's (C); these say what they do

        def send(self, data: Any) -> tuple[int, bool]:
            """Write as many of the packed requests as fit and publish them, in one call.

            Returns (requests sent, notify).  Requests beyond the free slots are not sent.
            """
            ...

        def take_responses(self, max_n: int | None = None) -> bytes:
            """Copy up to ``max_n`` (default: all) published responses out of the ring, once each.

            Returns their packed bytes (``n * rsp_size``).  Raises RingOverflowError if the
            backend's rsp_prod is impossible; nothing is consumed then.
            """
            ...

    def _take_slow(self, max_n: int | None = None) -> bytes:
        """``take_responses`` for what the fast path does not take: errors, odd ``max_n``."""
        n = self._c_take(self._r, self._out, self._cap if max_n is None else min(max_n, self._cap))
        if n < 0:
            _check(n, "impossible rsp_prod from the backend")
        return ffi.unpack(self._out, n * self._rsp_size)

    def final_check_for_responses(self, ahead: int = 1) -> int:
        """RING_FINAL_CHECK_FOR_RESPONSES: run before sleeping; returns responses waiting.

        When none wait it sets rsp_event = rsp_cons + ahead (ring.h uses 1; a larger value
        asks to be woken only after that many responses, batching notifications), then
        re-checks so a response published meanwhile is not slept through.
        """
        return _check(
            lib.pvio_front_final_check_for_responses(self._r, ahead), "impossible rsp_prod from the backend"
        )


class BackRing(_RingEnd, BackCore):
    """The backend's end: takes requests, writes responses into the slots they used.

    ``attach_at`` (default 0, i.e. ``BACK_RING_INIT``) sets both private indices; the
    backend never initialises the shared page.
    """

    _state_type = "struct pvio_back_ring *"

    def __init__(
        self,
        layout: RingLayout,
        buffer: Any,
        offset: int = 0,
        size: int = PAGE_SIZE,
        *,
        attach_at: int = 0,
    ) -> None:
        super().__init__(layout, buffer, offset, size)
        L = layout
        rc = lib.pvio_back_attach(
            self._r, self._sring, size, L.ent_size, L.req_size, L.rsp_size, attach_at & 0xFFFFFFFF
        )
        _check(rc, f"cannot set up a {L.name} back ring")
        self._out = ffi.new("char[]", self.nr_ents * L.req_size)
        self._c_send = lib.pvio_back_send
        self._c_take = lib.pvio_back_take_requests
        self._bind(
            _address(self._r), _address(self._out), L.rsp_size, L.req_size, self._cap, (self._r, self._out)
        )

    @property
    def rsp_prod_pvt(self) -> int:
        """Responses written (published or not)."""
        return int(self._r.rsp_prod_pvt)

    @property
    def req_cons(self) -> int:
        """Requests consumed."""
        return int(self._r.req_cons)

    def unconsumed_requests(self) -> int:
        """RING_HAS_UNCONSUMED_REQUESTS, capped by free response slots.

        Raises RingOverflowError for an impossible req_prod (RING_REQUEST_PROD_OVERFLOW).
        """
        return _check(lib.pvio_back_unconsumed_requests(self._r), "impossible req_prod from the frontend")

    if TYPE_CHECKING:  # the fast versions are BackCore's (C); these say what they do

        def take_requests(self, max_n: int | None = None) -> bytes:
            """Copy up to ``max_n`` (default: all) published requests out of the ring, once each.

            Returns their packed bytes (``n * req_size``): validate and use only these.
            Raises RingOverflowError if the frontend's req_prod is impossible.
            """
            ...

        def send(self, data: Any) -> tuple[int, bool]:
            """Write the packed responses and publish them in one call: (count, notify)."""
            ...

    def _take_slow(self, max_n: int | None = None) -> bytes:
        """``take_requests`` for what the fast path does not take: errors, odd ``max_n``."""
        n = self._c_take(self._r, self._out, self._cap if max_n is None else min(max_n, self._cap))
        if n < 0:
            _check(n, "impossible req_prod from the frontend")
        return ffi.unpack(self._out, n * self._req_size)

    def write_responses(self, data: Any) -> int:
        """Write packed responses into the slots of taken requests, in order; not published."""
        data, n = _entries(data, self.layout.rsp_size, "responses")
        return _check(
            lib.pvio_back_put_responses(self._r, data, n),
            f"{n} responses but only {self.req_cons - self.rsp_prod_pvt} requests await one",
        )

    def push_responses(self) -> bool:
        """RING_PUSH_RESPONSES_AND_CHECK_NOTIFY: publish; True if the frontend must be notified."""
        return bool(_check(lib.pvio_back_push_responses(self._r), "cannot push responses"))

    def _send_slow(self, data: Any) -> tuple[int, bool]:
        """``send`` for what the fast path does not take: write and publish the packed responses."""
        size = self._rsp_size
        n = len(data) // size
        if type(data) is not bytes or n * size != len(data):
            data, n = _entries(data, size, "responses")
        sent = self._c_send(self._r, data, n, self._notify)
        if sent < 0:
            _check(sent, f"{n} responses but only {self.req_cons - self.rsp_prod_pvt} requests await one")
        return sent, self._notify[0] != 0

    def final_check_for_requests(self, ahead: int = 1) -> int:
        """RING_FINAL_CHECK_FOR_REQUESTS: run before sleeping; returns requests waiting.

        When none wait it sets req_event = req_cons + ahead and re-checks (see
        :meth:`FrontRing.final_check_for_responses`).
        """
        return _check(
            lib.pvio_back_final_check_for_requests(self._r, ahead), "impossible req_prod from the frontend"
        )
