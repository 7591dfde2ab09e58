"""The ``linux`` guest kind of the bench harness: booted, connected and known to the switch."""

from __future__ import annotations

import pytest

from pvio.harness.bench import GUEST_KINDS, model_env
from tests.pvh_support import require


def test_the_linux_kind_is_registered_and_pv_only() -> None:
    assert "linux" in GUEST_KINDS
    with pytest.raises(ValueError, match="PV NIC only"):
        GUEST_KINDS["linux"]("a", "emulated", "10.0.0.1", {})


@pytest.mark.slow
async def test_model_env_boots_a_linux_guest_on_the_pv_model() -> None:
    require("linux")
    async with model_env("pv", "linux", n_guests=1, timeout_s=300) as env:
        (guest,) = env.guests
        assert guest.ready.is_set() and guest.nic.mac in env.switch.mac_table
        out = await guest.run_command("cat /sys/class/net/eth0/operstate")
        assert out is not None and "up" in out
        assert env.netback.vifs[(guest.domain.domid, 0)].connected
