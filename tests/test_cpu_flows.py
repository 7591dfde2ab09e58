"""The control-flow figures of docs/cpu.md come from traced runs: pin them."""

from __future__ import annotations

import functools

from pvio.harness.cpu_bench import GuestRun, control_flow, run_guest

PROCESS, OS, VMM = 0, 1, 2


@functools.cache
def traced(mode: str) -> GuestRun:
    return run_guest(mode, ops=2, idle_ticks=1, trace=True)


def test_a_system_call_under_trap_and_emulate_bounces_through_the_monitor_twice() -> None:
    assert control_flow(traced("trap"), "syscall", "exits.syscall") == [
        (PROCESS, "system call: trap to the monitor"),
        (VMM, "trap handler: a system call from ring 3"),
        (VMM, "reflect it: the guest kernel's handler, a frame on its kernel stack"),
        (OS, "trap handler runs (at CPL 1)"),
        (OS, "return-from-trap (iretq): traps"),
        (VMM, "do the iret: pop the frame, set the virtual IF"),
        (VMM, "return to ring 3"),
        (PROCESS, "resume after the trap"),
    ]


def test_a_pv_system_call_enters_through_the_monitor_and_returns_without_it() -> None:
    rows = control_flow(traced("pv"), "syscall", "exits.syscall")
    assert [col for col, _ in rows] == [PROCESS, VMM, VMM, OS, OS, PROCESS]
    assert rows[-2] == (OS, "iretq to ring 3 on the hypervisor's real selectors: no exit")


def test_a_demand_zero_fault_under_shadow_paging_has_hidden_faults_the_guest_never_sees() -> None:
    rows = control_flow(traced("trap"), "demand_zero", "exits.page_fault")
    texts = [t for _, t in rows]
    assert texts.count("hidden fault: fill the shadow tables, resume (the OS never sees it)") == 3
    assert "store to a write-protected page table: do it, drop the stale shadow entry" in texts
    assert "first touch of a guest frame: allocate a machine frame and zero it" in texts
    assert (OS, "mov cr2: traps (privileged)") in rows


def test_a_pv_demand_zero_fault_is_one_reflection_and_one_validated_update() -> None:
    rows = control_flow(traced("pv"), "demand_zero", "exits.page_fault")
    assert (OS, "hypercall mmu_update") in rows
    assert not any("hidden fault" in t for _, t in rows)
