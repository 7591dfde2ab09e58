"""netback: the dom0 half of the Xen vif split driver, attached to the virtual switch.

One :class:`NetBack` runs in the backend domain (dom0).  It watches
``/local/domain/<self>/backend/vif`` for devices the toolstack creates and runs a
:class:`BackendVif` for each, following Linux netback's sequence (``io/netif.h``, ``io/xenbus.h``):
write the features (``feature-sg``, ``feature-rx-copy``, ...) and go InitWait; when the
frontend is Connected (or Initialised), read its keys, refuse it without
``request-rx-copy = 1``, map both ring pages, bind the event channel, go Connected and
join the switch, locked to the ``mac`` the toolstack configured in the backend directory (a
frame with another source MAC is dropped, ``drops.spoofed_mac``; see
:mod:`pvio.backends.switch`).

TX (guest -> switch), per batch: take every published request (each copied out of the
shared page once), group them into packets (first slot's size is the total, more_data
chains, extra-info slots answered NULL), validate each packet (id < ring size, offset +
size <= 4096 per slot, at most 18 slots, sizes adding up), grant-copy every valid slot
into the vif's TX area (its dom0 staging pages) in *one* batched hypercall, answer every
slot (OKAY / ERROR), push the responses (one notification at most), and hand the frames to
the switch as one :class:`~pvio.core.netpath.FrameBatch` (or as ``bytes`` to a custom
backend hook).  The per-packet steps are C (``pvio/core/native/netpath.c``) or, with
``PVIO_DATAPATH=python``, their Python reference (:mod:`pvio.core.netpath`).

RX (switch -> guest): frames of a batch go straight from the sender's TX area into the
guest's posted buffers when nothing waits before them; the others wait in the vif's RX queue
(a copy into its own dom0 pages, bounded in frames and bytes; overflow is counted as
``drops.rx_queue_full``, XSA-392) until the guest posts buffers, then go out in one grant
copy, each response written in the slot of the request it answers.

Errors: a bad grant, a slot crossing its page or inconsistent sizes fail that packet
(ERROR responses, ``drops.<reason>``, a logged reason).  A frontend that is clearly
broken or hostile — an impossible req_prod, an id outside the ring, more than
``fatal_slots`` slots in a packet — disables the vif: it leaves the switch, its rings
are unmapped and its state goes Closed, with the reason logged and counted.  Other vifs
are untouched.

Reconnect: a frontend that closes cleanly (Closing/Closed) is torn down and the backend
goes Closed; if the frontend then comes back in Initialising (Linux's xen-netfront after
an unbind and bind), the vif prepares for reconnect as Linux netback does: features
again, InitWait, a fresh handshake (``reconnects``).  Split event channels are offered
(``event-channel-tx``/``-rx``; a frontend that writes ``event-channel`` gets one), and
multi-queue is not (no ``multi-queue-max-queues``), so Linux falls back to one queue; a
frontend asking for several queues or a control ring is refused (XSA-270).

Restart: when netback stops or crashes, every vif it served lets go of its guest and goes
Closing, Closed (as a Linux backend whose driver is unbound).  A new netback takes over
each vif left Closed once its frontend is back in Initialising, and probes it afresh.
"""

from __future__ import annotations

import contextlib
import logging
from collections import deque
from typing import TYPE_CHECKING, Any

import trio

from pvio.abi import GNTTAB_COPY, PAGE_SIZE, GntSt, GnttabOp, Hypercall
from pvio.abi.vif import parse_mac
from pvio.backend_api import Backend, BackendContext, BackendError, BackendHost, load_backend
from pvio.backends.switch import Switch, SwitchPort
from pvio.core import netpath
from pvio.core._native import ffi
from pvio.core.hypervisor import own_error
from pvio.core.netpath import Area, FrameBatch, RxQueue
from pvio.core.ratelimit import LogLimiter
from pvio.guest import SCRATCH_PAGES, XenError
from pvio.ringbuf import NETIF_RX, NETIF_TX, BackRing, RingOverflowError
from pvio.ringbuf.netif import (
    NET_RX_RING_SIZE,
    NET_TX_RING_SIZE,
    RX_REQUEST,
    RX_RESPONSE,
    TX_REQUEST,
    TX_RESPONSE,
    XEN_NETIF_NR_SLOTS_MIN,
    tx_slot_problem,
)
from pvio.xenstore.store import XenstoreError
from pvio.xenstore.wire import XenbusState

if TYPE_CHECKING:
    from pvio.guest import PyGuest

log = logging.getLogger("pvio.netback")

NR_TX = NET_TX_RING_SIZE
NR_RX = NET_RX_RING_SIZE
_TX_REQ, _TX_RSP, _RX_REQ, _RX_RSP = TX_REQUEST, TX_RESPONSE, RX_REQUEST, RX_RESPONSE
FATAL_SLOTS = 20  # Linux netback's fatal_skb_slots default
RX_QUEUE_MAX = 1024  # frames waiting for guest buffers, per vif
RX_QUEUE_BYTES = NR_RX * PAGE_SIZE  # ... and their bytes: the vif's RX staging pages (1 MiB)


