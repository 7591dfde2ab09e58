"""A malicious guest against the smart NIC, under hypothesis.

The hostile guest H drives its smart NIC by hand (``RawDriver`` of ``test_smartnic``): it
writes random descriptors on both rings (pool indices and grant references, offsets,
lengths, ids, flags), rings doorbells or not, rewrites any ring index, writes any register
(configuration while enabled, ENABLE, RESET), grants pages to the device or to others or
read-only, and fills its pool with frames claiming any source MAC, a bystander's included;
frames from the wire arrive for it at random moments.  The bystander B is an honest guest
with its own smart NIC on the same switch; the peer is a capture port.

Properties, after every sequence of actions:

* nothing escapes: no MMIO write or frame delivery raises, the hypervisor and both guests
  keep running (a broken ring stops only H's device, with the reason logged and counted);
* no access outside what H granted or configured: H's sentinel pages (never granted, not in
  the pool or rings) and all of B's memory outside its own buffers are unchanged;
* H's device holds at most ``RX_QUEUE_MAX`` frames and at most a ring's worth of RX
  descriptors;
* B loses nothing: B's frames reach the peer exactly, and the peer's frames reach B
  exactly, whatever source MAC H claimed.

``make test`` runs a few examples; ``make fuzz`` (``PVIO_FUZZ=1``) runs many more.
"""

from __future__ import annotations

import os
import struct
from typing import Any

import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pvio
from pvio.abi import PAGE_SIZE
from pvio.abi.smartnic import (
    CTRL_ENABLE,
    CTRL_RESET,
    DB_RX,
    DB_TX,
    DESC,
    REG_CTRL,
    REG_DOORBELL,
    REG_MOD_FRAMES,
    REG_MOD_MODE,
    REG_MOD_USECS,
    REG_POOL_BUF_SIZE,
    REG_POOL_COUNT,
    REG_POOL_LO,
    REG_RX_RING_LO,
    REG_TX_RING_LO,
    SNIC_F_GREF,
    SNIC_OK,
    SNIC_RING_ENTRIES,
)
from pvio.abi.xen import DOMID_IO
from pvio.backends.smartnic import RX_QUEUE_MAX, add_smartnic
from pvio.backends.switch import CapturePort, Switch
from tests.guests import Probe, boot, settle
from tests.test_smartnic import BUF_SIZE, PEER_MAC, POOL_BUFS, RawDriver, frame_to

