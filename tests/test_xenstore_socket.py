"""pvio's live xenstore on a Unix socket: Xen's own xenstore-ls/-read/-write/-watch and a hostile client.

The tools are Debian's ``xenstore-utils`` (libxenstore), pointed at pvio's socket with
``XENSTORED_PATH``; a test without them skips with one line.  The network runs on the
real clock (outside processes take part).
"""

from __future__ import annotations

import os
import shutil
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

from pvio.xenstore.unix_socket import XenstoreSocketServer
from pvio.xenstore.wire import XsType, encode_message
from tests.netenv import NetEnv, NicGuest, net_env

TOOLS = shutil.which("xenstore-ls") and shutil.which("xenstore-watch")
needs_tools = pytest.mark.skipif(
    not TOOLS, reason="needs Xen's xenstore tools (Debian package xenstore-utils)"
)


@asynccontextmanager
async def served(tmp_path: Path) -> AsyncIterator[tuple[NetEnv, XenstoreSocketServer, dict[str, str]]]:
    """A booted network with one guest, its store served on a socket; the tools' environment."""
    path = tmp_path / "xenstored.sock"
    async with net_env(NicGuest("guest", "10.0.0.1"), timeout_s=30) as env:
        server = XenstoreSocketServer(env.hv.store, path)
        async with trio.open_nursery() as nursery:
            await nursery.start(server.serve)
            yield env, server, {**os.environ, "XENSTORED_PATH": str(path)}
            nursery.cancel_scope.cancel()
    assert not path.exists()


async def tool(env: dict[str, str], *cmd: str) -> str:
    with trio.fail_after(30):
        done = await trio.run_process(
            list(cmd), env=env, capture_stdout=True, capture_stderr=True, check=False
        )
    assert done.returncode == 0, f"{cmd}: {done.stderr.decode()}"
    return str(done.stdout.decode())


@needs_tools
async def test_xenstore_ls_prints_the_live_tree(tmp_path: Path) -> None:
    async with served(tmp_path) as (env, _, tools_env):
        domid = env.guests[0].domain.domid
        out = await tool(tools_env, "xenstore-ls", "-f", "/local/domain")
        lines = set(out.splitlines())
        assert f'/local/domain/{domid}/device/vif/0/state = "4"' in lines
        assert f'/local/domain/0/backend/vif/{domid}/0/state = "4"' in lines
        assert any(line.startswith(f"/local/domain/{domid}/device/vif/0/mac = ") for line in lines)


@needs_tools
async def test_xenstore_read_and_write_share_the_store_with_pvio(tmp_path: Path) -> None:
    async with served(tmp_path) as (env, _, tools_env):
        conn = env.hv.store.connect(0)
        conn.write("/tool/from-pvio", b"hello tools")
        assert await tool(tools_env, "xenstore-read", "/tool/from-pvio") == "hello tools\n"
        await tool(tools_env, "xenstore-write", "/tool/from-xen", "written by xenstore-write")
        assert conn.read("/tool/from-xen") == b"written by xenstore-write"
        domid = env.guests[0].domain.domid
        state = await tool(tools_env, "xenstore-read", f"/local/domain/{domid}/device/vif/0/state")
        assert state == "4\n"


@needs_tools
async def test_xenstore_watch_sees_pvio_writes(tmp_path: Path) -> None:
    async with served(tmp_path) as (env, server, tools_env):
        conn = env.hv.store.connect(0)
        conn.write("/watched", b"")
        async with trio.open_nursery() as nursery:
            process = await nursery.start(
                lambda task_status: trio.run_process(
                    ["xenstore-watch", "-n", "2", "/watched"],
                    env=tools_env,
                    stdout=-1,
                    check=False,
                    task_status=task_status,
                )
            )
            lines: list[str] = []
            buf = b""
            with trio.fail_after(30):
                while len(lines) < 2:
                    chunk = await process.stdout.receive_some()
                    if not chunk:
                        break
                    buf += chunk
                    *done, rest = buf.split(b"\n")
                    buf = rest
                    lines += [d.decode() for d in done]
                    if lines == ["/watched"]:  # the event every new watch fires: now registered
                        conn.write("/watched/child", b"1")
            assert lines == ["/watched", "/watched/child"]
        with trio.fail_after(10):  # the server sees the tool's hang-up on its next read
            while server.clients:
                await trio.sleep(0.01)


async def test_a_client_sending_garbage_is_disconnected_and_others_go_on(tmp_path: Path) -> None:
    async with served(tmp_path) as (env, server, _):
        path = str(tmp_path / "xenstored.sock")
        bad = await trio.open_unix_socket(path)
        good = await trio.open_unix_socket(path)
        # A malformed payload (no NUL) is answered with EINVAL; the connection stays.
        await good.send_all(encode_message(XsType.READ, 7, 0, b"/local"))
        header = await good.receive_some(16)
        kind, req_id, _, length = struct.unpack("<IIII", header)
        payload = await good.receive_some(length)
        assert (kind, req_id, payload) == (XsType.ERROR, 7, b"EINVAL\0")
        # An impossible length is a protocol error: that client is disconnected.
        before = env.hv.store.counters(0)["disconnects"].get("protocol", 0)
        await bad.send_all(struct.pack("<IIII", XsType.READ, 1, 0, 1 << 20) + b"x" * 64)
        with trio.fail_after(10):
            assert await bad.receive_some() == b""
        assert env.hv.store.counters(0)["disconnects"]["protocol"] == before + 1
        await good.send_all(encode_message(XsType.READ, 8, 0, b"/local/domain/0/name\0"))
        header = await good.receive_some(16)
        kind, req_id, _, length = struct.unpack("<IIII", header)
        assert kind in (XsType.READ, XsType.ERROR) and req_id == 8
        await good.aclose()
        await bad.aclose()
        assert server.accepted == 2


