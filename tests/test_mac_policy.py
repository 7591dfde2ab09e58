"""The switch's MAC policy against a hostile port: spoofed source MACs and table floods.

A vif is locked to the MAC the toolstack configured (as Xen's vif scripts and Linux bridge
ports with ``locked`` do): a frame with any other source MAC is dropped and counted
``drops.spoofed_mac``, and the vif's MAC is a static entry no other port can take over.  A
port that may carry many stations (TAP, VXLAN) learns, but at most ``learn_limit`` MACs, and
a full table evicts from the port holding the most learned entries, never a bystander's.
"""

from __future__ import annotations

import random

import trio
import trio.testing

from pvio.backends.switch import Switch, SwitchPort
from pvio.core.counters import CounterRegistry
from pvio.frontends.netstack import udp_packet
from tests.netenv import NicGuest, ip_of, net_env, recv_n, seq_of, udp_stream

MAC_A, MAC_B, MAC_H = (
    bytes.fromhex("02000000000a"),
    bytes.fromhex("02000000000b"),
    bytes.fromhex("0200000000ff"),
)


class Port(SwitchPort):
    def __init__(
        self, name: str, locked: bytes | None = None, counters: CounterRegistry | None = None
    ) -> None:
        super().__init__(name, counters)
        self.got: list[bytes] = []
        if locked is not None:
            self.locked_macs = frozenset({locked})

    def transmit(self, frames: list[bytes]) -> None:
        self.got += frames


def eth(dst: bytes, src: bytes) -> bytes:
    return dst + src + b"\x08\x00" + bytes(46)


def topology(hostile_locked: bool) -> tuple[Switch, Port, Port, Port]:
    sw = Switch(CounterRegistry())
    a, b = Port("a", MAC_A), Port("b", MAC_B)
    h = Port("h", MAC_H if hostile_locked else None)
    for p in (a, b, h):
        sw.attach(p)
    return sw, a, b, h


def test_a_locked_port_cannot_send_another_stations_mac() -> None:
    sw, a, b, h = topology(hostile_locked=True)
    sw.input(h, [eth(MAC_A, MAC_B)] * 3)  # H claims to be B
    assert sw.counters["drops.spoofed_mac"] == 3
    assert h.counters["drops.spoofed_mac"] == 3
    assert sw.mac_table[MAC_B] == "b"
    sw.input(a, [eth(MAC_B, MAC_A)] * 50)
    assert len(b.got) == 50 and h.got == [] and a.got == []


def test_a_learning_port_cannot_take_over_a_locked_ports_mac() -> None:
    sw, a, b, h = topology(hostile_locked=False)
    sw.input(h, [eth(MAC_A, MAC_B)])
    assert sw.counters["drops.spoofed_mac"] == 1
    assert sw.mac_table[MAC_B] == "b" and a.got == []
    sw.input(a, [eth(MAC_B, MAC_A)] * 50)
    assert len(b.got) == 50 and h.got == []


def test_a_mac_flood_from_one_port_evicts_no_bystander() -> None:
    sw = Switch(CounterRegistry(), mac_table_size=4096)
    a, b, h = Port("a"), Port("b"), Port("h")  # all learning: the hardest case
    for p in (a, b, h):
        sw.attach(p)
    sw.input(a, [eth(MAC_B, MAC_A)])
    sw.input(b, [eth(MAC_A, MAC_B)])
    rng = random.Random(1)
    flood = [eth(MAC_A, bytes([2]) + rng.randbytes(5)) for _ in range(3 * 4096)]
    sw.input(h, flood)
    assert sw.mac_table[MAC_A] == "a" and sw.mac_table[MAC_B] == "b"
    held_by_h = sum(1 for port in sw.mac_table.values() if port == "h")
    assert held_by_h <= sw.port_learn_limit
    assert sw.counters["learn_limit_drops"] >= len(flood) - sw.port_learn_limit
    a.got.clear(), b.got.clear(), h.got.clear()
    sw.input(a, [eth(MAC_B, MAC_A)] * 50)
    assert len(b.got) == 50 and h.got == []  # forwarded, not flooded to the attacker


def test_a_full_table_evicts_from_the_port_holding_most() -> None:
    sw = Switch(CounterRegistry(), mac_table_size=64, port_learn_limit=60)
    a, b, h = Port("a"), Port("b"), Port("h")
    for p in (a, b, h):
        sw.attach(p)
    sw.input(a, [eth(MAC_B, MAC_A)])
    sw.input(b, [eth(MAC_A, MAC_B)])
    sw.input(h, [eth(MAC_A, bytes([2, 0, 0, 1, 0, i])) for i in range(60)])
    sw.input(h, [eth(MAC_A, bytes([2, 0, 0, 2, 0, 0]))])  # over its limit: not learned
    c = Port("c")
    sw.attach(c)
    sw.input(c, [eth(MAC_A, bytes([2, 0, 0, 3, 0, i])) for i in range(10)])  # table full
    assert len(sw.mac_table) <= 64
    assert sw.mac_table[MAC_A] == "a" and sw.mac_table[MAC_B] == "b"
    assert sum(1 for p in sw.mac_table.values() if p == "c") == 10
    assert sw.counters["mac_evictions"] >= 8


async def test_netback_drops_a_guests_spoofed_source_mac(autojump_clock: trio.abc.Clock) -> None:
    a, b, h = NicGuest("a", ip_of(0)), NicGuest("b", ip_of(1)), NicGuest("h", ip_of(2))
    async with net_env(a, b, h) as env:
        spoof = udp_packet(h.nic.mac, h.nic.mac, h.ip, h.ip, 1, 1, b"x" * 32, checksum=False)
        spoof = spoof[:6] + b.nic.mac + spoof[12:]  # from "B", to itself: the switch would move B
        await h.nic.send_batch([spoof] * 5)
        await trio.testing.wait_all_tasks_blocked()
        assert env.count("switch/switch0", "drops.spoofed_mac") == 5
        assert env.count(f"switch/{env.vif(h).vif_name}", "drops.spoofed_mac") == 5
        assert env.switch.mac_table[b.nic.mac] == env.vif(b).vif_name
        await a.nic.send_batch(udp_stream(a, b, 40))
        got = await recv_n(b.nic, 40)
        await trio.testing.wait_all_tasks_blocked()
        assert [seq_of(f) for f in got] == list(range(40))
        assert h.nic.pending() == 0
