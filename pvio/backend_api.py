"""The custom Backend API: user code on a vif's frame path, and the registry that finds it.

Design rationale
----------------
A *backend* (in this API's sense) is a user-written stage that sits on one vif between
netback and the virtual switch::

    guest -> netfront -> netback -> Backend.process_tx -> switch
    guest <- netfront <- netback <- Backend.process_rx <- switch

It sees whole Ethernet frames as ``bytes``, a batch at a time (one ring drain), and
returns the batch that continues: it can pass, drop, rewrite, reorder, duplicate or
delay frames.  Batches, not single frames, because Python per packet is the budget
(docs/architecture.md, "Performance"): a stage that is called once per batch costs one call, not N.

Backends are found the way the built-in ones are: through the entry-point group
``pvio.backends``, so a user's package plugs one in by declaring, in its pyproject::

    [project.entry-points."pvio.backends"]
    lossy = "pvio.backends.lossy:LossyLinkBackend"

:func:`register_backend` adds classes defined at run time (scripts, tests) to the same
namespace.  The backend API never imports a backend module: it only loads what
the entry points name.

Faults (a custom backend that raises gets a clear error, and dom0 keeps running)
--------------------------------------------------------------------------------
:class:`BackendHost` is what netback calls.  It runs each hook and contains its faults:

- a hook that **raises**: logged on ``pvio.backend`` with the backend's name and vif and
  the traceback; ``backend_errors`` counted; the batch is dropped and counted
  ``drops.backend_error`` (its frames are never lost silently);
- a hook that **returns something else than a list of bytes**: the same, with a message
  naming the backend, the hook and the bad value (``backend_errors.bad_return``);
- after ``max_consecutive_errors`` (default 3) failed calls in a row (either direction;
  a good call resets the count) the backend is **disabled**: its ``on_detach`` is called,
  ``backend_disabled`` is counted once and logged once, and from then on frames **pass
  through unchanged** (counted ``bypassed``).  Failing *open* keeps the guest's network
  up when a shaping or measuring stage breaks, which is what most backends are; a
  backend that must fail *closed* (a firewall) sets ``fail_open = False``, and a disabled
  one then drops every frame, counted ``drops.backend_disabled``.

Counters of a backend (owner ``backend/<vif name>``, kind "device"), besides what the
backend counts itself: ``backend_errors``, ``backend_errors.raised``,
``backend_errors.bad_return``, ``drops.backend_error``, ``backend_disabled``,
``bypassed``, ``drops.backend_disabled``, ``delayed.released`` (frames released by a
:class:`DelayLine`).

Delayed release (latency injection)
-----------------------------------
``ctx.schedule(delay_s, frames, direction)`` hands frames back to the host, to continue
on their way ``delay_s`` seconds later *without* passing through the backend again.
:class:`DelayLine` is the trio implementation a host plugs into the context; it follows
``trio.current_time()``, so under a ``MockClock`` a scenario's timing is reproducible.
"""

from __future__ import annotations

import heapq
import importlib.metadata
import itertools
import logging
import math
from collections.abc import Callable, Mapping
from typing import Any, ClassVar, Literal

import trio

from pvio.core.counters import CounterRegistry, Counters

__all__ = [
    "ENTRY_POINT_GROUP",
    "Backend",
    "BackendContext",
    "BackendError",
    "BackendHost",
    "BackendLoadError",
    "DelayLine",
    "Direction",
    "PassthroughBackend",
    "available_backends",
    "load_backend",
    "register_backend",
    "unregister_backend",
]

log = logging.getLogger("pvio.backend")

ENTRY_POINT_GROUP = "pvio.backends"

Direction = Literal["tx", "rx"]
"""``"tx"``: from the guest towards the switch; ``"rx"``: from the switch towards the guest."""

DIRECTIONS: tuple[Direction, ...] = ("tx", "rx")


class BackendError(Exception):
    """A custom backend misbehaved (raised at attach, or was used wrongly)."""


class BackendLoadError(BackendError):
    """An entry point or registration does not give a usable :class:`Backend` class."""


# -- what a backend sees ----------------------------------------------------------------


