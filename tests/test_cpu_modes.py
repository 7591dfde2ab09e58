"""One guest kernel, three ways: trap-and-emulate, binary translation, paravirtualization.

Every run boots pvio's teaching kernel (frontends/x86os) in a fresh hypervisor under trio's
MockClock with instruction-count slices, so the counts below are exact and reproducible.
The runs are cached per configuration: each boot takes about a second.
"""

from __future__ import annotations

import functools
from typing import Any

import pytest

from pvio.harness.cpu_bench import CpuBench, GuestRun, per_operation, run_guest

MODES = ("trap", "bt", "pv")


@functools.cache
def run(mode: str, **kw: Any) -> GuestRun:
    return run_guest(mode, **kw)


@functools.cache
def bench() -> CpuBench:
    return CpuBench({m: run(m) for m in MODES}, {m: run(m, idle_spin=1) for m in MODES})


EXPECTED_OUTPUT = {
    "A": ["A: pid=1", "A: getpid-sum=8", "A: fresh-pages-zero=8", "A: heap-sum=204", "A: busy-loop=10679",
          "A: primes-below-3000=430", "A: exit=1"],
    "B": ["B: pid=2", "B: fresh-pages-zero=8", "B: heap-sum=212", "B: fnv=8320246021676229635", "B: exit=2"],
}  # fmt: skip


@pytest.mark.parametrize("mode", MODES)
def test_the_user_programs_give_the_same_results_in_every_mode(mode: str) -> None:
    r = run(mode)
    assert r.crash_reason is None, r.crash_reason
    assert r.user_output() == EXPECTED_OUTPUT
    assert r.kernel_value("remapped-pages-ok") == 8
    assert "kernel: done" in r.console


def test_the_three_modes_print_identically() -> None:
    outputs = [run(m).user_output() for m in MODES]
    assert outputs[0] == outputs[1] == outputs[2]


# (exits, hypercalls, traps reflected, run-time decodes) per operation, per mode.
EXACT: dict[str, dict[str, tuple[float, float, float, float]]] = {
    "syscall": {"trap": (2, 0, 1, 1), "bt": (2, 0, 1, 0), "pv": (1, 0, 1, 0)},
    "pte_update": {"trap": (2.25, 0, 0, 2), "bt": (2.25, 0, 0, 1), "pv": (0.25, 0.25, 0, 0)},
    "process_switch": {"trap": (3, 0, 1, 2), "bt": (3, 0, 1, 0), "pv": (2, 1, 1, 0)},
    "cli_sti": {"trap": (2, 0, 0, 2), "bt": (0, 0, 0, 0), "pv": (0, 0, 0, 0)},
    "timer": {"trap": (2, 0, 0, 1), "bt": (2, 0, 0, 0), "pv": (1, 1, 0, 0)},
    "idle": {"trap": (5, 0, 0, 4), "bt": (5, 0, 0, 0), "pv": (2, 2, 0, 0)},
    "port_write": {"trap": (1, 0, 0, 0), "bt": (1, 0, 0, 0), "pv": (1, 0, 0, 0)},
    "demand_zero": {"trap": (6.125, 0, 1, 3), "bt": (6.125, 0, 1, 1), "pv": (2, 1, 1, 0)},
}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("op", sorted(EXACT))
def test_exact_counts_per_operation(op: str, mode: str) -> None:
    row = per_operation(run(mode))[op]
    got = (row["exits"], row["hypercalls"], row["reflected"], row["decodes"])
    assert got == EXACT[op][mode]


def test_exits_per_system_call_full_equals_bt_above_pv() -> None:
    # The prediction is full > BT >= PV.  A system call is an int $0x80 and an iretq, and both
    # change the privilege level, which the translator cannot do in line: BT pays the same two
    # exits as trap-and-emulate (it only saves the run-time decode).  PV enters on the syscall
    # callback (one exit) and returns with a native iretq on the hypervisor's real selectors.
    t = bench().table()["syscall"]
    assert t["trap"]["exits"] == t["bt"]["exits"] > t["pv"]["exits"]
    assert t["trap"]["decodes"] > t["bt"]["decodes"] == 0


