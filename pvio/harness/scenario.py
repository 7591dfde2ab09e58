"""Scenario files: a network of domains, their NICs, switch ports and traffic, in TOML.

``pvio run FILE`` boots what a scenario file describes, runs its traffic, prints the result
table (or ``--json``) and exits non-zero when traffic was lost or a check failed.  The file
is validated completely before anything boots: an error names the file, the line, the key
and the problem, and lists the valid choices (:class:`ScenarioError`).

Schema (``docs/scenarios.md`` has it with examples)::

    name = "two guests"        # optional
    seed = 0                   # trio's scheduler seed: same scenario, same counts
    clock = "mock"             # "mock": virtual time, exact counts; "real": wall clock
    timeout = 60               # seconds of the scenario's clock for the whole run

    [[domain]]
    name = "a"                 # required, unique: letters, digits, '-'
    kind = "py"                # a guest kind: py, x86 (and those registered)
    ip = "10.0.0.1"            # default 10.0.0.<n>
    app = "nic"                # nic (driven by the traffic) or echo (answers ARP/ICMP/UDP echo)
    cmdline = ""               # x86: extra kernel command-line words
    [domain.nic]
    model = "pv"               # pv, emulated or smartnic
    backend = "lossy"          # pv: a backend by entry-point name, for this vif
    options = { every = 10 }   # the backend's options
    backend_domain = "netdd"   # pv: the vif's backend is this driver domain, not dom0

    [[driver]]                 # a driver domain: netback and a switch in a process of their own
    name = "netdd"             #   (needs clock = "real"; its vifs' guests share its switch)
    backend = "lossy"          # optional: a backend for its vifs, and its options

    [[port]]                   # more switch ports
    type = "capture"           # capture (file, of = "switch" or a domain), tap (ifname),
    file = "out.pcap"          #   vxlan (vni, local = "HOST:PORT", remote = ["HOST[:PORT]"])

    [[traffic]]
    type = "stream"            # stream, pingpong or probes
    from = "a"
    to = "b"
    packets = 1000             # frames (stream), round trips (pingpong)
    size = 64                  # frame bytes
    rate = 0                   # frames (trips) per second; 0 = as fast as possible

Design: the file is parsed with :mod:`tomllib`, which gives no positions, so a small
locator reads the same text for the line of each table header and key (arrays of tables
counted by index); every validation error is raised with the path of the value at fault
and the locator turns it into a line.  Validation is a hand-written pass rather than a
schema library: the messages are the product here, and they must name the choices.
"""

from __future__ import annotations

import ipaddress
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pvio.toolstack import FRAME_LIMITS, MODELS

SCENARIO_KEYS = {"name", "seed", "clock", "timeout", "domain", "driver", "traffic", "port", "report"}
DOMAIN_KEYS = {"name", "kind", "ip", "app", "cmdline", "nic", "memory"}
NIC_KEYS = {"model", "backend", "options", "mac", "backend_domain"}
DRIVER_KEYS = {"name", "backend", "options"}
TRAFFIC_KEYS = {"type", "from", "to", "packets", "size", "rate"}
REPORT_KEYS = {"counters", "by_domain"}
PORT_KEYS = {
    "capture": {"type", "file", "of"},
    "tap": {"type", "ifname"},
    "vxlan": {"type", "vni", "local", "remote"},
}
CLOCKS = ("mock", "real")
APPS = ("nic", "echo")
TRAFFIC_TYPES = ("stream", "pingpong", "probes")
COUNTERS = ("interrupts", "exits", "hypercalls", "copies")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9-]{0,31}$")


class ScenarioError(ValueError):
    """A scenario file that cannot run: ``FILE:LINE: key: problem`` (one line)."""

    def __init__(self, file: str, line: int | None, key: str, problem: str) -> None:
        self.file, self.line, self.key, self.problem = file, line, key, problem
        where = f"{file}:{line}" if line else file
        super().__init__(f"{where}: {key}: {problem}")


@dataclass
class NicSpec:
    model: str = "pv"
    backend: str | None = None
    options: dict[str, Any] = field(default_factory=dict)
    mac: str | None = None
    backend_domain: str | None = None  # a [[driver]]'s name: the vif's backend runs there


