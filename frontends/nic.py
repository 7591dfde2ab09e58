"""GuestNic: the application API every guest NIC driver shares, whatever the device model.

Apps in a PyGuest talk to their NIC the same way on the PV vif (netfront), the emulated NIC
and the smart NIC: ``await nic.send(frame)``, ``send_batch``, ``await nic.recv()``,
``recv_batch``, ``pending()``.  The drivers differ only in how frames reach the device and
come back; the received-frame queue and its wake-up live here, once.

A driver subclasses :class:`GuestNic`, sets ``name`` and ``counters``, implements
:meth:`send_batch`, appends received frames to ``self._rx_frames`` and sets
``self._rx_ready``.  When the device breaks its protocol the driver calls :meth:`_fail`:
the device is stopped with the reason logged and counted, waiting senders and receivers
are woken, and from then on they get ``error_type`` naming the device and the reason.
"""

from __future__ import annotations

import logging
from collections import deque
from typing import Any

import trio

from pvio.core.counters import Counters


class GuestNic:
    """The send/recv side of a guest NIC driver."""

    #: The exception a failed device's ``recv`` (and the driver's ``send``) raises.
    error_type: type[Exception] = RuntimeError
    #: How the log and the error describe a failed device ("disconnected", "stopped").
    failure_verb = "stopped"
    #: The driver's logger (its failures are logged there).
    log = logging.getLogger("pvio.nic")
    name: str
    counters: Counters

    def __init__(self) -> None:
        self.connected = False
        self.error: str | None = None  # why the device failed, once it has
        self._rx_frames: deque[bytes] = deque()
        self._rx_ready = trio.Event()
        self._tx_space = trio.Event()

    def _fail(self, reason: str) -> None:
        """The device broke its protocol: stop it (logged, counted), wake every waiter."""
        if self.error is None:
            self.error = reason
            self.connected = False
            self.counters["disconnects"] += 1
            self.log.error("%s: %s: %s", self.name, self.failure_verb, reason)
            self._rx_ready.set()
            self._tx_space.set()

    def _stopped(self) -> Exception | None:
        """The error ``recv`` raises once the device cannot deliver any more (None: it can)."""
        if self.error is None:
            return None
        return self.error_type(f"{self.name}: {self.failure_verb} ({self.error})")

    async def send(self, frame: Any) -> None:
        """Transmit one frame (bytes, or anything ``bytes()`` accepts, e.g. a scapy packet)."""
        await self.send_batch([frame])

    async def send_batch(self, frames: list[Any]) -> None:
        """Transmit frames, as many per device notification as the model allows."""
        raise NotImplementedError

    async def recv(self) -> bytes:
        """The next received frame (waits for one)."""
        while not self._rx_frames:
            stopped = self._stopped()
            if stopped is not None:
                raise stopped
            self._rx_ready = trio.Event()
            await self._rx_ready.wait()
        return self._rx_frames.popleft()

    async def recv_batch(self, max_frames: int = 256) -> list[bytes]:
        """At least one, at most ``max_frames`` received frames."""
        out = [await self.recv()]
        q = self._rx_frames
        if len(q) < max_frames:  # all of them: one C-level move, not a loop per frame
            out.extend(q)
            q.clear()
            return out
        while q and len(out) < max_frames:
            out.append(q.popleft())
        return out

    def pending(self) -> int:
        """Frames received and not yet read."""
        return len(self._rx_frames)

    def drop_pending(self) -> int:
        """Discard the frames received and not yet read; how many there were."""
        n = len(self._rx_frames)
        self._rx_frames.clear()
        return n
