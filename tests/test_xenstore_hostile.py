"""xenstored against hostile guests: watch-event floods and transaction memory.

A guest may write its own nodes as fast as it likes.  What it must not do is make another
connection (dom0's backends above all) lose watch events or make xenstored's memory grow
without bound.  These tests drive the store and dom0's ring connection directly: dom0's
ring is drained by hand, so the test decides exactly when dom0 "runs", and every bound is
asserted in bytes or message counts, never in time.
"""

from __future__ import annotations

import struct
import tracemalloc
from collections.abc import Callable

import pytest
import trio

from pvio.toolstack import add_vif
from pvio.xenstore.server import EVENT_SHARE, OUTPUT_LIMIT, RingConnection
from pvio.xenstore.store import Store, StoreConnection, XenstoreError
from pvio.xenstore.wire import (
    OFFSET_RSP,
    OFFSET_RSP_CONS,
    OFFSET_RSP_PROD,
    XENSTORE_RING_SIZE,
    XSD_SOCKMSG,
    ByteRing,
    XsType,
    as_page,
    encode_message,
)
from tests.netenv import NicGuest, ip_of, net_env

PAGE = 4096
STATE = "device/vif/0/state"


class Dom0Ring:
    """dom0's xenstore ring with a consumer the test runs by hand."""

    def __init__(self, store: Store) -> None:
        self.page = as_page(bytearray(PAGE))
        self.conn = RingConnection(store, 0, self.page, notify=lambda: None)
        self.rsp = ByteRing(self.page, OFFSET_RSP, OFFSET_RSP_CONS, OFFSET_RSP_PROD)
        self.buffer = b""
        self.peak_out = 0

    def watch(self, path: str, token: str) -> None:
        self.conn._session.watch(path, token)

    def note(self) -> None:
        self.peak_out = max(self.peak_out, self.conn._out_bytes)

    def drain(self) -> list[tuple[str, str]]:
        """Consume everything xenstored has for dom0; return the watch events, in order."""
        events: list[tuple[str, str]] = []
        while True:
            self.note()
            cons, prod = self.rsp.load_cons(), self.rsp.load_prod()
            n = (prod - cons) & 0xFFFFFFFF
            if n == 0:
                self.conn.process()
                if self.rsp.load_prod() == prod:
                    break
                continue
            self.buffer += self.rsp.copy_out(cons, n)
            self.rsp.store_cons((cons + n) & 0xFFFFFFFF)
            self.conn.process()
        while len(self.buffer) >= XSD_SOCKMSG.size:
            msg_type, _req, _tx, length = struct.unpack_from("<IIII", self.buffer)
            if len(self.buffer) < XSD_SOCKMSG.size + length:
                break
            body = self.buffer[XSD_SOCKMSG.size : XSD_SOCKMSG.size + length]
            self.buffer = self.buffer[XSD_SOCKMSG.size + length :]
            if msg_type == XsType.WATCH_EVENT:
                path, token = body.rstrip(b"\0").split(b"\0")
                events.append((path.decode(), token.decode()))
        return events


@pytest.fixture
def store() -> Store:
    s = Store()
    for domid in (1, 2, 3):
        s.introduce_domain(domid)
    return s


def backend_watching(store: Store, *domids: int) -> Dom0Ring:
    """dom0 watching each guest's frontend state node, as netback does; initial events drained."""
    dom0 = Dom0Ring(store)
    for domid in domids:
        store.connect(domid).write(STATE, "1")
        dom0.watch(f"/local/domain/{domid}/{STATE}", f"fe{domid}")
    dom0.drain()
    return dom0


def test_xsa349_state_flood_does_not_cost_dom0_a_bystanders_event(store: Store) -> None:
    dom0 = backend_watching(store, 1, 2)
    flooder, bystander = store.connect(1), store.connect(2)
    for _ in range(5000):  # dom0 does not run meanwhile: its ring fills, then its queue
        flooder.write(STATE, "1")
        dom0.note()
    bystander.write(STATE, "4")
    dom0.note()
    events = dom0.drain()
    assert events.count((f"/local/domain/2/{STATE}", "fe2")) == 1
    # The flood is coalesced: what already sits on dom0's ring, plus one queued event.
    assert dom0.peak_out <= OUTPUT_LIMIT
    assert events.count((f"/local/domain/1/{STATE}", "fe1")) <= XENSTORE_RING_SIZE // 40 + 1
    assert store.counters(0)["watch_events_coalesced"] > 4000
    assert store.counters(0)["watch_events_dropped"] == 0


def test_xsa349_distinct_paths_flood_is_held_to_the_flooders_share(store: Store) -> None:
    dom0 = backend_watching(store, 1, 2, 3)
    flooder = store.connect(1)
    for i in range(3000):  # every event names a new path: nothing to coalesce
        flooder.write(f"{STATE}/x{i}", "1")
        flooder.rm(f"{STATE}/x{i}")
        dom0.note()
    queued_from_flooder = dom0.conn._event_bytes[1]
    store.connect(2).write(STATE, "4")
    store.connect(3).write(STATE, "6")
    events = dom0.drain()
    assert (f"/local/domain/2/{STATE}", "fe2") in events
    assert (f"/local/domain/3/{STATE}", "fe3") in events
    # Bystanders wait behind at most the flooder's share, counted in bytes ahead of them.
    assert queued_from_flooder <= EVENT_SHARE
    assert events.index((f"/local/domain/2/{STATE}", "fe2")) * 40 <= EVENT_SHARE + PAGE
    assert dom0.peak_out <= OUTPUT_LIMIT
    assert store.counters(1)["watch_events_shed"] > 0  # the flooder pays, and it is counted
    assert store.counters(0)["watch_events_dropped"] == store.counters(1)["watch_events_shed"]