@dataclass
class DriverSpec:
    """A driver domain: netback and a switch in a process of their own (pvio.remote.backend)."""

    name: str
    backend: str | None = None
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class DomainSpec:
    name: str
    kind: str = "py"
    ip: str = ""
    app: str = "nic"
    cmdline: str = ""
    memory_mib: int | None = None
    nic: NicSpec = field(default_factory=NicSpec)


@dataclass
class TrafficSpec:
    type: str
    src: str
    dst: str
    packets: int = 100
    size: int = 64
    rate: float = 0.0


@dataclass
class PortSpec:
    """A switch port beyond the domains' NICs: a capture mirror, a TAP device, a VXLAN tunnel."""

    type: str
    file: str = ""  # capture: the pcap (.pcapng: pcapng) file
    of: str = "switch"  # capture: "switch", or a domain whose NIC's port to mirror
    ifname: str = ""  # tap
    vni: int = 0  # vxlan
    local: str = "0.0.0.0:4789"  # vxlan: HOST:PORT
    remotes: list[str] = field(default_factory=list)  # vxlan: static remote VTEPs, HOST[:PORT]


@dataclass
class Scenario:
    """A validated scenario file."""

    path: str
    name: str
    seed: int = 0
    clock: str = "mock"
    timeout: float = 60.0
    domains: list[DomainSpec] = field(default_factory=list)
    drivers: list[DriverSpec] = field(default_factory=list)
    traffic: list[TrafficSpec] = field(default_factory=list)
    ports: list[PortSpec] = field(default_factory=list)
    report_counters: tuple[str, ...] = COUNTERS
    report_by_domain: bool = True

    def domain(self, name: str) -> DomainSpec:
        return next(d for d in self.domains if d.name == name)

    def switch_of(self, name: str) -> str:
        """Which switch a domain's NIC is on: its driver domain's, or dom0's (``""``)."""
        return self.domain(name).nic.backend_domain or ""


# ---------------------------------------------------------------------- where things are
def _locate(text: str) -> dict[tuple[Any, ...], int]:
    """(table path..., key) -> line number, for the headers and keys of ``text``.

    ``[[domain]]`` tables are numbered (``("domain", 0)``, ``("domain", 1)``), a
    ``[domain.nic]`` header belongs to the last ``[[domain]]``; a key's path is its table's
    path plus the key.  Good enough for pvio's schema (no dotted keys across tables).
    """
    lines: dict[tuple[Any, ...], int] = {}
    counts: dict[tuple[Any, ...], int] = {}
    table: tuple[Any, ...] = ()
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if m := re.match(r"^\[\[\s*([\w.-]+)\s*\]\]", line):
            parts = m.group(1).split(".")
            parent = _resolve(parts[:-1], counts)
            key = (*parent, parts[-1])
            index = counts.get(key, -1) + 1
            counts[key] = index
            table = (*key, index)
            lines.setdefault(table, lineno)
            continue
        if m := re.match(r"^\[\s*([\w.-]+)\s*\]", line):
            table = _resolve(m.group(1).split("."), counts)
            lines.setdefault(table, lineno)
            continue
        if m := re.match(r"^([\w-]+|\"[^\"]*\")\s*=", line):
            lines.setdefault((*table, m.group(1).strip('"')), lineno)
    return lines


def _resolve(parts: list[str], counts: dict[tuple[Any, ...], int]) -> tuple[Any, ...]:
    path: tuple[Any, ...] = ()
    for part in parts:
        path = (*path, part)
        if path in counts:
            path = (*path, counts[path])
    return path