def test_exits_per_page_table_update_full_equals_bt_above_pv() -> None:
    # A page-table store is an ordinary mov: translation does not see it; the shadow's write
    # protection catches it in both full modes (one fault) and invlpg is an exit (BT: a call-out).
    # PV batches eight updates in one mmu_update and one TLB flush: two exits for eight.
    t = bench().table()["pte_update"]
    assert t["trap"]["exits"] == t["bt"]["exits"] > t["pv"]["exits"]
    assert t["pv"]["hypercalls"] == 0.25


def test_interrupt_disable_enable_costs_exits_only_under_trap_and_emulate() -> None:
    t = bench().table()["cli_sti"]
    assert t["trap"]["exits"] == 2 and t["bt"]["exits"] == t["pv"]["exits"] == 0


def test_binary_translation_translated_the_kernel_once() -> None:
    c = run("bt").counters
    assert c["bt.translations"] == 1  # the kernel's one text page
    assert c["bt.inline"] == 3  # cli/sti sites with room for the jump
    assert c["bt.callout_sites"] == 21
    assert "bt.invalidations" not in c


def test_idling_by_blocking_leaves_the_cpu_spinning_does_not() -> None:
    gap = bench().idle_gap()
    for mode in MODES:
        assert gap[mode]["block_busy_ns"] < 0.01 * gap[mode]["spin_busy_ns"]
    assert gap["trap"]["block_busy_ns"] == 5250  # five exits of 1 µs each plus a slice's tail
    assert gap["pv"]["block_busy_ns"] == 2250


def test_demand_zero_pages_are_zeroed_twice_without_the_pv_hint() -> None:
    z = bench().zero_fills()
    assert z["trap"] == z["bt"] == {"monitor": 1.0, "guest": 1.0}
    assert z["pv"] == {"monitor": 1.0, "guest": 0.0}


# ---------------------------------------------------------------------- hostile guests
@pytest.mark.parametrize("mode", ["trap", "bt"])
def test_a_mapping_outside_the_guest_is_stopped_under_full_virtualization(mode: str) -> None:
    r = run(mode, hostile=1, neighbour=1)
    assert r.crash_reason is not None and "outside the guest's 1024 pages" in r.crash_reason
    assert not any(line.startswith("kernel: hostile: read through it") for line in r.console)
    assert "kernel: done" in r.neighbour_console  # the other domain never noticed


def test_a_pv_mapping_of_foreign_or_page_table_frames_is_refused() -> None:
    r = run("pv", hostile=1, neighbour=1)
    assert r.crash_reason is None
    assert any("does not own" in entry for entry in r.log)
    assert any("page-table frame" in entry and "writable" in entry for entry in r.log)
    assert r.kernel_value("hostile: mmu_update refused, -rc") == 22
    assert r.kernel_value("hostile: writable page-table mapping refused, -rc") == 22
    assert r.counters["pv.refused"] == 2
    assert "kernel: done" in r.neighbour_console


@pytest.mark.parametrize("mode", ["trap", "bt"])
def test_a_cr3_outside_memory_is_stopped(mode: str) -> None:
    r = run(mode, hostile=2, neighbour=1)
    assert r.crash_reason == "mov to CR3 of 0x440000: outside the guest's memory"
    assert "kernel: hostile: still running" not in r.console
    assert "kernel: done" in r.neighbour_console


def test_a_pv_kernel_s_bad_base_pointer_is_refused_and_its_privileged_instruction_stopped() -> None:
    r = run("pv", hostile=2, neighbour=1)
    assert r.kernel_value("hostile: new_baseptr refused, -rc") == 22
    assert any(entry.startswith("privileged instruction mov cr3") for entry in r.log)
    assert r.crash_reason == "guest reported a crash"  # its #GP handler panicked, as a PV kernel must
    assert "kernel: done" in r.neighbour_console


@pytest.mark.parametrize("mode", MODES)
def test_self_modifying_code_runs_the_new_code(mode: str) -> None:
    r = run(mode, hostile=3)
    assert r.crash_reason is None
    assert (r.kernel_value("smc-before"), r.kernel_value("smc-after")) == (1, 2)


def test_self_modifying_code_discards_the_translation_with_a_logged_reason() -> None:
    r = run("bt", hostile=3)
    assert r.counters["bt.invalidations"] == 1
    assert r.counters["bt.translations"] == 2  # the page again, with the new code
    assert any(
        entry.startswith("translation of code page 0x100 discarded: store to code page") for entry in r.log
    )
