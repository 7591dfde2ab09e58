"""The toolstack: creating domains and their devices, and booting a whole network.

:func:`boot_network` / :func:`start_network` are the one way pvio boots a network of guests
(the CLI, the demo, the benchmarks, the pytest plugin and the tests all use them): dom0 with
the switch (and netback for PV vifs), one domain per guest kernel with one NIC of the
chosen device model, every guest connected and its MAC learned.

The toolstack's part of device set-up (what libxl does before the drivers start):

``add_vif`` creates a vif's frontend and backend directories in xenstore with libxl's
keys and permissions (libxl's vif directories): each directory is owned by its side with default
access "none", and the other side may read it — so each side of a device reads but
cannot write the other side's directory.  Both start in state Initialising; netback
(watching its backend directory) and netfront take it from there.
"""

from __future__ import annotations

import struct
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import trio
import trio.testing

from pvio.abi.vif import default_mac, parse_mac
from pvio.xenstore.store import XenstoreError
from pvio.xenstore.wire import XenbusState

if TYPE_CHECKING:
    from pvio.backends.netback import BackendVif, NetBack
    from pvio.backends.switch import Switch
    from pvio.core.counters import Snapshot
    from pvio.core.domain import Domain
    from pvio.core.hypervisor import Hypervisor


@dataclass(frozen=True)
class VifConfig:
    """Where a vif's two halves live in xenstore."""

    frontend_domid: int
    backend_domid: int
    devid: int
    mac: str
    frontend_path: str
    backend_path: str


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


def vif_devids(hv: Hypervisor, dom: Domain) -> list[int]:
    """The device ids of ``dom``'s vifs in xenstore."""
    try:
        return sorted(int(d) for d in hv.toolstack.directory(f"/local/domain/{dom.domid}/device/vif"))
    except XenstoreError:
        return []


def attach_vif(hv: Hypervisor, dom: Domain, devid: int | None = None, mac: str | None = None) -> VifConfig:
    """Hot-plug a vif (``xl network-attach``): its directories, state Initialising; a frontend
    that watches its ``device/vif`` directory connects it, netback serves it."""
    used = vif_devids(hv, dom)
    devid = (max(used) + 1 if used else 0) if devid is None else devid
    if devid in used:
        raise ValueError(f"{dom.name} already has vif {devid}")
    return add_vif(hv, dom, devid, mac)


async def detach_vif(hv: Hypervisor, dom: Domain, devid: int, timeout_s: float = 10.0) -> None:
    """Hot-unplug a vif (``xl network-detach``): the backend is asked to close (its state
    Closing, ``online`` 0); the frontend closes, netback tears the vif down, both reach
    Closed; then the toolstack removes both directories.  TimeoutError if the frontend does
    not answer within ``timeout_s`` (the directories are removed all the same)."""
    ts = hv.toolstack
    fe = f"/local/domain/{dom.domid}/device/vif/{devid}"
    try:
        be = ts.read(f"{fe}/backend").decode()
    except XenstoreError:
        raise ValueError(f"{dom.name} has no vif {devid}") from None
    ts.write(f"{be}/online", "0")
    ts.write(f"{be}/state", str(int(XenbusState.CLOSING)))
    try:
        with trio.fail_after(timeout_s):
            while True:
                try:
                    done = int(ts.read(f"{fe}/state")) == XenbusState.CLOSED
                except (XenstoreError, ValueError):
                    done = True
                if done:
                    break
                await trio.sleep(0.001)
    except trio.TooSlowError:
        raise TimeoutError(f"{dom.name}'s vif {devid} did not close within {timeout_s} s") from None
    finally:
        for path in (fe, be):
            with suppress(XenstoreError):
                ts.rm(path)


