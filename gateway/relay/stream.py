"""The stream relay: forwards upstream bytes as they arrive and stops upstream when the client goes.

`RelayResponse` is a small ASGI response: it sends each chunk the moment it is produced, watches
the client's connection meanwhile, and on disconnect cancels the producer at once, so the upstream
connection is closed (no orphan generation) and every `finally` (lease release) runs promptly.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import TypeVar

import orjson
from starlette.types import Receive, Scope, Send

from gateway.errors import GatewayError

T = TypeVar("T")

SSE_HEADERS = {
    "content-type": "text/event-stream; charset=utf-8",
    "cache-control": "no-cache",
    "x-accel-buffering": "no",  # nginx ingress: do not buffer the stream
}


_CUT = GatewayError(503, "The gateway was stopped before this stream was complete; retry.",
                    code="shutting_down")


class ClientGone(Exception):
    """The client closed its connection before the answer was complete."""


async def wait_for_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def until_disconnect(receive: Receive, work: Awaitable[T]) -> T:
    """Run `work` but cancel it (and raise ClientGone) if the client disconnects first."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(wait_for_disconnect(receive))
    try:
        await asyncio.wait((task, watcher), return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
    if not task.done() or task.cancelled():
        raise ClientGone
    return task.result()


class RelayResponse:
    """Streams `body` to the client as produced; cancels it when the client disconnects."""

    def __init__(
        self,
        body: AsyncIterator[bytes],
        status_code: int = 200,
        headers: Mapping[str, str] | None = None,
        on_close: Callable[[], None] | None = None,
    ) -> None:
        self.body = body
        self.status_code = status_code
        self.headers = dict(SSE_HEADERS if headers is None else headers)
        # Runs however the response ends, even if the body was never started (a client that
        # left at once): a generator's own `finally` does not run then.
        self.on_close = on_close
        self._client_left = False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        producer = asyncio.ensure_future(self._produce(send))
        watcher = asyncio.ensure_future(wait_for_disconnect(receive))
        try:
            await asyncio.wait((producer, watcher), return_when=asyncio.FIRST_COMPLETED)
            self._client_left = watcher.done()
        finally:
            watcher.cancel()
            if not producer.done():
                producer.cancel()
            await asyncio.gather(producer, watcher, return_exceptions=True)
            if self.on_close is not None:
                self.on_close()

    async def _produce(self, send: Send) -> None:
        raw_headers = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in self.headers.items()]
        try:
            await send({"type": "http.response.start", "status": self.status_code,
                        "headers": raw_headers})
            async for chunk in self.body:
                if chunk:
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except OSError:
            pass  # the client went away while we were writing
        except asyncio.CancelledError:
            if not self._client_left:  # cut by a forced shutdown: say so to a client still there
                with contextlib.suppress(Exception):
                    await send({"type": "http.response.body", "more_body": False,
                                "body": _CUT.sse_event()})
            raise
        finally:
            aclose = getattr(self.body, "aclose", None)
            if aclose is not None:
                await aclose()


class ModelRenamer:
    """Rewrites the backend's model name in answers to the name the client asked for.

    Only the `"model": "<backend name>"` fields change; every other byte is left as it came.
    For streams, text is held back only up to the last newline seen, because an SSE event's
    `data:` line never spans a newline.
    """

    def __init__(self, served: str, requested: str) -> None:
        quoted = re.escape(orjson.dumps(served))
        self._pattern = re.compile(rb'("model"\s*:\s*)' + quoted)
        self._replacement = rb"\g<1>" + orjson.dumps(requested).replace(b"\\", b"\\\\")
        self._pending = b""

    def rename(self, data: bytes) -> bytes:
        return self._pattern.sub(self._replacement, data)

    def feed(self, chunk: bytes) -> bytes:
        data = self._pending + chunk
        cut = data.rfind(b"\n") + 1
        self._pending = data[cut:]
        return self.rename(data[:cut]) if cut else b""

    def flush(self) -> bytes:
        data, self._pending = self._pending, b""
        return self.rename(data)
