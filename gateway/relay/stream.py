"""The stream relay: forwards upstream bytes as they arrive and stops upstream when the client goes.

`RelayResponse` is a small ASGI response: it sends each chunk the moment it is produced, watches
the client's connection meanwhile, and on disconnect cancels the producer at once, so the upstream
connection is closed (no orphan generation) and every `finally` (lease release) runs promptly.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from typing import Protocol, TypeVar

import orjson
from starlette.types import Receive, Scope, Send

from gateway.errors import GatewayError
from gateway.relay.client import UpstreamError

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


# A call's work that ends sooner than this never starts a watcher (a task costs more than a
# quick call's whole relay); a client that leaves is noticed at most this much later.
WATCH_AFTER_S = 0.05


async def until_disconnect(receive: Receive, work: Awaitable[T]) -> T:
    """Run `work` in this task, but cancel it (and raise ClientGone) if the client disconnects
    first. One watcher task, started only if the work lasts `WATCH_AFTER_S`, and no second task
    for the work: this runs on every call."""
    watch = _Watch(receive, WATCH_AFTER_S)
    try:
        result = await work
    except asyncio.CancelledError:
        if watch.stop():
            raise ClientGone from None
        raise
    watch.stop()
    return result


class _Watch:
    """Cancels the task that made it when the client disconnects, until stopped; watching from
    `after_s` on."""

    def __init__(self, receive: Receive, after_s: float = 0.0) -> None:
        self._task = asyncio.current_task()
        self._fired = self._stopped = False
        self._watcher: asyncio.Task[None] | None = None
        self._later: asyncio.TimerHandle | None = None
        if after_s > 0:
            self._later = asyncio.get_running_loop().call_later(after_s, self._start, receive)
        else:
            self._start(receive)

    def _start(self, receive: Receive) -> None:
        self._later = None
        self._watcher = asyncio.ensure_future(self._watch(receive))

    async def _watch(self, receive: Receive) -> None:
        await wait_for_disconnect(receive)
        if not self._stopped and self._task is not None:
            self._fired = True
            self._task.cancel()

    @property
    def fired(self) -> bool:
        return self._fired

    def stop(self) -> bool:
        """Stop watching; whether the client's leaving cancelled the task (and that cancel is
        taken back, so only a cancel from elsewhere, a shutdown, stays pending)."""
        if not self._stopped:
            self._stopped = True
            if self._later is not None:
                self._later.cancel()
            if self._watcher is not None:
                # Let the watcher go: its cancellation's traceback holds its frame, which
                # holds this watch, so a reference back to it would make a cycle that only
                # the garbage collector frees, one per stream.
                self._watcher.cancel()
                self._watcher = None
            if self._fired and self._task is not None:
                self._task.uncancel()
        return self._fired


Body = Callable[[Send], Awaitable[None]]
"""A stream's body: writes its chunks to `send` as body messages with more to come."""


class Step(Protocol):
    """One transform of a relayed stream (a rename, the cache's copy, the usage, the front's
    shape): a plain function of each chunk, and what it held back once the stream ends."""

    def feed(self, chunk: bytes) -> bytes: ...

    def flush(self) -> bytes: ...


class Source(Protocol):
    """An upstream answer as a relay reads it."""

    async def next_chunk(self) -> bytes:
        """What has arrived; b"" once whole; raises when the upstream breaks off."""
        ...

    def ended(self) -> bytes:
        """Read whole: let the upstream go; the event for a stream that stopped short, else
        b""."""
        ...

    def failed(self, exc: UpstreamError | TimeoutError) -> bytes:
        """Broken off: let the upstream go; the event that ends the stream."""
        ...

    def close(self) -> None:
        """Drop the upstream, if it is still held (the backend stops generating)."""
        ...


async def write(send: Send, chunk: bytes) -> None:
    if chunk:
        await send({"type": "http.response.body", "body": chunk, "more_body": True})


def body_of(chunks: AsyncIterator[bytes] | Iterable[bytes]) -> Body:
    """A body of chunks produced by an iterator (a replay, a heartbeat): closed however the
    response ends."""
    async def body(send: Send) -> None:
        if isinstance(chunks, AsyncIterator):
            async with contextlib.aclosing(chunks):  # type: ignore[type-var]
                async for chunk in chunks:
                    await write(send, chunk)
        else:
            for chunk in chunks:
                await write(send, chunk)

    return body