# ---------------------------------------------------------------------- booting a network
#: Device models a guest's NIC can have (``model=``): the PV split driver (a vif served by
#: netback in dom0), the register-level emulated NIC, the monitor's DMA smart NIC.
MODELS: tuple[str, ...] = ("emulated", "pv", "smartnic")
#: The frame sizes each model carries, Ethernet header included (no FCS): the emulated card's
#: 1518-byte buffer, the smart NIC driver's 2048-byte buffers, netif's 16-bit size (PV frames
#: span up to 18 pages).  The low end is a minimal IPv4 frame the scenarios build.
FRAME_LIMITS: dict[str, tuple[int, int]] = {"pv": (46, 65535), "emulated": (46, 1518), "smartnic": (46, 2048)}
ANNOUNCE_ETHERTYPE = 0x88B5  # IEEE "local experimental": a frame to self, so the switch learns a MAC

#: dom0's pages besides its vifs' staging areas: its start of day, tables and scratch (41 pages
#: today), with room to spare for a few hot-plugged vifs' rings and the backends' own pages.
DOM0_BASE_PAGES = 1024


def vif_staging_pages(rx_queue_bytes: int | None = None) -> int:
    """The dom0 pages netback takes for one connected PV vif: one TX staging page per ring
    slot (grant-copy targets) and the RX queue's pages (``rx_queue_bytes``, a ring's worth at
    least): 512 with Xen's 256-slot rings and the default queue."""
    from pvio.backends.netback import NR_TX, RX_QUEUE_BYTES, rx_stage_pages

    return NR_TX + rx_stage_pages(RX_QUEUE_BYTES if rx_queue_bytes is None else rx_queue_bytes)


def dom0_pages_for(n_vifs: int, rx_queue_bytes: int | None = None) -> int:
    """The dom0 size :func:`boot_network` gives a network of ``n_vifs`` PV vifs: the staging
    areas of every vif (:func:`vif_staging_pages`) on top of :data:`DOM0_BASE_PAGES`, never
    less than the hypervisor's default (so a small network's dom0, and the counts pinned on
    it, are what they were)."""
    from pvio.core.hypervisor import DEFAULT_DOM0_PAGES

    return max(DEFAULT_DOM0_PAGES, DOM0_BASE_PAGES + n_vifs * vif_staging_pages(rx_queue_bytes))


class Dom0TooSmall(ValueError):
    """dom0 cannot hold the staging areas of the PV vifs a network asks for (one line)."""


def check_dom0_fits(hv: Hypervisor, n_vifs: int, rx_queue_bytes: int | None = None) -> None:
    """Raise :class:`Dom0TooSmall` when dom0's free pages cannot hold ``n_vifs`` more PV vifs'
    staging areas: what libxl's free-memory check is to a domain, so that booting 64 guests on
    a too-small dom0 fails at once in one line instead of netback refusing vif after vif."""
    if n_vifs <= 0 or hv.dom0 is None:
        return
    free = getattr(hv.dom0.kernel, "free_pages", None)
    if free is None:  # a dom0 kernel without the Python allocator: netback reports per vif
        return
    each = vif_staging_pages(rx_queue_bytes)
    need = n_vifs * each
    have = int(free())
    if have < need:
        raise Dom0TooSmall(
            f"dom0 has {have} free pages, {n_vifs} PV vifs need {need} ({each} each): "
            f"give dom0_pages >= {hv.dom0.mem.nr_pages - have + need} (or leave it unset)"
        )


@dataclass(frozen=True)
class NicConfig:
    """One guest's NIC: its device model, and for a PV vif its backend (a ``pvio.backends``
    entry-point name) with the backend's options; ``mac`` as 'aa:bb:cc:dd:ee:ff'."""

    model: str = "pv"
    backend: str | None = None
    options: dict[str, Any] = field(default_factory=dict)
    mac: str | None = None
    #: The vif's backend domain when not dom0: a driver domain (a RemoteGuest from
    #: :func:`pvio.remote.backend.start_driver_domain`); the guest's RAM becomes a memfd.
    backend_domain: Any = None


