"""Event channels, 2-level ABI (event_channel.h): binding, sending, closing, every error path, and
the pending / mask / selector / upcall semantics a guest observes, with exact counters."""

from __future__ import annotations

import struct

import pytest
import trio

import pvio
from pvio.abi import (
    DOMID_SELF,
    EVTCHN_ALLOC_UNBOUND,
    EVTCHN_BIND_VIRQ,
    EVTCHN_STATUS,
    NR_VIRQS,
    SHARED_INFO_EVTCHN_MASK,
    SHARED_INFO_EVTCHN_PENDING,
    VCPU_PENDING_SEL,
    VCPU_UPCALL_PENDING,
    VIRQ_TIMER,
    Errno,
    EvtchnOp,
    EvtchnStat,
    Hypercall,
)
from tests.guests import Probe, boot, changes, dom0_probe, settle

FIRST_PORT = 2  # port 1 of every domain is its xenstore port


def calls(sub: str, n: int = 1) -> dict[str, int]:
    """The counters ``n`` event_channel_op(``sub``) hypercalls bump on the caller."""
    return {
        "exits": n,
        "exits.hypercall": n,
        "hypercalls": n,
        "hypercalls.event_channel_op": n,
        f"hypercalls.event_channel_op.{sub}": n,
    }


def failed(errno: Errno) -> dict[str, int]:
    return {"hypercall_errors": 1, f"hypercall_errors.{errno.name}": 1}


def errno_of(fn: object, *args: int) -> int | None:
    """The errno of the XenError that ``fn(*args)`` must raise."""
    assert callable(fn)
    with pytest.raises(pvio.XenError) as info:
        fn(*args)
    return info.value.errno


def bits(guest: Probe, off: int) -> int:
    return int(struct.unpack_from("<Q", guest.shared_info, off)[0])


@pytest.fixture
async def a(hv: pvio.Hypervisor) -> Probe:
    return await boot(hv, Probe(), "a")


@pytest.fixture
async def b(hv: pvio.Hypervisor, a: Probe) -> Probe:
    return await boot(hv, Probe(), "b")


async def connect(a: Probe, b: Probe) -> tuple[int, int]:
    """An interdomain channel a <-> b, both ends listened to and the bind's event taken."""
    pa = a.listen(a.evtchn_alloc_unbound(b.domid))
    pb = b.listen(b.evtchn_bind_interdomain(a.domid, pa))
    await settle()
    a.fired.clear()
    b.fired.clear()
    return pa, pb


# ---- alloc_unbound / bind_interdomain / send / close ------------------------------------------


async def test_alloc_unbound_offers_a_fresh_port_to_the_remote(
    hv: pvio.Hypervisor, a: Probe, b: Probe
) -> None:
    before = hv.snapshot()
    port = a.evtchn_alloc_unbound(b.domid)
    assert port == FIRST_PORT
    assert hv.channel_state(a.domain, port) == EvtchnStat.unbound
    assert a.domain.ports[port].remote_dom == b.domid
    assert changes(hv, before, a) == calls("alloc_unbound")
    assert a.evtchn_alloc_unbound(b.domid) == FIRST_PORT + 1


async def test_bind_interdomain_connects_both_ends_and_raises_the_new_port(
    hv: pvio.Hypervisor, a: Probe, b: Probe
) -> None:
    pa = a.evtchn_alloc_unbound(b.domid)
    before = hv.snapshot()
    pb = b.listen(b.evtchn_bind_interdomain(a.domid, pa))
    assert hv.channel_state(a.domain, pa) == hv.channel_state(b.domain, pb) == EvtchnStat.interdomain
    assert (a.domain.ports[pa].remote_dom, a.domain.ports[pa].remote_port) == (b.domid, pb)
    assert (b.domain.ports[pb].remote_dom, b.domain.ports[pb].remote_port) == (a.domid, pa)
    assert b.port_pending(pb)  # set at bind time, in case a signalled before
    assert changes(hv, before, b) == calls("bind_interdomain") | {"evtchn.raised": 1}
    await settle()
    assert b.fired == [pb]
    assert changes(hv, before, b)["interrupts"] == 1
    assert not b.port_pending(pb)


