"""A minimal guest network stack: answers ARP, ICMP echo and UDP echo, bytes in, bytes out.

Design rationale
----------------
Example guests need a peer that answers ``ping`` and a UDP echo so that end-to-end
scenarios and benchmarks have something to talk to.  scapy costs ~110 µs to parse and
~700 µs to build a packet (docs/architecture.md, "Performance"), more than the whole PV path, so this
stack never touches scapy: it reads headers with :mod:`struct` and slices, writes
replies from headers precomputed for its own MAC/IP, and computes the Internet checksum
itself (one big-integer conversion per checksum, see :func:`inet_checksum`).  Tests
parse the replies with scapy; the data path does not.

Every frame is hostile input: :meth:`NetStack.handle` never raises.  It honours
the IPv4 IHL (options are skipped, and not echoed), trims Ethernet padding using the IP
total length, verifies the IPv4 header checksum, the ICMP checksum and a non-zero UDP
checksum, and ignores fragments (no reassembly), IP broadcast/multicast sources (no
amplification) and everything that is not for its MAC and IP.  Each frame handled lands
in exactly one ``stats`` key: ``arp_replies``, ``icmp_replies``, ``udp_replies``,
``ignored`` (well-formed, not ours or not answered) or ``malformed``.

Replies are not padded to the 60-byte Ethernet minimum: there is no wire here, and the
PV path carries frames of any size.

The module also has byte builders for the sending side (:func:`arp_request`,
:func:`icmp_echo`, :func:`udp_packet`) so benchmarks and guests can make traffic
without scapy.
"""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Iterable

ETH_P_IP = 0x0800
ETH_P_ARP = 0x0806
IPPROTO_ICMP = 1
IPPROTO_UDP = 17
ICMP_ECHO_REPLY = 0
ICMP_ECHO_REQUEST = 8
ARP_REQUEST = 1
ARP_REPLY = 2
BROADCAST_MAC = b"\xff" * 6
DEFAULT_TTL = 64

_ETH = struct.Struct("!6s6sH")
_ARP = struct.Struct("!HHBBH6s4s6s4s")  # htype ptype hlen plen oper sha spa tha tpa
_ARP_FIXED = struct.pack("!HHBB", 1, ETH_P_IP, 6, 4)  # Ethernet / IPv4 ARP
_IPV4 = struct.Struct("!BBHHHBBH4s4s")  # ver_ihl tos tot_len id frag ttl proto csum src dst
_ICMP_ECHO = struct.Struct("!BBHHH")  # type code csum id seq
_UDP = struct.Struct("!HHHH")  # sport dport len csum
_U16 = struct.Struct("!H")

_IP_MF = 0x2000
_IP_OFFSET_MASK = 0x1FFF


def inet_checksum(data: bytes) -> int:
    """The Internet checksum (RFC 1071) of ``data``: the ones' complement of its 16-bit sum.

    Uses that 2**16 ≡ 1 (mod 0xFFFF): the ones' complement sum of the big-endian 16-bit
    words of ``data`` is ``int(data) mod 0xFFFF``, with 0xFFFF (not 0) for non-zero data.
    One C-level big-integer conversion instead of a Python loop over words.
    """
    if len(data) & 1:
        data += b"\x00"
    n = int.from_bytes(data, "big")
    total = n % 0xFFFF
    if total == 0 and n:
        total = 0xFFFF
    return ~total & 0xFFFF


def _ip4(ip: str) -> bytes:
    """4 bytes of a dotted-quad IPv4 address (ValueError naming the bad value otherwise)."""
    return ipaddress.IPv4Address(ip).packed


def _mac(mac: bytes, what: str) -> bytes:
    if not isinstance(mac, bytes | bytearray) or len(mac) != 6:
        raise ValueError(f"{what} must be 6 bytes, got {mac!r}")
    return bytes(mac)


def _ipv4_header(src: bytes, dst: bytes, proto: int, payload_len: int, ident: int, ttl: int) -> bytes:
    """A 20-byte IPv4 header (no options, DF clear) with its checksum filled in."""
    header = _IPV4.pack(0x45, 0, 20 + payload_len, ident & 0xFFFF, 0, ttl, proto, 0, src, dst)
    return header[:10] + _U16.pack(inet_checksum(header)) + header[12:]


def _udp_pseudo_header(src: bytes, dst: bytes, length: int) -> bytes:
    """The IPv4 pseudo-header the UDP checksum covers (RFC 768)."""
    return src + dst + struct.pack("!BBH", 0, IPPROTO_UDP, length)


def _udp_checksum(src: bytes, dst: bytes, segment: bytes) -> int:
    """The UDP checksum over the IPv4 pseudo-header and ``segment`` (0 is sent as 0xFFFF)."""
    return inet_checksum(_udp_pseudo_header(src, dst, len(segment)) + segment) or 0xFFFF


