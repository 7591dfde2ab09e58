"""An example custom backend: a lossy, slow link on one vif.  Copy this file to write your own.

Why this example
----------------
Loss and latency are the two impairments every network test wants, and they show the
whole Backend API in ~100 lines: reading options at attach time, dropping frames (and
counting every drop), and delaying frames without blocking the data
path (``ctx.schedule``).  It is deterministic: "random" loss comes from a PRNG seeded
from the options, one per direction, so the same scenario drops the same frames on
every run whatever the interleaving of the two directions.

Using it
--------
The backend is declared in pvio's own pyproject, exactly as your package would declare
yours::

    [project.entry-points."pvio.backends"]
    lossy = "pvio.backends.lossy:LossyLinkBackend"

and is then found by name: ``pvio.backend_api.load_backend("lossy")``.  Options (all
optional; the defaults make a perfect link):

=====================  ===========================================================
``drop_every``         drop every Nth frame (the Nth, 2Nth, ...) of each direction;
                       0 = off
``drop_probability``   drop each frame with this probability (0.0 - 1.0)
``seed``               seed of the PRNG behind ``drop_probability`` (default 0)
``latency_ms``         hold surviving frames this many milliseconds (default 0)
``direction``          which way to impair: ``"both"`` (default), ``"tx"`` (guest to
                       switch) or ``"rx"`` (switch to guest)
=====================  ===========================================================

A frame is dropped when either rule says so.  Counters (owner ``backend/<vif>``):
``drops.injected_loss`` (frames dropped on purpose) and ``delayed`` (frames handed to
``ctx.schedule``).
"""

from __future__ import annotations

import math
import random

from pvio.backend_api import Backend, BackendContext, Direction


class LossyLinkBackend(Backend):
    """Drops and delays frames like a bad link: every Nth, and/or with a seeded probability."""

    # The name users load the backend by; it must equal the entry point's name.
    name = "lossy"

    def on_attach(self, ctx: BackendContext) -> None:
        """Read and check the options once, here, so the data path does no parsing."""
        self.ctx = ctx
        opts = ctx.options
        unknown = set(opts) - {"drop_every", "drop_probability", "seed", "latency_ms", "direction"}
        if unknown:
            raise ValueError(f"lossy backend on {ctx.name}: unknown options {sorted(unknown)}")
        # Validate every option up front: a typo in a scenario should fail at attach time
        # with a message naming the option and value, not misbehave later.
        self.drop_every = int(self._number("drop_every", 0, 0, integer=True))
        self.drop_probability = self._number("drop_probability", 0.0, 0.0, 1.0)
        self.latency_s = self._number("latency_ms", 0.0, 0.0) / 1000.0
        seed = opts.get("seed", 0)
        direction = opts.get("direction", "both")
        if direction not in ("both", "tx", "rx"):
            raise ValueError(f"lossy backend on {ctx.name}: direction must be both/tx/rx, got {direction!r}")
        self.directions: frozenset[str] = frozenset(("tx", "rx") if direction == "both" else (direction,))
        # Per-direction state, so one direction's traffic never shifts the other's pattern.
        self._seen = {"tx": 0, "rx": 0}
        self._rng = {"tx": random.Random(f"{seed}/tx"), "rx": random.Random(f"{seed}/rx")}

    def process_tx(self, frames: list[bytes]) -> list[bytes]:
        """Guest -> switch."""
        return self._impair(frames, "tx")

    def process_rx(self, frames: list[bytes]) -> list[bytes]:
        """Switch -> guest."""
        return self._impair(frames, "rx")

    def _impair(self, frames: list[bytes], direction: Direction) -> list[bytes]:
        if direction not in self.directions:
            return frames  # returning the same list is the cheapest "pass everything"
        every = self.drop_every
        probability = self.drop_probability
        rng = self._rng[direction]
        seen = self._seen[direction]
        kept: list[bytes] = []
        for frame in frames:
            seen += 1
            # Draw for every frame even when the first rule already dropped it, so the
            # PRNG sequence (and thus which frames are lost) depends only on the count.
            lost_by_chance = probability > 0.0 and rng.random() < probability
            if (every and seen % every == 0) or lost_by_chance:
                continue
            kept.append(frame)
        self._seen[direction] = seen
        dropped = len(frames) - len(kept)
        if dropped:
            # Count every drop: in pvio a frame is never lost silently.
            self.ctx.counters["drops.injected_loss"] += dropped
        if self.latency_s > 0.0 and kept:
            # Never sleep here: hand the frames to the host, which releases them later
            # (they do not pass through this backend again).  Return nothing for now.
            self.ctx.schedule(self.latency_s, kept, direction)
            self.ctx.counters["delayed"] += len(kept)
            return []
        return kept

    def _number(
        self, key: str, default: float, minimum: float, maximum: float = math.inf, integer: bool = False
    ) -> float:
        """``ctx.options[key]`` (or ``default``), checked to be a number in range, or a clear ValueError."""
        raw = self.ctx.options.get(key, default)
        kinds = (int,) if integer else (int, float)
        # bool is an int subclass; "drop_every": true is a mistake, not 1.
        if isinstance(raw, bool) or not isinstance(raw, kinds) or not minimum <= raw <= maximum:
            wanted = "an integer" if integer else "a number"
            raise ValueError(
                f"lossy backend on {self.ctx.name}: option {key} must be {wanted} in "
                f"[{minimum}, {maximum}], got {raw!r}"
            )
        return raw
