"""The virtual NIC end to end: the vif handshake, data through netfront/netback/switch, counts.

Every test runs under trio's MockClock with autojump (the ``autojump_clock`` fixture):
timeouts are virtual, and the hypervisor seeds trio's scheduler, so a scenario takes the
same interleaving, and the same counts, on every run.
"""

from __future__ import annotations

import importlib.metadata
import logging
from typing import Any

import pytest
import trio
import trio.testing
from scapy.layers.l2 import Ether

from pvio import Hypervisor, XenbusState, XenstoreError
from pvio.backends.netback import BackendVif, VifFatal
from pvio.frontends.netstack import udp_packet
from pvio.harness.demo import DemoResult, build_traffic, run_demo
from tests.netenv import (
    EchoGuest,
    HandmadeFrontend,
    NicGuest,
    ip_of,
    net_env,
    recv_n,
    seq_of,
    udp_stream,
    wait_until,
)

FE_KEYS = (
    "tx-ring-ref",
    "rx-ring-ref",
    "event-channel",
    "request-rx-copy",
    "feature-rx-notify",
    "feature-sg",
)
INIT, INIT_WAIT, CONNECTED, CLOSING, CLOSED = 1, 2, 4, 5, 6


class VifStateLog:
    """Every change of one vif's two ``state`` nodes, read when its watch fires, in order.

    A privileged store session (as the toolstack's) watches ``/local/domain``; the store
    delivers watch events synchronously after each write or commit, so the value read in
    the callback is the value that write left.  It also records what the two directories
    held when the frontend's first key (``tx-ring-ref``) appeared and when the backend
    first went InitWait.
    """

    def __init__(self, hv: Hypervisor, fe_domid: int, devid: int = 0) -> None:
        self.fe = f"/local/domain/{fe_domid}/device/vif/{devid}"
        self.be = f"/local/domain/0/backend/vif/{fe_domid}/{devid}"
        self.states: list[tuple[str, int]] = []
        self.when_fe_keys_appeared: dict[str, str | None] | None = None
        self.when_be_init_wait: dict[str, str | None] | None = None
        self.session = hv.store.connect(0, self._event)
        self.session.watch("/local/domain", "vif-state-log")

    def _read(self, path: str) -> str | None:
        try:
            return self.session.read(path).decode()
        except XenstoreError:
            return None

    def _event(self, path: str, _token: str) -> None:
        for side, directory in (("FE", self.fe), ("BE", self.be)):
            if path == f"{directory}/state" and (value := self._read(path)) is not None:
                self.states.append((side, int(value)))
                if side == "BE" and int(value) == INIT_WAIT and self.when_be_init_wait is None:
                    self.when_be_init_wait = {
                        key: self._read(f"{self.be}/{key}") for key in ("feature-rx-copy", "feature-sg")
                    }
        if path == f"{self.fe}/tx-ring-ref" and self.when_fe_keys_appeared is None:
            seen: dict[str, str | None] = {key: self._read(f"{self.fe}/{key}") for key in FE_KEYS}
            seen["FE state"] = self._read(f"{self.fe}/state")
            seen["BE state"] = self._read(f"{self.be}/state")
            self.when_fe_keys_appeared = seen

    def side(self, side: str) -> list[int]:
        return [value for s, value in self.states if s == side]


# ---------------------------------------------------------------------------- handshake


async def test_handshake_runs_the_xenbus_state_sequence_of_the_fact_sheet(autojump_clock: Any) -> None:
    logs: list[VifStateLog] = []
    a = NicGuest("a", ip_of(0))
    async with net_env(a, announce=False, before_guests=lambda hv: logs.append(VifStateLog(hv, 1))):
        [log_] = logs
        # Toolstack: both Initialising (FE first, as add_vif writes them); netback: InitWait;
        # netfront: Connected (skipping Initialised, as Linux does); netback: Connected.
        assert log_.states == [
            ("FE", INIT),
            ("BE", INIT),
            ("BE", INIT_WAIT),
            ("FE", CONNECTED),
            ("BE", CONNECTED),
        ]
        await a.nic.close()
        # Teardown: FE Closing -> BE Closing -> BE Closed -> FE Closed.
        assert log_.states[5:] == [("FE", CLOSING), ("BE", CLOSING), ("BE", CLOSED), ("FE", CLOSED)]
        assert log_.side("FE") == [INIT, CONNECTED, CLOSING, CLOSED]
        assert log_.side("BE") == [INIT, INIT_WAIT, CONNECTED, CLOSING, CLOSED]