class Relay:
    """One upstream stream relayed in one loop: each chunk through `steps` in order, then to
    the client. A stream comes through here once a frame, so nothing in it is a generator or
    a coroutine of its own; what a step does at the end (store the answer, read the usage)
    goes to `on_end`, which learns whether the stream was relayed whole."""

    __slots__ = ("on_end", "on_first", "source", "steps")

    def __init__(self, source: Source, steps: Sequence[Step],
                 on_first: Callable[[], None], on_end: Callable[[bool], None]) -> None:
        self.source, self.steps = source, tuple(steps)
        self.on_first, self.on_end = on_first, on_end

    async def __call__(self, send: Send) -> None:
        source, feeds = self.source, [step.feed for step in self.steps]
        whole = False
        try:
            try:
                chunk = await source.next_chunk()
                self.on_first()
                while chunk:
                    for feed in feeds:
                        chunk = feed(chunk)
                    if chunk:  # `write`, written out: a coroutine less a frame
                        await send({"type": "http.response.body", "body": chunk,
                                    "more_body": True})
                    chunk = await source.next_chunk()
                last = source.ended()
            except (UpstreamError, TimeoutError) as exc:
                last = source.failed(exc)
            await self._flush(send, last)
            whole = True
        finally:
            source.close()
            self.on_end(whole)

    async def _flush(self, send: Send, last: bytes) -> None:
        """The source's last event, then what each step held back, each through the steps
        after it."""
        steps = self.steps
        for at in range(len(steps) + 1):
            chunk = last if at == 0 else steps[at - 1].flush()
            if not chunk:
                continue
            for step in steps[at:]:
                chunk = step.feed(chunk)
            await write(send, chunk)


class RelayResponse:
    """Streams `body` to the client as produced; cancels it when the client disconnects."""

    def __init__(
        self,
        body: Body,
        status_code: int = 200,
        headers: Mapping[str, str] | None = None,
        on_close: Callable[[], None] | None = None,
    ) -> None:
        self.body = body
        self.status_code = status_code
        self.headers = dict(SSE_HEADERS if headers is None else headers)
        # Runs however the response ends, even if the body was never started (a client that
        # left at once): a body's own `finally` does not run then.
        self.on_close = on_close
        self._watch: _Watch | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self._watch = _Watch(receive)
        try:
            await self._produce(send)
        except asyncio.CancelledError:
            if not self._watch.stop():
                raise  # a shutdown, not the client: the cancel goes on
        finally:
            self._watch.stop()
            if self.on_close is not None:
                self.on_close()

    async def _produce(self, send: Send) -> None:
        raw_headers = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in self.headers.items()]
        try:
            await send({"type": "http.response.start", "status": self.status_code,
                        "headers": raw_headers})
            await self.body(send)
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except OSError:
            pass  # the client went away while we were writing
        except asyncio.CancelledError:
            if self._watch is not None and not self._watch.fired:
                # Cut by a forced shutdown: say so to a client still there.
                with contextlib.suppress(Exception):
                    await send({"type": "http.response.body", "more_body": False,
                                "body": _CUT.sse_event()})
            raise


class ModelRenamer:
    """Rewrites the backend's model name in answers to the name the client asked for.

    Only the `"model": "<backend name>"` fields change; every other byte is left as it came.
    For streams, text is held back only up to the last newline seen, because an SSE event's
    `data:` line never spans a newline.
    """

    def __init__(self, served: str, requested: str) -> None:
        self._served, self._compact, self._pattern, self._replacement = _renaming(
            served, requested)
        self._pending = b""

    def rename(self, data: bytes) -> bytes:
        """Most answers write `"model":"name"` compactly: a plain replace does those, and the
        pattern (spaces around the colon) runs only if the name is still there. (`find`, not
        `in`: bytes' `in` first tries its operand as an integer, which costs a raised and
        cleared TypeError, twice what the search does on a frame.)"""
        data = data.replace(*self._compact)  # the same object when there is nothing to replace
        if data.find(self._served) < 0:
            return data
        return self._pattern.sub(self._replacement, data)

    def feed(self, chunk: bytes) -> bytes:
        if not self._pending and chunk.endswith(b"\n"):
            return self.rename(chunk)  # whole lines: the usual frame
        data = self._pending + chunk
        cut = data.rfind(b"\n") + 1
        self._pending = data[cut:]
        return self.rename(data[:cut]) if cut else b""

    def flush(self) -> bytes:
        data, self._pending = self._pending, b""
        return self.rename(data)


_Renaming = tuple[bytes, tuple[bytes, bytes], re.Pattern[bytes], bytes]


@functools.lru_cache(maxsize=256)
def _renaming(served: str, requested: str) -> _Renaming:
    """What renaming `served` to `requested` looks for and writes, built once per pair (5 us)."""
    old, new = orjson.dumps(served), orjson.dumps(requested)
    pattern = re.compile(rb'("model"\s*:\s*)' + re.escape(old))
    replacement = rb"\g<1>" + new.replace(b"\\", b"\\\\")
    return old, (b'"model":' + old, b'"model":' + new), pattern, replacement
