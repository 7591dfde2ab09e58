"""One test per Xen Security Advisory class that applies to pvio, named after it.

Each test plays the advisory's attacker against pvio through the public API or by raw
writes to shared pages (ring slots, ring indices, xenstore ring bytes) and asserts what
pvio does: the offender is refused or disconnected with a logged reason, what it can make
dom0 or the hypervisor hold stays under a stated bound, and bystanders lose nothing (exact
counts under trio's MockClock).  Where an advisory cannot apply (XSA-270: the feature is not
offered), the test asserts the reason.  docs/security.md maps every advisory to its test.

The netback attacks reuse the three-guest set-up of ``test_netback_hostile``: the pair A/B
exchanges traffic before and after, the hostile guest H (vif3.0) attacks.  The xenstore
attacks drive :class:`~pvio.xenstore.store.Store` and a guest's
:class:`~pvio.xenstore.server.RingConnection` directly, so every step is deterministic.
"""

from __future__ import annotations

import inspect
import logging
import struct
import sys
import tracemalloc
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import trio
import trio.testing

from pvio import XenbusState
from pvio.abi import PAGE_SIZE
from pvio.backends.netback import RX_QUEUE_MAX
from pvio.ringbuf import NETIF_TX
from pvio.ringbuf.netif import NETIF_RSP_ERROR, NETTXF_MORE_DATA
from pvio.xenstore.server import OUTPUT_HIGH_WATER, RingConnection
from pvio.xenstore.store import Quota, Store, XenstoreError
from pvio.xenstore.wire import (
    OFFSET_ERROR,
    OFFSET_REQ,
    OFFSET_REQ_CONS,
    OFFSET_REQ_PROD,
    OFFSET_RSP,
    OFFSET_RSP_CONS,
    OFFSET_RSP_PROD,
    XENSTORE_ERROR_PROTO,
    XENSTORE_PAYLOAD_MAX,
    XENSTORE_RING_SIZE,
    XSD_SOCKMSG,
    ByteRing,
    XsType,
    as_page,
    encode_message,
)
from tests.netenv import HandmadeFrontend, NicGuest, ip_of, net_env, recv_n, udp_stream, wait_until
from tests.test_netback_hostile import (
    HOSTILE,
    K,
    _attack_disables_the_vif,
    assert_pair_unharmed,
    backend_state,
    chain,
    claim,
    drops,
    exchange,
    netback_log,
    push_raw,
    three_guests,
)
from tests.test_xenstore_hostile import backend_watching

# ============================================================================ helpers: xenstore


class GuestRing:
    """A guest's xenstore ring page with xenstored's end attached; the test plays the guest."""

    def __init__(self, store: Store, domid: int) -> None:
        self.page = as_page(bytearray(PAGE_SIZE))
        self.conn = RingConnection(store, domid, self.page, notify=lambda: None)
        self.req = ByteRing(self.page, OFFSET_REQ, OFFSET_REQ_CONS, OFFSET_REQ_PROD)
        self.rsp = ByteRing(self.page, OFFSET_RSP, OFFSET_RSP_CONS, OFFSET_RSP_PROD)
        self.buffer = b""

    def free(self) -> int:
        """Bytes the guest may still write into its request ring."""
        return XENSTORE_RING_SIZE - ((self.req.load_prod() - self.req.load_cons()) & 0xFFFFFFFF)

    def put(self, message: bytes) -> bool:
        """Write one whole message and kick xenstored; False (nothing written) if it does not fit."""
        if len(message) > self.free():
            return False
        prod = self.req.load_prod()
        self.req.copy_in(prod, message)
        self.req.store_prod((prod + len(message)) & 0xFFFFFFFF)
        self.conn.process()
        return True

    def replies(self) -> list[tuple[int, int, int, bytes]]:
        """Read everything xenstored wrote: (type, req_id, tx_id, payload) per whole message."""
        out = []
        while True:
            cons, prod = self.rsp.load_cons(), self.rsp.load_prod()
            n = (prod - cons) & 0xFFFFFFFF
            if not n:
                break
            self.buffer += self.rsp.copy_out(cons, n)
            self.rsp.store_cons((cons + n) & 0xFFFFFFFF)
            self.conn.process()
        while len(self.buffer) >= XSD_SOCKMSG.size:
            msg_type, req_id, tx_id, length = XSD_SOCKMSG.unpack_from(self.buffer)
            if len(self.buffer) < XSD_SOCKMSG.size + length:
                break
            out.append((msg_type, req_id, tx_id, self.buffer[XSD_SOCKMSG.size : XSD_SOCKMSG.size + length]))
            self.buffer = self.buffer[XSD_SOCKMSG.size + length :]
        return out

    def stream(self, message: bytes) -> None:
        """Write a message of any length, a ring's worth at a time (xenstored runs in between)."""
        while message:
            prod, n = self.req.load_prod(), min(self.free(), len(message))
            assert n, "xenstored stopped reading"
            self.req.copy_in(prod, message[:n])
            self.req.store_prod((prod + n) & 0xFFFFFFFF)
            message = message[n:]
            self.conn.process()

    def call(self, msg_type: XsType, payload: bytes, req_id: int = 1, tx_id: int = 0) -> tuple[int, bytes]:
        """One request, its reply (type, payload); watch events in between are skipped."""
        self.stream(encode_message(msg_type, req_id, tx_id, payload))
        for rtype, rid, _tx, body in self.replies():
            if rtype != XsType.WATCH_EVENT and rid == req_id:
                return rtype, body
        raise AssertionError("no reply")


