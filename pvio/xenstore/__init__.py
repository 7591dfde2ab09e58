"""Xenstore: the tree, xenstored's wire server and the guest's client, one module each.

- :mod:`pvio.xenstore.store` — the tree with Xen's permission model, watches, transactions
  and quotas (:class:`Store`, :class:`XenstoreError`);
- :mod:`pvio.xenstore.wire` — the xs_wire protocol both ends share: message types, the
  16-byte header, the ring page and its byte rings (:class:`XsType`, :class:`XenbusState`);
- :mod:`pvio.xenstore.server` — xenstored's request handling (:class:`XsConnection`) and its
  ring transport, one guest's ring page (:class:`RingConnection`);
- :mod:`pvio.xenstore.unix_socket` — the same handling on a Unix socket, for dom0 tools
  such as ``xenstore-ls`` (:class:`XenstoreSocketServer`);
- :mod:`pvio.xenstore.client` — the guest's end (:class:`XenbusClient`, :func:`loopback`).
"""

from pvio.xenstore.client import Transaction, Watch, XenbusClient, loopback
from pvio.xenstore.server import RingConnection
from pvio.xenstore.store import XSD_ERRORS, Perm, Store, StoreConnection, XenstoreError, is_privileged
from pvio.xenstore.wire import XenbusState, XsHeader, XsType, encode_message

__all__ = [
    "XSD_ERRORS",
    "Perm",
    "RingConnection",
    "Store",
    "StoreConnection",
    "Transaction",
    "Watch",
    "XenbusClient",
    "XenbusState",
    "XenstoreError",
    "XsHeader",
    "XsType",
    "encode_message",
    "is_privileged",
    "loopback",
]
