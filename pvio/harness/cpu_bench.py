"""``pvio bench --cpu``: the CPU half of virtualization, one kernel run three ways, per operation.

Each mode (trap-and-emulate, binary translation, paravirtualization; :mod:`pvio.cpu.monitor`)
boots pvio's teaching kernel in its own hypervisor under trio's MockClock, so the counts are
exact and reproducible; only the wall-clock column varies (and is noisy on a shared machine).
The kernel brackets each operation with phase markers; a row is the phase's counter deltas
divided by the operations it did:

=================  ==============================================================
operation          what one is
=================  ==============================================================
syscall            ``getpid`` from ring 3 and back
pte_update         one page-table entry changed (and its TLB entry dropped)
process_switch     one ``yield`` that switches address space (half a ping-pong)
cli_sti            one interrupt disable + enable pair in the kernel
timer              one timer interrupt taken in user mode, acknowledged, returned from
idle               one timer period idle (hlt / SCHEDOP_block, or a spin loop)
port_write         one ``out`` to an unclaimed port
demand_zero        one fresh page touched by a process (fault, allocate, zero, map)
=================  ==============================================================

User-mode phases pay for their own markers (two system calls' halves): the ``null`` phase
measures that and it is subtracted.  Columns: ``exits`` (every stop of the guest for the
monitor), ``hypercalls``, ``reflected`` (traps shown to the guest kernel), ``translations``
(code pages translated), ``decodes`` (instructions decoded at run time), virtual ns and
wall-clock µs per operation.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

import trio
import trio.testing

from pvio.core.trace import Tracer
from pvio.cpu.monitor import MODES, GuestOS, Phase

#: operation -> (phase, divisor kind)
OPERATIONS = {
    "syscall": ("syscall", "ops"),
    "pte_update": ("pte_update", "ops"),
    "process_switch": ("process_switch", "switches"),
    "cli_sti": ("cli_sti", "ops"),
    "timer": ("timer", "interrupts"),
    "idle": ("idle", "ticks"),
    "port_write": ("port_write", "ops"),
    "demand_zero": ("demand_zero", "ops"),
}
USER_PHASES = frozenset({"syscall", "process_switch", "timer", "demand_zero"})
COLUMNS = {
    "exits": "exits",
    "hypercalls": "exits.hypercall",
    "reflected": "traps.reflected",
    "translations": "bt.translations",
    "decodes": "decodes",
}


@dataclass
class GuestRun:
    """What one boot of the teaching kernel did: console, counters, phases, refusals."""

    mode: str
    ops: int
    idle_ticks: int
    console: list[str]
    counters: dict[str, int]
    phases: dict[str, Phase]
    log: list[str]
    crash_reason: str | None
    wall_s: float
    neighbour_console: list[str] = field(default_factory=list)
    trace: list[str] = field(default_factory=list)  # the domain's counter bumps, in order (trace=True)

    def user_output(self) -> dict[str, list[str]]:
        """Each process's own lines ("A: ...", "B: ..."), in its order."""
        out: dict[str, list[str]] = {}
        for line in self.console:
            tag, sep, _rest = line.partition(": ")
            if sep and tag in ("A", "B"):
                out.setdefault(tag, []).append(line)
        return out

    def kernel_value(self, name: str) -> int | None:
        """A ``kernel: name=value`` line's value."""
        for line in self.console:
            if line.startswith(f"kernel: {name}="):
                return int(line.rsplit("=", 1)[1])
        return None


