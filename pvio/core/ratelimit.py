"""Rate-limited logging for messages a peer can trigger at will.

A hostile guest can make dom0 log a warning per malformed packet, thousands per second:
the log then floods (and costs more than the packet).  :class:`LogLimiter` lets through at
most ``burst`` records per ``interval_s`` seconds of hypervisor time (trio's clock, so a
MockClock test is deterministic), counts the rest in ``counters[key]`` and says how many
were suppressed in the first record of the next window, as Linux's ``net_ratelimit``.  One
limiter per peer keeps one noisy peer from silencing another's messages.
"""

from __future__ import annotations

import logging
import time
from collections.abc import MutableMapping
from typing import Any

import trio

LOG_BURST = 10
LOG_INTERVAL_S = 5.0


def _now() -> float:
    try:
        return trio.current_time()
    except RuntimeError:  # outside a trio run (a plain unit test)
        return time.monotonic()


class LogLimiter:
    """At most ``burst`` records per ``interval_s`` through ``logger``; the rest counted."""

    def __init__(
        self,
        logger: logging.Logger,
        counters: MutableMapping[str, int] | None = None,
        *,
        burst: int = LOG_BURST,
        interval_s: float = LOG_INTERVAL_S,
        key: str = "log.suppressed",
    ) -> None:
        self.logger = logger
        self.counters = counters
        self.burst = burst
        self.interval_s = interval_s
        self.key = key
        self.suppressed = 0  # in the current window (reported when the next one opens)
        self._window_start: float | None = None
        self._emitted = 0

    def log(self, level: int, msg: str, *args: Any) -> bool:
        """Log ``msg % args`` at ``level`` unless this window's burst is spent; True if logged."""
        now = _now()
        if self._window_start is None or now - self._window_start >= self.interval_s:
            if self.suppressed:
                msg = f"{msg} (%d similar messages suppressed)"
                args = (*args, self.suppressed)
            self._window_start, self._emitted, self.suppressed = now, 0, 0
        if self._emitted >= self.burst:
            self.suppressed += 1
            if self.counters is not None:
                self.counters[self.key] += 1
            return False
        self._emitted += 1
        self.logger.log(level, msg, *args)
        return True

    def warning(self, msg: str, *args: Any) -> bool:
        return self.log(logging.WARNING, msg, *args)