class BackendContext:
    """What the host gives a backend at attach time: who it is on, its options, time, delay.

    ``name``: the vif name (``vif<domid>.<devid>``); ``domid``: the guest's domain id;
    ``counters``: the backend's device counters, owner ``backend/<name>``; ``options``: the
    backend's configuration (from the scenario or the caller); ``now()``: the current time
    in seconds (trio's clock by default); ``schedule(delay_s, frames, direction)``: release
    ``frames`` in ``direction`` after ``delay_s`` seconds.
    """

    def __init__(
        self,
        name: str,
        domid: int,
        counters: Counters | CounterRegistry | None = None,
        options: Mapping[str, Any] | None = None,
        *,
        clock: Callable[[], float] = trio.current_time,
        scheduler: Callable[[float, list[bytes], Direction], None] | None = None,
    ) -> None:
        self.name = name
        self.domid = domid
        owner = f"backend/{name}"
        if isinstance(counters, CounterRegistry):
            counters = counters.new(owner, "device")
        self.counters: Counters = counters if counters is not None else Counters(owner, "device")
        self.options: Mapping[str, Any] = dict(options or {})
        self._clock = clock
        self._scheduler = scheduler

    def now(self) -> float:
        """The current time in seconds (monotonic; trio's clock unless the host chose another)."""
        return self._clock()

    def schedule(self, delay_s: float, frames: list[bytes], direction: Direction) -> None:
        """Release ``frames`` in ``direction`` (``"tx"`` or ``"rx"``) after ``delay_s`` seconds.

        The frames continue on their way (to the switch for ``"tx"``, to the guest for
        ``"rx"``) without passing through the backend again.
        """
        if direction not in DIRECTIONS:
            raise ValueError(f"backend on {self.name}: direction must be 'tx' or 'rx', got {direction!r}")
        if not (delay_s >= 0 and math.isfinite(delay_s)):
            raise ValueError(f"backend on {self.name}: delay_s must be finite and >= 0, got {delay_s!r}")
        if self._scheduler is None:
            raise BackendError(f"the host of vif {self.name} does not support delayed release (schedule)")
        self._scheduler(delay_s, frames, direction)

    def __repr__(self) -> str:
        return f"<BackendContext {self.name} dom{self.domid} options={dict(self.options)!r}>"


class Backend:
    """Subclass this to put your code on a vif's frame path.

    Set the class attribute ``name`` (the name users load it by; it must match the entry
    point's name) and override the hooks you need.  One instance serves one vif; it is
    created with no arguments and configured in :meth:`on_attach` from ``ctx.options``.
    Hooks run on the switch's data path: keep them fast, never block (use
    ``ctx.schedule`` to delay frames), and return a ``list`` of ``bytes``.
    """

    name: ClassVar[str]
    fail_open: ClassVar[bool] = True
    """When disabled after repeated errors: pass frames through (True) or drop them (False)."""
    ctx: BackendContext
    """Set by the default :meth:`on_attach` (an override should keep it too)."""

    def on_attach(self, ctx: BackendContext) -> None:
        """The vif is connected: keep ``ctx``, read ``ctx.options``, set up state."""
        self.ctx = ctx

    def on_detach(self) -> None:
        """The vif is going away (or the backend was disabled): release what you hold."""

    def process_tx(self, frames: list[bytes]) -> list[bytes]:
        """Frames from the guest; return those that continue to the switch (default: all)."""
        return frames

    def process_rx(self, frames: list[bytes]) -> list[bytes]:
        """Frames to the guest; return those that continue to netback (default: all)."""
        return frames


class PassthroughBackend(Backend):
    """The identity backend: every frame continues unchanged.  The default of a vif."""

    name = "passthrough"


# -- the host side: what netback calls --------------------------------------------------


