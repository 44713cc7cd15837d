"""The relay's HTTP/1.1 client: keep-alive connections to a backend, asyncio.Protocol + httptools.

One request at a time per connection. A request goes out in one write; its answer is handed on
as it arrives, everything buffered since the last read in one piece. No redirects, no
decompression, no cookies: a relay passes bytes on. aiohttp keeps the drivers' calls (health,
load, unload, listings), where the convenience is worth its cost; on the relay it cost about
twice the CPU of this (bench/relay_cpu.py --floors, docs/relay.md).

Every failure is an `UpstreamError`: `ConnectFailed`, `UpstreamTimeout`, `IncompleteAnswer` or
`BrokenOff`.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httptools

from gateway.config.schema import Timeouts

IDLE_S = 4.0  # an idle connection is dropped before uvicorn-based backends drop it (5 s)
_HIGH_WATER = 256 * 1024  # buffered answer bytes at which reading pauses until the relay reads
_ONE_WRITE = 64 * 1024  # a request body below this is copied behind its head: one write
_TAIL = 64  # bytes of an answer's end kept for `tail()`


class UpstreamError(Exception):
    """Talking to a backend failed."""


class ConnectFailed(UpstreamError):
    """No connection: `errno` says why (None: the host name does not resolve)."""

    def __init__(self, errno: int | None, text: str) -> None:
        super().__init__(text)
        self.errno = errno


class UpstreamTimeout(UpstreamError):
    """Waiting for a pooled connection, a connect or the next bytes of an answer took too long."""


class IncompleteAnswer(UpstreamError):
    """The connection ended before the answer it had started was whole."""


class BrokenOff(UpstreamError):
    """The connection ended (or spoke no HTTP) before an answer began."""


@dataclass(frozen=True)
class Origin:
    scheme: str
    host: str
    port: int

    @property
    def host_header(self) -> str:
        default = 443 if self.scheme == "https" else 80
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port == default else f"{host}:{self.port}"


def split_url(url: str) -> tuple[Origin, str]:
    """(origin, request target) of an http(s) URL."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"not an http(s) URL: {url!r}")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return Origin(parts.scheme, parts.hostname, port), target


