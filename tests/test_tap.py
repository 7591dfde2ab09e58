"""The TAP port: the host's real ``ping`` and a real UDP socket reach pvio guests.

Each test creates its own network namespace, moves the TAP device into it with an
address, and runs the kernel's tools there (``ip netns exec``), so no traffic leaves the
namespace.  These tests use the real clock (an outside process is on the wire) and
assert what arrived, never how fast.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio

from pvio.backends.switch import Switch
from pvio.backends.tap import TapError, TapPort, _reason, open_tap
from pvio.cpu.guest import X86Guest
from pvio.harness.demo import wait_x86_ready
from tests.netenv import EchoGuest, net_env
from tests.nsenv import PING_MISSING, in_ns, ip, netns, netns_skip_reason, unique_name

NS_IP = "10.0.0.254"
IP_PY, IP_X86 = "10.0.0.1", "10.0.0.2"

SKIP = netns_skip_reason(tun=True)
needs_netns = pytest.mark.skipif(SKIP is not None, reason=f"TAP tests skipped: {SKIP}")
needs_ping = pytest.mark.skipif(PING_MISSING is not None, reason=f"ping test skipped: {PING_MISSING}")


@asynccontextmanager
async def tap_in_namespace(switch: Switch) -> AsyncIterator[tuple[TapPort, str]]:
    """A TapPort on ``switch`` whose device sits in a fresh namespace as 10.0.0.254/24."""
    with netns("pvtap") as ns:
        port = TapPort(switch, unique_name("pvt"))
        try:
            ip("link", "set", "dev", port.ifname, "netns", ns)
            ip("addr", "add", f"{NS_IP}/24", "dev", port.ifname, ns=ns)
            ip("link", "set", "dev", port.ifname, "up", ns=ns)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(port.run)
                yield port, ns
                nursery.cancel_scope.cancel()
        finally:
            port.close()


async def run_in(ns: str, *cmd: str, timeout_s: float = 30.0) -> subprocess.CompletedProcess[bytes]:
    with trio.fail_after(timeout_s):
        return await trio.run_process(in_ns(ns, *cmd), capture_stdout=True, capture_stderr=True, check=False)


def test_an_invalid_name_is_refused_in_one_line() -> None:
    with pytest.raises(TapError, match=r"^tap 'x/y': not a valid interface name"):
        open_tap("x/y")
    with pytest.raises(TapError, match="not a valid interface name"):
        open_tap("a" * 16)


def test_each_failure_has_a_one_line_reason() -> None:
    for code, words in [
        (errno.EPERM, "no permission"),
        (errno.EBUSY, "device busy"),
        (errno.ENOENT, "/dev/net/tun does not exist"),
    ]:
        text = _reason(OSError(code, os.strerror(code)), "pvtap0")
        assert words in text and "\n" not in text


@needs_netns
@pytest.mark.skipif(shutil.which("setpriv") is None, reason="needs util-linux's setpriv")
def test_without_cap_net_admin_the_reason_is_no_permission() -> None:
    script = "from pvio.backends.tap import TapError, open_tap\ntry:\n    open_tap('pvnoperm0')\n"
    script += "except TapError as e:\n    print(e)\n"
    done = subprocess.run(
        ["setpriv", "--inh-caps=-net_admin", "--bounding-set=-net_admin", sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.stdout == "tap pvnoperm0: no permission (creating a TAP device needs CAP_NET_ADMIN)\n", (
        done.stderr
    )


@needs_netns
def test_a_busy_device_is_refused_and_the_switch_runs_on() -> None:
    sw = Switch()
    with TapPort(sw, unique_name("pvb")) as first:
        with pytest.raises(TapError, match="device busy"):
            TapPort(sw, first.ifname, name="second")
        assert [p.name for p in sw.ports] == [first.name]
    assert sw.ports == ()


@needs_netns
@needs_ping
async def test_the_namespace_pings_a_pyguest_and_an_x86_guest() -> None:
    py = EchoGuest("py", IP_PY)
    x86 = X86Guest(name="x86-echo", cmdline=f"mode=echo ip={IP_X86}")
    async with net_env(py, x86, timeout_s=30) as env:
        await wait_x86_ready(x86, env.switch, timeout_s=30)
        async with tap_in_namespace(env.switch) as (tap, ns):
            for target in (IP_PY, IP_X86):
                done = await run_in(ns, "ping", "-c", "5", "-i", "0.2", "-W", "5", target)
                out = done.stdout.decode()
                assert done.returncode == 0, out + done.stderr.decode()
                assert "5 packets transmitted, 5 received, 0% packet loss" in out
            assert tap.counters["packets.rx"] >= 10
            assert tap.counters["packets.tx"] >= 10


UDP_CLIENT = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(5)
s.bind(("{ns_ip}", 0))
for i in range(5):
    msg = b"datagram %d from the namespace" % i
    s.sendto(msg, ("{guest}", 7))
    data, peer = s.recvfrom(2048)
    assert data == msg and peer == ("{guest}", 7), (data, peer)
print("echoed 5")
"""


