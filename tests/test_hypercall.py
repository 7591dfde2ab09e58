"""The hypercall table (xen.h): Xen numbers and results, exact counters, bad guest
addresses answered with -EFAULT, garbage never raising out of dispatch, console_io, sched_op."""

from __future__ import annotations

import logging
import struct
from collections import deque

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pvio
from pvio.abi import (
    CALLBACK_REGISTER,
    DOMID_SELF,
    EVTCHN_ALLOC_UNBOUND,
    EVTCHN_BIND_INTERDOMAIN,
    EVTCHN_BIND_VIRQ,
    EVTCHN_STATUS,
    GNTTAB_COPY,
    GNTTAB_MAP_GRANT_REF,
    GNTTAB_QUERY_SIZE,
    GNTTAB_SETUP_TABLE,
    GNTTAB_UNMAP_GRANT_REF,
    PAGE_SHIFT,
    SCHED_SHUTDOWN,
    CONSOLEIO_read,
    CONSOLEIO_write,
    Errno,
    EvtchnOp,
    GnttabOp,
    Hypercall,
    SchedOp,
    ShutdownReason,
)
from pvio.core.domain import Domain
from tests.guests import Probe, boot, changes, settle

XEN_4_17 = (4 << 16) | 17


def counted(name: str, sub: str | None = None, errno: Errno | None = None) -> dict[str, int]:
    """The counters one hypercall ``name`` (sub-op ``sub``) bumps, failing with ``errno`` if given."""
    c = {"exits": 1, "exits.hypercall": 1, "hypercalls": 1, f"hypercalls.{name}": 1}
    if sub is not None:
        c[f"hypercalls.{name}.{sub}"] = 1
    if errno is not None:
        c |= {"hypercall_errors": 1, f"hypercall_errors.{errno.name}": 1}
    return c


@pytest.fixture
async def a(hv: pvio.Hypervisor) -> Probe:
    return await boot(hv, Probe(), "a")


def end_of_memory(guest: Probe) -> int:
    return guest.domain.mem.nr_pages << PAGE_SHIFT


# ---- numbers, results, counters -------------------------------------------------------------


async def test_xen_version_is_counted_exactly(hv: pvio.Hypervisor, a: Probe) -> None:
    before = hv.snapshot()
    assert a.hypercall(Hypercall.xen_version, 0) == XEN_4_17
    assert changes(hv, before, a) == counted("xen_version")


@pytest.mark.parametrize("nr", [99, 64, 2**64 - 1])
async def test_unknown_hypercall_is_enosys_and_counted(hv: pvio.Hypervisor, a: Probe, nr: int) -> None:
    before = hv.snapshot()
    assert a.hypercall(nr) == -Errno.ENOSYS
    # One key for every unknown number: a guest cannot grow the counter set at will.
    assert changes(hv, before, a) == counted("unknown", errno=Errno.ENOSYS)


@pytest.mark.parametrize("nr", [Hypercall.mmu_update, Hypercall.memory_op, Hypercall.vcpu_op])
async def test_known_but_unimplemented_hypercall_is_enosys(
    hv: pvio.Hypervisor, a: Probe, nr: Hypercall
) -> None:
    before = hv.snapshot()
    assert a.hypercall(nr) == -Errno.ENOSYS
    assert changes(hv, before, a) == counted(nr.name, errno=Errno.ENOSYS)


@pytest.mark.parametrize(
    ("nr", "cmd", "name", "sub"),
    [
        (Hypercall.event_channel_op, 42, "event_channel_op", "unknown"),
        (Hypercall.event_channel_op, EvtchnOp.bind_pirq, "event_channel_op", "bind_pirq"),
        (Hypercall.grant_table_op, 11, "grant_table_op", "unknown"),
        (Hypercall.grant_table_op, GnttabOp.transfer, "grant_table_op", "transfer"),
        (Hypercall.sched_op, SchedOp.poll, "sched_op", "poll"),
        (Hypercall.sched_op, 77, "sched_op", "unknown"),
        (Hypercall.callback_op, 5, "callback_op", "unknown"),
    ],
)
async def test_unknown_sub_op_is_enosys_counted_by_sub_op(
    hv: pvio.Hypervisor, a: Probe, nr: int, cmd: int, name: str, sub: str
) -> None:
    arg = a.arg_gpa()
    before = hv.snapshot()
    assert a.hypercall(nr, cmd, arg, 1) == -Errno.ENOSYS
    assert changes(hv, before, a) == counted(name, sub, Errno.ENOSYS)