@dataclass
class Network:
    """A booted virtual network: the hypervisor, dom0's switch (and netback), the guests and
    their devices (emulated or smart NICs; vifs are netback's)."""

    hv: Hypervisor
    switch: Switch
    model: str
    guests: list[Any]
    netback: NetBack | None = None
    devices: list[Any] = field(default_factory=list)
    captures: list[Any] = field(default_factory=list)
    edges: list[Any] = field(default_factory=list)  # TAP, VXLAN ports: the switch's way out
    #: Guests' domids -> the driver domain serving their vif (not dom0's netback and switch).
    served_by: dict[int, Any] = field(default_factory=dict)

    def close(self) -> None:
        """End the network's captures (their files are complete after this) and close its
        TAP and VXLAN ports."""
        for capture in self.captures:
            capture.stop()
        self.captures.clear()
        for edge in self.edges:
            edge.close()
        self.edges.clear()

    def vif(self, guest: Any, devid: int = 0) -> BackendVif:
        """The netback side of ``guest``'s vif (the last one that ended, if none is running)."""
        if self.netback is None:
            raise ValueError(f"this network's guests have {self.model} NICs, not vifs")
        key = (guest.domain.domid, devid)
        vif = self.netback.vifs.get(key)
        if vif is None:  # ended (closed, disabled, guest gone): the latest one for that device
            vif = next((v for v in reversed(self.netback.ended) if (v.fe_domid, v.devid) == key), None)
        if vif is None:
            raise KeyError(f"no vif {devid} of dom{key[0]}")
        return vif

    def snapshot(self) -> Snapshot:
        """Every domain's and device's counters, frozen (those of this process: see
        :meth:`gather` for a network with driver domains)."""
        return self.hv.snapshot()

    async def gather(self) -> Snapshot:
        """:meth:`snapshot` with each driver domain's counters, which live in its process:
        its own domain's (as its process counts them, with the hypervisor's ``remote.*``),
        and its devices' (netback's vifs, its switch: ``<name>/switch``)."""
        from pvio.core.counters import Snapshot

        snap = self.hv.snapshot()
        drivers = {id(d): d for d in self.served_by.values()}
        if not drivers:
            return snap
        owners: dict[str, Mapping[str, int]] = {o: snap[o] for o in snap}
        domains = snap.domains()
        kinds = {o: ("domain" if o in domains else "device") for o in snap}
        for driver in drivers.values():
            if not driver.domain.alive:
                continue
            theirs = await driver.call("counters")
            own = f"dom{driver.domain.domid}"
            for owner, counts in theirs.get("domains", {}).items():
                if owner == own:  # the process's count, plus what only the hypervisor counts
                    host = owners.get(own, {})
                    owners[own] = {**{k: v for k, v in host.items() if k not in counts}, **counts}
                    kinds[own] = "domain"
            for owner, counts in theirs.get("devices", {}).items():
                name = f"{driver.name}/{owner}" if owner in owners else owner
                owners[name] = dict(counts)
                kinds[name] = "device"
        return Snapshot(owners, kinds)

    def count(self, owner: str, key: str) -> int:
        """One live counter (0 when absent)."""
        return self.hv.counters[owner][key] if owner in self.hv.counters else 0

    def port_of(self, domid: int) -> Any:
        """The switch port of domain ``domid``'s first NIC (its vif in netback, or its device
        model's port); ValueError if it has none."""
        own = (f"vif{domid}.0", f"emu{domid}.0", f"snic{domid}.0")
        for port in self.switch.ports:
            if port.name in own:
                return port
        raise ValueError(f"dom{domid} has no NIC on the switch")

    def domain_names(self) -> dict[str, str]:
        """Counter owner -> guest name (``dom1`` -> ``a``)."""
        return {f"dom{d.domid}": d.name for d in self.hv.domains.values()}

    async def announce(self, guests: Sequence[Any] | None = None, timeout_s: float = 10.0) -> None:
        """Teach the switch each guest's MAC: every connected guest NIC sends one frame to its
        own MAC, which the switch learns from and drops as a hairpin (``drops.same_port``),
        so from then on unicast is forwarded, never flooded.  Guests that do this themselves
        (``announces_itself``) are only waited for."""
        guests = self.guests if guests is None else guests
        up = [g for g in guests if getattr(g, "nic", None) is not None and getattr(g.nic, "connected", True)]
        with trio.fail_after(timeout_s):
            for g in up:
                if not getattr(g, "announces_itself", False):
                    mac = g.nic.mac
                    await g.nic.send(mac + mac + struct.pack("!H", ANNOUNCE_ETHERTYPE) + bytes(46))
            served = {g.domain.domid for g in up if g.domain.domid in self.served_by}
            macs = {g.nic.mac for g in up if g.domain.domid not in served}
            while not macs <= set(self.switch.mac_table):
                await trio.sleep(0.0005)
            for driver in {id(d): d for d in self.served_by.values()}.values():  # their switches
                want = {g.nic.mac.hex() for g in up if self.served_by.get(g.domain.domid) is driver}
                while not want <= set(await driver.call("macs")):
                    await trio.sleep(0.005)


