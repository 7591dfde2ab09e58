"""pvio: a Xen-style split-driver paravirtual I/O framework with a virtual NIC.

The front door: ``import pvio`` gives the hypervisor, guest kernels and their services.

- :class:`Hypervisor` — ``async with pvio.Hypervisor() as hv:`` hosts dom0 and guests;
- :class:`PyGuest` — a guest kernel in Python (subclass it, override ``main``);
- :class:`Domain` — one guest's memory, ports, grants and counters;
- :mod:`pvio.abi` — Xen's numbers and layouts; :mod:`pvio.counters` — the counter schema;
- :class:`XenbusClient`, :class:`XenbusState` — the guest's xenstore client and device states;
- :class:`Backend`, :class:`BackendContext`, :func:`load_backend`, :func:`available_backends` —
  the custom-backend API (entry-point group ``pvio.backends``);
- :func:`add_vif` — the toolstack's vif set-up.

Internals (``pvio.evtchn``, ``pvio.grant_table``, ``pvio.hypercall``, ``pvio.xenstore``,
``pvio.xs_wire``) are importable for tests and tools but are not the stable API.
"""

from pvio.backend_api import Backend, BackendContext, available_backends, load_backend
from pvio.counters import Counters, Snapshot
from pvio.domain import Domain
from pvio.guest import GrantStatusError, PyGuest, XenError
from pvio.hypervisor import Hypervisor
from pvio.memory import GuestFault, GuestMemory
from pvio.toolstack import add_vif
from pvio.xenstore import XenstoreError
from pvio.xs_wire import XenbusClient, XenbusState

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
