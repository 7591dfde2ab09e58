"""A guest that dies with its vif connected leaves nothing behind.

Once the test drops its own references to a dead guest, nothing may keep the guest's RAM
alive (a weak reference to its ``GuestMemory`` dies), no mapping of its grants is left in
dom0's maptrack nor in its ``mapped_by_others``, and netback has dropped the vif (its entry
in ``NetBack.vifs``, its task).  The bystanders go on without loss.
"""

from __future__ import annotations

import gc
import weakref

import trio
import trio.testing

from pvio.abi import ShutdownReason
from pvio.toolstack import add_vif
from tests.netenv import NetEnv, NicGuest, ip_of, net_env, recv_n, seq_of, udp_stream


def netback_tasks(env: NetEnv) -> list[str]:
    root = trio.lowlevel.current_root_task()
    names: list[str] = []
    stack = [root]
    while stack:
        task = stack.pop()
        names.append(task.name)
        for nursery in task.child_nurseries:
            stack.extend(nursery.child_tasks)
    return [n for n in names if "netback-vif" in n]


async def assert_bystanders_exchange(a: NicGuest, b: NicGuest, start: int) -> None:
    await a.nic.send_batch(udp_stream(a, b, 30, start=start))
    got = await recv_n(b.nic, 30)
    assert [seq_of(f) for f in got] == list(range(start, start + 30))


async def test_guests_dying_with_vifs_connected_leak_no_memory(autojump_clock: trio.abc.Clock) -> None:
    a, b = NicGuest("a", ip_of(0)), NicGuest("b", ip_of(1))
    async with net_env(a, b) as env:
        hv, netback = env.hv, env.netback
        assert netback is not None
        assert hv.dom0 is not None
        victims = [NicGuest(f"v{i}", ip_of(2 + i)) for i in range(4)]
        doms = [hv.create_domain(v, name=v.name) for v in victims]
        for dom in doms:
            add_vif(hv, dom)
            await hv.start(dom)
        for v in victims:
            await v.ready.wait()
        await trio.testing.wait_all_tasks_blocked()
        domids = [d.domid for d in doms]
        rams = [weakref.ref(d.mem) for d in doms]
        for i, dom in enumerate(doms):
            assert dom.mapped_by_others  # its rings are mapped by netback
            if i % 2:
                hv.shutdown_domain(dom, ShutdownReason.poweroff)  # as by its own hypercall
            else:
                hv.destroy(dom)
        await trio.testing.wait_all_tasks_blocked()
        await trio.sleep(0.01)
        for dom in doms:
            assert not dom.mapped_by_others
        del victims, doms, dom, v
        gc.collect()
        for domid, ram in zip(domids, rams, strict=True):
            assert (domid, 0) not in netback.vifs
            assert ram() is None, f"dom{domid}'s RAM is still referenced"
        assert not any(m.granter.domid in domids for m in hv.dom0.maptrack.values())
        assert sorted(netback_tasks(env)) == ["netback-vif1.0", "netback-vif2.0"]
        await assert_bystanders_exchange(a, b, 0)
