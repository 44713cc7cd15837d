from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator

import pytest
from structlog.testing import capture_logs

from gateway.cache.store import MemoryStore, RedisStore, open_store
from policies.caching import cache_key, key_prefix
from tests.redis_server import RedisServer, own_redis, redis_url

__all__ = ["own_redis", "redis_url"]  # the fixtures, re-exported so linters see them used


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def prefix() -> str:
    """Each test writes under its own namespace: the shared Redis may serve other sessions."""
    return f"test-{uuid.uuid4().hex}:"


@pytest.fixture
async def store(redis_url: str) -> AsyncIterator[RedisStore]:
    redis_store = RedisStore(redis_url, timeout_s=1.0)
    yield redis_store
    await redis_store.close()


async def eventually_none(store: RedisStore, key: str, within_s: float = 5.0) -> None:
    deadline = time.monotonic() + within_s
    while await store.get(key) is not None:
        assert time.monotonic() < deadline, f"{key} did not expire"
        await asyncio.sleep(0.02)


# --- memory ---------------------------------------------------------------------------------


async def test_memory_round_trip_and_counters() -> None:
    memory = MemoryStore(1000)
    assert await memory.get("k") is None
    await memory.set("k", b"value", 60)
    assert await memory.get("k") == b"value"
    assert (memory.stats.hits, memory.stats.misses, memory.stats.writes) == (1, 1, 1)
    assert memory.stats.bytes_written == 5
    assert memory.healthy


async def test_memory_ttl_follows_the_clock(clock: FakeClock) -> None:
    memory = MemoryStore(1000, clock=clock)
    await memory.set("k", b"v", 10)
    clock.now += 9.9
    assert await memory.get("k") == b"v"
    clock.now += 0.1
    assert await memory.get("k") is None
    assert memory.used_bytes == 0


async def test_memory_evicts_least_recently_used_by_bytes() -> None:
    memory = MemoryStore(100)  # each entry: 1-byte key + 30-byte value
    for name in "abc":
        await memory.set(name, name.encode() * 30, 60)
    assert await memory.get("a") is not None  # "b" is now the least recently used
    await memory.set("d", b"d" * 30, 60)
    assert await memory.get("b") is None
    assert all([await memory.get(name) for name in "acd"])
    assert memory.used_bytes == 93


async def test_memory_replacing_a_key_frees_its_old_bytes() -> None:
    memory = MemoryStore(100)
    await memory.set("k", b"x" * 50, 60)
    await memory.set("k", b"y" * 10, 60)
    assert memory.used_bytes == 11
    assert await memory.get("k") == b"y" * 10


async def test_memory_refuses_oversize_entries() -> None:
    memory = MemoryStore(100, max_entry_bytes=20)
    await memory.set("big", b"x" * 21, 60)
    await memory.set("huge", b"x" * 200, 60)
    assert await memory.get("big") is None and memory.stats.oversize == 2
    assert memory.used_bytes == 0


async def test_memory_ignores_a_zero_ttl() -> None:
    memory = MemoryStore(100)
    await memory.set("k", b"v", 0)
    assert await memory.get("k") is None


async def test_memory_purge_by_prefix_and_all() -> None:
    memory = MemoryStore(1000)
    for name in ("ns:a:1", "ns:a:2", "ns:b:1"):
        await memory.set(name, b"v", 60)
    assert await memory.purge("ns:a:") == 2
    assert await memory.get("ns:b:1") == b"v"
    assert await memory.purge() == 1
    assert memory.used_bytes == 0


def test_open_store_picks_the_backend(redis_url: str) -> None:
    assert isinstance(open_store(None, 1000), MemoryStore)
    assert isinstance(open_store(redis_url, 1000), RedisStore)


# --- redis ----------------------------------------------------------------------------------


async def test_redis_round_trip(store: RedisStore, prefix: str) -> None:
    assert await store.get(prefix + "k") is None
    await store.set(prefix + "k", b"\x00binary\xff", 60)
    assert await store.get(prefix + "k") == b"\x00binary\xff"
    assert (store.stats.hits, store.stats.misses, store.stats.writes) == (1, 1, 1)
    assert store.healthy and store.stats.errors == 0


async def test_redis_entries_expire(store: RedisStore, prefix: str) -> None:
    await store.set(prefix + "short", b"v", 0.1)
    await store.set(prefix + "long", b"v", 60)
    await eventually_none(store, prefix + "short")
    assert await store.get(prefix + "long") == b"v"


async def test_redis_refuses_oversize_entries(redis_url: str, prefix: str) -> None:
    store = RedisStore(redis_url, max_entry_bytes=10)
    await store.set(prefix + "big", b"x" * 11, 60)
    assert await store.get(prefix + "big") is None and store.stats.oversize == 1
    await store.close()