@needs_netns
async def test_a_udp_socket_in_the_namespace_exchanges_datagrams_with_a_guest() -> None:
    py = EchoGuest("py", IP_PY)
    async with net_env(py, timeout_s=30) as env, tap_in_namespace(env.switch) as (_, ns):
        script = UDP_CLIENT.format(ns_ip=NS_IP, guest=IP_PY)
        done = await run_in(ns, sys.executable, "-c", script)
        assert done.returncode == 0, done.stderr.decode()
        assert done.stdout.decode().strip() == "echoed 5"


@needs_netns
async def test_a_tap_whose_link_is_down_counts_and_drops() -> None:
    sw = Switch()
    with TapPort(sw, unique_name("pvd")) as tap:  # created down, never brought up
        tap.transmit([b"\xff" * 6 + b"\x02" + bytes(5) + b"\x08\x00" + bytes(46)] * 3)
        assert tap.counters["drops.link_down"] == 3


LINUX_IP = "10.0.0.9"
LINUX_SERVICES = (
    "mkdir -p /www && echo pvio-http-ok > /www/index.html && httpd -p 8080 -h /www\n"
    "nc -ll -p 7000 -e /bin/cat &\n"
)


@needs_netns
@needs_ping
@pytest.mark.slow
async def test_the_namespace_pings_linux_and_reaches_its_tcp_services() -> None:
    """Debian's Linux behind its own xen-netfront: the host's ping, curl (BusyBox httpd in
    Linux) and a TCP socket (an echo service) reach it through the TAP port."""
    from pvio.cpu.linux import LinuxGuest
    from tests.pvh_support import require

    require("linux")
    linux = LinuxGuest(scenario=LINUX_SERVICES, ip=f"{LINUX_IP}/24")
    async with net_env(linux, wait_ready=[], timeout_s=60) as env:
        assert await linux.wait_for("PVIO-END", 240.0), linux.domain.console[-2000:]
        async with tap_in_namespace(env.switch) as (_tap, ns):
            done = await run_in(ns, "ping", "-c", "5", "-i", "0.2", "-W", "5", LINUX_IP, timeout_s=90)
            out = done.stdout.decode()
            assert "5 packets transmitted, 5 received, 0% packet loss" in out, out + done.stderr.decode()
            if shutil.which("curl"):
                page = await run_in(ns, "curl", "-s", "-m", "20", f"http://{LINUX_IP}:8080/", timeout_s=60)
                assert page.stdout.decode() == "pvio-http-ok\n", (
                    page.returncode,
                    linux.domain.console[-1500:],
                )
            script = (
                "import socket\n"
                f"s = socket.create_connection(('{LINUX_IP}', 7000), timeout=20)\n"
                "s.sendall(b'pvio-tcp\\n')\n"
                "print(s.recv(64).decode(), end='')\n"
            )
            echo = await run_in(ns, sys.executable, "-c", script, timeout_s=60)
            assert echo.stdout.decode() == "pvio-tcp\n", echo.stderr.decode()