async def test_backend_advertises_its_features_before_going_init_wait(autojump_clock: Any) -> None:
    logs: list[VifStateLog] = []
    async with net_env(NicGuest("a", ip_of(0)), before_guests=lambda hv: logs.append(VifStateLog(hv, 1))):
        assert logs[0].when_be_init_wait == {"feature-rx-copy": "1", "feature-sg": "1"}


async def test_frontend_writes_its_keys_and_connected_in_one_transaction_after_init_wait(
    autojump_clock: Any,
) -> None:
    logs: list[VifStateLog] = []
    a = NicGuest("a", ip_of(0))
    async with net_env(a, before_guests=lambda hv: logs.append(VifStateLog(hv, 1))):
        nic = a.nic
        # When the first key became visible, every other key and state=Connected were there
        # too (one commit), and the backend was waiting in InitWait.
        assert logs[0].when_fe_keys_appeared == {
            "tx-ring-ref": str(nic.tx_ref),
            "rx-ring-ref": str(nic.rx_ref),
            "event-channel": str(nic.port),
            "request-rx-copy": "1",
            "feature-rx-notify": "1",
            "feature-sg": "1",
            "FE state": str(CONNECTED),
            "BE state": str(INIT_WAIT),
        }


@pytest.mark.parametrize("rx_copy", [None, "0"], ids=["key-absent", "key-0"])
async def test_backend_refuses_a_frontend_without_request_rx_copy(
    autojump_clock: Any, caplog: pytest.LogCaptureFixture, rx_copy: str | None
) -> None:
    old = HandmadeFrontend("old", request_rx_copy=rx_copy)
    with caplog.at_level(logging.INFO, logger="pvio"):
        async with net_env(old, announce=False) as env:
            await wait_until(lambda: old.backend_state is not None, what="the backend's answer")
            assert old.backend_state == XenbusState.CLOSED
            vif = env.vif(old)
            assert not vif.connected and vif not in env.switch.ports
            assert env.count("netback/vif1.0", "disconnects") == 1
            assert env.hv.dom0 is not None and env.hv.dom0.state == "running"
            assert env.hv.dom0.maptrack == {}  # the rings were never mapped
    errors = [r for r in caplog.records if r.name == "pvio.netback" and r.levelno == logging.ERROR]
    assert [r.getMessage() for r in errors] == [
        "vif1.0 disabled: frontend did not set request-rx-copy=1 (page flipping is not supported)"
    ]


async def test_close_revokes_every_grant_after_the_backend_lets_go(autojump_clock: Any) -> None:
    a = NicGuest("a", ip_of(0))
    async with net_env(a) as env:
        nic = a.nic
        refs = [nic.tx_ref, nic.rx_ref, *nic.tx_refs, *nic.rx_refs]
        assert len(refs) == 2 + 256 + 256
        assert all(a.gnttab.flags(r) != 0 for r in refs)
        assert env.hv.dom0 is not None and len(env.hv.dom0.maptrack) == 2  # netback maps both rings
        await nic.close()
        assert env.hv.dom0.maptrack == {}
        assert [r for r in refs if a.gnttab.flags(r) != 0] == []
        assert env.count("netfront/vif1.0", "grants_still_mapped") == 0
        assert not env.vif(a).connected and env.vif(a) not in env.switch.ports


# ---------------------------------------------------------------------------- data


