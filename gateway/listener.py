"""Accepting connections: every one that waits, at each readiness of the listening socket.

uvloop's libuv (1.45 and later) accepts one connection when the listening socket is ready and
leaves the next to the next turn of the loop. Behind 1,000 flowing streams a turn serves
hundreds of sockets, so a burst of new clients waited up to 1.4 s to be accepted
(docs/relay.md). asyncio's own loop accepts up to its backlog at once; this does the same on
any loop, and hands each connection to the loop with uvicorn's protocol.
"""

from __future__ import annotations

import asyncio
import errno
import socket
from collections.abc import Callable

import structlog

log = structlog.get_logger("gateway")

AT_ONCE = 1024  # connections accepted in one turn at most: the loop's other work goes on
# Out of descriptors or memory: accepting again at once would spin, so wait as asyncio does.
_SHORT_OF = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
RETRY_S = 1.0


class Listener:
    """Accepts on `sock` until closed, each connection served by a `protocol()`. It has what
    uvicorn's shutdown asks of a server: `close()` and `wait_closed()`."""

    def __init__(self, sock: socket.socket, protocol: Callable[[], asyncio.Protocol],
                 backlog: int) -> None:
        self._sock, self._protocol = sock, protocol
        self._loop = asyncio.get_running_loop()
        self._opening: set[asyncio.Task[object]] = set()
        self._closed = False
        sock.setblocking(False)
        sock.listen(backlog)
        self._listen()

    def _listen(self) -> None:
        if not self._closed:
            self._loop.add_reader(self._sock.fileno(), self._accept)

    def _accept(self) -> None:
        for _ in range(AT_ONCE):
            try:
                connection, _ = self._sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in _SHORT_OF:
                    log.warning("listener.paused", error=exc.strerror, retry_s=RETRY_S)
                    self._loop.remove_reader(self._sock.fileno())
                    self._loop.call_later(RETRY_S, self._listen)
                    return
                continue  # this one went before it was accepted (ECONNABORTED): the next
            self._open(connection)

    def _open(self, connection: socket.socket) -> None:
        connection.setblocking(False)
        task = self._loop.create_task(
            self._loop.connect_accepted_socket(self._protocol, connection))
        self._opening.add(task)
        task.add_done_callback(self._opened)

    def _opened(self, task: asyncio.Task[object]) -> None:
        self._opening.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("listener.refused", error=repr(task.exception()))

    def close(self) -> None:
        """Stop accepting; the socket itself is closed by its owner."""
        if not self._closed:
            self._closed = True
            self._loop.remove_reader(self._sock.fileno())

    async def wait_closed(self) -> None:
        if self._opening:
            await asyncio.wait(set(self._opening))
