"""``python -m pvio`` is the ``pvio`` command."""

from pvio.cli import main

main()
