"""The ``pvio`` command line: ``pvio demo`` runs the main example."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``pvio`` command."""
    parser = argparse.ArgumentParser(prog="pvio", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("demo", help="run the main example and print what it did")
    args = parser.parse_args(argv)
    if args.command == "demo":
        from examples import ring_demo

        ring_demo.main()
    else:  # pragma: no cover - argparse rejects unknown commands
        sys.exit(2)
