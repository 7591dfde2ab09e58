"""The edges of the network: capture's cost, a TAP device, a VXLAN tunnel, for 64-byte frames.

* **capture on/off**: guest A streams 64-byte UDP frames to guest B (``send_batch`` of
  64), in alternating phases with a whole-switch capture to a pcap file off and on, in
  the same run.  Reported: ``pps_off``, ``pps_on`` and ``cost_pct`` (how much slower),
  and the same for pcapng (``pps_on_pcapng``, ``cost_pct_pcapng``).
* **capture in the switch alone**: the switch flooding 64-frame batches from one port to
  another, without and with a whole-switch capture, interleaved.  Reported: ``pps_off``,
  ``pps_on`` and ``capture_ns_per_frame`` (what the capture adds to each frame).
* **TAP, guest -> kernel**: guest A streams 64-byte frames to a TAP device in a network
  namespace; ``pps`` counts the frames the kernel received (the interface's
  ``rx_packets``) per second.
* **TAP, kernel -> guest**: a UDP socket in the namespace blasts 64-byte frames (22 bytes
  of payload) to guest B; ``pps`` counts what B received per second, ``loss`` what the
  TAP queue dropped.
* **VXLAN**: guest A streams 64-byte frames into a VXLAN port; a second switch in the
  same process takes them from its own VXLAN port over loopback UDP.  ``pps`` counts the
  decapsulated frames delivered per second, ``loss`` the datagrams the receiving socket
  dropped.

Real clock, numbers in ``extra_info``; never asserted.  With benchmarks disabled each
scenario runs once, small, and the namespace ones skip without root.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest
import trio

from pvio.backends.capture import Capture
from pvio.backends.switch import Switch, SwitchPort
from pvio.backends.tap import TapPort
from pvio.backends.vxlan import VxlanPort
from pvio.frontends.netstack import udp_packet
from tests.netenv import NicGuest, ip_of, net_env, udp_stream
from tests.nsenv import in_ns, ip, netns, netns_skip_reason, unique_name

BATCH = 64
FRAME_SIZE = 64
NS_SKIP = netns_skip_reason(tun=True)


class Counter(SwitchPort):
    """Counts what the switch hands it."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.n = 0

    def transmit(self, frames: list[bytes]) -> None:
        self.n += len(frames)


def frames_to(a: NicGuest, mac: bytes, dst_ip: str) -> list[bytes]:
    """One batch of 64-byte UDP frames from ``a`` to ``mac``/``dst_ip`` (discard port)."""
    payload = bytes(FRAME_SIZE - 42)
    return [udp_packet(a.nic.mac, mac, a.ip, dst_ip, 5000, 9, payload, checksum=False)] * BATCH


