"""Xen's own headers against pvio's rings: a differential test on the netif TX and RX rings.

``tests/xen_headers/xen_rings.c`` implements both ends of each netif ring with nothing but
the macros of Xen's ``io/ring.h`` and the types of ``io/netif.h`` (Debian ``libxen-dev``).
It is compiled here with gcc into a temporary directory and loaded with cffi's ABI mode.

Two pages run in lockstep on one seeded random schedule, starting with every index just
below 2**32 so the run crosses the wrap:

* page A: Xen's front end (C) and pvio's back end (:class:`pvio.ringbuf.BackRing`);
* page B: pvio's front end (:class:`pvio.ringbuf.FrontRing`) and Xen's back end (C).

Each step does the same operation on both pages.  Every entry must arrive intact and in
order, every notify decision and final-check answer of pvio must equal Xen's for the same
operation, and the two pages must stay byte-identical throughout.  Xen's layout numbers
and netif constants are compared with pvio's.
"""

from __future__ import annotations

import random
import shutil
import subprocess
import zlib
from collections import deque
from pathlib import Path
from typing import Any

import pytest

from pvio.ringbuf import NETIF_RX, NETIF_TX, PAGE_SIZE, BackRing, FrontRing, RingLayout
from pvio.ringbuf import netif as pvio_netif
from pvio.ringbuf._ringbuf import ffi as pvio_ffi

HEADERS = Path("/usr/include/xen/io")
SOURCE = Path(__file__).parent / "xen_headers" / "xen_rings.c"
U32 = 1 << 32

if not (HEADERS / "ring.h").exists() or not (HEADERS / "netif.h").exists() or shutil.which("gcc") is None:
    pytest.skip("needs Xen's headers (Debian package libxen-dev) and gcc", allow_module_level=True)

CDEF = """
int xh_nconsts(void);
const char *xh_const_name(int i);
long xh_const_value(int i);
"""
for _tag in ("netif_tx", "netif_rx"):
    CDEF += f"""
    void {_tag}_shared_init(void *page, uint32_t start);
    void {_tag}_front_attach(void *page, uint32_t start);
    void {_tag}_back_attach(void *page, uint32_t start);
    int {_tag}_front_free(void);
    int {_tag}_front_put(const void *reqs, int n);
    int {_tag}_front_push(void);
    int {_tag}_front_take(void *out, int max);
    int {_tag}_front_final_check(void);
    int {_tag}_back_take(void *out, int max);
    int {_tag}_back_put(const void *rsps, int n);
    int {_tag}_back_push(void);
    int {_tag}_back_final_check(void);
    """


