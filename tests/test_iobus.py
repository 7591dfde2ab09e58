"""The I/O bus: per-domain port and MMIO ranges, every access one counted exit, unclaimed
accesses read all-ones, and a device that raises never reaches the guest."""

from __future__ import annotations

import logging

import pytest

import pvio
from pvio.core.iobus import all_ones
from tests.guests import Probe, boot


class Scratch:
    """A device of 16 byte-addressed registers; records every access as (op, offset, size, value)."""

    def __init__(self) -> None:
        self.regs = bytearray(16)
        self.log: list[tuple[str, int, int, int]] = []

    def read(self, offset: int, size: int) -> int:
        value = int.from_bytes(self.regs[offset : offset + size], "little")
        self.log.append(("r", offset, size, value))
        return value

    def write(self, offset: int, size: int, value: int) -> None:
        self.log.append(("w", offset, size, value))
        self.regs[offset : offset + size] = value.to_bytes(size, "little")


class Broken:
    """A device with a bug: every access raises."""

    def read(self, offset: int, size: int) -> int:
        raise RuntimeError("device bug on read")

    def write(self, offset: int, size: int, value: int) -> None:
        raise RuntimeError("device bug on write")


MMIO_BASE = 0xFEB0_0000


async def test_port_io_reaches_the_device_at_its_offset_and_counts_one_exit_each(hv: pvio.Hypervisor) -> None:
    g = await boot(hv, Probe("g"))
    dev = Scratch()
    hv.iobus.register_pio(g.domain, 0xC000, 16, dev)
    before = dict(g.domain.counters)
    g.outl(0xC004, 0x1122_3344)
    g.outb(0xC00F, 0xAB)
    assert g.inw(0xC004) == 0x3344
    assert g.inb(0xC00F) == 0xAB
    assert g.inl(0xC004) == 0x1122_3344
    g.outw(0xC000, 0xBEEF)
    assert dev.log == [
        ("w", 4, 4, 0x1122_3344),
        ("w", 15, 1, 0xAB),
        ("r", 4, 2, 0x3344),
        ("r", 15, 1, 0xAB),
        ("r", 4, 4, 0x1122_3344),
        ("w", 0, 2, 0xBEEF),
    ]
    c = g.domain.counters
    assert c["exits"] - before.get("exits", 0) == 6
    assert c["exits.pio"] - before.get("exits.pio", 0) == 6
    assert c["exits.mmio"] == 0


async def test_mmio_reaches_the_same_device_map_and_counts_mmio_exits(hv: pvio.Hypervisor) -> None:
    g = await boot(hv, Probe("g"))
    dev = Scratch()
    hv.iobus.register_mmio(g.domain, MMIO_BASE, 16, dev)
    g.mmio_write(MMIO_BASE + 8, 8, 0x0102_0304_0506_0708)
    assert g.mmio_read(MMIO_BASE + 8, 4) == 0x0506_0708
    assert g.mmio_read(MMIO_BASE + 12, 4) == 0x0102_0304
    assert hv.iobus.is_mmio(g.domain, MMIO_BASE + 15)
    assert not hv.iobus.is_mmio(g.domain, MMIO_BASE + 16)
    assert g.domain.counters["exits.mmio"] == 3
    assert g.domain.counters["exits.pio"] == 0


async def test_ranges_are_per_domain(hv: pvio.Hypervisor) -> None:
    a = await boot(hv, Probe("a"))
    b = await boot(hv, Probe("b"))
    dev_a, dev_b = Scratch(), Scratch()
    hv.iobus.register_pio(a.domain, 0xC000, 16, dev_a)
    hv.iobus.register_pio(b.domain, 0xC000, 16, dev_b)
    a.outb(0xC000, 1)
    b.outb(0xC000, 2)
    assert dev_a.regs[0] == 1 and dev_b.regs[0] == 2
    assert not hv.iobus.is_mmio(b.domain, MMIO_BASE)


