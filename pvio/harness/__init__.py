"""The harness at the top: the ``pvio`` command, the device-model benchmark and the pytest
plugin.  It imports everything below it; nothing below imports it."""