class UpstreamResponse:
    """One answer as it arrives. `release()` once it was read whole puts its connection back;
    `close()` drops the connection (the backend stops generating); either is safe to repeat,
    and `close()` after `release()` does nothing."""

    def __init__(self, connection: _Connection) -> None:
        self._connection: _Connection | None = connection
        self.status = 0
        self.headers: dict[str, str] = {}
        self._chunks: list[bytes] = []
        self._buffered = 0
        self.complete = False  # the whole answer has arrived
        self._failure: UpstreamError | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._tail = b""

    @property
    def content_type(self) -> str:
        """The media type, lowercased, without parameters (aiohttp's default when absent)."""
        raw = self.headers.get("content-type", "application/octet-stream")
        return raw.partition(";")[0].strip().lower()

    async def next_chunk(self) -> bytes:
        """All the body bytes buffered now, waiting for some first; b"" once it is whole.
        The wait is written out here, not in a helper coroutine: a stream comes through here
        once a frame."""
        while not self._chunks:
            if self.complete:
                return b""
            if self._failure is not None:
                raise self._failure
            connection = self._connection
            if connection is None:
                raise BrokenOff("the answer was closed")
            waiter = self._waiter = connection.loop.create_future()
            connection.waiting()
            try:
                await waiter
            finally:
                self._waiter = None
        chunks, self._chunks, self._buffered = self._chunks, [], 0
        connection = self._connection
        if connection is not None and connection.paused:
            connection.resume()
        chunk = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        # What was read last, at least its last _TAIL bytes (a closing marker cut in pieces)
        self._tail = chunk if len(chunk) >= _TAIL else (self._tail + chunk)[-_TAIL:]
        return chunk

    def tail(self) -> bytes:
        """The end of what was read, at least its last 64 bytes: where a stream says it is
        complete."""
        return self._tail

    async def read(self, limit: int | None = None) -> bytes:
        """The whole body (or its first `limit` bytes, enough for an error answer)."""
        parts: list[bytes] = []
        size = 0
        while chunk := await self.next_chunk():
            parts.append(chunk)
            size += len(chunk)
            if limit is not None and size >= limit:
                return b"".join(parts)[:limit]
        return b"".join(parts)

    def release(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            connection.done(reusable=self.complete)

    def close(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            connection.done(reusable=False)

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _fail(self, failure: UpstreamError) -> None:
        if self._failure is None and not self.complete:
            self._failure = failure
            waiter = self._waiter
            if waiter is not None and not waiter.done():
                waiter.set_exception(failure)

    # httptools' callbacks, through the connection

    def on_header(self, name: bytes, value: bytes) -> None:
        key = name.decode("latin-1").lower()
        text = value.decode("latin-1")
        self.headers[key] = f"{self.headers[key]}, {text}" if key in self.headers else text

    def on_body(self, body: bytes) -> None:
        self._chunks.append(body)
        self._buffered += len(body)
        self._wake()


class _Connection(asyncio.Protocol):
    """One keep-alive connection and the answer it is reading."""

    def __init__(self, client: Client, pool: _Pool) -> None:
        self.loop = asyncio.get_running_loop()
        self._client = client
        self._pool = pool
        self._parser = httptools.HttpResponseParser(self)
        self._transport: asyncio.Transport | None = None
        self.response: UpstreamResponse | None = None
        self._head: asyncio.Future[None] | None = None
        self.received = False  # any byte of the current answer
        self._keep_alive = False  # the current answer leaves the connection open
        self._interim = False  # the head just parsed was a 1xx, not the answer's
        self.lost = False
        self.paused = False
        self.idle_since = 0.0
        self._read_s = 0.0
        self._waiting_since = 0.0
        self._timer: asyncio.TimerHandle | None = None

    # asyncio.Protocol

    def connection_made(self, transport: Any) -> None:
        self._transport = transport
        watch_host(transport.get_extra_info("socket"), self._client.timeouts.dead_host)

    def data_received(self, data: bytes) -> None:
        response = self.response
        if response is None:
            self.close()  # bytes on an idle connection: whatever they are, it is not reusable
            return
        self.received = True
        try:
            self._parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade) as exc:
            self._break(BrokenOff(f"not an HTTP answer: {exc}"))
            self.close()
            return
        if response._buffered > _HIGH_WATER and not self.paused:
            self.paused = True
            self._transport.pause_reading()  # type: ignore[union-attr]

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self._break(None)

    # httptools' callbacks

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.response is not None:
            self.response.on_header(name, value)

    def on_headers_complete(self) -> None:
        self._keep_alive = self._parser.should_keep_alive()  # known here, not after the body
        status = self._parser.get_status_code()
        self._interim = status < 200  # 100 Continue, 103 Early Hints: the answer comes next
        if self.response is not None:
            if self._interim:
                self.response.headers.clear()
                return
            self.response.status = status
        if self._head is not None and not self._head.done():
            self._head.set_result(None)

    def on_body(self, body: bytes) -> None:
        if self.response is not None:
            self.response.on_body(body)

    def on_message_complete(self) -> None:
        response = self.response
        if response is not None and not self._interim:
            response.complete = True
            response._wake()

    # the client's side

    async def exchange(self, head: bytes, body: bytes | bytearray,
                       read_s: float) -> UpstreamResponse:
        """Send one request (in one write, unless its body is large) and wait for the head of
        its answer."""
        response = self.response = UpstreamResponse(self)
        self.received = False
        self._read_s = read_s
        self._head = self.loop.create_future()
        transport = self._transport
        assert transport is not None
        if len(body) < _ONE_WRITE:
            transport.write(head + body)
        else:
            transport.write(head)
            transport.write(body)
        self.waiting()
        await self._head
        self._head = None
        return response

    def waiting(self) -> None:
        """The answer is awaited from now on: the read timeout counts the silence from here."""
        self._waiting_since = self.loop.time()
        if self._timer is None:
            self._timer = self.loop.call_at(self._waiting_since + self._read_s, self._check)

    def _check(self) -> None:
        """One timer per connection, moved on lazily, rather than one per read."""
        self._timer = None
        response = self.response
        head = self._head is not None and not self._head.done()
        if not head and (response is None or response._waiter is None):
            return  # not waiting: the next wait arms it again
        due = self._waiting_since + self._read_s
        if self.loop.time() >= due:
            self._break(UpstreamTimeout(f"no answer for {self._read_s:g} s"))
            self.close()
        else:
            self._timer = self.loop.call_at(due, self._check)

    def _break(self, failure: UpstreamError | None) -> None:
        """The connection ended (failure None) or must end: fail what waits on it."""
        response = self.response
        if response is not None and failure is None and response._failure is None:
            if response.status and not response.complete and self._ends_at_close(response):
                response.complete = True  # a body delimited by the connection's end
                response._wake()
                return
            failure = (IncompleteAnswer("the connection ended in the middle of the answer")
                       if response.status else BrokenOff("the connection ended"))
        if failure is None:
            return
        if self._head is not None and not self._head.done():
            self._head.set_exception(failure)
        if response is not None:
            response._fail(failure)

    @staticmethod
    def _ends_at_close(response: UpstreamResponse) -> bool:
        headers = response.headers
        return "content-length" not in headers and "chunked" not in headers.get(
            "transfer-encoding", "")

    def resume(self) -> None:
        self.paused = False
        if self._transport is not None:
            self._transport.resume_reading()

    def done(self, reusable: bool) -> None:
        """The answer has been dealt with: back to the pool, or closed."""
        self.response = None
        self._head = None
        self._client.finished()
        if self.paused:
            self.resume()
        if reusable and not self.lost and self._keep_alive:
            self.idle_since = self.loop.time()
            self._pool.put(self)
        else:
            self.close()

    def close(self) -> None:
        self.lost = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._transport is not None:
            self._transport.close()


class _Pool:
    """The idle connections to one origin, most recently used first."""

    def __init__(self, origin: Origin) -> None:
        self.origin = origin
        self._idle: deque[_Connection] = deque()
        self.retired = False

    def take(self, now: float) -> _Connection | None:
        while self._idle:
            connection = self._idle.pop()
            if not connection.lost and now - connection.idle_since < IDLE_S:
                return connection
            connection.close()
        return None

    def __len__(self) -> int:
        return len(self._idle)

    def put(self, connection: _Connection) -> None:
        if self.retired:
            connection.close()
        else:
            self._idle.append(connection)

    def close(self) -> None:
        self.retired = True
        while self._idle:
            self._idle.pop().close()


class Client:
    """One backend's connections: at most `max_connections` answers at once (more wait for a
    turn, up to `timeouts.pool`), over as many origins as it has (a process backend runs one
    server per model)."""

    def __init__(self, timeouts: Timeouts, max_connections: int,
                 tls: ssl.SSLContext | None = None) -> None:
        """`tls`: for https origins; by default the system's certificate authorities."""
        self.timeouts = timeouts
        self._turns = asyncio.Semaphore(max_connections)
        self.in_use = 0  # requests sent whose answer is not yet done with
        self._pools: dict[Origin, _Pool] = {}
        self._urls: dict[str, tuple[Origin, str]] = {}
        self._tls = tls

    async def post(self, url: str, body: bytes | bytearray,
                   headers: Mapping[str, str]) -> UpstreamResponse:
        """Send the request and return its answer once its head is in. A pooled connection the
        backend had closed fails before any answer: once, the request goes again on a new one."""
        origin, target = self._split(url)
        head = _request_head("POST", target, origin.host_header, headers, len(body))
        await self._turn()
        try:
            pool = self._pool(origin)
            connection = pool.take(asyncio.get_running_loop().time())
            if connection is not None:
                try:
                    return await self._send(connection, head, body)
                except BrokenOff:
                    if connection.received:
                        raise
            return await self._send(await self._connect(pool), head, body)
        except BaseException:
            self.finished()
            raise

    def finished(self) -> None:
        self.in_use -= 1
        self._turns.release()

    @property
    def idle(self) -> int:
        """Connections in the pools, open or not yet found closed."""
        return sum(len(pool) for pool in self._pools.values())

    def close(self) -> None:
        """Drop the idle connections now, and every other one when its answer is done."""
        for pool in self._pools.values():
            pool.close()

    async def _send(self, connection: _Connection, head: bytes,
                    body: bytes | bytearray) -> UpstreamResponse:
        try:
            return await connection.exchange(head, body, self.timeouts.read)
        except BaseException:
            connection.response = None
            connection.close()
            raise

    async def _turn(self) -> None:
        if not self._turns.locked():
            await self._turns.acquire()  # at once: no timer for the usual case
        else:
            try:
                async with asyncio.timeout(self.timeouts.pool):
                    await self._turns.acquire()
            except TimeoutError:
                raise UpstreamTimeout(
                    f"no free connection within {self.timeouts.pool:g} s") from None
        self.in_use += 1

    async def _connect(self, pool: _Pool) -> _Connection:
        loop = asyncio.get_running_loop()
        origin = pool.origin
        tls = self._tls_context() if origin.scheme == "https" else None
        try:
            async with asyncio.timeout(self.timeouts.connect):
                _, connection = await loop.create_connection(
                    lambda: _Connection(self, pool), origin.host, origin.port, ssl=tls,
                    server_hostname=origin.host if tls else None)
        except TimeoutError:
            raise UpstreamTimeout(f"no connection within {self.timeouts.connect:g} s") from None
        except socket.gaierror as exc:
            raise ConnectFailed(None, str(exc)) from exc
        except OSError as exc:
            raise ConnectFailed(exc.errno, str(exc)) from exc
        return connection

    def _pool(self, origin: Origin) -> _Pool:
        pool = self._pools.get(origin)
        if pool is None or pool.retired:
            pool = self._pools[origin] = _Pool(origin)
        return pool

    def _split(self, url: str) -> tuple[Origin, str]:
        found = self._urls.get(url)
        if found is None:
            if len(self._urls) > 1024:
                self._urls.clear()
            found = self._urls[url] = split_url(url)
        return found

    def _tls_context(self) -> ssl.SSLContext:
        if self._tls is None:
            self._tls = ssl.create_default_context()
        return self._tls


def watch_host(sock: socket.socket | None, dead_after_s: float) -> None:
    """Notice a backend host that drops off the network within `dead_after_s`, not after the
    read timeout (minutes, for a long generation): a request written to a pooled connection
    whose host is gone is never acknowledged (TCP_USER_TIMEOUT), and a connection waiting for
    an answer is probed while it is silent (keep-alive). A live host's kernel acknowledges
    both however busy its GPU is."""
    if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    probes = 3
    interval = max(1, int(dead_after_s / (2 * probes)))
    options = {"TCP_USER_TIMEOUT": int(dead_after_s * 1000), "TCP_KEEPIDLE": interval * probes,
               "TCP_KEEPINTVL": interval, "TCP_KEEPCNT": probes}
    for name, value in options.items():
        if hasattr(socket, name):  # Linux has them all; others keep the system's defaults
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, name), value)


def _request_head(method: str, target: str, host: str, headers: Mapping[str, str],
                  length: int) -> bytes:
    lines = [f"{method} {target} HTTP/1.1\r\nhost: {host}\r\n"]
    lines += [f"{name}: {value}\r\n" for name, value in headers.items()]
    lines.append(f"content-length: {length}\r\n\r\n")
    text = "".join(lines)
    if text.count("\n") != len(lines) + 2:  # the first and the last add one
        raise ValueError("a request header holds a line break")
    return text.encode("latin-1")
