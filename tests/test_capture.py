"""Packet capture: a mirror of a vif or of the whole switch, read back by scapy and by tshark.

The traffic runs under trio's MockClock, so the frame counts are exact; the capture's
counts are compared with the switch's own port counters over the same interval.
"""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
from pathlib import Path
from typing import Any

import pytest
from scapy.layers.inet import UDP
from scapy.utils import rdpcap

from pvio.backends.capture import PCAP_MAGIC_NS, Capture, pcap_records
from pvio.backends.switch import Switch, SwitchPort
from tests.netenv import NicGuest, ip_of, net_env, recv_n, udp_stream


class Sink(SwitchPort):
    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.frames: list[bytes] = []

    def transmit(self, frames: list[bytes]) -> None:
        self.frames += frames


def eth(dst: int, src: int, payload: bytes = bytes(46)) -> bytes:
    return bytes([2, 0, 0, 0, 0, dst]) + bytes([2, 0, 0, 0, 0, src]) + b"\x08\x00" + payload


def tshark_frames(path: Path) -> list[int]:
    """The length of every frame tshark reads from ``path``."""
    out = subprocess.run(
        ["tshark", "-n", "-r", str(path), "-T", "fields", "-e", "frame.len"],
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout
    return [int(line) for line in out.split()]


def port_delta(before: Any, after: Any, owner: str) -> tuple[int, int]:
    """(frames, bytes) the port moved in both directions between two snapshots."""

    def get(snap: Any, key: str) -> int:
        return int(snap.get_count(owner, key))

    frames = sum(get(after, k) - get(before, k) for k in ("packets.rx", "packets.tx"))
    nbytes = sum(get(after, k) - get(before, k) for k in ("bytes.rx", "bytes.tx"))
    return frames, nbytes


def test_a_forwarded_frame_between_two_other_ports_is_mirrored(tmp_path: Path) -> None:
    sw = Switch()
    a, b, c = Sink("a"), Sink("b"), Sink("c")
    for p in (a, b, c):
        sw.attach(p)
    sw.input(b, [eth(9, 2)])  # teach the switch b's MAC
    with Capture(sw, tmp_path / "all.pcap") as whole, Capture(sw, tmp_path / "b.pcap", "b") as pb:
        sw.input(a, [eth(2, 1, b"x" * 46)])  # forwarded a -> b: c never sees it
        sw.input(b, [eth(1, 2, b"y" * 46)])  # forwarded b -> a
    assert c.frames == [eth(9, 2)]
    assert whole.counters["packets"] == 2
    assert pb.counters["packets"] == 2  # b's egress, then b's ingress
    mirrored = [bytes(p) for p in rdpcap(str(tmp_path / "b.pcap"))]
    assert mirrored == [eth(2, 1, b"x" * 46), eth(1, 2, b"y" * 46)]
    assert not sw._taps  # stopped captures cost nothing


def test_the_file_is_nanosecond_pcap_with_ethernet_link_type(tmp_path: Path) -> None:
    sw = Switch()
    a, b = Sink("a"), Sink("b")
    sw.attach(a)
    sw.attach(b)
    ts = 1_700_000_000_123_456_789
    with Capture(sw, tmp_path / "c.pcap", clock=lambda: ts, snaplen=50) as cap:
        sw.input(a, [eth(2, 1, bytes(100))])
    data = (tmp_path / "c.pcap").read_bytes()
    magic, major, minor, _, _, snaplen, linktype = struct.unpack_from("<IHHiIII", data)
    assert (magic, major, minor, snaplen, linktype) == (PCAP_MAGIC_NS, 2, 4, 50, 1)
    assert struct.unpack_from("<IIII", data, 24) == (1_700_000_000, 123_456_789, 50, 114)
    assert len(data) == 24 + 16 + 50
    assert cap.counters["truncated"] == 1
    assert cap.counters["bytes"] == 114


def test_a_full_disk_stops_the_capture_not_the_traffic(caplog: pytest.LogCaptureFixture) -> None:
    sw = Switch()
    a, b = Sink("a"), Sink("b")
    sw.attach(a)
    sw.attach(b)
    cap = Capture(sw, "/dev/full").start()
    big = eth(2, 1, bytes(1500))
    for _ in range(100):  # more than the file's buffer: a write reaches the disk and fails
        sw.input(a, [big])
    assert not cap.running
    assert cap.error is not None and "No space left on device" in cap.error
    assert cap.counters["errors"] == 1
    assert cap.counters["drops.write_error"] >= 1
    assert len(b.frames) == 100
    assert sw.counters["flooded"] == 100
    assert "traffic continues" in caplog.text
    cap.stop()  # idempotent


def test_a_port_named_that_is_not_attached_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no port named 'nope'"):
        Capture(Switch(), tmp_path / "x.pcap", "nope")


def test_records_are_packed_from_bytes() -> None:
    frames = [b"\x01" * 20, b"\x02" * 30]
    data = pcap_records(frames, 5_000_000_007)
    rec = struct.Struct("<IIII").pack
    assert data == rec(5, 7, 20, 20) + frames[0] + rec(5, 7, 30, 30) + frames[1]


async def test_vif_and_switch_captures_match_the_counters_in_scapy_and_tshark(
    tmp_path: Path, autojump_clock: Any
) -> None:
    a, b = NicGuest("a", ip_of(0)), NicGuest("b", ip_of(1))
    async with net_env(a, b) as env:
        vif_a = env.vif(a)
        before = env.snapshot()
        whole = Capture(env.switch, tmp_path / "switch.pcap", counters=env.hv.counters).start()
        cap_a = Capture(env.switch, tmp_path / "vif_a.pcap", vif_a).start()
        to_b = udp_stream(a, b, 40, size=64)
        to_a = udp_stream(b, a, 25, size=200)
        await a.nic.send_batch(to_b)
        await recv_n(b.nic, 40)
        await b.nic.send_batch(to_a)
        await recv_n(a.nic, 25)
        cap_a.stop()
        whole.stop()
        after = env.snapshot()

    frames, nbytes = port_delta(before, after, f"switch/{vif_a.name}")
    assert (frames, nbytes) == (65, 40 * 64 + 25 * 200)
    assert (cap_a.counters["packets"], cap_a.counters["bytes"]) == (frames, nbytes)
    assert (whole.counters["packets"], whole.counters["bytes"]) == (frames, nbytes)
    packets = rdpcap(str(tmp_path / "vif_a.pcap"))
    assert [bytes(p) for p in packets] == to_b + to_a  # both directions, in order
    assert packets[0][UDP].dport == 9
    assert [bytes(p) for p in rdpcap(str(tmp_path / "switch.pcap"))] == to_b + to_a

    if shutil.which("tshark") is None:
        pytest.skip("tshark is not installed (Debian package tshark)")
    lengths = tshark_frames(tmp_path / "vif_a.pcap")
    assert (len(lengths), sum(lengths)) == (frames, nbytes)
    lengths = tshark_frames(tmp_path / "switch.pcap")
    assert (len(lengths), sum(lengths)) == (frames, nbytes)


def test_the_demo_command_captures_its_exchange(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from pvio.harness import demo as pv_demo

    path = tmp_path / "demo.pcap"
    assert pv_demo.main(["--json", "--pcap", str(path)]) == 0
    result = json.loads(capsys.readouterr().out)
    packets = rdpcap(str(path))
    assert len(packets) == result["frames_delivered"] == 18  # every request and every answer, once
    assert packets[0].haslayer("ARP")


def test_pcapng_names_each_port_and_marks_each_direction(tmp_path: Path) -> None:
    sw = Switch()
    a, b, c = Sink("vif1.0"), Sink("vif2.0"), Sink("tap-x")
    for p in (a, b, c):
        sw.attach(p)
    sw.input(b, [eth(9, 2)])
    ts = 1_700_000_000_123_456_789
    whole, port = tmp_path / "all.pcapng", tmp_path / "vif1.pcapng"
    with Capture(sw, whole, format="pcapng", clock=lambda: ts), Capture(sw, port, a, format="pcapng"):
        sw.input(a, [eth(2, 1, b"x" * 47)])  # a -> b: odd length, padded in the file
        sw.input(b, [eth(1, 2, b"y" * 46), eth(0xFF, 2, bytes(3))])  # b -> a, then a short flood
    expected = [eth(2, 1, b"x" * 47), eth(1, 2, b"y" * 46), eth(0xFF, 2, bytes(3))]
    assert [bytes(p) for p in rdpcap(str(whole))] == expected
    assert [bytes(p) for p in rdpcap(str(port))] == expected  # ingress, egress, egress (flood)
    assert float(rdpcap(str(whole))[0].time) == pytest.approx(ts / 1e9)
    if shutil.which("tshark") is None:
        pytest.skip("tshark is not installed (Debian package tshark)")
    fields = ["-e", "frame.interface_name", "-e", "frame.packet_flags_direction", "-e", "frame.len"]

    def rows(path: Path) -> list[list[str]]:
        out = subprocess.run(
            ["tshark", "-n", "-r", str(path), "-T", "fields", *fields],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        return [line.split("\t") for line in out.splitlines()]

    inbound, outbound = "0x00000001", "0x00000002"
    assert rows(whole) == [["vif1.0", inbound, "61"], ["vif2.0", inbound, "60"], ["vif2.0", inbound, "17"]]
    assert rows(port) == [["vif1.0", inbound, "61"], ["vif1.0", outbound, "60"], ["vif1.0", outbound, "17"]]


def test_an_unknown_format_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="format must be 'pcap' or 'pcapng'"):
        Capture(Switch(), tmp_path / "x", format="erf")