@pytest.fixture
def store() -> Store:
    s = Store()
    for domid in (1, 2, 3):
        s.introduce_domain(domid)
    return s


def errno_of(fn: Any, *args: Any) -> str:
    with pytest.raises(XenstoreError) as err:
        fn(*args)
    return err.value.errno


def assert_tree_consistent(store: Store) -> None:
    """Every node's parent exists and lists it, every listed child exists, and each domain's
    node count is what the tree holds (no orphan, no accounting drift)."""
    nodes = store._nodes
    owners: Counter[int] = Counter()
    for path, node in nodes.items():
        owners[node.perms[0].domid] += 1
        for child in node.children:
            assert (f"{path}/{child}" if path != "/" else f"/{child}") in nodes, (path, child)
        if path != "/":
            parent, name = path.rsplit("/", 1)
            parent = parent or "/"
            assert parent in nodes, f"orphan {path}"
            assert name in nodes[parent].children, f"{path} not listed in its parent"
    assert {d: n for d, n in store._owned.items() if n} == dict(owners)


# ============================================================================ helpers: network


def assert_pair_lost_nothing(env: Any, rounds: int, from_h_at_a: int) -> None:
    """As ``assert_pair_unharmed``, when A also received ``from_h_at_a`` frames from H."""
    assert env.count("netfront/vif1.0", "packets.rx") == rounds * K + from_h_at_a
    assert env.count("netfront/vif2.0", "packets.rx") == rounds * K
    for owner in ("netback/vif1.0", "netback/vif2.0", "switch/switch0"):
        assert {k: v for k, v in drops(env, owner).items() if k != "drops.same_port"} == {}
    assert all(dom.state == "running" for dom in env.hv.domains.values())


def dom0_free_pages(env: Any) -> int:
    return len(env.hv.dom0.kernel._page_free)


# ============================================================================ netback: XSA-39


