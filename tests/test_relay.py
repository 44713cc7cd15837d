"""The stream relay's own guarantees, at the ASGI level."""

from __future__ import annotations

import asyncio
import gc
import itertools
from collections.abc import AsyncIterator
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.relay.client import BrokenOff
from gateway.relay.stream import (
    WATCH_AFTER_S,
    ClientGone,
    ModelRenamer,
    Relay,
    RelayResponse,
    body_of,
    until_disconnect,
)


async def test_cleanup_runs_when_the_client_leaves_before_the_body_starts() -> None:
    started: list[bool] = []
    closed: list[bool] = []

    async def body() -> AsyncIterator[bytes]:
        started.append(True)  # pragma: no cover - the point is that it never runs
        yield b"data: x\n\n"

    async def receive() -> dict[str, Any]:
        return {"type": "http.disconnect"}  # the client is gone at once

    async def send(message: Any) -> None:
        await asyncio.sleep(0.05)  # a slow socket: the disconnect is seen first

    response = RelayResponse(body_of(body()), on_close=lambda: closed.append(True))
    await response({"type": "http"}, receive, send)
    assert closed == [True] and started == []


async def test_cleanup_runs_once_after_a_complete_stream() -> None:
    closed: list[bool] = []
    sent: list[bytes] = []
    done = asyncio.Event()

    async def body() -> AsyncIterator[bytes]:
        yield b"data: 1\n\n"
        yield b"data: [DONE]\n\n"

    async def receive() -> dict[str, Any]:
        await done.wait()
        return {"type": "http.disconnect"}

    async def send(message: Any) -> None:
        sent.append(message.get("body", b""))
        if message["type"] == "http.response.body" and not message["more_body"]:
            done.set()

    await RelayResponse(body_of(body()), on_close=lambda: closed.append(True))({"type": "http"},
                                                                       receive, send)
    assert b"".join(sent) == b"data: 1\n\ndata: [DONE]\n\n" and closed == [True]


async def test_quick_work_never_listens_for_the_client() -> None:
    heard: list[bool] = []

    async def receive() -> dict[str, Any]:
        heard.append(True)  # pragma: no cover - the point is that it never runs
        return {"type": "http.disconnect"}

    async def quick() -> str:
        await asyncio.sleep(0)  # a call answered at once: no watcher is started for it
        return "answer"

    assert await until_disconnect(receive, quick()) == "answer"
    await asyncio.sleep(2 * WATCH_AFTER_S)  # past when a watcher would start: none was left
    assert heard == []


async def test_long_work_is_cut_when_the_client_leaves() -> None:
    cut = asyncio.Event()

    async def receive() -> dict[str, Any]:
        return {"type": "http.disconnect"}  # the client is gone

    async def long() -> None:
        try:
            await asyncio.Event().wait()  # a generation that would never end by itself
        finally:
            cut.set()

    with pytest.raises(ClientGone):
        await asyncio.wait_for(until_disconnect(receive, long()), timeout=5)
    assert cut.is_set()


CHUNK = (b'data: {"id":"c1","model":"org/m1","choices":[{"delta":{"content":"model"}}]}\n\n'
         b'data: {"model" : "org/m1","note":"\\"model\\": \\"org/m1\\""}\n\ndata: [DONE]\n\n')


@given(st.lists(st.integers(1, len(CHUNK) - 1), max_size=10))
def test_model_name_is_rewritten_wherever_the_stream_is_split(cuts: list[int]) -> None:
    renamer = ModelRenamer("org/m1", "m1")
    edges = [0, *sorted(set(cuts)), len(CHUNK)]
    out = b"".join(renamer.feed(CHUNK[a:b]) for a, b in itertools.pairwise(edges))
    out += renamer.flush()
    assert out == CHUNK.replace(b'"model":"org/m1"', b'"model":"m1"').replace(
        b'"model" : "org/m1"', b'"model" : "m1"')


