"""The dom0 learning switch: learning, forwarding, flooding, bounds, counters, faulty ports."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import trio
from scapy.layers.l2 import Ether
from scapy.utils import rdpcap

from pvio.backends.capture import write_pcap
from pvio.backends.switch import MAX_FRAME_LEN, CapturePort, Switch, SwitchPort
from pvio.core.counters import CounterRegistry

BCAST = b"\xff" * 6
MCAST = b"\x01\x00\x5e\x00\x00\x01"


def mac(n: int) -> bytes:
    """A locally administered unicast MAC ending in ``n``."""
    return b"\x02\x00\x00\x00" + n.to_bytes(2, "big")


A, B, C, D = mac(1), mac(2), mac(3), mac(4)


def eth(dst: bytes, src: bytes, payload: bytes = b"p" * 46) -> bytes:
    return dst + src + b"\x08\x00" + payload


class RecordingPort(SwitchPort):
    """Keeps every batch the switch hands it, as handed."""

    def __init__(self, name: str, counters: CounterRegistry | None = None) -> None:
        super().__init__(name, counters)
        self.batches: list[list[bytes]] = []

    def transmit(self, frames: list[bytes]) -> None:
        self.batches.append(list(frames))

    @property
    def frames(self) -> list[bytes]:
        return [f for batch in self.batches for f in batch]


class RaisingPort(SwitchPort):
    def transmit(self, frames: list[bytes]) -> None:
        raise RuntimeError("tap device went away")


def make_switch(*names: str, mac_table_size: int = 4096) -> tuple[Switch, list[RecordingPort]]:
    sw = Switch(mac_table_size=mac_table_size)
    ports = [RecordingPort(n) for n in names]
    for p in ports:
        sw.attach(p)
    return sw, ports


def test_unknown_unicast_is_flooded_to_every_other_port() -> None:
    sw, (p1, p2, p3) = make_switch("p1", "p2", "p3")
    frame = eth(B, A)
    sw.input(p1, [frame])
    assert p1.batches == []
    assert p2.batches == [[frame]]
    assert p3.batches == [[frame]]
    assert sw.counters["flooded"] == 1
    assert sw.counters["forwarded"] == 0


def test_broadcast_and_multicast_are_flooded_even_when_learned() -> None:
    sw, (p1, p2, p3) = make_switch("p1", "p2", "p3")
    frames = [eth(BCAST, A), eth(MCAST, A)]
    sw.input(p1, frames)
    assert p2.frames == frames
    assert p3.frames == frames
    assert sw.counters["flooded"] == 2


def test_source_mac_is_learned_on_its_ingress_port() -> None:
    sw, (p1, p2) = make_switch("p1", "p2")
    sw.input(p1, [eth(BCAST, A)])
    sw.input(p2, [eth(BCAST, B)])
    assert dict(sw.mac_table) == {A: "p1", B: "p2"}
    assert sw.counters["learned"] == 2


def test_known_unicast_goes_only_to_the_learned_port() -> None:
    sw, (p1, p2, p3) = make_switch("p1", "p2", "p3")
    sw.input(p2, [eth(BCAST, B)])
    p1.batches.clear()
    p3.batches.clear()
    frame = eth(B, A)
    sw.input(p1, [frame])
    assert p2.batches == [[frame]]
    assert p3.batches == []
    assert sw.counters["forwarded"] == 1


def test_frame_for_a_mac_learned_on_the_ingress_port_is_dropped_not_hairpinned() -> None:
    sw, (p1, p2) = make_switch("p1", "p2")
    sw.input(p1, [eth(BCAST, A), eth(BCAST, B)])  # A and B both behind p1
    p2.batches.clear()
    sw.input(p1, [eth(B, A)])
    assert p1.batches == []
    assert p2.batches == []
    assert sw.counters["drops.same_port"] == 1


def test_a_mac_that_moves_is_relearned_on_its_new_port() -> None:
    sw, (p1, p2, p3) = make_switch("p1", "p2", "p3")
    sw.input(p1, [eth(BCAST, A)])
    sw.input(p2, [eth(BCAST, A)])
    assert sw.mac_table[A] == "p2"
    assert sw.counters["learned"] == 2
    assert sw.counters["mac_moves"] == 1
    for p in (p1, p2, p3):
        p.batches.clear()
    frame = eth(A, C)
    sw.input(p3, [frame])
    assert p2.batches == [[frame]]
    assert p1.batches == []


def test_group_source_addresses_are_never_learned() -> None:
    sw, (p1, _p2) = make_switch("p1", "p2")
    sw.input(p1, [eth(BCAST, BCAST), eth(BCAST, MCAST)])
    assert dict(sw.mac_table) == {}
    assert sw.counters["learned"] == 0
    assert sw.counters["flooded"] == 2


def test_full_table_evicts_the_oldest_learned_entry() -> None:
    sw, (p1, p2) = make_switch("p1", "p2", mac_table_size=3)
    sw.input(p1, [eth(BCAST, m) for m in (A, B, C)])
    sw.input(p2, [eth(BCAST, D)])
    assert list(sw.mac_table) == [B, C, D]
    assert sw.counters["mac_evictions"] == 1
    # A is unknown again: a frame to it is flooded, not forwarded.
    p1.batches.clear()
    sw.input(p2, [eth(A, D)])
    assert p1.frames == [eth(A, D)]
    assert sw.counters["flooded"] == 5
    assert sw.counters["forwarded"] == 0


def test_a_moved_mac_becomes_the_newest_entry() -> None:
    sw, (p1, p2) = make_switch("p1", "p2", mac_table_size=3)
    sw.input(p1, [eth(BCAST, m) for m in (A, B, C)])
    sw.input(p2, [eth(BCAST, A)])  # A moves: newest now, so B is the oldest
    sw.input(p2, [eth(BCAST, D)])
    assert list(sw.mac_table) == [C, A, D]
    assert sw.mac_table[A] == "p2"


def test_each_port_gets_one_transmit_call_per_batch_in_input_order() -> None:
    sw, (p1, p2, p3) = make_switch("p1", "p2", "p3")
    sw.input(p2, [eth(BCAST, B)])
    sw.input(p3, [eth(BCAST, C)])
    for p in (p1, p2, p3):
        p.batches.clear()
    f1, f2, f3, f4 = eth(B, A, b"1"), eth(C, A, b"2"), eth(BCAST, A, b"3"), eth(B, A, b"4")
    sw.input(p1, [f1, f2, f3, f4])
    assert p2.batches == [[f1, f3, f4]]
    assert p3.batches == [[f2, f3]]
    assert p1.batches == []


def test_per_port_and_switch_counters_are_exact() -> None:
    registry = CounterRegistry()
    sw = Switch(registry)
    p1, p2, p3 = RecordingPort("p1"), RecordingPort("p2"), RecordingPort("p3")
    for p in (p1, p2, p3):
        sw.attach(p)
    sw.input(p2, [eth(BCAST, B, b"x" * 10)])  # 24 bytes, flooded to p1 and p3
    sw.input(p1, [eth(B, A, b"y" * 20), eth(D, A, b"z" * 30), b"short"])  # 34 fwd, 44 flooded, runt
    snap = registry.snapshot()
    assert dict(snap["switch/switch0"]) == {"learned": 2, "forwarded": 1, "flooded": 2, "drops.runt": 1}
    assert dict(snap["switch/p1"]) == {
        "packets.rx": 3,
        "bytes.rx": 34 + 44 + 5,
        "packets.tx": 1,
        "bytes.tx": 24,
        "flooded": 1,
    }
    assert dict(snap["switch/p2"]) == {
        "packets.rx": 1,
        "bytes.rx": 24,
        "packets.tx": 2,
        "bytes.tx": 34 + 44,
        "flooded": 1,
    }
    assert dict(snap["switch/p3"]) == {"packets.tx": 2, "bytes.tx": 24 + 44, "flooded": 2}
    assert snap.devices().keys() == {"switch/switch0", "switch/p1", "switch/p2", "switch/p3"}


def test_a_raising_port_is_counted_and_logged_and_others_still_receive(
    caplog: pytest.LogCaptureFixture,
) -> None:
    sw = Switch()
    p1, bad, p3 = RecordingPort("p1"), RaisingPort("tap0"), RecordingPort("p3")
    for p in (p1, bad, p3):
        sw.attach(p)
    frames = [eth(BCAST, A), eth(B, A)]
    with caplog.at_level(logging.DEBUG, logger="pvio.switch"):
        sw.input(p1, frames)
        sw.input(p1, frames)
    assert p3.batches == [frames, frames]
    assert bad.counters["transmit_errors"] == 2
    assert bad.counters["drops.port_error"] == 4
    assert bad.counters["packets.tx"] == 0
    assert sw.counters["port_errors"] == 2
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1  # the first failure in full, the next at DEBUG
    assert "'tap0'" in errors[0].getMessage()
    assert errors[0].exc_info is not None


def test_runt_and_oversize_frames_are_dropped_and_counted() -> None:
    sw, (p1, p2) = make_switch("p1", "p2")
    smallest, largest = eth(BCAST, A, b""), eth(BCAST, A, b"x" * (MAX_FRAME_LEN - 14))
    runt, oversize = smallest[:13], largest + b"x"
    sw.input(p1, [runt, smallest, oversize, largest, b""])
    assert p2.frames == [smallest, largest]
    assert sw.counters["drops.runt"] == 2
    assert sw.counters["drops.oversize"] == 1
    assert sw.counters["flooded"] == 2
    assert p1.counters["packets.rx"] == 5


def test_flooding_with_no_other_port_is_a_counted_drop() -> None:
    sw, (p1,) = make_switch("p1")
    sw.input(p1, [eth(BCAST, A)])
    assert sw.counters["drops.no_egress"] == 1
    assert sw.counters["flooded"] == 0


def test_detach_forgets_the_ports_macs_and_stops_delivery_to_it() -> None:
    sw, (p1, p2, p3) = make_switch("p1", "p2", "p3")
    sw.input(p2, [eth(BCAST, B), eth(BCAST, C)])
    sw.input(p1, [eth(BCAST, A)])
    sw.detach(p2)
    assert dict(sw.mac_table) == {A: "p1"}
    p2.batches.clear()
    sw.input(p1, [eth(B, A)])
    assert p2.batches == []
    assert p3.frames[-1] == eth(B, A)  # B is unknown now: flooded
    assert sw.ports == (p1, p3)


def test_frames_from_a_detached_port_are_dropped_and_counted() -> None:
    sw, (p1, p2) = make_switch("p1", "p2")
    sw.detach(p1)
    sw.input(p1, [eth(BCAST, A)])
    assert p2.batches == []
    assert sw.counters["drops.port_detached"] == 1
    assert dict(sw.mac_table) == {}


def test_attach_rejects_a_second_port_with_the_same_name_or_the_switchs_name() -> None:
    sw, _ = make_switch("vif1.0")
    with pytest.raises(ValueError, match=r"'vif1\.0'.*another attached port"):
        sw.attach(RecordingPort("vif1.0"))
    with pytest.raises(ValueError, match=r"'switch0'.*the switch"):
        sw.attach(RecordingPort("switch0"))


def test_detach_of_a_port_that_is_not_attached_is_an_error() -> None:
    sw = Switch()
    with pytest.raises(ValueError, match="'p9' is not attached"):
        sw.detach(RecordingPort("p9"))


def test_attach_registers_the_ports_counters_with_the_switchs_registry() -> None:
    registry = CounterRegistry()
    sw = Switch(registry)
    port = RecordingPort("p1")
    port.counters["packets.rx"] += 7  # counted before attach: kept
    sw.attach(port)
    assert registry["switch/p1"] is port.counters
    assert port.counters["packets.rx"] == 7
    assert port.counters.kind == "device"


def test_capture_port_keeps_the_last_frames_and_counts_evictions() -> None:
    sw = Switch()
    src, cap = RecordingPort("src"), CapturePort("cap", maxlen=3)
    sw.attach(src)
    sw.attach(cap)
    frames = [eth(BCAST, A, bytes([i])) for i in range(5)]
    sw.input(src, frames[:2])
    sw.input(src, frames[2:])
    assert list(cap.frames) == frames[2:]
    assert cap.counters["capture.evicted"] == 2
    assert cap.counters["packets.tx"] == 5


async def test_capture_port_sends_on_its_channel_without_blocking() -> None:
    send, receive = trio.open_memory_channel[bytes](2)
    cap = CapturePort("cap", channel=send)
    frames = [eth(BCAST, A, bytes([i])) for i in range(3)]
    cap.transmit(frames)
    assert [receive.receive_nowait(), receive.receive_nowait()] == frames[:2]
    assert cap.counters["drops.channel_full"] == 1
    await receive.aclose()
    cap.transmit(frames)
    assert cap.counters["drops.channel_closed"] == 3
    assert cap.channel is None
    assert len(cap.frames) == 6


def test_capture_port_frames_write_to_a_pcap_scapy_reads_back(tmp_path: Path) -> None:
    cap = CapturePort("cap")
    frames = [eth(B, A, b"hello world " * 4), eth(BCAST, C, b"\x00" * 46)]
    cap.transmit(frames)
    path = tmp_path / "cap.pcap"
    assert write_pcap(path, list(cap.frames)) == 2
    packets = rdpcap(str(path))
    assert [bytes(p) for p in packets] == frames
    assert isinstance(packets[0], Ether)
    assert packets[0].src == "02:00:00:00:00:01"


def test_port_base_class_transmit_is_abstract() -> None:
    with pytest.raises(NotImplementedError, match="SwitchPort must implement transmit"):
        SwitchPort("p").transmit([])
