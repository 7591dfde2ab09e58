"""Linux's own xen-netfront across a netback restart.

Linux answers its backend going Closing by going Closed, and reconnects only from
Initialising, which a closed xen-netfront never writes again: with Xen, the toolstack
re-plugs the device (``xl network-detach``, ``xl network-attach``).  pvio's toolstack does
the same with :func:`pvio.toolstack.detach_vif` and :func:`pvio.toolstack.attach_vif`:
Linux sees its ``device/vif/0`` go (it unregisters the interface; the test waits until
``/sys/bus/xen/devices`` shows it gone) and come back (it probes a new xen-netfront, which
connects to the new netback), and the interface, configured again,
pings the PyGuest with 0 loss.  Linux's timers make its counts vary; what is asserted is the
state sequence and Linux's own ping summary.
"""

from __future__ import annotations

import pytest

from pvio import XenbusState
from pvio.backends.netback import NetBack
from pvio.cpu.linux import LinuxGuest
from pvio.toolstack import attach_vif, detach_vif
from tests.netenv import IP_A, EchoGuest, net_env, wait_until
from tests.pvh_support import require

LINUX_IP = "10.0.0.9"
BOOT_TIMEOUT_S = 240.0


@pytest.mark.slow
async def test_linux_netfront_is_replugged_after_a_netback_restart_and_pings_again() -> None:
    require("linux")
    linux = LinuxGuest(scenario=f"ping -c 2 -W 5 {IP_A}\n", ip=f"{LINUX_IP}/24")
    echo = EchoGuest("echo", IP_A)
    async with net_env(echo, linux, wait_ready=[echo], timeout_s=60) as env:
        assert await linux.wait_for("PVIO-END", BOOT_TIMEOUT_S), linux.domain.console[-2000:]
        out = linux.scenario_output()
        assert out is not None and " 0% packet loss" in out, out
        hv = env.hv
        fe = f"/local/domain/{linux.domain.domid}/device/vif/0"
        mac = hv.toolstack.read(f"{fe}/mac").decode()

        def fe_state() -> XenbusState:
            return XenbusState(int(hv.toolstack.read(f"{fe}/state")))

        env.netback.stop()
        await wait_until(lambda: fe_state() == XenbusState.CLOSED, 60, "Linux's netfront to close")
        assert hv.dom0 is not None
        dom0 = hv.dom0.kernel
        netback = NetBack(dom0, env.switch)  # type: ignore[arg-type]
        dom0.spawn(netback.run, name="netback-restarted")  # type: ignore[attr-defined]
        env.netback = netback
        await wait_until(lambda: echo.nic.connected, 30, "the PyGuest's vif to reconnect")
        # Linux stays Closed with a new backend: it reconnects only when the device is re-plugged.
        assert fe_state() == XenbusState.CLOSED
        await detach_vif(hv, linux.domain, 0)
        # As after ``xl network-detach``: the device is gone from Linux's xenbus (it saw the
        # directory go and unregistered eth0) before it is plugged again.
        for _ in range(20):
            listing = await linux.run_command("ls /sys/bus/xen/devices/", timeout=60)
            if listing is not None and "vif-0" not in listing:
                break
        else:
            raise AssertionError(f"Linux kept its vif after the detach: {listing!r}")
        attach_vif(hv, linux.domain, 0, mac=mac)
        await wait_until(lambda: fe_state() == XenbusState.CONNECTED, 120, "Linux's new netfront to connect")
        out = await linux.run_command(
            f"ip addr add {LINUX_IP}/24 dev eth0 && ip link set eth0 up && ping -c 3 -W 5 {IP_A}", timeout=120
        )
        assert out is not None and " 0% packet loss" in out, out