def rx_stage_pages(rx_queue_bytes: int = RX_QUEUE_BYTES) -> int:
    """The RX staging pages of a vif whose queue holds ``rx_queue_bytes``: a ring's worth at
    least (room for the largest frame whatever the bound asks)."""
    return max(NR_RX, -(-rx_queue_bytes // PAGE_SIZE))


ENDED_KEPT = 64  # ended vifs kept for inspection (NetBack.ended)

BACKEND_FEATURES = {
    "feature-sg": "1",
    "feature-rx-copy": "1",
    "feature-rx-flip": "0",
    "feature-gso-tcpv4": "0",
    "feature-gso-tcpv6": "0",
    "feature-ipv6-csum-offload": "0",
    "feature-split-event-channels": "1",
    "feature-multicast-control": "0",
}


class VifFatal(Exception):
    """The frontend broke the protocol badly enough to disable the vif."""


class _VifPath:
    """One connection's data-path state: the TX area (the TX staging pages), the RX queue's
    area (the RX staging pages), the batch buffers the C or Python data path fills, and where
    the grant-copy ops go (dom0's hypercall argument area, so the hypercall reads them in place)."""

    def __init__(self, vif: BackendVif) -> None:
        g = vif.dom0
        mem = g.domain.mem.view
        self.stage = vif.tx_stage
        self.tx_area = Area(mem, vif.tx_stage)
        self.rx_area = Area(mem, vif.rx_stage)
        if vif._rx_queue.capacity < vif.rx_queue_max:
            vif._rx_queue = RxQueue(vif.rx_queue_max)
        vif._rx_queue.bind(self.rx_area)
        self.ops_gpa = g._scratch_gpa  # what PyGuest._args fills for every other hypercall
        self.max_ops = SCRATCH_PAGES * PAGE_SIZE // GNTTAB_COPY.size
        self.ops_c = self.tx_area.ptr(self.ops_gpa)
        self.ops_py = mem[self.ops_gpa : self.ops_gpa + self.max_ops * GNTTAB_COPY.size]
        self.pkts = ffi.new("struct np_tx_pkt[]", 2 * NR_TX)
        self.frames = ffi.new("struct np_frame[]", 2 * NR_TX)
        self.plan = ffi.new("struct np_tx_plan *")
        self.tx_done = ffi.new("struct np_tx_done *")
        self.tx_rsp = ffi.new("uint8_t[]", 2 * NR_TX * _TX_RSP.size)
        self.rx_done = ffi.new("struct np_rx_done *")
        self.rx_rsp = ffi.new("uint8_t[]", 2 * NR_RX * _RX_RSP.size)
        self.enq_done = ffi.new("struct np_enq_done *")
        self.direct = RxQueue(2 * NR_TX)  # frames of a switch batch, RX'd where they lie
        self.seq = ffi.new("uint32_t[]", 2 * NR_TX)

    def release(self) -> None:
        """Let go of dom0's memory (at teardown, or when dom0 dies)."""
        self.ops_py.release()
        self.tx_area.release()
        self.rx_area.release()


class BackendVif(SwitchPort):
    """One vif served by netback: the two rings, the event channel, and a switch port."""

    accepts_batches = True

    def __init__(self, netback: NetBack, fe_domid: int, devid: int) -> None:
        self.netback = netback
        self.dom0 = netback.guest
        self.fe_domid = fe_domid
        self.devid = devid
        self.vif_name = f"vif{fe_domid}.{devid}"
        super().__init__(self.vif_name, netback.guest.hv.counters)
        self.dev = netback.guest.hv.counters.new(f"netback/{self.vif_name}", "device")
        # What this vif's guest can trigger per packet is logged through a rate limit.
        self._warn = LogLimiter(log, self.dev).warning
        self.path = f"{netback.base}/{fe_domid}/{devid}"
        self.connected = False
        self.error: str | None = None
        self.rx_queue_max = netback.rx_queue_max
        self._rx_queue = RxQueue(max(self.rx_queue_max, RX_QUEUE_MAX))  # in the RX staging pages
        self._wake = trio.Event()
        self._idle = False  # the service task sleeps until an event: the upcall polls inline
        self._error_exc: BaseException | None = None  # a bug the upcall met, for the log
        self._tx_carry: bytes | list[Any] = b""  # requests of a packet not yet wholly published
        self._rx_held: bytes | list[Any] = b""  # RX requests taken, waiting for a frame that fits
        #: The per-packet work: netpath.C (native/netpath.c) or netpath.PYTHON (its reference).
        self.datapath = netpath.default_path()
        self._dp: _VifPath | None = None
        self._mappings: list[Any] = []
        self._rings: list[BackRing] = []
        self._stage_pages: list[int] = []
        self.host: BackendHost | None = None
        self.port = 0  # the event channel (TX's, when the frontend split them)
        self.rx_port = 0  # RX's own event channel, when split (0: RX uses ``port``)
        self._on_dom0_destroy: Any = None
        #: Why netback stopped serving this vif (its driver stopped or crashed), None while it does.
        self.stopping: str | None = None
        self._scope = trio.CancelScope()
        #: Taken over Closed from a netback that stopped: wait for the frontend to let go first.
        self.adopted = False

    # ------------------------------------------------------------------ handshake
    async def run(self) -> None:
        """Serve the vif; a bug or unexpected error here disables this vif only, never dom0.

        A vif the frontend closed waits for it to come back (Initialising: connect again, as
        Linux's netback does for a frontend that reconnects) or go away (its guest died).
        :meth:`stop` (netback stopping or crashing) ends it wherever it is: the vif lets go of
        the guest's pages and goes Closing, Closed, as a Linux backend does when its driver
        is unbound, so the frontend can reconnect to the next netback."""
        with self._scope:
            try:
                while await self._run():
                    self._reset()
            except Exception as exc:
                if not self.dom0.domain.alive:  # dom0 itself is going down: nothing went wrong here
                    log.debug("%s: ended with dom0: %r", self.vif_name, exc)
                    return
                leaf = own_error(exc)
                self.dev["internal_errors"] += 1
                try:
                    await self._disable(f"internal error: {leaf!r}", exc)
                except Exception:
                    log.exception("%s: could not disable cleanly", self.vif_name)
        if self.stopping is not None:
            await self._release_to_frontend(self.stopping)

    def stop(self, reason: str) -> None:
        """Stop serving this vif (netback is stopping): its task tears it down and goes Closed."""
        if self.stopping is None:
            self.stopping = reason
            self._scope.cancel()

    async def _release_to_frontend(self, reason: str) -> None:
        """After :meth:`stop`: unmap and free everything of the connection, then Closing and
        Closed in xenstore (shielded: the vif's task was cancelled to get here)."""
        with trio.CancelScope(shield=True), trio.move_on_after(10):
            await self._teardown(reason)
            if not self.dom0.domain.alive:
                return
            xb = self.dom0.xenbus
            try:
                await xb.write(f"{self.path}/state", str(int(XenbusState.CLOSING)))
                await xb.write(f"{self.path}/state", str(int(XenbusState.CLOSED)))
            except XenstoreError as e:  # the toolstack removed the device meanwhile
                log.info("%s: could not write Closed: %s", self.vif_name, e)
            self.dev["stops"] += 1
            log.info("%s: backend closed: %s", self.vif_name, reason)

    async def _run(self) -> bool:
        """Probe, wait for the frontend, connect, then serve until closed or disabled; True if
        the frontend closed and came back to connect again."""
        xb = self.dom0.xenbus
        if self.adopted:
            # The frontend saw the last backend close; it reconnects from Initialising.  Until
            # it is there, its keys are the old connection's: probing earlier would map them.
            self.adopted = False
            frontend = await xb.read(f"{self.path}/frontend")
            state = await xb.wait_for_state(
                f"{frontend}/state", {XenbusState.INITIALISING, XenbusState.UNKNOWN}
            )
            if state == XenbusState.UNKNOWN:
                log.info("%s: the frontend is gone; not taken over", self.vif_name)
                return False
            self.dev["taken_over"] += 1
            log.info("%s: frontend back in Initialising: taking over the vif", self.vif_name)
        for key, value in BACKEND_FEATURES.items():
            await xb.write(f"{self.path}/{key}", value)
        await xb.write(f"{self.path}/state", str(int(XenbusState.INIT_WAIT)))
        self.frontend = await xb.read(f"{self.path}/frontend")
        state = await xb.wait_for_state(
            f"{self.frontend}/state",
            {XenbusState.INITIALISED, XenbusState.CONNECTED, XenbusState.CLOSED, XenbusState.UNKNOWN},
        )
        if state not in (XenbusState.INITIALISED, XenbusState.CONNECTED):
            log.info("%s: the frontend went away before connecting (%s)", self.vif_name, state.name)
            await xb.write(f"{self.path}/state", str(int(XenbusState.CLOSED)))
            return False
        try:
            await self._connect()
        except VifFatal as e:
            await self._disable(str(e))
            return False
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._watch_frontend, nursery.cancel_scope)
            await self._service()
            nursery.cancel_scope.cancel()
        if self.error is not None:
            exc, self._error_exc = self._error_exc, None
            await self._disable(self.error, exc)
            return False  # a vif disabled for an error stays Closed
        state = await xb.wait_for_state(
            f"{self.frontend}/state", {XenbusState.INITIALISING, XenbusState.UNKNOWN}
        )
        return state == XenbusState.INITIALISING

    def _reset(self) -> None:
        """Forget the last connection (already torn down) before connecting again, as Linux's
        netback prepares for a frontend that reconnects."""
        self._rx_queue.clear()
        self._tx_carry = []
        self._rx_held = []
        self._wake = trio.Event()
        self.host = None
        self.error = None
        self.dev["reconnects"] += 1
        log.info("%s: frontend back in Initialising: preparing for reconnect", self.vif_name)

    async def _connect(self) -> None:
        xb = self.dom0.xenbus
        fe = self.frontend

        async def read_key(key: str) -> str | None:
            """A frontend key, None if it is absent (the frontend's keys are hostile input)."""
            try:
                return await xb.read(f"{fe}/{key}")
            except XenstoreError as e:
                if e.errno == "ENOENT":
                    return None
                raise VifFatal(f"cannot read frontend key {key}: {e}") from None

        async def read_int(key: str) -> int:
            text = await read_key(key)
            if text is None:
                raise VifFatal(f"frontend key {key} is missing")
            try:
                return int(text)
            except ValueError:
                raise VifFatal(f"frontend key {key}={text!r} is not a number") from None

        # Linux netback reads an absent request-rx-copy as 0, and refuses it (EOPNOTSUPP).
        if (await read_key("request-rx-copy") or "0").strip() != "1":
            raise VifFatal("frontend did not set request-rx-copy=1 (page flipping is not supported)")
        # Neither multi-queue (no multi-queue-max-queues) nor a control ring (no feature-ctrl-ring,
        # where Linux netback's hash mapping lives, XSA-270) is offered: a frontend asking for
        # them is refused, as Linux netback refuses more queues than it offers.
        queues = await read_key("multi-queue-num-queues")
        if queues is not None and queues.strip() != "1":
            raise VifFatal(f"frontend requested {queues.strip()[:16]!r} queues; netback offers one")
        if await read_key("ctrl-ring-ref") is not None:
            raise VifFatal("frontend wrote ctrl-ring-ref; netback offers no control ring")
        tx_ref = await read_int("tx-ring-ref")
        rx_ref = await read_int("rx-ring-ref")
        # Split event channels (offered): the frontend writes event-channel-tx and -rx
        # instead of event-channel; Linux netback takes either.
        split = await read_key("event-channel-tx") is not None
        evtchn = await read_int("event-channel-tx" if split else "event-channel")
        rx_evtchn = await read_int("event-channel-rx") if split else 0
        g = self.dom0
        try:
            tx_map = g.grant_map(self.fe_domid, tx_ref)
            self._mappings.append(tx_map)
            rx_map = g.grant_map(self.fe_domid, rx_ref)
            self._mappings.append(rx_map)
            self.port = g.evtchn_bind_interdomain(self.fe_domid, evtchn)
            if split:
                self.rx_port = g.evtchn_bind_interdomain(self.fe_domid, rx_evtchn)
        except Exception as e:  # GrantStatusError / XenError from the frontend's bad keys
            raise VifFatal(f"cannot map the rings or bind the event channel: {e}") from None
        self.tx = BackRing(NETIF_TX, tx_map.view)
        self.rx = BackRing(NETIF_RX, rx_map.view)
        self._rings = [self.tx, self.rx]
        # Released at teardown, or when dom0 dies with the vif connected: a memoryview left
        # with an export in a garbage cycle crashes CPython < 3.12's collector (gh-77894).
        self._on_dom0_destroy = lambda _dom: self._release_rings()
        g.domain.on_destroy.append(self._on_dom0_destroy)
        g.bind_handler(self.port, self._on_event)
        if self.rx_port:
            g.bind_handler(self.rx_port, self._on_event)
        # Staging pages in dom0: grant-copy targets for TX, sources for RX.  Kept in
        # _stage_pages as they come, so that teardown gives every one back; a dom0 out of
        # memory refuses this vif instead of crashing.
        try:
            need = NR_TX + rx_stage_pages(self.netback.rx_queue_bytes)
            for _ in range(need):
                self._stage_pages.append(g.alloc_page())
        except MemoryError:
            raise VifFatal(
                f"dom0 has {len(self._stage_pages)} of the {need} staging pages a vif needs"
            ) from None
        self.tx_stage = self._stage_pages[:NR_TX]
        self.tx_stage_views = [g.page(p) for p in self.tx_stage]
        self.rx_stage = self._stage_pages[NR_TX:]
        self.rx_stage_views = [g.page(p) for p in self.rx_stage]
        made = self.netback.make_backend(self)
        if made is not None:
            backend, options = made
            ctx = BackendContext(
                name=self.vif_name,
                domid=self.fe_domid,
                counters=g.hv.counters.new(f"backend/{self.vif_name}", "device"),
                options=options,
                scheduler=self._schedule_later,
            )
            try:
                self.host = BackendHost(backend, ctx)
            except BackendError as e:  # the user's backend refused its options: not netback's fault
                raise VifFatal(str(e)) from None
        self.locked_macs = await self._mac_policy()
        await self.dom0.xenbus.write(f"{self.path}/state", str(int(XenbusState.CONNECTED)))
        self.connected = True
        self.netback.switch.attach(self)
        log.info(
            "%s connected (tx-ring-ref %d, rx-ring-ref %d, port %d%s)", self.vif_name, tx_ref, rx_ref, evtchn,
            f", rx port {rx_evtchn}" if split else "",
        )  # fmt: skip
        if split:
            self.dev["split_event_channels"] = 1

    async def _mac_policy(self) -> frozenset[bytes] | None:
        """The source MACs this vif may send from: the ``mac`` the toolstack wrote in the
        backend's own directory (trusted, unlike the frontend's), unless netback learns."""
        if not self.netback.lock_macs:
            return None
        try:
            return frozenset({parse_mac(await self.dom0.xenbus.read(f"{self.path}/mac"))})
        except (XenstoreError, ValueError) as e:
            raise VifFatal(f"no usable mac in the backend directory to lock the vif to: {e}") from None

    async def _watch_frontend(self, scope: trio.CancelScope) -> None:
        xb = self.dom0.xenbus
        await xb.wait_for_state(
            f"{self.frontend}/state", {XenbusState.CLOSING, XenbusState.CLOSED, XenbusState.UNKNOWN}
        )
        await self._teardown("frontend closing")
        await xb.write(f"{self.path}/state", str(int(XenbusState.CLOSING)))
        await xb.write(f"{self.path}/state", str(int(XenbusState.CLOSED)))
        scope.cancel()

    def _schedule_later(self, delay_s: float, frames: list[bytes], direction: str) -> None:
        async def later() -> None:
            await trio.sleep(delay_s)
            if not self.connected:
                self.dev["drops.backend_delayed_after_close"] += len(frames)
                return
            if direction == "tx":
                self.netback.switch.input(self, frames)
            else:
                self._enqueue(frames)

        self.dom0.spawn(later)

    # ------------------------------------------------------------------ service loop
    def _on_event(self, _port: int) -> None:
        """Upcall handler.  When the service task sleeps, the rings are polled right here, in
        dom0's upcall, as Linux's NAPI poll runs in the softirq straight after the interrupt:
        one round of TX and RX work, then the event indices are re-armed.  Only when work is
        left (or the service task is busy) is the service task woken to carry on.  A fault of
        this vif ends its own service (and disables it), never dom0's upcall."""
        if not self._idle or not self.connected:
            self._wake.set()
            return
        try:
            self._tx_work()
            self._rx_work()
            # A busy-polling netback leaves the indices unarmed: its service task polls on.
            more = self.netback.busy_poll or self._arm()
        except (VifFatal, RingOverflowError) as e:
            self._fail_later(self._fatal_reason(e))
            return
        except Exception as e:  # a netback bug costs this vif, not dom0's vCPU
            self.dev["internal_errors"] += 1
            self._error_exc = e  # logged with its traceback when the vif is disabled
            self._fail_later(f"internal error: {own_error(e)!r}")
            return
        if more or self.error is not None:
            self._wake.set()

    def _arm(self) -> int:
        """Re-arm the event indices (the final check): requests that came meanwhile, if any."""
        more = self.tx.final_check_for_requests(1)
        if self._rx_queue:  # we want buffers: ask to be told when they come
            more += self.rx.final_check_for_requests(1)
        return int(more)

    async def _service(self) -> None:
        spins = 0
        while self.connected and self.error is None:
            self._wake = trio.Event()
            try:
                did = self._tx_work() + self._rx_work()
            except (VifFatal, RingOverflowError) as e:
                self.error = self._fatal_reason(e)
                return
            if did:
                spins = 0
                await trio.lowlevel.checkpoint()
                continue
            if spins < self.netback.busy_poll:  # poll on, not armed: the frontend need not notify
                spins += 1
                self.dev["busy_poll.empty_polls"] += 1
                await trio.lowlevel.checkpoint()
                continue
            spins = 0
            try:
                more = self._arm()
            except RingOverflowError:
                self.error = self._impossible_req_prod()
                return
            if more:
                continue
            self._idle = True
            try:
                await self._wake.wait()
            finally:
                self._idle = False

    def _fatal_reason(self, exc: VifFatal | RingOverflowError) -> str:
        """Why the vif must be disabled: the protocol error, or an impossible req_prod."""
        return str(exc) if isinstance(exc, VifFatal) else self._impossible_req_prod()

    def _impossible_req_prod(self) -> str:
        """The reason logged when a req_prod of the frontend cannot be right, with the indices."""
        bad, name = self.tx, "TX"
        try:
            self.tx.unconsumed_requests()
            bad, name = self.rx, "RX"
        except RingOverflowError:
            pass
        return (
            f"impossible req_prod from the frontend ({name} ring: req_prod {bad.req_prod}, "
            f"req_cons {bad.req_cons}, rsp_prod_pvt {bad.rsp_prod_pvt}, {bad.nr_ents} slots)"
        )

    def _notify(self, notify: bool, rx: bool = False) -> None:
        if notify:
            self.dev["notifications.sent"] += 1
            try:
                self.dom0.evtchn_send(self.rx_port if rx and self.rx_port else self.port)
            except OSError as e:  # XenError: the frontend closed its end (it is going away)
                raise VifFatal(f"the frontend's event channel is gone ({e.strerror})") from None
        else:
            self.dev["notifications.suppressed"] += 1

    def _path(self) -> _VifPath:
        """This connection's data-path state (made on first use after each connect)."""
        st = self._dp
        if st is None or st.stage is not self.tx_stage:
            st = self._dp = _VifPath(self)
        return st

    def _grant_copy(self, st: _VifPath, count: int) -> None:
        """GNTTABOP_copy of the ``count`` ops the plan wrote in dom0's hypercall scratch area, in
        one hypercall (the hypervisor counts them: dom0's ``grant.copies``)."""
        rc = self.dom0.hypercall(Hypercall.grant_table_op, GnttabOp.copy, st.ops_gpa, count)
        if rc < 0:
            raise XenError(-rc, f"dom{self.dom0.domain.domid} grant copy")

    def _tx_work(self) -> int:
        """TX: take the published requests, and for every whole packet: validate, grant-copy it
        into the TX area, answer each slot; hand the frames to the switch as one batch."""
        data = self.tx.take_requests()
        carry = self._tx_carry
        if not data and not carry:
            return 0
        raw = bytes(carry) + data if carry else data
        st = self._path()
        path = self.datapath
        plan = st.plan
        ops = st.ops_c if path is netpath.C else st.ops_py
        path.tx_plan(raw, NR_TX, FATAL_SLOTS, self.fe_domid, st.tx_area, ops, st.max_ops, st.pkts, plan)
        if plan.fatal:
            if plan.fatal == netpath.FATAL_ID:
                raise VifFatal(f"TX request id {plan.fatal_arg} outside the ring of {NR_TX}")
            if plan.fatal == netpath.FATAL_SLOTS:
                raise VifFatal(f"TX packet of more than {FATAL_SLOTS} slots (fatal_skb_slots)")
            raise RuntimeError(f"{self.vif_name}: the TX plan did not fit its staging area")
        self._tx_carry = raw[plan.consumed * _TX_REQ.size :]  # the rest of a packet not yet published
        npkts = plan.npkts
        if not npkts:
            return 0
        pkts = st.pkts
        if plan.nbad:  # each bad packet's reason, logged (rate-limited) by the one rule set
            reqs = list(_TX_REQ.iter_unpack(raw[: plan.consumed * _TX_REQ.size]))
            for x in range(npkts):
                p = pkts[x]
                if p.reason:
                    data0 = p.first + 1 + p.extras
                    self._check_packet([reqs[p.first], *reqs[data0 : data0 + p.nslots - 1]])
        if plan.nops:
            self._grant_copy(st, plan.nops)
        done = st.tx_done
        path.tx_finish(raw, ops, pkts, npkts, st.tx_area, st.tx_rsp, st.frames, done)
        drops = done.drops
        for reason, name in netpath.REASONS.items():
            if drops[reason]:
                self.dev[f"drops.{name}"] += drops[reason]
        if drops[netpath.BAD_GRANT]:
            for x in range(npkts):
                if pkts[x].reason == netpath.BAD_GRANT:
                    self._warn("%s: TX grant copy failed: %s", self.vif_name, GntSt(pkts[x].bad_status).name)
        if done.checksums:
            self.dev["checksums_completed"] += done.checksums
        # Extras' responses carry no meaningful id (the frontend ignores them: status NULL).
        nrsp = done.nrsp
        _, notify = self.tx.send(ffi.buffer(st.tx_rsp, nrsp * _TX_RSP.size))
        self._notify(notify)
        nframes = done.nframes
        if nframes:
            self.dev["packets.tx"] += nframes  # from the guest's point of view: it transmitted
            self.dev["bytes.tx"] += done.bytes
            batch = FrameBatch(st.tx_area, st.frames, nframes)
            if self.host is None:
                self.netback.switch.input_batch(self, batch)
            else:  # a custom backend gets (and may keep) bytes: one copy each
                frames = batch.materialize()
                self.dev["copies"] += nframes
                self.dev["copy_bytes"] += done.bytes
                frames = self.host.tx(frames)
                if frames:
                    self.netback.switch.input(self, frames)
        return int(nrsp)

    def _check_packet(self, slots: list[tuple[int, int, int, int, int]]) -> str | None:
        """Why a packet must be dropped (a drop reason), or None if it is well formed; the
        reason is logged.  The rules are :func:`pvio.core.netpath.tx_packet_problem`'s (the C
        data path applies them too), here with the detail of what was wrong."""
        if len(slots) > XEN_NETIF_NR_SLOTS_MIN:
            self._warn(
                "%s: TX packet of %d slots (max %d)", self.vif_name, len(slots), XEN_NETIF_NR_SLOTS_MIN
            )
            return "too_many_slots"
        for _gref, offset, _flags, _id, size in slots[1:]:
            problem = tx_slot_problem(offset, size)
            if problem is not None:
                self._warn("%s: %s", self.vif_name, problem)
                return "bad_offset"
        total = slots[0][4]
        first_len = total - sum(s[4] for s in slots[1:])
        if first_len <= 0:
            self._warn("%s: TX packet size %d smaller than its fragments", self.vif_name, total)
            return "bad_size"
        if slots[0][1] + first_len > PAGE_SIZE:
            self._warn(
                "%s: TX slot offset %d + size %d crosses the page", self.vif_name, slots[0][1], first_len
            )
            return "bad_offset"
        return None

    # ------------------------------------------------------------------ RX: switch -> guest
    def transmit(self, frames: list[bytes]) -> None:
        """Frames from the switch for this guest (never blocks; overflow is counted)."""
        if self.host is not None:
            frames = self.host.rx(frames)
        self._enqueue(frames)

    def transmit_batch(self, batch: FrameBatch, idx: Any, n: int) -> None:
        """Frames ``idx[0..n)`` of a batch from the switch (valid only during this call: the
        batch's area is its producer's, reused by its next batch).

        With nothing queued before them, as many as the guest has posted buffers for go
        straight from the batch into its buffers (one grant copy each, no copy into the queue);
        the rest are copied into this vif's RX queue for the service loop."""
        if self.host is not None:
            frames = batch.materialize(idx, n)
            self.dev["copies"] += n
            self.dev["copy_bytes"] += sum(map(len, frames))
            self.transmit(frames)
            return
        if not self.connected:
            self.dev["drops.vif_closed"] += n
            return
        st = self._path()
        sent = 0
        if not self._rx_queue and not self._rx_held and self.error is None:
            sent = self._rx_direct(st, batch, idx, n)
            if sent == n:
                return
            if idx is not None:
                idx = idx + sent
            else:  # a whole batch: index its frames from the first not sent
                st.seq[0 : n - sent] = range(sent, n)
                idx = st.seq
        done = st.enq_done
        self.datapath.rx_enqueue(
            self._rx_queue, batch.area, batch.frames, idx, n - sent, self.rx_queue_max, done
        )
        if done.dropped:
            self.dev["drops.rx_queue_full"] += done.dropped
        if done.queued:
            self.dev["copies"] += done.copies
            self.dev["copy_bytes"] += done.copy_bytes
            self._wake.set()

    def _rx_direct(self, st: _VifPath, batch: FrameBatch, idx: Any, n: int) -> int:
        """RX of frames of a switch batch straight into the guest's posted buffers: how many went.

        Runs in the sender's task, so a failure of this vif (a broken frontend) is not raised:
        it is recorded, and this vif's own service loop disables it."""
        try:
            avail = self.rx.unconsumed_requests()
        except RingOverflowError:
            self._fail_later(self._impossible_req_prod())
            return 0
        if not avail:
            return 0
        q = st.direct
        q.load(self.datapath, batch.area, batch.frames, idx, n)
        nframes, need = self.datapath.rx_plan(q, avail, NR_RX)
        if nframes:
            try:
                self._rx_send(st, q, nframes, need, b"", 0)
            except VifFatal as e:
                self._fail_later(str(e))
        return nframes

    def _fail_later(self, reason: str) -> None:
        """A fatal error found outside this vif's service loop: the loop ends and disables the vif."""
        if self.error is None:
            self.error = reason
        self._wake.set()

    def _enqueue(self, frames: list[bytes]) -> None:
        if not self.connected:
            self.dev["drops.vif_closed"] += len(frames)
            return
        self._path()
        queued, dropped, copies, nbytes = netpath.enqueue_bytes(self._rx_queue, frames, self.rx_queue_max)
        if dropped:
            self.dev["drops.rx_queue_full"] += dropped
        if queued:
            self.dev["copies"] += copies
            self.dev["copy_bytes"] += nbytes
            self._wake.set()

    def _rx_work(self) -> int:
        """RX: move as many queued frames as the guest has posted buffers for, in one grant
        copy; each response goes in the slot of the request it answers."""
        q = self._rx_queue
        if not q or not self.connected:
            return 0
        st = self._path()
        path = self.datapath
        held = bytes(self._rx_held) if self._rx_held else b""  # RX requests taken, waiting for a frame
        nheld = len(held) // _RX_REQ.size
        avail = nheld + self.rx.unconsumed_requests()
        nframes, need = path.rx_plan(q, avail, NR_RX)
        if not nframes:
            # The first frame needs more buffers than the guest has posted.  Take the posted
            # requests now (answered when the frame goes out), so that the final check sees an
            # empty ring and arms req_event for the next buffer; left on the ring, they would
            # count as work to do and the service loop would spin without ever yielding.
            self._rx_held = held + self.rx.take_requests()
            return 0
        self._rx_send(st, q, nframes, need, held, nheld)
        return int(nframes)

    def _rx_send(self, st: _VifPath, q: RxQueue, nframes: int, need: int, held: bytes, nheld: int) -> None:
        """Grant-copy the first ``nframes`` frames of ``q`` into the guest's buffers (``held``
        requests first, then ``need - nheld`` more from the ring), answer, push, notify."""
        path = self.datapath
        reqs = held + self.rx.take_requests(need - nheld) if need > nheld else held
        if len(reqs) < need * _RX_REQ.size:
            # Fewer requests than the plan counted: a frontend in another process moved its
            # req_prod back between the two reads.  Hold what was taken; the C planner never
            # sees a request list shorter than the one it planned for.
            self._rx_held = reqs
            return
        self._rx_held = reqs[need * _RX_REQ.size :]
        reqs = reqs[: need * _RX_REQ.size]
        ops = st.ops_c if path is netpath.C else st.ops_py
        nops = path.rx_build(q, nframes, reqs, self.fe_domid, ops)
        self._grant_copy(st, nops)
        done = st.rx_done
        path.rx_finish(q, nframes, reqs, ops, st.rx_rsp, done)
        if done.delivered:
            self.dev["packets.rx"] += done.delivered
            self.dev["bytes.rx"] += done.delivered_bytes
        if done.bad_grant:
            self.dev["drops.rx_bad_grant"] += done.bad_grant
            for _ in range(done.bad_grant):
                self._warn("%s: RX grant copy into the guest's buffer failed", self.vif_name)
        _, notify = self.rx.send(ffi.buffer(st.rx_rsp, done.nrsp * _RX_RSP.size))
        self._notify(notify, rx=True)

    # ------------------------------------------------------------------ teardown
    async def _teardown(self, reason: str) -> None:
        if not self.connected and not self._mappings:
            return
        self.connected = False
        if self in self.netback.switch.ports:  # not yet attached if the connect failed half way
            self.netback.switch.detach(self)
        if self.host is not None:
            self.host.detach()
        g = self.dom0
        if self.port:
            g.unbind_handler(self.port)
            with contextlib.suppress(OSError):
                g.evtchn_close(self.port)
            self.port = 0
        if self.rx_port:
            g.unbind_handler(self.rx_port)
            with contextlib.suppress(OSError):
                g.evtchn_close(self.rx_port)
            self.rx_port = 0
        self._release_rings()  # before the unmap, which then revokes the page views for good
        with contextlib.suppress(ValueError):
            g.domain.on_destroy.remove(self._on_dom0_destroy)
        for m in self._mappings:
            with contextlib.suppress(Exception):
                g.grant_unmap(m)
        self._mappings.clear()
        for gfn in self._stage_pages:
            g.free_page(gfn)
        self._stage_pages.clear()
        if self._rx_queue:
            self.dev["drops.vif_closed"] += len(self._rx_queue)
            self._rx_queue.clear()
        log.info("%s disconnected: %s", self.vif_name, reason)

    def _release_rings(self) -> None:
        for ring in self._rings:
            ring.release()
        self._rings.clear()
        if self._dp is not None:
            self._dp.release()
            self._dp = None

    async def _disable(self, reason: str, exc: BaseException | None = None) -> None:
        """A fatal error: disconnect this vif only, with the reason (and traceback) logged and counted."""
        self.error = reason
        self.dev["disconnects"] += 1
        log.error("%s disabled: %s", self.vif_name, reason, exc_info=exc)
        await self._teardown(reason)
        xb = self.dom0.xenbus
        # The reason, where the frontend (which may read the backend directory) and the
        # toolstack find it, as Linux's xenbus_dev_fatal leaves an ``error`` node.
        await xb.write(f"{self.path}/error", reason[:1024])
        await xb.write(f"{self.path}/state", str(int(XenbusState.CLOSING)))
        await xb.write(f"{self.path}/state", str(int(XenbusState.CLOSED)))


class NetBack:
    """The netback driver of one backend domain, serving every vif the toolstack creates."""

    def __init__(
        self,
        guest: PyGuest,
        switch: Switch,
        *,
        backend: str | type[Backend] | None = None,
        backend_options: dict[str, Any] | None = None,
        rx_queue_max: int = RX_QUEUE_MAX,
        rx_queue_bytes: int = RX_QUEUE_BYTES,
        lock_macs: bool = True,
    ) -> None:
        self.guest = guest
        #: Lock each vif to its configured MAC (spoofed sources dropped); False: vifs learn.
        self.lock_macs = lock_macs
        self.switch = switch
        self.base = f"/local/domain/{guest.domain.domid}/backend/vif"
        self.vifs: dict[tuple[int, int], BackendVif] = {}
        #: The last vifs that ended (closed, disabled, guest gone), for inspection: their
        #: counters and ``error``; they hold no ring, mapping or page of their guest.
        self.ended: deque[BackendVif] = deque(maxlen=ENDED_KEPT)
        self.backend_cls = load_backend(backend) if isinstance(backend, str) else backend
        self.backend_options = backend_options or {}
        self.rx_queue_max = rx_queue_max
        #: The bytes of frames each vif's RX queue holds (its RX staging pages, a ring's worth
        #: at least): with rx_queue_max, the two bounds of the queue (XSA-392).
        self.rx_queue_bytes = rx_queue_bytes
        #: Empty polls of a vif's service task before it re-arms the event indices and sleeps:
        #: 0 in dom0 (it shares the CPU with its guests); a backend with a CPU of its own (a
        #: driver domain) polls, and while it polls its frontends need not notify it.
        self.busy_poll = 0
        self.backend_overrides: dict[tuple[int, int], tuple[type[Backend], dict[str, Any]]] = {}
        self._scope: trio.CancelScope | None = None
        self._ended: set[tuple[int, int]] = set()  # vifs this netback served that ended

    def set_vif_backend(
        self, fe_domid: int, devid: int, backend: str | type[Backend], options: dict[str, Any] | None = None
    ) -> None:
        """Serve vif ``devid`` of domain ``fe_domid`` with its own backend (by entry-point name or
        class) and options, instead of netback's default; set it before the vif connects."""
        cls = load_backend(backend) if isinstance(backend, str) else backend
        self.backend_overrides[(fe_domid, devid)] = (cls, dict(options or {}))

    def make_backend(self, vif: BackendVif) -> tuple[Backend, dict[str, Any]] | None:
        """The custom backend instance for ``vif`` and its options (None: frames go straight
        to the switch)."""
        override = self.backend_overrides.get((vif.fe_domid, vif.devid))
        if override is not None:
            cls, options = override
            return cls(), options
        return (self.backend_cls(), dict(self.backend_options)) if self.backend_cls is not None else None

    async def run(self) -> None:
        """Watch the backend directory and serve each vif, until :meth:`stop`.

        A vif is taken when the toolstack creates it (state Initialising) or when a previous
        netback left it Closed (it stopped or crashed): this netback probes it afresh, and its
        frontend, which saw the old backend close, reconnects.  A second netback in the same
        domain refuses to start (one logged line); dom0 and the first one go on.  When this
        returns, normally or because netback itself failed (logged: a crash of the driver,
        not of dom0), every vif it served is closed and the watch removed, so a new netback
        can take over."""
        xb = self.guest.xenbus
        self._scope = trio.CancelScope()
        reason = "netback stopped"
        try:
            with self._scope:
                try:
                    watch = await xb.watch(self.base, "netback")
                except XenstoreError as e:
                    if e.errno != "EEXIST":
                        raise
                    log.error(
                        "dom%d already runs a netback on %s; this one does not start",
                        self.guest.domain.domid,
                        self.base,
                    )
                    return
                async with watch:
                    dropped = 0
                    async for path, _token in watch:
                        # An event under a vif this netback serves is that vif's own business
                        # (its watchers follow it); the scan would skip it anyway.  Rescanning
                        # only for the others keeps a boot of N guests linear, not quadratic.
                        if watch.dropped != dropped or self._served(path) is None:
                            dropped = watch.dropped
                            await self._scan()
        except Exception as exc:  # a bug in netback itself: the driver dies, dom0 does not
            reason = f"netback crashed: {own_error(exc)!r}"
            log.exception("dom%d: %s", self.guest.domain.domid, reason)
        finally:
            self._stop_vifs(reason)

    def stop(self) -> None:
        """Stop netback: release the backend directory's watch (another netback may then run)
        and close every vif it serves (each goes Closing, Closed; its frontend may then
        reconnect to the next netback)."""
        if self._scope is not None:
            self._scope.cancel()
        self._stop_vifs("netback stopped")

    def _stop_vifs(self, reason: str) -> None:
        for vif in list(self.vifs.values()):
            vif.stop(reason)

    def _served(self, path: str) -> tuple[int, int] | None:
        """The served vif (frontend domid, devid) whose backend directory ``path`` is in, if any."""
        rel = path[len(self.base) :].strip("/").split("/") if path.startswith(self.base) else []
        if len(rel) >= 2 and rel[0].isdigit() and rel[1].isdigit():
            key = (int(rel[0]), int(rel[1]))
            if key in self.vifs:
                return key
        return None

    async def _scan(self) -> None:
        xb = self.guest.xenbus
        try:
            fe_domids = await xb.directory(self.base)
        except Exception:
            return  # the directory does not exist yet
        for fe in fe_domids:
            try:
                devids = await xb.directory(f"{self.base}/{fe}")
            except Exception:
                continue
            for dev in devids:
                if not (fe.isdigit() and dev.isdigit()):
                    continue
                key = (int(fe), int(dev))
                if key in self.vifs:
                    continue
                try:
                    state = int(await xb.read(f"{self.base}/{fe}/{dev}/state"))
                except Exception:
                    continue
                if state == XenbusState.INITIALISING:  # new from the toolstack
                    self._ended.discard(key)
                elif state != XenbusState.CLOSED or key in self._ended:
                    continue  # only a Closed vif this netback never served is another's leftover
                vif = BackendVif(self, *key)
                vif.adopted = state == XenbusState.CLOSED
                self.vifs[key] = vif
                self.guest.spawn(self._serve, vif, name=f"netback-{vif.vif_name}")

    async def _serve(self, vif: BackendVif) -> None:
        """Run one vif; when it ends (closed, disabled, its guest gone) forget it, so nothing of
        the guest stays referenced and the device id can connect again."""
        key = (vif.fe_domid, vif.devid)
        try:
            await vif.run()
        finally:
            if self.vifs.get(key) is vif:
                del self.vifs[key]
            self._ended.add(key)  # not taken again from Closed: only a new Initialising restarts it
            self.ended.append(vif)
