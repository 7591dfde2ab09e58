"""The toolstack's part of device set-up (what libxl does before the drivers start).

``add_vif`` creates a vif's frontend and backend directories in xenstore with libxl's
keys and permissions (fact sheet §3.1): each directory is owned by its side with default
access "none", and the other side may read it — so each side of a device reads but
cannot write the other side's directory.  Both start in state Initialising; netback
(watching its backend directory) and netfront take it from there.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from pvio.xenstore.wire import XenbusState

if TYPE_CHECKING:
    from pvio.core.domain import Domain
    from pvio.core.hypervisor import Hypervisor

XEN_OUI = "00:16:3e"


@dataclass(frozen=True)
class VifConfig:
    """Where a vif's two halves live in xenstore."""

    frontend_domid: int
    backend_domid: int
    devid: int
    mac: str
    frontend_path: str
    backend_path: str


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


def add_vif(
    hv: Hypervisor, frontend: Domain, devid: int = 0, mac: str | None = None, backend: Domain | None = None
) -> VifConfig:
    """Write the vif's xenstore directories (libxl's keys and permissions), state Initialising."""
    be = backend if backend is not None else hv.dom0
    if be is None:
        raise RuntimeError("the hypervisor has no dom0 to host the backend")
    mac = mac or default_mac(frontend.domid, devid)
    parse_mac(mac)
    fe_path = f"/local/domain/{frontend.domid}/device/vif/{devid}"
    be_path = f"/local/domain/{be.domid}/backend/vif/{frontend.domid}/{devid}"
    ts = hv.toolstack
    init = str(int(XenbusState.INITIALISING))
    # Directories first, with their perms, so every key written below inherits them.
    ts.mkdir(fe_path)
    ts.set_perms(fe_path, [f"n{frontend.domid}", f"r{be.domid}"])
    ts.mkdir(be_path)
    ts.set_perms(be_path, [f"n{be.domid}", f"r{frontend.domid}"])
    for key, value in {
        "backend": be_path,
        "backend-id": str(be.domid),
        "handle": str(devid),
        "mac": mac,
        "state": init,
    }.items():
        ts.write(f"{fe_path}/{key}", value)
    for key, value in {
        "frontend": fe_path,
        "frontend-id": str(frontend.domid),
        "handle": str(devid),
        "mac": mac,
        "online": "1",
        "state": init,
    }.items():
        ts.write(f"{be_path}/{key}", value)
    return VifConfig(frontend.domid, be.domid, devid, mac, fe_path, be_path)
