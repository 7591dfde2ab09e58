"""Ready-made guest kernels for a remote guest's process: a NIC guest the host can drive.

:class:`StreamGuest` is :class:`pvio.frontends.guests.NicGuest` (netfront, unchanged) with a
``remote_call`` the host reaches through :meth:`pvio.remote.RemoteGuest.call`:

- ``prepare(dst_mac, dst_ip, packets, size=64, start=0)``: build ``packets`` UDP frames
  numbered from ``start`` (the benchmark's frames: the sequence number opens the UDP
  payload), so that a timed ``stream`` only sends;
- ``stream(dst_mac, dst_ip, packets, size=64, batch=64, start=0)``: send them (prepared
  here if the destination is given, else the prepared ones), ``batch`` per ``send_batch``
  as fast as netfront takes them; answers ``{"sent", "seconds"}``;
- ``receive(packets, timeout_s=60, idle_s=None)``: take ``packets`` frames (fewer if, with
  ``idle_s``, none came for that long: :func:`receive_numbers`); answers ``{"received",
  "seqs_in_order", "increasing", "first", "last", "last_at", "check_cpu_s"}``;
- ``counters()``: this process's counters (its domain's interrupts, netfront's packets).

The host names it ``"pvio.remote.guests:StreamGuest"`` with ``args={"name": ..., "ip": ...}``
(and ``"busy_poll"``: netfront's busy-poll budget).
"""

from __future__ import annotations

import array
import math
import struct
import sys
import time
from operator import itemgetter
from typing import Any

import trio

from pvio.frontends.guests import NicGuest
from pvio.frontends.netstack import udp_packet
from pvio.remote.child import child_counters

SEQ = struct.Struct("!I")
UDP_PAYLOAD_OFFSET = 14 + 20 + 8  # Ethernet + IPv4 + UDP: where the sequence number is
STREAM_PORTS = (5000, 9)


def numbered_frames(
    src_mac: bytes, dst_mac: bytes, src_ip: str, dst_ip: str, count: int, size: int, start: int = 0
) -> list[bytes]:
    """``count`` UDP frames of ``size`` bytes whose payload opens with their number (from ``start``)."""
    pad = size - UDP_PAYLOAD_OFFSET - SEQ.size
    if pad < 0:
        raise ValueError(f"a numbered frame needs at least {UDP_PAYLOAD_OFFSET + SEQ.size} bytes, not {size}")
    # Only the number differs (no UDP checksum; the IPv4 header does not cover the payload).
    template = udp_packet(
        src_mac, dst_mac, src_ip, dst_ip, *STREAM_PORTS, bytes(SEQ.size + pad), checksum=False
    )
    head, tail = template[:UDP_PAYLOAD_OFFSET], template[UDP_PAYLOAD_OFFSET + SEQ.size :]
    pack = SEQ.pack
    return [head + pack(start + i) + tail for i in range(count)]


def frame_number(frame: bytes) -> int:
    """The number :func:`numbered_frames` gave ``frame``."""
    return int(SEQ.unpack_from(frame, UDP_PAYLOAD_OFFSET)[0])


_SEQ_FIELD = itemgetter(slice(UDP_PAYLOAD_OFFSET, UDP_PAYLOAD_OFFSET + SEQ.size))


def frame_numbers(frames: list[bytes]) -> array.array[int]:
    """The numbers of a batch of frames, as :func:`frame_number` reads them one by one, with
    the per-frame loop in C (slice each frame's number field, join, one byte swap): the
    receiving application's check costs the process it runs in little per frame.  A frame
    too short to hold a number raises ValueError."""
    field = b"".join(map(_SEQ_FIELD, frames))
    if len(field) != SEQ.size * len(frames):
        raise ValueError("a frame too short to carry a sequence number")
    out = array.array("I", field)  # "I" is 4 bytes on every platform CPython supports
    if sys.byteorder == "little":
        out.byteswap()  # the numbers are big-endian (network order)
    return out


def in_sequence(numbers: array.array[int], first: int) -> bool:
    """True if ``numbers`` is ``first, first + 1, ...`` (compared in C)."""
    return numbers == array.array("I", range(first, first + len(numbers)))


def increasing(numbers: array.array[int]) -> bool:
    """True if every number is larger than the one before: each frame once, in order, some
    possibly missing (compared in C)."""
    return numbers == array.array("I", sorted(set(numbers)))


