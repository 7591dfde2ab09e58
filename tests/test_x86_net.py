"""The x86 guest on the virtual network: its C netfront's handshake, traffic with a PyGuest,
exact counts, and x86 guests that misbehave on the vif.

The x86 guest runs pvio's C guest kernel (``frontends/x86``) on the emulated vCPU; its
peer is a PyGuest (``tests/netenv.py``, :mod:`pvio.frontends.guests`) on the same netback and
switch.  Every scenario runs under trio's MockClock (``autojump_clock``) with the
hypervisor's seeded scheduler, so the counts asserted are the same on every run.
"""

from __future__ import annotations

import logging
from typing import Any

import pytest
import trio
from scapy.layers.inet import ICMP, IP, UDP
from scapy.layers.l2 import ARP, Ether

from pvio import XenbusState
from pvio.cpu.guest import X86Guest
from pvio.frontends.netstack import arp_request, icmp_echo, udp_packet
from pvio.harness.demo import wait_x86_ready, x86_mac
from tests.netenv import EchoGuest, NicGuest, net_env, recv_n, seq_of, wait_until
from tests.test_netif import VifStateLog

IP_PY, IP_X86 = "10.0.0.1", "10.0.0.2"


def x86_echo(mode: str = "echo", **keys: str) -> X86Guest:
    words = " ".join([f"mode={mode}", f"ip={IP_X86}", *(f"{k}={v}" for k, v in keys.items())])
    return X86Guest(name=f"x86-{mode}", cmdline=words)


async def ping(a: NicGuest, mac: bytes, seq: int, payload: bytes = b"ping" * 8) -> Any:
    await a.nic.send(icmp_echo(a.nic.mac, mac, IP_PY, IP_X86, 7, seq, payload))
    (answer,) = await recv_n(a.nic, 1)
    return Ether(answer)


# ---------------------------------------------------------------------- handshake
async def test_the_netfront_handshake_is_visible_in_xenstore(autojump_clock: Any) -> None:
    logs: list[VifStateLog] = []
    x86 = x86_echo()
    a = NicGuest("py", IP_PY)
    # dom1 is the PyGuest, dom2 the x86 guest: log dom2's vif from before it exists.
    async with net_env(a, x86, before_guests=lambda hv: logs.append(VifStateLog(hv, 2))) as env:
        await wait_x86_ready(x86, env.switch)
        (log,) = logs
        assert log.states == [
            ("FE", XenbusState.INITIALISING),
            ("BE", XenbusState.INITIALISING),
            ("BE", XenbusState.INIT_WAIT),
            ("FE", XenbusState.CONNECTED),
            ("BE", XenbusState.CONNECTED),
        ]
        assert log.when_fe_keys_appeared is not None
        assert log.when_fe_keys_appeared["request-rx-copy"] == "1"
        assert log.when_fe_keys_appeared["event-channel"] is not None  # one transaction: all keys at once
        assert env.vif(x86).connected
        assert "netfront: vif2.0 connected, mac 00:16:3e:00:02:00" in x86.domain.console


# ---------------------------------------------------------------------- traffic
async def test_the_x86_guest_answers_arp_ping_and_udp_echo_from_a_pyguest(autojump_clock: Any) -> None:
    a, x86 = NicGuest("py", IP_PY), x86_echo()
    async with net_env(a, x86) as env:
        mac = await wait_x86_ready(x86, env.switch)
        await a.nic.send(arp_request(a.nic.mac, IP_PY, IP_X86))
        (arp,) = [Ether(f) for f in await recv_n(a.nic, 1)]
        assert arp[ARP].op == 2 and arp[ARP].psrc == IP_X86 and arp[ARP].hwsrc == x86_mac(x86).hex(":")
        reply = await ping(a, mac, 1)
        assert reply[ICMP].type == 0 and reply[ICMP].id == 7 and reply[ICMP].seq == 1
        assert bytes(reply[ICMP].payload) == b"ping" * 8
        assert reply[IP].src == IP_X86 and reply[IP].dst == IP_PY
        for size in (18, 1472, 6000):  # 6000 bytes: two ring slots each way
            payload = bytes(i * 7 & 0xFF for i in range(size))
            await a.nic.send(udp_packet(a.nic.mac, mac, IP_PY, IP_X86, 40000, 7, payload))
            (echo,) = [Ether(f) for f in await recv_n(a.nic, 1)]
            assert echo[UDP].sport == 7 and echo[UDP].dport == 40000
            assert bytes(echo[UDP].payload) == payload


