"""The event timeline: every counted event as a Chrome/Perfetto trace event.

``with Tracer(hv, path="run.json"):`` (or ``with hv.trace("run.json"):``) records every
counter bump of every domain and device while the block runs and writes a file in the
Trace Event Format, which ui.perfetto.dev (or chrome://tracing) opens as a timeline.

Design
------
All counting in pvio goes through :class:`pvio.core.counters.Counters`, a defaultdict
bumped on the hot path with ``c["key"] += 1``; the hypervisor's
:class:`~pvio.core.counters.CounterRegistry` knows every one.  The tracer therefore hooks
the counters themselves rather than adding trace calls next to them:

* :meth:`Tracer.start` switches the class of every :class:`Counters` of the registry
  (``c.__class__ = ...``), and of every one created while it runs (the registry's
  ``on_new`` hook), to a :class:`TracedCounters` subclass whose ``__setitem__`` stores the
  value and appends ``owner, key, value, clock reading`` to the tracer's log.
  :meth:`Tracer.stop` switches them back.
* **Free when off**: with no tracer running, every counter is a plain :class:`Counters`
  whose ``__setitem__`` is the C one of ``dict``; there is no flag to test on the hot
  path, no wrapper, nothing.  When on, a bump costs one Python call and one
  ``list.extend`` of four atoms (a flat log: nothing the cyclic garbage collector has to
  track, so a long trace does not slow the run down as it grows); deltas, tracks and
  JSON are worked out from the log only when asked for (:meth:`Tracer.events`).
* **Agrees with the counters by construction**: the event *is* the bump, so for every
  owner and key the sum of the traced deltas equals what the counter moved by while the
  tracer ran (each start logs the counters' values as a baseline).  Stores that change
  nothing (a defaultdict's first read of a missing key, a bump by 0) are not events.
* **Deterministic**: timestamps come from trio's clock (MockClock in tests), relative to
  when the tracer first started, in whole nanoseconds; tracks are numbered in the order owners
  registered; the JSON is written with sorted keys.  A fixed scenario under MockClock
  gives the same bytes on every run.
* **Ordered**: bumps that read the same clock value are spread 1 ns apart in the order
  they happened, so every event has its own timestamp and the timeline shows the order.
  Under MockClock time stands still while tasks run, so a busy phase is a run of events
  1 ns apart; with the real clock two bumps are never within 1 ns, so nothing moves.

Counters that are not plain :class:`Counters` (a subclass of someone else's), or that
were made outside the registry, are left alone and not traced.  One tracer per registry
at a time.

Tracks
------
Each domain is a process (``dom1 a``) with one thread, its vCPU (``vcpu0``): exits,
hypercalls, hypercall errors, upcalls (``interrupts``), event channel sends and raises,
grant operations.  Each kind of device is a process (``netback``, ``netfront``,
``switch``, ``smartnic``, ...) with a thread per device (``vif1.0``, ``switch0``, ...):
notifications sent / suppressed (one per ring push), packets, bytes, drops, interrupt
moderation decisions (``irqs.by_frames`` / ``irqs.by_timer``), doorbells, polls.

Events
------
* one instant event (``ph: "i"``, thread scope) per bump: ``name`` is the counter key
  (``hypercalls.grant_table_op.copy``), ``cat`` its first component (``hypercalls``),
  ``args`` ``{"delta": n, "value": total}``;
* a counter track (``ph: "C"``) per device and family for ``packets.*`` and ``drops.*``:
  ``vif1.0 packets`` with series ``rx``/``tx``, the running totals;
* metadata (``ph: "M"``): ``process_name``/``thread_name`` for every track, and sort
  indices that keep the tracks in registration order.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Iterator
from types import TracebackType
from typing import TYPE_CHECKING, Any

import trio

from pvio.core.counters import CounterRegistry, Counters

if TYPE_CHECKING:
    from pvio.core.hypervisor import Hypervisor

__all__ = ["COUNTER_TRACK_FAMILIES", "TracedCounters", "Tracer"]

#: Counter families that also get a counter track (running totals) per owner.
COUNTER_TRACK_FAMILIES = frozenset({"packets", "drops"})

#: A tracer's log is flat: four items per entry, (owner, key, value after the bump, clock
#: reading).  An entry whose key is None is a baseline: its value is a copy of the owner's
#: values when tracing (re)started, against which the next bumps' deltas are taken.
Log = list[Any]


class TracedCounters(Counters):
    """The base of the classes a running :class:`Tracer` gives counters (one class per
    tracer, whose ``__setitem__`` appends to that tracer's log); never instantiated."""


def _traced_class(log: Log, now: Callable[[], float]) -> type[TracedCounters]:
    """A :class:`TracedCounters` subclass logging into ``log`` with clock ``now``.

    The hot path: a bump is a dict store plus one extend of the log; the previous value
    and the delta are worked out later, from the log, by :meth:`Tracer.events`.
    """

    class Traced(TracedCounters):
        def __setitem__(
            self, key: str, value: int, _set: Any = dict.__setitem__, _log: Any = log.extend, _now: Any = now
        ) -> None:
            _set(self, key, value)
            _log((self.owner, key, value, _now()))

    Traced.__name__ = Traced.__qualname__ = "TracedCounters"
    return Traced


def _clock_reader() -> Callable[[], float]:
    """How to read the current trio run's clock as cheaply as possible.

    trio's real clock is ``perf_counter()`` plus a constant offset, and timestamps are
    relative to the tracer's start, so ``perf_counter`` itself will do; any other clock
    (MockClock, a custom one) is read through its ``current_time``.
    """
    try:
        clock = trio.lowlevel.current_clock()
    except RuntimeError:
        return _trio_time_or_nan
    if type(clock).__name__ == "SystemClock" and type(clock).__module__.startswith("trio."):
        return time.perf_counter
    return clock.current_time


def _trio_time_or_nan() -> float:
    """trio's clock, or NaN outside a trio run (such a bump is stamped like the one before)."""
    try:
        return trio.current_time()
    except RuntimeError:
        return math.nan


class Tracer:
    """Records every counter bump of a hypervisor (or a bare registry) as trace events.

    ``start()`` / ``stop()``, or use it as a context manager (which writes ``path``, if
    given, on exit).  ``events()`` is the Trace Event Format list, ``to_json()`` the file's
    text, ``write(path)`` the file.  A stopped tracer may be started again: the timeline
    goes on, with the same tracks.  Timestamps are read from the clock of the trio run the
    tracer was started in, relative to its first start.
    """

    def __init__(
        self, source: Hypervisor | CounterRegistry, path: str | os.PathLike[str] | None = None
    ) -> None:
        if isinstance(source, CounterRegistry):
            self.registry, self._hv = source, None
        else:
            self.registry, self._hv = source.counters, source
        self.path = path
        self._log: Log = []
        self._class: type[TracedCounters] | None = None  # while running
        self._tracks: list[tuple[str, str]] = []  # (owner, kind) by track number
        self._track_of: dict[str, int] = {}
        self._names: dict[str, str] = {}  # domain owner -> domain name
        self._t0: float | None = None

    @property
    def running(self) -> bool:
        """Whether the tracer is recording."""
        return self._class is not None

    # ------------------------------------------------------------------ recording
    def start(self) -> Tracer:
        """Trace every counter of the registry, and every one created, until :meth:`stop`."""
        if self.running:
            raise RuntimeError("the tracer is running already")
        if any(isinstance(self.registry[o], TracedCounters) for o in self.registry):
            raise RuntimeError("these counters are being traced by another tracer")
        now = _clock_reader()
        if self._t0 is None and not math.isnan(t := now()):
            self._t0 = t
        self._class = _traced_class(self._log, now)
        for owner in self.registry:
            self._adopt(self.registry[owner])
        self.registry.on_new.append(self._adopt)
        return self

    def stop(self) -> None:
        """Stop recording: every traced counter is a plain :class:`Counters` again."""
        if self._class is None:
            return
        self.registry.on_new.remove(self._adopt)
        for owner in self.registry:
            c = self.registry[owner]
            if type(c) is self._class:
                _set_class(c, Counters)
        self._class = None
        self._note_names()

    def _adopt(self, c: Counters) -> None:
        if type(c) is not Counters or self._class is None:
            return  # someone else's subclass (or another tracer's): left alone
        if c.owner not in self._track_of:
            self._track_of[c.owner] = len(self._tracks)
            self._tracks.append((c.owner, c.kind))
        if c:
            self._log.extend((c.owner, None, dict(c), math.nan))
        _set_class(c, self._class)
        self._note_names()

    def _note_names(self) -> None:
        """Remember the live domains' names (a domain's counters exist before it is listed)."""
        if self._hv is not None:
            for domid, dom in self._hv.domains.items():
                self._names[f"dom{domid}"] = dom.name

    def __len__(self) -> int:
        """The number of log entries (bumps, and a baseline per owner and start)."""
        return len(self._log) // 4

    def __enter__(self) -> Tracer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
        if self.path is not None:
            self.write(self.path)

    # ------------------------------------------------------------------ output
    def tracks(self) -> dict[str, tuple[int, int]]:
        """Every traced owner's (pid, tid), in registration order."""
        groups: dict[str, int] = {}
        out = {}
        for tid, (owner, kind) in enumerate(self._tracks, start=1):
            group = _group(owner, kind)
            pid = groups.setdefault(group, len(groups) + 1)
            out[owner] = (pid, tid)
        return out

    def events(self) -> list[dict[str, Any]]:
        """The Trace Event Format events: metadata first, then the bumps in the order they happened."""
        events, labels = self._metadata()
        for track, key, delta, value, ts in self._bumps():
            pid, tid, label = labels[track]
            family, _, rest = key.partition(".")
            events.append(
                {
                    "name": key,
                    "cat": family,
                    "ph": "i",
                    "s": "t",
                    "ts": ts,
                    "pid": pid,
                    "tid": tid,
                    "args": {"delta": delta, "value": value},
                }
            )
            if family in COUNTER_TRACK_FAMILIES:
                events.append(
                    {
                        "name": f"{label} {family}",
                        "cat": family,
                        "ph": "C",
                        "ts": ts,
                        "pid": pid,
                        "args": {rest or "total": value},
                    }
                )
        return events

    def to_json(self) -> str:
        """The trace file's text: ``{"displayTimeUnit": "ns", "traceEvents": [...]}``, one event
        a line, keys sorted (the same bytes for the same events).

        The same events as :meth:`events`, formatted from per-track templates rather than
        by ``json.dumps`` of each event (several times faster on long traces).
        """
        meta, labels = self._metadata()
        lines = [_dumps(e) for e in meta]
        templates: dict[tuple[int, str], tuple[str, str, str]] = {}  # by (track, key)
        for track, key, delta, value, ts in self._bumps():
            parts = templates.get((track, key))
            if parts is None:
                pid, tid, label = labels[track]
                family, _, rest = key.partition(".")
                cat = _dumps(family)
                i = f',"cat":{cat},"name":{_dumps(key)},"ph":"i","pid":{pid},"s":"t","tid":{tid},"ts":'
                c_arg = c = ""
                if family in COUNTER_TRACK_FAMILIES:
                    c_arg = _dumps(rest or "total")
                    c = f',"cat":{cat},"name":{_dumps(f"{label} {family}")},"ph":"C","pid":{pid},"ts":'
                parts = templates[track, key] = (i, c_arg, c)
            i, c_arg, c = parts
            lines.append(f'{{"args":{{"delta":{delta},"value":{value}}}{i}{ts!r}}}')
            if c:
                lines.append(f'{{"args":{{{c_arg}:{value}}}{c}{ts!r}}}')
        return '{"displayTimeUnit":"ns","traceEvents":[\n' + ",\n".join(lines) + "\n]}\n"

    def _metadata(self) -> tuple[list[dict[str, Any]], list[tuple[int, int, str]]]:
        """The metadata events naming every track, and by track number its (pid, tid, label)."""
        self._note_names()
        events: list[dict[str, Any]] = []
        named: set[int] = set()
        labels: list[tuple[int, int, str]] = []
        for (owner, kind), (pid, tid) in zip(self._tracks, self.tracks().values(), strict=True):
            if pid not in named:
                named.add(pid)
                events.append(_meta("process_name", pid, None, name=self._process_name(owner, kind)))
                events.append(_meta("process_sort_index", pid, None, sort_index=pid))
            thread = "vcpu0" if kind == "domain" else owner.partition("/")[2] or owner
            events.append(_meta("thread_name", pid, tid, name=thread, owner=owner))
            events.append(_meta("thread_sort_index", pid, tid, sort_index=tid))
            labels.append((pid, tid, owner if kind == "domain" else thread))
        return events, labels

    def _bumps(self) -> Iterator[tuple[int, str, int, int, float]]:
        """The log as (track, key, delta, value, ts in µs), bumps that changed nothing left out."""
        t0 = self._t0
        last_ns = -1
        track_of = self._track_of
        before: dict[tuple[int, str], int] = {}  # (track, key) -> the value before the bump
        log = self._log
        for i in range(0, len(log), 4):
            owner, key, value, now = log[i : i + 4]
            track = track_of[owner]
            if key is None:
                before.update(((track, k), v) for k, v in value.items())
                continue
            delta = value - before.get((track, key), 0)
            before[track, key] = value
            if not delta:
                continue  # a defaultdict's first read of a key, or a bump by 0
            if t0 is None and now == now:
                t0 = now
            ns = round((now - t0) * 1e9) if now == now and t0 is not None else 0
            last_ns = max(ns, last_ns + 1)  # bumps at one clock reading: 1 ns apart, in order
            yield track, key, delta, value, last_ns / 1000

    def _process_name(self, owner: str, kind: str) -> str:
        if kind != "domain":
            return _group(owner, kind)
        name = self._names.get(owner)
        return owner if not name or name == owner else f"{owner} {name}"

    def write(self, path: str | os.PathLike[str]) -> None:
        """Write :meth:`to_json` to ``path``."""
        with open(path, "w", encoding="utf-8") as f:
            f.write(self.to_json())


def _group(owner: str, kind: str) -> str:
    """The process a track belongs to: the domain itself, or the device's kind."""
    return owner if kind == "domain" else owner.partition("/")[0]


def _set_class(c: Counters, cls: type[Counters]) -> None:
    """Switch ``c`` to ``cls`` in place (the classes differ only in ``__setitem__``)."""
    c.__class__ = cls


def _dumps(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def _meta(what: str, pid: int, tid: int | None, **args: Any) -> dict[str, Any]:
    event: dict[str, Any] = {"name": what, "ph": "M", "pid": pid, "args": args}
    if tid is not None:
        event["tid"] = tid
    return event
