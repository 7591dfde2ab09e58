"""``python -m pvio`` is the ``pvio`` command."""

from pvio.harness.cli import main

main()
