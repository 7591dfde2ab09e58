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
        assert server.clients == 0


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