async def test_echo_guest_answers_the_demos_arp_icmp_and_udp_probes(autojump_clock: Any) -> None:
    a, b = NicGuest("a", ip_of(0)), EchoGuest("b", ip_of(1))
    async with net_env(a, b):
        probes = build_traffic(a.nic.mac, b.nic.mac)
        answers = []
        for probe in probes:
            await a.nic.send(bytes(probe.packet))
            [answer] = await recv_n(a.nic, 1)
            answers.append((probe.name, bool(probe.check(Ether(answer)))))
        assert answers == [(p.name, True) for p in probes]
        assert len(answers) == 9  # ARP, ICMP, UDP of 18 .. 6000 bytes
        await trio.testing.wait_all_tasks_blocked()
        assert a.nic.pending() == 0  # one answer per probe, nothing else


async def test_a_6000_byte_frame_takes_two_ring_slots_each_way(autojump_clock: Any) -> None:
    a, b = NicGuest("a", ip_of(0)), EchoGuest("b", ip_of(1))
    async with net_env(a, b) as env:
        payload = bytes(i * 7 & 0xFF for i in range(6000))
        frame = udp_packet(a.nic.mac, b.nic.mac, a.ip, b.ip, 40000, 7, payload)
        assert len(frame) == 6042
        rings = (a.nic.tx.req_prod_pvt, b.nic.rx.rsp_cons, b.nic.tx.req_prod_pvt, a.nic.rx.rsp_cons)
        before = env.snapshot()
        await a.nic.send(frame)
        [echo] = await recv_n(a.nic, 1)
        await trio.testing.wait_all_tasks_blocked()
        assert len(echo) == 6042 and echo[-6000:] == payload
        # A's TX request, B's RX response, B's TX request, A's RX response: 2 slots each.
        now = (a.nic.tx.req_prod_pvt, b.nic.rx.rsp_cons, b.nic.tx.req_prod_pvt, a.nic.rx.rsp_cons)
        assert [n - r for n, r in zip(now, rings, strict=True)] == [2, 2, 2, 2]
        diff = env.snapshot().diff(before)
        assert diff["dom0"]["grant.copies"] == 8  # 2 slots x (A TX, B RX, B TX, A RX)
        assert diff["dom0"]["grant.copy_bytes"] == 4 * 6042


async def test_send_batch_of_more_frames_than_the_ring_delivers_every_frame_in_order(
    autojump_clock: Any,
) -> None:
    a, b = NicGuest("a", ip_of(0)), NicGuest("b", ip_of(1))
    async with net_env(a, b) as env:
        tx_before = a.nic.tx.req_prod_pvt
        await a.nic.send_batch(udp_stream(a, b, 300))
        got = await recv_n(b.nic, 300)
        await trio.testing.wait_all_tasks_blocked()
        assert [seq_of(f) for f in got] == list(range(300))
        assert b.nic.pending() == 0
        assert a.nic.tx.req_prod_pvt - tx_before == 300  # more than the 256 slots: the pool was reused
        assert env.count("switch/switch0", "forwarded") == 300
        assert sum(v for k, v in env.hv.counters["netback/vif2.0"].items() if k.startswith("drops.")) == 0


async def test_rx_queue_overflow_is_counted_and_nothing_else_is_lost(autojump_clock: Any) -> None:
    # B's domain is paused: it takes no upcall, so its netfront re-posts no RX buffer.
    # Netback fills B's 256 posted buffers, then queues up to rx_queue_max frames, then drops.
    # (A batch from the switch enters the queue whole before netback moves it to the ring,
    # so the buffers are filled in batches no larger than the queue.)
    queue_max, extra = 64, 40
    a, b = NicGuest("a", ip_of(0)), NicGuest("b", ip_of(1))
    async with net_env(a, b, rx_queue_max=queue_max) as env:
        env.hv.pause(b.domain)
        for start in range(0, 256, queue_max):
            await a.nic.send_batch(udp_stream(a, b, queue_max, start=start))
            await trio.testing.wait_all_tasks_blocked()
        assert env.count("netback/vif2.0", "packets.rx") == 256
        assert env.count("netback/vif2.0", "drops.rx_queue_full") == 0
        await a.nic.send_batch(udp_stream(a, b, queue_max + extra, start=256))
        await trio.testing.wait_all_tasks_blocked()
        assert env.count("netback/vif2.0", "packets.rx") == 256
        assert env.count("netback/vif2.0", "drops.rx_queue_full") == extra
        env.hv.unpause(b.domain)
        got = await recv_n(b.nic, 256 + queue_max)
        await trio.testing.wait_all_tasks_blocked()
        # The first 256 + 64 frames arrive, in order; the last 40 were the ones dropped.
        assert [seq_of(f) for f in got] == list(range(256 + queue_max))
        assert b.nic.pending() == 0
        sent = env.count("netfront/vif1.0", "packets.tx") - 1  # minus A's announce frame
        assert sent == 256 + queue_max + extra
        delivered = env.count("netfront/vif2.0", "packets.rx")
        assert sent == delivered + env.count("netback/vif2.0", "drops.rx_queue_full")