async def test_unclaimed_reads_are_all_ones_and_writes_vanish_counted(hv: pvio.Hypervisor) -> None:
    g = await boot(hv, Probe("g"))
    dev = Scratch()
    hv.iobus.register_pio(g.domain, 0xC000, 16, dev)
    assert g.inb(0x80) == 0xFF
    assert g.inw(0x80) == 0xFFFF
    assert g.inl(0xC00E) == 0xFFFF_FFFF  # straddles the end of the range: nobody claims it whole
    g.outl(0x3F8, 0x41)
    assert g.mmio_read(MMIO_BASE, 8) == all_ones(8)
    g.mmio_write(MMIO_BASE, 4, 1)
    c = g.domain.counters
    assert c["iobus.unclaimed_pio"] == 4
    assert c["iobus.unclaimed_mmio"] == 2
    assert c["exits"] >= 6 and c["exits.pio"] == 4 and c["exits.mmio"] == 2
    assert dev.log == []


async def test_bad_access_sizes_are_counted_and_never_reach_the_device(hv: pvio.Hypervisor) -> None:
    g = await boot(hv, Probe("g"))
    dev = Scratch()
    hv.iobus.register_pio(g.domain, 0xC000, 16, dev)
    hv.iobus.register_mmio(g.domain, MMIO_BASE, 16, dev)
    assert hv.iobus.pio_read(g.domain, 0xC000, 8) == all_ones(4)  # no 8-byte port I/O on x86
    hv.iobus.pio_write(g.domain, 0xC000, 3, 7)
    assert hv.iobus.mmio_read(g.domain, MMIO_BASE, 0) == all_ones(8)
    assert g.domain.counters["iobus.bad_size"] == 3
    assert g.domain.counters["exits"] >= 3
    assert dev.log == []


async def test_a_device_that_raises_is_contained_counted_and_logged(
    hv: pvio.Hypervisor, caplog: pytest.LogCaptureFixture
) -> None:
    g = await boot(hv, Probe("g"))
    hv.iobus.register_pio(g.domain, 0x300, 32, Broken())
    with caplog.at_level(logging.ERROR, logger="pvio.iobus"):
        assert g.inl(0x300) == 0xFFFF_FFFF
        g.outb(0x301, 5)
        g.outb(0x301, 6)
    assert g.domain.counters["iobus.device_errors"] == 3
    assert sum("raised" in r.getMessage() for r in caplog.records) == 1  # the first error, in full
    assert g.domain.alive


async def test_overlapping_and_out_of_space_ranges_are_refused(hv: pvio.Hypervisor) -> None:
    g = await boot(hv, Probe("g"))
    hv.iobus.register_pio(g.domain, 0xC000, 16, Scratch())
    hv.iobus.register_pio(g.domain, 0xC010, 16, Scratch())  # adjacent is fine
    with pytest.raises(ValueError, match="overlaps"):
        hv.iobus.register_pio(g.domain, 0xC008, 4, Scratch())
    with pytest.raises(ValueError, match="overlaps"):
        hv.iobus.register_pio(g.domain, 0xBFF0, 0x20, Scratch())
    with pytest.raises(ValueError, match="outside"):
        hv.iobus.register_pio(g.domain, 0xFFF0, 0x20, Scratch())
    with pytest.raises(ValueError, match="RAM"):
        hv.iobus.register_mmio(g.domain, 0x1000, 16, Scratch())
    assert [r.base for r in hv.iobus.pio_ranges(g.domain)] == [0xC000, 0xC010]


async def test_unregister_and_domain_destruction_remove_the_ranges(hv: pvio.Hypervisor) -> None:
    g = await boot(hv, Probe("g"))
    dev = Scratch()
    hv.iobus.register_pio(g.domain, 0xC000, 16, dev)
    hv.iobus.register_mmio(g.domain, MMIO_BASE, 16, dev)
    assert hv.iobus.unregister(g.domain, dev) == 2
    assert g.inb(0xC000) == 0xFF
    hv.iobus.register_mmio(g.domain, MMIO_BASE, 16, dev)
    dom = g.domain
    hv.destroy(dom)
    assert hv.iobus.mmio_ranges(dom) == []
    assert not hv.iobus.is_mmio(dom, MMIO_BASE)
