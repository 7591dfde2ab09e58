"""pvio's xenstore: the tree, Xen's permissions, transactions, watches and quotas, as pure logic.

Design rationale
----------------
The store is the part of xenstored that does not care how requests arrive: no I/O, no trio, no
ring pages.  ``xs_wire`` puts it on each domain's xenstore ring; the hypervisor (as toolstack) and
tests call it directly.  Keeping it pure makes every rule here testable with plain asserts, and lets
the wire layer stay a thin parser/encoder.

* **Clients are connections.**  ``Store.connect(domid, on_watch_event)`` returns a
  :class:`StoreConnection`; watches and transactions belong to a connection (as in xenstored), quotas
  and counters to its domain.  A domain may hold several connections (dom0's toolstack and backends).

* **One implementation of each operation, two views.**  The tree is a flat ``path -> node`` dict.
  Every operation is written once against a small view interface (get, put, record a change).  The
  live view writes through and stamps a fresh generation on every node it touches; a transaction's
  view writes to a private overlay and remembers the generation of every live node it looked at.
  Commit is then xenstored's optimistic check: if any of those nodes' generations moved, EAGAIN and
  nothing is applied.  Like xenstored, creating a child rewrites its parent, so two transactions that
  add siblings conflict.

* **Permissions are Xen's**: the first entry names the owner and the default for everyone else, the
  owner and dom0 (the only privileged domain here) have full access, only dom0 changes an owner, a
  node created by an unprivileged domain inherits its parent's perms with the creator as owner (a
  node created by dom0 inherits them unchanged, as in xenstored).  A missing node under a parent the
  caller cannot read reports EACCES, not ENOENT, so existence does not leak.

* **Watches** fire once on registration, then for every change at or below their path; removing a
  subtree also fires each watch registered exactly on a removed descendant.  A watch event is sent
  only to domains that may read the changed node (XSA-115); for a permission change, reading under
  the old or the new perms suffices.  A transaction's changes fire at commit, once per (node, kind).
  Relative watches get relative paths.  ``@introduceDomain`` / ``@releaseDomain`` are special nodes
  with perms of their own (default: dom0 only).

* **Reentrancy.**  A watch callback may call straight back into the store (over the loopback wiring
  a guest's reply can trigger its next request synchronously).  Events are therefore computed after
  an operation is complete and delivered from one FIFO outbox by the outermost caller, so nested
  operations see a consistent tree and every connection sees events in the order changes happened.

* **Quotas** per unprivileged domain: nodes owned (ENOSPC), watches (E2BIG), open transactions
  (ENOSPC), distinct nodes one transaction remembers (ENOSPC, xenstored's
  ``quota-transaction-nodes``; XSA-326/421: reads of missing paths count too, and repeated
  writes of one node are one entry and one change).  The value-size limit (E2BIG) applies to
  every domain, dom0 included, because a larger value could not be read back over the wire.

* **Release** (domain death) closes the domain's connections, removes ``/local/domain/<id>`` and
  every other node the dead domid owns (XSA-419: handed to dom0, which has no quota, such nodes
  would let cooperating guests that reboot grow the store without bound), and strips it from the
  remaining permission lists (XSA-322), so a new domain reusing the domid inherits nothing.

Open question: xenstored's watch ``depth`` argument is accepted on the wire but not implemented.
"""

from __future__ import annotations

import itertools
import logging
import string
from collections import Counter, deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

logger = logging.getLogger("pvio.xenstore")

#: Errno names a reply may carry: xs_wire.h's ``xsd_errors`` list.
XSD_ERRORS: tuple[str, ...] = (
    "EINVAL",
    "EACCES",
    "EEXIST",
    "EISDIR",
    "ENOENT",
    "ENOMEM",
    "ENOSPC",
    "EIO",
    "ENOTEMPTY",
    "ENOSYS",
    "EROFS",
    "EBUSY",
    "EAGAIN",
    "EISCONN",
    "E2BIG",
    "EPERM",
)

XENSTORE_ABS_PATH_MAX = 3072
XENSTORE_REL_PATH_MAX = 2048
DOMID_FIRST_RESERVED = 0x7FF0
LOCAL_DOMAIN = "/local/domain"
INTRODUCE_DOMAIN = "@introduceDomain"
RELEASE_DOMAIN = "@releaseDomain"
SPECIAL_PATHS = (INTRODUCE_DOMAIN, RELEASE_DOMAIN)

# Access bits, with the client library's values (xs_lib.h: XS_PERM_*).
PERM_NONE = 0
PERM_READ = 1
PERM_WRITE = 2
PERM_OWNER = 8
_FULL_ACCESS = PERM_READ | PERM_WRITE | PERM_OWNER
_KIND_BITS = {"n": PERM_NONE, "r": PERM_READ, "w": PERM_WRITE, "b": PERM_READ | PERM_WRITE}

