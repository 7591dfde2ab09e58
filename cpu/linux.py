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
    ) -> None:
        cmdline = (
            BASE_CMDLINE + (f" pvio.ip={ip}" if ip else "") + (f" {extra_cmdline}" if extra_cmdline else "")
        )
        super().__init__(
            debian.linux_kernel(),
            name=name,
            cmdline=cmdline,
            modules=[debian.initramfs(scenario, with_netfront=with_netfront)],
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
