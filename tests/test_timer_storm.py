"""set_timer_op is state, not work: a guest calling it in a loop costs the hypervisor nothing
more than one pending deadline per domain (one timer task at most, whatever the rate)."""

from __future__ import annotations

import trio
import trio.testing

import pvio
from pvio.abi import VIRQ_TIMER
from tests.guests import Probe, boot


def hv_tasks(hv: pvio.Hypervisor) -> int:
    assert hv.nursery is not None
    return len(hv.nursery.child_tasks)


async def test_a_timer_hypercall_storm_keeps_one_task_and_fires_once(
    hv: pvio.Hypervisor, autojump_clock: trio.abc.Clock
) -> None:
    a, b = await boot(hv, Probe(), "a"), await boot(hv, Probe(), "b")
    pa = a.listen(a.evtchn_bind_virq(VIRQ_TIMER))
    pb = b.listen(b.evtchn_bind_virq(VIRQ_TIMER))
    await trio.testing.wait_all_tasks_blocked()
    tasks = hv_tasks(hv)
    now = hv.now_ns()
    b.set_timer(now + 5_000_000)  # the bystander's timer: 5 ms
    for i in range(50_000):  # in one scheduler turn: every deadline replaces the last
        a.set_timer(now + 1_000_000 + i)
    assert hv_tasks(hv) <= tasks + 2  # one timer task per domain, not one per call
    await trio.sleep(0.002)
    assert a.fired == [pa] and b.fired == []
    await trio.sleep(0.004)
    assert b.fired == [pb]
    assert a.fired == [pa]  # fired once, for the last deadline only
    a.set_timer(hv.now_ns() + 1_000_000)
    a.set_timer(0)  # cancels
    await trio.sleep(0.01)
    assert a.fired == [pa]
    await trio.testing.wait_all_tasks_blocked()
    assert hv_tasks(hv) <= tasks + 2


async def test_a_deadline_in_the_past_fires_at_once(
    hv: pvio.Hypervisor, autojump_clock: trio.abc.Clock
) -> None:
    a = await boot(hv, Probe(), "a")
    pa = a.listen(a.evtchn_bind_virq(VIRQ_TIMER))
    await trio.sleep(0.001)
    a.set_timer(1)
    await trio.testing.wait_all_tasks_blocked()
    assert a.fired == [pa]