async def test_ten_pings_take_exact_interrupt_and_exit_counts(autojump_clock: Any) -> None:
    """One ping at a time: per ping the x86 guest takes two upcalls, as the PyGuest peer
    does (the RX event for the request; then netback's TX-response event for the reply),
    returns from each with iret and sleeps again in SCHEDOP_block, and sends one
    notification (the reply's TX push; re-posting the RX buffer is suppressed by
    netback's event index): 5 exits, all hypercalls, per ping."""
    a, x86 = NicGuest("py", IP_PY), x86_echo()
    async with net_env(a, x86) as env:
        mac = await wait_x86_ready(x86, env.switch)
        await trio.sleep(0.01)
        before = env.snapshot()
        for seq in range(10):
            assert (await ping(a, mac, seq))[ICMP].seq == seq
        await trio.sleep(0.01)
        diff = env.snapshot().diff(before)[f"dom{x86.domain.domid}"]
        assert dict(diff) == {
            "interrupts": 20,
            "exits": 50,
            "exits.hypercall": 50,
            "hypercalls": 50,
            "hypercalls.iret": 20,
            "hypercalls.sched_op": 20,
            "hypercalls.sched_op.block": 20,
            "hypercalls.event_channel_op": 10,
            "hypercalls.event_channel_op.send": 10,
            "evtchn.sends": 10,
            "evtchn.raised": 20,
        }


async def test_pktgen_streams_numbered_frames_to_a_pyguest(autojump_clock: Any) -> None:
    b = NicGuest("py-sink", IP_PY)
    async with net_env(b) as env:
        x86 = X86Guest(
            name="x86-pktgen",
            cmdline=f"mode=pktgen ip={IP_X86} dst_mac={b.nic.mac.hex(':')} dst_ip={IP_PY} count=600 size=64",
        )
        dom = env.hv.create_domain(x86, name=x86.name)
        from pvio.toolstack import add_vif

        add_vif(env.hv, dom)
        await env.hv.start(dom)
        frames = await recv_n(b.nic, 600)
        assert [seq_of(f) for f in frames] == list(range(600))
        assert all(len(f) == 64 for f in frames)
        await wait_until(lambda: "pktgen: sent 600 frames of 64 bytes" in x86.domain.console)
        c = x86.domain.counters
        assert c["interrupts"] < 600 // 10  # notifications are suppressed and batched


async def test_closing_the_vif_revokes_every_grant_after_the_backend_unmaps(autojump_clock: Any) -> None:
    b = NicGuest("py-sink", IP_PY)
    logs: list[VifStateLog] = []
    async with net_env(b, before_guests=lambda hv: logs.append(VifStateLog(hv, 2))) as env:
        x86 = X86Guest(
            name="x86-close",
            cmdline=f"mode=pktgen ip={IP_X86} dst_mac={b.nic.mac.hex(':')} dst_ip={IP_PY} count=5 close=1",
        )
        dom = env.hv.create_domain(x86, name=x86.name)
        from pvio.toolstack import add_vif

        add_vif(env.hv, dom)
        await env.hv.start(dom)
        assert [seq_of(f) for f in await recv_n(b.nic, 5)] == list(range(5))
        await wait_until(lambda: "closed:" in dom.console, what="the x86 netfront to close")
        # 2 ring pages + 256 TX pool pages + 256 RX buffers, none still mapped by netback
        assert "netfront: vif2.0 closed: 514 grants revoked, 0 still mapped" in dom.console
        assert logs[0].states[-4:] == [
            ("FE", XenbusState.CLOSING),
            ("BE", XenbusState.CLOSING),
            ("BE", XenbusState.CLOSED),
            ("FE", XenbusState.CLOSED),
        ]
        assert dom.alive