async def test_send_raises_the_peer_port_and_one_upcall(hv: pvio.Hypervisor, a: Probe, b: Probe) -> None:
    pa, pb = await connect(a, b)
    before = hv.snapshot()
    b.evtchn_send(pb)
    assert changes(hv, before, b) == calls("send") | {"evtchn.sends": 1}
    assert changes(hv, before, a) == {"evtchn.raised": 1}
    await settle()
    assert a.fired == [pa]
    assert b.fired == []
    assert changes(hv, before, a)["interrupts"] == 1


async def test_send_on_an_unbound_port_is_dropped_silently(hv: pvio.Hypervisor, a: Probe, b: Probe) -> None:
    port = a.evtchn_alloc_unbound(b.domid)
    before = hv.snapshot()
    a.evtchn_send(port)
    await settle()
    assert changes(hv, before, a) == calls("send") | {"evtchn.sends": 1}
    assert changes(hv, before, b) == {}


async def test_loopback_channel_to_self(hv: pvio.Hypervisor, a: Probe) -> None:
    p1 = a.listen(a.evtchn_alloc_unbound(DOMID_SELF))
    p2 = a.listen(a.evtchn_bind_interdomain(DOMID_SELF, p1))
    await settle()
    assert a.fired == [p2]
    a.evtchn_send(p2)
    await settle()
    assert a.fired == [p2, p1]


@pytest.mark.parametrize("op", ["send", "close", "unmask"])
@pytest.mark.parametrize("port", [0, 77, 1024, 4096, 2**32 - 1], ids=["0", "unused", "max", "4096", "u32max"])
async def test_bad_port_is_einval(hv: pvio.Hypervisor, a: Probe, op: str, port: int) -> None:
    fn = {"send": a.evtchn_send, "close": a.evtchn_close, "unmask": a.unmask}[op]
    before = hv.snapshot()
    assert errno_of(fn, port) == Errno.EINVAL
    assert changes(hv, before, a) == calls(op) | failed(Errno.EINVAL)


async def test_close_twice_is_einval_the_second_time(hv: pvio.Hypervisor, a: Probe, b: Probe) -> None:
    port = a.evtchn_alloc_unbound(b.domid)
    a.evtchn_close(port)
    assert hv.channel_state(a.domain, port) is None
    assert errno_of(a.evtchn_close, port) == Errno.EINVAL


async def test_bind_to_a_port_offered_to_another_domain_is_einval(
    hv: pvio.Hypervisor, a: Probe, b: Probe
) -> None:
    port = a.evtchn_alloc_unbound(0)
    before = hv.snapshot()
    assert errno_of(b.evtchn_bind_interdomain, a.domid, port) == Errno.EINVAL
    assert changes(hv, before, b) == calls("bind_interdomain") | failed(Errno.EINVAL)
    assert hv.channel_state(a.domain, port) == EvtchnStat.unbound


async def test_bind_to_a_port_already_bound_is_einval(hv: pvio.Hypervisor, a: Probe, b: Probe) -> None:
    port = a.evtchn_alloc_unbound(b.domid)
    b.evtchn_bind_interdomain(a.domid, port)
    assert errno_of(b.evtchn_bind_interdomain, a.domid, port) == Errno.EINVAL


@pytest.mark.parametrize("port", [0, 77, 1024], ids=["0", "unused", "max"])
async def test_bind_to_a_missing_remote_port_is_einval(
    hv: pvio.Hypervisor, a: Probe, b: Probe, port: int
) -> None:
    assert errno_of(b.evtchn_bind_interdomain, a.domid, port) == Errno.EINVAL


