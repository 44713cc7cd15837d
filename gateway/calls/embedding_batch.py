"""Embedding micro-batches: requests for one model that arrive within a few milliseconds are sent
upstream as one call with a list input, and the answer is split back.

Each client gets exactly its own vectors, in its own order, indexed from 0, and a share of the
usage apportioned by input size (backends report usage for the whole call only). A lone request
is sent as it came, byte for byte. If the merged call is refused (4xx), each request is retried
alone, so a bad input fails only its own request.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
import structlog

from gateway.calls.parse import ApiCall
from gateway.config.schema import ModelConfig
from gateway.errors import GatewayError

log = structlog.get_logger("gateway.embeddings")

Send = Callable[[ApiCall, ModelConfig], Awaitable[bytes]]


def normalise_inputs(value: Any) -> tuple[str, list[Any]] | None:
    """(kind, inputs) for a mergeable `input`, None when it cannot be merged with others."""
    if isinstance(value, str):
        return "text", [value]
    if isinstance(value, list) and value:
        if all(isinstance(item, str) for item in value):
            return "text", list(value)
        if all(isinstance(item, int) for item in value):
            return "tokens", [value]
        if all(isinstance(item, list) and all(isinstance(t, int) for t in item) for item in value):
            return "tokens", list(value)
    return None


def apportion(total: int, weights: list[int]) -> list[int]:
    """Split `total` in proportion to `weights`, in whole numbers that add up to `total`."""
    if not any(weights):
        weights = [1] * len(weights)
    whole = sum(weights)
    shares = [total * w // whole for w in weights]
    remainders = sorted(range(len(weights)), key=lambda i: -(total * weights[i] % whole))
    for i in remainders[: total - sum(shares)]:
        shares[i] += 1
    return shares


@dataclass(eq=False)
class _Pending:
    call: ApiCall
    inputs: list[Any]
    future: asyncio.Future[bytes]

    @property
    def weight(self) -> int:
        return sum(len(item) for item in self.inputs)


@dataclass
class _Batch:
    model: ModelConfig
    members: list[_Pending] = field(default_factory=list)

    @property
    def size(self) -> int:
        return sum(len(member.inputs) for member in self.members)


class EmbeddingBatcher:
    def __init__(self, send: Send, *, window_s: float, max_inputs: int) -> None:
        self._send = send
        self.window_s = window_s
        self.max_inputs = max_inputs
        self._open: dict[tuple[str, str, bytes], _Batch] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self.merged_calls = 0

    async def submit(self, call: ApiCall, model: ModelConfig) -> bytes:
        normalised = normalise_inputs(call.body.get("input"))
        if self.window_s <= 0 or normalised is None:
            return await self._send(call, model)
        kind, inputs = normalised
        options = {k: v for k, v in call.body.items() if k not in ("input", "user")}
        key = (model.name, kind, orjson.dumps(options, option=orjson.OPT_SORT_KEYS))
        pending = _Pending(call, inputs, asyncio.get_running_loop().create_future())
        batch = self._open.get(key)
        if batch is None:
            batch = self._open[key] = _Batch(model)
            asyncio.get_running_loop().call_later(self.window_s, self._flush_soon, key, batch)
        batch.members.append(pending)
        if batch.size >= self.max_inputs:
            self._flush_soon(key, batch)
        try:
            return await asyncio.shield(pending.future)
        except asyncio.CancelledError:
            pending.future.cancel()  # its client left: the split skips it
            raise

    def _flush_soon(self, key: tuple[str, str, bytes], batch: _Batch) -> None:
        if self._open.get(key) is not batch:
            return  # already flushed (full before its window ended)
        del self._open[key]
        task = asyncio.create_task(self._flush(batch))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _flush(self, batch: _Batch) -> None:
        """Every member's future is settled when this ends, whatever happens on the way."""
        try:
            await self._send_batch(batch)
        except Exception as exc:  # a malformed answer, a bug: its clients must not hang
            log.warning("embeddings.batch_failed", model=batch.model.name, error=repr(exc))
            _fail(batch.members, GatewayError(
                502, f"Backend '{batch.model.backend}' returned an embeddings answer that "
                "could not be split back.", code="backend_invalid_response"))
        finally:
            _fail(batch.members, GatewayError(500, "The embeddings batch ended without an "
                                                   "answer.", code="internal_error"))

    async def _send_batch(self, batch: _Batch) -> None:
        members = [m for m in batch.members if not m.future.done()]
        if len(members) == 1:
            await self._alone(members[0], batch.model)
            return
        if not members:
            return
        self.merged_calls += 1
        first = members[0].call
        merged_body = {**first.body, "input": [item for m in members for item in m.inputs]}
        merged = ApiCall("embeddings", merged_body, orjson.dumps(merged_body), first.model,
                         stream=False, include_usage=False)
        try:
            answer = orjson.loads(await self._send(merged, batch.model))
        except GatewayError as exc:
            if exc.status >= 500:
                _fail(members, exc)
                return
            await asyncio.gather(*(self._alone(m, batch.model) for m in members))
            return
        _split(answer, members)

    async def _alone(self, member: _Pending, model: ModelConfig) -> None:
        try:
            body = await self._send(member.call, model)
        except GatewayError as exc:
            _fail([member], exc)
            return
        if not member.future.done():
            member.future.set_result(body)

    async def close(self) -> None:
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=5)


def _fail(members: list[_Pending], exc: GatewayError) -> None:
    for member in members:
        if not member.future.done():
            member.future.set_exception(exc)


def _split(answer: Any, members: list[_Pending]) -> None:
    data = answer.get("data") if isinstance(answer, dict) else None
    if not isinstance(data, list) or not all(isinstance(item, dict) for item in data):
        raise ValueError("embeddings answer without a list of objects in 'data'")
    vectors = sorted(data, key=lambda item: _number(item.get("index")))
    expected = sum(len(m.inputs) for m in members)
    if len(vectors) != expected:
        _fail(members, GatewayError(502, f"Backend returned {len(vectors)} embeddings for "
                                         f"{expected} inputs.", code="backend_invalid_response"))
        return
    usage = answer.get("usage") if isinstance(answer.get("usage"), dict) else {}
    prompt = apportion(_number(usage.get("prompt_tokens")), [m.weight for m in members])
    total = apportion(_number(usage.get("total_tokens")), [m.weight for m in members])
    offset = 0
    for member, prompt_tokens, total_tokens in zip(members, prompt, total, strict=True):
        own = vectors[offset: offset + len(member.inputs)]
        offset += len(member.inputs)
        if member.future.done():
            continue  # its client left; the others still get their answers
        body = {**answer, "model": member.call.model,
                "data": [{**item, "index": i} for i, item in enumerate(own)],
                "usage": {"prompt_tokens": prompt_tokens, "total_tokens": total_tokens}}
        member.future.set_result(orjson.dumps(body))


def _number(value: Any) -> int:
    """A count from a backend's JSON; anything else (null, text) counts as 0."""
    return int(value) if isinstance(value, int | float) and not isinstance(value, bool) else 0
