"""A booted virtual network for tests and benchmarks: dom0 + netback + switch + N guests.

``async with net_env(NicGuest("a", IP_A), EchoGuest("b", IP_B)) as env:`` boots a
hypervisor, runs netback and the virtual switch in dom0, creates one domain per guest
with one vif each (``add_vif``: the toolstack's keys), and returns once every guest's
netfront is Connected.  The guest kinds are the demo's (``examples.pv_demo``): a
:class:`NicGuest` only connects (the test drives its ``nic``), an :class:`EchoGuest`
answers ARP, ICMP echo and UDP echo.

By default each guest then *announces* itself: it sends one frame addressed to its own
MAC.  The switch learns the source MAC and drops the frame as a hairpin
(``drops.same_port``), so no other guest sees it, and from then on unicast between
guests is forwarded, never flooded: every frame reaches exactly the guest it names,
which is what lets tests count delivered frames exactly.

Waiting: :func:`wait_until` polls with short sleeps.  Under trio's MockClock with
autojump (the ``autojump_clock`` fixture) a sleep returns only once every task is
blocked, so a poll is "run until the system is quiet, then look"; with the real clock
(benchmarks) it is an ordinary poll.  Nothing here asserts time.
"""

from __future__ import annotations

import struct
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import trio
import trio.testing
from pvio.backends.netback import RX_QUEUE_MAX, BackendVif, NetBack
from pvio.backends.switch import Switch
from pvio.frontends.netfront import Netfront
from pvio.frontends.netstack import udp_packet

from examples.pv_demo import IP_A, IP_B, EchoGuest, NicGuest
from pvio import Hypervisor, PyGuest, Snapshot, XenbusState
from pvio.core.hypervisor import DEFAULT_DOM0_PAGES
from pvio.toolstack import add_vif

__all__ = [
    "ANNOUNCE_ETHERTYPE",
    "IP_A",
    "IP_B",
    "EchoGuest",
    "HandmadeFrontend",
    "NetEnv",
    "NicGuest",
    "ip_of",
    "net_env",
    "recv_n",
    "seq_of",
    "udp_stream",
    "wait_until",
]

ANNOUNCE_ETHERTYPE = 0x88B5  # IEEE "local experimental": nobody answers it
SEQ = struct.Struct("!I")  # the sequence number at the start of a stream frame's UDP payload
SEQ_OFFSET = 14 + 20 + 8  # Ethernet + IPv4 (no options) + UDP headers
STREAM_SPORT, STREAM_DPORT = 5000, 9  # UDP discard port: an EchoGuest ignores these frames


def ip_of(index: int) -> str:
    """The IPv4 address of the index-th guest of a test (10.0.0.1, 10.0.0.2, ...)."""
    return f"10.0.0.{index + 1}"


def udp_stream(
    src: NicGuest, dst: NicGuest, count: int, *, size: int = 64, start: int = 0, dport: int = STREAM_DPORT
) -> list[bytes]:
    """``count`` UDP frames of ``size`` bytes from ``src`` to ``dst``, numbered ``start``, ``start+1``, ..."""
    payload_len = size - SEQ_OFFSET
    if payload_len < SEQ.size:
        raise ValueError(f"a stream frame needs at least {SEQ_OFFSET + SEQ.size} bytes, not {size}")
    pad = bytes(payload_len - SEQ.size)
    return [
        udp_packet(
            src.nic.mac,
            dst.nic.mac,
            src.ip,
            dst.ip,
            STREAM_SPORT,
            dport,
            SEQ.pack(start + i) + pad,
            checksum=False,
        )
        for i in range(count)
    ]


def seq_of(frame: bytes) -> int:
    """The sequence number of a frame made by :func:`udp_stream`."""
    return int(SEQ.unpack_from(frame, SEQ_OFFSET)[0])


async def wait_until(predicate: Callable[[], bool], timeout_s: float = 10.0, what: str = "condition") -> None:
    """Poll ``predicate`` until it holds (TooSlowError naming ``what`` after ``timeout_s``)."""
    try:
        with trio.fail_after(timeout_s):
            while not predicate():
                await trio.sleep(0.0005)
    except trio.TooSlowError:
        raise trio.TooSlowError(f"timed out after {timeout_s} s waiting for {what}") from None


async def recv_n(nic: Netfront, n: int, timeout_s: float = 10.0) -> list[bytes]:
    """Exactly ``n`` frames from ``nic`` (TooSlowError if fewer arrive); never reads more than ``n``."""
    out: list[bytes] = []
    try:
        with trio.fail_after(timeout_s):
            while len(out) < n:
                out += await nic.recv_batch(n - len(out))
    except trio.TooSlowError:
        raise trio.TooSlowError(f"{nic.name}: received {len(out)} of {n} frames") from None
    return out