class BackendHost:
    """Runs one :class:`Backend` for one vif and contains its faults (see the module doc).

    Calls ``backend.on_attach(ctx)`` on construction; an error there is raised as a
    :class:`BackendError` naming the backend and vif (a configuration error belongs to
    setup time, where the user sees it).
    """

    def __init__(self, backend: Backend, ctx: BackendContext, max_consecutive_errors: int = 3) -> None:
        if not isinstance(backend, Backend):
            raise TypeError(f"vif {ctx.name}: a backend must be a pvio Backend instance, got {backend!r}")
        if max_consecutive_errors < 1:
            raise ValueError(
                f"vif {ctx.name}: max_consecutive_errors must be >= 1, got {max_consecutive_errors}"
            )
        self.backend = backend
        self.ctx = ctx
        self.counters = ctx.counters
        self.max_consecutive_errors = max_consecutive_errors
        self.disabled = False
        self.detached = False
        self._consecutive_errors = 0
        self._label = f"backend {_backend_name(backend)!r} on {ctx.name} (dom{ctx.domid})"
        try:
            backend.on_attach(ctx)
        except Exception as exc:
            raise BackendError(f"{self._label}: on_attach failed: {exc!r}") from exc

    def tx(self, frames: list[bytes]) -> list[bytes]:
        """Frames from the guest through the backend; what it returns goes to the switch."""
        return self._run("process_tx", self.backend.process_tx, frames)

    def rx(self, frames: list[bytes]) -> list[bytes]:
        """Frames from the switch through the backend; what it returns goes to the guest."""
        return self._run("process_rx", self.backend.process_rx, frames)

    def detach(self) -> None:
        """The vif is going away: call ``on_detach`` once (an error there is logged, not raised)."""
        if not self.detached:
            self.detached = True
            self._call_on_detach()

    def _run(self, hook: str, fn: Callable[[list[bytes]], list[bytes]], frames: list[bytes]) -> list[bytes]:
        counters = self.counters
        if self.disabled:
            if self.backend.fail_open:
                counters["bypassed"] += len(frames)
                return frames
            counters["drops.backend_disabled"] += len(frames)
            return []
        n = len(frames)
        try:
            out = fn(frames)
        except Exception:
            log.error("%s: %s raised; %d frames dropped", self._label, hook, n, exc_info=True)
            counters["backend_errors.raised"] += 1
            self._failed(n)
            return []
        if out is frames or _is_frame_list(out):
            self._consecutive_errors = 0
            return out
        log.error("%s: %s %s; %d frames dropped", self._label, hook, _describe_bad_return(out), n)
        counters["backend_errors.bad_return"] += 1
        self._failed(n)
        return []

    def _failed(self, n_frames: int) -> None:
        counters = self.counters
        counters["backend_errors"] += 1
        counters["drops.backend_error"] += n_frames
        self._consecutive_errors += 1
        if self._consecutive_errors >= self.max_consecutive_errors:
            self.disabled = True
            counters["backend_disabled"] += 1
            log.error(
                "%s: disabled after %d consecutive errors; frames now %s",
                self._label,
                self._consecutive_errors,
                "pass through unchanged" if self.backend.fail_open else "are dropped (fail_open = False)",
            )
            if not self.detached:
                self.detached = True
                self._call_on_detach()

    def _call_on_detach(self) -> None:
        try:
            self.backend.on_detach()
        except Exception:
            log.error("%s: on_detach raised", self._label, exc_info=True)
            self.counters["backend_errors.on_detach"] += 1


def _is_frame_list(out: object) -> bool:
    if type(out) is not list:
        return False
    return all(isinstance(frame, bytes) for frame in out)


def _describe_bad_return(out: object) -> str:
    """Why ``out`` is not a valid hook result, in words that point at the bad value."""
    if not isinstance(out, list):
        return f"returned {type(out).__name__} {_short_repr(out)}, expected list[bytes]"
    for i, frame in enumerate(out):
        if not isinstance(frame, bytes):
            bad = f"{type(frame).__name__} {_short_repr(frame)}"
            return f"returned a list whose item {i} is {bad}, expected bytes"
    return f"returned {type(out).__name__} (a list subclass), expected a plain list[bytes]"


def _short_repr(value: object, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _backend_name(backend: Backend) -> str:
    return getattr(type(backend), "name", None) or type(backend).__qualname__


class DelayLine:
    """The trio side of ``ctx.schedule``: holds frames until their release time.

    ``deliver_tx(frames)`` is called with frames released towards the switch,
    ``deliver_rx(frames)`` with frames released towards the guest; frames scheduled for
    the same instant are released in the order they were scheduled.  Run :meth:`run` in
    the vif's nursery; pass :meth:`schedule` as the context's ``scheduler``.  Time is
    ``trio.current_time()`` (a ``MockClock`` makes it reproducible).  ``max_frames`` bounds
    the frames held per vif (bounded queued memory per peer): beyond it, frames are
    dropped, counted ``drops.delay_full``.
    """

    def __init__(
        self,
        deliver_tx: Callable[[list[bytes]], None],
        deliver_rx: Callable[[list[bytes]], None],
        counters: Counters | None = None,
        max_frames: int = 65536,
    ) -> None:
        self._deliver: dict[str, Callable[[list[bytes]], None]] = {"tx": deliver_tx, "rx": deliver_rx}
        self.counters = counters if counters is not None else Counters("delayline", "device")
        self.max_frames = max_frames
        self._heap: list[tuple[float, int, Direction, list[bytes]]] = []
        self._seq = itertools.count()
        self._held = 0
        self._wakeup = trio.Event()

    @property
    def held(self) -> int:
        """Frames waiting for release."""
        return self._held

    def schedule(self, delay_s: float, frames: list[bytes], direction: Direction) -> None:
        """Hold ``frames`` for ``delay_s`` seconds, then deliver them in ``direction``."""
        if not frames:
            return
        room = self.max_frames - self._held
        if len(frames) > room:
            self.counters["drops.delay_full"] += len(frames) - max(room, 0)
            frames = frames[: max(room, 0)]
            if not frames:
                return
        deadline = trio.current_time() + delay_s
        earliest = self._heap[0][0] if self._heap else math.inf
        heapq.heappush(self._heap, (deadline, next(self._seq), direction, list(frames)))
        self._held += len(frames)
        if deadline < earliest:
            self._wakeup.set()

    async def run(self) -> None:
        """Release frames at their deadlines, forever (cancel the scope to stop)."""
        heap = self._heap
        while True:
            if heap:
                with trio.move_on_at(heap[0][0]):
                    await self._wakeup.wait()
            else:
                await self._wakeup.wait()
            self._wakeup = trio.Event()
            self.release_due()

    def release_due(self) -> int:
        """Deliver every batch whose deadline has passed; return how many frames."""
        heap = self._heap
        now = trio.current_time()
        released = 0
        while heap and heap[0][0] <= now:
            _, _, direction, frames = heapq.heappop(heap)
            self._held -= len(frames)
            released += len(frames)
            try:
                self._deliver[direction](frames)
            except Exception:
                log.error("delay line: delivering %d %s frames raised", len(frames), direction, exc_info=True)
                self.counters["drops.delay_deliver_error"] += len(frames)
                continue
            self.counters["delayed.released"] += len(frames)
        return released


# -- the registry -----------------------------------------------------------------------

_registered: dict[str, type[Backend]] = {}


def _target(cls: type) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


def _entry_points(name: str | None = None) -> list[importlib.metadata.EntryPoint]:
    eps = importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)
    return list(eps if name is None else eps.select(name=name))