@pytest.mark.parametrize("domid", [999, 0x7FEF])
async def test_bind_to_an_unknown_domain_is_esrch(hv: pvio.Hypervisor, a: Probe, domid: int) -> None:
    before = hv.snapshot()
    assert errno_of(a.evtchn_bind_interdomain, domid, FIRST_PORT) == Errno.ESRCH
    assert changes(hv, before, a) == calls("bind_interdomain") | failed(Errno.ESRCH)


async def test_bind_to_a_destroyed_domain_is_esrch(hv: pvio.Hypervisor, a: Probe, b: Probe) -> None:
    port = a.evtchn_alloc_unbound(b.domid)
    hv.destroy(a.domain)
    assert errno_of(b.evtchn_bind_interdomain, a.domid, port) == Errno.ESRCH


@pytest.mark.parametrize("target", ["peer", "unknown"])
async def test_unprivileged_alloc_for_another_domain_is_eperm(
    hv: pvio.Hypervisor, a: Probe, b: Probe, target: str
) -> None:
    dom = b.domid if target == "peer" else 999
    before = hv.snapshot()
    rc, out = a.raw_hypercall(
        Hypercall.event_channel_op, EvtchnOp.alloc_unbound, EVTCHN_ALLOC_UNBOUND.pack(dom, a.domid, 0)
    )
    assert rc == -Errno.EPERM
    assert EVTCHN_ALLOC_UNBOUND.unpack(out)[2] == 0  # no port written back
    assert changes(hv, before, a) == calls("alloc_unbound") | failed(Errno.EPERM)
    assert set(b.domain.ports) == {1}


async def test_privileged_alloc_for_another_domain(hv: pvio.Hypervisor, a: Probe, b: Probe) -> None:
    dom0 = dom0_probe(hv)
    rc, out = dom0.raw_hypercall(
        Hypercall.event_channel_op, EvtchnOp.alloc_unbound, EVTCHN_ALLOC_UNBOUND.pack(a.domid, b.domid, 0)
    )
    assert rc == 0
    port = EVTCHN_ALLOC_UNBOUND.unpack(out)[2]
    assert port == FIRST_PORT
    assert hv.channel_state(a.domain, port) == EvtchnStat.unbound
    assert a.domain.ports[port].remote_dom == b.domid
    b.evtchn_bind_interdomain(a.domid, port)
    assert hv.channel_state(a.domain, port) == EvtchnStat.interdomain


async def test_privileged_alloc_for_an_unknown_domain_is_esrch(hv: pvio.Hypervisor) -> None:
    dom0 = dom0_probe(hv)
    before = hv.snapshot()
    rc, _ = dom0.raw_hypercall(
        Hypercall.event_channel_op, EvtchnOp.alloc_unbound, EVTCHN_ALLOC_UNBOUND.pack(999, 0, 0)
    )
    assert rc == -Errno.ESRCH
    assert changes(hv, before, dom0) == calls("alloc_unbound") | failed(Errno.ESRCH)


@pytest.mark.parametrize("remote", [DOMID_SELF + 1, 0xFFFF])
async def test_alloc_unbound_for_a_reserved_remote_domid_is_einval(
    hv: pvio.Hypervisor, a: Probe, remote: int
) -> None:
    assert errno_of(a.evtchn_alloc_unbound, remote) == Errno.EINVAL


async def test_close_makes_the_peer_port_unbound_and_rebindable(
    hv: pvio.Hypervisor, a: Probe, b: Probe
) -> None:
    pa, pb = await connect(a, b)
    before = hv.snapshot()
    b.evtchn_close(pb)
    assert changes(hv, before, b) == calls("close")
    assert hv.channel_state(b.domain, pb) is None
    assert hv.channel_state(a.domain, pa) == EvtchnStat.unbound
    assert a.domain.ports[pa].remote_dom == b.domid
    a.evtchn_send(pa)  # into the void now
    await settle()
    assert b.fired == []
    assert changes(hv, before, b) == calls("close")
    pb2 = b.listen(b.evtchn_bind_interdomain(a.domid, pa))
    assert hv.channel_state(a.domain, pa) == EvtchnStat.interdomain
    a.evtchn_send(pa)
    await settle()
    assert b.fired == [pb2]  # the bind's own event and a's send: one pending bit, one handler call


