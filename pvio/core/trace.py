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
  (``c.__class__ = TracedCounters``), and of every one created while it runs (the
  registry's ``on_new`` hook), to :class:`TracedCounters`, whose ``__setitem__`` stores
  the value and appends ``(track, key, delta, value, trio.current_time())`` to the
  tracer's log.  :meth:`Tracer.stop` switches them back.
* **Free when off**: with no tracer running, every counter is a plain :class:`Counters`
  whose ``__setitem__`` is the C one of ``dict``; there is no flag to test on the hot
  path, no wrapper, nothing.  The cost when on is one Python call and one list append per
  bump; the log is turned into JSON only when asked for (:meth:`Tracer.events`).
* **Agrees with the counters by construction**: the event *is* the bump, so for every
  owner and key the sum of the traced deltas equals what the counter moved by while the
  tracer ran.  Bumps by zero (including a defaultdict's first read of a missing key) are
  not events.
* **Deterministic**: timestamps come from trio's clock (MockClock in tests), relative to
  when the tracer started, in whole nanoseconds; tracks are numbered in the order owners
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

import contextlib
import json
import math
import os
from types import TracebackType
from typing import TYPE_CHECKING, Any

import trio

from pvio.core.counters import CounterRegistry, Counters

if TYPE_CHECKING:
    from pvio.core.hypervisor import Hypervisor

__all__ = ["COUNTER_TRACK_FAMILIES", "TracedCounters", "Tracer"]

#: Counter families that also get a counter track (running totals) per owner.
COUNTER_TRACK_FAMILIES = frozenset({"packets", "drops"})

#: One bump: (track number, key, delta, value after, trio time or NaN outside a trio run).
Record = tuple[int, str, int, int, float]

_dict_get = dict.get
_dict_set = dict.__setitem__
_current_time = trio.current_time


class TracedCounters(Counters):
    """A :class:`Counters` whose every change is logged; only a running :class:`Tracer`
    switches counters to this class (and back)."""

    _trace_log: list[Record]
    _trace_track: int

    def __setitem__(self, key: str, value: int) -> None:
        old = _dict_get(self, key, 0)
        _dict_set(self, key, value)
        if value != old:
            try:
                now = _current_time()
            except RuntimeError:  # bumped outside a trio run: stamped like the event before
                now = math.nan
            self._trace_log.append((self._trace_track, key, value - old, value, now))


class Tracer:
    """Records every counter bump of a hypervisor (or a bare registry) as trace events.

    ``start()`` / ``stop()``, or use it as a context manager (which writes ``path``, if
    given, on exit).  ``events()`` is the Trace Event Format list, ``to_json()`` the file's
    text, ``write(path)`` the file.  A stopped tracer may be started again: the timeline
    goes on, with the same tracks.
    """

    def __init__(
        self, source: Hypervisor | CounterRegistry, path: str | os.PathLike[str] | None = None
    ) -> None:
        if isinstance(source, CounterRegistry):
            self.registry, self._hv = source, None
        else:
            self.registry, self._hv = source.counters, source
        self.path = path
        self.running = False
        self._log: list[Record] = []
        self._tracks: list[tuple[str, str]] = []  # (owner, kind) by track number
        self._track_of: dict[str, int] = {}
        self._names: dict[str, str] = {}  # domain owner -> domain name
        self._t0: float | None = None

    # ------------------------------------------------------------------ recording
    def start(self) -> Tracer:
        """Trace every counter of the registry, and every one created, until :meth:`stop`."""
        if self.running:
            raise RuntimeError("the tracer is running already")
        if any(type(self.registry[o]) is TracedCounters for o in self.registry):
            raise RuntimeError("these counters are being traced by another tracer")
        if self._t0 is None:
            with contextlib.suppress(RuntimeError):  # outside a trio run: the first event is the origin
                self._t0 = trio.current_time()
        for owner in self.registry:
            self._adopt(self.registry[owner])
        self.registry.on_new.append(self._adopt)
        self.running = True
        return self

    def stop(self) -> None:
        """Stop recording: every traced counter is a plain :class:`Counters` again."""
        if not self.running:
            return
        self.registry.on_new.remove(self._adopt)
        for owner in self.registry:
            c = self.registry[owner]
            if type(c) is TracedCounters and c._trace_log is self._log:
                c.__class__ = Counters
                del c._trace_log, c._trace_track
        self.running = False
        self._note_names()

    def _adopt(self, c: Counters) -> None:
        if type(c) is not Counters:
            return
        track = self._track_of.get(c.owner)
        if track is None:
            track = self._track_of[c.owner] = len(self._tracks)
            self._tracks.append((c.owner, c.kind))
        c.__class__ = TracedCounters
        assert isinstance(c, TracedCounters)
        c._trace_log = self._log
        c._trace_track = track
        self._note_names()

    def _note_names(self) -> None:
        """Remember the live domains' names (a domain's counters exist before it is listed)."""
        if self._hv is not None:
            for domid, dom in self._hv.domains.items():
                self._names[f"dom{domid}"] = dom.name

    def __len__(self) -> int:
        """The number of bumps recorded."""
        return len(self._log)

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
        self._note_names()
        tracks = self.tracks()
        events: list[dict[str, Any]] = []
        named: set[int] = set()
        labels: list[tuple[int, int, str]] = []  # by track number: pid, tid, counter-track label
        for (owner, kind), (pid, tid) in zip(self._tracks, tracks.values(), strict=True):
            if pid not in named:
                named.add(pid)
                events.append(_meta("process_name", pid, None, name=self._process_name(owner, kind)))
                events.append(_meta("process_sort_index", pid, None, sort_index=pid))
            thread = "vcpu0" if kind == "domain" else owner.partition("/")[2] or owner
            events.append(_meta("thread_name", pid, tid, name=thread, owner=owner))
            events.append(_meta("thread_sort_index", pid, tid, sort_index=tid))
            labels.append((pid, tid, owner if kind == "domain" else thread))
        t0 = self._t0
        last_ns = -1
        for track, key, delta, value, now in self._log:
            if t0 is None and now == now:
                t0 = now
            ns = round((now - t0) * 1e9) if now == now and t0 is not None else 0
            last_ns = max(ns, last_ns + 1)  # bumps at one clock reading: 1 ns apart, in order
            ts = last_ns / 1000
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

    def _process_name(self, owner: str, kind: str) -> str:
        if kind != "domain":
            return _group(owner, kind)
        name = self._names.get(owner)
        return owner if not name or name == owner else f"{owner} {name}"

    def to_json(self) -> str:
        """The trace file's text: ``{"displayTimeUnit": "ns", "traceEvents": [...]}``, one event
        a line, keys sorted (the same bytes for the same events)."""
        lines = ",\n".join(json.dumps(e, sort_keys=True, separators=(",", ":")) for e in self.events())
        return '{"displayTimeUnit":"ns","traceEvents":[\n' + lines + "\n]}\n"

    def write(self, path: str | os.PathLike[str]) -> None:
        """Write :meth:`to_json` to ``path``."""
        with open(path, "w", encoding="utf-8") as f:
            f.write(self.to_json())


def _group(owner: str, kind: str) -> str:
    """The process a track belongs to: the domain itself, or the device's kind."""
    return owner if kind == "domain" else owner.partition("/")[0]


def _meta(what: str, pid: int, tid: int | None, **args: Any) -> dict[str, Any]:
    event: dict[str, Any] = {"name": what, "ph": "M", "pid": pid, "args": args}
    if tid is not None:
        event["tid"] = tid
    return event
