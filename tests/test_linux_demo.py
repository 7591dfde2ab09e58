"""``pvio demo --guest linux``: Linux answers every probe and pings a PyGuest with no loss."""

from __future__ import annotations

import pytest

from pvio.harness import linux_demo
from tests.pvh_support import require


@pytest.mark.slow
async def test_linux_demo_answers_every_probe_and_pings_with_no_loss() -> None:
    require("linux")
    result = await linux_demo.run_demo()
    base = result.base
    assert [name for name, _, _ in base.checked] == [
        p.name for p in linux_demo.linux_probes(b"\0" * 6, b"\1" * 6)
    ]
    assert all(ok for _, _, ok in base.checked), base.checked
    assert base.sent == base.received == len(base.checked)
    assert (result.ping_sent, result.ping_received) == (linux_demo.LINUX_PINGS, linux_demo.LINUX_PINGS)
    assert result.ok
    out = result.as_json()
    assert out["packets_lost"] == 0 and out["frames_delivered"] == 2 * base.sent
    per = out["linux"]["per_packet"]
    # Every frame Linux received came with an upcall and it answered through hypercalls
    # (its notifications); Linux's timers add to both, so these are bounds.
    assert per["interrupts"] >= 0.4 and per["exits.hypercall"] >= 0.4
    assert set(linux_demo.LINUX_EXITS) <= set(per)
