"""The ``"x86"`` guest kind of :mod:`pvio.harness.bench`: pvio's C guest kernel in ``mode=bench``.

:func:`x86_bench_guest` is the factory ``pvio.harness.bench`` registers as ``"x86"`` (the factory
contract of ``docs/devices.md``): ``(name, model, ip, options)`` -> a :class:`BenchX86Guest`,
an :class:`pvio.cpu.guest.X86Guest` booted with ``mode=bench nic=<model> ip=<ip>``.  Its C
drivers (``frontends/x86/netfront.c``, ``emunic.c``, ``snic.c``) are the NIC; the traffic
is made and checked inside the guest by the bench app (``frontends/x86/bench.c``), so no
frame crosses into Python and the counts are the x86 guest's own.

The driver's statistics (``struct nicdrv_stats``: frames, interrupts, refused completions,
RX/TX errors, doorbells, re-arms) are read from guest memory at the address the mailbox
gives: :meth:`BenchX86Guest.driver_stats`.

Control channel: a mailbox page in the guest (its address is printed on the console at
boot) and VIRQ_BENCH (1, Xen's VIRQ_DEBUG).  A scenario writes its command into the
sender's mailbox and raises VIRQ_BENCH once: **one upcall on the sender per scenario** is
the whole cost of the harness, and it is included in the counts.  Completion is read from
the mailboxes (the harness polls them every 0.5 ms of trio time: no guest cost).

``ready`` is set once the console says ``ready:`` (the driver is up and the guest has sent
the self-addressed frame the switch learns its MAC from: ``announces_itself``).  ``nic``
carries the MAC; it does not move frames in and out of the guest (``send``/``recv`` raise
NotImplementedError): :func:`pvio.harness.bench.run_scenario` calls :meth:`BenchX86Guest.native_scenario`
instead, for two x86 guests, at saturation (stream) or back to back (ping-pong), or paced
(``offered_load`` frames or trips per second: the bench app paces itself with set_timer_op and
VIRQ_TIMER, whose upcalls and hypercalls are in the counts; ``timer_sets`` in the mailbox).
Ping-pong latency: back to back, the mean of wall time over trips; paced, the mean round trip
the guest measured in system time (trio's clock: wall time unless a MockClock runs).

Options (``model_env(..., **options)``): ``use_mmio=True`` (emulated NIC through MMIO
instead of ports), ``moderation=(mode, frames, usecs)`` (smart NIC), ``spin=N`` (smart NIC
driver's busy-poll rounds), ``cmdline="..."`` (extra words, e.g. ``spin=``).
"""

from __future__ import annotations

import re
import time
from typing import Any

import trio

from pvio.abi.bench import (
    BENCH_CMD_PINGPONG,
    BENCH_CMD_STREAM,
    BENCH_MBOX,
    BENCH_MBOX_MAGIC,
    NICDRV_STATS,
    VIRQ_BENCH,
)
from pvio.cpu.guest import X86Guest

CMD_STREAM, CMD_PINGPONG = BENCH_CMD_STREAM, BENCH_CMD_PINGPONG
POLL_S = 0.0005
_MAC = re.compile(r"\bmac ((?:[0-9a-f]{2}:){5}[0-9a-f]{2})")
_MBOX = re.compile(r"^bench: mailbox at ([0-9a-f]+)$")


class X86BenchNic:
    """The NIC of a bench x86 guest as the harness sees it: a MAC; frames stay inside the guest."""

    def __init__(self, mac: bytes) -> None:
        self.mac = mac

    def _refuse(self) -> NotImplementedError:
        return NotImplementedError(
            "x86 guests make and check their traffic inside the guest (mode=bench, frontends/x86/bench.c); "
            "run_scenario drives them through BenchX86Guest.native_scenario"
        )

    async def send(self, frame: Any) -> None:
        raise self._refuse()

    async def send_batch(self, frames: list[Any]) -> None:
        raise self._refuse()

    async def recv(self) -> bytes:
        raise self._refuse()

    async def recv_batch(self, max_frames: int = 256) -> list[bytes]:
        raise self._refuse()

    def pending(self) -> int:
        return 0