async def test_iret_without_an_x86_vcpu_is_enosys(hv: pvio.Hypervisor, a: Probe) -> None:
    assert a.hypercall(Hypercall.iret) == -Errno.ENOSYS


async def test_set_callbacks_and_callback_op_register_the_event_callback(
    hv: pvio.Hypervisor, a: Probe
) -> None:
    assert a.hypercall(Hypercall.set_callbacks, 0x1000, 0x2000, 0x3000) == 0
    assert a.domain.callbacks == {"event": 0x1000, "failsafe": 0x2000, "syscall": 0x3000}
    rc, _ = a.raw_hypercall(Hypercall.callback_op, 0, CALLBACK_REGISTER.pack(0, 0, 0x4000))
    assert rc == 0
    assert a.domain.callbacks["event"] == 0x4000
    rc, _ = a.raw_hypercall(Hypercall.callback_op, 0, CALLBACK_REGISTER.pack(9, 0, 0x4000))
    assert rc == -Errno.EINVAL


# ---- bad guest addresses --------------------------------------------------------------------

_EFAULT_CASES = [
    (Hypercall.event_channel_op, EvtchnOp.send, 4),
    (Hypercall.event_channel_op, EvtchnOp.close, 4),
    (Hypercall.event_channel_op, EvtchnOp.unmask, 4),
    (Hypercall.event_channel_op, EvtchnOp.alloc_unbound, EVTCHN_ALLOC_UNBOUND.size),
    (Hypercall.event_channel_op, EvtchnOp.bind_interdomain, EVTCHN_BIND_INTERDOMAIN.size),
    (Hypercall.event_channel_op, EvtchnOp.bind_virq, EVTCHN_BIND_VIRQ.size),
    (Hypercall.event_channel_op, EvtchnOp.status, EVTCHN_STATUS.size),
    (Hypercall.grant_table_op, GnttabOp.map_grant_ref, GNTTAB_MAP_GRANT_REF.size),
    (Hypercall.grant_table_op, GnttabOp.unmap_grant_ref, GNTTAB_UNMAP_GRANT_REF.size),
    (Hypercall.grant_table_op, GnttabOp.copy, GNTTAB_COPY.size),
    (Hypercall.grant_table_op, GnttabOp.setup_table, GNTTAB_SETUP_TABLE.size),
    (Hypercall.grant_table_op, GnttabOp.query_size, GNTTAB_QUERY_SIZE.size),
    (Hypercall.sched_op, SchedOp.shutdown, SCHED_SHUTDOWN.size),
    (Hypercall.callback_op, 0, CALLBACK_REGISTER.size),
]


@pytest.mark.parametrize(("nr", "cmd", "size"), _EFAULT_CASES, ids=lambda v: getattr(v, "name", str(v)))
@pytest.mark.parametrize("where", ["end", "straddling", "u64max"])
async def test_argument_outside_guest_memory_is_efault(
    hv: pvio.Hypervisor, a: Probe, nr: Hypercall, cmd: int, size: int, where: str
) -> None:
    end = end_of_memory(a)
    addr = {"end": end, "straddling": end - size + 1, "u64max": 2**64 - 1}[where]
    ports = dict(a.domain.ports)
    before = hv.snapshot()
    assert a.hypercall(nr, cmd, addr, 1) == -Errno.EFAULT
    sub = {
        Hypercall.event_channel_op: EvtchnOp,
        Hypercall.grant_table_op: GnttabOp,
        Hypercall.sched_op: SchedOp,
    }
    name = sub[nr](cmd).name if nr in sub else "register"  # callback_op 0 is CALLBACKOP_register
    assert changes(hv, before, a) == counted(nr.name, name, Errno.EFAULT)
    assert a.domain.alive
    assert a.domain.ports == ports  # nothing allocated, nothing closed