async def stream(a: NicGuest, batch: list[bytes], count: int) -> float:
    """Send ``count`` frames from ``a`` in batches; the seconds it took."""
    start = time.perf_counter()
    for _ in range(count // len(batch)):
        await a.nic.send_batch(batch)
    return time.perf_counter() - start


@pytest.mark.benchmark(group="edges")
def test_capture_cost_on_a_64_byte_stream(benchmark: Any) -> None:
    frames_per_phase = 40_000 // BATCH * BATCH if benchmark.enabled else 4 * BATCH
    off: list[float] = []
    on: list[float] = []
    on_ng: list[float] = []

    async def scenario() -> None:
        a, b = NicGuest("a", ip_of(0)), NicGuest("b", ip_of(1))
        async with net_env(a, b) as env:
            batch = udp_stream(a, b, BATCH, size=FRAME_SIZE)
            received = 0

            async def receive() -> None:
                nonlocal received
                while True:
                    received += len(await b.nic.recv_batch(4096))

            async def phase(capture: bool, path: Path) -> float:
                target = received + frames_per_phase
                fmt = "pcapng" if path.suffix == ".pcapng" else "pcap"
                cap = Capture(env.switch, path, format=fmt).start() if capture else None
                start = time.perf_counter()
                await stream(a, batch, frames_per_phase)
                while received < target:
                    await trio.sleep(0)
                elapsed = time.perf_counter() - start
                if cap is not None:
                    cap.stop()
                    assert cap.counters["packets"] == frames_per_phase
                return frames_per_phase / elapsed

            with tempfile.TemporaryDirectory() as tmp:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(receive)
                    for i in range(5):  # interleaved, so load from elsewhere hits both alike
                        off.append(await phase(False, Path(tmp) / f"off{i}.pcap"))
                        on.append(await phase(True, Path(tmp) / f"on{i}.pcap"))
                        on_ng.append(await phase(True, Path(tmp) / f"on{i}.pcapng"))
                    nursery.cancel_scope.cancel()

    benchmark.pedantic(lambda: trio.run(scenario), rounds=1, iterations=1)
    pps_off, pps_on, pps_ng = statistics.median(off), statistics.median(on), statistics.median(on_ng)
    benchmark.extra_info.update(
        frames_per_phase=frames_per_phase,
        pps_off=round(pps_off, 1),
        pps_on=round(pps_on, 1),
        cost_pct=round((1 - pps_on / pps_off) * 100, 1),
        pps_on_pcapng=round(pps_ng, 1),
        cost_pct_pcapng=round((1 - pps_ng / pps_off) * 100, 1),
    )


@pytest.mark.benchmark(group="edges")
def test_capture_cost_in_the_switch_alone(benchmark: Any) -> None:
    """The switch forwarding 64-frame batches between two ports, with no capture and with a
    whole-switch pcap capture, interleaved: the capture's own per-frame cost, without the rings."""
    batches = 2000 if benchmark.enabled else 20
    sw = Switch()
    src, dst = Counter("src"), Counter("dst")
    sw.attach(src)
    sw.attach(dst)
    batch = [bytes(6) + b"\x02" + bytes(5) + b"\x08\x00" + bytes(50)] * BATCH  # flooded to dst
    off: list[float] = []
    on: list[float] = []

    def run() -> float:
        start = time.perf_counter()
        for _ in range(batches):
            sw.input(src, batch)
        return batches * BATCH / (time.perf_counter() - start)

    with tempfile.TemporaryDirectory() as tmp:
        for i in range(7):
            off.append(run())
            with Capture(sw, Path(tmp) / f"{i}.pcap"):
                on.append(run())
    benchmark.pedantic(run, rounds=1, iterations=1)
    pps_off, pps_on = statistics.median(off), statistics.median(on)
    benchmark.extra_info.update(
        frames_per_phase=batches * BATCH,
        pps_off=round(pps_off, 1),
        pps_on=round(pps_on, 1),
        capture_ns_per_frame=round((1 / pps_on - 1 / pps_off) * 1e9, 1),
    )


def rx_packets(ns: str, dev: str) -> int:
    out = subprocess.run(["ip", "-n", ns, "-s", "-j", "link", "show", dev], capture_output=True, check=True)
    return int(json.loads(out.stdout)[0]["stats64"]["rx"]["packets"])


@pytest.mark.skipif(NS_SKIP is not None, reason=f"TAP benchmark skipped: {NS_SKIP}")
@pytest.mark.benchmark(group="edges")
def test_tap_guest_to_kernel_64_byte_frames(benchmark: Any) -> None:
    count = 40_000 // BATCH * BATCH if benchmark.enabled else 4 * BATCH
    rates: list[float] = []

    async def scenario() -> None:
        a = NicGuest("a", ip_of(0))
        async with net_env(a) as env:
            with netns("pvbt") as ns:
                tap = TapPort(env.switch, unique_name("pvbt"))
                try:
                    ip("link", "set", "dev", tap.ifname, "netns", ns)
                    ip("addr", "add", "10.0.0.254/24", "dev", tap.ifname, ns=ns)
                    ip("link", "set", "dev", tap.ifname, "up", ns=ns)
                    batch = frames_to(a, b"\x02\x00\x00\x00\x00\xfe", "10.0.0.254")  # flooded to the TAP
                    before = rx_packets(ns, tap.ifname)
                    start = time.perf_counter()
                    await stream(a, batch, count)
                    while tap.counters["packets.tx"] < count:  # the last batches are still in netback
                        await trio.sleep(0)
                    elapsed = max(time.perf_counter() - start, 1e-9)
                    got = rx_packets(ns, tap.ifname) - before
                    rates.append(got / elapsed)
                    benchmark.extra_info.update(kernel_rx=got, tx_full=tap.counters["drops.tx_full"])
                finally:
                    tap.close()

    benchmark.pedantic(lambda: trio.run(scenario), rounds=1, iterations=1)
    benchmark.extra_info.update(frames=count, pps=round(statistics.median(rates), 1))


# 22 bytes of UDP payload: 14 + 20 + 8 + 22 = 64-byte frames on the TAP.
BLAST = """
import socket, sys, time
n = int(sys.argv[1])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("10.0.0.254", 5000))
payload = bytes(22)
for _ in range(n):
    while True:
        try:
            s.sendto(payload, ("10.0.0.1", 9))
            break
        except BlockingIOError:
            time.sleep(0)
"""


@pytest.mark.skipif(NS_SKIP is not None, reason=f"TAP benchmark skipped: {NS_SKIP}")
@pytest.mark.benchmark(group="edges")
def test_tap_kernel_to_guest_64_byte_frames(benchmark: Any) -> None:
    count = 40_000 if benchmark.enabled else 200
    result: dict[str, float] = {}

    async def scenario() -> None:
        b = NicGuest("b", ip_of(0))
        async with net_env(b) as env:
            with netns("pvbr") as ns:
                tap = TapPort(env.switch, unique_name("pvbr"))
                try:
                    ip("link", "set", "dev", tap.ifname, "netns", ns)
                    ip("addr", "add", "10.0.0.254/24", "dev", tap.ifname, ns=ns)
                    ip("link", "set", "dev", tap.ifname, "up", ns=ns)
                    mac = ":".join(f"{x:02x}" for x in b.nic.mac)
                    ip(
                        "neigh",
                        "add",
                        "10.0.0.1",
                        "lladdr",
                        mac,
                        "dev",
                        tap.ifname,
                        "nud",
                        "permanent",
                        ns=ns,
                    )
                    received = 0
                    first = last = 0.0

                    async def receive() -> None:
                        nonlocal received, first, last
                        while True:
                            got = await b.nic.recv_batch(4096)
                            now = time.perf_counter()
                            first = first or now
                            received += len(got)
                            last = now

                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(tap.run)
                        nursery.start_soon(receive)
                        await trio.run_process(in_ns(ns, sys.executable, "-c", BLAST, str(count)))
                        quiet = -1
                        while quiet != received:  # until nothing more arrives for 0.2 s
                            quiet = received
                            await trio.sleep(0.2)
                        nursery.cancel_scope.cancel()
                    result.update(
                        received=received,
                        loss=count - received,
                        pps=round(received / max(last - first, 1e-9), 1),
                    )
                finally:
                    tap.close()

    benchmark.pedantic(lambda: trio.run(scenario), rounds=1, iterations=1)
    benchmark.extra_info.update(frames=count, **result)


@pytest.mark.benchmark(group="edges")
def test_vxlan_64_byte_frames_over_loopback(benchmark: Any) -> None:
    count = 40_000 // BATCH * BATCH if benchmark.enabled else 4 * BATCH
    result: dict[str, float] = {}

    async def scenario() -> None:
        a = NicGuest("a", ip_of(0))
        async with net_env(a) as env:
            far = Switch(name="far")
            sink = Counter("sink")
            far.attach(sink)
            rx = VxlanPort(far, 42, local=("127.0.0.1", 0))
            rx.sock.setsockopt(1, 8, 8 << 20)  # SOL_SOCKET, SO_RCVBUF: room for bursts
            tx = VxlanPort(env.switch, 42, local=("127.0.0.1", 0), remotes=[rx.local])
            batch = frames_to(a, b"\x02\x00\x00\x00\x00\xfe", ip_of(1))  # flooded into the tunnel
            first = last = 0.0

            async def watch() -> None:
                nonlocal first, last
                seen = 0
                while True:
                    await trio.sleep(0)
                    if sink.n != seen:
                        now = time.perf_counter()
                        first = first or now
                        last, seen = now, sink.n

            async with trio.open_nursery() as nursery:
                nursery.start_soon(rx.run)
                nursery.start_soon(watch)
                start = time.perf_counter()
                await stream(a, batch, count)
                quiet = -1
                while quiet != sink.n:
                    quiet = sink.n
                    await trio.sleep(0.2)
                nursery.cancel_scope.cancel()
            elapsed = max(last, start) - start
            result.update(delivered=sink.n, loss=count - sink.n, pps=round(sink.n / max(elapsed, 1e-9), 1))
            tx.close()
            rx.close()

    benchmark.pedantic(lambda: trio.run(scenario), rounds=1, iterations=1)
    benchmark.extra_info.update(frames=count, **result)