class BenchX86Guest(X86Guest):
    """pvio's C guest kernel running the bench app on one NIC of ``model``."""

    announces_itself = True

    def __init__(self, name: str, model: str, ip: str, options: dict[str, Any]) -> None:
        words = [f"mode=bench nic={model} ip={ip}"]
        if options.get("use_mmio"):
            words.append("emu_io=mmio")
        if options.get("moderation") is not None:
            mode, frames, usecs = options["moderation"]
            words.append(f"mod={('adaptive', 'fixed', 'off')[mode]} mod_frames={frames} mod_usecs={usecs}")
        if options.get("spin") is not None:
            words.append(f"spin={int(options['spin'])}")
        if options.get("cmdline"):
            words.append(str(options["cmdline"]))
        super().__init__(name=name, cmdline=" ".join(words))
        self.ip = ip
        self.model = model
        self.ready = trio.Event()
        self.nic: X86BenchNic = X86BenchNic(b"\x00" * 6)
        self.mbox_gpa = 0

    # ------------------------------------------------------------------ the guest kernel protocol
    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._watch_boot)
            await super().run()
            nursery.cancel_scope.cancel()

    async def _watch_boot(self) -> None:
        while True:
            lines = list(self.domain.console_lines)
            if any(line.startswith("ready:") for line in lines):
                break
            await trio.sleep(0.001)
        mac = next(m.group(1) for line in lines if (m := _MAC.search(line)))
        self.nic = X86BenchNic(bytes.fromhex(mac.replace(":", "")))
        self.mbox_gpa = next(int(m.group(1), 16) for line in lines if (m := _MBOX.match(line)))
        if self.mailbox()["magic"] != BENCH_MBOX_MAGIC:
            raise RuntimeError(f"{self.name}: no bench mailbox at {self.mbox_gpa:#x}")
        self.ready.set()

    def spawn(self, fn: Any, *args: Any, name: str | None = None) -> None:
        """Run a (Python) task beside the guest, in the hypervisor's nursery."""
        assert self.hv.nursery is not None
        self.hv.nursery.start_soon(fn, *args, name=name)

    # ------------------------------------------------------------------ the mailbox
    def mailbox(self) -> dict[str, Any]:
        """The guest's bench mailbox, decoded."""
        return dict(BENCH_MBOX.unpack(self.domain.mem.read(self.mbox_gpa, BENCH_MBOX.size))._asdict())

    def driver_stats(self) -> dict[str, int]:
        """The C driver's statistics (emulated NIC and smart NIC drivers; netfront keeps its own),
        read from guest memory at the address the mailbox gives: no guest cost."""
        gpa = self.mailbox()["drv_stats"]
        return dict(NICDRV_STATS.unpack(self.domain.mem.read(gpa, NICDRV_STATS.size))._asdict())

    def _put(self, field: str, value: Any) -> None:
        self.domain.mem.write(self.mbox_gpa + BENCH_MBOX.offset(field), BENCH_MBOX.pack_field(field, value))

    def reset_sink(self) -> None:
        """Zero the sink's counters (the next stream numbers its frames from 0)."""
        for f in ("sent", "answered", "rx_stream", "rx_bad", "rx_next_seq", "timer_sets", "rtt_ns"):
            self._put(f, 0)

    def command(self, cmd: int, count: int, size: int, peer: BenchX86Guest, rate: int = 0) -> int:
        """Write a command (``rate``: frames or trips per second, 0 = unpaced), raise VIRQ_BENCH;
        returns its sequence number."""
        seq = (self.mailbox()["cmd_seq"] + 1) & 0xFFFF_FFFF
        self._put("rate", rate)
        self._put("cmd", cmd)
        self._put("count", count)
        self._put("size", size)
        self._put("dst_mac", peer.nic.mac)
        self._put("dst_ip", bytes(int(x) for x in peer.ip.split(".")))
        self._put("cmd_seq", seq)
        self.hv.send_virq(self.domain, VIRQ_BENCH)
        return seq

    async def _until(self, what: str, cond: Any) -> None:
        while not cond():
            if not self.domain.alive:
                raise RuntimeError(f"{self.name} stopped during {what}: {self.domain.crash_reason}")
            await trio.sleep(POLL_S)

    # ------------------------------------------------------------------ scenarios
    async def native_scenario(
        self, scenario: str, peer: Any, packets: int, size: int, offered_load: float | None, batch: int
    ) -> tuple[int, float, float | None]:
        """Run ``scenario`` to ``peer`` inside the guests: (delivered, seconds, latency µs)."""
        rate = 0 if offered_load is None else round(offered_load)
        if offered_load is not None and (rate != offered_load or not 1 <= rate <= 1_000_000_000):
            raise ValueError(f"x86 guests pace whole frames per second (1..1e9), not {offered_load}")
        if not isinstance(peer, BenchX86Guest):
            raise NotImplementedError("x86 guests run scenarios against another x86 guest")
        if not 46 <= size <= 1514:
            raise ValueError(f"x86 bench frames are 46..1514 bytes, not {size}")
        self.reset_sink()
        peer.reset_sink()
        start = time.perf_counter()
        if scenario == "stream":
            seq = self.command(CMD_STREAM, packets, size, peer, rate)
            await peer._until("the stream", lambda: peer.mailbox()["rx_stream"] >= packets)
            await self._until("the stream", lambda: self.mailbox()["done_seq"] == seq)
            seconds = time.perf_counter() - start
            sink = peer.mailbox()
            if sink["rx_bad"] or sink["rx_next_seq"] != packets or self.mailbox()["status"]:
                raise AssertionError(f"stream: {peer.name} received {sink} from {self.name} {self.mailbox()}")
            return packets, seconds, None
        seq = self.command(CMD_PINGPONG, packets, size, peer, rate)
        await self._until("the ping-pong", lambda: self.mailbox()["done_seq"] == seq)
        seconds = time.perf_counter() - start
        box = self.mailbox()
        if box["answered"] != packets or box["status"]:
            raise AssertionError(f"ping-pong: {self.name} got {box['answered']} of {packets} answers ({box})")
        if rate:  # paced: the guest's own round trips (system time), not the pacing gaps between them
            return 2 * packets, seconds, box["rtt_ns"] / packets / 1e3
        return 2 * packets, seconds, seconds / packets * 1e6


def x86_bench_guest(name: str, model: str, ip: str, options: dict[str, Any]) -> BenchX86Guest:
    """The ``"x86"`` guest kind's factory (``pvio.harness.bench.register_guest_kind``)."""
    return BenchX86Guest(name, model, ip, options)
