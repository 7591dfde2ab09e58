"""``python -m pvio.harness.benchreport FILE``: the figures a ``make bench`` run recorded, as text.

pytest-benchmark keeps what each benchmark measured beyond its time -- packets per second,
interrupts, exits, hypercalls and copies per packet, the ring's ratio to C, the speed-up of
two processes, memory per guest -- in ``extra_info``, which its own table does not show.
``make bench`` saves the run as JSON (``--benchmark-json``) and prints this report of it: one
block per benchmark group, one line per benchmark, its ``extra_info`` flattened (nested
mappings one level deep, as ``outer.inner``), numbers rounded for reading.  The JSON stays
next to it for whoever wants every digit.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator, Mapping
from typing import Any

#: extra_info entries too bulky for a line (whole tables, per-domain breakdowns).
SKIP = frozenset({"by_domain", "rows", "totals", "diff", "linux_rows"})


def _fmt(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return str(value)
    if isinstance(value, int) or (value.is_integer() and abs(value) >= 1000):
        return f"{int(value):,}"
    if abs(value) >= 100:
        return f"{value:,.1f}"
    return f"{value:.4g}"


def flatten(info: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    """``info``'s scalar entries; a nested mapping's as ``key.inner`` (one level), lists skipped."""
    for key, value in info.items():
        if key in SKIP:
            continue
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            if not prefix:
                yield from flatten(value, f"{name}.")
        elif not isinstance(value, list | tuple):
            yield name, value


def report(data: Mapping[str, Any]) -> list[str]:
    """The lines of the report of one pytest-benchmark JSON document."""
    lines = []
    machine = data.get("machine_info", {})
    cpu = machine.get("cpu", {})
    brand = cpu.get("brand_raw", machine.get("processor", "?"))
    lines.append(
        f"pvio bench figures: {data.get('datetime', '?')}, {brand}, {cpu.get('count', '?')} CPUs, "
        f"Python {machine.get('python_version', '?')}"
    )
    groups: dict[str, list[Mapping[str, Any]]] = {}
    for b in data.get("benchmarks", []):
        groups.setdefault(b.get("group") or "(no group)", []).append(b)
    for group in sorted(groups):
        lines.append("")
        lines.append(f"[{group}]")
        for b in sorted(groups[group], key=lambda b: b["name"]):
            stats = b.get("stats", {})
            figures = " ".join(f"{k}={_fmt(v)}" for k, v in flatten(b.get("extra_info", {})))
            median = stats.get("median")
            timing = f"median {median:.4g} s" if isinstance(median, int | float) else ""
            lines.append(f"  {b['name']}: {timing}  {figures}".rstrip())
    return lines


def main(argv: list[str] | None = None) -> int:
    """Print the report of the JSON file named on the command line."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m pvio.harness.benchreport BENCH_JSON", file=sys.stderr)
        return 2
    try:
        with open(args[0], encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        print(f"benchreport: cannot read {args[0]}: {e}", file=sys.stderr)
        return 1
    for line in report(data):
        print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
