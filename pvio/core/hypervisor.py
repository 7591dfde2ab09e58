"""The hypervisor: hosts domains and provides event channels, grant tables and xenstore.

``async with pvio.Hypervisor() as hv:`` opens a trio nursery, creates the store and
dom0, and on exit destroys every domain.  Guests are created from a kernel object
(a :class:`pvio.PyGuest` subclass, or an x86 guest from ``cpu``) and started::

    async with pvio.Hypervisor() as hv:
        a = hv.create_domain(MyGuest(), name="a")
        await hv.start(a)

Determinism: trio randomises the order in which runnable tasks run within one
scheduling batch.  Guests' interleavings (and so the number of interrupts a scenario
takes) depend on that order, so by default the hypervisor seeds trio's scheduler RNG
when it starts (``seed=0``); with trio's MockClock a scenario then gives the same
counters on every run.  ``seed=None`` leaves trio's randomness alone.
"""

from __future__ import annotations

import logging
import math
import os
import weakref
from collections.abc import Callable
from types import TracebackType
from typing import Any, ClassVar

import trio

from pvio.abi import VIRQ_TIMER, EvtchnStat, ShutdownReason
from pvio.core import evtchn
from pvio.core.counters import CounterRegistry, Snapshot
from pvio.core.domain import Domain, GuestKernel
from pvio.core.evtchn import SERVICE, Channel
from pvio.core.fastpath import NativeDomains
from pvio.core.grant_table import unmap_grant
from pvio.core.hypercall import HypercallTable
from pvio.core.iobus import IoBus
from pvio.core.trace import Tracer
from pvio.xenstore.server import RingConnection
from pvio.xenstore.store import Store

log = logging.getLogger("pvio.hypervisor")

DEFAULT_GUEST_PAGES = 2048  # 8 MiB
DEFAULT_DOM0_PAGES = 4096


def seed_trio_scheduler(seed: int) -> bool:
    """Make trio's batch ordering reproducible (see the module docstring)."""
    try:
        from trio._core import _run

        _run._r.seed(seed)
        return True
    except (ImportError, AttributeError):  # pragma: no cover - a trio without the RNG
        log.warning("cannot seed trio's scheduler: counters may vary between runs")
        return False


