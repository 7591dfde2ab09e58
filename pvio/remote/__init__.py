"""Guests in their own OS processes: guest RAM in a memfd, events through eventfds, a socket handshake.

A stream whose sender runs in another process uses both cores: the guest's kernel and its
drivers (a PyGuest with netfront, unchanged) run on the child's trio loop while netback,
the switch and the other guests run in the hypervisor's.  The pieces, vhost-user style:

- :mod:`pvio.remote.wire`: the socket protocol (versioned HELLO/WELCOME handshake with the
  memfds and eventfds passed by SCM_RIGHTS, hypercalls as messages), the doorbell page;
- :mod:`pvio.remote.host`: :class:`RemoteGuest`, the guest kernel the hypervisor runs for a
  domain whose real kernel is in the child; the child's death or misbehaviour is that
  domain's crash, nobody else's;
- :mod:`pvio.remote.child`: ``python -m pvio.remote.child FD``, the child's runtime;
- :mod:`pvio.remote.guests`: :class:`StreamGuest`, a NIC guest the host drives by calls.

``docs/architecture.md`` ("Processes") has the design and its trade-offs.
"""

from pvio.remote.host import RemoteGuest, RemoteGuestError, RemoteNic

__all__ = ["RemoteGuest", "RemoteGuestError", "RemoteNic"]
