"""The floors under the gateway's relay: the least a Python relay of this kind costs.

    .venv/bin/python bench/relay_floor.py --mode MODE --port 8001 --upstream http://127.0.0.1:9000

bench/relay_cpu.py --floors starts one of each beside the gateway, in the same run:

- `uvicorn-aiohttp`: a bare ASGI app on uvicorn (uvloop, httptools), no Starlette, no gateway,
  relaying with one aiohttp session (the gateway's relay client until this bench);
- `uvicorn-lean`: the same app relaying with the gateway's own client (gateway/relay/client.py:
  asyncio.Protocol + httptools, keep-alive pool);
- `protocol`: no framework at all: an asyncio.Protocol server parsing requests with httptools,
  relaying with that same client. Python's floor for a relay on this loop.

Each relays POSTs to the same path upstream, passing on the body and its content type: a JSON
answer whole (content-length), an SSE answer chunk by chunk (chunked) as it arrives.
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import httptools
import uvloop

from gateway.config.schema import Timeouts
from gateway.relay.client import Client, UpstreamResponse

Relay = Callable[[str, bytes, str], Awaitable["Answer"]]


class Answer:
    """What a floor's relay client returns: status, content type, then the body's pieces."""

    def __init__(self, status: int, content_type: str, stream: bool,
                 next_chunk: Callable[[], Awaitable[bytes]], read: Callable[[], Awaitable[bytes]],
                 done: Callable[[], Any]) -> None:
        self.status, self.content_type, self.stream = status, content_type, stream
        self.next_chunk, self.read, self.done = next_chunk, read, done


def lean_relay(upstream: str) -> Relay:
    client = Client(Timeouts(), 8192)

    async def relay(path: str, body: bytes, content_type: str) -> Answer:
        response: UpstreamResponse = await client.post(
            upstream + path, body, {"content-type": content_type})
        kind = response.headers.get("content-type", "application/json")
        return Answer(response.status, kind, response.content_type == "text/event-stream",
                      response.next_chunk, response.read, response.release)

    return relay


def aiohttp_relay(upstream: str) -> Relay:
    import aiohttp

    session: aiohttp.ClientSession | None = None

    async def relay(path: str, body: bytes, content_type: str) -> Answer:
        nonlocal session
        if session is None:
            session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=8192, keepalive_timeout=4),
                auto_decompress=False, skip_auto_headers=("User-Agent",))
        response = await session.post(upstream + path, data=body,
                                      headers={"content-type": content_type})

        async def next_chunk() -> bytes:
            return await response.content.readany()

        return Answer(response.status, response.headers.get("content-type", ""),
                      response.content_type == "text/event-stream", next_chunk, response.read,
                      response.release)

    return relay


# -- a bare ASGI app on uvicorn ----------------------------------------------------------------


def asgi_app(relay: Relay) -> Callable[..., Awaitable[None]]:
    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        parts, more = [], True
        while more:
            message = await receive()
            parts.append(message.get("body", b""))
            more = message.get("more_body", False)
        kind = dict(scope["headers"]).get(b"content-type", b"application/json").decode()
        answer = await relay(scope["path"], b"".join(parts), kind)
        headers = [(b"content-type", answer.content_type.encode())]
        if not answer.stream:
            body = await answer.read()
            answer.done()
            headers.append((b"content-length", str(len(body)).encode()))
            await send({"type": "http.response.start", "status": answer.status,
                        "headers": headers})
            await send({"type": "http.response.body", "body": body})
            return
        await send({"type": "http.response.start", "status": answer.status, "headers": headers})
        while chunk := await answer.next_chunk():
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        answer.done()
        await send({"type": "http.response.body", "body": b""})

    return app


# -- no framework: an asyncio.Protocol server --------------------------------------------------


class _Server(asyncio.Protocol):
    """HTTP/1.1 keep-alive, one request at a time per connection (as wrk and the bench ask)."""

    def __init__(self, relay: Relay) -> None:
        self._relay = relay
        self._parser = httptools.HttpRequestParser(self)
        self._transport: Any = None
        self._url = b""
        self._kind = b"application/json"
        self._body: list[bytes] = []
        self._task: asyncio.Future[None] | None = None  # the answer being relayed

    def connection_made(self, transport: Any) -> None:
        self._transport = transport

    def data_received(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError:
            self._transport.close()

    def on_url(self, url: bytes) -> None:
        self._url = url

    def on_header(self, name: bytes, value: bytes) -> None:
        if name.lower() == b"content-type":
            self._kind = value

    def on_body(self, body: bytes) -> None:
        self._body.append(body)

    def on_message_complete(self) -> None:
        body, self._body = b"".join(self._body), []
        answer = self._answer(self._url.decode(), body, self._kind.decode())
        self._task = asyncio.ensure_future(answer)

    async def _answer(self, path: str, body: bytes, kind: str) -> None:
        answer = await self._relay(path, body, kind)
        head = f"HTTP/1.1 {answer.status} OK\r\ncontent-type: {answer.content_type}\r\n"
        write = self._transport.write
        if not answer.stream:
            data = await answer.read()
            answer.done()
            write(f"{head}content-length: {len(data)}\r\n\r\n".encode() + data)
            return
        write(f"{head}transfer-encoding: chunked\r\n\r\n".encode())
        while chunk := await answer.next_chunk():
            write(b"%x\r\n%b\r\n" % (len(chunk), chunk))
        answer.done()
        write(b"0\r\n\r\n")


async def serve_protocol(relay: Relay, port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: _Server(relay), "127.0.0.1", port, backlog=4096)
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=("uvicorn-aiohttp", "uvicorn-lean", "protocol"),
                        required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True, help="http://host:port")
    args = parser.parse_args()
    relay = (aiohttp_relay if args.mode == "uvicorn-aiohttp" else lean_relay)(args.upstream)
    if args.mode == "protocol":
        uvloop.run(serve_protocol(relay, args.port))
        return
    import uvicorn

    uvicorn.run(asgi_app(relay), host="127.0.0.1", port=args.port, loop="uvloop",
                http="httptools", lifespan="off", log_level="warning", access_log=False,
                backlog=4096)


if __name__ == "__main__":
    main()
