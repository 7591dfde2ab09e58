"""The ``pvio`` command line.

``pvio demo [--json]`` runs the main example (``examples/pv_demo.py``): two PyGuests
exchange scapy-built traffic through the PV split-driver NIC and the counters per packet
are printed; ``pvio demo --guest x86`` runs it with guest B an x86 guest kernel on the
emulated vCPU (``examples/x86_demo.py``), same table and ``--json`` schema.
``pvio ring-demo`` runs the bare ring example.  ``pvio bench [--json] [--chart PATH]``
compares the device models (emulated NIC, PV vif, smart NIC) on stream and ping-pong
traffic (:mod:`pvio.harness.bench`).
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``pvio`` command."""
    args = list(sys.argv[1:] if argv is None else argv)
    commands = {
        "demo": "the PV NIC demo (--json for JSON; --guest x86 or linux for another guest B)",
        "ring-demo": "the shared-ring example",
        "bench": "compare the device models (--json, --chart PATH, --help)",
    }
    if not args or args[0] in ("-h", "--help") or args[0] not in commands:
        print("usage: pvio COMMAND [options]\n\ncommands:")
        for name, what in commands.items():
            print(f"  {name:<10} {what}")
        sys.exit(0 if args and args[0] in ("-h", "--help") else 2)
    command, rest = args[0], args[1:]
    if command == "bench":
        from pvio.harness import bench

        sys.exit(bench.main(rest))
    if command == "demo":
        guest, rest = _take_option(rest, "--guest", "py")
        if guest == "x86":
            from examples import x86_demo

            sys.exit(x86_demo.main(rest))
        if guest == "linux":
            from pvio.harness import linux_demo

            sys.exit(linux_demo.main(rest))
        if guest != "py":
            print(f"pvio demo: --guest must be py, x86 or linux, not {guest!r}", file=sys.stderr)
            sys.exit(2)
        from examples import pv_demo

        sys.exit(pv_demo.main(rest))
    from examples import ring_demo

    ring_demo.main()


def _take_option(args: list[str], name: str, default: str) -> tuple[str, list[str]]:
    """Remove ``name VALUE`` or ``name=VALUE`` from ``args``; returns (value, the other args)."""
    rest: list[str] = []
    value = default
    it = iter(args)
    for arg in it:
        if arg == name:
            value = next(it, "")
        elif arg.startswith(name + "="):
            value = arg[len(name) + 1 :]
        else:
            rest.append(arg)
    return value, rest
