"""The bench harness's ABI with pvio's x86 guest kernel in ``mode=bench``.

A mailbox page in the guest (``struct bench_mbox``; its address is printed on the console at
boot) carries the harness's command and the guest's results; VIRQ_BENCH rings the guest.
``struct nicdrv_stats`` is the emulated-NIC / smart-NIC C driver's counters, which the
mailbox points at.  :mod:`pvio.cpu.bench_guest` reads both; ``frontends/x86/bench.c`` and
the drivers write them through the generated header.
"""

from __future__ import annotations

from pvio.abi.cstruct import CStruct
from pvio.abi.xen import VIRQ_DEBUG

VIRQ_BENCH = VIRQ_DEBUG  # the harness rings the guest with Xen's VIRQ_DEBUG
BENCH_MBOX_MAGIC = 0x48434E42  # "BNCH"
BENCH_CMD_STREAM = 1
BENCH_CMD_PINGPONG = 2
BENCH_ST_OK = 0
BENCH_ST_BAD_COMMAND = 1
BENCH_ST_NIC_GONE = 2

BENCH_MBOX = CStruct(
    "bench_mbox",
    [
        ("magic", "u32", '"BNCH"'),
        ("cmd_seq", "u32", "harness: bumped with each command"),
        ("done_seq", "u32", "guest: cmd_seq of the last command finished"),
        ("cmd", "u32", "BENCH_CMD_*"),
        ("count", "u32"),
        ("size", "u32"),
        ("dst_mac", "u8[6]"),
        ("pad", "u8[2]"),
        ("dst_ip", "u8[4]"),
        ("status", "u32", "BENCH_ST_*"),
        ("sent", "u64"),
        ("answered", "u64"),
        ("rx_stream", "u64"),
        ("rx_bad", "u64"),
        ("rx_next_seq", "u64"),
        ("drv_stats", "u64", "guest-physical address of the driver's struct nicdrv_stats"),
        ("rate", "u32", "harness: frames (trips) per second; 0 = saturation / back to back"),
        ("pad2", "u32"),
        ("timer_sets", "u64"),
        ("rtt_ns", "u64"),
    ],
    doc="the bench mailbox: one page in the guest, written by both sides",
)

NICDRV_STATS = CStruct(
    "nicdrv_stats",
    [
        (name, "u64")
        for name in (
            "tx_packets",
            "rx_packets",
            "irqs",
            "spurious",
            "tx_errors",
            "rx_errors",
            "bad_completions",
            "doorbells",
            "rearms",
        )
    ],
    doc="the emulated-NIC / smart-NIC C driver's counters (rx_errors: bad length or status; "
    "bad_completions: smart NIC completions outside the ring's buffers or not outstanding)",
)
