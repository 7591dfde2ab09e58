"""Debian's unmodified Linux as a PVH guest: its xen-netfront against pvio's netback.

One boot serves the first test (a Linux boot costs tens of seconds of emulation): Linux
comes up on Xen's timer, loads xen-netfront from pvio's initramfs, connects to netback,
pings a PyGuest, answers scapy-built probes from another PyGuest, and its own counters
(``rx_packets``, the callback line and the event-channel lines of ``/proc/interrupts``)
agree with pvio's.  Counts that Linux's own timers make vary are asserted as bounds; the
frames pvio delivered are asserted exactly.  The second test boots a kernel that panics
(a command line leaving it no memory) next to GRUB and checks that only the broken domain
stops.
"""

from __future__ import annotations

import logging
import re

import pytest
import trio
from scapy.layers.inet import ICMP, IP, UDP
from scapy.layers.l2 import ARP, Ether

from pvio.cpu.linux import GrubGuest, LinuxGuest
from tests.netenv import IP_A, IP_B, EchoGuest, NicGuest, net_env, recv_n, wait_until
from tests.pvh_support import require

LINUX_IP = "10.0.0.9"
PINGS = 5
BOOT_TIMEOUT_S = 240.0


def _mac(nic_mac: bytes) -> str:
    return ":".join(f"{b:02x}" for b in nic_mac)


async def _recv_match(nic: object, match: object, limit: int = 8) -> Ether:
    """The first frame ``match`` accepts among the next ``limit`` (Linux may ARP for us first)."""
    for _ in range(limit):
        frame = Ether((await recv_n(nic, 1, 30))[0])  # type: ignore[arg-type]
        if match(frame):  # type: ignore[operator]
            return frame
    raise AssertionError(f"no matching frame in {limit}")


