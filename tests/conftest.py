"""Shared fixtures: a running hypervisor (with dom0) for the hypervisor-core tests."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

import pvio
from tests.guests import Probe


@pytest.fixture
async def hv() -> AsyncIterator[pvio.Hypervisor]:
    """A running Hypervisor whose dom0 kernel is a :class:`Probe` (``hv.dom0.kernel``); every
    domain is destroyed at the end of the test."""
    async with pvio.Hypervisor(dom0=Probe("dom0")) as hypervisor:
        yield hypervisor
