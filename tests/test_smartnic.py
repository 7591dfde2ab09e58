"""The smart NIC: its descriptor and completion layouts, DMA from and into guest memory (pool
buffers and grants), interrupt moderation, and a hostile guest whose every bad descriptor is
completed with an error and counted, never raised."""

from __future__ import annotations

import logging
import struct
from typing import Any

import pytest
import trio
import trio.testing

import pvio
from pvio.abi import PAGE_SHIFT, PAGE_SIZE
from pvio.abi.smartnic import (
    CMPL,
    CTRL_ENABLE,
    CTRL_RESET,
    DB_RX,
    DB_TX,
    DESC,
    MOD_ADAPTIVE,
    MOD_FIXED,
    MOD_OFF,
    REG_CTRL,
    REG_DOORBELL,
    REG_ID,
    REG_MOD_FRAMES,
    REG_MOD_LEVEL,
    REG_MOD_MODE,
    REG_MOD_USECS,
    REG_POOL_BUF_SIZE,
    REG_POOL_COUNT,
    REG_POOL_LO,
    REG_RING_ORDER,
    REG_RX_RING_LO,
    REG_STATUS,
    REG_TX_RING_LO,
    SNIC_E_BAD_BUF,
    SNIC_E_BAD_FLAGS,
    SNIC_E_BAD_GRANT,
    SNIC_E_BAD_LEN,
    SNIC_F_GREF,
    SNIC_ID,
    SNIC_IRQ_BASE,
    SNIC_MMIO_BASE,
    SNIC_MMIO_STRIDE,
    SNIC_OK,
    SNIC_RING,
    SNIC_RING_ENTRIES,
    SNIC_RING_ORDER_MAX,
    ST_ENABLED,
    ST_ERROR,
    snic_ring_entries,
)
from pvio.abi.xen import DOMID_IO
from pvio.backends.smartnic import (
    BURST_FRAMES,
    MOD_PROFILES,
    RATE_LEVELS,
    SAMPLE_MIN_FRAMES,
    SmartNic,
    add_smartnic,
    level_for_rate,
    level_for_sample,
)
from pvio.backends.switch import CapturePort, Switch
from pvio.ringbuf import FrontRing
from tests.guests import Probe, boot, settle

BASE = SNIC_MMIO_BASE
PEER_MAC = bytes.fromhex("020000000099")
POOL_BUFS, BUF_SIZE = 8, 2048


def frame_to(dst: bytes, src: bytes, n: int = 64, fill: int = 0x5A) -> bytes:
    return dst + src + struct.pack("!H", 0x88B5) + bytes([fill]) * (n - 14)


