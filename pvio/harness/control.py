"""The control socket of a running hypervisor (``pvio run``), and its client (the CLI).

Protocol: a Unix stream socket; the client sends one JSON object per line, ``{"cmd": NAME,
...arguments}``; the server answers each with one JSON line ``{"ok": true, "result": ...}``
or ``{"ok": false, "error": "one line naming the problem"}``.  Streaming commands
(``console`` with ``follow``, ``xenstore-watch``) answer with one line per item until the
client closes the connection.  A connection that sends something that is not a JSON
object, or a line over 64 KiB, gets an error and is closed; the hypervisor runs on.

Commands (a domain is named by its name or its domid):

==================  =================================================================
``list``            every domain: id, name, state, memory, vifs
``stats``           ``dom``: its counters and its devices' (vifs, rings, interrupts)
``top``             every domain's and device's counters, with the hypervisor's time
``console``         ``dom``, ``follow`` (bool), ``input`` (text to type, if the domain
                    takes console input)
``pause``           ``dom``; ``unpause``, ``destroy`` likewise
``xenstore-ls``     ``path``: the subtree, as (path, value) pairs
``xenstore-read``   ``path``; ``xenstore-write``: ``path``, ``value``
``xenstore-watch``  ``path``: one line per event
``capture``         ``port`` (``switch``, a domain, a port name), ``file``, ``seconds``:
                    mirror it to a pcap file, then answer with the frame count
``trace``           ``file``, ``seconds``: a Perfetto trace of that long, then the count
``network-attach``  ``dom``, ``mac``: hot-plug a vif (``xl network-attach``)
``network-detach``  ``dom``, ``devid``: hot-unplug it through the XenbusState handshake
``network-list``    ``dom``: its vifs
``shutdown``        end ``pvio run --hold``
==================  =================================================================

The server reads the hypervisor's state between its own steps (everything is one trio
run), so answers are consistent snapshots.  The default path is ``$PVIO_SOCKET``, else
``$XDG_RUNTIME_DIR/pvio/control.sock``, else ``/tmp/pvio-<uid>/control.sock``.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import trio

from pvio.core.hypervisor import Hypervisor
from pvio.xenstore.store import XenstoreError

LINE_MAX = 64 * 1024


def default_socket() -> str:
    """Where ``pvio run`` serves, and where the CLI looks, unless told otherwise."""
    env = os.environ.get("PVIO_SOCKET")
    if env:
        return env
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    base = Path(runtime) / "pvio" if runtime else Path(f"/tmp/pvio-{os.getuid()}")
    return str(base / "control.sock")


class ControlError(Exception):
    """A command the server refused (its one-line reason), or no server to talk to."""


class ControlServer:
    """Serves the control protocol for ``hv`` on the Unix socket ``path``."""

    def __init__(self, hv: Hypervisor, path: str) -> None:
        self.hv = hv
        self.path = path
        self.network: Any = None
        self.shutdown_requested = trio.Event()

    async def serve(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Listen until cancelled; ``task_status.started()`` once clients can connect."""
        Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
        try:
            await sock.bind(self.path)
        except OSError as e:
            sock.close()
            raise ControlError(f"cannot serve the control socket {self.path}: {e.strerror}") from None
        sock.listen(16)
        listener = trio.SocketListener(sock)
        try:
            task_status.started()
            await trio.serve_listeners(self._client, [listener])
        finally:
            with contextlib.suppress(OSError):
                os.unlink(self.path)

    async def _client(self, stream: trio.SocketStream) -> None:
        buf = b""
        async with stream:
            try:
                while True:
                    data = await stream.receive_some(65536)
                    if not data:
                        return
                    buf += data
                    if len(buf) > LINE_MAX and b"\n" not in buf:
                        await _send(stream, {"ok": False, "error": f"request longer than {LINE_MAX} bytes"})
                        return
                    while b"\n" in buf:
                        line, buf = buf.split(b"\n", 1)
                        if not await self._request(stream, line):
                            return
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return

    async def _request(self, stream: trio.SocketStream, line: bytes) -> bool:
        """Answer one request; False closes the connection."""
        try:
            req = json.loads(line)
            if not isinstance(req, dict) or not isinstance(req.get("cmd"), str):
                raise ValueError("not a JSON object with a 'cmd'")
        except ValueError as e:
            await _send(stream, {"ok": False, "error": f"bad request: {e}"})
            return False
        cmd = req.pop("cmd")
        if cmd == "console" and req.get("follow"):
            await self._follow_console(stream, req)
            return False
        if cmd == "xenstore-watch":
            await self._watch(stream, req)
            return False
        if cmd in ("capture", "trace", "network-detach"):
            run: Any = {"capture": self._capture, "trace": self._trace, "network-detach": self._detach}[cmd]
            try:
                result = await run(**req)
            except (ControlError, ValueError, OSError, TypeError, TimeoutError) as e:
                await _send(stream, {"ok": False, "error": f"{cmd}: {e}"})
                return True
            await _send(stream, {"ok": True, "result": result})
            return True
        handler = getattr(self, "cmd_" + cmd.replace("-", "_"), None)
        if handler is None:
            await _send(stream, {"ok": False, "error": f"unknown command {cmd!r}"})
            return True
        try:
            result = handler(**req)
        except TypeError as e:
            await _send(stream, {"ok": False, "error": f"{cmd}: {e}"})
            return True
        except (ControlError, XenstoreError, ValueError) as e:
            await _send(stream, {"ok": False, "error": str(e)})
            return True
        await _send(stream, {"ok": True, "result": result})
        return True

    # ------------------------------------------------------------------ commands
    def _domain(self, dom: str | int) -> Any:
        for d in self.hv.domains.values():
            if str(d.domid) == str(dom) or d.name == dom:
                return d
        names = ", ".join(f"{d.name} ({d.domid})" for d in self.hv.domains.values())
        raise ControlError(f"no domain {dom!r}; domains: {names}")

    def cmd_list(self) -> list[dict[str, Any]]:
        from pvio.harness.run import domain_table

        return domain_table(self.hv)

    def cmd_stats(self, dom: str | int) -> dict[str, Any]:
        d = self._domain(dom)
        snap = self.hv.snapshot()
        mine = f"dom{d.domid}"
        devices = {
            owner: dict(c)
            for owner, c in snap.devices().items()
            if _device_of(owner, d.domid)
        }  # fmt: skip
        return {"domain": d.name, "domid": d.domid, "counters": dict(snap[mine]) if mine in snap else {},
                "devices": devices}  # fmt: skip

    def cmd_top(self) -> dict[str, Any]:
        snap = self.hv.snapshot()
        names = {f"dom{d.domid}": d.name for d in self.hv.domains.values()}
        return {"time": trio.current_time(), "names": names, "counters": snap.as_dict()}

    def cmd_console(self, dom: str | int, input: str | None = None, follow: bool = False) -> list[str]:
        d = self._domain(dom)
        if input is not None:
            feed = getattr(d.kernel, "type", None)  # a PVH guest's console input ring (xl console)
            if feed is None:
                raise ControlError(f"{d.name} takes no console input (its kernel reads no console ring)")
            feed(input.encode())
        return list(d.console_lines)

    async def _follow_console(self, stream: trio.SocketStream, req: dict[str, Any]) -> None:
        try:
            d = self._domain(req.get("dom", ""))
        except ControlError as e:
            await _send(stream, {"ok": False, "error": str(e)})
            return
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            seen = d.console_count - len(d.console_lines)  # lines written before the kept ones
            while True:
                lines = list(d.console_lines)
                first = d.console_count - len(lines)  # the number of the oldest kept line
                for line in lines[max(0, seen - first) :]:
                    await _send(stream, {"ok": True, "line": line})
                seen = d.console_count
                if not d.alive:
                    return
                await trio.sleep(0.05)

    def cmd_pause(self, dom: str | int) -> str:
        d = self._domain(dom)
        self.hv.pause(d)
        return d.state

    def cmd_unpause(self, dom: str | int) -> str:
        d = self._domain(dom)
        self.hv.unpause(d)
        return d.state

    def cmd_destroy(self, dom: str | int) -> str:
        d = self._domain(dom)
        if d.domid == 0:
            raise ControlError("dom0 cannot be destroyed while the hypervisor runs (use shutdown)")
        self.hv.destroy(d, "destroyed by the toolstack")
        return d.state

    def cmd_xenstore_ls(self, path: str = "/") -> list[list[str]]:
        out: list[list[str]] = []
        ts = self.hv.toolstack

        def walk(p: str) -> None:
            try:
                value = ts.read(p).decode("utf-8", "replace")
            except XenstoreError:
                value = ""
            out.append([p, value])
            for child in ts.directory(p):
                walk(p.rstrip("/") + "/" + child)

        walk(path)
        return out

    def cmd_xenstore_read(self, path: str) -> str:
        return self.hv.toolstack.read(path).decode("utf-8", "replace")

    def cmd_xenstore_write(self, path: str, value: str) -> str:
        self.hv.toolstack.write(path, value)
        return value

    async def _watch(self, stream: trio.SocketStream, req: dict[str, Any]) -> None:
        path = req.get("path")
        if not isinstance(path, str):
            await _send(stream, {"ok": False, "error": "xenstore-watch needs a path"})
            return
        events: list[tuple[str, str]] = []
        wake = trio.Event()

        def on_event(p: str, token: str) -> None:
            events.append((p, token))
            wake.set()

        conn = self.hv.store.connect(0, on_event)
        try:
            conn.watch(path, "pvio-cli")
        except XenstoreError as e:
            conn.close()
            await _send(stream, {"ok": False, "error": f"cannot watch {path}: {e}"})
            return
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            while True:
                await wake.wait()
                wake = trio.Event()
                while events:
                    p, _ = events.pop(0)
                    await _send(stream, {"ok": True, "path": p})
        conn.close()

    async def _capture(self, port: str, file: str, seconds: float = 5.0) -> dict[str, Any]:
        from pvio.backends.capture import Capture, format_for

        if self.network is None:
            raise ControlError("the network is not up yet")
        switch = self.network.switch
        target: Any = None
        if port != "switch":
            names = {p.name: p for p in switch.ports}
            if port in names:
                target = names[port]
            else:
                d = self._domain(port)
                try:
                    target = self.network.port_of(d.domid)
                except ValueError:
                    raise ControlError(
                        f"{d.name} has no port on the switch; ports: {', '.join(names)}"
                    ) from None
        capture = Capture(switch, file, target, counters=self.hv.counters, format=format_for(file)).start()
        try:
            await trio.sleep(max(0.0, min(seconds, 3600.0)))
        finally:
            capture.stop()
        return {"file": file, "events": capture.counters["packets"]}

    async def _trace(self, file: str, seconds: float = 2.0) -> dict[str, Any]:
        with self.hv.trace(file) as tracer:
            await trio.sleep(max(0.0, min(seconds, 3600.0)))
        return {"file": file, "events": len(tracer)}

    def cmd_network_attach(self, dom: str | int, mac: str | None = None) -> dict[str, Any]:
        from pvio.toolstack import attach_vif

        d = self._domain(dom)
        cfg = attach_vif(self.hv, d, mac=mac)
        return {"domain": d.name, "devid": cfg.devid, "mac": cfg.mac}

    def cmd_network_list(self, dom: str | int) -> list[dict[str, Any]]:
        from pvio.harness.run import domain_table

        d = self._domain(dom)
        return next(row["vifs"] for row in domain_table(self.hv) if row["domid"] == d.domid)

    async def _detach(self, dom: str | int, devid: int) -> dict[str, Any]:
        from pvio.toolstack import detach_vif

        d = self._domain(dom)
        await detach_vif(self.hv, d, int(devid))
        return {"domain": d.name, "devid": int(devid), "state": "detached"}

    def cmd_shutdown(self) -> str:
        self.shutdown_requested.set()
        return "shutting down"


