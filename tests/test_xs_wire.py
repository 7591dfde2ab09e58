"""xs_wire: the xenstore protocol on a ring page, xenstored's end (RingConnection) and the guest's
(XenbusClient), including hostile input from either side."""

from __future__ import annotations

import logging
import struct

import pytest
import trio
import trio.testing

from pvio.xenstore import wire
from pvio.xenstore.client import Transaction, XenbusClient, loopback
from pvio.xenstore.server import RingConnection
from pvio.xenstore.store import Store, XenstoreError
from pvio.xenstore.wire import XS_INVALID, XS_TYPE_COUNT, XenbusState, XsHeader, XsType

# The interface layout, spelled out independently of the module's constants.
REQ, RSP, REQ_CONS, REQ_PROD, RSP_CONS, RSP_PROD, FEATURES, ERROR = (
    0,
    1024,
    2048,
    2052,
    2056,
    2060,
    2064,
    2072,
)


class RawGuest:
    """Plays a guest byte by byte on the page, to send what a real client never would."""

    def __init__(self, page: memoryview) -> None:
        self.page = page

    def u32(self, offset: int) -> int:
        return int(struct.unpack_from("<I", self.page, offset)[0])

    def set_u32(self, offset: int, value: int) -> None:
        struct.pack_into("<I", self.page, offset, value & 0xFFFFFFFF)

    def send(self, data: bytes) -> None:
        prod = self.u32(REQ_PROD)
        for i, byte in enumerate(data):
            self.page[REQ + ((prod + i) & 1023)] = byte
        self.set_u32(REQ_PROD, prod + len(data))

    def request(self, msg_type: int, payload: bytes, req_id: int = 1, tx_id: int = 0) -> None:
        self.send(struct.pack("<IIII", msg_type, req_id, tx_id, len(payload)) + payload)

    def receive(self) -> bytes:
        cons, prod = self.u32(RSP_CONS), self.u32(RSP_PROD)
        n = (prod - cons) & 0xFFFFFFFF
        data = bytes(self.page[RSP + ((cons + i) & 1023)] for i in range(n))
        self.set_u32(RSP_CONS, prod)
        return data

    def replies(self) -> list[tuple[int, int, int, bytes]]:
        data = self.receive()
        out = []
        while data:
            msg_type, req_id, tx_id, length = struct.unpack_from("<IIII", data)
            out.append((msg_type, req_id, tx_id, data[16 : 16 + length]))
            data = data[16 + length :]
        return out


class Notifier:
    def __init__(self) -> None:
        self.count = 0

    def __call__(self) -> None:
        self.count += 1


@pytest.fixture
def store() -> Store:
    s = Store()
    for domid in (0, 1, 2):
        s.introduce_domain(domid)
    return s


def raw_connection(store: Store, domid: int) -> tuple[RawGuest, RingConnection, Notifier]:
    page = memoryview(bytearray(4096))
    notify = Notifier()
    return RawGuest(page), RingConnection(store, domid, page, notify), notify


# -- the ABI -------------------------------------------------------------------------------------


def test_message_type_numbers_are_xs_wire_h() -> None:
    expected = {
        "CONTROL": 0, "DIRECTORY": 1, "READ": 2, "GET_PERMS": 3, "WATCH": 4, "UNWATCH": 5,
        "TRANSACTION_START": 6, "TRANSACTION_END": 7, "INTRODUCE": 8, "RELEASE": 9,
        "GET_DOMAIN_PATH": 10, "WRITE": 11, "MKDIR": 12, "RM": 13, "SET_PERMS": 14,
        "WATCH_EVENT": 15, "ERROR": 16, "IS_DOMAIN_INTRODUCED": 17, "RESUME": 18, "SET_TARGET": 19,
        "RESET_WATCHES": 21, "DIRECTORY_PART": 22, "GET_FEATURE": 23, "SET_FEATURE": 24,
        "GET_QUOTA": 25, "SET_QUOTA": 26,
    }  # fmt: skip
    assert {t.name: t.value for t in XsType} == expected
    assert XsType.DEBUG is XsType.CONTROL
    assert (XS_TYPE_COUNT, XS_INVALID) == (27, 0xFFFF)


