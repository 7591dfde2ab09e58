"""netfront for PyGuests: the guest half of the Xen vif split driver.

Protocol (netif.h over two rings, one event channel), following Linux netfront:

* connect: read ``backend``/``backend-id`` from our device directory, wait for the
  backend to reach InitWait, require its ``feature-rx-copy``; allocate and grant the TX
  and RX ring pages, allocate an unbound event channel for the backend, post every RX
  buffer, then write ``tx-ring-ref``, ``rx-ring-ref``, ``event-channel``,
  ``request-rx-copy``, ``feature-rx-notify``, ``feature-sg`` and ``state = Connected``
  in one xenstore transaction (retried on EAGAIN), and wait for the backend's Connected.
* TX: a frame is copied into pages of a TX buffer pool, each page granted read-only to
  the backend once at connect (a persistent pool, like MirageOS's shared page pool);
  a frame longer than a page takes several slots chained with NETTXF_more_data, the
  first slot's size being the whole frame's.  The request id is the pool slot's index,
  so a response's id is range-checked and must name an outstanding slot.
* RX: one granted page per posted buffer, id = buffer index; responses are copied out
  of the ring once; each must name a buffer that is posted (a second response for one
  buffer is a lie: bookkeeping is per id), carry 1..4096 bytes inside its page
  (:func:`pvio.ringbuf.netif.rx_slot_problem`, shared with the C netfront's rules), a packet
  at most 18 slots; data is copied out of the buffer once, and the buffer re-posted.
* Notifications: a push notifies only when the backend's event index asks for it; before
  sleeping the driver runs the final checks, with the TX response event moved ahead to
  half the outstanding requests (notify me when half are done, as Linux does), the RX
  event at the next response (low latency).
* Hostile backend: an impossible producer index, a response id out of range or not
  outstanding, a bad offset or size disconnects the device with a logged reason; the
  guest itself goes on.
* Teardown: Closing -> Closed, grants revoked with the atomic protocol (a grant the
  backend still maps is left alone and counted, never reused).
* A backend that goes away (its driver stopped or crashed: backend Closing, Closed with
  ``online`` still 1): the device is torn down once the backend is Closed (the rings
  unmapped; TX requests it never answered counted ``tx_lost_slots``), goes Closed, then
  Initialising, and runs the handshake again with whichever backend takes the vif next
  (``reconnects``).  A toolstack unplug (``online`` 0) is the guest's hot-plug code's.
"""

from __future__ import annotations

import contextlib
import logging
from typing import TYPE_CHECKING, Any

import trio

from pvio.abi import PAGE_SHIFT, PAGE_SIZE
from pvio.abi.vif import parse_mac
from pvio.core import _frames
from pvio.core._native import ffi as _ffi
from pvio.core._native import lib as _lib
from pvio.core.counters import Counters
from pvio.core.netpath import DATAPATH
from pvio.frontends.nic import GuestNic
from pvio.ringbuf import NETIF_RX, NETIF_TX, FrontRing, RingOverflowError
from pvio.ringbuf.netif import (
    NET_RX_RING_SIZE,
    NET_TX_RING_SIZE,
    NETIF_RSP_NULL,
    NETIF_RSP_OKAY,
    NETRXF_MORE_DATA,
    NETTXF_MORE_DATA,
    RX_PACKET_MAX_SLOTS,
    RX_REQUEST,
    RX_RESPONSE,
    TX_REQUEST,
    TX_RESPONSE,
    XEN_NETIF_MAX_TX_SIZE,
    XEN_NETIF_NR_SLOTS_MIN,
    rx_slot_problem,
)
from pvio.xenstore.store import XenstoreError
from pvio.xenstore.wire import XenbusState

if TYPE_CHECKING:
    from pvio.guest import PyGuest

log = logging.getLogger("pvio.netfront")

NR_TX = NET_TX_RING_SIZE
NR_RX = NET_RX_RING_SIZE
_TX_REQ, _TX_RSP, _RX_REQ, _RX_RSP = TX_REQUEST, TX_RESPONSE, RX_REQUEST, RX_RESPONSE
RX_QUEUE_MAX = 4096  # frames received but not yet read by the application