async def test_destroying_a_domain_makes_its_peers_channels_unbound(
    hv: pvio.Hypervisor, a: Probe, b: Probe
) -> None:
    pa, _ = await connect(a, b)
    pa2, _ = await connect(a, b)
    hv.destroy(b.domain)
    assert hv.channel_state(a.domain, pa) == hv.channel_state(a.domain, pa2) == EvtchnStat.unbound
    assert a.domain.ports[pa].remote_dom == b.domid
    before = hv.snapshot()
    a.evtchn_send(pa)
    await settle()
    assert changes(hv, before, a) == calls("send") | {"evtchn.sends": 1}


async def test_status_reports_an_interdomain_peer_at_xen_offsets(
    hv: pvio.Hypervisor, a: Probe, b: Probe
) -> None:
    pa, pb = await connect(a, b)
    rc, out = b.raw_hypercall(
        Hypercall.event_channel_op, EvtchnOp.status, EVTCHN_STATUS.pack(DOMID_SELF, pb, 0, 0, 0, 0)
    )
    assert rc == 0
    # status @8, vcpu @12, u.interdomain.dom @16 (u16), u.interdomain.port @20 (u32)
    assert struct.unpack_from("<IIH", out, 8) == (EvtchnStat.interdomain, 0, a.domid)
    assert struct.unpack_from("<I", out, 20)[0] == pa


async def test_status_reports_a_virq_as_a_u32_at_16(hv: pvio.Hypervisor, a: Probe) -> None:
    port = a.evtchn_bind_virq(VIRQ_TIMER + 5)
    rc, out = a.raw_hypercall(
        Hypercall.event_channel_op, EvtchnOp.status, EVTCHN_STATUS.pack(DOMID_SELF, port, 0, 0, 0, 0)
    )
    assert rc == 0
    assert struct.unpack_from("<III", out, 8) == (EvtchnStat.virq, 0, 5)


async def test_status_of_a_free_port_is_closed_and_beyond_the_table_einval(
    hv: pvio.Hypervisor, a: Probe
) -> None:
    rc, out = a.raw_hypercall(
        Hypercall.event_channel_op, EvtchnOp.status, EVTCHN_STATUS.pack(DOMID_SELF, 900, 0, 0, 0, 0)
    )
    assert rc == 0
    assert struct.unpack_from("<I", out, 8)[0] == EvtchnStat.closed
    rc, _ = a.raw_hypercall(
        Hypercall.event_channel_op,
        EvtchnOp.status,
        EVTCHN_STATUS.pack(DOMID_SELF, a.domain.max_ports, 0, 0, 0, 0),
    )
    assert rc == -Errno.EINVAL


async def test_send_on_a_virq_port_is_einval_and_raises_nothing(hv: pvio.Hypervisor, a: Probe) -> None:
    """As Xen's evtchn_send: only interdomain, IPI and unbound ports may be sent on."""
    port = a.evtchn_bind_virq(VIRQ_TIMER)
    with pytest.raises(pvio.XenError, match="EINVAL"):
        a.evtchn_send(port)
    assert not a.port_pending(port)


# ---- bind_virq ------------------------------------------------------------------------------


async def test_bind_virq_returns_a_virq_port(hv: pvio.Hypervisor, a: Probe) -> None:
    before = hv.snapshot()
    port = a.evtchn_bind_virq(VIRQ_TIMER)
    assert hv.channel_state(a.domain, port) == EvtchnStat.virq
    assert a.domain.virqs == {VIRQ_TIMER: port}
    assert changes(hv, before, a) == calls("bind_virq")