async def test_setup_table_with_a_frame_list_outside_memory_is_efault(hv: pvio.Hypervisor, a: Probe) -> None:
    arg = GNTTAB_SETUP_TABLE.pack(DOMID_SELF, 1, 0, end_of_memory(a) - 4)
    rc, _ = a.raw_hypercall(Hypercall.grant_table_op, GnttabOp.setup_table, arg, 1)
    assert rc == -Errno.EFAULT


async def test_setup_table_lists_the_grant_frames(hv: pvio.Hypervisor, a: Probe) -> None:
    frames_gpa = a.arg_gpa() + 2048
    arg = GNTTAB_SETUP_TABLE.pack(DOMID_SELF, 4, 0, frames_gpa)
    rc, out = a.raw_hypercall(Hypercall.grant_table_op, GnttabOp.setup_table, arg, 1)
    assert (rc, GNTTAB_SETUP_TABLE.unpack(out)[2]) == (0, 0)
    first = a.start_info.gnttab_gfn
    assert struct.unpack_from("<4Q", a.mem, frames_gpa) == tuple(range(first, first + 4))


async def test_console_write_outside_memory_is_efault(hv: pvio.Hypervisor, a: Probe) -> None:
    end = end_of_memory(a)
    before = hv.snapshot()
    assert a.hypercall(Hypercall.console_io, CONSOLEIO_write, 8, end - 4) == -Errno.EFAULT
    assert changes(hv, before, a) == counted("console_io", errno=Errno.EFAULT)
    assert a.domain.console_lines == deque()


# ---- fuzzing --------------------------------------------------------------------------------

_U64 = st.integers(0, 2**64 - 1)
# (hypercall, sub-op) pairs that read argument structs, then calls whose sub-op is free-form.
_STRUCTURED = [(Hypercall.event_channel_op, op) for op in (0, 1, 3, 4, 5, 6, 9)]
_STRUCTURED += [(Hypercall.grant_table_op, op) for op in (0, 1, 2, 5, 6)]
_STRUCTURED += [(Hypercall.sched_op, SchedOp.shutdown), (Hypercall.callback_op, 0), (Hypercall.console_io, 0)]
_OTHERS = [
    Hypercall.set_callbacks,
    Hypercall.set_timer_op,
    Hypercall.xen_version,
    Hypercall.iret,
    Hypercall.sched_op,
]
# Argument structs built from small little-endian u16s hit ports, refs and domids that exist.
_SMALL_U16S = st.lists(
    st.one_of(st.integers(0, 12), st.sampled_from([DOMID_SELF, 4095, 4096, 0xFFFF])), max_size=24
)
_ARG_BYTES = st.one_of(st.binary(max_size=160), _SMALL_U16S.map(lambda xs: struct.pack(f"<{len(xs)}H", *xs)))
_FUZZ = settings(
    max_examples=300,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)