FUZZ = os.environ.get("PVIO_FUZZ") == "1"
FILL = b"sentinel-page-00" * (PAGE_SIZE // 16)
BROADCAST = b"\xff" * 6

# Descriptor fields: mostly near the valid range, sometimes far outside it.
BUF = st.one_of(st.integers(0, POOL_BUFS + 1), st.sampled_from([7, 8, 9, 2047, 2**31, 2**32 - 1]))
OFFSET = st.sampled_from([0, 0, 1, 14, 2000, 2047, 2048, 4095, 4096, 65535])
LENGTH = st.sampled_from([0, 1, 13, 14, 60, 64, 1514, 1515, 2048, 2049, 4096, 65535])
FLAGS = st.sampled_from([0, 0, SNIC_F_GREF, SNIC_F_GREF, 0x2, 0x80, 0xFFFF])
DESCRIPTOR = st.tuples(BUF, OFFSET, LENGTH, st.integers(0, 0xFFFF), FLAGS, st.sampled_from([0, 0, 1]))
CONFIG_REG = st.sampled_from(
    [REG_TX_RING_LO, REG_RX_RING_LO, REG_POOL_LO, REG_POOL_BUF_SIZE, REG_POOL_COUNT, REG_MOD_MODE,
     REG_MOD_FRAMES, REG_MOD_USECS, 0x14, 0x1C, 0x24, 0x30, 0x54, 0x58, 0xFFC]
)  # fmt: skip
VALUE = st.sampled_from([0, 1, 63, 64, 2048, 4096, 65536, 65537, 0x1000, 0x7FFF_F000, 2**32 - 1])
RING_FIELD = st.sampled_from([0, 4, 8, 12])  # req_prod, req_event, rsp_prod, rsp_event
ACTION = st.one_of(
    st.tuples(st.just("tx"), st.lists(DESCRIPTOR, min_size=1, max_size=8), st.booleans()),
    st.tuples(st.just("rx"), st.lists(DESCRIPTOR, min_size=1, max_size=8), st.booleans()),
    st.tuples(st.just("reg"), CONFIG_REG, VALUE),
    st.tuples(st.just("ctrl"), st.sampled_from([CTRL_ENABLE, CTRL_RESET, CTRL_ENABLE | CTRL_RESET, 0x80])),
    st.tuples(st.just("doorbell"), st.sampled_from([DB_TX, DB_RX, DB_TX | DB_RX, 0, 0xFFFFFFFF])),
    st.tuples(st.just("scribble"), st.sampled_from(["tx", "rx"]), RING_FIELD, st.integers(0, 2**32 - 1)),
    st.tuples(st.just("wire"), st.integers(1, 40), st.sampled_from([64, 200, 1514])),
    st.tuples(st.just("grant"), st.sampled_from(["io", "io-ro", "dom0", "revoke"])),
    st.tuples(st.just("sleep"), st.sampled_from([0.0, 0.001, 0.1])),
)
SOURCE = st.sampled_from(["own", "bystander", "peer", "zero", "broadcast"])
DEST = st.sampled_from(["peer", "bystander", "broadcast", "own"])


def configured_pages(nic: Any) -> set[int]:
    """The pages of its guest an enabled device was configured on: both rings and the pool."""
    regs = nic.regs
    gpa = {lo: regs[lo] | regs[lo + 4] << 32 for lo in (REG_TX_RING_LO, REG_RX_RING_LO, REG_POOL_LO)}
    pages = {gpa[REG_TX_RING_LO] >> 12, gpa[REG_RX_RING_LO] >> 12}
    if gpa[REG_POOL_LO]:
        end = gpa[REG_POOL_LO] + regs[REG_POOL_BUF_SIZE] * regs[REG_POOL_COUNT]
        pages |= set(range(gpa[REG_POOL_LO] >> 12, -(-end // PAGE_SIZE)))
    return pages


async def scenario(sources: list[str], dests: list[str], actions: list[tuple[Any, ...]]) -> None:
    async with pvio.Hypervisor(dom0=Probe("dom0")) as hv:
        switch = Switch(hv.counters)
        peer = CapturePort("peer", counters=hv.counters)
        switch.attach(peer)
        h = await boot(hv, Probe("hostile", memory_pages=96), name="hostile")
        b = await boot(hv, Probe("bystander", memory_pages=96), name="bystander")
        h_nic, b_nic = add_smartnic(hv, h.domain, switch), add_smartnic(hv, b.domain, switch)
        hd, bd = RawDriver(h), RawDriver(b)
        bd.enable()
        bd.post_rx(*(DESC.pack(i, 0, BUF_SIZE, 100 + i, 0, 0) for i in range(POOL_BUFS)))
        macs = {"own": h_nic.mac, "bystander": b_nic.mac, "peer": PEER_MAC, "zero": bytes(6)}
        macs["broadcast"] = BROADCAST
        for i in range(POOL_BUFS):  # H's pool: frames claiming the sources hypothesis chose
            src, dst = macs[sources[i % len(sources)]], macs[dests[i % len(dests)]]
            hd.buf(i)[:1514] = frame_to(dst, src, 1514, fill=i)
        sentinels = {g: [g.alloc_page() for _ in range(4)] for g in (h, b)}  # never granted or configured
        for g, pages in sentinels.items():
            for gfn in pages:
                g.page(gfn)[:] = FILL
        grant_pages = [h.alloc_page() for _ in range(2)]
        grants: list[int] = []
        hd.enable()
        configured: set[int] = set()  # pages H's device was enabled on: rings and pool

        for action in actions:  # nothing here may raise
            kind = action[0]
            if kind in ("tx", "rx"):
                ring = hd.tx if kind == "tx" else hd.rx
                descs = action[1][: ring.free_requests]
                ring.send(b"".join(DESC.pack(*d) for d in descs))
                if action[2]:
                    hd.wr(REG_DOORBELL, DB_TX if kind == "tx" else DB_RX)
            elif kind == "reg":
                hd.wr(action[1], action[2])
            elif kind == "ctrl":
                hd.wr(REG_CTRL, action[1])
            elif kind == "doorbell":
                hd.wr(REG_DOORBELL, action[1])
            elif kind == "scribble":
                page = h.page(hd.tx_gfn if action[1] == "tx" else hd.rx_gfn)
                struct.pack_into("<I", page, action[2], action[3])
            elif kind == "wire":
                peer_frames = [frame_to(h_nic.mac, PEER_MAC, action[2], fill=k) for k in range(action[1])]
                switch.input(peer, peer_frames)
            elif kind == "grant":
                if action[1] == "revoke" and grants:
                    h.end_access(grants.pop())
                elif action[1] != "revoke":
                    to = 0 if action[1] == "dom0" else DOMID_IO
                    grants.append(
                        h.grant_access(to, grant_pages[len(grants) % 2], readonly=action[1] == "io-ro")
                    )
            elif kind == "sleep":
                await trio.sleep(action[1])
            assert len(h_nic._rx_queue) <= RX_QUEUE_MAX
            assert len(h_nic._rx_held) <= SNIC_RING_ENTRIES
            if h_nic.enabled:  # configuration registers cannot change while enabled
                configured |= configured_pages(h_nic)
        await settle()

        # Nothing escaped, and H's mistakes stopped at most H's own device.
        assert h.domain.alive and b.domain.alive and hv.dom0 is not None and hv.dom0.alive
        if h_nic.error:  # stopped or refused: counted (and logged)
            assert h_nic.dev["errors.bad_config"] + h_nic.dev["errors.ring_overflow"] > 0
        assert b_nic.enabled and not b_nic.error and b_nic.errors == 0
        for gfn in sentinels[b]:
            assert bytes(b.page(gfn)) == FILL, f"the bystander's page {gfn} was written"
        for gfn in sentinels[h]:
            if gfn not in configured:
                assert bytes(h.page(gfn)) == FILL, (
                    f"H's page {gfn}, never granted nor configured, was written"
                )

        # B loses nothing, both ways.
        peer.frames.clear()
        for i in range(POOL_BUFS):
            bd.buf(i)[:64] = frame_to(PEER_MAC, b_nic.mac, 64, fill=0xB0 + i)
        rx_done = bd.rx_done()  # B's buffers filled during the attack (H's frames, floods): re-posted
        bd.send(*(DESC.pack(i, 0, 64, 200 + i, 0, 0) for i in range(POOL_BUFS)))
        await settle()
        assert bd.tx_done() == [(200 + i, 64, SNIC_OK, 0) for i in range(POOL_BUFS)]
        assert [f for f in peer.frames if f[6:12] == b_nic.mac] == [
            frame_to(PEER_MAC, b_nic.mac, 64, fill=0xB0 + i) for i in range(POOL_BUFS)
        ]
        for _ in range(RX_QUEUE_MAX // POOL_BUFS + 2):  # frames flooded or sent to B meanwhile: take them
            bd.post_rx(*(DESC.pack(c[0] - 100, 0, BUF_SIZE, c[0], 0, 0) for c in rx_done))
            await settle()
            rx_done = bd.rx_done()
            if not rx_done and not b_nic._rx_queue:
                break
        assert not b_nic._rx_queue
        switch.input(peer, [frame_to(b_nic.mac, PEER_MAC, 64, fill=0xC0 + k) for k in range(POOL_BUFS)])
        await settle()
        done = bd.rx_done()
        assert [(c[1], c[2]) for c in done] == [(64, SNIC_OK)] * POOL_BUFS
        assert sorted(bytes(bd.buf(c[0] - 100)[14:15])[0] for c in done) == [
            0xC0 + k for k in range(POOL_BUFS)
        ]


@settings(
    max_examples=2000 if FUZZ else 8,
    deadline=None,
    derandomize=not FUZZ,
    suppress_health_check=list(HealthCheck),
)
@given(
    sources=st.lists(SOURCE, min_size=1, max_size=POOL_BUFS),
    dests=st.lists(DEST, min_size=1, max_size=POOL_BUFS),
    actions=st.lists(ACTION, min_size=1, max_size=30),
)
def test_fuzz_malicious_guest_against_the_smart_nic(
    sources: list[str], dests: list[str], actions: list[tuple[Any, ...]]
) -> None:
    trio.run(scenario, sources, dests, actions, clock=trio.testing.MockClock(autojump_threshold=0))


async def test_a_smart_nic_frame_from_another_source_mac_is_dropped(autojump_clock: Any) -> None:
    """The fuzzer's first finding: H sent one frame with the wire peer's source MAC, the switch
    moved the peer's MAC to H's port, and B's frames to the peer went to H.  The smart NIC's
    port is locked to the device's MAC: the spoofed frame is dropped and counted."""
    async with pvio.Hypervisor(dom0=Probe("dom0")) as hv:
        switch = Switch(hv.counters)
        peer = CapturePort("peer", counters=hv.counters)
        switch.attach(peer)
        switch.input(peer, [frame_to(BROADCAST, PEER_MAC)])  # the peer is learned on its port
        h = await boot(hv, Probe("hostile", memory_pages=96), name="hostile")
        b = await boot(hv, Probe("bystander", memory_pages=96), name="bystander")
        h_nic, b_nic = add_smartnic(hv, h.domain, switch), add_smartnic(hv, b.domain, switch)
        hd, bd = RawDriver(h), RawDriver(b)
        hd.enable()
        bd.enable()
        hd.buf(0)[:64] = frame_to(PEER_MAC, PEER_MAC)
        hd.send(DESC.pack(0, 0, 64, 1, 0, 0))
        assert hd.tx_done() == [(1, 64, SNIC_OK, 0)]  # the device sent it; the switch refused it
        assert switch.counters["drops.spoofed_mac"] == 1
        peer.frames.clear()
        bd.buf(0)[:64] = frame_to(PEER_MAC, b_nic.mac)
        bd.send(DESC.pack(0, 0, 64, 2, 0, 0))
        assert list(peer.frames) == [frame_to(PEER_MAC, b_nic.mac)]
        assert h_nic.dev["packets.rx"] == 0