async def test_xsa39_an_impossible_req_prod_disables_only_the_offender(
    autojump_clock: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """XSA-39 (CVE-2013-0216): a req_prod far ahead made Linux netback loop on the ring.  pvio
    refuses it at once: the vif is disabled with the indices logged, its rings unmapped."""

    def attack(h: NicGuest) -> None:
        page = h.page(h.nic.tx_gfn)
        (req_prod,) = struct.unpack_from("<I", page, 0)
        struct.pack_into("<I", page, 0, req_prod + 0x80000000)
        h.evtchn_send(h.nic.port)

    await _attack_disables_the_vif(
        caplog,
        attack,
        "impossible req_prod from the frontend "
        f"(TX ring: req_prod {1 + 0x80000000}, req_cons 1, rsp_prod_pvt 1, 256 slots)",
    )


async def test_xsa39_error_paths_leak_no_dom0_page_or_mapping(
    autojump_clock: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """XSA-39 (CVE-2013-0217): netback's error paths leaked memory per bad packet.  Hundreds of
    malformed packets, then a fatal one: dom0 gets back every page and mapping of H's vif."""
    async with three_guests() as (env, a, b, h):
        await exchange(a, b, 0)
        free_before = dom0_free_pages(env)
        for _ in range(20):  # 20 x 12 malformed packets: bad grant, page crossing, sizes
            reqs = []
            for k in range(12):
                sid = claim(h)
                bad = [
                    {"gref": 4096, "offset": 0, "size": 64},
                    {"gref": h.nic.tx_refs[sid], "offset": 4000, "size": 200},
                    {"gref": h.nic.tx_refs[sid], "offset": 0, "size": 0},
                ][k % 3]
                reqs.append({**bad, "flags": 0, "id": sid})
            push_raw(h, reqs)
            await trio.testing.wait_all_tasks_blocked()
        assert sum(drops(env, f"netback/{HOSTILE}").values()) == 240
        assert dom0_free_pages(env) == free_before  # nothing allocated per bad packet
        push_raw(h, chain(h, 21))  # fatal: the vif goes
        await trio.testing.wait_all_tasks_blocked()
        assert env.vif(h).error == "TX packet of more than 20 slots (fatal_skb_slots)"
        assert dom0_free_pages(env) == free_before + 512  # its 512 staging pages returned
        assert env.hv.dom0 is not None
        assert not any(m.granter.domid == h.domain.domid for m in env.hv.dom0.maptrack.values())
        await exchange(a, b, K)
        assert_pair_unharmed(env, a, b, 2)


# ============================================================================ XSA-155: double fetch


async def test_xsa155_rewriting_a_request_after_netback_took_it_changes_nothing(
    autojump_clock: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """XSA-155: backends read a request field twice from the shared ring, so a frontend
    rewriting it in between defeated the check.  H rewrites its request slot (size 4000 at
    offset 4000, a huge gref) at the moment netback copies the packet: what is copied and
    forwarded is what netback validated, once."""
    async with three_guests() as (env, a, b, h):
        frame = udp_stream(h, a, 1, start=155)[0]
        sid = claim(h)
        h.nic.tx_views[sid][: len(frame)] = frame
        ring = h.page(h.nic.tx_gfn)
        slot = 64 + (h.nic.tx.req_prod_pvt % 256) * NETIF_TX.req_size  # the slot the request lands in
        vif = env.vif(h)
        real = vif._grant_copy  # H's vif: the one copy after the one validation of H's requests
        rewrites: list[int] = []

        def racing_copy(st: Any, count: int) -> None:
            if not rewrites:  # the frontend's other vCPU, between netback's check and its copy
                struct.pack_into("<IHHHH", ring, slot, 0xFFFFFFFF, 4000, 0, sid, 4000)
                rewrites.append(1)
            real(st, count)

        monkeypatch.setattr(vif, "_grant_copy", racing_copy)
        push_raw(h, [{"gref": h.nic.tx_refs[sid], "offset": 0, "flags": 0, "id": sid, "size": len(frame)}])
        [got] = await recv_n(a.nic, 1)
        await trio.testing.wait_all_tasks_blocked()
        assert rewrites == [1]  # the race was run
        assert got == frame
        assert drops(env, f"netback/{HOSTILE}") == {}
        assert env.vif(h).connected
        monkeypatch.undo()
        await exchange(a, b, 0)


# ============================================================================ XSA-216: response leaks


SECRET = b"dom0-secret-0123"


async def test_xsa216_no_dom0_memory_reaches_a_guest_through_responses_or_copies(
    autojump_clock: Any,
) -> None:
    """XSA-216: blkback's responses carried uninitialised backend memory to the guest.  Every
    free dom0 page and every staging page of H's vif is filled with a marker; after traffic
    both ways (responses on both rings, frames copied into H's buffers), no byte of the marker
    is anywhere in H's RAM."""
    async with three_guests() as (env, a, b, h):
        assert env.hv.dom0 is not None
        dom0 = env.hv.dom0.kernel
        vif = env.vif(h)
        fill = SECRET * (PAGE_SIZE // len(SECRET))
        for gfn in [*dom0._page_free, *vif.tx_stage, *vif.rx_stage]:  # type: ignore[attr-defined]
            dom0.page(gfn)[:] = fill
        await h.nic.send_batch(udp_stream(h, a, 20, start=0))
        await a.nic.send_batch([*udp_stream(a, h, 20, start=0), udp_stream(a, h, 1, size=60)[0]])
        assert len(await recv_n(a.nic, 20)) == 20
        assert len(await recv_n(h.nic, 21)) == 21
        # and one ERROR response
        push_raw(h, [{"gref": 4096, "offset": 0, "flags": 0, "id": claim(h), "size": 64}])
        await trio.testing.wait_all_tasks_blocked()
        assert env.count(f"netfront/{HOSTILE}", f"tx_errors.{NETIF_RSP_ERROR}") == 1
        ram = bytes(h.mem)
        assert SECRET not in ram and SECRET[:8] not in ram
        await exchange(a, b, 0)


# ============================================================================ XSA-270: hash (not offered)


@pytest.mark.parametrize(
    ("keys", "reason"),
    [
        ({"multi_queue_num_queues": "4"}, "frontend requested '4' queues; netback offers one"),
        ({"ctrl_ring_ref": "{tx_ref}"}, "frontend wrote ctrl-ring-ref; netback offers no control ring"),
    ],
    ids=["multi-queue", "control-ring"],
)
async def test_xsa270_hash_and_queue_features_are_not_offered_and_a_frontend_asking_is_refused(
    autojump_clock: Any, caplog: pytest.LogCaptureFixture, keys: dict[str, str], reason: str
) -> None:
    """XSA-270 (CVE-2018-15471): Linux netback's hash mapping, set through the control ring,
    indexed out of bounds.  pvio's netback offers no control ring and no multi-queue (so no
    hash mapping exists to attack), and refuses a frontend that asks for either."""
    a, b = NicGuest("a", ip_of(0)), NicGuest("b", ip_of(1))
    h = HandmadeFrontend("hostile", **keys)
    async with net_env(a, b, h) as env:
        await wait_until(lambda: h.backend_state is not None, what="netback's answer to H")
        be = env.vif(h).path
        offered = set(env.hv.toolstack.directory(be))
        assert not offered & {"feature-ctrl-ring", "multi-queue-max-queues", "feature-hash"}
        assert h.backend_state == XenbusState.CLOSED
        assert env.vif(h).error == reason
        assert netback_log(caplog, logging.ERROR) == [f"{HOSTILE} disabled: {reason}"]
        assert env.hv.toolstack.read(f"{be}/error") == reason.encode()
        assert env.hv.dom0 is not None and len(env.hv.dom0.maptrack) == 4  # the pair's rings only
        await exchange(a, b, 0)
        assert_pair_unharmed(env, a, b, 1)


# ============================================================================ XSA-324: oversized events


def test_xsa324_a_watch_event_too_large_for_a_message_is_dropped_not_fatal(
    store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    """XSA-324: a watch whose path and token fit in 4096 bytes fires for a node below it whose
    event does not; xenstored crashed sending it.  pvio drops that event, counts it, logs one
    warning, and the guest's connection and everyone else's go on."""
    guest = GuestRing(store, 1)
    dom0 = backend_watching(store, 2)
    watch_path = "/local/domain/1/w"
    token = "t" * (XENSTORE_PAYLOAD_MAX - len(watch_path) - 2)
    assert guest.call(XsType.WATCH, watch_path.encode() + b"\0" + token.encode() + b"\0") == (
        XsType.WATCH,
        b"OK\0",
    )
    assert store.counters(1)["watch_events"] == 1  # the registration's own event fits: sent
    deep = watch_path + "/" + "x" * 200  # event payload = 4096 - 2 + 201 bytes
    assert guest.call(XsType.WRITE, deep.encode() + b"\0" + b"v")[0] == XsType.WRITE
    events = [r for r in guest.replies() if r[0] == XsType.WATCH_EVENT]
    assert events == []
    assert store.counters(1)["watch_events_dropped"] == 1
    assert store.counters(1)["watch_events"] == 2  # counted as raised, dropped at the connection
    assert any("does not fit in a message" in r.getMessage() for r in caplog.records)
    assert not guest.conn.closed
    assert guest.call(XsType.READ, deep.encode() + b"\0") == (XsType.READ, b"v")
    store.connect(2).write("device/vif/0/state", "4")
    assert dom0.drain() == [("/local/domain/2/device/vif/0/state", "fe2")]


# ============================================================================ XSA-326: xenstored OOM


def test_xsa326_requests_sent_without_reading_replies_hold_a_bounded_queue(store: Store) -> None:
    """XSA-326 (2022, CVE-2022-42311..42318), first way: a guest issues requests and never
    reads the replies.  xenstored stops reading its requests once two full messages are queued
    for it; the guest's ring fills and the guest can do nothing more, while xenstored holds at
    most that much; every request is answered once the guest reads."""
    guest = GuestRing(store, 1)
    guest.call(XsType.WRITE, b"/local/domain/1/big\0" + b"v" * 4000)
    request = encode_message(XsType.READ, 7, 0, b"/local/domain/1/big\0")
    sent = peak = 0
    for _ in range(100_000):
        if not guest.put(request):
            break
        sent += 1
        peak = max(peak, guest.conn._out_bytes)
    assert sent < 100_000  # the ring stopped taking requests
    assert peak <= OUTPUT_HIGH_WATER + XSD_SOCKMSG.size + XENSTORE_PAYLOAD_MAX
    other = GuestRing(store, 2)
    assert other.call(XsType.WRITE, b"/local/domain/2/ok\0" + b"1") == (XsType.WRITE, b"OK\0")
    answered = 0
    for _ in range(10 * sent):
        got = guest.replies()
        answered += sum(1 for r in got if r[1] == 7)
        if answered == sent:
            break
    assert answered == sent


# ============================================================================ XSA-332 / 391: event storms


async def test_xsa332_an_event_storm_from_a_guest_costs_dom0_one_pending_bit(autojump_clock: Any) -> None:
    """XSA-332: a guest notifying its backend's event channel at a high rate kept dom0 busy.
    100,000 notifications from H in one scheduler turn raise dom0's port once (the rest
    coalesce on the pending bit, counted), netback wakes once and finds nothing; A/B unharmed."""
    async with three_guests() as (env, a, b, h):
        await exchange(a, b, 0)
        assert env.hv.dom0 is not None
        dom0 = env.hv.dom0
        raised, coalesced = dom0.counters["evtchn.raised"], dom0.counters["evtchn.coalesced"]
        sent_before = env.count(f"netback/{HOSTILE}", "notifications.sent")
        for _ in range(100_000):
            h.evtchn_send(h.nic.port)
        assert dom0.counters["evtchn.raised"] - raised == 1
        assert dom0.counters["evtchn.coalesced"] - coalesced == 99_999
        await trio.testing.wait_all_tasks_blocked()
        assert env.count(f"netback/{HOSTILE}", "notifications.sent") == sent_before  # nothing to answer
        assert env.vif(h).connected
        await exchange(a, b, K)
        assert_pair_unharmed(env, a, b, 2)


async def test_xsa391_an_event_storm_from_the_backend_costs_the_guest_one_pending_bit(
    autojump_clock: Any,
) -> None:
    """XSA-391: a backend notifying a frontend at a high rate stalled the guest.  dom0 (the
    backend's domain) notifies H's port 100,000 times in one turn: H's port is raised once,
    its netfront's handler only sets an event, H stays connected with nothing delivered, and
    the pair is unharmed."""
    async with three_guests() as (env, a, b, h):
        await exchange(a, b, 0)
        assert env.hv.dom0 is not None
        dom0 = env.hv.dom0.kernel
        port = env.vif(h).port
        raised, coalesced = h.domain.counters["evtchn.raised"], h.domain.counters["evtchn.coalesced"]
        for _ in range(100_000):
            dom0.evtchn_send(port)
        assert h.domain.counters["evtchn.raised"] - raised == 1
        assert h.domain.counters["evtchn.coalesced"] - coalesced == 99_999
        await trio.testing.wait_all_tasks_blocked()
        assert h.nic.error is None and h.nic.pending() == 0
        assert env.count(f"netfront/{HOSTILE}", "packets.rx") == 0
        await exchange(a, b, K)
        assert_pair_unharmed(env, a, b, 2)


# ============================================================================ XSA-349: watch floods


def test_xsa349_a_frontend_rewriting_watched_nodes_holds_dom0_to_a_bounded_queue(store: Store) -> None:
    """XSA-349: a frontend updating a path its backend watches made the backend queue events
    without bound.  20,000 changes below the state node dom0 watches, dom0 not running
    meanwhile: dom0's queue holds at most the flooder's share, the bystander's event arrives,
    and the memory xenstored holds for dom0 does not grow with the flood."""
    dom0 = backend_watching(store, 1, 2)
    flooder = store.connect(1)
    tracemalloc.start()
    try:
        for i in range(900):  # within its node quota
            flooder.write(f"device/vif/0/state/x{i}", "1")
        base = tracemalloc.get_traced_memory()[0]
        for i in range(900, 20_000):
            flooder.write(f"device/vif/0/state/x{i % 900}", str(i))
        grown = tracemalloc.get_traced_memory()[0] - base
    finally:
        tracemalloc.stop()
    assert dom0.conn._out_bytes <= 16 * (XSD_SOCKMSG.size + XENSTORE_PAYLOAD_MAX)
    assert grown < 2 * 2**20, f"{grown / 2**20:.1f} MiB"
    store.connect(2).write("device/vif/0/state", "4")
    assert ("/local/domain/2/device/vif/0/state", "fe2") in dom0.drain()
    assert store.counters(1)["watch_events_shed"] > 0


# ============================================================================ XSA-392: netback RX memory


async def test_xsa392_a_guest_posting_no_buffers_makes_netback_hold_at_most_its_queue(
    autojump_clock: Any,
) -> None:
    """XSA-392: a guest that stops taking packets made Linux netback queue them without bound.
    H's domain is paused (no buffer re-posted): netback fills H's 256 posted buffers, holds
    at most ``rx_queue_max`` more frames and drops the rest, counted exactly; A/B unharmed."""
    queue_max = 128
    a, b, h = NicGuest("a", ip_of(0)), NicGuest("b", ip_of(1)), NicGuest("hostile", ip_of(2))
    async with net_env(a, b, h, rx_queue_max=queue_max) as env:
        env.hv.pause(h.domain)
        sent = 0
        for start in range(0, 1024, 64):
            await a.nic.send_batch(udp_stream(a, h, 64, start=start))
            sent += 64
            await trio.testing.wait_all_tasks_blocked()
            assert len(env.vif(h)._rx_queue) <= queue_max
        assert env.count(f"netback/{HOSTILE}", "packets.rx") == 256
        assert env.count(f"netback/{HOSTILE}", "drops.rx_queue_full") == sent - 256 - queue_max
        assert queue_max <= RX_QUEUE_MAX
        await exchange(a, b, 0)
        env.hv.unpause(h.domain)
        assert_pair_unharmed(env, a, b, 1)


# ============================================================================ XSA-396: grant revocation


async def test_xsa396_a_backend_still_mapping_a_grant_never_gets_the_page_reused(
    autojump_clock: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """XSA-396: frontends revoked grants the backend still mapped and reused the pages, so the
    backend kept access to memory the guest used for something else.  A backend keeps one of
    H's RX buffers mapped across H's close: netfront's atomic revoke fails for that one grant,
    the page is left out of H's allocator (counted, logged), the other 513 are freed."""
    async with three_guests() as (env, a, b, h):
        assert env.hv.dom0 is not None
        dom0 = env.hv.dom0.kernel
        kept_ref, kept_gfn = h.nic.rx_refs[5], h.nic.rx_pages[5]
        mapping = dom0.grant_map(h.domain.domid, kept_ref)
        await h.nic.close()
        assert env.count(f"netfront/{HOSTILE}", "grants_still_mapped") == 1
        assert kept_gfn not in h._page_free
        assert h.gnttab.flags(kept_ref) != 0  # the grant stays, as the mapping does
        assert any("still in use by the backend" in r.getMessage() for r in caplog.records)
        pages = [h.alloc_page() for _ in range(len(h._page_free))]  # the guest takes every free page
        assert kept_gfn not in pages
        mapping.view[:16] = b"backend-scribble"  # what the backend writes reaches no reused page
        assert all(bytes(h.page(p)[:16]) == bytes(16) for p in pages)
        dom0.grant_unmap(mapping)
        await exchange(a, b, 0)


# ============================================================================ XSA-403: frontend data leaks


class DirtyGuest(NicGuest):
    """Fills and frees pages of its own before its netfront connects: the allocator hands
    back pages that once held the guest's secrets."""

    async def main(self) -> None:
        pages = [self.alloc_page() for _ in range(600)]
        for gfn in pages:
            self.page(gfn)[:] = b"guest-secret-key" * (PAGE_SIZE // 16)
        for gfn in pages:
            self.free_page(gfn)
        await super().main()


async def test_xsa403_pages_a_frontend_grants_hold_nothing_but_ring_and_packet_data(
    autojump_clock: Any,
) -> None:
    """XSA-403: Linux's frontends granted pages that still held other data, or shared a page
    between a packet and unrelated memory.  H first dirties and frees 600 pages with a secret;
    every page netfront then grants (2 rings, 256 TX, 256 RX) is one netfront allocated for
    that purpose alone, zeroed, and after traffic holds no byte of the secret."""
    a, b = NicGuest("a", ip_of(0)), NicGuest("b", ip_of(1))
    h = DirtyGuest("hostile", ip_of(2))
    async with net_env(a, b, h) as env:
        nic = h.nic
        granted = {nic.tx_gfn, nic.rx_gfn, *nic.tx_pages, *nic.rx_pages}
        assert len(granted) == 514
        table = h.domain.grant_table  # the hypervisor's reading of H's grant entries
        active = {table.read_entry(r)[2] for r in range(8, table.nr_entries) if table.read_entry(r)[0]}
        assert active == granted  # nothing else of H is granted
        await h.nic.send_batch(udp_stream(h, a, 10))
        await a.nic.send_batch(udp_stream(a, h, 10))
        assert len(await recv_n(a.nic, 10)) == 10 and len(await recv_n(h.nic, 10)) == 10
        for gfn in granted:
            assert b"guest-secret" not in bytes(h.page(gfn))
        await exchange(a, b, 0)
        assert env.count("netfront/vif1.0", "packets.rx") == K + 10


# ============================================================================ 2022 xenstored batch


def test_xsa414_a_creation_failing_half_way_leaves_no_partial_node(store: Store) -> None:
    """XSA-414 (CVE-2022-42309): an error while creating a node's missing ancestors left
    xenstored with a dangling node and crashed it.  A guest near its node quota writes a
    path 40 levels deep (directly and in a transaction): ENOSPC, no node of the path exists,
    the tree and the node accounting are consistent, and the guest and others go on."""
    store.set_quota(1, Quota(nodes=25))
    guest = store.connect(1)
    for i in range(10):
        guest.write(f"own{i}", "x")
    owned = store.counters(1)["nodes"]
    deep = "/".join(f"d{i}" for i in range(40))
    assert errno_of(guest.write, deep, "v") == "ENOSPC"
    assert errno_of(guest.read, "d0") == "ENOENT"
    tx = guest.transaction_start()
    assert errno_of(guest.write, deep, "v", tx) == "ENOSPC"
    guest.transaction_end(tx)  # what the refused step would have created is not in it
    assert errno_of(guest.read, "d0") == "ENOENT"
    assert store.counters(1)["nodes"] == owned
    assert_tree_consistent(store)
    guest.write("own-more", "x")
    store.connect(2).write("fine", "1")
    assert store.connect(2).read("fine") == b"1"


def test_xsa415_a_transaction_cannot_create_a_node_whose_parent_was_deleted(store: Store) -> None:
    """XSA-415 (CVE-2022-42310): a transaction created a node below a parent removed outside
    it, leaving an orphan no one could delete or account.  The commit fails with EAGAIN and
    no node of the transaction appears."""
    guest, other = store.connect(1), store.connect(1)
    guest.write("parent/keep", "1")
    tx = guest.transaction_start()
    guest.write("parent/child/grandchild", "v", tx)
    other.rm("parent")
    assert errno_of(guest.transaction_end, tx) == "EAGAIN"
    assert errno_of(other.read, "parent/child/grandchild") == "ENOENT"
    assert errno_of(other.read, "parent") == "ENOENT"
    assert_tree_consistent(store)


def test_xsa416_failed_and_repeated_requests_leave_no_memory_behind(store: Store) -> None:
    """XSA-416 (CVE-2022-42319): memory xenstored allocated per request was freed only when
    the connection ended.  Through its ring, a guest sends 10,000 requests that fail or are
    undone (missing reads, forbidden writes, aborted transactions, refused watches): what
    xenstored holds afterwards does not grow with their number."""
    guest = GuestRing(store, 1)
    requests = [
        encode_message(XsType.READ, 1, 0, b"/local/domain/1/missing\0"),
        encode_message(XsType.WRITE, 2, 0, b"/local/domain/2/forbidden\0x"),
        encode_message(XsType.TRANSACTION_START, 3, 0, b"\0"),
        encode_message(XsType.WATCH, 4, 0, b"bad path!\0tok\0"),
        encode_message(XsType.DIRECTORY, 5, 0, b"/local/domain/3\0"),
    ]

    def run(n: int) -> None:
        for i in range(n):
            assert guest.put(requests[i % len(requests)])
            for rtype, _rid, _tx, body in guest.replies():
                if rtype == XsType.TRANSACTION_START:
                    tx_id = int(body.rstrip(b"\0"))
                    assert guest.put(encode_message(XsType.TRANSACTION_END, 6, tx_id, b"F\0"))
                    guest.replies()

    run(1_000)  # warm up: counters, caches
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        run(10_000)
        grown = tracemalloc.get_traced_memory()[0] - base
    finally:
        tracemalloc.stop()
    assert grown < 64 * 1024, f"{grown} bytes"
    assert store.counters(1)["transactions"] == 0
    assert not guest.conn.closed


def test_xsa417_a_new_domain_reusing_a_domid_gets_no_access_of_the_old_one(store: Store) -> None:
    """XSA-417 (CVE-2022-42320): permissions naming a dead domain's id let the next domain
    with that id in.  dom1 lets dom5 read a node; dom5 dies; a new dom5 cannot read it."""
    dom1 = store.connect(1)
    dom1.write("shared", "for dom5 only")
    store.introduce_domain(5)
    dom1.set_perms("shared", ["n1", "r5"])
    assert store.connect(5).read("/local/domain/1/shared") == b"for dom5 only"
    store.release_domain(5)
    assert dom1.get_perms("shared") == ["n1"]
    store.introduce_domain(5)
    assert errno_of(store.connect(5).read, "/local/domain/1/shared") == "EACCES"


@contextmanager
def shallow_stack(frames: int) -> Iterator[None]:
    """Allow only ``frames`` more Python frames than the caller's depth."""
    old = sys.getrecursionlimit()
    sys.setrecursionlimit(len(inspect.stack()) + frames)
    try:
        yield
    finally:
        sys.setrecursionlimit(old)


def test_xsa418_a_deep_tree_cannot_exhaust_xenstoreds_stack(store: Store) -> None:
    """XSA-418 (CVE-2022-42321): xenstored walked the tree recursively; a guest nesting nodes
    deeply crashed it by stack exhaustion.  dom1 nests 990 nodes (its quota allows), watches
    and removes them with a stack of 120 frames: pvio's store walks iteratively."""
    guest = store.connect(1)
    deep = "/".join("d" for _ in range(990))
    assert len(f"/local/domain/1/{deep}") <= 3072
    with shallow_stack(120):
        guest.write(deep, "bottom")
        guest.watch("d", "top")
        guest.take_events()
        assert guest.read(deep) == b"bottom"
        guest.rm("d")
    assert errno_of(guest.read, "d") == "ENOENT"
    assert guest.take_events()[0] == ("d", "top")  # a relative watch: a relative path
    assert store.counters(1)["nodes"] == 1  # its home only
    assert_tree_consistent(store)


def test_xsa419_cooperating_guests_that_reboot_cannot_grow_the_store(store: Store) -> None:
    """XSA-419 (CVE-2022-42322/42323): dom1 lets dom2 write below its home; dom2 creates nodes
    there, reboots, and again: each time its nodes went to dom0, which has no quota.  pvio
    removes a dead domain's nodes, so five reboots leave the store as it was."""
    dom1 = store.connect(1)
    dom1.write("shared", "")
    dom1.set_perms("shared", ["n1", "b2"])
    size = len(store._nodes)
    dom0_nodes = store.counters(0)["nodes"]
    for _reboot in range(5):
        dom1.set_perms("shared", ["n1", "b2"])  # dom1 lets the new dom2 in again
        dom2 = store.connect(2)
        created = 0
        for i in range(2000):
            try:
                dom2.write(f"/local/domain/1/shared/n{i}", "x" * 100)
                created += 1
            except XenstoreError as err:
                assert err.errno == "ENOSPC"
                break
        assert created == store.quota_for(2).nodes - 1  # its home counts too
        store.release_domain(2)
        store.introduce_domain(2)
        assert len(store._nodes) == size
        assert store.counters(0)["nodes"] == dom0_nodes
    assert dom1.directory("shared") == []
    assert_tree_consistent(store)


def test_xsa420_32_bit_fields_are_echoed_or_refused_never_truncated(store: Store) -> None:
    """XSA-420 (CVE-2022-42324): oxenstored truncated 32-bit wire fields to OCaml's 31-bit ints.
    Requests carrying ids at the top of the u32 range are answered with exactly those ids,
    numbers beyond 32 bits in a payload are EINVAL, and a length field of 2**32-1 disconnects
    the guest with a protocol error instead of buffering."""
    guest = GuestRing(store, 1)
    assert guest.put(encode_message(XsType.READ, 0xFFFFFFFF, 0, b"/local/domain/1\0"))
    [(rtype, rid, tx, _)] = guest.replies()
    assert (rtype, rid, tx) == (XsType.READ, 0xFFFFFFFF, 0)
    assert guest.put(encode_message(XsType.READ, 0x80000000, 0x80000001, b"/local/domain/1\0"))
    [(rtype, rid, tx, body)] = guest.replies()
    assert (rtype, rid, tx, body) == (XsType.ERROR, 0x80000000, 0x80000001, b"ENOENT\0")
    rtype, body = guest.call(XsType.DIRECTORY_PART, b"/local/domain/1\0" + b"4294967296\0")
    assert (rtype, body) == (XsType.ERROR, b"EINVAL\0")
    header = struct.pack("<IIII", XsType.WRITE, 1, 0, 0xFFFFFFFF)
    guest.put(header)
    assert guest.conn.closed
    assert struct.unpack_from("<I", guest.page, OFFSET_ERROR)[0] == XENSTORE_ERROR_PROTO
    assert store.counters(1)["disconnects"] == {"protocol": 1}
    other = GuestRing(store, 2)
    assert other.call(XsType.READ, b"/local/domain/2\0") == (XsType.READ, b"")


def test_xsa421_nodes_created_and_deleted_in_one_transaction_are_accounted(store: Store) -> None:
    """XSA-421 (CVE-2022-42325/42326): a node created and deleted in the same transaction
    made the commit apply partially without accounting, so a guest could create any number
    of nodes.  After 20 such transactions the node count is exactly what the tree holds, and
    the quota still stops the guest at its limit."""
    guest = store.connect(1)
    for round_ in range(20):
        tx = guest.transaction_start()
        for i in range(40):
            guest.write(f"r{round_}/n{i}", "x", tx)
        for i in range(0, 40, 2):
            guest.rm(f"r{round_}/n{i}", tx)
        guest.write(f"r{round_}/gone/deep", "x", tx)
        guest.rm(f"r{round_}/gone", tx)
        guest.transaction_end(tx)
        assert_tree_consistent(store)
    assert store.counters(1)["nodes"] == 1 + 20 * (1 + 20)
    created = 0
    while True:
        try:
            guest.write(f"fill{created}", "x")
            created += 1
        except XenstoreError as err:
            assert err.errno == "ENOSPC"
            break
    assert store.counters(1)["nodes"] == store.quota_for(1).nodes
    assert_tree_consistent(store)


# ============================================================================ netback packet shapes


def split_packet(h: NicGuest, frame: bytes, sizes: list[int]) -> list[dict[str, int]]:
    """``frame`` spread over len(sizes) of H's pool pages, ``sizes[k]`` bytes in slot k."""
    assert sum(sizes) == len(frame)
    reqs, pos = [], 0
    for k, size in enumerate(sizes):
        sid = claim(h)
        h.nic.tx_views[sid][:size] = frame[pos : pos + size]
        pos += size
        reqs.append(
            {
                "gref": h.nic.tx_refs[sid],
                "offset": 0,
                "flags": NETTXF_MORE_DATA if k + 1 < len(sizes) else 0,
                "id": sid,
                "size": len(frame) if k == 0 else size,
            }
        )
    return reqs


async def test_xsa423_a_packet_whose_headers_span_slots_is_assembled_before_switching(
    autojump_clock: Any,
) -> None:
    """XSA-423 (CVE-2022-3643): Linux netback passed on packets whose protocol headers were
    split over slots, which NIC drivers mishandled.  H sends a frame whose first slot holds 10
    bytes (less than the Ethernet header) and whose IP/UDP headers span five more slots:
    netback assembles the whole frame before the switch reads its header, so A gets it
    exactly, and the switch learned nothing wrong (A/B unharmed)."""
    async with three_guests() as (env, a, b, h):
        frame = udp_stream(h, a, 1, start=423, size=200)[0]
        push_raw(h, split_packet(h, frame, [10, 4, 8, 12, 8, 8, 150]))
        [got] = await recv_n(a.nic, 1)
        await trio.testing.wait_all_tasks_blocked()
        assert got == frame
        assert drops(env, f"netback/{HOSTILE}") == {}
        await exchange(a, b, 0)
        assert_pair_lost_nothing(env, 1, from_h_at_a=1)


async def test_xsa432_an_unusual_packet_of_many_tiny_slots_is_bounded(
    autojump_clock: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """XSA-432 (CVE-2023-34319): the XSA-423 fix overran a buffer on a packet split in very
    many pieces, its header spread over them.  18 slots, the headers over the first 14 of
    them: delivered exactly; 19: dropped and counted; 21 or more: the vif is disabled."""
    async with three_guests() as (env, a, b, h):
        frame = udp_stream(h, a, 1, start=432, size=120)[0]
        push_raw(h, split_packet(h, frame, [1] * 17 + [len(frame) - 17]))
        [got] = await recv_n(a.nic, 1)
        assert got == frame
        frame19 = udp_stream(h, a, 1, start=433, size=120)[0]
        push_raw(h, split_packet(h, frame19, [1] * 18 + [len(frame19) - 18]))
        await trio.testing.wait_all_tasks_blocked()
        assert drops(env, f"netback/{HOSTILE}") == {"drops.too_many_slots": 1}
        assert env.vif(h).connected
        await exchange(a, b, 0)
        frame21 = udp_stream(h, a, 1, start=434, size=120)[0]
        push_raw(h, split_packet(h, frame21, [1] * 20 + [len(frame21) - 20]))
        await trio.testing.wait_all_tasks_blocked()
        assert env.vif(h).error == "TX packet of more than 20 slots (fatal_skb_slots)"
        assert backend_state(env, h) == XenbusState.CLOSED
        await exchange(a, b, K)
        assert_pair_lost_nothing(env, 2, from_h_at_a=1)


async def test_xsa448_zero_length_fragments_cannot_crash_dom0(
    autojump_clock: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """XSA-448 (CVE-2023-46838): a packet whose later fragments were all zero-length made
    Linux dereference NULL.  pvio's netback answers such a packet ERROR (a zero-size later
    slot is refused as ``bad_offset``), counts and logs it, and keeps the vif up; nothing
    is copied for it and the pair is unharmed."""
    async with three_guests() as (env, a, b, h):
        frame = udp_stream(h, a, 1, start=448)[0]
        reqs = split_packet(h, frame, [len(frame)])
        reqs[0]["flags"] = NETTXF_MORE_DATA
        for k in range(3):
            sid = claim(h)
            reqs.append(
                {"gref": h.nic.tx_refs[sid], "offset": 0, "flags": NETTXF_MORE_DATA if k < 2 else 0,
                 "id": sid, "size": 0}
            )  # fmt: skip
        push_raw(h, reqs)
        await trio.testing.wait_all_tasks_blocked()
        assert env.count(f"netfront/{HOSTILE}", f"tx_errors.{NETIF_RSP_ERROR}") == 4  # one per slot
        assert drops(env, f"netback/{HOSTILE}") == {"drops.bad_offset": 1}
        assert env.count(f"netback/{HOSTILE}", "internal_errors") == 0
        warning = f"{HOSTILE}: TX slot offset 0 + size 0 crosses the page"
        assert netback_log(caplog, logging.WARNING) == [warning]
        assert env.vif(h).connected and h.nic.error is None and len(h.nic.tx_free) == 256
        await exchange(a, b, 0)
        assert_pair_unharmed(env, a, b, 1)