class RawDriver:
    """A guest driving the smart NIC by hand: rings, a pool of 8 x 2048 bytes, raw descriptors."""

    def __init__(self, g: Probe, devid: int = 0, pool: int | None = None) -> None:
        """Drive smart NIC ``devid`` of ``g``, with a pool of its own or at ``pool`` (shared)."""
        self.g = g
        self.base = BASE + devid * SNIC_MMIO_STRIDE
        self.tx_gfn, self.rx_gfn = g.alloc_page(), g.alloc_page()
        self.tx = FrontRing(SNIC_RING, g.page(self.tx_gfn))
        self.rx = FrontRing(SNIC_RING, g.page(self.rx_gfn))
        g.domain.on_destroy.append(lambda _d: (self.tx.release(), self.rx.release()))
        if pool is None:
            pages = [g.alloc_page() for _ in range(POOL_BUFS * BUF_SIZE // PAGE_SIZE)]
            assert pages == list(range(pages[0], pages[0] + len(pages)))
            pool = pages[0] << PAGE_SHIFT
        self.pool = pool
        self.port = g.listen(g.evtchn_bind_virq(SNIC_IRQ_BASE + devid))

    def wr(self, reg: int, value: int) -> None:
        self.g.mmio_write(self.base + reg, 4, value)

    def rd(self, reg: int) -> int:
        return self.g.mmio_read(self.base + reg, 4)

    def configure(self, *, tx: int | None = None, mod: tuple[int, int, int] | None = None) -> None:
        self.wr(REG_TX_RING_LO, (self.tx_gfn << PAGE_SHIFT) if tx is None else tx)
        self.wr(REG_RX_RING_LO, self.rx_gfn << PAGE_SHIFT)
        self.wr(REG_POOL_LO, self.pool)
        self.wr(REG_POOL_BUF_SIZE, BUF_SIZE)
        self.wr(REG_POOL_COUNT, POOL_BUFS)
        if mod is not None:
            self.wr(REG_MOD_MODE, mod[0])
            self.wr(REG_MOD_FRAMES, mod[1])
            self.wr(REG_MOD_USECS, mod[2])

    def enable(self, **kwargs: Any) -> None:
        self.configure(**kwargs)
        self.wr(REG_CTRL, CTRL_ENABLE)

    def buf(self, i: int) -> memoryview:
        return self.g.mem[self.pool + i * BUF_SIZE : self.pool + (i + 1) * BUF_SIZE]

    def send(self, *descs: bytes, doorbell: bool = True) -> None:
        self.tx.send(b"".join(descs))
        if doorbell:
            self.wr(REG_DOORBELL, DB_TX)

    def post_rx(self, *descs: bytes, doorbell: bool = True) -> None:
        self.rx.send(b"".join(descs))
        if doorbell:
            self.wr(REG_DOORBELL, DB_RX)

    def tx_done(self) -> list[tuple[int, int, int, int]]:
        return list(CMPL.iter_unpack(self.tx.take_responses()))

    def rx_done(self) -> list[tuple[int, int, int, int]]:
        return list(CMPL.iter_unpack(self.rx.take_responses()))


async def snic_guest(hv: pvio.Hypervisor) -> tuple[RawDriver, SmartNic, Switch, CapturePort]:
    g = await boot(hv, Probe("g", memory_pages=96))
    switch = Switch(hv.counters)
    cap = CapturePort("cap", counters=hv.counters)
    switch.attach(cap)
    nic = add_smartnic(hv, g.domain, switch)
    return RawDriver(g), nic, switch, cap


def test_descriptor_and_completion_layouts() -> None:
    assert DESC.size == 16 and CMPL.size == 8
    assert DESC.pack(0x11223344, 5, 6, 7, 8, 0) == bytes.fromhex("44332211 0500 0600 0700 0800 00000000")
    assert CMPL.pack(7, 64, -3, 0) == bytes.fromhex("0700 4000 fdff 0000")
    assert SNIC_RING.ent_size == 16 and SNIC_RING_ENTRIES == 128


def test_moderation_levels_follow_the_rate_bands() -> None:
    assert [level_for_rate(r) for r in (0, 19_999, 20_000, 75_000, 150_000, 1e9)] == [0, 0, 1, 2, 3, 4]
    assert MOD_PROFILES[0] == (1, 0)


async def test_a_pool_buffer_is_sent_by_dma_and_completed_in_shared_memory(hv: pvio.Hypervisor) -> None:
    d, nic, switch, cap = await snic_guest(hv)
    assert d.rd(REG_ID) == SNIC_ID
    d.enable()
    assert d.rd(REG_STATUS) == ST_ENABLED
    frame = frame_to(PEER_MAC, nic.mac, 100)
    d.buf(3)[: len(frame)] = frame
    exits = d.g.domain.counters["exits"]
    d.send(DESC.pack(3, 0, len(frame), 77, 0, 0))
    assert d.g.domain.counters["exits"] - exits == 1  # the doorbell: the send happens on that exit
    assert list(cap.frames) == [frame]
    assert d.tx_done() == [(77, 100, SNIC_OK, 0)]
    # the frame stayed in guest memory until the capture port copied it out (the switch's copy);
    # the device took only the snapshot of its header
    assert (nic.dev["copies"], switch.counters["copies"]) == (0, 1) and nic.dev["doorbells"] == 1
    assert nic.dev["header_bytes"] == 14


async def test_a_granted_page_is_sent_and_received_into(hv: pvio.Hypervisor) -> None:
    d, nic, _switch, cap = await snic_guest(hv)
    d.enable()
    gfn = d.g.alloc_page()
    ref = d.g.grant_access(DOMID_IO, gfn)
    frame = frame_to(PEER_MAC, nic.mac, 80)
    d.g.page(gfn)[100 : 100 + 80] = frame
    d.send(DESC.pack(ref, 100, 80, 1, SNIC_F_GREF, 0))
    assert list(cap.frames) == [frame] and d.tx_done() == [(1, 80, SNIC_OK, 0)]
    d.post_rx(DESC.pack(ref, 2000, 200, 2, SNIC_F_GREF, 0))
    incoming = frame_to(nic.mac, PEER_MAC, 150)
    nic.switch.input(cap, [incoming])
    assert d.rx_done() == [(2, 150, SNIC_OK, 0)]
    assert bytes(d.g.page(gfn)[2000:2150]) == incoming


@pytest.mark.parametrize(
    ("desc", "status", "reason"),
    [
        (DESC.pack(POOL_BUFS, 0, 64, 9, 0, 0), SNIC_E_BAD_BUF, "bad_buf"),
        (DESC.pack(0, 2000, 64, 9, 0, 0), SNIC_E_BAD_LEN, "bad_len"),  # runs past the 2048-byte buffer
        (DESC.pack(0, 0, 10, 9, 0, 0), SNIC_E_BAD_LEN, "bad_len"),  # shorter than an Ethernet header
        (DESC.pack(0, 0, 64, 9, 0x80, 0), SNIC_E_BAD_FLAGS, "bad_flags"),
        (DESC.pack(5000, 0, 64, 9, SNIC_F_GREF, 0), SNIC_E_BAD_GRANT, "bad_grant"),  # outside the table
        (DESC.pack(8, 0, 64, 9, SNIC_F_GREF, 0), SNIC_E_BAD_GRANT, "bad_grant"),  # not granted
    ],
    ids=["pool-index", "past-buffer", "runt", "flags", "gref-range", "gref-unused"],
)
async def test_a_bad_tx_descriptor_is_completed_with_an_error_and_counted(
    hv: pvio.Hypervisor, desc: bytes, status: int, reason: str
) -> None:
    d, nic, _switch, cap = await snic_guest(hv)
    d.enable()
    good = frame_to(PEER_MAC, nic.mac)
    d.buf(1)[:64] = good
    d.send(desc, DESC.pack(1, 0, 64, 10, 0, 0))
    assert d.tx_done() == [(9, 0, status, 0), (10, 64, SNIC_OK, 0)]  # the good one after it still goes
    assert nic.dev[f"errors.{reason}"] == 1 and d.rd(0x50) == 1
    assert list(cap.frames) == [good]


async def test_grants_to_another_domain_or_read_only_grants_for_rx_are_refused(hv: pvio.Hypervisor) -> None:
    d, nic, _switch, cap = await snic_guest(hv)
    d.enable()
    gfn = d.g.alloc_page()
    to_dom0 = d.g.grant_access(0, gfn)
    read_only = d.g.grant_access(DOMID_IO, gfn, readonly=True)
    d.send(DESC.pack(to_dom0, 0, 64, 1, SNIC_F_GREF, 0))
    assert d.tx_done() == [(1, 0, SNIC_E_BAD_GRANT, 0)]
    d.post_rx(DESC.pack(read_only, 0, 2048, 2, SNIC_F_GREF, 0), DESC.pack(0, 0, BUF_SIZE, 3, 0, 0))
    nic.switch.input(cap, [frame_to(nic.mac, PEER_MAC)])
    assert d.rx_done() == [(2, 0, SNIC_E_BAD_GRANT, 0), (3, 64, SNIC_OK, 0)]


async def test_a_frame_too_big_for_the_posted_buffer_is_dropped_and_the_buffer_kept(
    hv: pvio.Hypervisor,
) -> None:
    d, nic, _switch, cap = await snic_guest(hv)
    d.enable()
    d.post_rx(DESC.pack(0, 0, 100, 1, 0, 0))
    nic.switch.input(cap, [frame_to(nic.mac, PEER_MAC, 500), frame_to(nic.mac, PEER_MAC, 90)])
    assert d.rx_done() == [(1, 90, SNIC_OK, 0)]
    assert nic.dev["drops.rx_too_big"] == 1


async def test_frames_wait_for_buffers_and_the_device_asks_for_an_rx_doorbell(
    hv: pvio.Hypervisor, autojump_clock: Any
) -> None:
    d, nic, _switch, cap = await snic_guest(hv)
    d.enable()
    nic.switch.input(cap, [frame_to(nic.mac, PEER_MAC, 64, fill=i) for i in range(3)])
    await trio.sleep(0.01)  # the device polls, finds no buffer, arms the RX doorbell and sleeps
    doorbells = nic.dev["doorbells"]
    d.rx.send(b"".join(DESC.pack(i, 0, BUF_SIZE, i, 0, 0) for i in range(3)))  # the push asks for it
    d.wr(REG_DOORBELL, DB_RX)
    assert nic.dev["doorbells"] == doorbells + 1
    assert [c[0] for c in d.rx_done()] == [0, 1, 2]
    assert [bytes(d.buf(i)[14:15]) for i in range(3)] == [b"\x00", b"\x01", b"\x02"]


async def test_an_impossible_ring_index_stops_only_this_device(
    hv: pvio.Hypervisor, caplog: pytest.LogCaptureFixture
) -> None:
    d, nic, switch, _cap = await snic_guest(hv)
    d.enable()
    struct.pack_into("<I", d.g.page(d.tx_gfn), 0, 100_000)  # req_prod far beyond the ring
    with caplog.at_level(logging.ERROR, logger="pvio.smartnic"):
        d.wr(REG_DOORBELL, DB_TX)
    assert d.rd(REG_STATUS) == ST_ERROR
    assert nic.dev["errors.ring_overflow"] == 1 and nic not in switch.ports
    assert "stopped" in caplog.text and d.g.domain.alive
    d.wr(REG_CTRL, CTRL_RESET)
    assert d.rd(REG_STATUS) == 0


@pytest.mark.parametrize(
    "bad",
    [
        {"tx": 0x123},  # not page aligned
        {"tx": 0x7FFF_F000},  # a page, but far outside its RAM
    ],
    ids=["unaligned", "outside-ram"],
)
async def test_a_bad_configuration_is_refused_on_enable(hv: pvio.Hypervisor, bad: dict[str, int]) -> None:
    d, nic, switch, _cap = await snic_guest(hv)
    d.configure(**bad)
    d.wr(REG_CTRL, CTRL_ENABLE)
    assert d.rd(REG_STATUS) == ST_ERROR
    assert nic.dev["errors.bad_config"] == 1 and nic not in switch.ports


async def test_a_pool_outside_ram_and_shared_rings_are_refused(hv: pvio.Hypervisor) -> None:
    d, nic, _switch, _cap = await snic_guest(hv)
    d.configure()
    d.wr(REG_POOL_COUNT, 1_000_000)
    d.wr(REG_CTRL, CTRL_ENABLE)
    d.configure(tx=d.rx_gfn << PAGE_SHIFT)
    d.wr(REG_CTRL, CTRL_ENABLE)
    assert nic.dev["errors.bad_config"] == 2 and not nic.enabled


async def test_a_ring_order_too_large_and_rings_that_overlap_are_refused(hv: pvio.Hypervisor) -> None:
    """RING_ORDER above the largest, or two-page rings one page apart (the TX ring's second
    page is the RX ring's first), are refused on ENABLE; nothing is attached."""
    d, nic, switch, _cap = await snic_guest(hv)
    d.configure()
    d.wr(REG_RING_ORDER, SNIC_RING_ORDER_MAX + 1)
    d.wr(REG_CTRL, CTRL_ENABLE)
    assert d.rd(REG_STATUS) == ST_ERROR
    d.wr(REG_RING_ORDER, 1)
    d.configure(tx=(d.rx_gfn - 1) << PAGE_SHIFT)
    d.wr(REG_CTRL, CTRL_ENABLE)
    assert nic.dev["errors.bad_config"] == 2 and not nic.enabled and nic not in switch.ports


async def test_a_ring_of_two_pages_holds_256_descriptors(hv: pvio.Hypervisor) -> None:
    """With RING_ORDER 1 each ring spans two contiguous pages: 256 TX descriptors posted at once
    (more than one page holds) are all completed, in one pass of the device."""
    g = await boot(hv, Probe("g", memory_pages=128))
    switch = Switch(hv.counters)
    cap = CapturePort("cap", counters=hv.counters)
    switch.attach(cap)
    nic = add_smartnic(hv, g.domain, switch)
    d = RawDriver(g)
    pages = [g.alloc_page() for _ in range(4)]
    assert pages == list(range(pages[0], pages[0] + 4))
    ring_bytes = 2 * PAGE_SIZE
    d.tx = FrontRing(SNIC_RING, g.mem[pages[0] << PAGE_SHIFT :][:ring_bytes], size=ring_bytes)
    d.rx = FrontRing(SNIC_RING, g.mem[pages[2] << PAGE_SHIFT :][:ring_bytes], size=ring_bytes)
    assert d.tx.nr_ents == snic_ring_entries(1) == 256
    d.configure(tx=pages[0] << PAGE_SHIFT)
    d.wr(REG_RX_RING_LO, pages[2] << PAGE_SHIFT)
    d.wr(REG_RING_ORDER, 1)
    d.wr(REG_CTRL, CTRL_ENABLE)
    assert d.rd(REG_STATUS) & ST_ENABLED, nic.dev
    frame = frame_to(PEER_MAC, nic.mac)
    d.buf(0)[: len(frame)] = frame
    d.send(*(DESC.pack(0, 0, len(frame), i, 0, 0) for i in range(256)))
    await settle()
    done = d.tx_done()
    assert [c[0] for c in done] == list(range(256)) and {c[2] for c in done} == {SNIC_OK}
    assert nic.dev["packets.tx"] == 256 and len(cap.frames) == 256


async def test_config_writes_while_enabled_and_doorbells_while_disabled_are_ignored(
    hv: pvio.Hypervisor,
) -> None:
    d, nic, _switch, _cap = await snic_guest(hv)
    d.wr(REG_DOORBELL, DB_TX)
    d.enable()
    d.wr(REG_TX_RING_LO, 0)
    d.g.mmio_write(BASE + REG_CTRL, 2, 1)  # a 2-byte store to a 32-bit register
    assert nic.dev["errors.doorbell_disabled"] == 1
    assert nic.dev["errors.config_while_enabled"] == 1 and nic.dev["errors.bad_size"] == 1
    assert nic._gpa(REG_TX_RING_LO) == d.tx_gfn << PAGE_SHIFT


def test_a_sample_of_bursts_is_saturation_whatever_its_rate() -> None:
    top = len(RATE_LEVELS)
    # 64 completions in 4 pushes over a whole second (a slow host): bursts, so saturation.
    assert level_for_sample(64, 4, 1.0, 0) == top
    assert level_for_sample(BURST_FRAMES * 10 - 1, 10, 1.0, 0) == 0  # fewer than 4 per push: the rate
    assert level_for_sample(100, 100, 100 / 150_000, 0) == 3  # one per push at 150k/s
    assert level_for_sample(100, 100, 1.0, 4) == 0  # 100 per second: back to level 0's band
    # Too small a sample never raises the level (one frame in no time is not a high rate) ...
    assert level_for_sample(SAMPLE_MIN_FRAMES - 1, SAMPLE_MIN_FRAMES - 1, 0.0, 1) == 1
    # ... but may lower it.
    assert level_for_sample(SAMPLE_MIN_FRAMES - 1, SAMPLE_MIN_FRAMES - 1, 1.0, 3) == 0
    assert level_for_sample(SAMPLE_MIN_FRAMES, SAMPLE_MIN_FRAMES, 0.0, 1) == top


async def test_the_moderation_timer_waits_while_frames_keep_coming(
    hv: pvio.Hypervisor, autojump_clock: Any
) -> None:
    """While the device finds work the budget is in frames: a host slow enough to let the timer
    pass between two frames does not take an interrupt the MockClock run would not take."""
    d, nic, _switch, cap = await snic_guest(hv)
    d.enable(mod=(MOD_FIXED, 4, 100))
    d.post_rx(*(DESC.pack(i, 0, BUF_SIZE, i, 0, 0) for i in range(8)))
    d.rx.final_check_for_responses(1)
    nic.switch.input(cap, [frame_to(nic.mac, PEER_MAC)])
    autojump_clock.jump(0.001)  # a slow host: 1 ms passes before the next frame, the timer is 100 µs
    nic.switch.input(cap, [frame_to(nic.mac, PEER_MAC)])  # the device is busy: frames, not time
    assert d.g.fired == [] and nic.dev["irqs.raised"] == 0
    nic.switch.input(cap, [frame_to(nic.mac, PEER_MAC)] * 2)  # the 4th frame: the frame budget
    assert nic.dev["irqs.by_frames"] == 1 and nic.dev["irqs.by_timer"] == 0
    assert len(d.rx_done()) == 4
    d.rx.final_check_for_responses(1)
    nic.switch.input(cap, [frame_to(nic.mac, PEER_MAC)])
    await settle()  # no more frames: the device's next pass is idle, and the timer may fire
    await trio.sleep(0.001)
    assert nic.dev["irqs.by_timer"] == 1 and nic.dev["irqs.raised"] == 2


def test_saturation_counts_on_the_real_clock_are_within_2x_of_mockclock() -> None:
    """The same smart NIC stream under MockClock (where time stands still while tasks run) and
    under the real clock of a shared, slow machine: interrupts, exits and hypercalls may differ
    by the scheduler's interleaving, never by more than 2x, since every polling and moderation
    decision at saturation is a budget in polls or frames, not in time.  (Counts, not times.)"""
    from pvio.harness import bench

    async def stream() -> dict[str, int]:
        async with bench.model_env("smartnic") as env:
            return dict((await bench.run_scenario(env, "stream", packets=2000)).totals)

    mock = trio.run(stream, clock=trio.testing.MockClock(autojump_threshold=0))
    real = trio.run(stream)
    # one DMA per frame, one more for each frame that found no RX buffer (the interleaving's)
    assert mock["copies"] == 2000 and 2000 <= real["copies"] <= 4000
    for key in ("interrupts", "exits", "hypercalls"):
        assert real[key] <= 2 * max(1, mock[key]), (key, mock, real)


async def test_no_interrupt_unless_the_guest_asked_for_one(hv: pvio.Hypervisor, autojump_clock: Any) -> None:
    d, nic, _switch, cap = await snic_guest(hv)
    d.enable(mod=(MOD_OFF, 1, 0))
    d.post_rx(*(DESC.pack(i, 0, BUF_SIZE, i, 0, 0) for i in range(4)))
    d.rx.final_check_for_responses(1)  # rsp_event = 1: interrupt me at the first completion
    nic.switch.input(cap, [frame_to(nic.mac, PEER_MAC)])
    await settle()
    assert len(d.g.fired) == 1
    nic.switch.input(cap, [frame_to(nic.mac, PEER_MAC)] * 2)  # not re-armed: no interrupt
    await trio.sleep(0.01)
    assert len(d.g.fired) == 1 and nic.dev["irqs.raised"] == 1
    assert len(d.rx_done()) == 3


async def test_fixed_moderation_waits_for_the_frame_count_or_the_timer(
    hv: pvio.Hypervisor, autojump_clock: Any
) -> None:
    d, nic, _switch, cap = await snic_guest(hv)
    d.enable(mod=(MOD_FIXED, 4, 100))
    d.post_rx(*(DESC.pack(i, 0, BUF_SIZE, i, 0, 0) for i in range(8)))
    d.rx.final_check_for_responses(1)
    t0 = trio.current_time()
    for _ in range(3):
        nic.switch.input(cap, [frame_to(nic.mac, PEER_MAC)])
    await settle()
    assert d.g.fired == []  # 3 < 4 frames and the 100 µs have not passed
    nic.switch.input(cap, [frame_to(nic.mac, PEER_MAC)])
    await settle()
    assert len(d.g.fired) == 1 and nic.dev["irqs.by_frames"] == 1
    assert len(d.rx_done()) == 4
    d.rx.final_check_for_responses(1)
    nic.switch.input(cap, [frame_to(nic.mac, PEER_MAC)])
    t1 = trio.current_time()
    await trio.sleep(0.001)
    assert len(d.g.fired) == 2 and nic.dev["irqs.by_timer"] == 1
    assert nic._last_irq - t1 == pytest.approx(100e-6) and t1 == t0


async def test_adaptive_moderation_climbs_under_load_and_falls_back_at_low_load(
    hv: pvio.Hypervisor, autojump_clock: Any
) -> None:
    d, nic, _switch, cap = await snic_guest(hv)
    d.enable()
    assert d.rd(REG_MOD_LEVEL) == 0

    async def burst() -> None:  # 8 frames at once: time stands still, a rate above every band
        d.post_rx(*(DESC.pack(i, 0, BUF_SIZE, i, 0, 0) for i in range(8)), doorbell=False)
        d.rx.final_check_for_responses(1)
        nic.switch.input(cap, [frame_to(nic.mac, PEER_MAC)] * 8)
        await settle()

    for _ in range(2):
        await burst()
        d.rx_done()
    assert d.rd(REG_MOD_LEVEL) == 2 and nic.dev["irqs.by_frames"] == 2
    await burst()  # level 2 is (32 frames, 50 µs): 8 frames are held back ...
    assert len(d.g.fired) == 2
    await trio.sleep(0.001)  # ... until the 50 µs timer
    assert len(d.g.fired) == 3 and nic.dev["irqs.by_timer"] == 1
    d.rx_done()
    assert d.rd(REG_MOD_LEVEL) == 3  # 8 frames in 50 µs: 160k per second
    for _ in range(3):  # one frame every 10 ms: 100 per second, level 0 band
        await trio.sleep(0.01)
        d.post_rx(DESC.pack(0, 0, BUF_SIZE, 0, 0, 0), doorbell=False)
        d.rx.final_check_for_responses(1)
        nic.switch.input(cap, [frame_to(nic.mac, PEER_MAC)])
        await trio.sleep(0.001)
        d.rx_done()
    assert d.rd(REG_MOD_LEVEL) == 0


async def test_destroying_the_domain_stops_the_device_and_unplugs_it(hv: pvio.Hypervisor) -> None:
    d, nic, switch, _cap = await snic_guest(hv)
    d.enable()
    dom = d.g.domain
    hv.destroy(dom)
    await settle()
    assert nic not in switch.ports and not nic.enabled
    assert hv.iobus.mmio_ranges(dom) == []


def test_the_moderation_curve_trades_interrupts_for_held_frames() -> None:
    """pvio.harness.moderation's points under MockClock (exact counts; latencies not asserted):
    at 1,000 frames/s the adaptive default interrupts once per frame, like no moderation, and a
    fixed setting that gathers k frames takes one interrupt per k; a timer shorter than the gap saves none."""
    from pvio.harness.moderation import curve

    settings = [
        ("adaptive", (MOD_ADAPTIVE, 1, 0)),
        ("off", (MOD_OFF, 1, 0)),
        ("fixed 2", (MOD_FIXED, 2, 1500)),
        ("fixed 4", (MOD_FIXED, 4, 3500)),
        ("timer only", (MOD_FIXED, 64, 200)),
    ]
    points = curve(settings, rate=1000, packets=40)
    assert [(p.label, p.packets, p.interrupts) for p in points] == [
        ("adaptive", 40, 40),
        ("off", 40, 40),
        ("fixed 2", 40, 20),
        ("fixed 4", 40, 10),
        ("timer only", 40, 40),
    ]