async def test_garbage_hypercalls_never_raise_and_the_hypervisor_keeps_working(
    hv: pvio.Hypervisor, a: Probe, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.CRITICAL, logger="pvio")  # guests shutting down and crashing is expected
    peer = await boot(hv, Probe(), "peer")
    # Give the fuzzed guest something real to hit: a channel with peer and a grant from it.
    port = a.evtchn_alloc_unbound(peer.domid)
    peer.evtchn_bind_interdomain(a.domid, port)
    peer.grant_access(a.domid, peer.alloc_page())
    await settle()
    target: list[Domain] = [a.domain]
    fuzzed: list[Domain] = [a.domain]
    arg_gpa = a.arg_gpa()
    arg_near_end = end_of_memory(a) - 8

    def dispatch(nr: int, a1: int, a2: int, a3: int, a4: int, a5: int, arg: bytes) -> None:
        if not target[0].alive:  # it shut itself down: fuzz a fresh (unbooted) guest
            target[0] = hv.create_domain(Probe(), name="fuzz")
            fuzzed.append(target[0])
        dom = target[0]
        dom.mem.write(arg_gpa, arg)
        rc = hv.hypercalls.dispatch(dom, nr, a1, a2, a3, a4, a5)
        assert isinstance(rc, int)
        assert rc >= 0 or -rc in Errno._value2member_map_

    @_FUZZ
    @given(
        call=st.sampled_from(_STRUCTURED),
        a2=st.sampled_from([arg_gpa, arg_near_end]),
        a3=st.integers(0, 4),
        arg=_ARG_BYTES,
    )
    def structured(call: tuple[int, int], a2: int, a3: int, arg: bytes) -> None:
        dispatch(call[0], call[1], a2, a3, 0, 0, arg)

    @_FUZZ
    @given(nr=st.sampled_from(_OTHERS), a1=st.integers(0, 12), a2=_U64, a3=_U64, arg=_ARG_BYTES)
    def others(nr: int, a1: int, a2: int, a3: int, arg: bytes) -> None:
        dispatch(nr, a1, a2, a3, 0, 0, arg)

    @_FUZZ
    @given(
        nr=st.one_of(st.integers(0, 63), _U64), a1=_U64, a2=_U64, a3=_U64, a4=_U64, a5=_U64, arg=_ARG_BYTES
    )
    def anything(nr: int, a1: int, a2: int, a3: int, a4: int, a5: int, arg: bytes) -> None:
        dispatch(nr, a1, a2, a3, a4, a5, arg)

    structured()
    others()
    anything()
    await settle()
    snap = hv.snapshot()
    assert snap.total("hypercall_internal_errors") == 0
    assert sum(snap.get_count(f"dom{d.domid}", "hypercalls") for d in fuzzed) >= 900
    # Still working: a new guest boots, talks to the store, signals and shares a page with peer.
    fresh = await boot(hv, Probe(), "fresh")
    assert await fresh.xenbus.read("name") == "fresh"
    p = fresh.listen(fresh.evtchn_alloc_unbound(peer.domid))
    q = peer.evtchn_bind_interdomain(fresh.domid, p)
    peer.evtchn_send(q)
    await settle()
    assert fresh.fired == [p]
    gfn = fresh.alloc_page()
    fresh.page(gfn)[:2] = b"ok"
    m = peer.grant_map(fresh.domid, fresh.grant_access(peer.domid, gfn))
    assert bytes(m.view[:2]) == b"ok"


# ---- console_io -----------------------------------------------------------------------------


async def test_console_io_collects_complete_lines(hv: pvio.Hypervisor, a: Probe) -> None:
    before = hv.snapshot()
    a.console("hello\nworld\npart")
    assert a.domain.console_lines == deque(["hello", "world"])
    a.console("ial\n")
    assert a.domain.console_lines == deque(["hello", "world", "partial"])
    assert a.domain.console == "hello\nworld\npartial"
    assert changes(hv, before, a) == {k: 2 * v for k, v in counted("console_io").items()}


async def test_console_io_is_logged(hv: pvio.Hypervisor, a: Probe, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="pvio.domain")
    a.console("logged line\n")
    assert f"dom{a.domid} console: logged line" in caplog.messages


async def test_console_io_limits(hv: pvio.Hypervisor, a: Probe) -> None:
    arg = a.arg_gpa()
    assert a.hypercall(Hypercall.console_io, CONSOLEIO_write, 4097, arg) == -Errno.EINVAL
    assert a.hypercall(Hypercall.console_io, CONSOLEIO_read, 16, arg) == 0
    assert a.hypercall(Hypercall.console_io, 7, 1, arg) == -Errno.ENOSYS
    assert a.domain.console_lines == deque()


# ---- sched_op -------------------------------------------------------------------------------


