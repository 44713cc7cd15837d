"""The stream relay's own guarantees, at the ASGI level."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.relay.stream import (
    WATCH_AFTER_S,
    ClientGone,
    ModelRenamer,
    RelayResponse,
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

    response = RelayResponse(body(), on_close=lambda: closed.append(True))
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

    await RelayResponse(body(), on_close=lambda: closed.append(True))({"type": "http"},
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