_NODE_CHARS = frozenset(string.ascii_letters + string.digits + "-/_@")
_MASK_DOMID = 0xFFFF


class XenstoreError(Exception):
    """A xenstore operation failed with one of Xen's errno names (``errno``) on ``path``."""

    def __init__(self, errno: str, path: str = "", detail: str = "") -> None:
        if errno not in XSD_ERRORS:
            raise ValueError(f"{errno!r} is not a xenstore errno name (xsd_errors: {', '.join(XSD_ERRORS)})")
        self.errno = errno
        self.path = path
        self.detail = detail
        message = errno
        if path:
            message += f" on {path!r}"
        if detail:
            message += f": {detail}"
        super().__init__(message)


@dataclass(frozen=True, slots=True)
class Perm:
    """One permission entry: ``kind`` is n, r, w or b; ``str(perm)`` is the wire form, e.g. ``"r1"``."""

    kind: str
    domid: int

    def __str__(self) -> str:
        return f"{self.kind}{self.domid}"

    @property
    def bits(self) -> int:
        return _KIND_BITS[self.kind]

    @classmethod
    def parse(cls, text: str) -> Perm:
        """Parse ``"<n|r|w|b><decimal domid>"``; anything else is EINVAL."""
        if len(text) < 2 or text[0] not in _KIND_BITS or not text[1:].isascii() or not text[1:].isdigit():
            raise XenstoreError("EINVAL", detail=f"bad permission {text!r}")
        domid = int(text[1:])
        if domid > _MASK_DOMID:
            raise XenstoreError("EINVAL", detail=f"permission {text!r}: domid out of range")
        return cls(text[0], domid)


def parse_perms(perms: Sequence[str | Perm]) -> tuple[Perm, ...]:
    """A perms list from wire strings (or Perm objects); it must not be empty."""
    if isinstance(perms, str):
        raise XenstoreError("EINVAL", detail="perms must be a list of entries, not one string")
    if not perms:
        raise XenstoreError("EINVAL", detail="a perms list needs at least the owner entry")
    return tuple(p if isinstance(p, Perm) else Perm.parse(p) for p in perms)


@dataclass(frozen=True)
class Quota:
    """Per-domain limits; xenstored's defaults except the 4096-byte value size the brief asks for.

    ``transaction_nodes`` is xenstored's ``quota-transaction-nodes``: how many distinct nodes one
    transaction may look at or write (a read of a missing path counts: the transaction must
    remember it to detect the node appearing).  A step that would exceed it is ENOSPC and the
    transaction can then only fail, so its memory is bounded by this many nodes of at most
    ``value_size`` bytes each.
    """

    nodes: int = 1000
    watches: int = 128
    transactions: int = 10
    value_size: int = 4096
    transaction_nodes: int = 1024


def is_privileged(domid: int) -> bool:
    """Only dom0 is privileged (xenstored's ``domain_is_unprivileged`` is false only for it here)."""
    return domid == 0


def domain_path(domid: int) -> str:
    """``/local/domain/<domid>``: the home that relative paths resolve against."""
    return f"{LOCAL_DOMAIN}/{domid}"


def canonical_path(domid: int, path: str) -> str:
    """Resolve ``path`` for ``domid`` and validate it as Xen does; EINVAL on any violation.

    Absolute paths are at most 3072 bytes; relative ones at most 2048 and resolve against
    ``/local/domain/<domid>``; below any ``/local/domain/<n>/`` the remainder is at most 2048 too.
    Allowed characters are ASCII letters, digits and ``-/_@``; no empty components, no trailing ``/``.
    """
    if not isinstance(path, str):
        raise XenstoreError("EINVAL", detail=f"path must be str, not {type(path).__name__}")
    if path.startswith("/"):
        if len(path) > XENSTORE_ABS_PATH_MAX:
            raise XenstoreError(
                "EINVAL", path[:64] + "...", f"absolute path longer than {XENSTORE_ABS_PATH_MAX}"
            )
        absolute = path
    else:
        if not path:
            raise XenstoreError("EINVAL", detail="empty path")
        if len(path) > XENSTORE_REL_PATH_MAX:
            raise XenstoreError(
                "EINVAL", path[:64] + "...", f"relative path longer than {XENSTORE_REL_PATH_MAX}"
            )
        absolute = f"{domain_path(domid)}/{path}"
    if not _NODE_CHARS.issuperset(absolute):
        raise XenstoreError("EINVAL", path, "characters outside [A-Za-z0-9-/_@]")
    if absolute != "/" and (absolute.endswith("/") or "//" in absolute):
        raise XenstoreError("EINVAL", path, "empty path component")
    home = _home_domid(absolute)
    if home is not None and len(absolute) - len(domain_path(home)) - 1 > XENSTORE_REL_PATH_MAX:
        raise XenstoreError(
            "EINVAL", path[:64] + "...", f"longer than {XENSTORE_REL_PATH_MAX} below the home"
        )
    return absolute