async def test_sched_op_shutdown_destroys_the_domain(hv: pvio.Hypervisor, a: Probe) -> None:
    dom = a.domain
    before = hv.snapshot()
    a.shutdown(ShutdownReason.poweroff)
    assert changes(hv, before, a) == counted("sched_op", "shutdown")
    assert (dom.state, dom.shutdown_reason, dom.crash_reason) == ("dead", ShutdownReason.poweroff, None)
    assert dom.domid not in hv.domains
    assert hv.channel_state(dom, dom.store_port) is None
    assert a.hypercall(Hypercall.xen_version) == -Errno.ENOSYS  # a dead domain makes no hypercalls
    await settle()


async def test_sched_op_shutdown_from_the_guests_own_task(hv: pvio.Hypervisor) -> None:
    class PowersOff(Probe):
        async def main(self) -> None:
            self.console("bye\n")
            self.shutdown(ShutdownReason.poweroff)
            await settle()
            self.console("never printed\n")

    guest = PowersOff()
    await boot(hv, guest, "off")
    assert guest.domain.state == "dead"
    assert guest.domain.console_lines == deque(["bye"])
    assert guest.domain.crash_reason is None


async def test_sched_op_shutdown_crash_marks_the_domain_crashed(
    hv: pvio.Hypervisor, a: Probe, caplog: pytest.LogCaptureFixture
) -> None:
    a.shutdown(ShutdownReason.crash)
    dom = a.domain
    assert (dom.state, dom.shutdown_reason) == ("dead", ShutdownReason.crash)
    assert dom.crash_reason == "guest reported a crash"
    assert dom.counters["crashes"] == 1
    assert f"dom{dom.domid} stopped: guest reported a crash" in caplog.messages


async def test_sched_op_yield_and_block_return_zero(hv: pvio.Hypervisor, a: Probe) -> None:
    before = hv.snapshot()
    assert a.hypercall(Hypercall.sched_op, SchedOp.yield_) == 0
    assert changes(hv, before, a) == counted("sched_op", "yield")
    assert a.hypercall(Hypercall.sched_op, SchedOp.block) == 0
    await settle()


async def test_console_is_bounded_in_lines_and_line_length(hv: pvio.Hypervisor, a: Probe) -> None:
    """The guest controls how much it prints: pvio keeps the last 1000 lines, each cut at 4096 bytes."""
    from pvio.core.domain import CONSOLE_LINE_MAX, CONSOLE_LINES

    a.console("x" * 4000)
    a.console("y" * 4000)  # the unterminated line passes the limit: cut there
    assert list(a.domain.console_lines) == ["x" * 4000 + "y" * (CONSOLE_LINE_MAX - 4000)]
    for i in range(CONSOLE_LINES + 5):
        a.console(f"line {i}\n")
    assert len(a.domain.console_lines) == CONSOLE_LINES
    assert a.domain.console_lines[0] == "line 5"


async def test_a_pyguests_direct_send_and_block_count_as_the_hypercalls_do(
    hv: pvio.Hypervisor, a: Probe
) -> None:
    """PyGuest.evtchn_send and .block enter their handlers without dispatch(): the counters they
    bump, their errors and their effect are the hypercalls', key for key."""
    peer = await boot(hv, Probe(), "peer")
    port = peer.evtchn_alloc_unbound(a.domain.domid)
    local = a.evtchn_bind_interdomain(peer.domain.domid, port)
    await settle()
    before = hv.snapshot()
    a.evtchn_send(local)
    direct = changes(hv, before, a)
    before = hv.snapshot()
    struct.pack_into("<I", a.mem, a.arg_gpa(), local)
    assert a.hypercall(Hypercall.event_channel_op, EvtchnOp.send, a.arg_gpa()) == 0
    assert direct == changes(hv, before, a) == counted("event_channel_op", "send") | {"evtchn.sends": 1}
    before = hv.snapshot()
    with pytest.raises(pvio.XenError):
        a.evtchn_send(4000)  # no such port
    assert changes(hv, before, a) == counted("event_channel_op", "send", Errno.EINVAL)
    before = hv.snapshot()
    a.block()
    assert changes(hv, before, a) == counted("sched_op", "block")