_NF_FRAME, _NF_PART, _NF_STATUS = _lib.NF_FRAME, _lib.NF_PART, _lib.NF_STATUS
_BYTES = {bytes}
_BUFFERS = (bytes, bytearray, memoryview)
_NF_ERR_ID, _NF_ERR_EMPTY, _NF_ERR_SLOTS = _lib.NF_ERR_ID, _lib.NF_ERR_EMPTY, _lib.NF_ERR_SLOTS


class NetfrontError(Exception):
    """The device failed (handshake refused, or the backend broke the protocol)."""


class _NetfrontPath:
    """The C data path's buffers for one connection: the bookkeeping arrays the C reads and
    writes in place (``tx_outstanding``, ``rx_posted``) and the per-batch outputs."""

    def __init__(self, nic: Netfront) -> None:
        self.outstanding = _ffi.from_buffer(nic.tx_outstanding)
        self.posted = _ffi.from_buffer(nic.rx_posted)
        self.refs = _ffi.new("uint32_t[]", nic.tx_refs)
        self.reqs = _ffi.new("uint8_t[]", NR_TX * _TX_REQ.size)
        self.free_ids = _ffi.new("uint16_t[]", NR_TX)
        self.errs = _ffi.new("int16_t[]", NR_TX)
        self.tx_done = _ffi.new("struct nf_tx_done *")
        self.rec_id = _ffi.new("uint16_t[]", NR_RX)
        self.rec_off = _ffi.new("uint16_t[]", NR_RX)
        self.rec_len = _ffi.new("int32_t[]", NR_RX)
        self.rec_kind = _ffi.new("uint8_t[]", NR_RX)
        self.rec_start = _ffi.new("uint64_t[]", NR_RX)
        self.rec_end = _ffi.new("uint64_t[]", NR_RX)
        self.rx_base = _ffi.new("uint64_t[]", [p << PAGE_SHIFT for p in nic.rx_pages])
        self.tx_base = _ffi.new("uint64_t[]", [p << PAGE_SHIFT for p in nic.tx_pages])
        self.tx_start = _ffi.new("uint64_t[]", NR_TX)
        self.tx_end = _ffi.new("uint64_t[]", NR_TX)
        self.tx_lens = _ffi.new("uint32_t[]", NR_TX)
        self.tx_sids = _ffi.new("uint16_t[]", NR_TX)
        self.mm = nic.guest.domain.mem.mmap  # guest RAM, which _frames copies frames to and from
        self.repost = _ffi.new("uint16_t[]", NR_RX)
        self.rx_refs = _ffi.new("uint32_t[]", nic.rx_refs)
        self.rx_reqs = _ffi.new("uint8_t[]", NR_RX * _RX_REQ.size)
        self.rx_done = _ffi.new("struct nf_rx_done *")
        # The same arrays as buffers, for pvio.core._frames (which takes any buffer).
        self.tx_lens_buf, self.tx_sids_buf = _ffi.buffer(self.tx_lens), _ffi.buffer(self.tx_sids)
        self.tx_start_buf, self.tx_end_buf = _ffi.buffer(self.tx_start), _ffi.buffer(self.tx_end)
        self.rec_start_buf, self.rec_end_buf = _ffi.buffer(self.rec_start), _ffi.buffer(self.rec_end)