def _check_backend_class(obj: object, where: str, expected_name: str | None) -> type[Backend]:
    if not (isinstance(obj, type) and issubclass(obj, Backend)):
        raise BackendLoadError(f"{where} is {obj!r}, which is not a subclass of pvio.backend_api.Backend")
    name = getattr(obj, "name", None)
    if not isinstance(name, str) or not name:
        raise BackendLoadError(f"{where}: {obj.__qualname__} has no class attribute 'name' (a non-empty str)")
    if expected_name is not None and name != expected_name:
        raise BackendLoadError(
            f"{where}: the entry point is named {expected_name!r} but {obj.__qualname__}.name is {name!r}; "
            "make them the same"
        )
    return obj


def register_backend(cls: type[Backend]) -> type[Backend]:
    """Make ``cls`` loadable by ``cls.name`` (usable as a class decorator).

    For backends defined at run time; installed packages use the ``pvio.backends``
    entry-point group instead.  Registering a name that an entry point or another class
    already uses is an error; registering the same class again is harmless.
    """
    cls = _check_backend_class(cls, f"register_backend({cls!r})", None)
    name = cls.name
    existing = _registered.get(name)
    if existing is not None and existing is not cls:
        raise ValueError(f"backend name {name!r} is already registered by {_target(existing)}")
    for ep in _entry_points(name):
        if ep.value != _target(cls):
            raise ValueError(
                f"backend name {name!r} is already provided by entry point {ep.name} = {ep.value}"
            )
    _registered[name] = cls
    return cls


def unregister_backend(name: str) -> None:
    """Forget a backend registered with :func:`register_backend` (entry points stay)."""
    if _registered.pop(name, None) is None:
        raise LookupError(f"no backend {name!r} was registered with register_backend()")


def available_backends() -> dict[str, str]:
    """Every loadable backend: name -> ``"module:attr"``, sorted by name (nothing is imported)."""
    found = {ep.name: ep.value for ep in _entry_points()}
    for name, cls in _registered.items():
        found.setdefault(name, _target(cls))
    return dict(sorted(found.items()))


def load_backend(name: str) -> type[Backend]:
    """The Backend class called ``name``, from the ``pvio.backends`` entry points or the registry.

    Raises ``LookupError`` listing the available names when there is none, and
    :class:`BackendLoadError` naming the entry point when it cannot be imported, is not a
    Backend subclass, or several installed distributions claim the name differently.
    """
    eps = _entry_points(name)
    targets = sorted({ep.value for ep in eps})
    if len(targets) > 1:
        raise BackendLoadError(f"backend {name!r} is provided by several entry points: {', '.join(targets)}")
    if eps:
        ep = eps[0]
        where = f"entry point {ep.name} = {ep.value} (group {ENTRY_POINT_GROUP!r})"
        try:
            obj = ep.load()
        except Exception as exc:
            raise BackendLoadError(f"{where} failed to import: {exc!r}") from exc
        return _check_backend_class(obj, where, name)
    if name in _registered:
        return _registered[name]
    names = ", ".join(available_backends()) or "none"
    raise LookupError(f"no backend named {name!r}; available backends: {names}")
