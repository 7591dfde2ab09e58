"""pvio: a Xen-style split-driver paravirtual I/O framework with a virtual NIC.

The front door: ``import pvio`` gives the hypervisor, guest kernels and their services.

- :class:`Hypervisor` — ``async with pvio.Hypervisor() as hv:`` hosts dom0 and guests;
- :class:`PyGuest` — a guest kernel in Python (subclass it, override ``main``);
- :class:`Domain` — one guest's memory, ports, grants and counters;
- :mod:`pvio.abi` — Xen's numbers and layouts; :mod:`pvio.core.counters` — the counter schema;
- :class:`XenbusClient`, :class:`XenbusState` — the guest's xenstore client and device states;
- :class:`Backend`, :class:`BackendContext`, :func:`load_backend`, :func:`available_backends` —
  the custom-backend API (entry-point group ``pvio.backends``);
- :func:`boot_network`, :func:`start_network`, :class:`Network`, :class:`NicConfig` — the
  toolstack: a hypervisor with dom0, the switch and netback, and guests connected on it;
  :func:`add_vif` — one vif's xenstore set-up;
- :func:`format_mac`, :func:`parse_mac` — MAC text as xenstore and scapy take it;
- :class:`Tracer` — the event timeline (Perfetto trace JSON) of every counted event.

The rooms below the front door (``pvio.core``, ``pvio.xenstore``, ``pvio.abi``, the drivers in
``pvio.frontends`` and ``pvio.backends``, ``pvio.cpu``, ``pvio.harness``) are importable for tests
and tools; ``docs/architecture.md`` says what each holds.
"""

from pvio.abi.vif import format_mac, parse_mac
from pvio.backend_api import Backend, BackendContext, available_backends, load_backend
from pvio.core.counters import Counters, Snapshot
from pvio.core.domain import Domain
from pvio.core.hypervisor import Hypervisor
from pvio.core.memory import GuestFault, GuestMemory
from pvio.core.trace import Tracer
from pvio.guest import GrantStatusError, PyGuest, XenError
from pvio.toolstack import Network, NicConfig, add_vif, boot_network, start_network
from pvio.xenstore.client import XenbusClient
from pvio.xenstore.store import XenstoreError
from pvio.xenstore.wire import XenbusState

__version__ = "0.1.0"

__all__ = [
    "Backend",
    "BackendContext",
    "Counters",
    "Domain",
    "GrantStatusError",
    "GuestFault",
    "GuestMemory",
    "Hypervisor",
    "Network",
    "NicConfig",
    "PyGuest",
    "Snapshot",
    "Tracer",
    "XenError",
    "XenbusClient",
    "XenbusState",
    "XenstoreError",
    "add_vif",
    "available_backends",
    "boot_network",
    "format_mac",
    "load_backend",
    "parse_mac",
    "start_network",
]