@pytest.fixture(scope="module")
def xen(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The C ends, compiled against /usr/include/xen, as (ffi, lib)."""
    import cffi

    out = tmp_path_factory.mktemp("xen_headers") / "libxen_rings.so"
    subprocess.run(
        ["gcc", "-shared", "-fPIC", "-O2", "-Wall", "-Wextra", "-Werror", "-o", str(out), str(SOURCE)],
        check=True,
        capture_output=True,
        timeout=120,
    )
    ffi = cffi.FFI()
    ffi.cdef(CDEF)
    return ffi, ffi.dlopen(str(out))


def test_every_constant_and_layout_number_equals_pvios(xen: Any) -> None:
    ffi, lib = xen
    names = [ffi.string(lib.xh_const_name(i)).decode() for i in range(lib.xh_nconsts())]
    theirs = {name: lib.xh_const_value(i) for i, name in enumerate(names)}
    ours: dict[str, int] = {
        "sizeof(struct netif_tx_request)": NETIF_TX.req_size,
        "sizeof(struct netif_tx_response)": NETIF_TX.rsp_size,
        "sizeof(struct netif_rx_request)": NETIF_RX.req_size,
        "sizeof(struct netif_rx_response)": NETIF_RX.rsp_size,
        "sizeof(union netif_tx_sring_entry)": NETIF_TX.ent_size,
        "sizeof(union netif_rx_sring_entry)": NETIF_RX.ent_size,
        "offsetof(struct netif_tx_sring, ring)": pvio_ffi.sizeof("struct pvio_sring"),
        "offsetof(struct netif_rx_sring, ring)": pvio_ffi.sizeof("struct pvio_sring"),
        "NET_TX_RING_SIZE": pvio_netif.NET_TX_RING_SIZE,
        "NET_RX_RING_SIZE": pvio_netif.NET_RX_RING_SIZE,
        "NETTXF_csum_blank": pvio_netif.NETTXF_CSUM_BLANK,
        "NETTXF_data_validated": pvio_netif.NETTXF_DATA_VALIDATED,
        "NETTXF_more_data": pvio_netif.NETTXF_MORE_DATA,
        "NETTXF_extra_info": pvio_netif.NETTXF_EXTRA_INFO,
        "NETRXF_data_validated": pvio_netif.NETRXF_DATA_VALIDATED,
        "NETRXF_csum_blank": pvio_netif.NETRXF_CSUM_BLANK,
        "NETRXF_more_data": pvio_netif.NETRXF_MORE_DATA,
        "NETRXF_extra_info": pvio_netif.NETRXF_EXTRA_INFO,
        "NETRXF_gso_prefix": pvio_netif.NETRXF_GSO_PREFIX,
        "NETIF_RSP_DROPPED": pvio_netif.NETIF_RSP_DROPPED,
        "NETIF_RSP_ERROR": pvio_netif.NETIF_RSP_ERROR,
        "NETIF_RSP_OKAY": pvio_netif.NETIF_RSP_OKAY,
        "NETIF_RSP_NULL": pvio_netif.NETIF_RSP_NULL,
        "XEN_NETIF_NR_SLOTS_MIN": pvio_netif.XEN_NETIF_NR_SLOTS_MIN,
        "XEN_NETIF_MAX_TX_SIZE": pvio_netif.XEN_NETIF_MAX_TX_SIZE,
        "XEN_NETIF_EXTRA_TYPE_NONE": pvio_netif.XEN_NETIF_EXTRA_TYPE_NONE,
        "XEN_NETIF_EXTRA_TYPE_GSO": pvio_netif.XEN_NETIF_EXTRA_TYPE_GSO,
        "XEN_NETIF_EXTRA_TYPE_MCAST_ADD": pvio_netif.XEN_NETIF_EXTRA_TYPE_MCAST_ADD,
        "XEN_NETIF_EXTRA_TYPE_MCAST_DEL": pvio_netif.XEN_NETIF_EXTRA_TYPE_MCAST_DEL,
        "XEN_NETIF_EXTRA_TYPE_HASH": pvio_netif.XEN_NETIF_EXTRA_TYPE_HASH,
        "XEN_NETIF_EXTRA_FLAG_MORE": pvio_netif.XEN_NETIF_EXTRA_FLAG_MORE,
    }
    header = {"req_prod": 0, "req_event": 4, "rsp_prod": 8, "rsp_event": 12}
    for field, offset in header.items():
        assert pvio_ffi.offsetof("struct pvio_sring", field) == offset
        ours[f"offsetof(struct netif_tx_sring, {field})"] = offset
    for struct_name in ("netif_tx_request", "netif_tx_response", "netif_rx_request", "netif_rx_response"):
        for field, _ in pvio_ffi.typeof(f"struct {struct_name}").fields:
            key = f"offsetof(struct {struct_name}, {field})"
            if key in theirs:
                ours[key] = pvio_ffi.offsetof(f"struct {struct_name}", field)
    assert theirs == ours  # every number Xen's headers give, and nothing pvio lacks


class Pair:
    """The same ring on two pages: A = Xen front + pvio back, B = pvio front + Xen back."""

    def __init__(self, xen: Any, tag: str, layout: RingLayout, start: int) -> None:
        self.ffi, lib = xen
        self.c = {name: getattr(lib, f"{tag}_{name}") for name in _C_OPS}
        self.layout = layout
        self.page_a = bytearray(PAGE_SIZE)
        self.page_b = bytearray(PAGE_SIZE)
        self.buf_a = self.ffi.from_buffer(self.page_a)
        self.buf_b = self.ffi.from_buffer(self.page_b)
        self.c["shared_init"](self.buf_a, start)
        self.c["shared_init"](self.buf_b, start)
        assert self.page_a == self.page_b
        self.c["front_attach"](self.buf_a, start)
        self.back = BackRing(layout, self.page_a, attach_at=start)
        self.front = FrontRing(layout, self.page_b, attach_at=start)
        self.c["back_attach"](self.buf_b, start)
        self.scratch = self.ffi.new("char[]", PAGE_SIZE)

    def c_take(self, op: str, size: int, max_n: int) -> bytes:
        n = self.c[op](self.scratch, max_n)
        return bytes(self.ffi.buffer(self.scratch, n * size))

    def close(self) -> None:
        self.back.release()
        self.front.release()


_C_OPS = [
    "shared_init",
    "front_attach",
    "back_attach",
    "front_free",
    "front_put",
    "front_push",
    "front_take",
    "front_final_check",
    "back_take",
    "back_put",
    "back_push",
    "back_final_check",
]


def run_differential(
    xen: Any, tag: str, layout: RingLayout, start: int, steps: int, seed: int
) -> dict[str, int]:
    """Run ``steps`` random operations on a :class:`Pair`; the counts of what happened."""
    rng = random.Random(seed)
    pair = Pair(xen, tag, layout, start)
    req_size, rsp_size = layout.req_size, layout.rsp_size
    in_flight: deque[bytes] = deque()  # requests pushed, not yet taken by the back ends
    awaiting: deque[bytes] = deque()  # requests taken, not yet answered
    answered: deque[bytes] = deque()  # responses pushed, not yet taken by the front ends
    stats = dict.fromkeys(["requests", "responses", "notify", "no_notify", "final_checks", "pushes"], 0)
    try:
        for _ in range(steps):
            op = rng.randrange(6)
            if op == 0:  # the front ends produce requests and push them
                free = pair.c["front_free"]()
                assert free == pair.front.free_requests
                k = rng.randint(0, min(free, 24))
                reqs = rng.randbytes(k * req_size)
                assert pair.c["front_put"](reqs, k) == k
                assert pair.front.write_requests(reqs) == k
                notify_xen, notify_pvio = pair.c["front_push"](), pair.front.push_requests()
                assert bool(notify_xen) == notify_pvio
                stats["notify" if notify_pvio else "no_notify"] += 1
                stats["pushes"] += 1
                in_flight.extend(reqs[i : i + req_size] for i in range(0, len(reqs), req_size))
                stats["requests"] += k
            elif op == 1:  # the back ends take requests
                m = rng.randint(1, 32)
                got_pvio = pair.back.take_requests(m)
                got_xen = pair.c_take("back_take", req_size, m)
                assert got_pvio == got_xen
                for i in range(0, len(got_pvio), req_size):
                    assert got_pvio[i : i + req_size] == in_flight.popleft()  # intact, in order
                    awaiting.append(got_pvio[i : i + req_size])
            elif op == 2:  # the back ends answer some taken requests and push
                k = rng.randint(0, len(awaiting))
                rsps = rng.randbytes(k * rsp_size)
                for _ in range(k):
                    awaiting.popleft()
                assert pair.back.write_responses(rsps) == k
                assert pair.c["back_put"](rsps, k) == k
                notify_pvio, notify_xen = pair.back.push_responses(), pair.c["back_push"]()
                assert bool(notify_xen) == notify_pvio
                stats["notify" if notify_pvio else "no_notify"] += 1
                stats["pushes"] += 1
                answered.extend(rsps[i : i + rsp_size] for i in range(0, len(rsps), rsp_size))
                stats["responses"] += k
            elif op == 3:  # the front ends take responses
                m = rng.randint(1, 32)
                got_xen = pair.c_take("front_take", rsp_size, m)
                got_pvio = pair.front.take_responses(m)
                assert got_pvio == got_xen
                for i in range(0, len(got_pvio), rsp_size):
                    assert got_pvio[i : i + rsp_size] == answered.popleft()
            elif op == 4:  # the back ends are about to sleep
                work_pvio = pair.back.final_check_for_requests()
                work_xen = pair.c["back_final_check"]()
                assert work_pvio == work_xen
                stats["final_checks"] += 1
            else:  # the front ends are about to sleep
                work_xen = pair.c["front_final_check"]()
                work_pvio = pair.front.final_check_for_responses()
                assert work_pvio == work_xen
                stats["final_checks"] += 1
            assert pair.page_a == pair.page_b  # the same operations leave the same bytes
        return stats
    finally:
        pair.close()


WRAP_STARTS = [U32 - 1000, U32 - 1, 0x7FFFFFF0]


@pytest.mark.parametrize("start", WRAP_STARTS, ids=lambda s: f"start={s:#x}")
@pytest.mark.parametrize("tag,layout", [("netif_tx", NETIF_TX), ("netif_rx", NETIF_RX)], ids=["tx", "rx"])
def test_a_long_random_run_across_the_index_wrap_agrees_with_xen(
    xen: Any, tag: str, layout: RingLayout, start: int
) -> None:
    stats = run_differential(xen, tag, layout, start, steps=6000, seed=start ^ zlib.crc32(tag.encode()))
    assert stats["requests"] > 2000 and stats["responses"] > 2000  # far past the wrap
    assert stats["notify"] > 0 and stats["no_notify"] > 0  # both decisions were exercised