@pytest.mark.parametrize(("queue_bytes", "queued"), [(None, 512), (4 << 20, 1500)])
async def test_the_rx_queue_is_bounded_in_bytes_by_its_staging_pages(
    autojump_clock: Any, queue_bytes: int | None, queued: int
) -> None:
    # B is paused with its 256 buffers filled; 1500 full-size frames then queue for it.  Two
    # fit in a staging page: the default queue (256 pages, 1 MiB) holds 512 of them whatever
    # rx_queue_max says, and drops the rest; a 4 MiB queue (1024 pages) holds them all.
    a, b = NicGuest("a", ip_of(0)), NicGuest("b", ip_of(1))
    async with net_env(a, b, rx_queue_max=2000, rx_queue_bytes=queue_bytes, dom0_pages=None) as env:
        env.hv.pause(b.domain)
        await a.nic.send_batch(udp_stream(a, b, 256, size=1514))
        await trio.testing.wait_all_tasks_blocked()
        for start in range(256, 256 + 1500, 250):
            await a.nic.send_batch(udp_stream(a, b, 250, size=1514, start=start))
            await trio.testing.wait_all_tasks_blocked()
        vif = env.vif(b)
        assert len(vif._rx_queue) == queued
        assert env.count("netback/vif2.0", "drops.rx_queue_full") == 1500 - queued
        assert len(vif._stage_pages) == 256 + max(256, (queue_bytes or 0) // 4096)
        env.hv.unpause(b.domain)
        got = await recv_n(b.nic, 256 + queued)
        assert [seq_of(f) for f in got] == list(range(256 + queued))


class SpinGuard(trio.abc.Instrument):
    """Stop netback's service loop if it runs ``_rx_work`` over and over in one task step.

    A loop that never yields cannot be stopped by any trio timeout: the test would hang.
    The guard raises VifFatal instead, which netback handles by disabling that vif, so
    the test fails on the frames that never arrive (and ``tripped`` says why).
    """

    def __init__(self, limit: int = 100) -> None:
        self.limit = limit
        self.calls = 0
        self.tripped = False

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        self.calls = 0

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        rx_work = BackendVif._rx_work

        def guarded(vif: BackendVif) -> int:
            self.calls += 1
            if self.calls > self.limit:
                self.tripped = True
                raise VifFatal(f"{vif.vif_name}: netback's service loop does not yield")
            return rx_work(vif)

        monkeypatch.setattr(BackendVif, "_rx_work", guarded)
        trio.lowlevel.add_instrument(self)


async def test_a_frame_needing_more_buffers_than_posted_waits_for_them(
    autojump_clock: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Regression: with 1 buffer posted and a 2-slot frame queued, netback's service loop
    # found "work" on every final check and spun without yielding, freezing every domain.
    guard = SpinGuard()
    guard.install(monkeypatch)
    a, b = NicGuest("a", ip_of(0)), NicGuest("b", ip_of(1))
    async with net_env(a, b) as env:
        env.hv.pause(b.domain)
        await a.nic.send_batch(udp_stream(a, b, 255))
        await wait_until(lambda: env.count("netback/vif2.0", "packets.rx") == 255, what="255 of B's buffers")
        await a.nic.send(udp_stream(a, b, 1, size=6000, start=255)[0])
        await trio.testing.wait_all_tasks_blocked()
        assert not guard.tripped
        assert env.count("netback/vif2.0", "packets.rx") == 255  # the big frame waits for a 2nd buffer
        env.hv.unpause(b.domain)
        got = await recv_n(b.nic, 256)
        assert [seq_of(f) for f in got] == list(range(256))
        assert len(got[-1]) == 6000


# ---------------------------------------------------------------------------- exact counts


async def test_demo_counts_are_exact_and_identical_on_every_run(autojump_clock: Any) -> None:
    first: DemoResult = await run_demo()
    second: DemoResult = await run_demo()
    assert first.lost == 0 and all(ok for _, _, ok in first.checked)
    assert first.counters is not None and second.counters is not None
    assert first.counters.as_dict() == second.counters.as_dict()
    c = first.counters
    # 9 probes; each is one frame A -> B and its echo B -> A, and each leg goes the same way:
    # the sender's TX push notifies netback (always asleep with req_event armed): one
    # interrupt in dom0, one grant-copy hypercall for the frame, one TX-response
    # notification back to the sender (an interrupt there), the frame switched to the other
    # vif, one grant-copy hypercall into the receiver's buffer and one RX notification (an
    # interrupt in the receiver).  The receiver re-posts its buffer without notifying:
    # netback arms the RX req_event only while frames wait for buffers.
    # So per probe: dom0 2 interrupts, A and B 2 each (a TX response and an RX).
    assert {d: c[d]["interrupts"] for d in ("dom0", "dom1", "dom2")} == {"dom0": 18, "dom1": 18, "dom2": 18}
    # dom0 per probe: 4 grant copies + 4 event sends + 2 SCHEDOP_block = 10.
    # A guest per probe: 1 event send (its TX push) + 2 SCHEDOP_block (one per interrupt) = 3.
    assert {d: c[d]["hypercalls"] for d in ("dom0", "dom1", "dom2")} == {"dom0": 90, "dom1": 27, "dom2": 27}
    assert c["dom0"]["hypercalls.grant_table_op.copy"] == 36
    assert c["dom0"]["hypercalls.event_channel_op.send"] == 36
    notifications = {
        dev: (c.get_count(dev, "notifications.sent"), c.get_count(dev, "notifications.suppressed"))
        for dev in ("netfront/vif1.0", "netfront/vif2.0", "netback/vif1.0", "netback/vif2.0")
    }
    assert notifications == {
        "netfront/vif1.0": (9, 9),  # per probe: the TX push notifies, the RX re-post does not
        "netfront/vif2.0": (9, 9),
        "netback/vif1.0": (18, 0),  # per probe: a TX response and an RX delivery, both notified
        "netback/vif2.0": (18, 0),
    }
    # One copy per slot per leg: 8 single-slot probes x 4 legs + the 6042-byte one, 2 slots x 4.
    assert c["dom0"]["grant.copies"] == 8 * 4 + 2 * 4
    assert c["dom0"]["grant.copy_bytes"] == 4 * sum(size for _, size, _ in first.checked) == 39024
    assert c.total("grant.copies", "domain") == c["dom0"]["grant.copies"]  # guests never copy


async def _stream_counts(frames: int, batch: int) -> dict[str, Any]:
    a, b = NicGuest("a", ip_of(0)), NicGuest("b", ip_of(1))
    async with net_env(a, b) as env:
        stream = udp_stream(a, b, frames)
        before = env.snapshot()
        got: list[bytes] = []

        async def receive() -> None:
            got.extend(await recv_n(b.nic, frames))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(receive)
            for i in range(0, frames, batch):
                await a.nic.send_batch(stream[i : i + batch])
        await trio.testing.wait_all_tasks_blocked()
        assert [seq_of(f) for f in got] == list(range(frames))
        return env.snapshot().diff(before).as_dict()


async def test_stream_counts_are_exact_and_identical_on_every_run(autojump_clock: Any) -> None:
    counts = await _stream_counts(1024, 64)
    assert await _stream_counts(1024, 64) == counts
    doms, devs = counts["domains"], counts["devices"]
    # 1024 frames of 64 bytes in send_batch calls of 64.  send_batch does not yield while
    # the TX pool has room, so A stages 4 batches (256 slots, the whole pool) before it
    # waits; the frames go in 4 rounds of 256.  Per round: A's first push notifies netback
    # (its req_event is armed), the next 3 are suppressed (req_event already passed); dom0
    # takes one interrupt, copies the 256 frames in one grant-copy hypercall, answers them
    # with one notified push, switches them to B's vif, copies them into B's buffers in one
    # hypercall and notifies B once; B takes one interrupt, reads 256 frames and re-posts
    # 256 buffers (not notified: nothing waits for them); A takes one interrupt for its TX
    # responses, which frees the pool for the next round.
    assert {d: doms[d]["interrupts"] for d in doms} == {"dom0": 4, "dom1": 4, "dom2": 4}
    # dom0 per round: 2 grant copies + 2 event sends + 1 SCHEDOP_block; A: 1 send + 1 block;
    # B: 1 block.
    assert {d: doms[d]["hypercalls"] for d in doms} == {"dom0": 20, "dom1": 8, "dom2": 4}
    assert doms["dom0"]["grant.copies"] == 2 * 1024
    assert doms["dom0"]["grant.copy_bytes"] == 2 * 1024 * 64
    notifications = {
        dev: (devs[dev].get("notifications.sent", 0), devs[dev].get("notifications.suppressed", 0))
        for dev in ("netfront/vif1.0", "netfront/vif2.0", "netback/vif1.0", "netback/vif2.0")
    }
    assert notifications == {
        "netfront/vif1.0": (4, 12),
        "netfront/vif2.0": (0, 4),
        "netback/vif1.0": (4, 0),
        "netback/vif2.0": (4, 0),
    }


# ---------------------------------------------------------------------------- custom backend


async def test_lossy_backend_from_the_entry_point_drops_every_third_frame_each_way(
    autojump_clock: Any,
) -> None:
    eps = {ep.name: ep for ep in importlib.metadata.entry_points(group="pvio.backends")}
    assert "lossy" in eps
    n = 30
    a, b = NicGuest("a", ip_of(0)), NicGuest("b", ip_of(1))
    # No announce: it would be A's first TX frame through the lossy stage.  With two
    # guests, A's frames to the still unknown B are flooded to B's port alone.
    async with net_env(a, b, backend="lossy", backend_options={"drop_every": 3}, announce=False) as env:
        assert env.netback.backend_cls is eps["lossy"].load()
        await a.nic.send_batch(udp_stream(a, b, n))
        # Every third frame is dropped leaving A (tx of vif1.0), then every third survivor
        # entering B (rx of vif2.0).
        after_tx = [i for i in range(n) if (i + 1) % 3]
        after_rx = [s for j, s in enumerate(after_tx) if (j + 1) % 3]
        got = await recv_n(b.nic, len(after_rx))
        await trio.testing.wait_all_tasks_blocked()
        assert [seq_of(f) for f in got] == after_rx
        assert b.nic.pending() == 0
        assert env.count("backend/vif1.0", "drops.injected_loss") == 10
        assert env.count("backend/vif2.0", "drops.injected_loss") == 6
        assert n == len(got) + 10 + 6  # every frame sent is delivered or counted dropped


# ---------------------------------------------------------------------------- lifetime


async def test_rings_let_go_of_guest_memory_when_the_domains_are_destroyed(autojump_clock: Any) -> None:
    # A ring exports its page's memoryview to C.  A view still exported when it becomes
    # garbage crashes CPython 3.11's collector (gh-77894), so the drivers release their
    # rings when their domain is destroyed (and netback also at a vif's teardown).  A
    # view with no export left can be released: that is what is checked here.
    # A released ring also drops its reference, so the page's owner may unmap it.
    a, b = NicGuest("a", ip_of(0)), NicGuest("b", ip_of(1))
    async with net_env(a, b) as env:
        vif_a, vif_b = env.vif(a), env.vif(b)
        rings = [a.nic.tx, a.nic.rx, b.nic.tx, b.nic.rx, vif_a.tx, vif_a.rx, vif_b.tx, vif_b.rx]
        buffers = [ring._buffer for ring in rings]
        await b.nic.close()  # B's vif is torn down while the hypervisor runs
        with pytest.raises(BufferError):
            vif_a.tx._buffer.release()  # connected: still exported
        assert vif_b.rx._buffer is None  # torn down: let go of
        buffers[-1].release()  # ... and no export is left
    assert all(ring._buffer is None for ring in rings)
    for buffer in buffers:
        buffer.release()


DOM0_RESERVED_PAGES = 41  # dom0's pages that are not its allocator's: start of day, tables, scratch


async def test_a_closed_vif_gives_its_staging_pages_back_to_dom0(autojump_clock: Any) -> None:
    a, b = NicGuest("a", ip_of(0)), NicGuest("b", ip_of(1))
    async with net_env(a, b) as env:
        assert env.hv.dom0 is not None
        dom0 = env.hv.dom0.kernel
        free = len(dom0._page_free)  # type: ignore[attr-defined]
        assert free == 4096 - DOM0_RESERVED_PAGES - 2 * 512  # 256 TX + 256 RX staging pages per vif
        await b.nic.close()
        assert len(dom0._page_free) == free + 512  # type: ignore[attr-defined]


async def test_a_vif_dom0_has_no_memory_for_is_refused_and_the_others_keep_running(
    autojump_clock: Any, caplog: pytest.LogCaptureFixture
) -> None:
    # dom0 has room for the staging pages of two vifs and 100 pages more.
    a, b, c = NicGuest("a", ip_of(0)), NicGuest("b", ip_of(1)), NicGuest("c", ip_of(2))
    pages = DOM0_RESERVED_PAGES + 2 * 512 + 100
    async with net_env(a, b, c, dom0_pages=pages, wait_ready=[a, b]) as env:
        vif = env.vif(c)
        await wait_until(lambda: vif.error is not None, what="netback to refuse vif3.0")
        reason = "dom0 has 100 of the 512 staging pages a vif needs"
        assert vif.error == reason and not vif.connected
        errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
        assert errors == [  # netback's reason, and c's netfront giving up with it
            f"vif3.0 disabled: {reason}",
            f"dom3 stopped: kernel raised NetfrontError: vif3.0: the backend "
            f"(/local/domain/0/backend/vif/3/0) refused the vif: {reason}",
        ]
        assert env.hv.dom0 is not None and env.hv.dom0.state == "running"
        assert len(env.hv.dom0.kernel._page_free) == 100  # type: ignore[attr-defined]  # given back
        await a.nic.send_batch(udp_stream(a, b, 50))
        assert [seq_of(f) for f in await recv_n(b.nic, 50)] == list(range(50))


@pytest.mark.parametrize("proto", ["tcp", "udp"])
def test_netback_completes_an_offloaded_checksum(proto: str) -> None:
    """NETTXF_CSUM_BLANK frames carry only the pseudo-header sum; the completed frame equals
    the one with a full checksum (what Linux's netfront relies on for TCP and UDP)."""
    import struct as st

    from scapy.layers.inet import IP, TCP, UDP
    from scapy.layers.l2 import Ether

    from pvio.ringbuf.netif import complete_checksum

    l4 = TCP(sport=1, dport=2) / b"hello" if proto == "tcp" else UDP(sport=1, dport=2) / b"hello!"
    good = bytes(Ether() / IP(src="10.0.0.1", dst="10.0.0.2") / l4)
    partial = bytearray(good)
    field = 14 + 20 + (16 if proto == "tcp" else 6)
    s = sum(st.unpack("!HHHH", partial[26:34])) + partial[23] + len(good) - 34
    s = (s & 0xFFFF) + (s >> 16)
    partial[field : field + 2] = s.to_bytes(2, "big")
    assert complete_checksum(bytes(partial)) == good
    assert complete_checksum(b"\x00" * 20) == b"\x00" * 20  # not IPv4: unchanged
