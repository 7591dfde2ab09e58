"""Linux network namespaces for tests that put real kernel networking next to pvio.

Every namespace and device gets a name unique to this process (the pid and a counter),
so parallel runs never collide, and is deleted in a ``finally``: traffic stays inside
namespaces the test created.  :func:`netns_skip_reason` says, in one line, why such a
test cannot run here (not root, no ``/dev/net/tun``, no ``ip``).
"""

from __future__ import annotations

import ctypes
import itertools
import os
import shutil
import socket
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager

_ids = itertools.count()


def unique_name(prefix: str) -> str:
    """An interface or namespace name unique to this process (at most 15 bytes)."""
    return f"{prefix}{os.getpid() % 100000}x{next(_ids)}"[:15]


def netns_skip_reason(*, tun: bool = False) -> str | None:
    """Why namespace tests cannot run here, or None if they can."""
    if os.geteuid() != 0:
        return "needs root (CAP_NET_ADMIN) to create network namespaces"
    if shutil.which("ip") is None:
        return "needs iproute2's ip (Debian package iproute2)"
    if tun and not os.path.exists("/dev/net/tun"):
        return "needs /dev/net/tun (TUN/TAP support)"
    probe = unique_name("pvp")
    if subprocess.run(["ip", "netns", "add", probe], capture_output=True).returncode != 0:
        return "cannot create a network namespace here (ip netns add failed)"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


#: Why the host's ``ping`` cannot be run here (None: it can), for the tests that run it.
PING_MISSING = None if shutil.which("ping") else "needs the host's ping (Debian package iputils-ping)"


def ip(*args: str, ns: str | None = None) -> None:
    """Run ``ip ARGS`` (in namespace ``ns``), raising with ip's message if it fails."""
    cmd = ["ip", *(["-n", ns] if ns else []), *args]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: {done.stderr.strip()}")


def in_ns(ns: str, *cmd: str) -> list[str]:
    """The command line that runs ``cmd`` inside namespace ``ns``."""
    return ["ip", "netns", "exec", ns, *cmd]


@contextmanager
def netns(prefix: str = "pvns") -> Iterator[str]:
    """A fresh network namespace (loopback up, IPv6 off so the kernel stays quiet); deleted after."""
    name = unique_name(prefix)
    ip("netns", "add", name)
    try:
        ip("link", "set", "lo", "up", ns=name)
        for key in ("all", "default"):
            subprocess.run(
                in_ns(name, "sysctl", "-qw", f"net.ipv6.conf.{key}.disable_ipv6=1"), capture_output=True
            )
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)


CLONE_NEWNET = 0x40000000


def udp_socket_in(ns: str, address: tuple[str, int]) -> socket.socket:
    """A UDP socket bound to ``address`` inside namespace ``ns`` (a socket keeps its namespace).

    The calling process stays where it is: a helper thread enters the namespace
    (``setns`` affects one thread), creates and binds the socket, and ends.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    result: list[socket.socket | BaseException] = []

    def create() -> None:
        try:
            fd = os.open(f"/var/run/netns/{ns}", os.O_RDONLY)
            try:
                if libc.setns(fd, CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), f"setns into {ns} failed")
            finally:
                os.close(fd)
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.bind(address)
            result.append(sock)
        except BaseException as e:  # handed to the caller
            result.append(e)

    thread = threading.Thread(target=create)
    thread.start()
    thread.join()
    (outcome,) = result
    if isinstance(outcome, BaseException):
        raise outcome
    return outcome
