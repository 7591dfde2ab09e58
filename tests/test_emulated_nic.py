"""The emulated NIC: its register map as a guest drives it, one counted exit per access, an
interrupt per event with status read and acknowledge, and a hostile guest that can only
earn itself counted errors."""

from __future__ import annotations

import struct

import pytest

import pvio
from pvio.abi.emunic import (
    CMD_ENABLE,
    CMD_RESET,
    CMD_RX_POP,
    CMD_TX,
    EMUNIC_IRQ_BASE,
    EMUNIC_MMIO_BASE,
    EMUNIC_PIO_BASE,
    ISR_ROK,
    ISR_RXOVW,
    ISR_TER,
    ISR_TOK,
    REG_CMD,
    REG_IMR,
    REG_IRQ,
    REG_ISR,
    REG_MAC_HI,
    REG_MAC_LO,
    REG_RXCOUNT,
    REG_RXDATA,
    REG_RXLEN,
    REG_STATUS,
    REG_TXDATA,
    REG_TXLEN,
    RX_FIFO_FRAMES,
    ST_ENABLED,
    ST_RX_READY,
)
from pvio.backends.emulated_nic import EmulatedNic, add_emulated_nic
from pvio.backends.switch import CapturePort, Switch
from pvio.frontends.emulated_nic_driver import EmulatedNicDriver
from tests.guests import Probe, boot, settle

BASE = EMUNIC_PIO_BASE
PEER_MAC = bytes.fromhex("020000000099")


def frame_to(dst: bytes, src: bytes, n: int = 64, fill: int = 0xA5) -> bytes:
    return dst + src + struct.pack("!H", 0x88B5) + bytes([fill]) * (n - 14)


async def nic_guest(hv: pvio.Hypervisor) -> tuple[Probe, EmulatedNic, Switch, CapturePort]:
    """A probe guest with an emulated NIC on a switch whose other port captures."""
    g = await boot(hv, Probe("g"))
    switch = Switch(hv.counters)
    capture = CapturePort("cap", counters=hv.counters)
    switch.attach(capture)
    nic = add_emulated_nic(hv, g.domain, switch)
    return g, nic, switch, capture


def write_frame(g: Probe, frame: bytes) -> None:
    g.outl(BASE + REG_TXLEN, len(frame))
    padded = frame + bytes(-len(frame) % 4)
    for i in range(0, len(padded), 4):
        g.outl(BASE + REG_TXDATA, int.from_bytes(padded[i : i + 4], "little"))


async def test_a_guest_reads_mac_irq_and_status_through_ports(hv: pvio.Hypervisor) -> None:
    g, nic, _switch, _cap = await nic_guest(hv)
    mac = g.inl(BASE + REG_MAC_LO).to_bytes(4, "little") + g.inw(BASE + REG_MAC_HI).to_bytes(2, "little")
    assert mac == nic.mac == bytes.fromhex("525400") + bytes([0, g.domain.domid, 0])
    assert g.inl(BASE + REG_IRQ) == EMUNIC_IRQ_BASE
    assert g.inl(BASE + REG_STATUS) == 0
    g.outl(BASE + REG_CMD, CMD_ENABLE)
    assert g.inl(BASE + REG_STATUS) & ST_ENABLED
    assert g.inb(BASE + REG_MAC_LO + 3) == nic.mac[3]  # a narrow read at an offset reads those bytes


async def test_a_frame_written_through_the_data_port_goes_out_on_the_tx_command(hv: pvio.Hypervisor) -> None:
    g, nic, _switch, cap = await nic_guest(hv)
    g.outl(BASE + REG_CMD, CMD_ENABLE)
    frame = frame_to(PEER_MAC, nic.mac, 61)  # not a multiple of 4: the last write carries padding
    before = g.domain.counters["exits.pio"]
    write_frame(g, frame)
    g.outl(BASE + REG_CMD, CMD_TX)
    assert list(cap.frames) == [frame]
    assert g.domain.counters["exits.pio"] - before == 1 + 16 + 1  # TXLEN, 16 data writes, CMD
    assert g.inl(BASE + REG_ISR) == ISR_TOK
    assert nic.dev["packets.tx"] == 1 and nic.dev["copies"] == 1


