"""A lying backend against the C netfront (``frontends/x86/netfront.c``), under hypothesis.

The x86 guest X runs pvio's C guest kernel on the emulated vCPU, connected through netback
like the PyGuests A and B.  The test then plays a hostile backend against X, two ways:

* through netback's own end of X's RX ring (the indices stay consistent): take some of the
  RX buffers X posted and answer them with responses of its choosing (any id, offset,
  flags, status), as ``test_netfront_hostile`` does against the Python netfront;
* by raw writes to X's shared ring pages: a response slot of either ring rewritten and the
  response producer index moved by any amount, then X's event channel raised.

Properties, after every sequence:

* nothing escapes the guest: X's vCPU took no fault (no access outside its memory), X is
  alive, its console shows no panic, and at most one disconnect, naming one of the reasons
  the C netfront gives (the same rules as the Python netfront);
* dom0 and the hypervisor keep running; netback's handling of X raised no internal error;
* a netfront that stayed connected still answers a ping;
* the bystanders A and B exchange traffic both ways and lose nothing.

``make test`` runs a few examples (each boots the x86 guest: about half a second);
``make fuzz`` (``PVIO_FUZZ=1``) runs many more.
"""

from __future__ import annotations

import os
import re
import struct
from typing import Any

import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pvio.core import evtchn
from pvio.cpu.guest import X86Guest
from pvio.frontends.netstack import icmp_echo
from pvio.harness.demo import wait_x86_ready
from pvio.ringbuf.netif import NETRXF_MORE_DATA, RX_REQUEST, RX_RESPONSE
from tests.netenv import NicGuest, ip_of, net_env, recv_n, seq_of, udp_stream

FUZZ = os.environ.get("PVIO_FUZZ") == "1"
IP_X86 = "10.0.0.9"
K = 20
#: What the C netfront says when it disconnects from a backend that broke the protocol.
REASONS = {
    "impossible TX response producer index",
    "TX response id is not an outstanding request",
    "impossible RX response producer index",
    "RX response id is not a posted buffer",
    "RX response of 0 bytes",
    "RX response crosses its page",
    "RX packet of more than 18 slots",
}
DISCONNECT = re.compile(r"netfront: vif\d+\.0 disconnected: (.*)")

RESPONSE = st.tuples(
    st.one_of(st.integers(-4, -1), st.integers(0, 300), st.just(0xFFFF)),  # id: -k = k-th buffer taken
    st.sampled_from([0, 0, 1, 100, 4000, 4095, 4096, 0xFFFF]),  # offset
    st.sampled_from([0, 0, NETRXF_MORE_DATA, NETRXF_MORE_DATA, 0xFF, 0xFFFF]),  # flags
    st.sampled_from([-32768, -2, -1, 0, 1, 14, 60, 100, 1514, 4096, 4097, 32767]),  # status
)
STEP = st.one_of(
    st.tuples(st.just("lie"), st.lists(RESPONSE, min_size=1, max_size=24)),
    st.tuples(
        st.just("raw"),
        st.sampled_from(["tx", "rx"]),
        st.binary(min_size=8, max_size=8),
        st.sampled_from([0, 1, 1, 2, 255, 256, 257, 1000, 2**31, 2**32 - 1]),
    ),
)


async def lie(env: Any, x86: X86Guest, responses: list[tuple[int, int, int, int]]) -> None:
    """Take len(responses) of X's posted RX buffers at netback's end and answer with ``responses``."""
    vif = env.vif(x86)
    ids = [rid for rid, _pad, _gref in RX_REQUEST.iter_unpack(vif.rx.take_requests(len(responses)))]
    if not ids:
        return
    out = [
        (ids[(-rid - 1) % len(ids)] if rid < 0 else rid, off, flags, status)
        for rid, off, flags, status in responses[: len(ids)]
    ]
    vif.rx.send(b"".join(RX_RESPONSE.pack(*r) for r in out))
    vif.dom0.evtchn_send(vif.port)