# -- end to end: a guest flooding its own state node while dom0's backend works -------------------


class StateFlooder(NicGuest):
    """Connects its vif, then rewrites its frontend ``state`` (Connected, unchanged) ``burst``
    times per scheduler turn, ``bursts`` turns: raw WRITE requests on its own xenstore ring,
    each batch kicked (xenstored serves it at once) and its replies discarded unread, so
    nothing paces the flood but the flooder."""

    def __init__(self, name: str, ip: str, burst: int = 1500, bursts: int = 8) -> None:
        super().__init__(name, ip)
        self.burst, self.bursts = burst, bursts
        self.writes = 0
        self.flooding, self.done = trio.Event(), trio.Event()

    def _flood_once(self, message: bytes) -> None:
        xb = self.xenbus
        per_batch = XENSTORE_RING_SIZE // len(message)
        for _ in range(0, self.burst, per_batch):
            for _ in range(per_batch):
                xb._req.copy_in(xb._req_prod, message)
                xb._req_prod = (xb._req_prod + len(message)) & 0xFFFFFFFF
            xb._req.store_prod(xb._req_prod)
            self.evtchn_send(self.domain.store_port)  # xenstored consumes and answers now
            xb._rsp_cons = xb._rsp.load_prod()  # the replies: dropped unread
            xb._rsp.store_cons(xb._rsp_cons)
            self.writes += per_batch

    async def main(self) -> None:
        await super().main()
        message = encode_message(XsType.WRITE, 0xF1, 0, f"{self.nic.dir}/state".encode() + b"\0" + b"4")
        for _ in range(self.bursts):
            self._flood_once(message)
            self.flooding.set()
            await trio.sleep(0)
        self.done.set()


async def test_xsa349_state_flood_leaves_dom0s_handshakes_working(autojump_clock: trio.abc.Clock) -> None:
    flooder, b = StateFlooder("flooder", ip_of(0)), NicGuest("b", ip_of(1))
    async with net_env(flooder, b, wait_ready=[b]) as env:
        hv = env.hv
        await flooder.flooding.wait()
        late = NicGuest("late", ip_of(2))
        dom = hv.create_domain(late, name="late")
        add_vif(hv, dom)
        closed = trio.Event()

        async def close_b() -> None:
            await b.nic.close()
            closed.set()

        hv.nursery.start_soon(close_b)  # type: ignore[union-attr]
        await hv.start(dom)
        await flooder.done.wait()
        with trio.fail_after(10):  # virtual seconds: the system only has to go quiet
            await late.ready.wait()
            await closed.wait()
        assert flooder.writes >= flooder.burst * flooder.bursts
        assert hv.store.counters(0)["watch_events_dropped"] == 0


# -- transaction memory (XSA-326 / XSA-421 class) --------------------------------------------------


def errno_of(fn: Callable[..., object], *args: object) -> str:
    with pytest.raises(XenstoreError) as err:
        fn(*args)
    return err.value.errno


def tx_size(conn: StoreConnection, tx: int) -> int:
    """The entries transaction ``tx`` remembers: nodes looked at, nodes written, changes."""
    t = conn._transactions[tx]
    return len(t.seen) + len(t.overlay) + len(t.changes)


def test_xsa326_a_transaction_remembers_at_most_its_node_quota_of_missing_reads(store: Store) -> None:
    guest = store.connect(1)
    limit = store.quota_for(1).transaction_nodes
    tx = guest.transaction_start()
    refused = 0
    for i in range(5 * limit):
        try:
            guest.read(f"missing/m{i}", tx)
        except XenstoreError as err:
            refused += err.errno == "ENOSPC"
    assert refused >= 4 * limit
    assert len(guest._transactions[tx].seen) <= limit
    assert tx_size(guest, tx) <= 3 * limit
    assert errno_of(guest.transaction_end, tx) == "ENOSPC"  # a refused step fails the commit
    assert store.counters(1)["transactions"] == 0


def test_xsa326_writes_in_a_transaction_are_bounded_and_repeats_cost_nothing(store: Store) -> None:
    guest = store.connect(1)
    limit = store.quota_for(1).transaction_nodes
    tx = guest.transaction_start()
    for _ in range(20000):  # the same node again and again: one entry, one change
        guest.write("data/same", "x", tx)
    assert tx_size(guest, tx) <= 10
    for i in range(2 * limit):
        try:
            guest.write(f"data/n{i}", "x", tx)
        except XenstoreError as err:
            assert err.errno == "ENOSPC"
    assert tx_size(guest, tx) <= 3 * limit
    guest.transaction_end(tx, commit=False)
    # Bystanders and later transactions are unaffected.
    other = store.connect(2)
    tx2 = other.transaction_start()
    other.write("ok", "1", tx2)
    other.transaction_end(tx2)
    assert other.read("ok") == b"1"


def test_xsa326_transaction_memory_per_domain_is_bounded() -> None:
    store = Store()
    store.introduce_domain(1)
    guest = store.connect(1)
    quota = store.quota_for(1)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for _ in range(quota.transactions):
            tx = guest.transaction_start()
            for i in range(3 * quota.transaction_nodes):
                try:
                    guest.read(f"m{i}", tx)
                    guest.write(f"w{i}", "v" * 64, tx)
                except XenstoreError:
                    pass
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    # 10 transactions x 1024 entries: a few MiB at most, however long the guest goes on.
    assert grown < 8 * 2**20, f"{grown / 2**20:.1f} MiB"
