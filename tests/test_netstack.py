"""The example guests' network stack: ARP / ICMP echo / UDP echo replies, checked with scapy.

scapy builds the requests and parses the replies here (test side only); checksums are
compared against scapy's own recomputation.  Hostile input is fuzzed with hypothesis.
"""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.inet import ICMP, IP, UDP, IPOption_NOP
from scapy.layers.l2 import ARP, Ether
from scapy.packet import Packet, Raw

from pvio.frontends.netstack import (
    NetStack,
    arp_request,
    icmp_echo,
    inet_checksum,
    udp_packet,
)

ME_MAC, PEER_MAC = b"\x02\x00\x00\x00\x00\x01", b"\x02\x00\x00\x00\x00\x02"
ME_MAC_S, PEER_MAC_S = "02:00:00:00:00:01", "02:00:00:00:00:02"
ME_IP, PEER_IP = "10.0.0.1", "10.0.0.2"


def stack(**kwargs: object) -> NetStack:
    return NetStack(ME_MAC, ME_IP, **kwargs)  # type: ignore[arg-type]


def to_me(l3: Packet) -> bytes:
    return bytes(Ether(dst=ME_MAC_S, src=PEER_MAC_S) / l3)


def recomputed(pkt: Packet, *layers: type[Packet]) -> Packet:
    """``pkt`` re-built by scapy with the checksums of ``layers`` computed afresh."""
    copy = pkt.copy()
    for layer in layers:
        del copy[layer].chksum
    return Ether(bytes(copy))


def only_reply(ns: NetStack, frame: bytes) -> Packet:
    replies = ns.handle(frame)
    assert len(replies) == 1
    return Ether(replies[0])


def test_arp_request_for_our_ip_gets_an_arp_reply() -> None:
    ns = stack()
    reply = only_reply(
        ns,
        bytes(
            Ether(src=PEER_MAC_S, dst="ff:ff:ff:ff:ff:ff")
            / ARP(op=1, hwsrc=PEER_MAC_S, psrc=PEER_IP, pdst=ME_IP)
        ),
    )
    assert (reply.dst, reply.src, reply.type) == (PEER_MAC_S, ME_MAC_S, 0x0806)
    arp = reply[ARP]
    assert (arp.op, arp.hwsrc, arp.psrc, arp.hwdst, arp.pdst) == (2, ME_MAC_S, ME_IP, PEER_MAC_S, PEER_IP)
    assert ns.stats == {"arp_replies": 1, "icmp_replies": 0, "udp_replies": 0, "ignored": 0, "malformed": 0}


def test_arp_request_for_another_ip_and_arp_replies_are_ignored() -> None:
    ns = stack()
    assert ns.handle(arp_request(PEER_MAC, PEER_IP, "10.0.0.99")) == []
    assert ns.handle(to_me(ARP(op=2, hwsrc=PEER_MAC_S, psrc=PEER_IP, pdst=ME_IP))) == []
    assert ns.stats["ignored"] == 2


def test_icmp_echo_request_gets_an_echo_reply_with_same_id_seq_payload() -> None:
    ns = stack()
    request = to_me(IP(src=PEER_IP, dst=ME_IP) / ICMP(type=8, id=0x1234, seq=7) / Raw(b"ping payload!"))
    reply = only_reply(ns, request)
    assert (reply.dst, reply.src) == (PEER_MAC_S, ME_MAC_S)
    assert (reply[IP].src, reply[IP].dst, reply[IP].proto, reply[IP].ihl) == (ME_IP, PEER_IP, 1, 5)
    icmp = reply[ICMP]
    assert (icmp.type, icmp.code, icmp.id, icmp.seq) == (0, 0, 0x1234, 7)
    assert bytes(icmp.payload) == b"ping payload!"
    again = recomputed(reply, IP, ICMP)
    assert reply[IP].chksum == again[IP].chksum
    assert reply[ICMP].chksum == again[ICMP].chksum
    assert reply[IP].len == 20 + 8 + len(b"ping payload!")
    assert ns.stats["icmp_replies"] == 1


def test_ip_options_are_skipped_using_ihl() -> None:
    ns = stack()
    request = to_me(
        IP(src=PEER_IP, dst=ME_IP, options=[IPOption_NOP()] * 8) / ICMP(id=5, seq=6) / Raw(b"opt")
    )
    assert Ether(request)[IP].ihl == 7
    reply = only_reply(ns, request)
    assert (reply[ICMP].id, reply[ICMP].seq, bytes(reply[ICMP].payload)) == (5, 6, b"opt")
    assert reply[IP].ihl == 5  # options are not echoed


def test_ethernet_padding_beyond_the_ip_total_length_is_not_echoed() -> None:
    ns = stack()
    request = icmp_echo(PEER_MAC, ME_MAC, PEER_IP, ME_IP, 1, 1, b"ab") + b"\x00" * 16
    reply = only_reply(ns, request)
    assert bytes(reply[ICMP].payload) == b"ab"


