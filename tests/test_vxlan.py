"""The VXLAN port: malformed datagrams, two pvio processes on one L2 segment, and Linux's vxlan.

The decapsulation checks run without sockets.  The two-process test joins this process's
switch and a second pvio (``tests/vxlan_peer.py``, its own hypervisor and guest) over
loopback UDP.  The interop test puts the Linux kernel's ``vxlan`` device in a namespace
of its own, joined by a veth pair to a second namespace where pvio's VTEP socket lives,
so all the traffic stays in namespaces the test created.  Real clock; nothing asserts time.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import trio
from scapy.layers.inet import ICMP
from scapy.layers.l2 import ARP, Ether

from pvio.backends.switch import Switch, SwitchPort
from pvio.backends.vxlan import VXLAN_OVERHEAD, VxlanError, VxlanPort, vxlan_header
from pvio.frontends.netstack import arp_request, icmp_echo
from tests.netenv import EchoGuest, NicGuest, net_env, recv_n
from tests.nsenv import PING_MISSING, in_ns, ip, netns, netns_skip_reason, udp_socket_in, unique_name

ROOT = Path(__file__).resolve().parent.parent
VNI = 42
SKIP = netns_skip_reason()
needs_netns = pytest.mark.skipif(SKIP is not None, reason=f"Linux vxlan test skipped: {SKIP}")


class Sink(SwitchPort):
    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.frames: list[bytes] = []

    def transmit(self, frames: list[bytes]) -> None:
        self.frames += frames


def frame(dst: int, src: int) -> bytes:
    return bytes([2, 0, 0, 0, 0, dst]) + bytes([2, 0, 0, 0, 0, src]) + b"\x08\x00" + bytes(46)


def loopback_port(switch: Switch, **kw: object) -> VxlanPort:
    return VxlanPort(switch, VNI, local=("127.0.0.1", 0), **kw)  # type: ignore[arg-type]


def test_malformed_datagrams_are_counted_and_dropped() -> None:
    sw = Switch()
    sink = Sink("guest")
    sw.attach(sink)
    with loopback_port(sw) as vx:
        good = vxlan_header(VNI) + frame(1, 9)
        frames = vx.decapsulate(
            [
                (good, "192.0.2.1"),
                (good[:21], "192.0.2.1"),  # shorter than VXLAN + Ethernet headers
                (b"\x00" + good[1:], "192.0.2.1"),  # I flag clear
                (b"\x08\x00\x00\x01" + good[4:], "192.0.2.1"),  # a reserved bit set
                (good[:7] + b"\x01" + good[8:], "192.0.2.1"),  # the reserved byte after the VNI
                (vxlan_header(VNI + 1) + frame(1, 9), "192.0.2.1"),  # another network
                (b"", "192.0.2.1"),
            ]
        )
        assert frames == [frame(1, 9)]
        c = vx.counters
        assert (c["drops.short"], c["drops.bad_flags"], c["drops.unknown_vni"]) == (2, 3, 1)
        assert c["datagrams.rx"] == 7
        assert dict(vx.fdb) == {frame(1, 9)[6:12]: "192.0.2.1"}


async def test_garbage_on_the_socket_is_dropped_and_good_frames_still_flow() -> None:
    sw = Switch()
    sink = Sink("guest")
    sw.attach(sink)
    with loopback_port(sw) as vx, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as peer:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(vx.run)
            for datagram in (
                b"x",
                b"\xff" * 30,
                vxlan_header(7) + frame(1, 2),
                vxlan_header(VNI) + frame(1, 2),
            ):
                peer.sendto(datagram, vx.local)
            with trio.fail_after(10):
                while vx.counters["datagrams.rx"] < 4:
                    await trio.sleep(0.001)
            nursery.cancel_scope.cancel()
    assert sink.frames == [frame(1, 2)]
    assert (vx.counters["drops.short"], vx.counters["drops.bad_flags"], vx.counters["drops.unknown_vni"]) == (
        1,
        1,
        1,
    )


def test_unicast_goes_to_the_learned_vtep_and_floods_to_the_static_remotes() -> None:
    sw = Switch()
    sink = Sink("guest")
    sw.attach(sink)
    with (
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as r1,
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as r2,
    ):
        r1.bind(("127.0.0.1", 0))
        r2.bind(("127.0.0.2", 0))
        r1.settimeout(5)
        r2.settimeout(5)
        with loopback_port(sw, remotes=[r1.getsockname(), ("127.0.0.2", r2.getsockname()[1])]) as vx:
            sw.input(sink, [frame(0xFF, 1)])  # unknown unicast: to both static remotes
            assert r1.recv(2048) == vxlan_header(VNI) + frame(0xFF, 1)
            assert r2.recv(2048) == vxlan_header(VNI) + frame(0xFF, 1)
            vx.decapsulate([(vxlan_header(VNI) + frame(1, 5), "127.0.0.2")])  # MAC 5 lives behind r2
            vx.transmit([frame(5, 1)])
            assert r2.recv(2048) == vxlan_header(VNI) + frame(5, 1)
            assert vx.counters["datagrams.tx"] == 3
            assert vx.counters["fdb.learned"] == 1


def test_a_port_in_use_says_so_in_one_line_and_the_switch_runs_on() -> None:
    sw = Switch()
    a, b = Sink("a"), Sink("b")
    sw.attach(a)
    sw.attach(b)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
        taken.bind(("127.0.0.1", 0))
        with pytest.raises(VxlanError, match=r"^vxlan 127\.0\.0\.1:\d+: address in use") as info:
            VxlanPort(sw, VNI, local=taken.getsockname())
        assert "\n" not in str(info.value)
    with pytest.raises(VxlanError, match="address not available"):
        VxlanPort(sw, VNI, local=("192.0.2.77", 0))
    sw.input(a, [frame(0xFF, 1)])
    assert b.frames == [frame(0xFF, 1)]
    assert [p.name for p in sw.ports] == ["a", "b"]
    assert VXLAN_OVERHEAD == 14 + 20 + 8 + 8


@pytest.mark.skipif(shutil.which("setpriv") is None, reason="needs util-linux's setpriv")
def test_a_privileged_port_without_the_capability_says_no_permission() -> None:
    script = "from pvio.backends.vxlan import VxlanError, open_vxlan_socket\ntry:\n"
    script += "    open_vxlan_socket(('127.0.0.1', 789))\nexcept VxlanError as e:\n    print(e)\n"
    drop = ["--inh-caps=-net_bind_service", "--bounding-set=-net_bind_service", "--reuid=65534"]
    done = subprocess.run(["setpriv", *drop, sys.executable, "-c", script], capture_output=True, text=True)
    if ("Permission denied" in done.stderr and "python" in done.stderr) or "No module named" in done.stderr:
        pytest.skip("the interpreter or this checkout is not readable by an unprivileged user here")
    assert done.stdout.startswith("vxlan 127.0.0.1:789: no permission"), done.stderr


async def ping_guest(a: NicGuest, dst_ip: str, count: int) -> int:
    """ARP for ``dst_ip``, then ``count`` ICMP echoes from ``a``; the number answered in order."""
    await a.nic.send(arp_request(a.nic.mac, a.ip, dst_ip))
    (reply,) = await recv_n(a.nic, 1, timeout_s=10)
    arp = Ether(reply)[ARP]
    assert arp.op == 2 and arp.psrc == dst_ip
    mac = bytes.fromhex(arp.hwsrc.replace(":", ""))
    answered = 0
    for seq in range(count):
        await a.nic.send(icmp_echo(a.nic.mac, mac, a.ip, dst_ip, 0x4242, seq, b"vxlan" * 10))
        (answer,) = await recv_n(a.nic, 1, timeout_s=10)
        icmp = Ether(answer)[ICMP]
        if icmp.type == 0 and icmp.seq == seq:
            answered += 1
    return answered


async def test_two_pvio_processes_ping_each_other_over_vxlan() -> None:
    a = NicGuest("a", "10.0.0.1")
    async with net_env(a, timeout_s=30) as env:
        vx = loopback_port(env.switch)
        cmd = [sys.executable, "-m", "tests.vxlan_peer", "--vni", str(VNI), "--ip", "10.0.0.2"]
        cmd += ["--remote", f"127.0.0.1:{vx.local[1]}"]
        async with trio.open_nursery() as nursery:
            peer = await trio.lowlevel.open_process(
                cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=ROOT
            )
            assert peer.stdout is not None and peer.stdin is not None
            try:
                out = b""
                with trio.fail_after(60):
                    while b"\n" not in out:
                        chunk = await peer.stdout.receive_some()
                        assert chunk, "the peer exited before it was ready"
                        out += chunk
                line, out = out.split(b"\n", 1)
                assert line.startswith(b"ready ")
                vx.add_remote("127.0.0.1", int(line.split()[1]))
                nursery.start_soon(vx.run)
                assert await ping_guest(a, "10.0.0.2", 20) == 20  # 0 loss
                await peer.stdin.aclose()
                with trio.fail_after(30):
                    while chunk := await peer.stdout.receive_some():
                        out += chunk
                    assert await peer.wait() == 0
            finally:
                if peer.returncode is None:
                    peer.kill()
            nursery.cancel_scope.cancel()
        vx.close()
    theirs = json.loads(out.decode().strip().splitlines()[-1])
    assert theirs["datagrams.rx"] == vx.counters["datagrams.tx"] == 21
    assert vx.counters["datagrams.rx"] == theirs["datagrams.tx"] == 21
    assert not any(k.startswith("drops.") for k in (*theirs, *vx.counters))


def kernel_mac(ns: str, dev: str) -> bytes:
    out = subprocess.run(["ip", "-n", ns, "-j", "link", "show", dev], capture_output=True, check=True).stdout
    return bytes.fromhex(json.loads(out)[0]["address"].replace(":", ""))


@needs_netns
@pytest.mark.skipif(PING_MISSING is not None, reason=f"Linux vxlan ping skipped: {PING_MISSING}")
async def test_the_linux_vxlan_device_in_a_namespace_pings_a_pvio_guest() -> None:
    with netns("pvvxk") as kernel_ns, netns("pvvxp") as pvio_ns:
        veth_k, veth_p = unique_name("pvk"), unique_name("pvq")
        ip(
            "link",
            "add",
            veth_k,
            "netns",
            kernel_ns,
            "type",
            "veth",
            "peer",
            "name",
            veth_p,
            "netns",
            pvio_ns,
        )
        ip("addr", "add", "10.99.0.1/24", "dev", veth_k, ns=kernel_ns)
        ip("link", "set", veth_k, "up", ns=kernel_ns)
        ip("addr", "add", "10.99.0.2/24", "dev", veth_p, ns=pvio_ns)
        ip("link", "set", veth_p, "up", ns=pvio_ns)
        ip(
            *("link", "add", "vx0", "type", "vxlan", "id", str(VNI), "dstport", "4789"),
            *("remote", "10.99.0.2", "local", "10.99.0.1", "dev", veth_k),
            ns=kernel_ns,
        )
        ip("addr", "add", "10.0.0.254/24", "dev", "vx0", ns=kernel_ns)
        ip("link", "set", "vx0", "up", ns=kernel_ns)
        sock = udp_socket_in(pvio_ns, ("10.99.0.2", 4789))
        guest = EchoGuest("guest", "10.0.0.1")
        async with net_env(guest, timeout_s=30) as env:
            with VxlanPort(env.switch, VNI, sock=sock, remotes=[("10.99.0.1", 4789)]) as vx:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(vx.run)
                    with trio.fail_after(60):
                        done = await trio.run_process(
                            in_ns(kernel_ns, "ping", "-c", "5", "-i", "0.2", "-W", "5", "10.0.0.1"),
                            capture_stdout=True,
                            capture_stderr=True,
                            check=False,
                        )
                    nursery.cancel_scope.cancel()
                out = done.stdout.decode()
                assert done.returncode == 0, out + done.stderr.decode()
                assert "5 packets transmitted, 5 received, 0% packet loss" in out
                assert vx.counters["datagrams.rx"] >= 6  # ARP + 5 echo requests
                assert dict(vx.fdb) == {kernel_mac(kernel_ns, "vx0"): "10.99.0.1"}  # learned from the tunnel
                assert not any(k.startswith("drops.") for k in vx.counters)


def test_an_ipv6_underlay_carries_frames_both_ways() -> None:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as probe:
            probe.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback here")
    sw = Switch()
    sink = Sink("guest")
    sw.attach(sink)
    with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as remote:
        remote.bind(("::1", 0))
        remote.settimeout(5)
        with VxlanPort(sw, VNI, local=("::1", 0), remotes=[remote.getsockname()[:2]]) as vx:
            sw.input(sink, [frame(0xFF, 1)])
            data, peer = remote.recvfrom(2048)
            assert data == vxlan_header(VNI) + frame(0xFF, 1)
            assert vx.decapsulate([(vxlan_header(VNI) + frame(1, 6), peer[0])]) == [frame(1, 6)]
            assert dict(vx.fdb) == {frame(1, 6)[6:12]: "::1"}