def run_guest(
    mode: str,
    *,
    ops: int = 8,
    idle_ticks: int = 4,
    idle_spin: bool = False,
    hostile: int = 0,
    neighbour: bool = False,
    trace: bool = False,
    limit_s: float = 10.0,
) -> GuestRun:
    """Boot the teaching kernel in ``mode`` in a fresh hypervisor under MockClock, to the end."""
    import pvio

    result: dict[str, Any] = {}

    async def main() -> None:
        async with pvio.Hypervisor() as hv:
            kernel = GuestOS(mode, ops=ops, idle_ticks=idle_ticks, idle_spin=idle_spin, hostile=hostile)
            dom = hv.create_domain(kernel, name=f"os-{mode}")
            other = None
            if neighbour:
                other = hv.create_domain(GuestOS(mode, ops=2, idle_ticks=1), name=f"neighbour-{mode}")
            tracer = Tracer(hv).start() if trace else None
            t0 = time.perf_counter()
            await hv.start(dom)
            if other is not None:
                await hv.start(other)
            with trio.move_on_after(limit_s):
                while dom.alive or (other is not None and other.alive):
                    await trio.sleep(0.001)
            names: list[str] = []
            if tracer is not None:
                tracer.stop()
                pid = tracer.tracks().get(f"dom{dom.domid}", (-1, -1))[0]
                names = [e["name"] for e in tracer.events() if e.get("ph") == "i" and e["pid"] == pid]
            result.update(
                trace=names,
                wall=time.perf_counter() - t0, console=list(dom.console_lines), counters=dict(dom.counters),
                phases=dict(kernel.monitor.phases), log=list(kernel.monitor.log), crash=dom.crash_reason,
                neighbour=list(other.console_lines) if other is not None else [],
            )  # fmt: skip
            for d in (dom, other):
                if d is not None and d.alive:
                    hv.destroy(d)

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    return GuestRun(
        mode, ops, idle_ticks, result["console"], result["counters"], result["phases"], result["log"],
        result["crash"], result["wall"], result["neighbour"], result["trace"],
    )  # fmt: skip


def per_operation(run: GuestRun) -> dict[str, dict[str, float]]:
    """Each operation's cost in ``run``: the columns of :data:`COLUMNS`, ``virtual_ns`` and ``wall_us``."""
    null = run.phases.get("null")
    out: dict[str, dict[str, float]] = {}
    for op, (phase_name, kind) in OPERATIONS.items():
        phase = run.phases.get(phase_name)
        if phase is None:
            continue
        counters = dict(phase.counters)
        virtual, wall = phase.virtual_ns, phase.wall_s
        if phase_name in USER_PHASES and null is not None:
            for k, v in null.counters.items():
                counters[k] = counters.get(k, 0) - v
            virtual -= null.virtual_ns
            wall -= null.wall_s
        divisor = {
            "ops": run.ops,
            "switches": 2 * run.ops,
            "interrupts": max(1, counters.get("interrupts", 0)),
            "ticks": run.idle_ticks,
        }[kind]
        row = {col: counters.get(key, 0) / divisor for col, key in COLUMNS.items()}
        row["virtual_ns"] = virtual / divisor
        row["wall_us"] = max(0.0, wall) * 1e6 / divisor
        row["busy_ns"] = counters.get("vcpu.busy_ns", 0) / divisor
        out[op] = row
    return out


@dataclass
class CpuBench:
    """The three modes measured in one run, plus the information-gap measurements."""

    runs: dict[str, GuestRun]
    spin: dict[str, GuestRun]

    def table(self) -> dict[str, dict[str, dict[str, float]]]:
        """operation -> mode -> columns."""
        per_mode = {mode: per_operation(run) for mode, run in self.runs.items()}
        return {
            op: {mode: per_mode[mode][op] for mode in self.runs if op in per_mode[mode]} for op in OPERATIONS
        }

    def idle_gap(self) -> dict[str, dict[str, float]]:
        """Per mode: CPU ns an idle timer period burns when the guest blocks vs when it spins."""
        out = {}
        for mode, run in self.runs.items():
            block = per_operation(run)["idle"]
            spin = per_operation(self.spin[mode])["idle"]
            out[mode] = {"block_busy_ns": block["busy_ns"], "spin_busy_ns": spin["busy_ns"],
                         "period_ns": block["virtual_ns"]}  # fmt: skip
        return out

    def zero_fills(self) -> dict[str, dict[str, float]]:
        """Per mode: zero fills of one demand-zero page by the monitor and by the guest kernel."""
        out = {}
        for mode, run in self.runs.items():
            phase = run.phases["demand_zero"]
            guest = (run.kernel_value("demand-zero pages zeroed by the kernel") or 0) / (2 * run.ops)
            if run.counters.get("mem.populated", 0) == run.counters.get("mem.scrubbed", -1) and mode == "pv":
                monitor = 1.0  # every frame was scrubbed once, when the domain was built
            else:
                monitor = phase.counters.get("mem.scrubbed", 0) / run.ops  # scrubbed on first touch
            out[mode] = {"monitor": monitor, "guest": guest}
        return out

    def to_json(self) -> dict[str, Any]:
        """Everything, as plain data (``pvio bench --cpu --json``)."""
        return {"operations": self.table(), "idle": self.idle_gap(), "demand_zero": self.zero_fills()}


