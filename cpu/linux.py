"""The ``linux`` and ``grub`` guest kinds: Debian's unmodified Linux and GRUB as PVH guests.

``LinuxGuest(scenario=..., ip=...)`` boots Debian's Linux 6.1 (:mod:`pvio.cpu.debian`) with
pvio's initramfs: ``/init`` loads ``xen-netfront``, gives ``eth0`` the address ``ip`` (CIDR)
if one is set, runs the ``scenario`` shell commands between markers on ``hvc0`` and then
leaves a shell on the console.  :meth:`LinuxGuest.wait_for` and :meth:`LinuxGuest.run_command`
drive it from tests.  ``GrubGuest()`` boots ``grub-i386-xen_pvh.bin`` to ``grub>``.

Both raise :class:`pvio.cpu.debian.DebianUnavailable` (one line: what to install) when the
packages cannot be had.
"""

from __future__ import annotations

from typing import Any

import trio

from pvio.cpu import debian
from pvio.cpu.pvh import PvhGuest

# What the emulated CPU makes expensive is switched off: the crypto self-tests (seconds of
# multi-precision arithmetic), the W+X page-table audit behind read-only data, speculative
# execution mitigations (KPTI's CR3 switches); IPv6 is off so the guest sends no
# unsolicited multicast that tests would have to count.
BASE_CMDLINE = (
    "console=hvc0 earlyprintk=xen loglevel=4 mitigations=off cryptomgr.notests rodata=off ipv6.disable=1"
)
LINUX_MEMORY_PAGES = 32768  # 128 MiB
GRUB_MEMORY_PAGES = 8192  # 32 MiB


class LinuxGuest(PvhGuest):
    """Debian's Linux on pvio's initramfs (see the module docstring)."""

    def __init__(
        self,
        *,
        name: str | None = "linux",
        scenario: str = "",
        ip: str | None = None,
        extra_cmdline: str = "",
        memory_pages: int = LINUX_MEMORY_PAGES,
        with_netfront: bool = True,
        modules: tuple[str, ...] = (),
    ) -> None:
        cmdline = (
            BASE_CMDLINE + (f" pvio.ip={ip}" if ip else "") + (f" {extra_cmdline}" if extra_cmdline else "")
        )
        super().__init__(
            debian.linux_kernel(),
            name=name,
            cmdline=cmdline,
            modules=[debian.initramfs(scenario, with_netfront=with_netfront, modules=modules)],
            memory_pages=memory_pages,
        )

    def scenario_output(self) -> str | None:
        """What the scenario printed (None until it has finished)."""
        return debian.scenario_output(self.domain.console)

    async def run_command(self, command: str, timeout: float = 30.0) -> str | None:
        """Type ``command`` at the shell; its output (None on timeout)."""
        start = len(self.domain.console)
        marker = "PVIO-DONE"
        self.type(f"{command}; echo {marker}$((40+2))\n")
        if not await self.wait_for(f"{marker}42", timeout, start):
            return None
        text = self.domain.console[start:]
        lines = [ln for ln in text.split("\n") if marker not in ln]
        return "\n".join(lines).strip("\n")


class GrubGuest(PvhGuest):
    """Debian's GRUB for Xen PVH."""

    def __init__(self, *, name: str | None = "grub", memory_pages: int = GRUB_MEMORY_PAGES) -> None:
        super().__init__(debian.grub_pvh_image(), name=name, memory_pages=memory_pages)


class LinuxNic:
    """What the bench harness reads of a Linux guest's NIC: its MAC (Linux moves the frames)."""

    def __init__(self, guest: LinuxBenchGuest) -> None:
        self.guest = guest

    @property
    def mac(self) -> bytes:
        """The MAC the toolstack gave vif 0 (Linux's eth0)."""
        from pvio.abi.vif import parse_mac

        dom = self.guest.domain
        return parse_mac(dom.hv.toolstack.read(f"/local/domain/{dom.domid}/device/vif/0/mac").decode())

    async def send(self, frame: bytes) -> None:
        """Frames are Linux's to send: drive it through its console (``run_command``)."""
        raise NotImplementedError("a Linux guest's traffic is made by Linux: use LinuxGuest.run_command")

    async def recv(self) -> bytes:
        """See :meth:`send`."""
        raise NotImplementedError("a Linux guest's traffic is made by Linux: use LinuxGuest.run_command")


class LinuxBenchGuest(LinuxGuest):
    """The ``"linux"`` guest kind of :mod:`pvio.harness.bench` (PV NIC only).

    ``ready`` is set once ``eth0`` is up; Linux then announces itself with one gratuitous
    ARP, which is how the switch learns its MAC (``announces_itself``).  Its traffic is
    Linux's own: drive it with :meth:`LinuxGuest.run_command` (the harness's Python
    scenarios, which move frames through ``nic.send``/``recv``, do not apply).
    """

    announces_itself = True

    def __init__(self, name: str, ip: str, **kwargs: Any) -> None:
        kwargs.setdefault("modules", ("pktgen",))  # the kernel's packet generator: Linux's TX stream
        super().__init__(name=name, ip=f"{ip}/24", scenario=f"arping -U -c 1 -I eth0 {ip}\n", **kwargs)
        self.ip = ip
        self.ready = trio.Event()
        self.nic = LinuxNic(self)

    async def run(self) -> None:
        """Run the vCPU; set ``ready`` when the scenario (the announcement) has run."""

        async def watch() -> None:
            if await self.wait_for(debian.END_MARKER, BOOT_TIMEOUT_S):
                self.ready.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch)
            await super().run()
            nursery.cancel_scope.cancel()

    async def eth0_stats(self) -> dict[str, int]:
        """``eth0``'s counters as Linux keeps them (``/sys/class/net/eth0/statistics``)."""
        keys = ("rx_packets", "tx_packets", "rx_dropped", "tx_dropped")
        paths = " ".join(f"/sys/class/net/eth0/statistics/{k}" for k in keys)
        out = await self.run_command(f"cat {paths}")
        values = [int(w) for w in (out or "").split() if w.isdigit()]
        if len(values) != len(keys):
            raise RuntimeError(f"{self.name}: cannot read eth0's statistics: {out!r}")
        return dict(zip(keys, values, strict=True))


BOOT_TIMEOUT_S = 600.0


def linux_bench_guest(name: str, model: str, ip: str, options: dict[str, Any]) -> LinuxBenchGuest:
    """The bench factory for ``"linux"``: Debian's Linux with its xen-netfront (model ``pv`` only)."""
    if model != "pv":
        raise ValueError(f"the linux guest kind has a PV NIC only (xen-netfront), not {model!r}")
    return LinuxBenchGuest(name, ip, extra_cmdline=str(options.get("cmdline", "")))
