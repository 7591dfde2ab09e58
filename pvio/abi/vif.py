"""The vif's MAC address as the handshake writes it: ``mac = "aa:bb:cc:dd:ee:ff"`` in both
xenstore directories (the form scapy's ``Ether(src=...)`` takes too).

The toolstack picks a default under Xen's OUI; netfront parses what the toolstack wrote.
"""

from __future__ import annotations

XEN_OUI = "00:16:3e"


def default_mac(domid: int, devid: int) -> str:
    """A stable locally-administered-style MAC under Xen's OUI for (domid, devid)."""
    return f"{XEN_OUI}:{(domid >> 8) & 0xFF:02x}:{domid & 0xFF:02x}:{devid & 0xFF:02x}"


def parse_mac(text: str) -> bytes:
    """'aa:bb:cc:dd:ee:ff' -> 6 bytes (ValueError naming the text otherwise)."""
    parts = text.split(":")
    if len(parts) != 6:
        raise ValueError(f"MAC address {text!r} does not have 6 octets")
    try:
        return bytes(int(p, 16) for p in parts)
    except ValueError:
        raise ValueError(f"MAC address {text!r} is not hexadecimal") from None


def format_mac(mac: bytes) -> str:
    """6 bytes -> 'aa:bb:cc:dd:ee:ff' (ValueError for another length)."""
    if len(mac) != 6:
        raise ValueError(f"a MAC address is 6 bytes, not {len(mac)}: {mac!r}")
    return ":".join(f"{b:02x}" for b in mac)
