"""Shared helpers of the PVH (GRUB, Linux) tests: one-line skips when Debian's packages are missing."""

from __future__ import annotations

import pytest

from pvio.cpu import debian


def require(what: str) -> None:
    """Fetch what the test needs now, or skip with the one line that says what to install."""
    try:
        if what == "grub":
            debian.grub_pvh_image()
        elif what == "linux":
            debian.linux_kernel()
            debian.netfront_module()
            debian.busybox()
    except debian.DebianUnavailable as e:
        pytest.skip(str(e))