class HandmadeFrontend(PyGuest):
    """A frontend that runs the vif handshake by hand, writing the keys a test chooses.

    It sets up its rings like :class:`Netfront` (``self.nic``, not connected), waits for
    the backend's InitWait, then writes ``keys`` and ``state = Connected`` in one
    transaction; a key whose value is None is left out.  ``keys`` may use the
    placeholders ``{tx_ref}``, ``{rx_ref}`` and ``{port}``.  ``backend_state`` is the
    backend's answer: Connected or Closed.
    """

    DEFAULT_KEYS: dict[str, str | None] = {
        "tx-ring-ref": "{tx_ref}",
        "rx-ring-ref": "{rx_ref}",
        "event-channel": "{port}",
        "request-rx-copy": "1",
        "feature-rx-notify": "1",
        "feature-sg": "1",
    }

    def __init__(self, name: str, **keys: str | None) -> None:
        super().__init__(name)
        self.keys = {**self.DEFAULT_KEYS, **{k.replace("_", "-"): v for k, v in keys.items()}}
        self.backend_state: XenbusState | None = None

    async def main(self) -> None:
        nic = self.nic = Netfront(self)
        xb = self.xenbus
        nic.backend = await xb.read(f"{nic.dir}/backend")
        nic.backend_id = int(await xb.read(f"{nic.dir}/backend-id"))
        await xb.wait_for_state(f"{nic.backend}/state", XenbusState.INIT_WAIT)
        nic._setup_rings()
        values = {"tx_ref": nic.tx_ref, "rx_ref": nic.rx_ref, "port": nic.port}

        async def write_keys(t: Any) -> None:
            for key, value in self.keys.items():
                if value is not None:
                    await t.write(f"{nic.dir}/{key}", value.format(**values))
            await t.write(f"{nic.dir}/state", str(int(XenbusState.CONNECTED)))

        await xb.retry_transaction(write_keys)
        self.backend_state = await xb.wait_for_state(
            f"{nic.backend}/state", {XenbusState.CONNECTED, XenbusState.CLOSED}
        )


@dataclass
class NetEnv:
    """What :func:`net_env` booted: the hypervisor, dom0's switch and netback, the guests."""

    hv: Hypervisor
    switch: Switch
    netback: NetBack
    guests: list[Any]

    def vif(self, guest: Any, devid: int = 0) -> BackendVif:
        """The netback side of ``guest``'s vif."""
        return self.netback.vifs[(guest.domain.domid, devid)]

    def snapshot(self) -> Snapshot:
        """Every domain's and device's counters, frozen."""
        return self.hv.snapshot()

    def count(self, owner: str, key: str) -> int:
        """One live counter (0 when absent)."""
        return self.hv.counters[owner][key] if owner in self.hv.counters else 0

    async def announce(self, timeout_s: float = 10.0) -> None:
        """Teach the switch every connected guest's MAC (see the module docstring)."""
        guests = [g for g in self.guests if isinstance(g, NicGuest) and g.nic.connected]
        for g in guests:
            mac = g.nic.mac
            await g.nic.send(mac + mac + struct.pack("!H", ANNOUNCE_ETHERTYPE) + bytes(46))
        macs = {g.nic.mac for g in guests}
        await wait_until(
            lambda: macs <= set(self.switch.mac_table), timeout_s, "the switch to learn every MAC"
        )


@asynccontextmanager
async def net_env(
    *guests: Any,
    backend: str | None = None,
    backend_options: dict[str, Any] | None = None,
    rx_queue_max: int = RX_QUEUE_MAX,
    dom0_pages: int = DEFAULT_DOM0_PAGES,
    announce: bool = True,
    before_guests: Callable[[Hypervisor], None] | None = None,
    wait_ready: Sequence[Any] | None = None,
    timeout_s: float = 10.0,
    macs: Sequence[str | None] = (),
) -> AsyncIterator[NetEnv]:
    """Boot dom0 (netback + switch) and ``guests`` (each with vif 0), connected.

    ``backend``/``backend_options``/``rx_queue_max`` go to :class:`NetBack`, ``dom0_pages``
    sizes dom0 (each connected vif takes 512 of its pages for staging).
    ``before_guests(hv)`` runs once dom0 and netback are up and before any guest or vif
    exists (to arm xenstore watches, say).  ``wait_ready`` lists the guests whose
    ``ready`` event to wait for (default: every :class:`NicGuest`).  ``macs`` gives the
    first guests' vif MACs ("aa:bb:..."; None or absent: the toolstack's default, which
    derives from the domid, so two separate pvio instances joined by a tunnel need them).
    """
    async with Hypervisor(dom0_pages=dom0_pages) as hv:
        assert hv.dom0 is not None
        dom0 = hv.dom0.kernel
        switch = Switch(hv.counters)
        netback = NetBack(
            dom0,  # type: ignore[arg-type]
            switch,
            backend=backend,
            backend_options=backend_options,
            rx_queue_max=rx_queue_max,
        )
        dom0.spawn(netback.run, name="netback")  # type: ignore[attr-defined]
        if before_guests is not None:
            before_guests(hv)
        for i, guest in enumerate(guests):
            dom = hv.create_domain(guest, name=guest.name)
            add_vif(hv, dom, mac=macs[i] if i < len(macs) else None)
            await hv.start(dom)
        ready = [g for g in guests if isinstance(g, NicGuest)] if wait_ready is None else list(wait_ready)
        with trio.fail_after(timeout_s):
            for guest in ready:
                await guest.ready.wait()
        env = NetEnv(hv, switch, netback, list(guests))
        if announce:
            await env.announce(timeout_s)
        # Let the control plane go quiet (netback answers the handshake's watch events for a
        # while), so that what a test measures from here on is its own traffic.
        await trio.testing.wait_all_tasks_blocked()
        yield env