def _short(path: str) -> str:
    return path if len(path) <= 64 else path[:61] + "..."


def _home_domid(absolute: str) -> int | None:
    prefix = LOCAL_DOMAIN + "/"
    if not absolute.startswith(prefix):
        return None
    head, sep, _ = absolute[len(prefix) :].partition("/")
    if not sep or not head.isdigit():
        return None
    return int(head)


def _parent(path: str) -> str:
    head = path.rpartition("/")[0]
    return head or "/"


def _basename(path: str) -> str:
    return path.rpartition("/")[2]


def _at_or_below(path: str, top: str) -> bool:
    return top == "/" or path == top or path.startswith(top + "/")


def _access(domid: int, perms: tuple[Perm, ...]) -> int:
    """The access bits ``domid`` has under ``perms`` (first matching explicit entry, else the default)."""
    if is_privileged(domid) or perms[0].domid == domid:
        return _FULL_ACCESS
    for perm in perms[1:]:
        if perm.domid == domid:
            return perm.bits
    return perms[0].bits


def _inherit(parent_perms: tuple[Perm, ...], creator: int) -> tuple[Perm, ...]:
    if is_privileged(creator):
        return parent_perms
    return (Perm(parent_perms[0].kind, creator), *parent_perms[1:])


@dataclass(frozen=True, slots=True)
class _Node:
    value: bytes
    perms: tuple[Perm, ...]
    children: tuple[str, ...] = ()
    generation: int = 0


@dataclass(frozen=True, slots=True)
class _Change:
    """A change to announce: watches at or above ``path`` fire (exactly on it if ``exact``), for
    domains that may read the node under any of ``perms``."""

    path: str
    exact: bool
    perms: tuple[tuple[Perm, ...], ...]


class _View(Protocol):
    def get(self, path: str) -> _Node | None: ...

    def put(self, path: str, node: _Node | None) -> None: ...

    def owned(self, domid: int) -> int: ...

    def changed(self, change: _Change) -> None: ...


@dataclass(eq=False)
class _Transaction:
    tx_id: int
    node_limit: int | None = None  # distinct nodes it may remember (None: unlimited, for dom0)
    overlay: dict[str, _Node | None] = field(default_factory=dict)
    seen: dict[str, int | None] = field(default_factory=dict)
    changes: dict[_Change, None] = field(default_factory=dict)  # ordered, each change once
    owned_delta: Counter[int] = field(default_factory=Counter)
    failed: str | None = None  # why a step was refused: the commit then fails with ENOSPC


@dataclass(frozen=True, slots=True)
class _Watch:
    path: str  # as registered: what the initial event reports
    abs_path: str
    token: str
    relative_to: str | None  # the home prefix (with "/") stripped from event paths of a relative watch

    def event_path(self, changed: str) -> str:
        if self.relative_to is not None and changed.startswith(self.relative_to):
            return changed[len(self.relative_to) :]
        return changed


@dataclass
class _DomainCounters:
    requests: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    watch_events: int = 0
    watch_events_dropped: int = 0
    watch_events_coalesced: int = 0
    watch_events_shed: int = 0
    disconnects: Counter[str] = field(default_factory=Counter)


class _LiveView:
    def __init__(self, store: Store) -> None:
        self._store = store
        self.changes: list[_Change] = []

    def get(self, path: str) -> _Node | None:
        return self._store._nodes.get(path)

    def put(self, path: str, node: _Node | None) -> None:
        self._store._put_live(path, node)

    def owned(self, domid: int) -> int:
        return self._store._owned[domid]

    def changed(self, change: _Change) -> None:
        self.changes.append(change)


class _TxView:
    def __init__(self, store: Store, tx: _Transaction) -> None:
        self._store = store
        self._tx = tx

    def get(self, path: str) -> _Node | None:
        tx = self._tx
        if path in tx.overlay:
            return tx.overlay[path]
        node = self._store._nodes.get(path)
        if path not in tx.seen:
            if tx.node_limit is not None and len(tx.seen) >= tx.node_limit:
                tx.failed = f"transaction {tx.tx_id} would remember more than {tx.node_limit} nodes"
                raise XenstoreError("ENOSPC", _short(path), tx.failed)
            tx.seen[path] = None if node is None else node.generation
        return node

    def put(self, path: str, node: _Node | None) -> None:
        old = self.get(path)
        if old is not None:
            self._tx.owned_delta[old.perms[0].domid] -= 1
        if node is not None:
            self._tx.owned_delta[node.perms[0].domid] += 1
        self._tx.overlay[path] = node

    def owned(self, domid: int) -> int:
        return self._store._owned[domid] + self._tx.owned_delta[domid]

    def changed(self, change: _Change) -> None:
        self._tx.changes[change] = None


WatchCallback = Callable[[str, str], None]