def raw(env: Any, x86: X86Guest, ring: str, slot: bytes, advance: int) -> None:
    """Rewrite X's next response slot of ``ring`` and move its rsp_prod ``advance`` ahead."""
    dom = x86.domain
    fe = f"/local/domain/{dom.domid}/device/vif/0"
    ref = int(env.hv.toolstack.read(f"{fe}/{ring}-ring-ref"))
    port = int(env.hv.toolstack.read(f"{fe}/event-channel"))
    _flags, _domid, gfn = dom.grant_table.read_entry(ref)
    page = dom.mem.page(gfn)
    (rsp_prod,) = struct.unpack_from("<I", page, 8)
    size = 12 if ring == "tx" else 8  # the ring's slot: the request/response union
    at = 64 + (rsp_prod % 256) * size
    page[at : at + 8] = slot
    struct.pack_into("<I", page, 8, (rsp_prod + advance) & 0xFFFF_FFFF)
    evtchn.set_pending(dom, port)


async def exchange(a: NicGuest, b: NicGuest, start: int) -> None:
    await a.nic.send_batch(udp_stream(a, b, K, start=start))
    await b.nic.send_batch(udp_stream(b, a, K, start=start))
    assert [seq_of(f) for f in await recv_n(b.nic, K)] == list(range(start, start + K))
    assert [seq_of(f) for f in await recv_n(a.nic, K)] == list(range(start, start + K))


async def scenario(steps: list[tuple[Any, ...]]) -> None:
    a, b = NicGuest("a", ip_of(0)), NicGuest("b", ip_of(1))
    x86 = X86Guest(name="x86-victim", cmdline=f"mode=echo ip={IP_X86}")
    async with net_env(a, b, x86) as env:
        mac = await wait_x86_ready(x86, env.switch)
        await trio.sleep(0.01)
        await exchange(a, b, 0)
        for step in steps:
            if step[0] == "lie":
                await lie(env, x86, step[1])
            else:
                raw(env, x86, *step[1:])
            await trio.sleep(0.01)
        dom = x86.domain
        assert dom.alive and dom.crash_reason is None
        assert dom.counters["exits.fault"] == 0
        assert "panic" not in dom.console
        said = DISCONNECT.findall(dom.console)
        assert len(said) <= 1 and set(said) <= REASONS, said
        assert env.hv.dom0 is not None and env.hv.dom0.state == "running"
        assert env.count(f"netback/vif{dom.domid}.0", "internal_errors") == 0
        if not said:  # still connected: still answering (a ping may land in a buffer the
            # backend's raw writes corrupted, and be dropped for it: up to three tries)
            answered = False
            for seq in range(3):
                await a.nic.send(icmp_echo(a.nic.mac, mac, ip_of(0), IP_X86, 7, seq, b"alive?"))
                await trio.sleep(0.05)
                while a.nic.pending():
                    answered |= (await a.nic.recv())[6:12] == mac
                if answered or DISCONNECT.search(dom.console):
                    break
            # A lie left in a request slot takes effect only when a frame uses that buffer:
            # then the C netfront disconnects, naming why.
            said = DISCONNECT.findall(dom.console)
            assert answered or (len(said) == 1 and set(said) <= REASONS), (
                "the C netfront stayed connected but answers nothing"
            )
        await exchange(a, b, K)
        assert env.count("netfront/vif1.0", "disconnects") == env.count("netfront/vif2.0", "disconnects") == 0


@settings(
    max_examples=150 if FUZZ else 5,
    deadline=None,
    derandomize=not FUZZ,
    suppress_health_check=list(HealthCheck),
)
@given(steps=st.lists(STEP, min_size=1, max_size=4))
def test_fuzz_lying_backend_against_the_c_netfront(steps: list[tuple[Any, ...]]) -> None:
    trio.run(scenario, steps, clock=trio.testing.MockClock(autojump_threshold=0))
