"""The ``pvio`` command line.

``pvio demo [--json]`` runs the main example (``examples/pv_demo.py``): two PyGuests
exchange scapy-built traffic through the PV split-driver NIC and the counters per packet
are printed.  ``pvio ring-demo`` runs the bare ring example.
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``pvio`` command."""
    args = list(sys.argv[1:] if argv is None else argv)
    commands = {"demo": "the PV NIC demo (--json for JSON)", "ring-demo": "the shared-ring example"}
    if not args or args[0] in ("-h", "--help") or args[0] not in commands:
        print("usage: pvio COMMAND [options]\n\ncommands:")
        for name, what in commands.items():
            print(f"  {name:<10} {what}")
        sys.exit(0 if args and args[0] in ("-h", "--help") else 2)
    command, rest = args[0], args[1:]
    if command == "demo":
        from examples import pv_demo

        sys.exit(pv_demo.main(rest))
    from examples import ring_demo

    ring_demo.main()