class StoreConnection:
    """One client of the store (a guest's ring, a dom0 tool): owns its watches and transactions.

    Every operation takes paths as str (relative ones resolve against the domain's home) and an
    optional transaction id from :meth:`transaction_start` (0 = none), and raises
    :class:`XenstoreError`.  Watch events go to ``on_watch_event(path, token)``, or, without a
    callback, collect in :attr:`events`.
    """

    def __init__(self, store: Store, domid: int, on_watch_event: WatchCallback | None) -> None:
        self.domid = domid
        self.events: list[tuple[str, str]] = []
        self.closed = False
        self._store = store
        self._on_watch_event = on_watch_event
        self._watches: dict[tuple[str, str], _Watch] = {}
        self._transactions: dict[int, _Transaction] = {}

    # -- reads ---------------------------------------------------------------------------------

    def read(self, path: str, tx: int = 0) -> bytes:
        with self._op("READ", path, tx) as (view, absolute):
            return self._store._lookup(view, self.domid, absolute, PERM_READ).value

    def directory(self, path: str, tx: int = 0) -> list[str]:
        with self._op("DIRECTORY", path, tx) as (view, absolute):
            return list(self._store._lookup(view, self.domid, absolute, PERM_READ).children)

    def directory_part(self, path: str, tx: int = 0) -> tuple[int, list[str]]:
        """The node's generation count and its children (DIRECTORY_PART's data, before slicing)."""
        with self._op("DIRECTORY_PART", path, tx) as (view, absolute):
            node = self._store._lookup(view, self.domid, absolute, PERM_READ)
            return node.generation, list(node.children)

    def get_perms(self, path: str, tx: int = 0) -> list[str]:
        if path in SPECIAL_PATHS:
            with self._op("GET_PERMS"):
                return self._store._special_perms_for(self.domid, path, PERM_READ)
        with self._op("GET_PERMS", path, tx) as (view, absolute):
            return [str(p) for p in self._store._lookup(view, self.domid, absolute, PERM_READ).perms]

    # -- writes --------------------------------------------------------------------------------

    def write(self, path: str, value: bytes | str, tx: int = 0) -> None:
        data = value.encode() if isinstance(value, str) else bytes(value)
        with self._op("WRITE", path, tx) as (view, absolute):
            self._store._write(view, self.domid, absolute, data)

    def mkdir(self, path: str, tx: int = 0) -> None:
        with self._op("MKDIR", path, tx) as (view, absolute):
            self._store._mkdir(view, self.domid, absolute)

    def rm(self, path: str, tx: int = 0) -> None:
        with self._op("RM", path, tx) as (view, absolute):
            self._store._rm(view, self.domid, absolute)

    def set_perms(self, path: str, perms: Sequence[str | Perm], tx: int = 0) -> None:
        if path in SPECIAL_PATHS:
            with self._op("SET_PERMS"):
                self._store._set_special_perms(self.domid, path, parse_perms(perms))
            return
        with self._op("SET_PERMS", path, tx) as (view, absolute):
            self._store._set_perms(view, self.domid, absolute, parse_perms(perms))

    # -- transactions --------------------------------------------------------------------------

    def transaction_start(self) -> int:
        with self._op("TRANSACTION_START"):
            store = self._store
            if not is_privileged(self.domid) and (
                store._tx_count[self.domid] >= store.quota_for(self.domid).transactions
            ):
                raise XenstoreError("ENOSPC", detail=f"dom{self.domid} has too many open transactions")
            tx_id = store._new_tx_id()
            limit = None if is_privileged(self.domid) else store.quota_for(self.domid).transaction_nodes
            self._transactions[tx_id] = _Transaction(tx_id, limit)
            store._tx_count[self.domid] += 1
            return tx_id

    def transaction_end(self, tx: int, commit: bool = True) -> None:
        """Commit (or abort) ``tx``; EAGAIN if a node it read or wrote has changed since."""
        with self._op("TRANSACTION_END"):
            transaction = self._transactions.pop(tx, None)
            if transaction is None:
                raise XenstoreError("ENOENT", detail=f"no transaction {tx} on this connection")
            self._store._tx_count[self.domid] -= 1
            if commit and transaction.failed is not None:
                raise XenstoreError("ENOSPC", detail=transaction.failed)
            if commit:
                self._store._commit(self.domid, transaction)

    # -- watches -------------------------------------------------------------------------------

    def watch(self, path: str, token: str) -> None:
        """Register a watch; it fires once now, then on every change at or below ``path``."""
        with self._op("WATCH"):
            store = self._store
            watch = store._make_watch(self.domid, path, token)
            key = (watch.abs_path, token)
            if key in self._watches:
                raise XenstoreError("EEXIST", path, f"already watched with token {token!r}")
            if (
                not is_privileged(self.domid)
                and store._watch_count[self.domid] >= store.quota_for(self.domid).watches
            ):
                raise XenstoreError("E2BIG", path, f"dom{self.domid} has too many watches")
            self._watches[key] = watch
            store._watch_count[self.domid] += 1
            store._outbox.append((self, watch.path, token, self.domid))
        store._deliver()

    def unwatch(self, path: str, token: str) -> None:
        with self._op("UNWATCH"):
            watch = self._store._make_watch(self.domid, path, token)
            if self._watches.pop((watch.abs_path, token), None) is None:
                raise XenstoreError("ENOENT", path, f"no watch with token {token!r}")
            self._store._watch_count[self.domid] -= 1

    def reset_watches(self) -> None:
        with self._op("RESET_WATCHES"):
            self._drop_watches()

    # -- misc ----------------------------------------------------------------------------------

    def get_domain_path(self, domid: int) -> str:
        with self._op("GET_DOMAIN_PATH"):
            if not 0 <= domid < DOMID_FIRST_RESERVED:
                raise XenstoreError("EINVAL", detail=f"domid {domid} out of range")
            return domain_path(domid)

    def is_domain_introduced(self, domid: int) -> bool:
        with self._op("IS_DOMAIN_INTRODUCED"):
            if not is_privileged(self.domid):
                raise XenstoreError("EACCES", detail="IS_DOMAIN_INTRODUCED is for dom0")
            return self._store.is_introduced(domid)

    def take_events(self) -> list[tuple[str, str]]:
        """Return and clear the events collected (when the connection has no callback)."""
        events, self.events = self.events, []
        return events

    def reject(self, type_name: str, errno: str, path: str = "", detail: str = "") -> XenstoreError:
        """Count a request refused before reaching the store (bad payload, unsupported type); return
        the error to raise or encode."""
        counters = self._store._stats(self.domid)
        counters.requests[type_name] += 1
        counters.errors[errno] += 1
        return XenstoreError(errno, path, detail)

    def count_error(self, errno: str) -> None:
        """Count an error found after a counted request succeeded in the store (e.g. reply too big)."""
        self._store._stats(self.domid).errors[errno] += 1

    def close(self) -> None:
        """Drop this connection's watches and transactions; further operations fail with EIO."""
        if self.closed:
            return
        self._drop_watches()
        self._store._tx_count[self.domid] -= len(self._transactions)
        self._transactions.clear()
        self.closed = True
        self._store._conns.remove(self)

    # -- internals -----------------------------------------------------------------------------

    def _drop_watches(self) -> None:
        self._store._watch_count[self.domid] -= len(self._watches)
        self._watches.clear()

    def _deliver(self, path: str, token: str) -> None:
        if self._on_watch_event is None:
            self.events.append((path, token))
        else:
            self._on_watch_event(path, token)

    @contextmanager
    def _op(self, type_name: str, path: str | None = None, tx: int = 0) -> Iterator[tuple[_View, str]]:
        """Count the request (and its error), resolve the path and pick the live or tx view; after a
        live operation, fire its watches."""
        store = self._store
        counters = store._stats(self.domid)
        counters.requests[type_name] += 1
        live: _LiveView | None = None
        try:
            if self.closed:
                raise XenstoreError("EIO", path or "", f"dom{self.domid}'s connection is closed")
            absolute = "" if path is None else canonical_path(self.domid, path)
            view: _View
            if tx:
                transaction = self._transactions.get(tx)
                if transaction is None:
                    raise XenstoreError("ENOENT", path or "", f"no transaction {tx} on this connection")
                view = _TxView(store, transaction)
            else:
                view = live = _LiveView(store)
            yield view, absolute
        except XenstoreError as err:
            counters.errors[err.errno] += 1
            raise
        if live is not None and live.changes:
            store._fire(live.changes, self.domid)


