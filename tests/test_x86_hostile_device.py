"""A hostile device against the x86 guest's C drivers (``frontends/x86/snic.c``, ``emunic.c``).

The drivers treat everything the device writes as untrusted: the smart NIC driver checks each
completion's id (inside its ring's buffers, and outstanding), length and status, and stops on a
completion index further ahead than the descriptors it posted; the emulated NIC driver refuses
an RX length outside 14..1518.  Here the Python device models misbehave on purpose (one
device instance is monkeypatched: the other guests' devices stay honest) and the tests pin the
driver's answer exactly, as the guest reports it: its ``struct nicdrv_stats``, which the bench
app's mailbox points at (``BenchX86Guest.driver_stats``), and its console.  The victim is a
third x86 guest ``c``; ``a`` and ``b`` must keep working, and so must ``c`` wherever the driver
only refuses an entry.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any

import pytest

from pvio.backends import emulated_nic as emu
from pvio.backends import smartnic as snic
from pvio.cpu.bench_guest import CMD_STREAM, BenchX86Guest
from pvio.harness.bench import settle


def _marker(dst: BenchX86Guest, src: BenchX86Guest) -> bytes:
    """A frame to ``dst`` its network stack ignores (IEEE local experimental ethertype)."""
    return dst.nic.mac + src.nic.mac + b"\x88\xb5" + bytes(46)


def _diff(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {k: after[k] - before[k] for k in after if after[k] != before[k]}


def _alive(guest: BenchX86Guest) -> None:
    assert guest.domain.alive and guest.domain.crash_reason is None
    assert not any("panic" in line or "stopped" in line for line in guest.domain.console_lines)


async def _others_and_victim_work(env: Any, run_scenario: Any, victim_works: bool) -> None:
    """a -> b still streams; and a -> c (the victim) too, unless its driver stopped."""
    a, _b, c = env.guests
    result = await run_scenario(env, "stream", packets=20)
    assert result.packets == 20
    if victim_works:
        delivered, _s, _lat = await a.native_scenario("stream", c, 20, 64, None, 64)
        assert delivered == 20 and c.mailbox()["rx_next_seq"] == 20 and c.mailbox()["rx_bad"] == 0


# ---------------------------------------------------------------------- smart NIC
def _forge_completion(
    monkeypatch: pytest.MonkeyPatch, dev: snic.SmartNic, ring: str, forge: Callable[..., tuple[int, ...]]
) -> dict[str, int]:
    """The next completion ``dev`` writes on ``ring`` ("_tx"/"_rx") is ``forge(id, len, status, flags)``."""
    real = dev._complete
    seen: dict[str, int] = {}

    def complete(r: Any, cmpls: bytes) -> None:  # packed completions, 8 bytes each
        if not seen and r is getattr(dev, ring) and cmpls:
            fields = snic.CMPL.unpack_from(cmpls)
            seen["id"] = fields[0]
            cmpls = snic.CMPL.pack(*forge(*fields)) + cmpls[snic.CMPL.size :]
        real(r, cmpls)

    monkeypatch.setattr(dev, "_complete", complete)
    return seen


TX = {"tx_packets": 1, "doorbells": 1, "rearms": 1}  # c's one send: its doorbell, then idle again
RX = {"rearms": 1}  # c woken by the RX interrupt, then idle again

# case -> (ring, forge, the driver's statistics diff, RX buffers re-posted)
SNIC_CASES: dict[str, tuple[str, Callable[..., tuple[int, ...]], dict[str, int], int]] = {
    # a TX completion naming no TX buffer (ids 0..127): refused; the real buffer stays in flight
    "tx id out of range": ("_tx", lambda i, n, s, f: (0xFFFF, n, s, f), TX | {"bad_completions": 1}, 0),
    # a TX completion naming a TX buffer that is not in flight (the pool's last one)
    "tx id not outstanding": ("_tx", lambda i, n, s, f: (127, n, s, f), TX | {"bad_completions": 1}, 0),
    # an RX completion naming a TX buffer (RX buffers are 128..383): refused, nothing re-posted
    "rx id of the other ring": ("_rx", lambda i, n, s, f: (5, n, s, f), RX | {"bad_completions": 1}, 0),
    # an RX completion naming no buffer of the pool at all (384 buffers: 128 TX, 256 RX)
    "rx id past the pool": ("_rx", lambda i, n, s, f: (384, n, s, f), RX | {"bad_completions": 1}, 0),
    # an RX completion longer than the 2048-byte buffer: refused, the buffer re-posted
    "rx length beyond the buffer": ("_rx", lambda i, n, s, f: (i, 4000, s, f), RX | {"rx_errors": 1}, 1),
    "rx length below a header": ("_rx", lambda i, n, s, f: (i, 13, s, f), RX | {"rx_errors": 1}, 1),
    "rx error status": ("_rx", lambda i, n, s, f: (i, n, snic.SNIC_E_BAD_LEN, f), RX | {"rx_errors": 1}, 1),
}


@pytest.mark.parametrize("case", list(SNIC_CASES))
async def test_smartnic_driver_refuses_a_forged_completion_and_goes_on(
    pvio_env: Any, run_scenario: Any, autojump_clock: Any, monkeypatch: pytest.MonkeyPatch, case: str
) -> None:
    ring, forge, expected, reposted = SNIC_CASES[case]
    async with pvio_env("smartnic", guest="x86", n_guests=3) as env:
        a, _b, c = env.guests
        dev = env.devices[2]
        rx_req_prod = dev._gpa(snic.REG_RX_RING_LO)  # req_prod @0 of the RX ring page
        before, posted = c.driver_stats(), dev.dom.mem.read(rx_req_prod, 4)
        seen = _forge_completion(monkeypatch, dev, ring, forge)
        if ring == "_tx":  # c sends one frame to a; its TX completion is the forged one
            seq = c.command(CMD_STREAM, 1, 64, a)
            await c._until("the send", lambda: c.mailbox()["done_seq"] == seq)
        else:  # a frame arrives for c; its RX completion is the forged one
            dev.transmit([_marker(c, a)])
        await settle()
        assert seen  # the device did write the forged completion
        assert _diff(before, c.driver_stats()) == expected
        now_posted = dev.dom.mem.read(rx_req_prod, 4)
        assert struct.unpack("<I", now_posted)[0] - struct.unpack("<I", posted)[0] == reposted
        _alive(c)
        assert dev.enabled and not dev.error and dev.errors == 0
        monkeypatch.undo()
        await _others_and_victim_work(env, run_scenario, victim_works=True)
        _alive(c)


async def test_smartnic_driver_refuses_an_rx_id_repeated_in_one_batch(
    pvio_env: Any, run_scenario: Any, autojump_clock: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two frames in one batch, the second completion naming the first's buffer again: the
    driver takes the first, refuses the repeat (its buffer is not re-posted until the batch
    is done) and re-posts the one buffer once; the other real buffer stays in flight."""
    async with pvio_env("smartnic", guest="x86", n_guests=3) as env:
        a, _b, c = env.guests
        dev = env.devices[2]
        rx_req_prod = dev._gpa(snic.REG_RX_RING_LO)
        real = dev._complete
        seen: list[int] = []

        def complete(r: Any, cmpls: bytes) -> None:  # packed completions, 8 bytes each
            if not seen and r is dev._rx and len(cmpls) == 2 * snic.CMPL.size:
                first, second = snic.CMPL.iter_unpack(cmpls)
                seen.append(first[0])
                cmpls = snic.CMPL.pack(*first) + snic.CMPL.pack(first[0], *second[1:])
            real(r, cmpls)

        monkeypatch.setattr(dev, "_complete", complete)
        before, posted = c.driver_stats(), dev.dom.mem.read(rx_req_prod, 4)
        dev.transmit([_marker(c, a), _marker(c, a)])
        await settle()
        assert seen
        assert _diff(before, c.driver_stats()) == RX | {"rx_packets": 1, "bad_completions": 1}
        now_posted = dev.dom.mem.read(rx_req_prod, 4)
        assert struct.unpack("<I", now_posted)[0] - struct.unpack("<I", posted)[0] == 1
        _alive(c)
        monkeypatch.undo()
        await _others_and_victim_work(env, run_scenario, victim_works=True)
        _alive(c)