# ---------------------------------------------------------------------- hostile x86 guests
async def test_an_x86_guest_that_publishes_a_bad_ring_grant_is_refused(
    autojump_clock: Any, caplog: pytest.LogCaptureFixture
) -> None:
    a, b, bad = NicGuest("py-a", "10.0.0.1"), EchoGuest("py-b", "10.0.0.3"), x86_echo("badgrant")
    with caplog.at_level(logging.WARNING):
        async with net_env(a, b, bad) as env:
            await wait_until(lambda: "no network" in bad.domain.console, what="the x86 guest to give up")
            assert "the backend refused the device" in bad.domain.console
            assert "cannot map the rings" in caplog.text
            assert bad.domain.alive and not env.vif(bad).connected
            await a.nic.send(icmp_echo(a.nic.mac, b.nic.mac, "10.0.0.1", "10.0.0.3", 1, 1, b"x"))
            assert Ether((await recv_n(a.nic, 1))[0])[ICMP].type == 0


async def test_an_x86_guest_that_pushes_an_impossible_ring_index_is_disconnected(
    autojump_clock: Any, caplog: pytest.LogCaptureFixture
) -> None:
    a, b, bad = NicGuest("py-a", "10.0.0.1"), EchoGuest("py-b", "10.0.0.3"), x86_echo("badring")
    with caplog.at_level(logging.WARNING):
        async with net_env(a, b, bad) as env:
            await wait_until(lambda: "ready: badring" in bad.domain.console)
            await wait_until(lambda: not env.vif(bad).connected, what="netback to disable the vif")
            assert "impossible" in caplog.text.lower()
            assert bad.domain.alive
            await a.nic.send(icmp_echo(a.nic.mac, b.nic.mac, "10.0.0.1", "10.0.0.3", 1, 1, b"x"))
            assert Ether((await recv_n(a.nic, 1))[0])[ICMP].type == 0


async def test_a_tx_request_with_a_bad_grant_fails_that_packet_only(autojump_clock: Any) -> None:
    a, x86 = NicGuest("py", IP_PY), x86_echo("badtxgrant")
    async with net_env(a, x86) as env:
        mac = await wait_x86_ready(x86, env.switch)
        await trio.sleep(0.01)
        assert env.vif(x86).connected
        assert sum(v for k, v in env.hv.counters[f"netback/vif{x86.domain.domid}.0"].items()
                   if k.startswith("drops.")) == 1  # fmt: skip
        assert (await ping(a, mac, 3))[ICMP].seq == 3


# ---------------------------------------------------------------------- a hostile backend
async def _scribble_rx_response(env: Any, x86: X86Guest, rsp: bytes, advance: int) -> None:
    """Play a hostile backend: write ``rsp`` into the x86 guest's next RX response slot,
    move rsp_prod ``advance`` ahead and raise the vif's event channel."""
    import struct

    from pvio.core import evtchn

    dom = x86.domain
    fe = f"/local/domain/{dom.domid}/device/vif/0"
    rx_ref = int(env.hv.toolstack.read(f"{fe}/rx-ring-ref"))
    port = int(env.hv.toolstack.read(f"{fe}/event-channel"))
    _flags, _domid, gfn = dom.grant_table.read_entry(rx_ref)
    ring = dom.mem.page(gfn)
    (rsp_prod,) = struct.unpack_from("<I", ring, 8)
    ring[64 + (rsp_prod % 256) * 8 : 64 + (rsp_prod % 256) * 8 + 8] = rsp
    struct.pack_into("<I", ring, 8, (rsp_prod + advance) & 0xFFFF_FFFF)
    evtchn.set_pending(dom, port)
    await trio.sleep(0.01)


@pytest.mark.parametrize(
    ("rsp", "advance", "reason"),
    [
        (bytes.fromhex("e703 0000 0000 3c00"), 1, "RX response id is not a posted buffer"),
        (bytes.fromhex("0000 f00f 0000 3c00"), 1, "RX response crosses its page"),
        (bytes.fromhex("0000 0000 0000 0000"), 1, "RX response of 0 bytes"),
        (bytes(8), 1000, "impossible RX response producer index"),
    ],
)
async def test_the_c_netfront_disconnects_from_a_backend_that_breaks_the_protocol(
    autojump_clock: Any, rsp: bytes, advance: int, reason: str
) -> None:
    a, x86 = NicGuest("py", IP_PY), x86_echo()
    async with net_env(a, x86) as env:
        await wait_x86_ready(x86, env.switch)
        await trio.sleep(0.01)
        await _scribble_rx_response(env, x86, rsp, advance)
        assert f"netfront: vif{x86.domain.domid}.0 disconnected: {reason}" in x86.domain.console
        assert x86.domain.alive and x86.domain.counters["exits.fault"] == 0