@pytest.mark.parametrize("virq", [NR_VIRQS, 2**32 - 1])
async def test_bind_virq_out_of_range_is_einval(hv: pvio.Hypervisor, a: Probe, virq: int) -> None:
    before = hv.snapshot()
    assert errno_of(a.evtchn_bind_virq, virq) == Errno.EINVAL
    assert changes(hv, before, a) == calls("bind_virq") | failed(Errno.EINVAL)


async def test_bind_virq_on_a_missing_vcpu_is_enoent(hv: pvio.Hypervisor, a: Probe) -> None:
    rc, _ = a.raw_hypercall(
        Hypercall.event_channel_op, EvtchnOp.bind_virq, EVTCHN_BIND_VIRQ.pack(VIRQ_TIMER, 1, 0)
    )
    assert rc == -Errno.ENOENT


async def test_bind_virq_twice_is_eexist_until_closed(hv: pvio.Hypervisor, a: Probe) -> None:
    port = a.evtchn_bind_virq(VIRQ_TIMER)
    before = hv.snapshot()
    assert errno_of(a.evtchn_bind_virq, VIRQ_TIMER) == Errno.EEXIST
    assert changes(hv, before, a) == calls("bind_virq") | failed(Errno.EEXIST)
    a.evtchn_close(port)
    assert a.domain.virqs == {}
    assert a.evtchn_bind_virq(VIRQ_TIMER) == port


# ---- pending, mask, selector, upcalls -------------------------------------------------------


async def test_a_masked_port_becomes_pending_without_an_upcall(
    hv: pvio.Hypervisor, a: Probe, b: Probe
) -> None:
    pa, pb = await connect(a, b)
    a.mask(pa)
    before = hv.snapshot()
    b.evtchn_send(pb)
    await settle()
    assert a.port_pending(pa)
    assert bits(a, VCPU_PENDING_SEL) == 0
    assert a.shared_info[VCPU_UPCALL_PENDING] == 0
    assert a.fired == []
    assert changes(hv, before, a) == {"evtchn.raised": 1}


async def test_unmask_redelivers_a_pending_port(hv: pvio.Hypervisor, a: Probe, b: Probe) -> None:
    pa, pb = await connect(a, b)
    a.mask(pa)
    b.evtchn_send(pb)
    await settle()
    before = hv.snapshot()
    a.unmask(pa)
    assert bits(a, SHARED_INFO_EVTCHN_MASK) & (1 << pa) == 0
    await settle()
    assert a.fired == [pa]
    assert not a.port_pending(pa)
    got = changes(hv, before, a)
    assert (got["interrupts"], got["hypercalls.event_channel_op.unmask"]) == (1, 1)


async def test_unmask_of_a_port_that_is_not_pending_delivers_nothing(
    hv: pvio.Hypervisor, a: Probe, b: Probe
) -> None:
    pa, _ = await connect(a, b)
    a.mask(pa)
    before = hv.snapshot()
    a.unmask(pa)
    await settle()
    assert changes(hv, before, a) == calls("unmask")
    assert a.fired == []


async def test_ports_raised_before_delivery_share_one_upcall(hv: pvio.Hypervisor, a: Probe, b: Probe) -> None:
    pa1, pb1 = await connect(a, b)
    pa2, pb2 = await connect(a, b)
    before = hv.snapshot()
    b.evtchn_send(pb2)
    b.evtchn_send(pb1)
    assert bits(a, SHARED_INFO_EVTCHN_PENDING) == (1 << pa1) | (1 << pa2)
    assert bits(a, VCPU_PENDING_SEL) == 1
    await settle()
    assert a.fired == [pa1, pa2]  # the scan walks bits from the lowest
    got = changes(hv, before, a)
    assert (got["interrupts"], got["evtchn.raised"]) == (1, 2)
    assert "evtchn.coalesced" not in got


