"""GuestNic: the application API every guest NIC driver shares, whatever the device model.

Apps in a PyGuest talk to their NIC the same way on the PV vif (netfront), the emulated NIC
and the smart NIC: ``await nic.send(frame)``, ``send_batch``, ``await nic.recv()``,
``recv_batch``, ``pending()``.  The drivers differ only in how frames reach the device and
come back; the received-frame queue and its wake-up live here, once.

A driver subclasses :class:`GuestNic`, implements :meth:`send_batch`, appends received
frames to ``self._rx_frames`` and sets ``self._rx_ready``, and overrides :meth:`_stopped`
to say why ``recv`` can no longer wait (a disconnected or failed device).
"""

from __future__ import annotations

from collections import deque
from typing import Any

import trio


class GuestNic:
    """The send/recv side of a guest NIC driver."""

    def __init__(self) -> None:
        self._rx_frames: deque[bytes] = deque()
        self._rx_ready = trio.Event()

    def _stopped(self) -> Exception | None:
        """The error ``recv`` raises once the device cannot deliver any more (None: it can)."""
        return None

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
        while q and len(out) < max_frames:
            out.append(q.popleft())
        return out

    def pending(self) -> int:
        """Frames received and not yet read."""
        return len(self._rx_frames)