def own_error(exc: BaseException) -> BaseException:
    """``exc`` without the exception groups that only wrap it (one member each, as a trio
    nursery wraps the one error of its task): what to name in a one-line reason."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


class Hypervisor:
    """Hosts domains; the single owner of every domain, channel, grant and store node."""

    #: Makes dom0's kernel when ``dom0`` is not given.  The core knows no guest kind: the
    #: Python guest kernel (:mod:`pvio.guest`) installs its ``Dom0Kernel`` here on import,
    #: which ``import pvio`` always does.
    default_dom0_kernel: ClassVar[Callable[[], GuestKernel] | None] = None

    def __init__(
        self, *, seed: int | None = 0, dom0: GuestKernel | None = None, dom0_pages: int = DEFAULT_DOM0_PAGES
    ) -> None:
        self.seed = seed
        self.domains: dict[int, Domain] = {}
        self.counters = CounterRegistry()
        # Dead domains whose RAM is still mapped (a view outlived them): unmapped by reclaim().
        self._unreleased: weakref.WeakSet[Domain] = weakref.WeakSet()
        self.hypercalls = HypercallTable(self)
        self.iobus = IoBus(self)  # port I/O and MMIO exits to device models (pvio.core.iobus)
        self.store = Store()
        self.toolstack = self.store.connect(0)  # the toolstack's own (privileged) session
        self._dom0_kernel = dom0
        self._dom0_pages = dom0_pages
        self._next_domid = 1
        self._nursery_cm: Any = None
        self.nursery: trio.Nursery | None = None
        self.dom0: Domain | None = None
        self._store_conns: dict[int, RingConnection] = {}
        self.native = NativeDomains()  # the C grant-copy fast path's view of the domains

    # ------------------------------------------------------------------ lifecycle
    async def __aenter__(self) -> Hypervisor:
        if self.seed is not None:
            seed_trio_scheduler(self.seed)
        self._nursery_cm = trio.open_nursery()
        self.nursery = await self._nursery_cm.__aenter__()
        try:
            kernel = self._dom0_kernel
            if kernel is None:
                if Hypervisor.default_dom0_kernel is None:
                    raise RuntimeError(
                        "no dom0 kernel: pass dom0=..., or import pvio (the Python guest kernel)"
                    )
                kernel = Hypervisor.default_dom0_kernel()
            self.dom0 = self.create_domain(
                kernel, name="dom0", memory_pages=self._dom0_pages, domid=0, privileged=True
            )
            await self.start(self.dom0)
        except BaseException as exc:
            await self._nursery_cm.__aexit__(type(exc), exc, exc.__traceback__)
            raise
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> bool | None:
        for dom in sorted(self.domains.values(), key=lambda d: -d.domid):
            self.destroy(dom, reason="hypervisor shutting down")
        assert self._nursery_cm is not None
        try:
            return bool(await self._nursery_cm.__aexit__(exc_type, exc, tb))
        except BaseExceptionGroup as group:
            # The body's own error, wrapped by the hypervisor's nursery and nothing else with
            # it: give the caller that error, not a group it never asked for.
            if exc is not None and len(group.exceptions) == 1 and group.exceptions[0] is exc:
                raise exc from None
            raise
        finally:
            self.reclaim()  # every task has ended: whatever views of dead domains were left are gone

    def _require_nursery(self) -> trio.Nursery:
        if self.nursery is None:
            raise RuntimeError("the hypervisor is not running: use `async with Hypervisor() as hv:`")
        return self.nursery

    def create_domain(
        self,
        kernel: GuestKernel,
        *,
        name: str | None = None,
        memory_pages: int | None = None,
        domid: int | None = None,
        privileged: bool = False,
        **domain_options: Any,
    ) -> Domain:
        """Create a domain for ``kernel``: memory, shared pages, store connection; not started."""
        self._require_nursery()
        if domid is None:
            domid = self._next_domid
            self._next_domid += 1
        if domid in self.domains:
            raise ValueError(f"domain {domid} exists already")
        pages = memory_pages or getattr(kernel, "memory_pages", None) or DEFAULT_GUEST_PAGES
        dom = Domain(
            self, domid, name or f"dom{domid}", kernel, pages, privileged=privileged, **domain_options
        )
        self.domains[domid] = dom
        self.native.rebuild(list(self.domains.values()))
        # The store connection: the guest's ring page and a port bound to the in-hypervisor daemon.
        self.store.introduce_domain(domid)
        conn = RingConnection(self.store, domid, dom.mem.page(dom.store_gfn), lambda: self._store_notify(dom))
        self._store_conns[domid] = conn
        port = self.hypercalls.free_port(dom)
        dom.ports[port] = Channel(SERVICE, remote_dom=0, service=conn.process)
        dom.store_port = port
        if dom.name:
            self.toolstack.write(f"/local/domain/{domid}/name", dom.name)
        dom.write_start_info(port)
        kernel.attach(self, dom)
        log.info("created dom%d %r (%d pages)", domid, dom.name, pages)
        return dom

    def _store_notify(self, dom: Domain) -> None:
        if dom.alive and dom.store_port in dom.ports:
            evtchn.set_pending(dom, dom.store_port)

    async def start(self, dom: Domain) -> None:
        """Boot the domain's kernel in the hypervisor's nursery; returns once it has booted."""
        nursery = self._require_nursery()
        if dom.state != "created":
            raise RuntimeError(f"dom{dom.domid} is {dom.state}, not created")
        dom.state = "running"

        async def run_kernel() -> None:
            try:
                with dom.cancel_scope:
                    await dom.kernel.run()
            except BaseException as exc:
                cancelled, errors = (
                    exc.split(trio.Cancelled)
                    if isinstance(exc, BaseExceptionGroup)
                    else ((exc, None) if isinstance(exc, trio.Cancelled) else (None, exc))
                )
                if errors is not None:
                    self._kernel_failed(dom, errors)
                if cancelled is not None:
                    raise cancelled from None
            finally:
                dom.booted.set()

        nursery.start_soon(run_kernel, name=f"dom{dom.domid}")
        await dom.booted.wait()

    def _kernel_failed(self, dom: Domain, exc: BaseException) -> None:
        """A guest kernel raised: stop that guest only (errors while it is torn down are expected)."""
        if not isinstance(exc, Exception):
            raise exc
        if not dom.alive:
            log.debug("dom%d: error while being torn down: %r", dom.domid, exc)
            return
        leaf = own_error(exc)  # the kernel's own error, not its nursery's wrapping
        log.debug("dom%d crashed", dom.domid, exc_info=exc)  # the traceback, for whoever asks
        self.crash_domain(dom, f"kernel raised {type(leaf).__name__}: {leaf}")

    def pause(self, dom: Domain) -> None:
        """Stop delivering upcalls to the domain until unpaused."""
        if dom.state == "running":
            dom.state = "paused"

    def unpause(self, dom: Domain) -> None:
        """Resume a paused domain (and deliver what became pending meanwhile)."""
        if dom.state == "paused":
            dom.state = "running"
            dom.kick()

    def shutdown_domain(self, dom: Domain, reason: int) -> None:
        """SCHEDOP_shutdown: the guest asked to stop."""
        dom.shutdown_reason = reason
        name = ShutdownReason(reason).name if reason in ShutdownReason._value2member_map_ else str(reason)
        log.info("dom%d shut down: %s", dom.domid, name)
        if reason == ShutdownReason.crash:
            self.crash_domain(dom, "guest reported a crash")
        else:
            self.destroy(dom, reason=f"shutdown ({name})")

    def crash_domain(self, dom: Domain, reason: str) -> None:
        """Stop one misbehaving domain with a logged reason; every other domain goes on."""
        if not dom.alive:
            return
        dom.crash_reason = reason
        dom.counters["crashes"] += 1
        log.error("dom%d stopped: %s", dom.domid, reason)
        self.destroy(dom, reason=reason)

    def destroy(self, dom: Domain, reason: str = "destroyed") -> None:
        """Tear the domain down: its tasks, channels, grants and mappings, store presence."""
        if not dom.alive:
            return
        dom.state = "dying"
        dom.cancel_scope.cancel()
        if dom.timer_scope is not None:
            dom.timer_scope.cancel()
        for port in list(dom.ports):  # peers' channels go back to unbound
            self.hypercalls.evtchn_close(dom, port)
        for handle in list(dom.maptrack):  # mappings it holds
            unmap_grant(dom, handle)
        for grantee_id, handle in list(dom.mapped_by_others):  # mappings of its pages others hold
            grantee = self.domains.get(grantee_id)
            if grantee is not None and handle in grantee.maptrack:
                unmap_grant(grantee, handle)
                grantee.counters["grant.revoked_by_destroy"] += 1
        conn = self._store_conns.pop(dom.domid, None)
        if conn is not None:
            conn.close()
        self.store.release_domain(dom.domid)
        for callback in dom.on_destroy:
            try:
                callback(dom)
            except Exception:
                log.exception("dom%d: destroy callback failed", dom.domid)
        dom.state = "dead"
        self._unreleased.add(dom)  # its RAM is unmapped once nothing points into it (reclaim)
        del self.domains[dom.domid]
        self.native.rebuild(list(self.domains.values()))
        log.info("destroyed dom%d (%s)", dom.domid, reason)

    def reclaim(self) -> int:
        """Unmap the RAM of every dead domain nothing points into any more; how many are left.

        A destroyed domain's pages can still be in use (a backend's ring on a page it had
        mapped, until the backend lets go): its RAM stays mapped until then, and goes with
        the last holder (:meth:`Domain.release_memory`), or here.
        """
        for dom in list(self._unreleased):
            if dom.release_memory():
                self._unreleased.discard(dom)
        return len(self._unreleased)

    # ------------------------------------------------------------------ services
    def send_virq(self, dom: Domain, virq: int) -> None:
        """Raise ``virq`` on the port the domain bound it to (if any)."""
        port = dom.virqs.get(virq)
        if port is not None and dom.alive:
            evtchn.set_pending(dom, port)

    def set_timer(self, dom: Domain, deadline_ns: int) -> None:
        """One-shot VIRQ_TIMER at system time ``deadline_ns`` (0 cancels).

        The deadline is state: one pending deadline per domain, replaced by every call, and at
        most one timer task per domain that sleeps until it and is woken when it changes.  A
        guest calling this in a loop costs a store and an event, never a task per call.
        """
        dom.timer_deadline_ns = max(deadline_ns, 0)
        wake = dom.timer_wake
        if wake is not None:  # the domain's timer task is running: let it look again
            wake.set()
            return
        if deadline_ns <= 0 or not dom.alive:
            return
        scope = trio.CancelScope()
        dom.timer_scope = scope
        dom.timer_wake = trio.Event()

        async def run_timer() -> None:
            try:
                with scope:
                    while dom.timer_deadline_ns > 0:
                        deadline = dom.timer_deadline_ns
                        wake = dom.timer_wake = trio.Event()
                        with trio.move_on_at(deadline / 1e9):
                            await wake.wait()
                        if dom.timer_deadline_ns == deadline and not wake.is_set():
                            dom.timer_deadline_ns = 0
                            self.send_virq(dom, VIRQ_TIMER)
            finally:
                if dom.timer_scope is scope:
                    dom.timer_scope = None
                dom.timer_wake = None

        self._require_nursery().start_soon(run_timer)

    @staticmethod
    def now_ns() -> int:
        """Hypervisor system time in ns (trio's clock: MockClock in tests)."""
        return math.floor(trio.current_time() * 1e9)

    def channel_state(self, dom: Domain, port: int) -> EvtchnStat | None:
        """The state of ``port`` of ``dom`` (None when closed), for tests and tools."""
        ch = dom.ports.get(port)
        if ch is None:
            return None
        return EvtchnStat.interdomain if ch.state == SERVICE else EvtchnStat(ch.state)

    def snapshot(self) -> Snapshot:
        """Every domain's and device's counters, frozen (see :mod:`pvio.core.counters`)."""
        return self.counters.snapshot()

    def trace(self, path: str | os.PathLike[str] | None = None) -> Tracer:
        """An event timeline of every counted event (see :mod:`pvio.core.trace`):
        ``with hv.trace("run.json"):`` records while the block runs, then writes the file."""
        return Tracer(self, path)