class _Checker:
    def __init__(self, path: str, text: str) -> None:
        self.path = path
        self.lines = _locate(text)

    def fail(self, where: tuple[Any, ...], problem: str) -> ScenarioError:
        key = ".".join(str(p) if not isinstance(p, int) else f"[{p}]" for p in where).replace(".[", "[")
        line = None
        probe = where
        while probe and line is None:  # the key's line, else its table's
            line = self.lines.get(probe)
            probe = probe[:-1]
        return ScenarioError(self.path, line, key or "(file)", problem)

    def keys(self, table: dict[str, Any], allowed: set[str], where: tuple[Any, ...]) -> None:
        for key in table:
            if key not in allowed:
                near = sorted(allowed)
                raise self.fail((*where, key), f"unknown key; valid keys here: {', '.join(near)}")

    def choice(self, value: Any, choices: tuple[str, ...] | list[str], where: tuple[Any, ...]) -> str:
        if not isinstance(value, str) or value not in choices:
            raise self.fail(where, f"{value!r} is not one of: {', '.join(choices)}")
        return value

    def integer(self, value: Any, where: tuple[Any, ...], low: int, high: int) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise self.fail(where, f"{value!r} must be a whole number from {low} to {high}")
        return value

    def number(self, value: Any, where: tuple[Any, ...], low: float, high: float) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
            raise self.fail(where, f"{value!r} must be a number from {low:g} to {high:g}")
        return float(value)

    def string(self, value: Any, where: tuple[Any, ...]) -> str:
        if not isinstance(value, str):
            raise self.fail(where, f"{value!r} must be a string")
        return value

    def name(self, table: dict[str, Any], at: tuple[Any, ...], what: str) -> str:
        """A table's required ``name``: 1-32 letters, digits or '-'."""
        if "name" not in table:
            raise self.fail(at, f"every {what} needs a name")
        name = self.string(table["name"], (*at, "name"))
        if not _NAME.match(name):
            raise self.fail((*at, "name"), f"{name!r}: use 1-32 letters, digits or '-'")
        return name

    def options(self, table: dict[str, Any], at: tuple[Any, ...], backend: str | None) -> dict[str, Any]:
        """A table's ``options``: a table, and only beside the backend they are for."""
        options = table.get("options", {})
        if not isinstance(options, dict):
            raise self.fail((*at, "options"), "must be a table of the backend's options")
        if options and backend is None:
            raise self.fail((*at, "options"), "options are the backend's: name a backend too")
        return dict(options)


def guest_kinds() -> list[str]:
    """The guest kinds a scenario may name (those registered with the bench)."""
    from pvio.harness.bench import GUEST_KINDS

    return sorted(GUEST_KINDS)


