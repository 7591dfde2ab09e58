"""pvio: a Xen-style split-driver paravirtual I/O framework with a virtual NIC.

The front door: ``import pvio`` gives the hypervisor, guest kernels and their services.

- :class:`Hypervisor` — ``async with pvio.Hypervisor() as hv:`` hosts dom0 and guests;
- :class:`PyGuest` — a guest kernel in Python (subclass it, override ``main``);
- :class:`Domain` — one guest's memory, ports, grants and counters;
- :mod:`pvio.abi` — Xen's numbers and layouts; :mod:`pvio.core.counters` — the counter schema;
- :class:`XenbusClient`, :class:`XenbusState` — the guest's xenstore client and device states;
- :class:`Backend`, :class:`BackendContext`, :func:`load_backend`, :func:`available_backends` —
  the custom-backend API (entry-point group ``pvio.backends``);
- :func:`add_vif` — the toolstack's vif set-up.

Internals (``pvio.core.evtchn``, ``pvio.core.grant_table``, ``pvio.core.hypercall``, ``pvio.xenstore``,
``pvio.xenstore``) are importable for tests and tools but are not the stable API.
"""

from pvio.backend_api import Backend, BackendContext, available_backends, load_backend
from pvio.core.counters import Counters, Snapshot
from pvio.core.domain import Domain
from pvio.core.hypervisor import Hypervisor
from pvio.core.memory import GuestFault, GuestMemory
from pvio.guest import GrantStatusError, PyGuest, XenError
from pvio.toolstack import add_vif
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
    "PyGuest",
    "Snapshot",
    "XenError",
    "XenbusClient",
    "XenbusState",
    "XenstoreError",
    "add_vif",
    "available_backends",
    "load_backend",
]