def test_header_is_four_little_endian_u32() -> None:
    header = XsHeader(XsType.READ, 0x01020304, 5, 6)
    assert header.pack() == bytes.fromhex("02000000 04030201 05000000 06000000")
    assert XsHeader.unpack(header.pack()) == header
    assert wire.XSD_SOCKMSG.size == 16
    assert wire.XENSTORE_PAYLOAD_MAX == 4096


def test_interface_offsets_are_xens() -> None:
    offsets = (
        wire.OFFSET_REQ, wire.OFFSET_RSP, wire.OFFSET_REQ_CONS, wire.OFFSET_REQ_PROD,
        wire.OFFSET_RSP_CONS, wire.OFFSET_RSP_PROD, wire.OFFSET_SERVER_FEATURES,
        wire.OFFSET_CONNECTION, wire.OFFSET_ERROR, wire.OFFSET_EVTCHN_PORT,
    )  # fmt: skip
    assert offsets == (0, 1024, 2048, 2052, 2056, 2060, 2064, 2068, 2072, 2076)
    assert wire.XENSTORE_DOMAIN_INTERFACE_SIZE == 2080
    assert wire.XENSTORE_RING_SIZE == 1024
    assert (wire.XENSTORE_ERROR_COMMS, wire.XENSTORE_ERROR_RINGIDX, wire.XENSTORE_ERROR_PROTO) == (
        1,
        2,
        3,
    )


def test_xenbus_states_are_io_xenbus_h() -> None:
    assert [s.value for s in XenbusState] == list(range(9))
    assert (XenbusState.INIT_WAIT, XenbusState.CONNECTED, XenbusState.RECONFIGURED) == (2, 4, 8)


def test_store_operations_count_under_their_wire_type_names(store: Store) -> None:
    conn = store.connect(1)
    conn.write("a", "1")
    conn.directory("a")
    conn.get_perms("a")
    conn.watch("a", "t")
    conn.transaction_end(conn.transaction_start())
    assert set(store.counters(1)["requests"]) <= {t.name for t in XsType}


def test_server_advertises_the_error_field(store: Store) -> None:
    guest, _, _ = raw_connection(store, 1)
    assert guest.u32(FEATURES) == wire.XENSTORE_SERVER_FEATURE_ERROR == 2


# -- the server, byte by byte --------------------------------------------------------------------


def test_reply_echoes_req_id_and_tx_id_and_notifies_once(store: Store) -> None:
    guest, conn, notify = raw_connection(store, 1)
    guest.request(XsType.WRITE, b"key\0value", req_id=7)
    guest.request(XsType.READ, b"key\0", req_id=3)
    guest.request(XsType.READ, b"missing\0", req_id=9)
    conn.process()
    assert guest.replies() == [
        (XsType.WRITE, 7, 0, b"OK\0"),
        (XsType.READ, 3, 0, b"value"),
        (XsType.ERROR, 9, 0, b"ENOENT\0"),
    ]
    assert notify.count == 1
    assert guest.u32(REQ_CONS) == guest.u32(REQ_PROD)


def test_process_without_work_does_not_notify(store: Store) -> None:
    _, conn, notify = raw_connection(store, 1)
    conn.process()
    assert notify.count == 0


def test_partial_message_waits_for_the_rest(store: Store) -> None:
    guest, conn, notify = raw_connection(store, 1)
    message = struct.pack("<IIII", XsType.WRITE, 1, 0, 5) + b"k\0abc"
    guest.send(message[:10])
    conn.process()
    assert guest.replies() == []
    assert notify.count == 1  # it consumed bytes: the guest may have been waiting for room
    guest.send(message[10:])
    conn.process()
    assert guest.replies() == [(XsType.WRITE, 1, 0, b"OK\0")]


