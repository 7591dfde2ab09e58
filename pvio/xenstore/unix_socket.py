"""pvio's live xenstore on a Unix socket, in xenstored's socket protocol, for dom0 tools.

Design rationale
----------------
Real xenstored listens on a Unix socket (``/var/run/xenstored/socket``) for dom0's tools;
libxenstore speaks the same xs_wire messages on it as on a guest's ring page: a 16-byte
``xsd_sockmsg`` header and at most 4096 payload bytes, replies matched by ``req_id``,
``WATCH_EVENT`` messages interleaved.  So serving the socket needs only a second
transport for :class:`pvio.xenstore.server.XsConnection`, the request handling every
guest's :class:`RingConnection` already uses: one handler, two transports.  Xen's own
``xenstore-ls``/``-read``/``-write``/``-watch`` (libxenstore) find the socket through
``XENSTORED_PATH``.

- **dom0's permissions.**  Every socket client is a dom0 connection of the store (as
  xenstored treats its socket): it sees and may change the whole tree.  The socket file
  is created mode 0600, so only the user running pvio (root, normally) can connect.
- **hostile clients.**  Bytes from a socket are parsed by the same bounded
  :class:`MessageReader` as a ring: an oversized length or an unknown type disconnects
  that client only (logged, counted as the store's ``disconnects.protocol`` for dom0),
  a malformed payload gets an ``EINVAL`` reply.  At most one partial message is
  buffered; a client that does not read its replies stops being read
  (``OUTPUT_HIGH_WATER``) and loses watch events beyond ``OUTPUT_LIMIT``, as on a ring.
  The number of clients is bounded (``max_clients``); one beyond is closed at once.
- **nothing raises into dom0.**  A client's errors end that client's task; the server
  goes on.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket as stdlib_socket
import stat
from pathlib import Path

import trio

from pvio.xenstore.server import OUTPUT_HIGH_WATER, XsConnection
from pvio.xenstore.store import Store
from pvio.xenstore.wire import RingFault

logger = logging.getLogger("pvio.xenstore")

RECV_SIZE = 16384
DEFAULT_MAX_CLIENTS = 64


class SocketConnection(XsConnection):
    """One client of the socket: a dom0 session of the store fed from a byte stream."""

    def __init__(self, store: Store, sock: trio.socket.SocketType, domid: int = 0) -> None:
        super().__init__(store, domid)
        self._sock = sock
        self._wake = trio.Event()  # set: output is queued for the sender
        self._room = trio.Event()  # set: output fell below the high-water mark

    def _output_queued(self) -> None:
        self._wake.set()

    async def serve(self) -> None:
        """Read requests and write replies until the client leaves or breaks the protocol."""
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._send_loop, nursery.cancel_scope)
                try:
                    await self._recv_loop()
                except OSError as e:  # the peer reset the connection: it is gone
                    logger.debug("xenstore socket: client gone: %s", e)
                nursery.cancel_scope.cancel()
        finally:
            self.close()
            self._sock.close()

    async def _recv_loop(self) -> None:
        while not self._closed:
            data = await self._sock.recv(RECV_SIZE)
            if not data:
                return
            self._reader.feed(data)
            try:
                while not self._closed:
                    if self._out_bytes >= OUTPUT_HIGH_WATER:
                        # Back-pressure: the client is not reading its replies; read no more
                        # requests until the sender has drained below the mark.
                        self._room = trio.Event()
                        self._wake.set()
                        await self._room.wait()
                        continue
                    message = self._reader.next()
                    if message is None:
                        break
                    self._handle(*message)
                    self._wake.set()
            except RingFault as fault:
                self._disconnect(fault.reason)
                return

    async def _send_loop(self, scope: trio.CancelScope) -> None:
        while True:
            await self._wake.wait()
            self._wake = trio.Event()
            while self._out:
                head = self._out.popleft()
                self._out_bytes -= len(head)
                self._sent(head)
                try:
                    await _send_all(self._sock, head)
                except OSError as e:  # the peer is gone: stop reading too
                    logger.debug("xenstore socket: client gone: %s", e)
                    scope.cancel()
                    return
                if self._out_bytes < OUTPUT_HIGH_WATER:
                    self._room.set()

    def _disconnect(self, reason: str) -> None:
        logger.warning("xenstore socket: disconnecting a client: %s", reason)
        self.disconnect_reason = reason
        self._store.count_disconnect(self.domid, "protocol")
        self.close()


async def _send_all(sock: trio.socket.SocketType, data: bytes) -> None:
    view = memoryview(data)
    while view:
        sent = await sock.send(view)
        view = view[sent:]


class XenstoreSocketServer:
    """Serves ``store`` on the Unix socket ``path`` (xenstored's socket protocol) until cancelled.

    ``await nursery.start(server.serve)`` returns once the socket accepts connections.
    Point libxenstore tools at it with ``XENSTORED_PATH=path``.  :attr:`clients` counts
    the connections now open, :attr:`refused` those closed for exceeding ``max_clients``.
    """

    def __init__(
        self, store: Store, path: str | os.PathLike[str], *, max_clients: int = DEFAULT_MAX_CLIENTS
    ) -> None:
        self.store = store
        self.path = os.fspath(path)
        self.max_clients = max_clients
        self.clients = 0
        self.accepted = 0
        self.refused = 0

    async def _bind(self) -> trio.socket.SocketType:
        path = Path(self.path)
        if path.exists() or path.is_symlink():
            if not stat.S_ISSOCK(path.lstat().st_mode):
                raise OSError(errno.EEXIST, f"xenstore socket {self.path}: exists and is not a socket")
            probe = stdlib_socket.socket(stdlib_socket.AF_UNIX, stdlib_socket.SOCK_STREAM)
            try:
                probe.connect(self.path)
            except OSError:
                path.unlink()  # a stale socket left by a server that is gone
            else:
                raise OSError(
                    errno.EADDRINUSE, f"xenstore socket {self.path}: address in use (a server runs)"
                )
            finally:
                probe.close()
        sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
        old = os.umask(0o077)  # the socket file is born owner-only: dom0's powers for its owner
        try:
            await sock.bind(self.path)
            os.chmod(self.path, 0o600)
        except OSError:
            sock.close()
            raise
        finally:
            os.umask(old)
        sock.listen(16)
        return sock

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Accept clients until cancelled; the socket file is removed on the way out."""
        listener = await self._bind()
        try:
            async with trio.open_nursery() as nursery:
                task_status.started()
                while True:
                    client, _ = await listener.accept()
                    if self.clients >= self.max_clients:
                        self.refused += 1
                        logger.warning("xenstore socket: %d clients already; refusing one", self.clients)
                        client.close()
                        continue
                    self.accepted += 1
                    self.clients += 1
                    nursery.start_soon(self._serve_client, client)
        finally:
            listener.close()
            with contextlib.suppress(OSError):
                os.unlink(self.path)

    async def _serve_client(self, client: trio.socket.SocketType) -> None:
        try:
            await SocketConnection(self.store, client).serve()
        except Exception:  # never let one client take the server down
            logger.exception("xenstore socket: internal error serving a client")
        finally:
            self.clients -= 1
