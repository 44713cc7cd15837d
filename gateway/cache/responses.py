"""The response cache in the request path: look up before the scheduler, store complete answers.

A hit never reaches the scheduler, so it never loads a model nor touches a backend. A stored
completion is one record, replayed as JSON or as an OpenAI stream, whichever the client asks.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import structlog

from gateway.cache.replay import (
    Record,
    SseAccumulator,
    dumps_record,
    loads_record,
    record_from_json,
    render_json,
    render_sse,
)
from gateway.cache.store import CacheStore, open_store
from gateway.calls.parse import ApiCall
from gateway.config.schema import CacheConfig, ModelConfig
from policies.caching import CacheDecision, cache_decision, cache_key, key_prefix

log = structlog.get_logger("gateway.cache")


@dataclass(frozen=True)
class CacheTicket:
    decision: CacheDecision
    key: str
    model: str  # the resolved model, for counting outcomes per model

    @property
    def header(self) -> str:
        return "BYPASS" if self.decision.bypass else "MISS"


class ResponseCache:
    def __init__(self, config: CacheConfig, store: CacheStore | None = None) -> None:
        self.config = config
        self.store = store or open_store(
            config.redis_url, config.max_memory_bytes, max_entry_bytes=config.max_entry_bytes,
            timeout_s=config.redis_timeout_s,
        )
        self._writes: set[asyncio.Task[None]] = set()
        # records on their way to the store: a repeat right after an answer reads them here
        self._pending: dict[str, Record] = {}
        # (model, HIT / MISS / BYPASS), as told to clients
        self.outcomes: Counter[tuple[str, str]] = Counter()

    def ticket(self, call: ApiCall, model: ModelConfig, headers: Mapping[str, str],
               tenant: str | None) -> CacheTicket:
        decision = cache_decision(
            call.endpoint, call.body, headers,
            model_enabled=self.config.enabled and model.cache_enabled,
            default_ttl_s=self.config.ttl_s,
            max_ttl_s=self.config.max_ttl_s,
        )
        if decision.bypass:
            self.outcomes[model.name, "BYPASS"] += 1
        key = "" if decision.bypass else cache_key(
            model=model.name, endpoint=call.endpoint, body=call.body,
            tenant=None if model.cache_shared else tenant, namespace=self.config.namespace,
        )
        return CacheTicket(decision, key, model.name)

    async def lookup(self, ticket: CacheTicket) -> Record | None:
        record = None
        if ticket.decision.read:
            record = self._pending.get(ticket.key)
            if record is None:
                value = await self.store.get(ticket.key)
                record = loads_record(value) if value is not None else None
        if not ticket.decision.bypass:
            self.outcomes[ticket.model, "HIT" if record is not None else "MISS"] += 1
        return record

    def totals(self) -> Counter[str]:
        """Outcomes over every model."""
        totals: Counter[str] = Counter()
        for (_, result), count in self.outcomes.items():
            totals[result] += count
        return totals

    def replay(self, call: ApiCall, record: Record) -> bytes | Iterator[bytes]:
        """The stored answer as the client asked for it: JSON bytes or SSE events."""
        if "model" in record:
            record = {**record, "model": call.model}
        if call.stream and call.endpoint in ("chat/completions", "completions"):
            return render_sse(record, include_usage=call.include_usage)
        return render_json(record)

    def store_json(self, ticket: CacheTicket, call: ApiCall, body: bytes) -> Record | None:
        """Store a complete JSON answer; the record stored, if any."""
        if not ticket.decision.write:
            return None
        record = record_from_json(call.endpoint, body)
        if record is not None:
            self._write(ticket, record)
        return record

    def tee(self, ticket: CacheTicket, call: ApiCall,
            on_record: Callable[[Record | None], None]) -> CacheTee:
        """A relay step that keeps a copy of the stream, to store once it was relayed whole."""
        return CacheTee(SseAccumulator(call.endpoint), lambda record: self._write(ticket, record),
                        on_record)

    def _write(self, ticket: CacheTicket, record: Record) -> None:
        key = ticket.key
        self._pending[key] = record
        task = asyncio.create_task(self.store.set(key, dumps_record(record), ticket.decision.ttl_s))
        self._writes.add(task)

        def landed(done: asyncio.Task[None]) -> None:
            self._writes.discard(done)
            if self._pending.get(key) is record:
                del self._pending[key]
        task.add_done_callback(landed)

    async def purge(self, model: str | None = None) -> int:
        prefix = key_prefix(self.config.namespace, model)
        for key in [key for key in self._pending if key.startswith(prefix)]:
            del self._pending[key]
        return await self.store.purge(prefix)

    async def close(self) -> None:
        if self._writes:
            await asyncio.wait(self._writes, timeout=2)
        await self.store.close()


class CacheTee:
    """A stream's copy for the cache (a `relay.stream.Step`): every chunk passes unchanged; at
    the end the answer is stored if it was relayed whole and is complete, and the record (or
    None) goes to `on_record`."""

    __slots__ = ("_accumulator", "_on_record", "_store")

    def __init__(self, accumulator: SseAccumulator, store: Callable[[Record], None],
                 on_record: Callable[[Record | None], None]) -> None:
        self._accumulator, self._store, self._on_record = accumulator, store, on_record

    def feed(self, chunk: bytes) -> bytes:
        self._accumulator.feed(chunk)
        return chunk

    def flush(self) -> bytes:
        return b""

    def end(self, whole: bool) -> None:
        record = self._accumulator.result() if whole else None
        if record is not None:
            self._store(record)
        self._on_record(record)