class Store:
    """The xenstore tree shared by all domains.

    ``connect(domid)`` gives a client its :class:`StoreConnection`; the hypervisor calls
    :meth:`introduce_domain` / :meth:`release_domain` as domains come and go; :meth:`counters` gives
    a domain's request, error and watch-event counts as a JSON-serialisable dict.
    """

    def __init__(self, quota: Quota | None = None) -> None:
        self.quota = quota or Quota()
        self._quota_overrides: dict[int, Quota] = {}
        self._generation = itertools.count(1)
        self._tx_ids = itertools.count(1)
        root_perms = (Perm("n", 0),)
        self._nodes: dict[str, _Node] = {}
        self._owned: Counter[int] = Counter()
        self._put_live("/", _Node(b"", root_perms, ("local",)))
        self._put_live("/local", _Node(b"", root_perms, ("domain",)))
        self._put_live(LOCAL_DOMAIN, _Node(b"", root_perms))
        self._special_perms: dict[str, tuple[Perm, ...]] = dict.fromkeys(SPECIAL_PATHS, root_perms)
        self._conns: list[StoreConnection] = []
        self._introduced: set[int] = set()
        self._watch_count: Counter[int] = Counter()
        self._tx_count: Counter[int] = Counter()
        self._counters: dict[int, _DomainCounters] = {}
        self._outbox: deque[tuple[StoreConnection, str, str, int]] = deque()
        self._delivering = False
        #: While a watch event is being delivered: the domain whose operation raised it (the
        #: writer, committer, or watcher registering), so a connection can account queued
        #: events to the domain that caused them (per-cause fairness, XSA-349).
        self.event_cause: int | None = None

    # -- public API ----------------------------------------------------------------------------

    def connect(self, domid: int, on_watch_event: WatchCallback | None = None) -> StoreConnection:
        """A new connection for ``domid``; ``on_watch_event(path, token)`` receives its watch events."""
        _check_domid(domid)
        conn = StoreConnection(self, domid, on_watch_event)
        self._conns.append(conn)
        return conn

    def introduce_domain(self, domid: int) -> None:
        """Create ``/local/domain/<domid>`` owned by the domain (dom0 may read) and fire
        ``@introduceDomain``.  EEXIST if the domain is already introduced."""
        _check_domid(domid)
        if domid in self._introduced:
            raise XenstoreError("EEXIST", domain_path(domid), f"dom{domid} is already introduced")
        self._introduced.add(domid)
        home = domain_path(domid)
        view = _LiveView(self)
        node = view.get(home) or self._create(view, 0, home, b"")
        perms = (Perm("n", domid), Perm("r", 0))
        view.put(home, replace(node, perms=perms))
        view.changed(_Change(home, False, (perms,)))
        view.changed(_Change(INTRODUCE_DOMAIN, True, (self._special_perms[INTRODUCE_DOMAIN],)))
        self._fire(view.changes, 0)

    def release_domain(self, domid: int) -> None:
        """The domain is gone: close its connections (watches, transactions), remove its home
        and every other node it owns (XSA-419), strip it from the permissions of the rest
        (XSA-322) and fire ``@releaseDomain``."""
        if domid not in self._introduced:
            raise XenstoreError("ENOENT", domain_path(domid), f"dom{domid} is not introduced")
        self._introduced.discard(domid)
        for conn in [c for c in self._conns if c.domid == domid]:
            conn.close()
        view = _LiveView(self)
        self._rm(view, 0, domain_path(domid))
        self._disown(view, domid)
        view.changed(_Change(RELEASE_DOMAIN, True, (self._special_perms[RELEASE_DOMAIN],)))
        self._fire(view.changes, 0)

    def is_introduced(self, domid: int) -> bool:
        return domid in self._introduced

    def quota_for(self, domid: int) -> Quota:
        return self._quota_overrides.get(domid, self.quota)

    def set_quota(self, domid: int, quota: Quota) -> None:
        """Give one domain limits different from the store-wide :attr:`quota`."""
        self._quota_overrides[domid] = quota

    def counters(self, domid: int) -> dict[str, Any]:
        """A snapshot of ``domid``'s counters and current usage (JSON-serialisable):

        ``requests`` by message type name, ``errors`` by errno name, ``watch_events`` sent to it,
        ``watch_events_dropped`` (queue full at its connection), ``watch_events_coalesced`` (an
        identical event was still queued for it), ``watch_events_shed`` (events this domain
        caused that a connection dropped because its share was used up), ``disconnects`` by
        reason, and its
        current ``nodes`` owned, ``watches`` and ``transactions``.
        """
        c = self._counters.get(domid) or _DomainCounters()
        return {
            "requests": dict(sorted(c.requests.items())),
            "errors": dict(sorted(c.errors.items())),
            "watch_events": c.watch_events,
            "watch_events_dropped": c.watch_events_dropped,
            "watch_events_coalesced": c.watch_events_coalesced,
            "watch_events_shed": c.watch_events_shed,
            "disconnects": dict(sorted(c.disconnects.items())),
            "nodes": self._owned[domid],
            "watches": self._watch_count[domid],
            "transactions": self._tx_count[domid],
        }

    def count_disconnect(self, domid: int, reason: str) -> None:
        """Count a connection of ``domid`` dropped for ``reason`` (a short stable key)."""
        self._stats(domid).disconnects[reason] += 1

    def count_dropped_event(self, domid: int, cause: int | None = None) -> None:
        """Count a watch event for ``domid`` dropped at its connection; when the drop is the
        causing domain's share running out, count it as shed by ``cause`` too."""
        self._stats(domid).watch_events_dropped += 1
        if cause is not None:
            self._stats(cause).watch_events_shed += 1

    def count_coalesced_event(self, domid: int) -> None:
        """Count a watch event for ``domid`` not queued because an identical one still is."""
        self._stats(domid).watch_events_coalesced += 1

    # -- tree operations (view-agnostic) -------------------------------------------------------

    def _lookup(self, view: _View, domid: int, path: str, need: int) -> _Node:
        node = view.get(path)
        if node is None:
            raise self._missing(view, domid, path)
        if _access(domid, node.perms) & need != need:
            raise XenstoreError("EACCES", path, f"dom{domid} lacks {_need_name(need)} permission")
        return node

    def _missing(self, view: _View, domid: int, path: str) -> XenstoreError:
        """ENOENT, or EACCES when the nearest existing ancestor is unreadable (don't leak existence)."""
        ancestor = _parent(path)
        node = view.get(ancestor)
        while node is None:
            ancestor = _parent(ancestor)
            node = view.get(ancestor)
        if _access(domid, node.perms) & PERM_READ:
            return XenstoreError("ENOENT", path)
        return XenstoreError("EACCES", path, f"dom{domid} may not read {ancestor!r}")

    def _write(self, view: _View, domid: int, path: str, value: bytes) -> None:
        limit = self.quota_for(domid).value_size
        if len(value) > limit:
            raise XenstoreError("E2BIG", path, f"value of {len(value)} bytes exceeds {limit}")
        node = view.get(path)
        if node is None:
            node = self._create(view, domid, path, value)
        else:
            if not _access(domid, node.perms) & PERM_WRITE:
                raise XenstoreError("EACCES", path, f"dom{domid} lacks write permission")
            node = replace(node, value=value)
            view.put(path, node)
        view.changed(_Change(path, False, (node.perms,)))

    def _mkdir(self, view: _View, domid: int, path: str) -> None:
        node = view.get(path)
        if node is not None:
            if not _access(domid, node.perms) & PERM_WRITE:
                raise XenstoreError("EACCES", path, f"dom{domid} lacks write permission")
            return
        node = self._create(view, domid, path, b"")
        view.changed(_Change(path, False, (node.perms,)))

    def _create(self, view: _View, domid: int, path: str, value: bytes) -> _Node:
        """Create ``path`` and any missing ancestors; write permission on the nearest existing one."""
        missing = [path]
        parent_path = _parent(path)
        parent = view.get(parent_path)
        while parent is None:
            missing.append(parent_path)
            parent_path = _parent(parent_path)
            parent = view.get(parent_path)
        if not _access(domid, parent.perms) & PERM_WRITE:
            raise XenstoreError("EACCES", path, f"dom{domid} may not write {parent_path!r}")
        if not is_privileged(domid):
            limit = self.quota_for(domid).nodes
            if view.owned(domid) + len(missing) > limit:
                raise XenstoreError("ENOSPC", path, f"dom{domid} would own more than {limit} nodes")
        node = parent
        for new_path in reversed(missing):
            node = _Node(value if new_path == path else b"", _inherit(node.perms, domid))
            view.put(new_path, node)
            up = _parent(new_path)
            above = view.get(up)
            assert above is not None
            view.put(up, replace(above, children=(*above.children, _basename(new_path))))
        return node

    def _rm(self, view: _View, domid: int, path: str) -> None:
        if path == "/":
            raise XenstoreError("EINVAL", path, "the root cannot be removed")
        node = view.get(path)
        if node is None:
            err = self._missing(view, domid, path)
            if err.errno == "ENOENT" and view.get(_parent(path)) is not None:
                return  # absent with its parent present: nothing to do, as xenstored
            raise err
        if not _access(domid, node.perms) & PERM_WRITE:
            raise XenstoreError("EACCES", path, f"dom{domid} lacks write permission")
        removed: list[tuple[str, _Node]] = []
        stack = [(path, node)]
        while stack:
            here, here_node = stack.pop()
            removed.append((here, here_node))
            for child in reversed(here_node.children):
                child_path = f"{here}/{child}" if here != "/" else f"/{child}"
                child_node = view.get(child_path)
                if child_node is not None:
                    stack.append((child_path, child_node))
        for here, _ in reversed(removed):
            view.put(here, None)
        up = _parent(path)
        above = view.get(up)
        assert above is not None
        name = _basename(path)
        view.put(up, replace(above, children=tuple(c for c in above.children if c != name)))
        view.changed(_Change(path, False, (node.perms,)))
        for here, here_node in removed[1:]:
            view.changed(_Change(here, True, (here_node.perms,)))

    def _set_perms(self, view: _View, domid: int, path: str, perms: tuple[Perm, ...]) -> None:
        node = self._lookup(view, domid, path, PERM_OWNER)
        if not is_privileged(domid) and perms[0].domid != node.perms[0].domid:
            raise XenstoreError("EPERM", path, f"only dom0 may change the owner (dom{domid} tried)")
        view.put(path, replace(node, perms=perms))
        view.changed(_Change(path, False, (perms, node.perms)))

    def _special_perms_for(self, domid: int, path: str, need: int) -> list[str]:
        perms = self._special_perms[path]
        if _access(domid, perms) & need != need:
            raise XenstoreError("EACCES", path, f"dom{domid} lacks {_need_name(need)} permission")
        return [str(p) for p in perms]

    def _set_special_perms(self, domid: int, path: str, perms: tuple[Perm, ...]) -> None:
        self._special_perms_for(domid, path, PERM_OWNER)
        if not is_privileged(domid) and perms[0].domid != self._special_perms[path][0].domid:
            raise XenstoreError("EPERM", path, "only dom0 may change the owner")
        self._special_perms[path] = perms

    # -- live tree, transactions, watches ------------------------------------------------------

    def _put_live(self, path: str, node: _Node | None) -> None:
        old = self._nodes.get(path)
        if old is not None:
            self._owned[old.perms[0].domid] -= 1
        if node is None:
            self._nodes.pop(path, None)
            return
        node = replace(node, generation=next(self._generation))
        self._nodes[path] = node
        self._owned[node.perms[0].domid] += 1

    def _commit(self, domid: int, tx: _Transaction) -> None:
        for path, generation in tx.seen.items():
            live = self._nodes.get(path)
            if (None if live is None else live.generation) != generation:
                raise XenstoreError("EAGAIN", path, f"changed during transaction {tx.tx_id}")
        if not is_privileged(domid) and tx.owned_delta[domid] > 0:
            limit = self.quota_for(domid).nodes
            if self._owned[domid] + tx.owned_delta[domid] > limit:
                raise XenstoreError("ENOSPC", detail=f"dom{domid} would own more than {limit} nodes")
        for path, node in tx.overlay.items():
            self._put_live(path, node)
        self._fire(list(tx.changes), domid)

    def _new_tx_id(self) -> int:
        while True:
            tx_id = next(self._tx_ids) & 0xFFFFFFFF
            in_use = any(tx_id in c._transactions for c in self._conns)
            if tx_id and not in_use:
                return tx_id

    def _make_watch(self, domid: int, path: str, token: str) -> _Watch:
        if path.startswith("@"):
            if len(path) > XENSTORE_REL_PATH_MAX or not _NODE_CHARS.issuperset(path):
                raise XenstoreError("EINVAL", _short(path), "bad special watch path")
            return _Watch(path, path, token, None)
        absolute = canonical_path(domid, path)
        relative_to = None if path.startswith("/") else domain_path(domid) + "/"
        return _Watch(path, absolute, token, relative_to)

    def _fire(self, changes: list[_Change], cause: int) -> None:
        for change in changes:
            for conn in self._conns:
                for watch in conn._watches.values():
                    if change.exact:
                        hit = watch.abs_path == change.path
                    else:
                        hit = not watch.abs_path.startswith("@") and _at_or_below(change.path, watch.abs_path)
                    if hit and any(_access(conn.domid, perms) & PERM_READ for perms in change.perms):
                        self._outbox.append((conn, watch.event_path(change.path), watch.token, cause))
        self._deliver()

    def _deliver(self) -> None:
        """Deliver queued watch events in order; nested calls (from a callback) leave it to us."""
        if self._delivering:
            return
        self._delivering = True
        try:
            while self._outbox:
                conn, path, token, cause = self._outbox.popleft()
                if conn.closed:
                    continue
                self._stats(conn.domid).watch_events += 1
                self.event_cause = cause
                try:
                    conn._deliver(path, token)
                except Exception:
                    logger.exception("xenstore: watch callback of dom%d failed for %r", conn.domid, path)
                finally:
                    self.event_cause = None
        finally:
            self._delivering = False

    def _disown(self, view: _View, domid: int) -> None:
        """Forget a dead domain in the tree: remove every node it still owns (outside its home,
        with its subtree; XSA-419: handed to dom0, which has no quota, they would let two
        cooperating guests that reboot grow the store without bound) and strip it from the
        permission lists of the rest (XSA-322: a domain reusing the domid inherits nothing)."""
        for path in sorted((p for p, n in self._nodes.items() if n.perms[0].domid == domid), key=len):
            if path in self._nodes and path not in ("/", "/local", LOCAL_DOMAIN):
                self._rm(view, 0, path)
        for path, node in list(self._nodes.items()):
            if any(p.domid == domid for p in node.perms):
                self._put_live(path, replace(node, perms=_without(node.perms, domid)))
        for path, perms in self._special_perms.items():
            self._special_perms[path] = _without(perms, domid)

    def _stats(self, domid: int) -> _DomainCounters:
        counters = self._counters.get(domid)
        if counters is None:
            counters = self._counters[domid] = _DomainCounters()
        return counters


def _without(perms: tuple[Perm, ...], domid: int) -> tuple[Perm, ...]:
    owner = perms[0] if perms[0].domid != domid else Perm(perms[0].kind, 0)
    return (owner, *(p for p in perms[1:] if p.domid != domid))


def _need_name(need: int) -> str:
    return {PERM_READ: "read", PERM_WRITE: "write", PERM_OWNER: "owner"}.get(need, str(need))


def _check_domid(domid: int) -> None:
    if not isinstance(domid, int) or not 0 <= domid < DOMID_FIRST_RESERVED:
        raise ValueError(f"domid {domid!r} is not a domain id (0..{DOMID_FIRST_RESERVED - 1})")