def parse(text: str, path: str = "<scenario>") -> Scenario:
    """Validate a scenario's TOML text; :class:`ScenarioError` names the first problem."""
    from pvio.backend_api import available_backends

    chk = _Checker(path, text)
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        m = re.search(r"line (\d+)", str(e))
        raise ScenarioError(path, int(m.group(1)) if m else None, "(syntax)", str(e)) from None
    chk.keys(data, SCENARIO_KEYS, ())
    sc = Scenario(path, chk.string(data.get("name", Path(path).stem), ("name",)))
    sc.seed = chk.integer(data.get("seed", 0), ("seed",), 0, 2**32 - 1)
    sc.clock = chk.choice(data.get("clock", "mock"), CLOCKS, ("clock",))
    sc.timeout = chk.number(data.get("timeout", 60), ("timeout",), 0.001, 86400)
    domains = data.get("domain", [])
    if not isinstance(domains, list) or not domains:
        raise chk.fail(("domain",), "a scenario needs at least one [[domain]] table")
    kinds = guest_kinds()
    backends = sorted(available_backends())
    drivers = data.get("driver", [])
    if not isinstance(drivers, list):
        raise chk.fail(("driver",), "must be tables ([[driver]])")
    for i, d in enumerate(drivers):
        at = ("driver", i)
        if not isinstance(d, dict):
            raise chk.fail(at, "must be a table ([[driver]])")
        chk.keys(d, DRIVER_KEYS, at)
        name = chk.name(d, at, "driver domain")
        if any(o.name == name for o in sc.drivers) or any(
            isinstance(o, dict) and o.get("name") == name for o in domains
        ):
            raise chk.fail((*at, "name"), f"{name!r} names two domains")
        if sc.clock != "real":
            raise chk.fail(at, 'a driver domain runs in a process of its own: it needs clock = "real"')
        drv = DriverSpec(name)
        if "backend" in d:
            drv.backend = chk.choice(d["backend"], backends, (*at, "backend"))
        drv.options = chk.options(d, at, drv.backend)
        sc.drivers.append(drv)
    driver_names = [d.name for d in sc.drivers]
    used_ips: set[str] = set()
    for i, d in enumerate(domains):
        at = ("domain", i)
        if not isinstance(d, dict):
            raise chk.fail(at, "must be a table ([[domain]])")
        chk.keys(d, DOMAIN_KEYS, at)
        name = chk.name(d, at, "domain")
        if any(o.name == name for o in sc.domains):
            raise chk.fail((*at, "name"), f"{name!r} names two domains")
        spec = DomainSpec(name)
        spec.kind = chk.choice(d.get("kind", "py"), kinds, (*at, "kind"))
        spec.app = chk.choice(d.get("app", "nic"), APPS, (*at, "app"))
        spec.cmdline = chk.string(d.get("cmdline", ""), (*at, "cmdline"))
        if "memory" in d:
            spec.memory_mib = chk.integer(d["memory"], (*at, "memory"), 1, 4096)
        ip = chk.string(d.get("ip", f"10.0.0.{i + 1}"), (*at, "ip"))
        try:
            ipaddress.IPv4Address(ip)
        except ValueError:
            raise chk.fail((*at, "ip"), f"{ip!r} is not an IPv4 address") from None
        if ip in used_ips:
            raise chk.fail((*at, "ip"), f"{ip} is already another domain's")
        used_ips.add(ip)
        spec.ip = ip
        nic = d.get("nic", {})
        if not isinstance(nic, dict):
            raise chk.fail((*at, "nic"), "must be a table ([domain.nic])")
        chk.keys(nic, NIC_KEYS, (*at, "nic"))
        spec.nic.model = chk.choice(nic.get("model", "pv"), MODELS, (*at, "nic", "model"))
        if "backend" in nic:
            if spec.nic.model != "pv":
                raise chk.fail((*at, "nic", "backend"), f"backends serve PV vifs, not {spec.nic.model} NICs")
            spec.nic.backend = chk.choice(nic["backend"], backends, (*at, "nic", "backend"))
        if "backend_domain" in nic:
            where = (*at, "nic", "backend_domain")
            if spec.nic.model != "pv":
                raise chk.fail(where, f"a driver domain serves PV vifs, not {spec.nic.model} NICs")
            if not driver_names:
                raise chk.fail(where, "names no driver domain: add a [[driver]] table")
            spec.nic.backend_domain = chk.choice(nic["backend_domain"], driver_names, where)
            if spec.kind != "py":
                raise chk.fail(where, f"a driver domain serves py guests here, not {spec.kind}")
            if spec.nic.backend is not None:
                raise chk.fail((*at, "nic", "backend"), "a vif served by a driver domain takes "
                               "that domain's backend: name it in its [[driver]] table")  # fmt: skip
        spec.nic.options = chk.options(nic, (*at, "nic"), spec.nic.backend)
        if "mac" in nic:
            from pvio.abi.vif import parse_mac

            mac = chk.string(nic["mac"], (*at, "nic", "mac"))
            try:
                parse_mac(mac)
            except ValueError as e:
                raise chk.fail((*at, "nic", "mac"), str(e)) from None
            spec.nic.mac = mac
        sc.domains.append(spec)
    names = [d.name for d in sc.domains]
    for i, t in enumerate(data.get("traffic", [])):
        at = ("traffic", i)
        if not isinstance(t, dict):
            raise chk.fail(at, "must be a table ([[traffic]])")
        chk.keys(t, TRAFFIC_KEYS, at)
        kind = chk.choice(t.get("type"), TRAFFIC_TYPES, (*at, "type"))
        for key in ("from", "to"):
            if key not in t:
                raise chk.fail(at, f"traffic needs '{key}' (a domain: {', '.join(names)})")
            chk.choice(t[key], names, (*at, key))
        if t["from"] == t["to"]:
            raise chk.fail((*at, "to"), "a domain cannot send traffic to itself")
        spec_t = TrafficSpec(kind, t["from"], t["to"])
        spec_t.packets = chk.integer(t.get("packets", 100), (*at, "packets"), 1, 10_000_000)
        spec_t.rate = chk.number(t.get("rate", 0), (*at, "rate"), 0, 10_000_000)
        src, dst = sc.domain(spec_t.src), sc.domain(spec_t.dst)
        low, high = FRAME_LIMITS[src.nic.model]
        low2, high2 = FRAME_LIMITS[dst.nic.model]
        low, high = max(low, low2), min(high, high2)
        if kind != "probes":
            spec_t.size = chk.integer(t.get("size", 64), (*at, "size"), low, high)
            if kind == "stream" and src.kind == "x86" and spec_t.size > 1514:
                raise chk.fail((*at, "size"), "x86 guests stream frames of at most 1514 bytes")
        elif "size" in t or "packets" in t:
            raise chk.fail(at, "probes are a fixed set (ARP, ICMP, UDP): no size or packets")
        _check_pair(chk, at, kind, src, dst)
        if sc.switch_of(src.name) != sc.switch_of(dst.name):
            on = {
                n: f"driver domain {sc.switch_of(n)}'s" if sc.switch_of(n) else "dom0's"
                for n in (src.name, dst.name)
            }
            raise chk.fail(at, f"{src.name} is on {on[src.name]} switch and {dst.name} on {on[dst.name]}: "
                           "traffic stays on one switch")  # fmt: skip
        sc.traffic.append(spec_t)
    for i, p in enumerate(data.get("port", [])):
        at = ("port", i)
        if not isinstance(p, dict):
            raise chk.fail(at, "must be a table ([[port]])")
        kind = chk.choice(p.get("type"), sorted(PORT_KEYS), (*at, "type"))
        chk.keys(p, PORT_KEYS[kind], at)
        port = PortSpec(kind)
        if kind == "capture":
            if "file" not in p:
                raise chk.fail(at, "a capture needs a file (a .pcap or .pcapng path)")
            port.file = chk.string(p["file"], (*at, "file"))
            port.of = chk.choice(p.get("of", "switch"), ["switch", *names], (*at, "of"))
            if port.of != "switch" and sc.switch_of(port.of):
                raise chk.fail((*at, "of"), f"{port.of}'s NIC is on driver domain "
                               f"{sc.switch_of(port.of)}'s switch: ports are dom0's")  # fmt: skip
        elif kind == "tap":
            port.ifname = chk.string(p.get("ifname", ""), (*at, "ifname"))
            if not 1 <= len(port.ifname.encode()) <= 15 or "/" in port.ifname or " " in port.ifname:
                raise chk.fail((*at, "ifname"), f"{port.ifname!r} is not an interface name (1-15 bytes)")
        else:
            port.vni = chk.integer(p.get("vni"), (*at, "vni"), 0, (1 << 24) - 1)
            port.local = chk.string(p.get("local", port.local), (*at, "local"))
            remotes = p.get("remote", [])
            if isinstance(remotes, str):
                remotes = [remotes]
            if not isinstance(remotes, list):
                raise chk.fail((*at, "remote"), "a HOST[:PORT] string or a list of them")
            port.remotes = [chk.string(r, (*at, "remote")) for r in remotes]
        sc.ports.append(port)
    report = data.get("report", {})
    if not isinstance(report, dict):
        raise chk.fail(("report",), "must be a table ([report])")
    chk.keys(report, REPORT_KEYS, ("report",))
    if "counters" in report:
        wanted = report["counters"]
        if not isinstance(wanted, list) or not wanted:
            raise chk.fail(("report", "counters"), f"a list of: {', '.join(COUNTERS)}")
        sc.report_counters = tuple(chk.choice(c, COUNTERS, ("report", "counters")) for c in wanted)
    if "by_domain" in report:
        if not isinstance(report["by_domain"], bool):
            raise chk.fail(("report", "by_domain"), "true or false")
        sc.report_by_domain = report["by_domain"]
    return sc