async def test_a_second_server_on_a_live_socket_says_address_in_use(tmp_path: Path) -> None:
    async with served(tmp_path) as (env, _, _):
        second = XenstoreSocketServer(env.hv.store, tmp_path / "xenstored.sock")
        with pytest.raises(OSError, match="address in use"):
            await second.serve()


async def test_a_client_that_never_reads_is_held_back_and_others_are_served(tmp_path: Path) -> None:
    async with served(tmp_path) as (env, server, _):
        path = str(tmp_path / "xenstored.sock")
        conn = env.hv.store.connect(0)
        conn.write("/big", b"v" * 4000)  # each READ of it answers with 4000 bytes
        flooder = await trio.open_unix_socket(path)
        request = encode_message(XsType.READ, 1, 0, b"/big\0")
        sent = 0
        with trio.move_on_after(1):  # the server stops reading, the socket buffers fill, send blocks
            while sent < 100_000:
                await flooder.send_all(request * 64)
                sent += 64
        assert sent < 100_000  # held back long before every request was taken
        good = await trio.open_unix_socket(path)
        await good.send_all(encode_message(XsType.READ, 9, 0, b"/big\0"))
        with trio.fail_after(10):
            header = await good.receive_some(16)
        assert struct.unpack("<IIII", header)[:2] == (XsType.READ, 9)
        await flooder.aclose()
        await good.aclose()
        with trio.fail_after(10):
            while server.clients:
                await trio.sleep(0.01)


@pytest.mark.parametrize(
    "garbage",
    [
        struct.pack("<IIII", 20, 1, 0, 0),  # XS_RESTRICT: removed from the protocol
        struct.pack("<IIII", 0xFFFF, 1, 0, 4) + b"abcd",  # XS_INVALID
        b"\xff" * 16,
    ],
    ids=["removed-type", "invalid-type", "all-ones"],
)
async def test_an_invalid_message_type_disconnects_that_client(tmp_path: Path, garbage: bytes) -> None:
    async with served(tmp_path) as (env, server, _):
        client = await trio.open_unix_socket(str(tmp_path / "xenstored.sock"))
        await client.send_all(garbage)
        with trio.fail_after(10):
            assert await client.receive_some() == b""
        await client.aclose()
        assert env.hv.store.counters(0)["disconnects"]["protocol"] == 1
        with trio.fail_after(10):
            while server.clients:
                await trio.sleep(0.01)


async def test_a_client_leaving_mid_message_is_forgotten(tmp_path: Path) -> None:
    async with served(tmp_path) as (env, server, _):
        client = await trio.open_unix_socket(str(tmp_path / "xenstored.sock"))
        await client.send_all(encode_message(XsType.WATCH, 1, 0, b"/x\0tok\0")[:10])
        await client.aclose()
        with trio.fail_after(10):
            while server.clients:
                await trio.sleep(0.01)
        assert server.accepted == 1
        assert env.hv.store.counters(0)["disconnects"].get("protocol", 0) == 0


async def test_pyxs_lists_reads_writes_and_watches(tmp_path: Path) -> None:
    pyxs = pytest.importorskip("pyxs")
    async with served(tmp_path) as (env, _, _):
        domid = env.guests[0].domain.domid
        vif = f"/local/domain/{domid}/device/vif/0".encode()
        conn = env.hv.store.connect(0)
        conn.write("/pyxs", b"")

        def client() -> tuple[list[bytes], bytes, Any]:
            # pyxs blocks: it runs in a thread while trio serves the socket.
            with pyxs.Client(unix_socket_path=str(tmp_path / "xenstored.sock")) as c:
                listing = c.list(vif)
                c[b"/pyxs/from-pyxs"] = b"written by pyxs"
                mac = c[vif + b"/mac"]
                monitor = c.monitor()
                monitor.watch(b"/pyxs", b"token")
                events = monitor.wait()
                first = next(events)  # a new watch fires once at once
                trio.from_thread.run_sync(conn.write, "/pyxs/from-pvio", b"1")
                second = next(events)
                return listing, mac, (first, second)

        with trio.fail_after(30):
            listing, mac, (first, second) = await trio.to_thread.run_sync(client)
        assert {b"backend", b"mac", b"state", b"tx-ring-ref", b"rx-ring-ref"} <= set(listing)
        assert mac == conn.read(f"{vif.decode()}/mac")
        assert conn.read("/pyxs/from-pyxs") == b"written by pyxs"
        assert (first.path, first.token) == (b"/pyxs", b"token")
        assert (second.path, second.token) == (b"/pyxs/from-pvio", b"token")


async def test_clients_beyond_the_limit_are_refused_and_a_stale_socket_is_replaced(tmp_path: Path) -> None:
    path = tmp_path / "xenstored.sock"
    stale = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    await stale.bind(str(path))  # a socket file nobody listens on: left by a server that died
    stale.close()
    async with net_env(NicGuest("guest", "10.0.0.1"), timeout_s=30) as env:
        server = XenstoreSocketServer(env.hv.store, path, max_clients=1)
        async with trio.open_nursery() as nursery:
            await nursery.start(server.serve)
            assert path.stat().st_mode & 0o777 == 0o600
            first = await trio.open_unix_socket(str(path))
            await first.send_all(encode_message(XsType.READ, 1, 0, b"/local/domain/0/name\0"))
            await first.receive_some(16)  # served
            second = await trio.open_unix_socket(str(path))
            with trio.fail_after(10):
                assert await second.receive_some() == b""
            assert (server.accepted, server.refused) == (1, 1)
            await first.aclose()
            await second.aclose()
            nursery.cancel_scope.cancel()