def _udp_segment(src: bytes, dst: bytes, sport: int, dport: int, payload: bytes, checksum: bool) -> bytes:
    length = 8 + len(payload)
    segment = _UDP.pack(sport, dport, length, 0) + payload
    if checksum:
        segment = segment[:6] + _U16.pack(_udp_checksum(src, dst, segment)) + segment[8:]
    return segment


def _icmp_echo_message(icmp_type: int, ident: int, seq: int, payload: bytes) -> bytes:
    message = _ICMP_ECHO.pack(icmp_type, 0, 0, ident, seq) + payload
    return message[:2] + _U16.pack(inet_checksum(message)) + message[4:]


# -- builders for the sending side ------------------------------------------------------


def arp_request(src_mac: bytes, src_ip: str, dst_ip: str) -> bytes:
    """A broadcast ARP request: who has ``dst_ip``? tell ``src_ip`` (at ``src_mac``)."""
    sha = _mac(src_mac, "src_mac")
    return _ETH.pack(BROADCAST_MAC, sha, ETH_P_ARP) + _ARP.pack(
        1, ETH_P_IP, 6, 4, ARP_REQUEST, sha, _ip4(src_ip), b"\x00" * 6, _ip4(dst_ip)
    )


def icmp_echo(
    src_mac: bytes,
    dst_mac: bytes,
    src_ip: str,
    dst_ip: str,
    ident: int = 0,
    seq: int = 0,
    payload: bytes = b"",
    *,
    reply: bool = False,
    ttl: int = DEFAULT_TTL,
    ip_id: int = 0,
) -> bytes:
    """An Ethernet/IPv4/ICMP echo request (or echo reply, with ``reply=True``) frame."""
    src, dst = _ip4(src_ip), _ip4(dst_ip)
    message = _icmp_echo_message(ICMP_ECHO_REPLY if reply else ICMP_ECHO_REQUEST, ident, seq, payload)
    return (
        _ETH.pack(_mac(dst_mac, "dst_mac"), _mac(src_mac, "src_mac"), ETH_P_IP)
        + _ipv4_header(src, dst, IPPROTO_ICMP, len(message), ip_id, ttl)
        + message
    )


def udp_packet(
    src_mac: bytes,
    dst_mac: bytes,
    src_ip: str,
    dst_ip: str,
    sport: int,
    dport: int,
    payload: bytes = b"",
    *,
    ttl: int = DEFAULT_TTL,
    ip_id: int = 0,
    checksum: bool = True,
) -> bytes:
    """An Ethernet/IPv4/UDP frame; ``checksum=False`` sends UDP checksum 0 (allowed on IPv4)."""
    src, dst = _ip4(src_ip), _ip4(dst_ip)
    segment = _udp_segment(src, dst, sport, dport, payload, checksum)
    return (
        _ETH.pack(_mac(dst_mac, "dst_mac"), _mac(src_mac, "src_mac"), ETH_P_IP)
        + _ipv4_header(src, dst, IPPROTO_UDP, len(segment), ip_id, ttl)
        + segment
    )


# -- the receiving stack ----------------------------------------------------------------