def test_udp_to_the_echo_port_is_echoed_with_swapped_ports() -> None:
    ns = stack()
    request = to_me(IP(src=PEER_IP, dst=ME_IP) / UDP(sport=40000, dport=7) / Raw(b"echo me"))
    reply = only_reply(ns, request)
    udp = reply[UDP]
    assert (udp.sport, udp.dport, udp.len, bytes(udp.payload)) == (7, 40000, 8 + 7, b"echo me")
    assert (reply[IP].src, reply[IP].dst) == (ME_IP, PEER_IP)
    again = recomputed(reply, IP, UDP)
    assert reply[IP].chksum == again[IP].chksum
    assert udp.chksum == again[UDP].chksum
    assert ns.stats["udp_replies"] == 1


def test_udp_echo_ports_are_configurable_and_other_ports_are_ignored() -> None:
    ns = stack(udp_echo_ports={9000})
    assert ns.handle(udp_packet(PEER_MAC, ME_MAC, PEER_IP, ME_IP, 1234, 7, b"x")) == []
    reply = only_reply(ns, udp_packet(PEER_MAC, ME_MAC, PEER_IP, ME_IP, 1234, 9000, b"x"))
    assert (reply[UDP].sport, reply[UDP].dport) == (9000, 1234)
    assert ns.stats["ignored"] == 1


def test_udp_with_checksum_zero_is_accepted() -> None:
    ns = stack()
    frame = udp_packet(PEER_MAC, ME_MAC, PEER_IP, ME_IP, 5555, 7, b"nocsum", checksum=False)
    assert Ether(frame)[UDP].chksum == 0
    assert bytes(only_reply(ns, frame)[UDP].payload) == b"nocsum"


@pytest.mark.parametrize(
    ("what", "offset"),
    [("ip header checksum", 14 + 10), ("icmp checksum", 14 + 20 + 2), ("icmp payload", 14 + 20 + 8)],
)
def test_icmp_with_a_bad_checksum_is_malformed(what: str, offset: int) -> None:
    ns = stack()
    frame = bytearray(icmp_echo(PEER_MAC, ME_MAC, PEER_IP, ME_IP, 1, 1, b"data"))
    frame[offset] ^= 0x40
    assert ns.handle(bytes(frame)) == [], what
    assert ns.stats["malformed"] == 1


def test_udp_with_a_bad_checksum_is_malformed() -> None:
    ns = stack()
    frame = bytearray(udp_packet(PEER_MAC, ME_MAC, PEER_IP, ME_IP, 1, 7, b"data"))
    frame[-1] ^= 1
    assert ns.handle(bytes(frame)) == []
    assert ns.stats["malformed"] == 1


@pytest.mark.parametrize(("flags", "frag"), [("MF", 0), (0, 10), ("MF", 3)])
def test_fragments_are_ignored(flags: str | int, frag: int) -> None:
    ns = stack()
    frame = to_me(IP(src=PEER_IP, dst=ME_IP, flags=flags, frag=frag) / ICMP() / Raw(b"frag"))
    assert ns.handle(frame) == []
    assert ns.stats["ignored"] == 1


def test_frames_not_for_our_mac_or_ip_are_ignored() -> None:
    ns = stack()
    other_mac = b"\x02\x00\x00\x00\x00\x09"
    assert ns.handle(icmp_echo(PEER_MAC, other_mac, PEER_IP, ME_IP)) == []
    assert ns.handle(icmp_echo(PEER_MAC, ME_MAC, PEER_IP, "10.0.0.9")) == []
    assert ns.handle(icmp_echo(PEER_MAC, b"\xff" * 6, PEER_IP, ME_IP)) == []  # IP to broadcast MAC
    assert ns.handle(icmp_echo(PEER_MAC, ME_MAC, "224.0.0.1", ME_IP)) == []  # multicast source
    assert ns.handle(to_me(IP(src=PEER_IP, dst=ME_IP, proto=6) / Raw(b"\x00" * 20))) == []  # TCP
    assert ns.handle(to_me(IP(src=PEER_IP, dst=ME_IP) / ICMP(type=0))) == []  # an echo *reply*
    assert ns.stats["ignored"] == 6
    assert ns.stats["malformed"] == 0


def test_every_truncation_of_valid_frames_is_handled_without_a_reply() -> None:
    ns = stack()
    valid = [
        arp_request(PEER_MAC, PEER_IP, ME_IP),
        icmp_echo(PEER_MAC, ME_MAC, PEER_IP, ME_IP, 1, 2, b"payload"),
        udp_packet(PEER_MAC, ME_MAC, PEER_IP, ME_IP, 3, 7, b"payload"),
    ]
    handled = 0
    for frame in valid:
        for cut in range(len(frame)):
            assert ns.handle(frame[:cut]) == []
            handled += 1
    assert ns.stats["malformed"] == handled
    assert sum(ns.stats.values()) == handled


