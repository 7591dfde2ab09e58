"""A booted virtual network for tests and benchmarks: dom0 + netback + switch + N guests.

``async with net_env(NicGuest("a", IP_A), EchoGuest("b", IP_B)) as env:`` boots a
hypervisor, runs netback and the virtual switch in dom0, creates one domain per guest
with one vif each (``add_vif``: the toolstack's keys), and returns once every guest's
netfront is Connected.  The guest kinds are :mod:`pvio.frontends.guests`: a
:class:`NicGuest` only connects (the test drives its ``nic``), an :class:`EchoGuest`
answers ARP, ICMP echo and UDP echo.

By default each guest then *announces* itself: it sends one frame addressed to its own
MAC.  The switch learns the source MAC and drops the frame as a hairpin
(``drops.same_port``), so no other guest sees it, and from then on unicast between
guests is forwarded, never flooded: every frame reaches exactly the guest it names,
which is what lets tests count delivered frames exactly.  The network is booted by the
toolstack (:func:`pvio.toolstack.boot_network`), as the CLI, the demo and the bench do.

Waiting: :func:`wait_until` polls with short sleeps.  Under trio's MockClock with
autojump (the ``autojump_clock`` fixture) a sleep returns only once every task is
blocked, so a poll is "run until the system is quiet, then look"; with the real clock
(benchmarks) it is an ordinary poll.  Nothing here asserts time.
"""

from __future__ import annotations

import struct
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any

import trio
import trio.testing

from pvio import Hypervisor, PyGuest, XenbusState
from pvio.backends.netback import RX_QUEUE_MAX
from pvio.core.hypervisor import DEFAULT_DOM0_PAGES
from pvio.frontends.guests import EchoGuest, NicGuest
from pvio.frontends.netfront import Netfront
from pvio.frontends.netstack import udp_packet
from pvio.toolstack import ANNOUNCE_ETHERTYPE, Network, NicConfig, boot_network

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

IP_A, IP_B = "10.0.0.1", "10.0.0.2"
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


#: What :func:`net_env` booted (the toolstack's :class:`~pvio.toolstack.Network`).
NetEnv = Network


@asynccontextmanager
async def net_env(
    *guests: Any,
    backend: str | None = None,
    backend_options: dict[str, Any] | None = None,
    rx_queue_max: int = RX_QUEUE_MAX,
    rx_queue_bytes: int | None = None,
    dom0_pages: int | None = DEFAULT_DOM0_PAGES,
    announce: bool = True,
    before_guests: Callable[[Hypervisor], None] | None = None,
    wait_ready: Sequence[Any] | None = None,
    timeout_s: float = 10.0,
    macs: Sequence[str | None] = (),
) -> AsyncIterator[Network]:
    """Boot dom0 (netback + switch) and ``guests`` (each with vif 0), connected: the
    toolstack's :func:`~pvio.toolstack.boot_network` with the PV model.

    ``dom0_pages`` sizes dom0 (each connected vif takes 512 of its pages for staging);
    ``wait_ready`` lists the guests whose ``ready`` event to wait for (default: every guest
    that has one).  ``macs`` gives the first guests' vif MACs ("aa:bb:..."; None or absent:
    the toolstack's default, which derives from the domid, so two separate pvio instances
    joined by a tunnel need them).
    """
    async with boot_network(
        guests,
        dom0_pages=dom0_pages,
        model="pv",
        backend=backend,
        backend_options=backend_options,
        rx_queue_max=rx_queue_max,
        rx_queue_bytes=rx_queue_bytes,
        announce=announce,
        before_guests=before_guests,
        wait_ready=wait_ready,
        timeout_s=timeout_s,
        nics=[NicConfig(mac=macs[i] if i < len(macs) else None) for i in range(len(guests))],
        check_dom0=False,  # a dom0 too small for a vif is a netback case here: it refuses that vif
    ) as net:
        yield net