def _check_pair(chk: _Checker, at: tuple[Any, ...], kind: str, src: DomainSpec, dst: DomainSpec) -> None:
    """The combinations the traffic generators support, said plainly."""
    for side, spec in (("from", src), ("to", dst)):
        if spec.kind not in ("py", "x86"):
            raise chk.fail((*at, side), f"{spec.kind} guests boot on the network but take no scenario "
                           "traffic (pvio demo --guest linux exercises a Linux guest)")  # fmt: skip
    if kind == "probes":
        if src.kind != "py":
            raise chk.fail((*at, "from"), "probes are sent (and checked with scapy) by a py domain")
        if dst.app != "echo":
            raise chk.fail((*at, "to"), f'probes need an answering domain: give {dst.name!r} app = "echo"')
        return
    if dst.app == "echo" or src.app == "echo":
        raise chk.fail(at, f'{kind} traffic runs between app = "nic" domains (echo domains answer probes)')
    if (src.kind == "x86") != (dst.kind == "x86"):
        raise chk.fail(at, f"{kind} between x86 and py guests is not supported: x86 guests make "
                       "their traffic in the guest, with another x86 guest")  # fmt: skip
    if src.kind == "x86" and src.nic.model != dst.nic.model:
        raise chk.fail(at, "x86 guests exchange traffic over the same device model")


def load(path: str | Path) -> Scenario:
    """Read and validate a scenario file."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise ScenarioError(str(path), None, "(file)", f"cannot read it: {e.strerror or e}") from None
    return parse(text, str(path))