async def test_redis_purge_by_prefix(store: RedisStore, prefix: str) -> None:
    for index in range(1200):  # several SCAN pages
        await store.set(f"{prefix}a:{index}", b"v", 60)
    await store.set(f"{prefix}b:0", b"v", 60)
    assert await store.purge(prefix + "a:") == 1200
    assert await store.get(f"{prefix}a:7") is None
    assert await store.get(f"{prefix}b:0") == b"v"


async def test_redis_purge_treats_glob_characters_literally(store: RedisStore) -> None:
    odd = f"t[{uuid.uuid4().hex}]*?:"
    await store.set(odd + "1", b"v", 60)
    await store.set(odd.replace("[", "x") + "1", b"v", 60)
    assert await store.purge(odd) == 1
    assert await store.purge(odd.replace("[", "x")) == 1


async def test_redis_purge_of_one_model(store: RedisStore, prefix: str) -> None:
    namespace = prefix.rstrip(":")
    body = {"messages": [{"role": "user", "content": "hi"}], "temperature": 0}
    keys = {
        model: cache_key(
            model=model, endpoint="chat/completions", body=body, tenant=None, namespace=namespace
        )
        for model in ("qwen", "qwen:7b")
    }
    for key in keys.values():
        await store.set(key, b"v", 60)
    assert await store.purge(key_prefix(namespace, "qwen")) == 1
    assert await store.get(keys["qwen:7b"]) == b"v"


async def test_tenants_do_not_see_each_other(store: RedisStore, prefix: str) -> None:
    body = {"input": "secret", "model": "nomic"}

    def key(tenant: str | None) -> str:
        return cache_key(
            model="nomic", endpoint="embeddings", body=body, tenant=tenant, namespace=prefix
        )

    await store.set(key("alice"), b"alice's answer", 60)
    assert await store.get(key("bob")) is None
    assert await store.get(key(None)) is None
    assert await store.get(key("alice")) == b"alice's answer"


# --- circuit breaker ------------------------------------------------------------------------


async def breaker(server: RedisServer, clock: FakeClock) -> RedisStore:
    store = RedisStore(server.url, timeout_s=0.1, retry_after_s=5.0, clock=clock)
    await store.set("k", b"v", 60)
    assert await store.get("k") == b"v"
    return store


async def test_dead_redis_is_skipped_quickly_and_reported_once(
    own_redis: RedisServer, clock: FakeClock
) -> None:
    store = await breaker(own_redis, clock)
    own_redis.stop()
    with capture_logs() as logs:
        started = time.monotonic()
        for _ in range(20):
            assert await store.get("k") is None
            await store.set("k", b"v", 60)
        elapsed = time.monotonic() - started
    assert elapsed < 1.0
    assert not store.healthy
    assert (store.stats.outages, store.stats.errors, store.stats.short_circuits) == (1, 1, 39)
    assert [entry["event"] for entry in logs] == ["cache.redis_down"]
    assert await store.purge() == 0

    own_redis.start()
    with capture_logs() as logs:
        assert await store.get("k") is None  # still inside retry_after_s: not even tried
        clock.now += 5.0
        await store.set("k", b"again", 60)
        assert await store.get("k") == b"again"
    assert store.healthy
    assert [entry["event"] for entry in logs] == ["cache.redis_up"]
    await store.close()


async def test_hung_redis_times_out_and_recovers(own_redis: RedisServer, clock: FakeClock) -> None:
    store = await breaker(own_redis, clock)
    own_redis.pause()
    try:
        started = time.monotonic()
        assert await store.get("k") is None
        assert time.monotonic() - started < 0.5
        assert not store.healthy
    finally:
        own_redis.resume()
    clock.now += 5.0
    assert await store.get("k") == b"v"
    assert store.healthy
    await store.close()


async def test_failed_probe_keeps_the_breaker_open(
    own_redis: RedisServer, clock: FakeClock
) -> None:
    store = await breaker(own_redis, clock)
    own_redis.stop()
    assert await store.get("k") is None
    clock.now += 5.0
    with capture_logs() as logs:
        assert await store.get("k") is None  # the probe fails: no second "down" line
        assert await store.get("k") is None  # and the next call is short-circuited again
    assert logs == []
    assert (store.stats.outages, store.stats.errors, store.stats.short_circuits) == (1, 2, 1)
    await store.close()


async def test_a_command_redis_refuses_fails_alone(store: RedisStore, prefix: str) -> None:
    """An expiry Redis will not take (2**63 ms and more) fails that write only: the breaker
    stays closed and every other key keeps working."""
    with capture_logs() as logs:
        await store.set(prefix + "forever", b"v", 1e17)
    assert [entry["event"] for entry in logs] == ["cache.redis_refused"]
    assert store.healthy
    assert (store.stats.refused, store.stats.outages, store.stats.writes) == (1, 0, 0)
    await store.set(prefix + "k", b"v", 60)
    assert await store.get(prefix + "k") == b"v"