class Netfront(GuestNic):
    """One vif of a PyGuest: ``await nic.connect()``, then ``send``/``recv``."""

    error_type = NetfrontError
    log = log
    failure_verb = "disconnected"

    def __init__(self, guest: PyGuest, devid: int = 0) -> None:
        self.guest = guest
        self.devid = devid
        self.dir = f"/local/domain/{guest.domain.domid}/device/vif/{devid}"
        self.name = f"vif{guest.domain.domid}.{devid}"
        self.counters: Counters = guest.hv.counters.new(f"netfront/{self.name}", "device")
        self.mac = b"\x00" * 6
        super().__init__()
        self._wake = trio.Event()
        self._idle = False  # the service task sleeps until an event: the upcall polls inline
        self._partial_rx: list[bytes] = []
        self._closed = False
        self._closing = False  # close() was asked: a backend closing is not a restart
        self._generation = 0  # one per connection: the service task of an older one stops
        self._on_destroy: Any = None
        #: "c" (native/netpath.c's netfront half) or "python" (the reference), from PVIO_DATAPATH.
        self.datapath = DATAPATH
        #: Empty polls (scheduler turns) before the service task re-arms the event indices and
        #: sleeps: Linux's busy polling, with the budget in polls.  While it polls, the backend
        #: sees no armed index and sends no notification.  0 (the default) for a guest sharing
        #: its CPU with the others; a guest with a CPU of its own (in its own process) gains.
        self.busy_poll = 0

    # ------------------------------------------------------------------ handshake
    async def connect(self) -> None:
        """Run the frontend side of the vif handshake up to Connected."""
        g = self.guest
        xb = g.xenbus
        self.backend = await xb.read(f"{self.dir}/backend")
        self.backend_id = int(await xb.read(f"{self.dir}/backend-id"))
        reconnect = await xb.read_state(self.dir) == XenbusState.CLOSED
        if reconnect:  # tell the backend, which is still Closed from the last connection
            await xb.write(f"{self.dir}/state", str(int(XenbusState.INITIALISING)))
        mac_text = await xb.read(f"{self.dir}/mac")
        self.mac = parse_mac(mac_text)
        refused = {XenbusState.CLOSING, XenbusState.CLOSED}
        if reconnect and await self._backend_error() is None:
            state = await xb.wait_for_state(
                f"{self.backend}/state", {XenbusState.INIT_WAIT, XenbusState.CONNECTED}
            )
        else:
            state = await xb.wait_for_state(
                f"{self.backend}/state", {XenbusState.INIT_WAIT, XenbusState.CONNECTED, *refused}
            )
        if state in refused:
            await self._refused()
        if (await xb.read(f"{self.backend}/feature-rx-copy")).strip() != "1":
            raise NetfrontError(f"{self.name}: backend lacks feature-rx-copy")
        self._setup_rings()

        async def write_keys(t: Any) -> None:
            await t.write(f"{self.dir}/tx-ring-ref", str(self.tx_ref))
            await t.write(f"{self.dir}/rx-ring-ref", str(self.rx_ref))
            await t.write(f"{self.dir}/event-channel", str(self.port))
            await t.write(f"{self.dir}/request-rx-copy", "1")
            await t.write(f"{self.dir}/feature-rx-notify", "1")
            await t.write(f"{self.dir}/feature-sg", "1")
            await t.write(f"{self.dir}/state", str(int(XenbusState.CONNECTED)))

        await xb.retry_transaction(write_keys)
        if await xb.wait_for_state(f"{self.backend}/state", {XenbusState.CONNECTED, *refused}) in refused:
            await self._refused()
        self.connected = True
        g.spawn(self._service, name=f"{self.name}-service")
        g.spawn(self._follow_backend, name=f"{self.name}-follow-backend")

    async def _backend_error(self) -> str | None:
        """The reason the backend left when it disabled the device (None: it left none)."""
        try:
            return (await self.guest.xenbus.read(f"{self.backend}/error")).strip()
        except XenstoreError:
            return None

    async def _refused(self) -> None:
        """The backend closed the device instead of connecting: raise with its reason."""
        reason = await self._backend_error() or "no reason given"
        raise NetfrontError(f"{self.name}: the backend ({self.backend}) refused the vif: {reason}")

    def _setup_rings(self) -> None:
        g = self.guest
        be = self.backend_id
        self.tx_gfn = g.alloc_page()
        self.rx_gfn = g.alloc_page()
        self.tx = FrontRing(NETIF_TX, g.page(self.tx_gfn))
        self.rx = FrontRing(NETIF_RX, g.page(self.rx_gfn))
        # The rings export their page views to C.  Let go of them when the domain dies: a
        # memoryview left with an export in a garbage cycle crashes CPython < 3.12's
        # collector (gh-77894: tp_clear drops its buffer, the later release dereferences NULL).
        self._on_destroy = lambda _dom: self._release_rings()
        g.domain.on_destroy.append(self._on_destroy)
        self.tx_ref = g.grant_access(be, self.tx_gfn)
        self.rx_ref = g.grant_access(be, self.rx_gfn)
        self.port = g.evtchn_alloc_unbound(be)
        g.bind_handler(self.port, self._on_event)
        # TX pool: slot i = page tx_pages[i], granted read-only once.
        self.tx_pages = [g.alloc_page() for _ in range(NR_TX)]
        self.tx_views = [g.page(p) for p in self.tx_pages]
        self.tx_refs = [g.grant_access(be, p, readonly=True) for p in self.tx_pages]
        self.tx_free: list[int] = list(range(NR_TX - 1, -1, -1))
        self.tx_outstanding = bytearray(NR_TX)  # 1: the backend holds the slot (C reads it too)
        # RX buffers: id i = page rx_pages[i], granted writable, all posted now.
        self.rx_pages = [g.alloc_page() for _ in range(NR_RX)]
        self.rx_views = [g.page(p) for p in self.rx_pages]
        self.rx_refs = [g.grant_access(be, p) for p in self.rx_pages]
        self._rx_req_bytes = [_RX_REQ.pack(i, 0, self.rx_refs[i]) for i in range(NR_RX)]  # re-posted as is
        self.rx_posted = bytearray(b"\x01" * NR_RX)  # which buffers the backend holds (may answer once)
        self._nf = _NetfrontPath(self)
        self.rx.send(b"".join(self._rx_req_bytes))

    def _release_rings(self) -> None:
        self.tx.release()
        self.rx.release()

    # ------------------------------------------------------------------ events
    def _on_event(self, _port: int) -> None:
        """Upcall handler.  When the service task sleeps, the rings are polled right here (as
        Linux's xen-netfront reaps TX responses in its interrupt handler and its NAPI poll
        follows the interrupt), then the event indices are re-armed; the service task is woken
        only when work is left or the service task is busy.  Never blocks."""
        if not self._idle or not self.connected:
            self._wake.set()
            return
        self._poll()
        if self.busy_poll or self.error is not None or self._arm():
            self._wake.set()  # (busy polling: the service task polls on, the indices unarmed)

    def _arm(self) -> bool:
        """Re-arm both rings' event indices (the final check): whether responses came meanwhile
        (or the backend broke the protocol, which the service task then reports)."""
        try:
            outstanding = NR_TX - len(self.tx_free)
            tx_more = self.tx.final_check_for_responses(max(1, outstanding // 2 + 1) if outstanding else 1)
            rx_more = self.rx.final_check_for_responses(1)
        except RingOverflowError as e:
            self._fail(f"impossible response producer index ({e})")
            return True
        return bool(tx_more or rx_more)

    def _notify(self, notify: bool) -> None:
        if notify:
            self.counters["notifications.sent"] += 1
            self.guest.evtchn_send(self.port)
        else:
            self.counters["notifications.suppressed"] += 1

    async def _service(self) -> None:
        """Reap TX responses and receive frames whenever the backend signals (until the device
        is released: a reconnect starts a service task of its own)."""
        generation = self._generation
        spins = 0
        while self.error is None and not self._closed and self._generation == generation:
            self._wake = trio.Event()
            progress = self._poll()
            if self.error is not None:
                break
            if progress:
                spins = 0
                await trio.lowlevel.checkpoint()
                continue
            if spins < self.busy_poll:  # poll on, not armed: the backend need not notify
                spins += 1
                self.counters["busy_poll.empty_polls"] += 1
                await trio.lowlevel.checkpoint()
                continue
            spins = 0
            # Nothing to do: arm the event indices, re-check (closes the race), then sleep.
            if self._arm():
                continue
            self._idle = True
            try:
                await self._wake.wait()
            finally:
                self._idle = False

    def _poll(self) -> bool:
        try:
            reaped = self._reap_tx()
            received = self._receive()
        except RingOverflowError as e:
            self._fail(f"impossible response producer index ({e})")
            return False
        return bool(reaped or received)

    def _reap_tx(self) -> int:
        data = self.tx.take_responses()
        if not data:
            return 0
        if self.datapath != "c":
            return self._reap_tx_reference(data)
        st = self._nf
        n = len(data) // _TX_RSP.size
        done = st.tx_done
        _lib.pvio_nf_tx_reap(data, n, NR_TX, st.outstanding, st.free_ids, st.errs, done)
        self.tx_free.extend(_ffi.unpack(st.free_ids, done.nfree))
        for k in range(done.nerr):
            self.counters[f"tx_errors.{st.errs[k]}"] += 1
        if done.bad:
            self._fail(f"TX response id {done.arg} is not an outstanding request")
            return int(done.nfree)
        self._tx_space.set()
        return int(done.nfree)

    def _reap_tx_reference(self, data: bytes) -> int:
        """The readable reference of the C reaping (``pvio_nf_tx_reap``)."""
        free = self.tx_free
        outstanding = self.tx_outstanding
        n = 0
        for rid, status in _TX_RSP.iter_unpack(data):
            if status == NETIF_RSP_NULL:  # an extra-info slot's answer: no buffer, no id (as Linux)
                continue
            if rid >= NR_TX or not outstanding[rid]:
                self._fail(f"TX response id {rid} is not an outstanding request")
                return n
            outstanding[rid] = False
            free.append(rid)
            n += 1
            if status not in (NETIF_RSP_OKAY, NETIF_RSP_NULL):
                self.counters[f"tx_errors.{status}"] += 1
        self._tx_space.set()
        return n

    def _receive(self) -> int:
        data = self.rx.take_responses()
        if not data:
            return 0
        if self.datapath != "c":
            return self._receive_reference(data)
        st = self._nf
        done = st.rx_done
        _lib.pvio_nf_rx(
            data, len(data) // _RX_RSP.size, NR_RX, st.posted, len(self._partial_rx), RX_PACKET_MAX_SLOTS,
            st.rec_id, st.rec_off, st.rec_len, st.rec_kind, st.repost, st.rx_base, st.rec_start, st.rec_end,
            done,
        )  # fmt: skip
        nrec = done.nrec
        nrepost = done.nrepost
        frames = self._rx_frames
        simple = not self._partial_rx and _ffi.buffer(st.rec_kind, nrec)[:] == bytes(nrec)
        if simple:  # every record a whole frame (the common case): one copy out of each buffer
            n = min(nrec, max(RX_QUEUE_MAX - len(frames), 0))
            got, copy_bytes = _frames.gather(st.mm, st.rec_start_buf, st.rec_end_buf, n)
            frames.extend(got)
            received, received_bytes, copies = nrec, copy_bytes, n
            if n < nrec:
                self.counters["drops.rx_app_queue_full"] += nrec - n
                received_bytes = sum(_ffi.unpack(st.rec_len, nrec))
        else:
            kinds = _ffi.unpack(st.rec_kind, nrec)
            ids, offs = _ffi.unpack(st.rec_id, nrec), _ffi.unpack(st.rec_off, nrec)
            n, received, received_bytes, copies, copy_bytes = self._assemble(
                ids, offs, _ffi.unpack(st.rec_len, nrec), kinds
            )
        self.counters["guest_copies"] += copies
        self.counters["guest_copy_bytes"] += copy_bytes
        if done.error:
            self._fail(self._rx_error(done))
            self._repost_c(nrepost)
            return n
        if received:
            self.counters["packets.rx"] += received
            self.counters["bytes.rx"] += received_bytes
        self._repost_c(nrepost)
        if n:
            self._rx_ready.set()
        return n or nrepost

    def _repost_c(self, count: int) -> None:
        """:meth:`_repost` of the ``count`` buffer ids ``pvio_nf_rx`` left in the C state."""
        if not count or self.error is not None:
            return
        st = self._nf
        if _lib.pvio_nf_rx_repost(st.repost, count, NR_RX, st.posted, st.rx_refs, st.rx_reqs) < 0:
            self._fail("RX buffer re-posted twice")  # cannot happen: pvio_nf_rx un-posted each id
            return
        _, notify = self.rx.send(_ffi.buffer(st.rx_reqs, count * _RX_REQ.size))
        self._notify(notify)

    def _assemble(
        self, ids: list[int], offs: list[int], lens: list[int], kinds: list[int]
    ) -> tuple[int, int, int, int, int]:
        """Frames from RX slot records with parts or error statuses among them: (frames
        queued, frames received, their bytes, slots copied, bytes copied)."""
        views = self.rx_views
        frames = self._rx_frames
        parts = self._partial_rx
        n = received = received_bytes = copies = copy_bytes = 0
        for rid, off, length, kind in zip(ids, offs, lens, kinds, strict=True):
            if kind == _NF_STATUS:
                self.counters[f"drops.rx_status_{length}"] += 1
                parts.clear()
                continue
            if kind == _NF_FRAME and len(frames) >= RX_QUEUE_MAX:  # no room: dropped, never copied
                self.counters["drops.rx_app_queue_full"] += 1
                received += 1
                received_bytes += length
                continue
            parts.append(views[rid][off : off + length].tobytes())  # copy once, then re-post
            copies += 1
            copy_bytes += length
            if kind == _NF_PART:
                continue
            queued, size = self._complete_frame()
            n += queued
            received += 1
            received_bytes += size
        return n, received, received_bytes, copies, copy_bytes

    def _complete_frame(self) -> tuple[int, int]:
        """The frame the slots in ``_partial_rx`` make, to the application's queue unless it is
        full (then dropped and counted): (1 if queued else 0, its bytes)."""
        parts = self._partial_rx
        if len(parts) == 1:
            frame = parts[0]
        else:  # the slots' copies joined: every byte of the frame copied a second time, counted
            frame = b"".join(parts)
            self.counters["guest_copies"] += 1
            self.counters["guest_copy_bytes"] += len(frame)
        parts.clear()
        if len(self._rx_frames) >= RX_QUEUE_MAX:
            self.counters["drops.rx_app_queue_full"] += 1
            return 0, len(frame)
        self._rx_frames.append(frame)
        return 1, len(frame)

    @staticmethod
    def _rx_error(done: Any) -> str:
        """The reason logged for the protocol error ``pvio_nf_rx`` stopped at (the reference's words)."""
        if done.error == _NF_ERR_ID:
            return f"RX response id {done.arg} is not a posted buffer"
        if done.error == _NF_ERR_SLOTS:
            return f"RX packet of more than {RX_PACKET_MAX_SLOTS} slots"
        problem = rx_slot_problem(done.arg, 0 if done.error == _NF_ERR_EMPTY else done.arg2)
        return problem or "RX response impossible"

    def _receive_reference(self, data: bytes) -> int:
        """The readable reference of the C reaping (``pvio_nf_rx``) and frame assembly."""
        views = self.rx_views
        repost: list[int] = []
        frames = self._rx_frames
        parts = self._partial_rx
        n = received = received_bytes = 0
        posted = self.rx_posted
        for rid, offset, flags, status in _RX_RSP.iter_unpack(data):
            if rid >= NR_RX or not posted[rid]:
                self._fail(f"RX response id {rid} is not a posted buffer")
                self._repost(repost)
                return n
            posted[rid] = False  # back with us: a second response for it is a lie
            repost.append(rid)
            if status < 0:
                self.counters[f"drops.rx_status_{status}"] += 1
                parts.clear()
                continue
            problem = rx_slot_problem(offset, status)
            if problem is not None:
                self._fail(problem)
                self._repost(repost)
                return n
            if not parts and not flags & NETRXF_MORE_DATA and len(frames) >= RX_QUEUE_MAX:
                self.counters["drops.rx_app_queue_full"] += 1  # a whole frame with no room: never copied
                received += 1
                received_bytes += status
                continue
            parts.append(views[rid][offset : offset + status].tobytes())  # copy once, then re-post
            self.counters["guest_copies"] += 1
            self.counters["guest_copy_bytes"] += status
            if flags & NETRXF_MORE_DATA:
                if len(parts) >= RX_PACKET_MAX_SLOTS:
                    self._fail(f"RX packet of more than {RX_PACKET_MAX_SLOTS} slots")
                    self._repost(repost)
                    return n
                continue
            queued, size = self._complete_frame()
            n += queued
            received += 1
            received_bytes += size
        if received:
            self.counters["packets.rx"] += received
            self.counters["bytes.rx"] += received_bytes
        self._repost(repost)
        if n:
            self._rx_ready.set()
        return n or len(repost)

    def _repost(self, ids: list[int]) -> None:
        """Give the buffers ``ids`` back to the backend (each at most once: it was not posted),
        unless the device has failed."""
        if not ids or self.error is not None:
            return
        posted = self.rx_posted
        for i in ids:
            posted[i] = True
        reqs = self._rx_req_bytes
        _, notify = self.rx.send(b"".join([reqs[i] for i in ids]))
        self._notify(notify)

    # ------------------------------------------------------------------ application API
    async def send_batch(self, frames: list[Any]) -> None:
        """Transmit frames, pushing as many per ring push (and notification) as fit."""
        pending = frames
        checked = False  # every frame from pending[i] on is known to be a buffer
        i = 0
        while i < len(pending):
            if self.error is not None or not self.connected:
                raise NetfrontError(f"{self.name}: not connected ({self.error or 'handshake not done'})")
            fast = self._stage_batch(pending, i) if self.datapath == "c" else 0
            if fast:  # (C takes bytes, bytearray and memoryview frames; it stops at anything else)
                i += fast
                continue
            if not checked:
                checked = True
                if not set(map(type, pending[i:])) <= _BYTES:  # e.g. a scapy packet: its bytes
                    rest = [f if isinstance(f, _BUFFERS) else bytes(f) for f in pending[i:]]
                    pending = [*pending[:i], *rest]
                    continue
            reqs = []
            while i < len(pending):
                frame = pending[i]
                size = len(frame)
                if size == 0 or size > XEN_NETIF_MAX_TX_SIZE:
                    raise ValueError(f"{self.name}: cannot send a frame of {size} bytes")
                nslots = -(-size // PAGE_SIZE)
                if nslots > len(self.tx_free) or nslots > XEN_NETIF_NR_SLOTS_MIN:
                    if nslots > XEN_NETIF_NR_SLOTS_MIN:
                        raise ValueError(f"{self.name}: a {size}-byte frame needs {nslots} slots (max 18)")
                    break
                reqs.append(self._stage(frame, size, nslots))
                i += 1
            if reqs:
                _sent, notify = self.tx.send(b"".join(reqs))
                self._notify(notify)
                continue
            await self._wait_tx_space()

    async def _wait_tx_space(self) -> None:
        """The pool is exhausted: reap what has come; if nothing has, arm the TX event index (as
        the service task would before sleeping) and wait for the responses.  The upcall reaps
        them when they come; a busy service task reaps them itself."""
        self._tx_space = trio.Event()
        if self._idle and self.error is None:
            if self._reap_tx() or self.error is not None or self._arm():
                self._wake.set()  # something came meanwhile: the service task takes it
                if self.tx_free:
                    return
        else:
            self._wake.set()
        await self._tx_space.wait()

    def _stage_batch(self, pending: list[Any], i: int) -> int:
        """Stage the one-slot frames from ``pending[i]`` on, as many as the pool holds, and push
        their requests in one ring push: how many went (0: the next frame needs the general path)."""
        free = self.tx_free
        k = min(len(pending) - i, len(free))
        if not k:
            return 0
        st = self._nf
        simple, total = _frames.lengths(pending, i, k, st.tx_lens_buf, PAGE_SIZE)
        if simple < k:  # empty, a frame of several slots, or not bytes: one at a time
            return 0
        _frames.pop_ids(free, k, st.tx_sids_buf)  # the ids free.pop() would give, in that order
        _lib.pvio_nf_tx_reqs(
            st.tx_sids, st.tx_lens, k, st.refs, st.outstanding, st.reqs, st.tx_base, st.tx_start, st.tx_end
        )
        _frames.scatter(st.mm, pending, i, k, st.tx_start_buf, st.tx_end_buf)  # one copy into each pool page
        c = self.counters
        c["packets.tx"] += k
        c["bytes.tx"] += total
        c["guest_copies"] += k
        c["guest_copy_bytes"] += total
        _sent, notify = self.tx.send(_ffi.buffer(st.reqs, k * _TX_REQ.size))
        self._notify(notify)
        return k

    def _stage(self, frame: Any, size: int, nslots: int) -> bytes:
        """Copy a frame into pool pages; return its packed TX requests (first size = total)."""
        free = self.tx_free
        self.counters["packets.tx"] += 1
        self.counters["bytes.tx"] += size
        self.counters["guest_copies"] += nslots
        self.counters["guest_copy_bytes"] += size
        if nslots == 1:  # the common case
            sid = free.pop()
            self.tx_outstanding[sid] = True
            self.tx_views[sid][:size] = frame
            return _TX_REQ.pack(self.tx_refs[sid], 0, 0, sid, size)
        out = []
        for k in range(nslots):
            sid = free.pop()
            self.tx_outstanding[sid] = True
            chunk = frame[k * PAGE_SIZE : (k + 1) * PAGE_SIZE]
            self.tx_views[sid][: len(chunk)] = chunk
            more = NETTXF_MORE_DATA if k + 1 < nslots else 0
            out.append(_TX_REQ.pack(self.tx_refs[sid], 0, more, sid, size if k == 0 else len(chunk)))
        return b"".join(out)

    # ------------------------------------------------------------------ teardown
    async def close(self) -> None:
        """Closing -> wait for the backend -> Closed; revoke every grant that is free."""
        xb = self.guest.xenbus
        self._closing = True
        await xb.write(f"{self.dir}/state", str(int(XenbusState.CLOSING)))
        await xb.wait_for_state(f"{self.backend}/state", {XenbusState.CLOSING, XenbusState.CLOSED})
        self._release()
        await xb.write(f"{self.dir}/state", str(int(XenbusState.CLOSED)))

    def _release(self) -> None:
        """The backend let go (or is letting go) of the device: stop, unbind, revoke every
        grant that is not mapped and give its page back; count what was in flight."""
        self.connected = False
        self._closed = True
        self._generation += 1
        self._wake.set()  # the service task ends
        self._tx_space.set()  # a sender waiting for room sees the device down
        g = self.guest
        g.unbind_handler(self.port)
        with contextlib.suppress(OSError):
            g.evtchn_close(self.port)
        self._release_rings()
        with contextlib.suppress(ValueError):
            g.domain.on_destroy.remove(self._on_destroy)
        in_flight = sum(self.tx_outstanding)
        if in_flight:  # requests the backend never answered: those frames are lost, and counted
            self.counters["tx_lost_slots"] += in_flight
        self._partial_rx = []
        pages = [
            (self.tx_ref, self.tx_gfn),
            (self.rx_ref, self.rx_gfn),
            *zip(self.tx_refs, self.tx_pages, strict=True),
            *zip(self.rx_refs, self.rx_pages, strict=True),
        ]
        kept = 0
        for ref, gfn in pages:  # a page whose grant the backend still maps is never reused
            if g.end_access(ref):
                g.free_page(gfn)
            else:
                kept += 1
        if kept:
            self.counters["grants_still_mapped"] += kept
            log.warning("%s: %d grants still in use by the backend; pages not reused", self.name, kept)

    # ------------------------------------------------------------------ a backend that goes away
    async def _follow_backend(self) -> None:
        """While connected, watch the backend.  If it goes Closing or Closed while the toolstack
        still wants the device (``online`` is not 0) and this side did not ask (its driver
        stopped or crashed), tear the device down once the backend has let go (Closed), go
        Closed, and connect again from Initialising to whichever backend takes the vif next.
        A toolstack unplug (``online`` 0) is left to the guest's hot-plug code."""
        xb = self.guest.xenbus
        gone = {XenbusState.CLOSING, XenbusState.CLOSED, XenbusState.UNKNOWN}
        state = await xb.wait_for_state(f"{self.backend}/state", gone)
        if state == XenbusState.UNKNOWN and not self._closing and self.error is None:
            # The backend's directory is gone with its domain (a driver domain died): as Linux's
            # xen-netfront, the device stays until the toolstack removes it; nothing to follow.
            log.warning("%s: the backend vanished (%s is gone)", self.name, self.backend)
            self.counters["backend_vanished"] += 1
        if self._closing or self.error is not None or state == XenbusState.UNKNOWN:
            return
        try:
            online = (await xb.read(f"{self.backend}/online")).strip()
        except XenstoreError:
            online = "0"
        if online == "0":
            return
        log.warning("%s: the backend is closing (its driver went away); reconnecting", self.name)
        self.counters["backend_lost"] += 1
        self.connected = False
        self._closed = True
        self._wake.set()
        try:
            # Closed: the backend unmapped the rings first.  InitWait: a new backend has already
            # taken over, so the old one has long let go.
            await xb.wait_for_state(
                f"{self.backend}/state", {XenbusState.CLOSED, XenbusState.INIT_WAIT, XenbusState.UNKNOWN}
            )
            with contextlib.suppress(RingOverflowError):
                self._poll()  # what the backend answered before it went is valid: take it
            self._release()
            await xb.write(f"{self.dir}/state", str(int(XenbusState.CLOSED)))
            self._closed = False
            await self.connect()
        except (NetfrontError, XenstoreError) as e:
            self._fail(f"reconnect failed: {e}")
            return
        self.counters["reconnects"] += 1
        log.info("%s: reconnected to the backend", self.name)