def measure(ops: int = 8, idle_ticks: int = 4) -> CpuBench:
    """Run the three modes (and each again idling by spinning)."""
    runs = {mode: run_guest(mode, ops=ops, idle_ticks=idle_ticks) for mode in MODES}
    spin = {mode: run_guest(mode, ops=ops, idle_ticks=idle_ticks, idle_spin=True) for mode in MODES}
    return CpuBench(runs, spin)


def format_table(bench: CpuBench) -> str:
    """The per-operation table (Markdown) and the information-gap lines."""
    lines = [
        "| operation | mode | exits | hypercalls | reflected | translations | decodes | virtual ns "
        "| wall µs |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for op, modes in bench.table().items():
        for mode, row in modes.items():
            lines.append(
                f"| {op} | {mode} | {row['exits']:.2f} | {row['hypercalls']:.2f} | {row['reflected']:.2f} | "
                f"{row['translations']:.2f} | {row['decodes']:.2f} | {row['virtual_ns']:.0f} | "
                f"{row['wall_us']:.0f} |"
            )
    lines.append("")
    lines.append("| idle timer period | mode | CPU ns burnt blocking | CPU ns burnt spinning | period ns |")
    lines.append("|---|---|---:|---:|---:|")
    for mode, g in bench.idle_gap().items():
        lines.append(
            f"| idle | {mode} | {g['block_busy_ns']:.0f} | {g['spin_busy_ns']:.0f} | {g['period_ns']:.0f} |"
        )
    lines.append("")
    lines.append("| demand-zero page | mode | zero fills by the monitor | zero fills by the guest |")
    lines.append("|---|---|---:|---:|")
    for mode, z in bench.zero_fills().items():
        lines.append(f"| page | {mode} | {z['monitor']:.2f} | {z['guest']:.2f} |")
    return "\n".join(lines)


def chart(bench: CpuBench, path: str) -> None:
    """A grouped bar chart of exits per operation per mode (needs matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = bench.table()
    ops = list(table)
    fig, ax = plt.subplots(figsize=(9, 4))
    width = 0.27
    for i, mode in enumerate(MODES):
        values = [table[op].get(mode, {}).get("exits", 0.0) for op in ops]
        ax.bar([x + (i - 1) * width for x in range(len(ops))], values, width, label=mode)
    ax.set_xticks(range(len(ops)), ops, rotation=20)
    ax.set_ylabel("exits per operation")
    ax.set_title("One kernel, three ways: exits per operation (pvio bench --cpu)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


# ---------------------------------------------------------------------- control-flow figures
COLUMNS_FLOW = ("Process", "Operating System", "VMM")
_WHO = {"Process": 0, "OS": 1, "VMM": 2}


def _flow_rows(key: str, where: str) -> list[tuple[str, str]]:
    """The figure's rows one counter bump stands for (``where``: who was running)."""
    here = "Process" if where == "Process" else "OS"
    if key == "exits.syscall":
        return [
            ("Process", "system call: trap to the monitor"),
            ("VMM", "trap handler: a system call from ring 3"),
        ]
    if key == "traps.reflected":
        return [("VMM", "reflect it: the guest kernel's handler, a frame on its kernel stack")]
    if key == "transitions.user_to_kernel":
        return [("OS", "trap handler runs (at CPL 1)")]
    if key == "transitions.kernel_to_user":
        return [("VMM", "return to ring 3"), ("Process", "resume after the trap")]
    if key.startswith("emulated."):
        what = key.split(".", 1)[1].replace("_", " ")
        if what == "iretq":
            return [
                ("OS", "return-from-trap (iretq): traps"),
                ("VMM", "do the iret: pop the frame, set the virtual IF"),
            ]
        return [
            ("OS", f"{what}: traps (privileged)"),
            ("VMM", f"decode and emulate {what} on the virtual CPU"),
        ]
    if key == "exits.callout":
        return []  # shown with the instruction it stands for
    if key == "exits.page_fault":
        return [(here, "page fault: trap"), ("VMM", "#PF handler: walk the guest's own tables")]
    if key == "shadow.fills":
        return [("VMM", "hidden fault: fill the shadow tables, resume (the OS never sees it)")]
    if key == "shadow.pt_writes":
        return [("VMM", "store to a write-protected page table: do it, drop the stale shadow entry")]
    if key == "mem.scrubbed":
        return [("VMM", "first touch of a guest frame: allocate a machine frame and zero it")]
    if key.startswith("hypercalls.") and key.count(".") == 1:
        name = key.split(".", 1)[1]
        return [("OS", f"hypercall {name}"), ("VMM", f"{name}: validate and perform")]
    if key == "pv.pt_updates":
        return [("VMM", "page-table update validated (Xen's type rules) and written")]
    return []


def control_flow(run: GuestRun, phase: str, start_key: str) -> list[tuple[int, str]]:
    """One operation's control flow from ``run.trace``: [(column, text)], OSTEP appendix B style.

    The operation is the ``start_key`` bump that led to the first entry from ring 3 after the
    phase began, up to the one that led to the next entry from ring 3.  A native return to
    ring 3 (the PV kernel's iretq) is not an event the monitor sees: the figure then simply
    ends with the process resuming.
    """
    names = run.trace
    begin = names.index(f"phases.{phase}.begin")
    entries = [i for i in range(begin, len(names)) if names[i] == "transitions.user_to_kernel"][:2]
    if len(entries) < 2:
        raise ValueError(f"{run.mode}: fewer than two entries from ring 3 in phase {phase}")
    start = max(i for i in range(begin, entries[0]) if names[i] == start_key)
    end = max(i for i in range(entries[0], entries[1]) if names[i] == start_key)
    where = "Process"
    rows: list[tuple[int, str]] = []
    callout = False
    for key in names[start:end]:
        for col, text in _flow_rows(key, where):
            if callout and key.startswith("emulated."):
                what = key.split(".", 1)[1].replace("_", " ")
                col, text = (
                    ("OS", f"{what} (a call-out the translator planted)")
                    if col == "OS"
                    else ("VMM", f"emulate {what}, decoded when the page was translated")
                )
            if not rows or rows[-1] != (_WHO[col], text):
                rows.append((_WHO[col], text))
        callout = key == "exits.callout"
        if key == "transitions.user_to_kernel":
            where = "OS"
        elif key == "transitions.kernel_to_user":
            where = "Process"
    if run.mode == "pv":
        rows.append((1, "iretq to ring 3 on the hypervisor's real selectors: no exit"))
    if rows and rows[-1][0] != 0:
        rows.append((0, "resume after the trap"))
    return rows


def format_flow(rows: list[tuple[int, str]]) -> str:
    """A control-flow figure as a Markdown table: one event per row, in its party's column."""
    lines = ["| " + " | ".join(COLUMNS_FLOW) + " |", "|---|---|---|"]
    for col, text in rows:
        cells = [""] * 3
        cells[col] = text
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def flows() -> str:
    """The system-call and page-fault figures of every mode, from traced runs."""
    out = []
    for mode in MODES:
        run = run_guest(mode, ops=2, idle_ticks=1, trace=True)
        figures = (
            ("a system call", "syscall", "exits.syscall"),
            ("a demand-zero page fault", "demand_zero", "exits.page_fault"),
        )
        for title, phase, key in figures:
            out.append(f"#### {title}, {mode}\n\n{format_flow(control_flow(run, phase, key))}\n")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    """``pvio bench --cpu``: trap-and-emulate, binary translation and PV, per operation."""
    from pvio.harness.cli import OneLineParser

    parser = OneLineParser(prog="pvio bench --cpu", description=main.__doc__)
    parser.add_argument("--json", action="store_true", help="print the measurements as JSON")
    parser.add_argument("--chart", metavar="PATH", help="write a PNG chart of exits per operation")
    parser.add_argument("--ops", type=int, default=8, help="repetitions of each operation (1-64)")
    parser.add_argument("--flows", action="store_true", help="print the control-flow figures (from traces)")
    args = parser.parse_args(argv)
    if args.flows:
        print(flows())
        return 0
    if not 1 <= args.ops <= 64:
        parser.error("--ops must be 1..64")
    bench = measure(ops=args.ops)
    if args.json:
        print(json.dumps(bench.to_json(), indent=2))
    else:
        print(format_table(bench))
    if args.chart:
        chart(bench, args.chart)
    return 0