async def receive_numbers(nic: Any, packets: int, timeout_s: float, idle_s: float | None) -> dict[str, Any]:
    """Take up to ``packets`` numbered frames from ``nic``: until all have come, ``timeout_s``
    has passed, or (``idle_s``) nothing came for that long after the first frame (the rest
    were dropped on the way).  Answers ``{"received", "seqs_in_order", "increasing", "first",
    "last", "last_at", "check_cpu_s"}``, ``last_at`` being ``time.perf_counter()`` when the last
    frame came (the same clock in every process of the machine) and ``check_cpu_s`` the CPU
    seconds this process spent on the checks after it (sorting the numbers: not the stream's
    cost, which a benchmark of the stream's CPU time leaves out).

    The idle limit is watched by a task of its own that wakes at most once per ``idle_s``:
    a deadline set around every ``recv_batch`` would cost the receiving process a cancel
    scope per batch, as much as reading the frames' numbers."""
    got: array.array[int] = array.array("I")
    last_at = time.perf_counter()
    last_batch = math.inf  # trio's clock at the last batch (none yet: no idle limit runs)

    async def watch_idle(stop: trio.CancelScope, limit: float) -> None:
        while True:
            due = last_batch + limit
            now = trio.current_time()
            if now >= due:
                stop.cancel()
                return
            await trio.sleep_until(min(due, now + limit))

    with trio.move_on_after(timeout_s):
        async with trio.open_nursery() as nursery:
            if idle_s is not None:
                nursery.start_soon(watch_idle, nursery.cancel_scope, idle_s)
            while len(got) < packets:
                batch = await nic.recv_batch(packets - len(got))
                got.extend(frame_numbers(batch))
                last_at = time.perf_counter()
                last_batch = trio.current_time()
            nursery.cancel_scope.cancel()
    cpu0 = time.process_time()
    checks = {
        "seqs_in_order": in_sequence(got, got[0]) if got else True,
        "increasing": increasing(got),
    }
    return {
        "received": len(got),
        **checks,
        "first": got[0] if got else None,
        "last": got[-1] if got else None,
        "last_at": last_at,
        "check_cpu_s": time.process_time() - cpu0,
    }


class StreamGuest(NicGuest):
    """A NicGuest whose traffic the host asks for (see the module doc)."""

    def __init__(self, name: str, ip: str, busy_poll: int = 0) -> None:
        super().__init__(name, ip)
        self._frames: list[bytes] = []
        self.busy_poll = busy_poll  # netfront's busy-poll budget (a guest with a CPU of its own)

    async def main(self) -> None:
        await super().main()
        self.nic.busy_poll = self.busy_poll

    async def remote_call(self, op: str, **params: Any) -> Any:
        """One request from the host."""
        if op == "prepare":
            return self._prepare(**params)
        if op == "stream":
            return await self._stream(**params)
        if op == "receive":
            return await self._receive(**params)
        if op == "counters":
            return child_counters(self)
        raise ValueError(f"unknown call {op!r}")

    def _prepare(self, dst_mac: str, dst_ip: str, packets: int, size: int = 64, start: int = 0) -> int:
        self._frames = numbered_frames(
            self.nic.mac, bytes.fromhex(dst_mac), self.ip, dst_ip, packets, size, start
        )
        return len(self._frames)

    async def _stream(
        self,
        dst_mac: str | None = None,
        dst_ip: str | None = None,
        packets: int = 0,
        size: int = 64,
        batch: int = 64,
        start: int = 0,
    ) -> dict[str, Any]:
        await self.ready.wait()
        if dst_mac is not None and dst_ip is not None:
            self._prepare(dst_mac, dst_ip, packets, size, start)
        frames, self._frames = self._frames, []
        packets = len(frames)
        t0 = time.perf_counter()
        for i in range(0, packets, batch):
            await self.nic.send_batch(frames[i : i + batch])
        return {"sent": packets, "seconds": time.perf_counter() - t0}

    async def _receive(
        self, packets: int, timeout_s: float = 60.0, idle_s: float | None = None
    ) -> dict[str, Any]:
        await self.ready.wait()
        return await receive_numbers(self.nic, packets, timeout_s, idle_s)