class Upstream:
    """A relay's source that hands out `chunks`, then ends (or breaks off, with `broken`)."""

    def __init__(self, chunks: list[bytes], broken: bool = False) -> None:
        self.chunks, self.broken = list(chunks), broken
        self.let_go: list[str] = []

    async def next_chunk(self) -> bytes:
        await asyncio.sleep(0)  # a chunk arrives on a later turn of the loop, as from a socket
        if self.chunks:
            return self.chunks.pop(0)
        if self.broken:
            raise BrokenOff("reset")
        return b""

    def ended(self) -> bytes:
        self.let_go.append("released")
        return b"data: stopped short\n\n"

    def failed(self, exc: BaseException) -> bytes:
        self.let_go.append("dropped")
        return b"data: broke off\n\n"

    def close(self) -> None:
        self.let_go.append("closed")


class HoldsLastByte:
    """A step that keeps each chunk's last byte until the next chunk (or the end)."""

    def __init__(self) -> None:
        self.held = b""

    def feed(self, chunk: bytes) -> bytes:
        out, self.held = self.held + chunk[:-1], chunk[-1:]
        return out

    def flush(self) -> bytes:
        out, self.held = self.held, b""
        return out


class Tags:
    """A step that tags each chunk it is fed, and adds a closing piece of its own."""

    def feed(self, chunk: bytes) -> bytes:
        return b"<" + chunk + b">"

    def flush(self) -> bytes:
        return b"[end]"


async def relayed(upstream: Upstream, steps: list[Any],
                  fail_send_after: int | None = None) -> tuple[bytes, list[bool], int]:
    sent: list[bytes] = []
    ends: list[bool] = []
    firsts = 0

    def first() -> None:
        nonlocal firsts
        firsts += 1

    async def send(message: dict[str, Any]) -> None:
        if fail_send_after is not None and len(sent) >= fail_send_after:
            raise OSError("the client went away")
        assert message["more_body"] and message["body"]  # the relay writes no empty message
        sent.append(message["body"])

    relay = Relay(upstream, steps, first, ends.append)
    try:
        await relay(send)
    except OSError:
        pass
    return b"".join(sent), ends, firsts


async def test_a_relay_passes_what_each_step_held_back_through_the_steps_after_it() -> None:
    upstream = Upstream([b"ab", b"cd"])
    body, ends, firsts = await relayed(upstream, [HoldsLastByte(), Tags()])
    # Bytes keep their order: the source's last event goes through every step, behind the
    # "d" the first one held; what that one holds of it comes out through the second step,
    # whose own closing piece comes last of all.
    assert body == b"<a><bc><ddata: stopped short\n><\n>[end]"
    assert ends == [True] and firsts == 1
    assert upstream.let_go == ["released", "closed"]


async def test_a_stream_that_breaks_off_ends_with_the_sources_event() -> None:
    upstream = Upstream([b"ab"], broken=True)
    body, ends, _ = await relayed(upstream, [Tags()])
    assert body == b"<ab><data: broke off\n\n>[end]"
    assert ends == [True] and upstream.let_go == ["dropped", "closed"]


async def test_a_client_that_leaves_lets_the_upstream_go_and_the_stream_counts_as_cut() -> None:
    upstream = Upstream([b"ab", b"cd", b"ef"])
    body, ends, _ = await relayed(upstream, [Tags()], fail_send_after=1)
    assert body == b"<ab>" and ends == [False] and upstream.let_go == ["closed"]


async def test_a_finished_stream_leaves_no_garbage_cycle() -> None:
    """A stream's watch on its client, left as a reference cycle, would leave each stream's
    objects to the garbage collector, whose passes over 1,000 open streams stall them all."""

    async def receive() -> dict[str, Any]:
        await asyncio.Event().wait()  # the client stays
        return {"type": "http.disconnect"}  # pragma: no cover

    async def send(message: Any) -> None:
        pass

    gc.collect()
    gc.disable()
    try:
        await RelayResponse(body_of([b"data: 1\n\n"]))({"type": "http"}, receive, send)
        for _ in range(3):
            await asyncio.sleep(0)  # the watcher's cancellation is delivered
        assert gc.collect() == 0
    finally:
        gc.enable()
