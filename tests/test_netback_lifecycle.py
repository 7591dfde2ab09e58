"""netback's life cycle: reconnecting, a second netback, guests that die before connecting."""

from __future__ import annotations

import logging
from typing import Any

import pytest
import trio
import trio.testing

from pvio import PyGuest
from pvio.backends.netback import NetBack
from pvio.frontends.netfront import Netfront
from pvio.toolstack import add_vif
from tests.netenv import NicGuest, ip_of, net_env, recv_n, seq_of, udp_stream, wait_until


def records(caplog: pytest.LogCaptureFixture, level: int) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name.startswith("pvio") and r.levelno >= level]


async def test_a_closed_vif_reconnects_on_the_same_device_id(autojump_clock: Any) -> None:
    a, b = NicGuest("a", ip_of(0)), NicGuest("b", ip_of(1))
    async with net_env(a, b) as env:
        for round_ in range(3):
            with trio.fail_after(5):
                await a.nic.close()
            a.nic = Netfront(a)
            with trio.fail_after(5):
                await a.nic.connect()
            await env.announce([a])
            await b.nic.send_batch(udp_stream(b, a, 10, start=10 * round_))
            got = await recv_n(a.nic, 10)
            assert [seq_of(f) for f in got] == list(range(10 * round_, 10 * round_ + 10))
        assert env.vif(a).connected


async def test_a_second_netback_in_dom0_refuses_with_one_logged_line(
    autojump_clock: Any, caplog: pytest.LogCaptureFixture
) -> None:
    a, b = NicGuest("a", ip_of(0)), NicGuest("b", ip_of(1))
    async with net_env(a, b) as env:
        hv = env.hv
        assert hv.dom0 is not None
        dom0 = hv.dom0.kernel
        second = NetBack(dom0, env.switch)  # type: ignore[arg-type]
        dom0.spawn(second.run, name="netback-2")  # type: ignore[attr-defined]
        await trio.testing.wait_all_tasks_blocked()
        assert hv.dom0.state == "running"
        errors = records(caplog, logging.ERROR)
        assert len(errors) == 1 and "already" in errors[0]
        await a.nic.send_batch(udp_stream(a, b, 10))
        assert [seq_of(f) for f in await recv_n(b.nic, 10)] == list(range(10))


class Silent(PyGuest):
    """A guest that never connects its vif."""

    async def main(self) -> None:
        await trio.sleep_forever()


async def test_a_vif_whose_guest_died_before_connecting_ends_quietly(
    autojump_clock: Any, caplog: pytest.LogCaptureFixture
) -> None:
    a, b = NicGuest("a", ip_of(0)), NicGuest("b", ip_of(1))
    async with net_env(a, b) as env:
        netback = env.netback
        assert netback is not None
        silent = Silent("silent")
        dom = env.hv.create_domain(silent, name="silent")
        add_vif(env.hv, dom)
        await env.hv.start(dom)
        await trio.testing.wait_all_tasks_blocked()
        assert (dom.domid, 0) in netback.vifs  # waiting for the frontend
        env.hv.destroy(dom)
        await trio.testing.wait_all_tasks_blocked()
        assert (dom.domid, 0) not in netback.vifs
        assert env.count(f"netback/vif{dom.domid}.0", "internal_errors") == 0
    assert records(caplog, logging.ERROR) == []


async def test_netback_stops_and_a_new_one_serves_new_vifs_and_the_old_ones(
    autojump_clock: Any, caplog: pytest.LogCaptureFixture
) -> None:
    a, b = NicGuest("a", ip_of(0)), NicGuest("b", ip_of(1))
    async with net_env(a, b) as env:
        hv, first = env.hv, env.netback
        assert first is not None and hv.dom0 is not None
        first.stop()
        await trio.testing.wait_all_tasks_blocked()
        dom0 = hv.dom0.kernel
        second = NetBack(dom0, env.switch)  # type: ignore[arg-type]
        dom0.spawn(second.run, name="netback-restarted")  # type: ignore[attr-defined]
        await trio.testing.wait_all_tasks_blocked()
        late = NicGuest("late", ip_of(2))
        dom = hv.create_domain(late, name="late")
        add_vif(hv, dom)
        await hv.start(dom)
        with trio.fail_after(5):
            await late.ready.wait()
        assert (dom.domid, 0) in second.vifs
        # The first netback's vifs were closed when it stopped; they reconnected to the second.
        await wait_until(lambda: a.nic.connected and b.nic.connected, what="a and b to reconnect")
        assert {(a.domain.domid, 0), (b.domain.domid, 0)} <= set(second.vifs) and first.vifs == {}
        await env.announce([late])
        await late.nic.send_batch(udp_stream(late, a, 5))
        await b.nic.send_batch(udp_stream(b, a, 5, start=5))
        assert sorted(seq_of(f) for f in await recv_n(a.nic, 10)) == list(range(10))
        assert records(caplog, logging.ERROR) == []
