"""Where cached answers live: Redis when configured, an in-process LRU otherwise.

Both stores share one contract: they never raise to the request path. A failing Redis is a cache
miss, and a circuit breaker keeps a dead or slow Redis from costing every request a timeout.
Both enforce `max_entry_bytes` on `set`, so no caller can forget it. Only a Redis that cannot be
reached (refused, reset or timed-out connections) opens the breaker; a command Redis refuses
(a bad argument, a full memory) fails alone, so no single request can turn the cache off.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol, TypeVar

import structlog
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

log = structlog.get_logger(__name__)

T = TypeVar("T")
Clock = Callable[[], float]

_SCAN_BATCH = 500
# Failures that say Redis cannot be reached now; they open the breaker.
_UNREACHABLE = (RedisConnectionError, RedisTimeoutError, OSError, TimeoutError)
_GLOB_SPECIALS = str.maketrans({char: "\\" + char for char in "*?[]\\"})


@dataclass
class CacheStats:
    """Counters since start.

    errors: store operations that failed or timed out. outages: times Redis was declared down.
    refused: commands Redis answered with an error (counted in errors too; Redis stays up).
    short_circuits: calls answered at once, without Redis, while it was down.
    oversize: values not stored because they exceeded max_entry_bytes (or the whole LRU).
    """

    hits: int = 0
    misses: int = 0
    writes: int = 0
    bytes_written: int = 0
    oversize: int = 0
    errors: int = 0
    outages: int = 0
    refused: int = 0
    short_circuits: int = 0


class CacheStore(Protocol):
    stats: CacheStats

    @property
    def healthy(self) -> bool: ...

    async def get(self, key: str) -> bytes | None: ...

    async def set(self, key: str, value: bytes, ttl_s: float) -> None: ...

    async def purge(self, prefix: str | None = None) -> int:
        """Delete every key starting with `prefix` (all keys if None); the number deleted."""
        ...

    async def close(self) -> None: ...


class MemoryStore:
    """An LRU bounded by the bytes of its keys and values; TTLs run on a monotonic clock."""

    def __init__(
        self, max_bytes: int, *, max_entry_bytes: int | None = None, clock: Clock = time.monotonic
    ) -> None:
        self.stats = CacheStats()
        self._max_bytes = max_bytes
        self._max_entry_bytes = max_bytes if max_entry_bytes is None else max_entry_bytes
        self._clock = clock
        self._entries: OrderedDict[str, tuple[float, bytes]] = OrderedDict()
        self._used = 0

    @property
    def healthy(self) -> bool:
        return True

    @property
    def used_bytes(self) -> int:
        return self._used

    async def get(self, key: str) -> bytes | None:
        entry = self._entries.get(key)
        if entry is not None and entry[0] <= self._clock():
            self._remove(key)
            entry = None
        if entry is None:
            self.stats.misses += 1
            return None
        self._entries.move_to_end(key)
        self.stats.hits += 1
        return entry[1]

    async def set(self, key: str, value: bytes, ttl_s: float) -> None:
        if ttl_s <= 0:
            return
        if len(value) > self._max_entry_bytes or _size(key, value) > self._max_bytes:
            self.stats.oversize += 1
            return
        self._remove(key)
        self._entries[key] = (self._clock() + ttl_s, value)
        self._used += _size(key, value)
        while self._used > self._max_bytes:
            self._remove(next(iter(self._entries)))
        self.stats.writes += 1
        self.stats.bytes_written += len(value)

    async def purge(self, prefix: str | None = None) -> int:
        doomed = [key for key in self._entries if prefix is None or key.startswith(prefix)]
        for key in doomed:
            self._remove(key)
        return len(doomed)

    async def close(self) -> None:
        self._entries.clear()
        self._used = 0

    def _remove(self, key: str) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            self._used -= _size(key, entry[1])


class RedisStore:
    """Redis behind short timeouts and a circuit breaker.

    The first failure or timeout opens the breaker: every call then returns at once (a miss, a
    skipped write) until `retry_after_s` has passed, when one call probes Redis again. Each
    transition is logged once (`cache.redis_down`, `cache.redis_up`), never once per request.
    """

    def __init__(
        self,
        url: str,
        *,
        timeout_s: float = 0.05,
        retry_after_s: float = 5.0,
        max_entry_bytes: int | None = None,
        clock: Clock = time.monotonic,
    ) -> None:
        self.stats = CacheStats()
        self._timeout_s = timeout_s
        self._retry_after_s = retry_after_s
        self._max_entry_bytes = max_entry_bytes
        self._clock = clock
        self._down_since: float | None = None
        self._retry_at = 0.0
        # One immediate retry: after a Redis restart the pooled connection is stale, and a fresh
        # one succeeds at once; a dead Redis refuses both attempts just as fast.
        self._redis = Redis.from_url(
            url,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            retry=Retry(NoBackoff(), 1),
        )

    @property
    def healthy(self) -> bool:
        return self._down_since is None

    async def get(self, key: str) -> bytes | None:
        ok, value = await self._call(self._redis.get, key)
        if ok and value is not None:
            self.stats.hits += 1
            return value
        if ok:
            self.stats.misses += 1
        return None

    async def set(self, key: str, value: bytes, ttl_s: float) -> None:
        ttl_ms = int(ttl_s * 1000)
        if ttl_ms <= 0:
            return
        if self._max_entry_bytes is not None and len(value) > self._max_entry_bytes:
            self.stats.oversize += 1
            return
        ok, _ = await self._call(self._redis.set, key, value, px=ttl_ms)
        if ok:
            self.stats.writes += 1
            self.stats.bytes_written += len(value)

    async def purge(self, prefix: str | None = None) -> int:
        """SCAN + UNLINK in batches, each round trip under the timeout; stops at the first error."""
        pattern = (prefix or "").translate(_GLOB_SPECIALS) + "*"
        deleted, cursor = 0, 0
        while True:
            ok, page = await self._call(self._redis.scan, cursor, match=pattern, count=_SCAN_BATCH)
            if not ok:
                return deleted
            cursor, keys = page
            if keys:
                ok, count = await self._call(self._redis.unlink, *keys)
                if not ok:
                    return deleted
                deleted += count
            if cursor == 0:
                return deleted

    async def close(self) -> None:
        await self._redis.aclose()

    async def _call(
        self, command: Callable[..., Awaitable[T]], *args: object, **kwargs: object
    ) -> tuple[bool, T | None]:
        """(True, result) from Redis, or (False, None) when it failed or the breaker is open."""
        now = self._clock()
        if self._down_since is not None:
            if now < self._retry_at:
                self.stats.short_circuits += 1
                return False, None
            # Half-open: this call probes; calls arriving meanwhile keep short-circuiting.
            self._retry_at = now + self._retry_after_s
        try:
            async with asyncio.timeout(self._timeout_s):
                result = await command(*args, **kwargs)
        except _UNREACHABLE as exc:
            self._failed(exc)
            return False, None
        except RedisError as exc:  # Redis answered, and said no: it is up
            self._refused(exc)
            return False, None
        self._succeeded()
        return True, result

    def _refused(self, exc: RedisError) -> None:
        self.stats.errors += 1
        self.stats.refused += 1
        log.warning("cache.redis_refused", error=_describe(exc))
        self._succeeded()

    def _failed(self, exc: Exception) -> None:
        self.stats.errors += 1
        now = self._clock()
        self._retry_at = now + self._retry_after_s
        if self._down_since is None:
            self._down_since = now
            self.stats.outages += 1
            log.warning("cache.redis_down", error=_describe(exc), retry_after_s=self._retry_after_s)

    def _succeeded(self) -> None:
        if self._down_since is not None:
            log.info("cache.redis_up", down_s=round(self._clock() - self._down_since, 3))
            self._down_since = None


def open_store(
    redis_url: str | None,
    max_bytes: int,
    *,
    max_entry_bytes: int | None = None,
    timeout_s: float = 0.05,
    retry_after_s: float = 5.0,
) -> CacheStore:
    """Redis when a URL is configured, else an in-process LRU of `max_bytes`."""
    if redis_url:
        return RedisStore(
            redis_url,
            timeout_s=timeout_s,
            retry_after_s=retry_after_s,
            max_entry_bytes=max_entry_bytes,
        )
    return MemoryStore(max_bytes, max_entry_bytes=max_entry_bytes)


def _size(key: str, value: bytes) -> int:
    return len(key.encode()) + len(value)


def _describe(exc: BaseException) -> str:
    # redis-py names host and port in its messages, never the URL's credentials.
    return f"{type(exc).__name__}: {exc}"[:200]