async def test_each_event_raises_one_interrupt_until_acknowledged(hv: pvio.Hypervisor) -> None:
    g, nic, _switch, cap = await nic_guest(hv)
    port = g.listen(g.evtchn_bind_virq(EMUNIC_IRQ_BASE))
    g.outl(BASE + REG_IMR, ISR_ROK | ISR_TOK)
    g.outl(BASE + REG_CMD, CMD_ENABLE)
    interrupts = g.interrupts
    cap_frame = frame_to(nic.mac, PEER_MAC)
    nic.switch.input(cap, [cap_frame])  # a frame arrives: ROK, the line rises
    await settle()
    assert g.fired == [port] and g.interrupts == interrupts + 1
    nic.switch.input(cap, [cap_frame])  # ROK still pending: the line is already up, no new interrupt
    await settle()
    assert g.fired == [port] and nic.dev["irqs.raised"] == 1
    assert g.inl(BASE + REG_RXCOUNT) == 2
    g.outl(BASE + REG_ISR, ISR_ROK)  # acknowledge
    nic.switch.input(cap, [cap_frame])
    await settle()
    assert g.fired == [port, port] and nic.dev["irqs.raised"] == 2


async def test_masked_events_raise_nothing_until_unmasked(hv: pvio.Hypervisor) -> None:
    g, nic, _switch, cap = await nic_guest(hv)
    g.listen(g.evtchn_bind_virq(EMUNIC_IRQ_BASE))
    g.outl(BASE + REG_CMD, CMD_ENABLE)  # IMR is 0 after reset
    nic.switch.input(cap, [frame_to(nic.mac, PEER_MAC)])
    await settle()
    assert g.fired == [] and g.inl(BASE + REG_ISR) == ISR_ROK
    g.outl(BASE + REG_IMR, ISR_ROK)
    await settle()
    assert len(g.fired) == 1