async def test_smartnic_driver_stops_on_an_impossible_completion_index(
    pvio_env: Any, run_scenario: Any, autojump_clock: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """rsp_prod 1000 entries past the 256 RX buffers posted: the driver stops (a console line,
    its NIC reports not connected), refuses nothing else; the guest and the others go on."""
    async with pvio_env("smartnic", guest="x86", n_guests=3) as env:
        a, _b, c = env.guests
        dev = env.devices[2]
        real = dev._complete
        rx_ring = dev._gpa(snic.REG_RX_RING_LO)

        def complete(r: Any, cmpls: bytes) -> None:
            real(r, cmpls)
            if r is dev._rx:
                (prod,) = struct.unpack("<I", dev.dom.mem.read(rx_ring + 8, 4))
                dev.dom.mem.write(rx_ring + 8, struct.pack("<I", prod + 1000))

        monkeypatch.setattr(dev, "_complete", complete)
        before = c.driver_stats()
        dev.transmit([_marker(c, a)])
        await settle()
        assert "snic: stopped: impossible RX completion index" in c.domain.console_lines
        assert _diff(before, c.driver_stats()) == {}  # nothing taken from the ring
        assert c.domain.alive and c.domain.crash_reason is None
        monkeypatch.undo()
        await _others_and_victim_work(env, run_scenario, victim_works=False)
        assert c.domain.alive


# ---------------------------------------------------------------------- emulated NIC
def _lie_about_rxlen(
    monkeypatch: pytest.MonkeyPatch, dev: emu.EmulatedNic, marker: bytes, value: int
) -> list[int]:
    """RXLEN reads ``value`` once, while ``marker`` is the head of the RX FIFO."""
    real = dev.read
    lies: list[int] = []

    def read(offset: int, size: int) -> int:
        if offset == emu.REG_RXLEN and not lies and dev.rx_fifo and dev.rx_fifo[0] == marker:
            lies.append(value)
            return value
        return real(offset, size)

    monkeypatch.setattr(dev, "read", read)
    return lies


@pytest.mark.parametrize("rxlen", [9000, 1519, 13])
async def test_emulated_nic_driver_refuses_a_bad_rx_length_and_goes_on(
    pvio_env: Any, run_scenario: Any, autojump_clock: Any, monkeypatch: pytest.MonkeyPatch, rxlen: int
) -> None:
    """RXLEN outside 14..1518: the driver pops that frame unread and counts it (rx_errors)."""
    async with pvio_env("emulated", guest="x86", n_guests=3) as env:
        a, _b, c = env.guests
        dev = env.devices[2]
        marker = _marker(c, a)
        lies = _lie_about_rxlen(monkeypatch, dev, marker, rxlen)
        counters = c.domain.counters
        before, pio, hcalls = c.driver_stats(), counters["exits.pio"], counters["hypercalls"]
        dev.transmit([marker])
        await settle()
        assert lies == [rxlen]
        assert _diff(before, c.driver_stats()) == {"irqs": 1, "rx_errors": 1}
        # ports: ISR read + acknowledge, RXLEN (the lie), RX_POP, RXLEN (empty): no RXDATA read;
        # hypercalls: the upcall's iret, SCHEDOP_block
        assert (counters["exits.pio"] - pio, counters["hypercalls"] - hcalls) == (5, 2)
        assert not dev.rx_fifo and dev.dev["errors.rx_empty_read"] == 0  # no RXDATA read
        _alive(c)
        monkeypatch.undo()
        await _others_and_victim_work(env, run_scenario, victim_works=True)
        _alive(c)


async def test_emulated_nic_rx_length_zero_is_an_empty_fifo_to_the_driver(
    pvio_env: Any, run_scenario: Any, autojump_clock: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """RXLEN 0 is the register map's "FIFO empty": the driver reads nothing and counts nothing;
    the frame waits in the card and is taken at the next interrupt (nothing lost)."""
    async with pvio_env("emulated", guest="x86", n_guests=3) as env:
        a, _b, c = env.guests
        dev = env.devices[2]
        marker = _marker(c, a)
        lies = _lie_about_rxlen(monkeypatch, dev, marker, 0)
        before = c.driver_stats()
        dev.transmit([marker])
        await settle()
        assert lies == [0]
        assert _diff(before, c.driver_stats()) == {"irqs": 1}
        assert list(dev.rx_fifo) == [marker]  # still in the card
        _alive(c)
        monkeypatch.undo()
        await _others_and_victim_work(env, run_scenario, victim_works=True)
        after = c.driver_stats()
        assert after["rx_packets"] - before["rx_packets"] == 21  # the held frame, then the 20 of the stream
        assert after["rx_errors"] == before["rx_errors"] == 0
        assert not dev.rx_fifo
        _alive(c)