def _device_of(owner: str, domid: int) -> bool:
    """Whether a device counter owner belongs to domain ``domid`` (vif<d>.<n>, emu<d>.<n>, ...)."""
    name = owner.rsplit("/", 1)[-1]
    for prefix in ("vif", "emu", "snic"):
        if name.startswith(prefix):
            return name[len(prefix) :].split(".")[0] == str(domid)
    return False


async def _send(stream: trio.SocketStream, obj: dict[str, Any]) -> None:
    await stream.send_all(json.dumps(obj, sort_keys=True).encode() + b"\n")


# ---------------------------------------------------------------------- the client
def _connect(sock: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(sock)
    except (FileNotFoundError, ConnectionRefusedError):
        s.close()
        raise ControlError(f"no pvio running at {sock} (start one with `pvio run FILE --hold`)") from None
    except OSError as e:
        s.close()
        raise ControlError(f"cannot reach pvio at {sock}: {e.strerror}") from None
    return s


def request(sock: str, cmd: str, **args: Any) -> Any:
    """Send one command to the pvio serving ``sock``, return its result (ControlError with
    the server's reason)."""
    with _connect(sock) as s:
        s.sendall(json.dumps({"cmd": cmd, **args}).encode() + b"\n")
        reply = _lines(s)
        answer = next(reply, None)
    if answer is None:
        raise ControlError(f"pvio at {sock} closed the connection without an answer")
    if not answer.get("ok"):
        raise ControlError(answer.get("error", "refused"))
    return answer.get("result")


def stream(sock: str, cmd: str, **args: Any) -> Iterator[dict[str, Any]]:
    """Send a streaming command; yields its items until the server closes."""
    with _connect(sock) as s:
        s.sendall(json.dumps({"cmd": cmd, **args}).encode() + b"\n")
        for item in _lines(s):
            if not item.get("ok"):
                raise ControlError(item.get("error", "refused"))
            yield item


def _lines(s: socket.socket) -> Iterator[dict[str, Any]]:
    buf = b""
    while True:
        data = s.recv(65536)
        if not data:
            return
        buf += data
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            yield json.loads(line)