def test_transaction_over_the_raw_wire(store: Store) -> None:
    guest, conn, _ = raw_connection(store, 1)
    guest.request(XsType.TRANSACTION_START, b"\0", req_id=1)
    conn.process()
    [(msg_type, _, _, payload)] = guest.replies()
    assert msg_type == XsType.TRANSACTION_START and payload.endswith(b"\0")
    tx = int(payload[:-1])
    guest.request(XsType.WRITE, b"k\0v", req_id=2, tx_id=tx)
    guest.request(XsType.TRANSACTION_START, b"\0", req_id=3, tx_id=tx)
    guest.request(XsType.TRANSACTION_END, b"T\0", req_id=4, tx_id=tx)
    guest.request(XsType.TRANSACTION_END, b"T\0", req_id=5, tx_id=tx)
    conn.process()
    assert guest.replies() == [
        (XsType.WRITE, 2, tx, b"OK\0"),
        (XsType.ERROR, 3, tx, b"EBUSY\0"),
        (XsType.TRANSACTION_END, 4, tx, b"OK\0"),
        (XsType.ERROR, 5, tx, b"ENOENT\0"),
    ]
    assert store.connect(0).read("/local/domain/1/k") == b"v"


def test_watch_reply_comes_before_the_initial_event(store: Store) -> None:
    guest, conn, _ = raw_connection(store, 1)
    guest.request(XsType.WATCH, b"device\0tok\0", req_id=4)
    conn.process()
    assert guest.replies() == [(XsType.WATCH, 4, 0, b"OK\0"), (XsType.WATCH_EVENT, 0, 0, b"device\0tok\0")]


def test_directory_get_perms_and_domain_path_payloads(store: Store) -> None:
    guest, conn, _ = raw_connection(store, 1)
    guest.request(XsType.WRITE, b"d/a\0", req_id=1)
    guest.request(XsType.WRITE, b"d/b\0", req_id=2)
    guest.request(XsType.DIRECTORY, b"d\0", req_id=3)
    guest.request(XsType.DIRECTORY, b"d/a\0", req_id=4)
    guest.request(XsType.GET_PERMS, b"d\0", req_id=5)
    guest.request(XsType.GET_DOMAIN_PATH, b"7\0", req_id=6)
    guest.request(XsType.DIRECTORY_PART, b"d\x000\0", req_id=7)
    conn.process()
    replies = guest.replies()
    assert [r[3] for r in replies[2:6]] == [b"a\0b\0", b"", b"n1\0r0\0", b"/local/domain/7\0"]
    generation, rest = replies[6][3].split(b"\0", 1)
    assert generation.isdigit() and rest == b"a\0b\0\0"


@pytest.mark.parametrize(
    ("msg_type", "payload"),
    [
        (XsType.READ, b"no-nul"),
        (XsType.READ, b"\xff\xfe\0"),
        (XsType.READ, b"two\0args\0"),
        (XsType.READ, b""),
        (XsType.WRITE, b"no-separator"),
        (XsType.WRITE, b"bad path\0v"),
        (XsType.SET_PERMS, b"only-path\0"),
        (XsType.SET_PERMS, b"p\0q7\0"),
        (XsType.WATCH, b"path-only\0"),
        (XsType.UNWATCH, b"p\0t\0extra\0"),
        (XsType.TRANSACTION_END, b"X\0"),
        (XsType.GET_DOMAIN_PATH, b"abc\0"),
        (XsType.GET_DOMAIN_PATH, b"99999999999\0"),
        (XsType.DIRECTORY_PART, b"p\0-1\0"),
        (XsType.WATCH_EVENT, b"p\0t\0"),
        (XsType.ERROR, b"EINVAL\0"),
    ],
)
def test_garbage_payloads_get_einval_and_the_connection_lives_on(
    store: Store, msg_type: XsType, payload: bytes
) -> None:
    guest, conn, _ = raw_connection(store, 1)
    guest.request(msg_type, payload, req_id=1)
    guest.request(XsType.MKDIR, b"after\0", req_id=2)
    conn.process()
    assert guest.replies() == [(XsType.ERROR, 1, 0, b"EINVAL\0"), (XsType.MKDIR, 2, 0, b"OK\0")]
    assert store.counters(1)["errors"] == {"EINVAL": 1}
    assert store.counters(1)["requests"][msg_type.name] == 1
    assert not conn.closed