def test_ip_total_length_larger_than_the_frame_is_malformed() -> None:
    frame = bytearray(icmp_echo(PEER_MAC, ME_MAC, PEER_IP, ME_IP, 1, 1, b"abc"))
    struct.pack_into("!H", frame, 16, 200)
    struct.pack_into("!H", frame, 24, 0)
    struct.pack_into("!H", frame, 24, inet_checksum(bytes(frame[14:34])))  # header itself consistent
    ns = stack()
    assert ns.handle(bytes(frame)) == []
    assert ns.stats["malformed"] == 1


@pytest.mark.parametrize("udp_len", [7, 8 + 4 + 1, 0xFFFF])
def test_udp_length_outside_the_ip_payload_is_malformed(udp_len: int) -> None:
    frame = bytearray(udp_packet(PEER_MAC, ME_MAC, PEER_IP, ME_IP, 1, 7, b"four", checksum=False))
    struct.pack_into("!H", frame, 14 + 20 + 4, udp_len)
    ns = stack()
    assert ns.handle(bytes(frame)) == []
    assert ns.stats["malformed"] == 1


def test_udp_length_shorter_than_the_ip_payload_bounds_the_echoed_payload() -> None:
    frame = bytearray(udp_packet(PEER_MAC, ME_MAC, PEER_IP, ME_IP, 1, 7, b"four", checksum=False))
    struct.pack_into("!H", frame, 14 + 20 + 4, 8 + 2)
    reply = only_reply(stack(), bytes(frame))
    assert bytes(reply[UDP].payload) == b"fo"


def test_builders_make_frames_scapy_agrees_with() -> None:
    arp = Ether(arp_request(PEER_MAC, PEER_IP, ME_IP))
    assert (arp.dst, arp[ARP].op, arp[ARP].hwsrc, arp[ARP].psrc, arp[ARP].pdst) == (
        "ff:ff:ff:ff:ff:ff",
        1,
        PEER_MAC_S,
        PEER_IP,
        ME_IP,
    )
    ping = Ether(icmp_echo(PEER_MAC, ME_MAC, PEER_IP, ME_IP, 9, 10, b"hi", ip_id=77))
    assert (ping[IP].id, ping[ICMP].type, ping[ICMP].id, ping[ICMP].seq) == (77, 8, 9, 10)
    assert ping[IP].chksum == recomputed(ping, IP, ICMP)[IP].chksum
    assert ping[ICMP].chksum == recomputed(ping, IP, ICMP)[ICMP].chksum
    udp = Ether(udp_packet(PEER_MAC, ME_MAC, PEER_IP, ME_IP, 1, 2, b"odd"))
    assert udp[UDP].chksum == recomputed(udp, IP, UDP)[UDP].chksum
    assert bytes(udp[UDP].payload) == b"odd"


def test_constructor_rejects_bad_addresses_and_ports() -> None:
    with pytest.raises(ValueError, match="mac must be 6 bytes"):
        NetStack(b"\x02\x00", ME_IP)
    with pytest.raises(ValueError, match=r"10\.0\.0\.300"):
        NetStack(ME_MAC, "10.0.0.300")
    with pytest.raises(ValueError, match=r"\[0, 70000\]"):
        NetStack(ME_MAC, ME_IP, udp_echo_ports=[0, 7, 70000])


def _reference_checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\x00"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


@given(st.binary(max_size=300))
def test_inet_checksum_matches_the_rfc1071_word_loop(data: bytes) -> None:
    assert inet_checksum(data) == _reference_checksum(data)


# -- fuzzing: hostile frames never raise ------------------------------------------------

_VALID = [
    arp_request(PEER_MAC, PEER_IP, ME_IP),
    icmp_echo(PEER_MAC, ME_MAC, PEER_IP, ME_IP, 1, 2, b"0123456789"),
    udp_packet(PEER_MAC, ME_MAC, PEER_IP, ME_IP, 3, 7, b"0123456789"),
    to_me(IP(src=PEER_IP, dst=ME_IP, options=[IPOption_NOP()] * 4) / UDP(sport=9, dport=7) / Raw(b"x")),
]


@st.composite
def mutated_frames(draw: st.DrawFn) -> bytes:
    frame = bytearray(draw(st.sampled_from(_VALID)))
    for _ in range(draw(st.integers(0, 4))):
        pos = draw(st.integers(0, len(frame) - 1))
        frame[pos] = draw(st.integers(0, 255))
    cut = draw(st.integers(0, len(frame)))
    return bytes(frame[:cut]) + draw(st.binary(max_size=20))


def _check_handled(ns: NetStack, frame: bytes) -> None:
    before = sum(ns.stats.values())
    replies = ns.handle(frame)
    assert sum(ns.stats.values()) == before + 1
    assert len(replies) <= 1
    for reply in replies:
        assert isinstance(reply, bytes)
        assert reply[6:12] == ME_MAC
        if reply[12:14] == b"\x08\x00":
            assert inet_checksum(reply[14:34]) == 0  # every IP reply carries a valid header


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=120))
def test_random_bytes_never_raise(frame: bytes) -> None:
    _check_handled(stack(), frame)


@settings(max_examples=500, deadline=None)
@given(mutated_frames())
def test_mutated_valid_frames_never_raise(frame: bytes) -> None:
    _check_handled(stack(), frame)
