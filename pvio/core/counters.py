"""Counters: what every interrupt, exit, hypercall, notification and copy cost.

Design: one :class:`Counters` per domain and per device, each a flat mapping of dotted
names to integers, bumped on the hot path with a plain ``c["name"] += 1`` (a defaultdict).
A :class:`CounterRegistry` (one per hypervisor) knows every owner; ``snapshot()`` freezes
them all, two snapshots subtract with :meth:`Snapshot.diff`, and :meth:`Snapshot.to_json`
is the one serialisation used by the API, ``pvio demo --json`` and the pytest plugin.

Schema (a key absent from a snapshot is zero):

=============================  ==========================================================
``interrupts``                 virtual interrupts delivered to the guest's vCPU: upcalls
                               entered (one upcall may cover several ports) or IRQs
``exits``                      transfers of control guest -> monitor; ``exits.<kind>`` by
                               kind: ``hypercall``, ``pio``, ``mmio``, ``fault``
``hypercalls``                 hypercalls made; ``hypercalls.<name>`` and
                               ``hypercalls.<name>.<subop>`` by number and sub-op
``hypercall_errors``           hypercalls (or batch elements) that failed;
                               ``hypercall_errors.<ERRNO or GNTST name>``
``evtchn.sends``               EVTCHNOP_send calls made by this domain
``evtchn.raised``              events raised on this domain's ports (newly pending)
``evtchn.coalesced``           events raised on a port that was already pending
``notifications.sent``         ring pushes that required a notification (device)
``notifications.suppressed``   ring pushes whose notification the peer's event index
                               made unnecessary (device)
``grant.maps`` / ``.unmaps``   grant map / unmap operations that succeeded
``grant.copies``               grant copy elements that succeeded
``grant.copy_bytes``           bytes moved by those copies
``copies`` / ``copy_bytes``   copies of frame bytes a device model or backend makes outside
                               the guests, other than grant copies (device): netback's copy
                               of a frame into a vif's RX queue, a frame turned into ``bytes``
                               for a port or a custom backend, an emulated device's DMA
                               transfers.  A frame's copies outside the guests are
                               ``grant.copies`` + ``copies``: count every one, once, where
                               it is made
``guest_copies`` / ``.._bytes``  copies a guest's own driver makes (netfront's staging into
                               its granted pool, its copy out of an RX buffer) (device)
``packets.tx`` / ``.rx``       frames sent / received (device or domain)
``bytes.tx`` / ``.rx``         their bytes
``drops.<reason>``             frames dropped, by reason (never silently)
``xenstore.*``                 store requests by type, errors, watch events
=============================  ==========================================================

Owners are named ``dom<id>`` for domains and ``<device>`` (e.g. ``vif1.0``,
``netback/vif1.0``) for devices.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping
from types import MappingProxyType
from typing import Any


class Counters(defaultdict[str, int]):
    """The counters of one owner: ``c["grant.copies"] += 1``; missing keys read as 0."""

    def __init__(self, owner: str, kind: str = "domain") -> None:
        super().__init__(int)
        self.owner = owner
        self.kind = kind

    def add(self, key: str, n: int = 1) -> None:
        """Add ``n`` to ``key`` (the slow-path spelling of ``c[key] += n``)."""
        self[key] += n

    def freeze(self) -> Mapping[str, int]:
        """An immutable copy, without zero entries."""
        return MappingProxyType({k: v for k, v in sorted(self.items()) if v})

    def __repr__(self) -> str:
        return f"Counters({self.owner!r}, {dict(self.freeze())})"


class Snapshot(Mapping[str, Mapping[str, int]]):
    """Frozen counters of every owner at one moment: ``snap["dom1"]["interrupts"]``."""

    def __init__(self, owners: Mapping[str, Mapping[str, int]], kinds: Mapping[str, str]) -> None:
        self._owners = dict(owners)
        self._kinds = dict(kinds)

    def __getitem__(self, owner: str) -> Mapping[str, int]:
        return self._owners[owner]

    def __iter__(self) -> Iterator[str]:
        return iter(self._owners)

    def __len__(self) -> int:
        return len(self._owners)

    def get_count(self, owner: str, key: str) -> int:
        """One counter (0 when the owner or the key is absent)."""
        return self._owners.get(owner, {}).get(key, 0)

    def total(self, key: str, kind: str | None = None) -> int:
        """The sum of ``key`` over all owners (of ``kind``: "domain" or "device", if given)."""
        return sum(
            c.get(key, 0) for o, c in self._owners.items() if kind is None or self._kinds.get(o) == kind
        )

    def domains(self) -> dict[str, Mapping[str, int]]:
        """The domains' counters only."""
        return {o: c for o, c in self._owners.items() if self._kinds.get(o) == "domain"}

    def devices(self) -> dict[str, Mapping[str, int]]:
        """The devices' counters only."""
        return {o: c for o, c in self._owners.items() if self._kinds.get(o) == "device"}

    def diff(self, before: Snapshot) -> Snapshot:
        """What happened between ``before`` and this snapshot (zero entries dropped)."""
        out: dict[str, Mapping[str, int]] = {}
        for owner, now in self._owners.items():
            old = before._owners.get(owner, {})
            delta = {k: v - old.get(k, 0) for k, v in now.items() if v != old.get(k, 0)}
            out[owner] = MappingProxyType(delta)
        return Snapshot(out, self._kinds)

    def as_dict(self) -> dict[str, Any]:
        """Plain nested dicts: ``{"domains": {...}, "devices": {...}}``."""
        return {
            "domains": {o: dict(c) for o, c in self.domains().items()},
            "devices": {o: dict(c) for o, c in self.devices().items()},
        }

    def to_json(self, **kwargs: Any) -> str:
        """The JSON form of :meth:`as_dict` (the schema in this module's docstring)."""
        return json.dumps(self.as_dict(), sort_keys=True, **kwargs)


class CounterRegistry:
    """Every :class:`Counters` of one hypervisor, by owner name (iterates in registration order)."""

    def __init__(self) -> None:
        self._all: dict[str, Counters] = {}
        #: Called with each :class:`Counters` created from now on (the tracer adopts them).
        self.on_new: list[Callable[[Counters], None]] = []

    def new(self, owner: str, kind: str = "domain") -> Counters:
        """Create (or return the existing) counters of ``owner``."""
        if owner not in self._all:
            counters = self._all[owner] = Counters(owner, kind)
            for callback in self.on_new:
                callback(counters)
        return self._all[owner]

    def __getitem__(self, owner: str) -> Counters:
        return self._all[owner]

    def __contains__(self, owner: object) -> bool:
        return owner in self._all

    def __iter__(self) -> Iterator[str]:
        return iter(self._all)

    def snapshot(self) -> Snapshot:
        """Freeze every owner's counters."""
        return Snapshot(
            {o: c.freeze() for o, c in self._all.items()}, {o: c.kind for o, c in self._all.items()}
        )