@pytest.mark.slow
async def test_linux_netfront_connects_pings_and_answers_probes() -> None:
    require("linux")
    linux = LinuxGuest(
        scenario=f"ip link show eth0\nping -c {PINGS} -W 5 {IP_A}\n",
        ip=f"{LINUX_IP}/24",
    )
    echo = EchoGuest("echo", IP_A)
    prober = NicGuest("prober", IP_B)
    async with net_env(echo, prober, linux, wait_ready=[echo, prober], timeout_s=60) as env:
        assert await linux.wait_for("PVIO-END", BOOT_TIMEOUT_S), linux.domain.console[-2000:]
        out = linux.scenario_output()
        assert out is not None
        # xen-netfront reached Connected with netback and the interface is up.
        assert "eth0" in out and "LOWER_UP" in out
        assert env.vif(linux).dev["split_event_channels"] == 1  # Linux took the offered TX/RX channels
        # Linux pinged the PyGuest with no loss.
        assert f"{PINGS} packets transmitted, {PINGS} packets received, 0% packet loss" in out
        assert "PVIO-END rc=0" in linux.domain.console

        # A PyGuest probes Linux with scapy-built frames and checks Linux's real answers.
        nic = prober.nic
        src = _mac(nic.mac)
        arp = Ether(src=src, dst="ff:ff:ff:ff:ff:ff") / ARP(op=1, hwsrc=src, psrc=IP_B, pdst=LINUX_IP)
        await nic.send(bytes(arp))
        reply = await _recv_match(nic, lambda f: f.haslayer(ARP) and f[ARP].op == 2)
        assert reply[ARP].psrc == LINUX_IP and reply[ARP].pdst == IP_B
        linux_mac = reply[ARP].hwsrc
        ping = (
            Ether(src=src, dst=linux_mac)
            / IP(src=IP_B, dst=LINUX_IP)
            / ICMP(type=8, id=0x4242, seq=1)
            / b"pvio-probe"
        )
        await nic.send(bytes(ping))
        pong = await _recv_match(nic, lambda f: f.haslayer(ICMP))
        assert pong[ICMP].type == 0 and pong[ICMP].id == 0x4242 and bytes(pong[ICMP].payload) == b"pvio-probe"
        udp = Ether(src=src, dst=linux_mac) / IP(src=IP_B, dst=LINUX_IP) / UDP(sport=4000, dport=9999) / b"x"
        await nic.send(bytes(udp))
        unreachable = await _recv_match(nic, lambda f: f.haslayer(ICMP))
        assert unreachable[ICMP].type == 3 and unreachable[ICMP].code == 3  # port unreachable

        # Linux's own counters agree with pvio's.  pvio's counts are read just before the
        # command is typed and just after its output: Linux reads its own in between.
        await trio.sleep(0.5)  # let the last frames settle in both ends
        delivered = env.vif(linux).dev["packets.rx"]
        c = linux.domain.counters
        raised0, upcalls0 = c["evtchn.raised"], c["interrupts"]
        text = await linux.run_command("cat /sys/class/net/eth0/statistics/rx_packets; cat /proc/interrupts")
        raised1, upcalls1 = c["evtchn.raised"], c["interrupts"]
        assert text is not None
        numbers = [ln.strip() for ln in text.splitlines() if ln.strip().isdigit()]
        assert numbers, text
        assert int(numbers[-1]) == delivered  # every frame pvio delivered, and only those
        hyp = re.search(r"^\s*HYP:\s+(\d+)", text, re.M)
        assert hyp is not None, text
        # Every callback-vector injection enters Linux's sysvec_xen_hvm_callback, which counts
        # it on the HYP line before anything else: the count Linux read lies in pvio's window.
        assert upcalls0 <= int(hyp.group(1)) <= upcalls1
        # The Xen event-channel lines (one per port Linux bound: "xen-percpu" for the timer
        # VIRQ and the IPIs, "xen-dyn" for xenbus, "xen-dyn-lateeoi" for the console and
        # netfront's TX and RX channels) against the events pvio raised.
        lines = re.findall(r"^\s*\d+:\s+(\d+)\s+(xen-\S+)", text, re.M)
        assert {"xen-percpu", "xen-dyn", "xen-dyn-lateeoi"} <= {name for _, name in lines}, text
        handled = sum(int(n) for n, _ in lines)
        # evtchn.raised counts a port's pending bit going 0 -> 1; Linux counts each time it
        # takes a pending port, clearing the bit.  So Linux cannot have handled more than
        # pvio raised by the end of the window (Linux sets a pending bit itself only to
        # resend an event it had deferred, which had been raised and not yet counted), and
        # by the time it reads, it has handled everything raised before the window except
        # what is still pending behind a mask (lateeoi, a disabled irq): at most one event
        # per bound port, since a pending bit holds one.
        assert raised0 - len(lines) <= handled <= raised1, (raised0, handled, raised1, text)
        c = linux.domain.counters
        assert c["timer.singleshot"] > 100  # Linux runs its clockevent on Xen's singleshot timer
        assert c["exits.syscall"] > 0 and c["exits.page_fault"] > 0
        assert c["crashes"] == 0 and c["hypercall_internal_errors"] == 0

        # The reconnect path: unbinding xen-netfront closes the vif (netback goes Closed);
        # binding it again brings the frontend back in Initialising, netback prepares for
        # reconnect (InitWait) and the new rings carry traffic.
        vif = env.vif(linux)
        out = await linux.run_command("ip link set eth0 down; echo vif-0 > /sys/bus/xen/drivers/vif/unbind")
        assert out is not None
        await wait_until(lambda: not vif.connected, 30, "netback to see the frontend close")
        backend_state = env.hv.toolstack.read(f"/local/domain/0/backend/vif/{linux.domain.domid}/0/state")
        assert backend_state == b"6"  # Closed
        out = await linux.run_command(
            "echo vif-0 > /sys/bus/xen/drivers/vif/bind; sleep 1; cat /sys/bus/xen/devices/vif-0/state; "
            f"ip addr add {LINUX_IP}/24 dev eth0; ip link set eth0 up; ping -c 2 -W 5 {IP_A}",
            90,
        )
        assert out is not None and "Connected" in out and "2 packets received" in out, out
        assert vif.connected and vif.dev["reconnects"] == 1
        assert vif.dev["split_event_channels"] == 1

        # A guest that corrupts its grant table: netback's grant operations fail and are
        # counted; nothing raises in dom0 and every other domain goes on.
        gt = linux.domain.grant_table
        linux.domain.mem.write(gt.first_gfn * 4096, bytes([0xA5]) * (gt.nr_frames * 4096))
        for _ in range(3):
            await nic.send(bytes(ping))
            await trio.sleep(0.2)
        assert vif.dev["drops.rx_bad_grant"] == 3  # each frame for Linux met a corrupted grant
        assert env.count("dom0", "hypercall_errors.permission_denied") == 3  # refused, per element
        assert env.hv.dom0 is not None and env.hv.dom0.alive and echo.domain.alive and prober.domain.alive
        assert env.count("dom0", "hypercall_internal_errors") == 0


@pytest.mark.slow
async def test_a_panicking_kernel_stops_only_its_domain(caplog: pytest.LogCaptureFixture) -> None:
    require("linux")
    require("grub")
    import pvio

    caplog.set_level(logging.ERROR)
    async with pvio.Hypervisor() as hv:
        grub = GrubGuest()
        gdom = hv.create_domain(grub, name="grub")
        await hv.start(gdom)
        assert await grub.wait_for("Minimal BASH-like", 60)
        # With 6 MiB Linux panics early in boot ("can't set nsfs up"); its Xen panic
        # notifier reports the crash with SCHEDOP_shutdown.
        linux = LinuxGuest(name="broken", extra_cmdline="mem=6M panic=0", with_netfront=False)
        ldom = hv.create_domain(linux, name="broken")
        await hv.start(ldom)
        with trio.fail_after(120):
            while ldom.alive:
                await trio.sleep(0.1)
        assert ldom.crash_reason == "guest reported a crash"
        assert "Kernel panic" in ldom.console
        dumps = [r.getMessage() for r in caplog.records if "registers:" in r.getMessage()]
        assert dumps and "rip=" in dumps[0] and "slice" in dumps[0]  # register dump + last hypercalls
        # The other domains run on: GRUB still obeys its console, dom0 is alive.
        assert gdom.alive and hv.dom0 is not None and hv.dom0.alive
        grub.type("\n")
        start = len(gdom.console)
        grub.type("echo still-running\n")
        assert await grub.wait_for("\nstill-running", 30, start)