class NetStack:
    """The network stack of an example guest with one MAC and one IPv4 address.

    ``handle(frame)`` returns the reply frames (zero or one) for one received frame.
    ``udp_echo_ports`` are the UDP ports answered with an echo (RFC 862 uses port 7).
    """

    def __init__(self, mac: bytes, ip: str, udp_echo_ports: Iterable[int] = (7,)) -> None:
        self.mac = _mac(mac, "NetStack mac")
        self.ip = ip
        self.ip_bytes = _ip4(ip)
        ports = frozenset(udp_echo_ports)
        bad = [p for p in ports if not 0 < p < 65536]
        if bad:
            raise ValueError(f"NetStack {ip}: UDP echo ports must be in 1..65535, got {sorted(bad)}")
        self.udp_echo_ports = ports
        self.stats: dict[str, int] = dict.fromkeys(
            ("arp_replies", "icmp_replies", "udp_replies", "ignored", "malformed"), 0
        )
        self._ip_id = 0
        # Precomputed reply pieces: everything that depends only on our own addresses.
        self._arp_reply_fixed = _ARP_FIXED + _U16.pack(ARP_REPLY) + self.mac + self.ip_bytes

    def handle(self, frame: bytes) -> list[bytes]:
        """The reply frames for one received Ethernet ``frame``; never raises."""
        # Every length is checked before the bytes it covers are read, so no exception
        # handler is needed (and none hides a parser bug: the fuzz test would see it).
        reply, outcome = self._handle(frame)
        self.stats[outcome] += 1
        return [reply] if reply is not None else []

    def handle_batch(self, frames: Iterable[bytes]) -> list[bytes]:
        """The replies to a batch of frames, in order (what a guest's RX loop calls)."""
        out: list[bytes] = []
        for frame in frames:
            out.extend(self.handle(frame))
        return out

    def _handle(self, frame: bytes) -> tuple[bytes | None, str]:
        if len(frame) < 14:
            return None, "malformed"
        dst_mac = frame[0:6]
        src_mac = frame[6:12]
        if dst_mac != self.mac and dst_mac != BROADCAST_MAC:
            return None, "ignored"
        if src_mac[0] & 1:
            return None, "ignored"  # a group source address is bogus: never answer it
        (ethertype,) = _U16.unpack_from(frame, 12)
        if ethertype == ETH_P_ARP:
            return self._arp(frame, src_mac)
        if ethertype == ETH_P_IP:
            if dst_mac != self.mac:
                return None, "ignored"  # IP to the broadcast MAC: nothing here answers it
            return self._ipv4(frame, src_mac)
        return None, "ignored"

    def _arp(self, frame: bytes, src_mac: bytes) -> tuple[bytes | None, str]:
        if len(frame) < 14 + _ARP.size:
            return None, "malformed"
        if frame[14:20] != _ARP_FIXED:
            return None, "malformed"  # not Ethernet/IPv4 ARP
        _, _, _, _, oper, sha, spa, _, tpa = _ARP.unpack_from(frame, 14)
        if oper != ARP_REQUEST or tpa != self.ip_bytes:
            return None, "ignored"
        if sha[0] & 1:
            return None, "malformed"
        reply = _ETH.pack(sha, self.mac, ETH_P_ARP) + self._arp_reply_fixed + sha + spa
        return reply, "arp_replies"

    def _ipv4(self, frame: bytes, src_mac: bytes) -> tuple[bytes | None, str]:
        if len(frame) < 14 + 20:
            return None, "malformed"
        ver_ihl, _, total_len, _, frag, _, proto, _, src, dst = _IPV4.unpack_from(frame, 14)
        ihl = (ver_ihl & 0x0F) * 4
        if ver_ihl >> 4 != 4 or ihl < 20 or total_len < ihl or 14 + total_len > len(frame):
            return None, "malformed"
        header = frame[14 : 14 + ihl]
        if inet_checksum(header) != 0:
            return None, "malformed"
        if dst != self.ip_bytes:
            return None, "ignored"
        if frag & (_IP_MF | _IP_OFFSET_MASK):
            return None, "ignored"  # a fragment: no reassembly here
        if src[0] >= 224 or src == b"\x00\x00\x00\x00":
            return None, "ignored"  # multicast, broadcast or unspecified source: never answer
        payload = frame[14 + ihl : 14 + total_len]  # trims Ethernet padding
        if proto == IPPROTO_ICMP:
            return self._icmp(payload, src, src_mac)
        if proto == IPPROTO_UDP:
            return self._udp(payload, src, src_mac)
        return None, "ignored"

    def _icmp(self, message: bytes, src: bytes, src_mac: bytes) -> tuple[bytes | None, str]:
        if len(message) < _ICMP_ECHO.size:
            return None, "malformed"
        if inet_checksum(message) != 0:
            return None, "malformed"
        icmp_type, code, _, ident, seq = _ICMP_ECHO.unpack_from(message)
        if icmp_type != ICMP_ECHO_REQUEST or code != 0:
            return None, "ignored"
        reply = _icmp_echo_message(ICMP_ECHO_REPLY, ident, seq, message[8:])
        return self._ip_reply(src_mac, src, IPPROTO_ICMP, reply), "icmp_replies"

    def _udp(self, segment: bytes, src: bytes, src_mac: bytes) -> tuple[bytes | None, str]:
        if len(segment) < _UDP.size:
            return None, "malformed"
        sport, dport, length, csum = _UDP.unpack_from(segment)
        if length < 8 or length > len(segment):
            return None, "malformed"
        segment = segment[:length]
        if csum and inet_checksum(_udp_pseudo_header(src, self.ip_bytes, length) + segment):
            return None, "malformed"  # checksum 0 means "not computed"; anything else must verify
        if dport not in self.udp_echo_ports or sport == 0:
            return None, "ignored"
        reply = _udp_segment(self.ip_bytes, src, dport, sport, segment[8:], checksum=True)
        return self._ip_reply(src_mac, src, IPPROTO_UDP, reply), "udp_replies"

    def _ip_reply(self, dst_mac: bytes, dst_ip: bytes, proto: int, payload: bytes) -> bytes:
        self._ip_id = (self._ip_id + 1) & 0xFFFF
        header = _ipv4_header(self.ip_bytes, dst_ip, proto, len(payload), self._ip_id, DEFAULT_TTL)
        return _ETH.pack(dst_mac, self.mac, ETH_P_IP) + header + payload