@pytest.mark.parametrize(("domid", "errno"), [(1, b"EACCES\0"), (0, b"ENOSYS\0")])
def test_privileged_only_requests_are_refused(store: Store, domid: int, errno: bytes) -> None:
    guest, conn, _ = raw_connection(store, domid)
    guest.request(XsType.INTRODUCE, b"3\x001\x002\0", req_id=1)
    conn.process()
    assert guest.replies() == [(XsType.ERROR, 1, 0, errno)]


def test_is_domain_introduced_is_answered_for_dom0(store: Store) -> None:
    guest, conn, _ = raw_connection(store, 0)
    guest.request(XsType.IS_DOMAIN_INTRODUCED, b"1\0", req_id=1)
    guest.request(XsType.IS_DOMAIN_INTRODUCED, b"9\0", req_id=2)
    conn.process()
    assert [r[3] for r in guest.replies()] == [b"T\0", b"F\0"]


# -- hostile guests: disconnect that one, keep the others -------------------------------------------


async def test_oversized_message_disconnects_only_that_guest(
    store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    guest, conn, notify = raw_connection(store, 1)
    client2, _ = loopback(store, 2)
    guest.send(struct.pack("<IIII", XsType.WRITE, 1, 0, 4097))
    with caplog.at_level(logging.WARNING, logger="pvio.xenstore"):
        conn.process()
    assert guest.u32(ERROR) == 3
    assert conn.closed
    assert notify.count == 1
    assert "dom1" in caplog.text and "4097" in caplog.text
    assert store.counters(1)["disconnects"] == {"protocol": 1}
    guest.request(XsType.WRITE, b"k\0v", req_id=2)
    conn.process()
    assert guest.replies() == []
    await client2.write("still", "working")
    assert await client2.read("still") == "working"


@pytest.mark.parametrize("msg_type", [20, 27, 999, XS_INVALID])
def test_unknown_message_type_disconnects_with_protocol_error(store: Store, msg_type: int) -> None:
    guest, conn, _ = raw_connection(store, 1)
    guest.request(msg_type, b"x\0")
    conn.process()
    assert (guest.u32(ERROR), conn.closed) == (3, True)
    assert f"unknown message type {msg_type}" in (conn.disconnect_reason or "")


def test_impossible_request_index_disconnects_with_error_2(
    store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    guest, conn, _ = raw_connection(store, 1)
    guest.set_u32(REQ_PROD, 1025)
    with caplog.at_level(logging.WARNING, logger="pvio.xenstore"):
        conn.process()
    assert (guest.u32(ERROR), conn.closed) == (2, True)
    assert "dom1" in caplog.text and "req_prod=0x401" in caplog.text
    assert store.counters(1)["disconnects"] == {"bad-ring-index": 1}


def test_impossible_response_index_disconnects_with_error_2(store: Store) -> None:
    guest, conn, _ = raw_connection(store, 1)
    guest.set_u32(RSP_CONS, 0x80000000)
    guest.request(XsType.READ, b"x\0")
    conn.process()
    assert (guest.u32(ERROR), conn.closed) == (2, True)


def test_guest_scribbling_on_req_cons_does_not_fool_the_server(store: Store) -> None:
    guest, conn, _ = raw_connection(store, 1)
    guest.request(XsType.WRITE, b"k\0v", req_id=1)
    conn.process()
    guest.replies()
    guest.set_u32(REQ_CONS, 0)  # pretend the request was never consumed
    conn.process()
    assert guest.replies() == []
    assert store.counters(1)["requests"] == {"WRITE": 1}


def test_guest_flooding_requests_without_reading_replies_is_throttled(store: Store) -> None:
    store.connect(0).write("/local/domain/1/big", b"v" * 4000)
    guest, conn, _ = raw_connection(store, 1)
    for req_id in range(10):
        guest.request(XsType.READ, b"big\0", req_id=req_id)
    conn.process()
    # Two queued replies are under the high-water mark, the third crosses it: reading stops there
    # (the bytes already on the ring were copied into its bounded input buffer) and new requests
    # stay on the guest's ring.
    assert store.counters(1)["requests"] == {"READ": 3}
    for req_id in range(10, 15):
        guest.request(XsType.READ, b"big\0", req_id=req_id)
    conn.process()
    assert guest.u32(REQ_PROD) - guest.u32(REQ_CONS) == 5 * 20
    assert store.counters(1)["requests"] == {"READ": 3}
    received = b""
    for _ in range(80):
        received += guest.receive()
        conn.process()
    assert received.count(b"v" * 4000) == 15
    assert store.counters(1)["requests"] == {"READ": 15}


def test_guest_that_never_reads_replies_is_bounded(store: Store) -> None:
    guest, conn, _ = raw_connection(store, 1)
    guest.request(XsType.WATCH, b"/local/domain/1\0t\0")
    conn.process()
    writer = store.connect(0)
    for i in range(2000):
        writer.write(f"/local/domain/1/n{i}", "")
    counters = store.counters(1)
    assert counters["watch_events"] == 2001
    assert 0 < counters["watch_events_dropped"] < 2000
    assert not conn.closed
    guest.receive()  # the guest catches up: the server refills the ring
    conn.process()
    assert len(guest.receive()) == 1024


# -- the client over loopback --------------------------------------------------------------------


async def test_client_operations_round_trip(store: Store) -> None:
    client, _ = loopback(store, 1)
    await client.write("device/vif/0/mac", "00:16:3e:00:00:01")
    await client.mkdir("device/vbd")
    assert await client.read("device/vif/0/mac") == "00:16:3e:00:00:01"
    assert await client.directory("device") == ["vif", "vbd"]
    assert await client.get_perms("device") == ["n1", "r0"]
    await client.set_perms("device/vbd", ["n1", "r0", "r2"])
    assert await client.get_perms("device/vbd") == ["n1", "r0", "r2"]
    await client.write("n", "42")
    assert await client.read_int("n") == 42
    assert await client.exists("n") and not await client.exists("nope")
    await client.rm("device")
    assert await client.directory("/local/domain/1") == ["n"]
    assert await client.get_domain_path(3) == "/local/domain/3"


async def test_errors_raise_xenstore_error_naming_errno_and_path(store: Store) -> None:
    client, _ = loopback(store, 2)
    with pytest.raises(XenstoreError) as info:
        await client.read("/local/domain/1/secret")
    assert (info.value.errno, info.value.path) == ("EACCES", "/local/domain/1/secret")
    await client.write("bad-int", "12x")
    with pytest.raises(XenstoreError, match="EINVAL on 'bad-int'"):
        await client.read_int("bad-int")


async def test_concurrent_requests_get_their_own_replies(store: Store) -> None:
    client, _ = loopback(store, 1)
    for i in range(20):
        await client.write(f"k{i}", f"value-{i}")
    results: dict[int, str] = {}

    async def read(i: int) -> None:
        results[i] = await client.read(f"k{i}")

    async with trio.open_nursery() as nursery:
        for i in range(20):
            nursery.start_soon(read, i)
    assert results == {i: f"value-{i}" for i in range(20)}


async def test_replies_out_of_order_reach_the_right_callers() -> None:
    page = memoryview(bytearray(4096))
    raw = RawGuest(page)
    client = XenbusClient(page, kick=lambda: None)
    results: dict[str, str] = {}

    async def read(path: str) -> None:
        results[path] = await client.read(path)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(read, "first")
        nursery.start_soon(read, "second")
        await trio.testing.wait_all_tasks_blocked()
        requests = bytes(page[REQ : REQ + raw.u32(REQ_PROD)])
        raw.set_u32(REQ_CONS, raw.u32(REQ_PROD))
        ids = {}
        while requests:
            _, req_id, _, length = struct.unpack_from("<IIII", requests)
            ids[requests[16 : 16 + length - 1].decode()] = req_id
            requests = requests[16 + length :]
        newest_first = sorted(ids, key=ids.__getitem__, reverse=True)
        replies = b"".join(
            struct.pack("<IIII", XsType.READ, ids[path], 0, len(path)) + path.encode()
            for path in newest_first
        )
        page[RSP : RSP + len(replies)] = replies
        raw.set_u32(RSP_PROD, len(replies))
        client.on_event()
    assert results == {"first": "first", "second": "second"}


@pytest.mark.parametrize("start", [1000, 2**32 - 700])
async def test_messages_span_the_ring_wrap_and_the_u32_wrap(store: Store, start: int) -> None:
    page = memoryview(bytearray(4096))
    guest = RawGuest(page)
    for offset in (REQ_CONS, REQ_PROD, RSP_CONS, RSP_PROD):
        guest.set_u32(offset, start)
    client, _ = loopback(store, 1, page)
    values = [bytes([65 + i]) * (300 + 250 * i) for i in range(8)]
    for i, value in enumerate(values):
        await client.write(f"v{i}", value)
        assert await client.read_bytes(f"v{i}") == value
    assert await client.read_bytes("v7") == values[7]
    sent = (guest.u32(REQ_PROD) - start) & 0xFFFFFFFF
    assert sent > 2 * 1024 and guest.u32(REQ_CONS) == guest.u32(REQ_PROD)
    assert guest.u32(RSP_CONS) == guest.u32(RSP_PROD)
    if start > 2**31:
        assert guest.u32(REQ_PROD) < start  # the u32 index itself wrapped


async def test_largest_request_and_reply_stream_through_the_1024_byte_rings(store: Store) -> None:
    client, _ = loopback(store, 1)
    value = bytes(range(256)) * 16  # 4096 bytes: more than fits in the payload with its path
    with pytest.raises(ValueError, match="exceeds 4096"):
        await client.write("big", value)
    value = value[: 4096 - len("big") - 1]
    await client.write("big", value)
    assert await client.read_bytes("big") == value


async def test_oversized_request_is_refused_before_touching_the_ring(store: Store) -> None:
    page = memoryview(bytearray(4096))
    kicks = Notifier()
    client = XenbusClient(page, kicks)
    with pytest.raises(ValueError, match="payload of 4097 bytes exceeds 4096"):
        await client.write("k", b"x" * 4095)
    assert (RawGuest(page).u32(REQ_PROD), kicks.count) == (0, 0)
    assert bytes(page[:16]) == bytes(16)


async def test_client_waits_for_room_when_the_request_ring_is_full(store: Store) -> None:
    """With a lazy server (kicks only counted), a 3000-byte request fills the ring, the client
    blocks, and each pass of the server makes room for the next piece."""
    page = memoryview(bytearray(4096))
    kicks = Notifier()
    client = XenbusClient(page, kicks)
    conn = RingConnection(store, 1, page, notify=client.on_event)
    guest = RawGuest(page)
    done = trio.Event()

    async def writer() -> None:
        await client.write("big", b"z" * 3000)
        done.set()

    message_len = 16 + len("big\0") + 3000
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(writer)
            passes = 0
            while True:
                await trio.testing.wait_all_tasks_blocked()
                if done.is_set():
                    break
                unconsumed = guest.u32(REQ_PROD) - guest.u32(REQ_CONS)
                assert unconsumed == (1024 if passes < 2 else message_len - 2048)
                conn.process()
                passes += 1
    assert passes == 3
    assert kicks.count == 3 + 1  # one per piece written, one after taking the reply
    assert store.connect(1).read("big") == b"z" * 3000


async def test_watch_events_reach_watchers_on_other_connections(store: Store) -> None:
    backend, _ = loopback(store, 0)
    frontend, _ = loopback(store, 1)
    await frontend.mkdir("device/vif/0")
    watch = await backend.watch("/local/domain/1/device", "be")
    assert await watch.next() == ("/local/domain/1/device", "be")
    await frontend.write("device/vif/0/state", "4")
    assert await watch.next() == ("/local/domain/1/device/vif/0/state", "be")
    own = await frontend.watch("device", "fe")
    assert await own.next() == ("device", "fe")
    await backend.write("/local/domain/1/device/vif/0/backend-id", "0")
    assert await own.next() == ("device/vif/0/backend-id", "fe")
    assert await watch.next() == ("/local/domain/1/device/vif/0/backend-id", "be")


async def test_unwatch_ends_iteration(store: Store) -> None:
    client, _ = loopback(store, 1)
    watch = await client.watch("x")
    events = []
    async with trio.open_nursery() as nursery:

        async def collect() -> None:
            async for event in watch:
                events.append(event)

        nursery.start_soon(collect)
        await trio.testing.wait_all_tasks_blocked()
        await client.write("x", "1")
        await trio.testing.wait_all_tasks_blocked()
        await watch.unwatch()
    await client.write("x", "2")
    assert events == [("x", watch.token), ("x", watch.token)]
    assert store.counters(1)["watches"] == 0


async def test_transaction_conflict_between_two_clients_then_retry_succeeds(store: Store) -> None:
    dom0, _ = loopback(store, 0)
    guest, _ = loopback(store, 1)
    await guest.write("counter", "0")
    with pytest.raises(XenstoreError) as info:
        async with guest.transaction() as t:
            value = await t.read_int("counter")
            await dom0.write("/local/domain/1/counter", "10")
            await t.write("counter", str(value + 1))
    assert info.value.errno == "EAGAIN"
    assert await guest.read("counter") == "10"

    attempts = 0

    async def increment(t: Transaction) -> int:
        nonlocal attempts
        attempts += 1
        value = await t.read_int("counter")
        if attempts == 1:
            await dom0.write("/local/domain/1/counter", "20")
        await t.write("counter", str(value + 1))
        return value + 1

    assert await guest.retry_transaction(increment) == 21
    assert attempts == 2
    assert await guest.read("counter") == "21"
    assert store.counters(1)["transactions"] == 0


async def test_transaction_block_that_raises_aborts(store: Store) -> None:
    client, _ = loopback(store, 1)
    with pytest.raises(RuntimeError):
        async with client.transaction() as t:
            await t.write("never", "1")
            raise RuntimeError("boom")
    assert not await client.exists("never")
    assert store.counters(1)["transactions"] == 0


async def test_counts_over_the_wire_are_exact(store: Store) -> None:
    client, _ = loopback(store, 1)
    await client.write("a", "1")
    await client.read("a")
    with pytest.raises(XenstoreError):
        await client.read("b")
    watch = await client.watch("a", "t")
    await watch.next()
    async with client.transaction() as t:
        await t.write("a", "2")
    await watch.next()
    assert store.counters(1) == {
        "requests": {"READ": 2, "TRANSACTION_END": 1, "TRANSACTION_START": 1, "WATCH": 1, "WRITE": 2},
        "errors": {"ENOENT": 1},
        "watch_events": 2,
        "watch_events_dropped": 0,
        "watch_events_coalesced": 0,
        "watch_events_shed": 0,
        "disconnects": {},
        "nodes": 2,
        "watches": 1,
        "transactions": 0,
    }


async def test_switch_state_and_wait_for_state(store: Store) -> None:
    backend, _ = loopback(store, 0)
    frontend, _ = loopback(store, 1)
    be = "/local/domain/0/backend/vif/1/0"
    fe = "/local/domain/1/device/vif/0"
    await backend.switch_state(be, XenbusState.INITIALISING)
    await backend.switch_state(fe, XenbusState.INITIALISING)
    await backend.set_perms(be, ["n0", "r1"])
    await backend.set_perms(f"{be}/state", ["n0", "r1"])
    reached: list[XenbusState] = []

    async def frontend_side() -> None:
        reached.append(await frontend.wait_for_state(be, XenbusState.INIT_WAIT))
        await frontend.switch_state(fe, XenbusState.CONNECTED)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(frontend_side)
        await trio.testing.wait_all_tasks_blocked()
        await backend.switch_state(be, XenbusState.INIT_WAIT)
        state = await backend.wait_for_state(f"{fe}/state", lambda s: s >= XenbusState.CONNECTED)
    assert (reached, state) == ([XenbusState.INIT_WAIT], XenbusState.CONNECTED)
    assert await frontend.read_state(fe) == XenbusState.CONNECTED
    assert await frontend.read_state("/local/domain/1/nothing") == XenbusState.UNKNOWN
    assert store.counters(1)["watches"] == 0  # wait_for_state unwatched


async def test_switch_state_to_the_same_state_writes_nothing(store: Store) -> None:
    client, _ = loopback(store, 1)
    await client.switch_state("dev", XenbusState.CONNECTED)
    watch = await client.watch("dev/state")
    await watch.next()
    await client.switch_state("dev", XenbusState.CONNECTED)
    assert await client.read("dev/state") == "4"
    assert store.counters(1)["requests"]["WRITE"] == 1
    assert store.counters(1)["watch_events"] == 1


# -- the client facing a dead or hostile server ---------------------------------------------------


async def test_disconnection_fails_pending_and_later_calls_with_eio(store: Store) -> None:
    page = memoryview(bytearray(4096))
    client, conn = loopback(store, 1, page)
    watch = await client.watch("w")
    await watch.next()
    RawGuest(page).set_u32(REQ_PROD, 5000)  # as if the guest kernel were corrupt
    conn.process()
    with pytest.raises(XenstoreError) as info:
        await client.read("w")
    assert info.value.errno == "EIO" and "error 2" in str(info.value)
    with pytest.raises(XenstoreError, match="EIO"):
        await watch.next()


async def test_hostile_server_indices_kill_the_client_not_the_handler(store: Store) -> None:
    page = memoryview(bytearray(4096))
    client = XenbusClient(page, kick=lambda: None)
    RawGuest(page).set_u32(RSP_PROD, 5000)
    client.on_event()
    assert client.error is not None and "impossible response ring indices" in client.error.detail
    with pytest.raises(XenstoreError, match="EIO"):
        await client.read("x")


async def test_hostile_server_oversized_reply_kills_the_client(store: Store) -> None:
    page = memoryview(bytearray(4096))
    client = XenbusClient(page, kick=lambda: None)
    raw = RawGuest(page)
    page[RSP : RSP + 16] = struct.pack("<IIII", XsType.READ, 1, 0, 5000)
    raw.set_u32(RSP_PROD, 16)
    client.on_event()
    assert client.error is not None and "exceeds 4096" in client.error.detail


async def test_unknown_error_names_from_the_server_become_eio(store: Store) -> None:
    page = memoryview(bytearray(4096))
    raw = RawGuest(page)

    def kick() -> None:
        if raw.u32(RSP_PROD):
            return  # answered already; this is the kick after the client took the reply
        raw.set_u32(REQ_CONS, raw.u32(REQ_PROD))
        reply = struct.pack("<IIII", XsType.ERROR, 1, 0, 7) + b"EWEIRD\0"
        page[RSP : RSP + len(reply)] = reply
        raw.set_u32(RSP_PROD, len(reply))
        client.on_event()

    client = XenbusClient(page, kick)
    with pytest.raises(XenstoreError) as info:
        await client.read("x")
    assert info.value.errno == "EIO"