async def test_received_frames_are_read_through_the_data_port_in_order(hv: pvio.Hypervisor) -> None:
    g, nic, _switch, cap = await nic_guest(hv)
    g.outl(BASE + REG_CMD, CMD_ENABLE)
    frames = [frame_to(nic.mac, PEER_MAC, n, fill=n) for n in (60, 64, 97)]
    nic.switch.input(cap, frames)
    got = []
    while n := g.inl(BASE + REG_RXLEN):
        words = [g.inl(BASE + REG_RXDATA) for _ in range((n + 3) // 4)]
        got.append(b"".join(w.to_bytes(4, "little") for w in words)[:n])
        g.outl(BASE + REG_CMD, CMD_RX_POP)
    assert got == frames
    assert not g.inl(BASE + REG_STATUS) & ST_RX_READY


async def test_a_full_rx_fifo_drops_and_flags_overflow(hv: pvio.Hypervisor) -> None:
    g, nic, _switch, cap = await nic_guest(hv)
    g.outl(BASE + REG_CMD, CMD_ENABLE)
    nic.switch.input(cap, [frame_to(nic.mac, PEER_MAC)] * (RX_FIFO_FRAMES + 3))
    assert g.inl(BASE + REG_RXCOUNT) == RX_FIFO_FRAMES
    assert nic.dev["drops.rx_fifo_full"] == 3
    assert g.inl(BASE + REG_ISR) == ISR_ROK | ISR_RXOVW


async def test_frames_for_a_disabled_or_reset_card_are_dropped_and_counted(hv: pvio.Hypervisor) -> None:
    g, nic, switch, _cap = await nic_guest(hv)
    g.outl(BASE + REG_CMD, CMD_ENABLE)
    nic.transmit([frame_to(nic.mac, PEER_MAC)])
    g.outl(BASE + REG_CMD, CMD_RESET)
    assert g.inl(BASE + REG_RXLEN) == 0 and g.inl(BASE + REG_ISR) == 0
    nic.transmit([frame_to(nic.mac, PEER_MAC)])
    assert nic.dev["drops.rx_disabled"] == 1
    assert nic in switch.ports  # still attached: a reset is not an unplug


@pytest.mark.parametrize(
    ("program", "error"),
    [
        (lambda g: g.outl(BASE + REG_TXLEN, 5000), "tx_bad_length"),
        (lambda g: g.outl(BASE + REG_TXLEN, 8), "tx_bad_length"),  # a runt, shorter than a header
        (lambda g: (g.outl(BASE + REG_TXLEN, 64), g.outl(BASE + REG_TXDATA, 1)), "tx_short"),
    ],
    ids=["too-long", "runt", "short"],
)
async def test_a_bad_transmit_is_refused_with_ter_and_counted(
    hv: pvio.Hypervisor, program: object, error: str
) -> None:
    g, nic, _switch, cap = await nic_guest(hv)
    g.outl(BASE + REG_CMD, CMD_ENABLE)
    program(g)  # type: ignore[operator]
    g.outl(BASE + REG_CMD, CMD_TX)
    assert g.inl(BASE + REG_ISR) == ISR_TER
    assert nic.dev[f"errors.{error}"] == 1
    assert list(cap.frames) == []


async def test_hostile_register_accesses_are_counted_never_raised(hv: pvio.Hypervisor) -> None:
    g, nic, _switch, _cap = await nic_guest(hv)
    g.outl(BASE + REG_TXLEN, 64)
    for _ in range(600):  # 2400 bytes into a 2048-byte buffer
        g.outl(BASE + REG_TXDATA, 0xFFFF_FFFF)
    assert nic.dev["errors.tx_overrun"] == 88
    g.outl(BASE + REG_CMD, CMD_TX)  # while disabled
    assert nic.dev["errors.tx_disabled"] == 1
    assert g.inl(BASE + 0x3C) == 0xFFFF_FFFF  # inside the window, no register
    g.outl(BASE + 0x3C, 1)
    g.outb(BASE + REG_IMR + 1, 1)  # a write that is not at a register's offset
    assert nic.dev["errors.bad_register"] == 3
    assert g.inl(BASE + REG_RXDATA) == 0
    g.outl(BASE + REG_CMD, CMD_RX_POP)
    assert nic.dev["errors.rx_empty_read"] == 1 and nic.dev["errors.rx_pop_empty"] == 1
    assert g.mmio_read(EMUNIC_MMIO_BASE + REG_STATUS, 8) == (1 << 64) - 1
    assert nic.dev["errors.bad_size"] == 1
    assert g.domain.counters["iobus.device_errors"] == 0 and g.domain.alive


async def test_the_mmio_window_is_the_same_register_map(hv: pvio.Hypervisor) -> None:
    g, nic, _switch, cap = await nic_guest(hv)
    g.mmio_write(EMUNIC_MMIO_BASE + REG_CMD, 4, CMD_ENABLE)
    assert g.inl(BASE + REG_STATUS) & ST_ENABLED
    nic.switch.input(cap, [frame_to(nic.mac, PEER_MAC)])
    assert g.mmio_read(EMUNIC_MMIO_BASE + REG_RXLEN, 4) == 64
    assert g.domain.counters["exits.mmio"] == 2


async def test_two_guests_talk_through_their_drivers_with_exits_and_interrupts_counted(
    hv: pvio.Hypervisor,
) -> None:
    switch = Switch(hv.counters)

    class Driven(Probe):
        async def main(self) -> None:
            self.nic = EmulatedNicDriver(self, use_mmio=self.name == "b")
            await self.nic.connect()
            self.ready.set()

    a, b = Driven("a", memory_pages=64), Driven("b", memory_pages=64)
    for guest in (a, b):
        dom = hv.create_domain(guest, name=guest.name)
        add_emulated_nic(hv, dom, switch)
        await hv.start(dom)
        await guest.ready.wait()
    frames = [frame_to(b.nic.mac, a.nic.mac, 64, fill=i) for i in range(5)]
    await a.nic.send_batch(frames)
    await settle()
    assert [await b.nic.recv() for _ in range(5)] == frames
    assert a.domain.counters["interrupts"] == 5  # one TX-complete interrupt per frame
    assert b.domain.counters["exits.mmio"] > 0 and b.domain.counters["exits.pio"] == 0
    assert a.domain.counters["exits.pio"] > 0 and a.domain.counters["exits.mmio"] == 0


async def test_destroying_the_domain_unplugs_the_card(hv: pvio.Hypervisor) -> None:
    g, nic, switch, _cap = await nic_guest(hv)
    g.outl(BASE + REG_CMD, CMD_ENABLE)
    assert nic in switch.ports
    dom = g.domain
    hv.destroy(dom)
    assert nic not in switch.ports
    assert hv.iobus.pio_ranges(dom) == [] and hv.iobus.mmio_ranges(dom) == []