async def test_ports_in_different_selector_words_share_one_upcall(
    hv: pvio.Hypervisor, a: Probe, b: Probe
) -> None:
    pa1, pb1 = await connect(a, b)
    while a.evtchn_alloc_unbound(b.domid) < 64:
        pass
    pa2, pb2 = await connect(a, b)
    assert (pa1 // 64, pa2 // 64) == (0, 1)
    before = hv.snapshot()
    b.evtchn_send(pb2)
    b.evtchn_send(pb1)
    assert bits(a, VCPU_PENDING_SEL) == 0b11
    await settle()
    assert a.fired == [pa1, pa2]
    assert changes(hv, before, a)["interrupts"] == 1


async def test_a_port_raised_twice_before_delivery_coalesces(hv: pvio.Hypervisor, a: Probe, b: Probe) -> None:
    pa, pb = await connect(a, b)
    before = hv.snapshot()
    b.evtchn_send(pb)
    b.evtchn_send(pb)
    b.evtchn_send(pb)
    await settle()
    assert a.fired == [pa]
    got = changes(hv, before, a)
    assert (got["interrupts"], got["evtchn.raised"], got["evtchn.coalesced"]) == (1, 1, 2)
    assert changes(hv, before, b)["evtchn.sends"] == 3


async def test_sends_separated_by_delivery_are_separate_upcalls(
    hv: pvio.Hypervisor, a: Probe, b: Probe
) -> None:
    pa, pb = await connect(a, b)
    before = hv.snapshot()
    for _ in range(3):
        b.evtchn_send(pb)
        await settle()
    assert a.fired == [pa, pa, pa]
    got = changes(hv, before, a)
    assert (got["interrupts"], got["evtchn.raised"]) == (3, 3)
    assert "evtchn.coalesced" not in got


# ---- the timer VIRQ -------------------------------------------------------------------------


async def test_timer_virq_fires_once_at_the_deadline(
    hv: pvio.Hypervisor, a: Probe, autojump_clock: trio.testing.MockClock
) -> None:
    port = a.listen(a.evtchn_bind_virq(VIRQ_TIMER))
    start = trio.current_time()
    before = hv.snapshot()
    a.set_timer(a.now_ns() + 10_000_000)
    await trio.sleep_until(start + 0.0099)
    assert a.fired == []
    await trio.sleep_until(start + 0.0101)
    assert a.fired == [port]
    await trio.sleep(1)
    assert a.fired == [port]  # one-shot
    got = changes(hv, before, a)
    assert (got["interrupts"], got["evtchn.raised"], got["hypercalls.set_timer_op"]) == (1, 1, 1)


async def test_timer_rearmed_from_its_handler_fires_once_per_period(
    hv: pvio.Hypervisor, a: Probe, autojump_clock: trio.testing.MockClock
) -> None:
    period_ns = 1_000_000

    def tick(port: int) -> None:
        a.fired.append(port)
        a.set_timer(a.now_ns() + period_ns)

    port = a.evtchn_bind_virq(VIRQ_TIMER)
    a.bind_handler(port, tick)
    start = trio.current_time()
    before = hv.snapshot()
    a.set_timer(a.now_ns() + period_ns)
    await trio.sleep_until(start + 0.0105)
    assert a.fired == [port] * 10
    assert changes(hv, before, a)["interrupts"] == 10


async def test_timer_cancelled_with_zero_never_fires(
    hv: pvio.Hypervisor, a: Probe, autojump_clock: trio.testing.MockClock
) -> None:
    a.listen(a.evtchn_bind_virq(VIRQ_TIMER))
    a.set_timer(a.now_ns() + 1_000_000)
    a.set_timer(0)
    await trio.sleep(1)
    assert a.fired == []
    assert a.domain.counters["interrupts"] == 0
