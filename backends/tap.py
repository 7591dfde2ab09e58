"""A switch port bound to a Linux TAP device: pvio's guests on the host's network.

Design rationale
----------------
A TAP device is the kernel's end of a virtual Ethernet cable: every frame the kernel
sends out of the interface can be read from the file descriptor, and every frame written
to the descriptor arrives on the interface as if received from a wire.  So a
:class:`TapPort` is a plain :class:`SwitchPort`: ``transmit`` writes frames to the
descriptor, :meth:`TapPort.run` reads frames from it and hands them to the switch.  The
host (or the network namespace the device is moved into) then reaches the guests with
its own ``ping``, sockets and tools, and ARP and routing work as on any Ethernet.

- **opened with ioctl, not a library.**  ``/dev/net/tun`` + ``TUNSETIFF`` with
  ``IFF_TAP | IFF_NO_PI``: one read is one Ethernet frame, no packet-information prefix.
  The device lives as long as the descriptor (it is not made persistent), so closing
  the port removes it and a crashed dom0 leaves nothing behind.
- **never blocks the switch.**  The descriptor is non-blocking.  ``transmit`` runs on
  the switch's data path: a frame the kernel cannot take now (``EAGAIN``, a full queue)
  is dropped and counted, as a real NIC's full TX ring would; an interface that is down
  (``EIO``) counts ``drops.link_down``.  The reader waits with
  ``trio.lowlevel.wait_readable`` and drains up to ``batch`` frames per wake-up, so the
  switch sees batches, as from a vif.
- **hostile input.**  What the kernel delivers is still checked by the switch (runts,
  oversize frames); a read error other than "nothing more" ends the reader with one log
  line and a ``errors.read`` count, never an exception into dom0.
- **says why it cannot be created.**  :func:`open_tap` raises :class:`TapError` with
  a one-line reason (no ``/dev/net/tun``, no permission, device busy, bad name); the
  caller logs it and the rest of the network runs on.

Counters, owner ``switch/<port name>`` (besides the switch's own ``packets.*``/``bytes.*``):
``drops.tx_full`` (the kernel's queue was full), ``drops.link_down`` (the interface is
down), ``drops.tx_error`` (any other write error), ``errors.read``.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import struct

import trio

from pvio.backends.switch import Switch, SwitchPort
from pvio.core.counters import CounterRegistry

log = logging.getLogger("pvio.tap")

TUN_PATH = "/dev/net/tun"
TUNSETIFF = 0x400454CA  # _IOW('T', 202, int)
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFNAMSIZ = 16
MAX_READ = 65535 + 14  # the largest frame the switch accepts
DEFAULT_BATCH = 64


class TapError(OSError):
    """A TAP device could not be created; ``str()`` is a one-line reason (``errno`` says which)."""

    def __str__(self) -> str:
        return str(self.strerror)


def _reason(e: OSError, ifname: str) -> str:
    if e.errno == errno.ENOENT:
        return f"tap {ifname}: {TUN_PATH} does not exist (no TUN/TAP support in this kernel or container)"
    if e.errno in (errno.EPERM, errno.EACCES):
        return f"tap {ifname}: no permission (creating a TAP device needs CAP_NET_ADMIN)"
    if e.errno == errno.EBUSY:
        return f"tap {ifname}: device busy (another process has it open)"
    if e.errno == errno.EINVAL:
        return f"tap {ifname}: refused by the kernel (an interface of another type has this name?)"
    return f"tap {ifname}: {e.strerror or e}"


def open_tap(ifname: str) -> int:
    """Create (or attach to) TAP device ``ifname``; return its non-blocking descriptor.

    Raises :class:`TapError` with a one-line reason when it cannot.
    """
    raw = ifname.encode()
    if not raw or len(raw) >= IFNAMSIZ or b"/" in raw or b"\0" in raw or raw.strip() != raw:
        raise TapError(errno.EINVAL, f"tap {ifname!r}: not a valid interface name (1-15 bytes)")
    try:
        fd = os.open(TUN_PATH, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        raise TapError(e.errno, _reason(e, ifname)) from None
    ifr = struct.pack(f"{IFNAMSIZ}sH22x", raw, IFF_TAP | IFF_NO_PI)
    try:
        fcntl.ioctl(fd, TUNSETIFF, ifr)
    except OSError as e:
        os.close(fd)
        raise TapError(e.errno, _reason(e, ifname)) from None
    return fd


class TapPort(SwitchPort):
    """A switch port whose other end is the Linux TAP device ``ifname``.

    ``TapPort(switch, "pvtap0")`` creates the device (:class:`TapError` if it cannot) and
    attaches to ``switch``; run :meth:`run` in a task to receive from it; :meth:`close`
    detaches and removes the device.  Bring the interface up and give it an address with
    the host's tools (``ip link set pvtap0 up``).
    """

    def __init__(
        self,
        switch: Switch,
        ifname: str,
        *,
        name: str | None = None,
        batch: int = DEFAULT_BATCH,
        counters: CounterRegistry | None = None,
    ) -> None:
        super().__init__(name or f"tap-{ifname}", counters)
        if batch < 1:
            raise ValueError(f"tap {ifname}: batch must be >= 1, got {batch}")
        self.ifname = ifname
        self.batch = batch
        self.switch = switch
        self.fd: int | None = open_tap(ifname)
        try:
            switch.attach(self)
        except Exception:
            os.close(self.fd)
            self.fd = None
            raise

    def transmit(self, frames: list[bytes]) -> None:
        """Write each frame to the device; what the kernel cannot take now is counted and dropped."""
        fd = self.fd
        if fd is None:
            self.counters["drops.closed"] += len(frames)
            return
        write = os.write
        for i, frame in enumerate(frames):
            try:
                write(fd, frame)
            except BlockingIOError:
                self.counters["drops.tx_full"] += 1
            except OSError as e:
                if e.errno == errno.EIO:
                    self.counters["drops.link_down"] += len(frames) - i
                    return  # down: the rest of the batch fails alike
                self.counters["drops.tx_error"] += 1

    async def run(self) -> None:
        """Read frames from the device and switch them, in batches, until closed or cancelled."""
        read = os.read
        batch = self.batch
        while self.fd is not None:
            fd = self.fd
            try:
                await trio.lowlevel.wait_readable(fd)
            except (trio.ClosedResourceError, OSError):
                return
            frames: list[bytes] = []
            while len(frames) < batch and self.fd is not None:
                try:
                    frames.append(read(fd, MAX_READ))
                except BlockingIOError:
                    break
                except OSError as e:
                    self.counters["errors.read"] += 1
                    log.error("tap %s: read failed: %s; the port stops receiving", self.ifname, e)
                    if frames:
                        self.switch.input(self, frames)
                    return
            if frames:
                self.switch.input(self, frames)

    def close(self) -> None:
        """Detach from the switch and close the descriptor (which removes the device)."""
        fd, self.fd = self.fd, None
        if self in self.switch.ports:
            self.switch.detach(self)
        if fd is not None:
            with contextlib.suppress(RuntimeError):  # outside trio.run nobody can be waiting
                trio.lowlevel.notify_closing(fd)  # wakes a reader blocked on it
            os.close(fd)

    def __enter__(self) -> TapPort:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