async def start_network(
    hv: Hypervisor,
    guests: Sequence[Any],
    *,
    model: str = "pv",
    backend: str | None = None,
    backend_options: dict[str, Any] | None = None,
    rx_queue_max: int | None = None,
    rx_queue_bytes: int | None = None,
    before_guests: Callable[[Hypervisor], None] | None = None,
    wait_ready: Sequence[Any] | None = None,
    announce: bool = True,
    settle_s: float = 0.0,
    timeout_s: float = 10.0,
    nics: Sequence[NicConfig | None] | None = None,
    pcap: str | None = None,
    check_dom0: bool = True,
) -> Network:
    """Bring up dom0's switch (and netback for PV vifs) on a running hypervisor, then create
    and boot one domain per guest kernel, each with one NIC of ``model``.

    ``nics[i]`` (a :class:`NicConfig`) overrides guest ``i``'s NIC: its own model, its own
    backend (PV: this vif's backend, by entry-point name, and options) and MAC.  ``pcap``
    mirrors every frame the switch sees, from the first one, to that file (pcapng when the
    name ends in ``.pcapng``); :meth:`Network.close` (or leaving :func:`boot_network`) ends it.

    Returns once every guest in ``wait_ready`` (default: every guest with a ``ready`` event)
    is ready, the switch knows each guest's MAC (``announce``) and the system is quiet:
    netback answers the handshake's watch events for a while, and what a caller measures
    from here on should be its own traffic.  ``settle_s`` also lets timers of that length
    (the smart NIC's moderation) run out first.  ``backend``/``backend_options``/
    ``rx_queue_max``/``rx_queue_bytes`` configure netback (each vif's RX queue bound in frames
    and in bytes, the latter its RX staging pages); ``before_guests(hv)`` runs once dom0 is up and before
    any guest exists.

    ``check_dom0``: refuse at once (:class:`Dom0TooSmall`, one line) a network whose PV vifs'
    staging areas do not fit in dom0's free pages; False leaves it to netback, which refuses
    each vif that does not fit with its reason and serves the others.
    """
    from pvio.backends.emulated_nic import add_emulated_nic
    from pvio.backends.netback import RX_QUEUE_BYTES, RX_QUEUE_MAX, NetBack
    from pvio.backends.smartnic import add_smartnic
    from pvio.backends.switch import Switch

    configs = [NicConfig(model) if c is None else c for c in (nics or [None] * len(guests))]
    if len(configs) != len(guests):
        raise ValueError(f"{len(guests)} guests but {len(configs)} NIC configurations")
    for cfg in configs:
        if cfg.model not in MODELS:
            raise ValueError(f"unknown device model {cfg.model!r}: choose one of {', '.join(MODELS)}")
        if cfg.backend is not None and cfg.model != "pv":
            raise ValueError(
                f"a backend serves PV vifs; {cfg.model} NICs have none (backend={cfg.backend!r})"
            )
    if hv.dom0 is None:
        raise RuntimeError("the hypervisor has no dom0 to run the switch and the backends")
    for cfg in configs:
        if cfg.backend_domain is not None and (cfg.model != "pv" or cfg.backend is not None):
            raise ValueError(
                "a driver domain serves PV vifs, with its own backend (give it to the driver domain)"
            )
    if check_dom0:
        n_dom0 = sum(1 for cfg in configs if cfg.model == "pv" and cfg.backend_domain is None)
        check_dom0_fits(hv, n_dom0, rx_queue_bytes)
    switch = Switch(hv.counters)
    net = Network(hv, switch, model, [])
    if pcap is not None:
        from pvio.backends.capture import Capture, format_for

        net.captures.append(Capture(switch, pcap, counters=hv.counters, format=format_for(pcap)).start())
    if any(cfg.model == "pv" and cfg.backend_domain is None for cfg in configs):
        dom0 = hv.dom0.kernel
        net.netback = NetBack(
            dom0,  # type: ignore[arg-type]
            switch,
            backend=backend,
            backend_options=backend_options,
            rx_queue_max=RX_QUEUE_MAX if rx_queue_max is None else rx_queue_max,
            rx_queue_bytes=RX_QUEUE_BYTES if rx_queue_bytes is None else rx_queue_bytes,
        )
        dom0.spawn(net.netback.run, name="netback")  # type: ignore[attr-defined]
    elif backend is not None or backend_options is not None:
        raise ValueError(f"a backend serves PV vifs; {model} NICs have none (backend={backend!r})")
    if before_guests is not None:
        before_guests(hv)
    for guest, cfg in zip(guests, configs, strict=True):
        if cfg.backend_domain is not None:
            guest.shared_memory = True  # the driver domain's process maps its pages
        dom = hv.create_domain(guest, name=guest.name)
        mac = None if cfg.mac is None else parse_mac(cfg.mac)
        if cfg.backend_domain is not None:
            add_vif(hv, dom, mac=cfg.mac, backend=cfg.backend_domain.domain)
            net.served_by[dom.domid] = cfg.backend_domain
        elif cfg.model == "pv":
            assert net.netback is not None
            if cfg.backend is not None:
                net.netback.set_vif_backend(dom.domid, 0, cfg.backend, cfg.options)
            add_vif(hv, dom, mac=cfg.mac)
        elif cfg.model == "emulated":
            net.devices.append(add_emulated_nic(hv, dom, switch, mac=mac))
        else:
            net.devices.append(add_smartnic(hv, dom, switch, mac=mac))
        await hv.start(dom)
        net.guests.append(guest)
    ready = [g for g in guests if isinstance(getattr(g, "ready", None), trio.Event)]
    ready = ready if wait_ready is None else list(wait_ready)
    try:
        with trio.fail_after(timeout_s):
            for guest in ready:
                await guest.ready.wait()
    except trio.TooSlowError:
        for guest in ready:  # a guest that died on the way says why; otherwise it is slow
            gdom: Any = getattr(guest, "domain", None)
            if not guest.ready.is_set() and gdom is not None and not gdom.alive:
                raise RuntimeError(
                    f"guest {guest.name} stopped while connecting: {gdom.crash_reason}"
                ) from None
        late = [g.name for g in ready if not g.ready.is_set()]
        raise trio.TooSlowError(f"guests {late} were not ready within {timeout_s} s") from None
    if announce:
        await net.announce(ready, timeout_s)
    await trio.testing.wait_all_tasks_blocked()
    if settle_s:
        await trio.sleep(settle_s)
        await trio.testing.wait_all_tasks_blocked()
    return net


@asynccontextmanager
async def boot_network(
    guests: Sequence[Any], *, dom0_pages: int | None = None, **options: Any
) -> AsyncIterator[Network]:
    """``async with boot_network([a, b]) as net:`` — a hypervisor with dom0 and a network of
    ``guests`` (:func:`start_network`'s options), torn down on exit.

    ``dom0_pages`` sizes dom0; None sizes it for the network's PV vifs (:func:`dom0_pages_for`).
    """
    from pvio.core.hypervisor import Hypervisor

    if dom0_pages is None:
        nics = options.get("nics") or [None] * len(guests)
        model = options.get("model", "pv")
        n_pv = sum(1 for c in nics if (model if c is None else c.model) == "pv")
        dom0_pages = dom0_pages_for(n_pv, options.get("rx_queue_bytes"))
    async with Hypervisor(dom0_pages=dom0_pages) as hv:
        net = await start_network(hv, guests, **options)
        try:
            yield net
        finally:
            net.close()
