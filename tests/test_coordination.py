"""RedisCoordinator against a real Redis: the lock, in-flight counts, notices."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx
import pytest
import redis

from gateway.residency.coordination import RENEW_S, SETTLE_S, Notice, RedisCoordinator
from tests.emulators import ollama as ollama_emulator
from tests.redis_server import RedisServer
from tests.servers import wait_until


async def _eventually(check: Callable[[], Awaitable[bool]], timeout_s: float = 5) -> None:
    for _ in range(int(timeout_s / 0.01)):
        if await check():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition never held")


@pytest.fixture
async def pair(redis_url: str) -> AsyncIterator[tuple[RedisCoordinator, RedisCoordinator]]:
    namespace = f"test-{uuid.uuid4().hex[:8]}"
    one, two = (RedisCoordinator(redis_url, name, namespace) for name in ("one", "two"))
    yield one, two
    for coordinator in (one, two):
        await coordinator.close()


async def test_the_lock_admits_one_replica_and_bounds_the_wait(
        pair: tuple[RedisCoordinator, RedisCoordinator]) -> None:
    one, two = pair
    async with one.lock(["ollama"], wait_s=1) as got:
        assert got
        async with two.lock(["ollama"], wait_s=0.2) as also:
            assert not also
    async with two.lock(["ollama"], wait_s=1) as got:
        assert got  # released by its holder


async def test_in_flight_elsewhere_counts_live_replicas_only(
        pair: tuple[RedisCoordinator, RedisCoordinator]) -> None:
    one, two = pair
    notices: list[Notice] = []
    await one.start(notices.append)
    await two.start(notices.append)
    two.leased("a", 1)
    two.leased("a", 1)
    two.leased("a", -1)

    async def counted() -> bool:
        return await one.in_flight_elsewhere("a") == 1

    await _eventually(counted)
    assert await two.in_flight_elsewhere("a") == 0  # its own requests are not "elsewhere"
    await two.close()  # its heartbeat goes: its count no longer holds a swap back
    assert await one.in_flight_elsewhere("a") == 0


async def test_notices_reach_the_other_replicas(
        pair: tuple[RedisCoordinator, RedisCoordinator]) -> None:
    one, two = pair
    heard: dict[str, list[Notice]] = {"one": [], "two": []}
    await one.start(heard["one"].append)
    await two.start(heard["two"].append)

    async def announced() -> bool:
        await one.changed(["ollama"])  # until two's subscription is up
        return bool(heard["two"])

    async def heard_draining() -> bool:
        return Notice("ollama", "a") in heard["two"]

    await _eventually(announced)
    async with one.lock(["ollama"], wait_s=1) as held:
        assert held and await one.drain("ollama", "a", wait_s=1)
    await _eventually(heard_draining)
    assert heard["one"] == []  # a replica does not hear itself


# -- failing safe -------------------------------------------------------------------------------


@pytest.fixture
async def replicas_on_own_redis(
        own_redis: RedisServer) -> AsyncIterator[tuple[RedisCoordinator, RedisCoordinator]]:
    """Two started coordinators on a Redis the test may stop, that have seen each other."""
    settled(own_redis)
    namespace = f"test-{uuid.uuid4().hex[:8]}"
    one, two = (RedisCoordinator(own_redis.url, name, namespace) for name in ("one", "two"))
    for coordinator in (one, two):
        await coordinator.start(lambda notice: None)
    await _eventually(lambda: _true(one._others == 1 and two._others == 1))
    yield one, two
    for coordinator in (one, two):
        await coordinator.close()


async def _true(value: bool) -> bool:
    return value


def settled(redis_server: RedisServer) -> None:
    """Wait until the Redis is older than SETTLE_S: before, it may have forgotten a lock."""
    client = redis.Redis.from_url(redis_server.url)
    wait_until(lambda: client.info("server")["uptime_in_seconds"] >= SETTLE_S,
               timeout=SETTLE_S + 5, message="Redis settled")
    client.close()


def restart(redis_server: RedisServer) -> None:
    """Stop and start again on the same port: a Redis without persistence comes back empty."""
    redis_server.stop()
    redis_server.start()


async def test_without_redis_a_replica_neither_locks_nor_drains(
        replicas_on_own_redis: tuple[RedisCoordinator, RedisCoordinator],
        own_redis: RedisServer) -> None:
    one, _ = replicas_on_own_redis
    own_redis.stop()
    async with one.lock(["ollama"], wait_s=0.5) as held:
        assert not held  # waited for Redis, and did not pretend
    assert not await one.drain("ollama", "a", wait_s=0.5)


async def test_a_replica_that_saw_no_other_swaps_alone_without_redis(
        own_redis: RedisServer) -> None:
    settled(own_redis)
    solo = RedisCoordinator(own_redis.url, "solo", f"test-{uuid.uuid4().hex[:8]}")
    await solo.start(lambda notice: None)
    try:
        await _eventually(lambda: _true(solo.alone))
        own_redis.stop()
        async with solo.lock(["ollama"], wait_s=5) as held:
            assert held and held.alone
            assert await solo.drain("ollama", "a", wait_s=1)
    finally:
        await solo.close()


async def test_a_held_lock_outlives_a_redis_restart(
        replicas_on_own_redis: tuple[RedisCoordinator, RedisCoordinator],
        own_redis: RedisServer) -> None:
    one, two = replicas_on_own_redis
    async with one.lock(["ollama"], wait_s=1) as held:
        assert held
        restart(own_redis)  # forgets the lock
        async with two.lock(["ollama"], wait_s=1) as early:
            assert not early  # a Redis this young may have forgotten a holder: nobody locks
        client = redis.Redis.from_url(own_redis.url)
        key = f"{one._ns}:coord:lock:ollama"
        await _eventually(lambda: _true(client.get(key) == b"one"))  # re-asserted
        async with two.lock(["ollama"], wait_s=SETTLE_S + 1) as meanwhile:
            assert not meanwhile  # Redis settled, and the lock is still one's
        assert held.held
        client.close()
    async with two.lock(["ollama"], wait_s=5) as after:
        assert after


def swallowing(evaluate: Callable[..., Awaitable[Any]],
               started: asyncio.Event | None = None) -> Callable[..., Awaitable[Any]]:
    """`evaluate`, slower than the waits here, returning its result instead of a cancellation
    that lands meanwhile: what Python 3.11's `wait_for` (in redis-py's send) does once the send
    is done."""
    async def slow(*args: Any) -> Any:
        if started is not None:
            started.set()
        await asyncio.sleep(0.5)
        return await evaluate(*args)

    async def call(*args: Any) -> Any:
        pending = asyncio.ensure_future(slow(*args))
        try:
            return await asyncio.shield(pending)
        except asyncio.CancelledError:
            return await pending

    return call


async def test_a_lock_wait_ends_even_when_the_client_swallows_its_timeout(
        pair: tuple[RedisCoordinator, RedisCoordinator]) -> None:
    """The wait's deadline passes inside a call that swallows the cancellation meant to end it:
    the wait must end at its deadline all the same."""
    one, two = pair
    async with one.lock(["ollama"], wait_s=1) as held:
        assert held
        two._redis.eval = swallowing(two._redis.eval)  # type: ignore[method-assign]
        async with asyncio.timeout(10):  # the test's guard, not the behaviour under test
            async with two.lock(["ollama"], wait_s=0.3) as also:
                assert not also


async def test_a_lock_is_released_even_when_its_renewal_swallows_the_cancel(
        pair: tuple[RedisCoordinator, RedisCoordinator]) -> None:
    """Leaving the block stops the renewal task; a renewal whose send swallowed that
    cancellation renewed on forever, and the block never ended."""
    one, two = pair
    renewing = asyncio.Event()
    async with asyncio.timeout(10):  # the test's guard, not the behaviour under test
        async with one.lock(["ollama"], wait_s=1) as held:
            assert held
            one._redis.eval = swallowing(one._redis.eval, renewing)  # type: ignore[method-assign]
            await renewing.wait()  # the renewal's send has begun: the cancel lands inside it
    async with two.lock(["ollama"], wait_s=5) as after:
        assert after  # and the lock was released


async def test_a_lock_lost_midway_is_visible_and_stops_the_drain(
        replicas_on_own_redis: tuple[RedisCoordinator, RedisCoordinator],
        own_redis: RedisServer) -> None:
    one, _ = replicas_on_own_redis
    client = redis.Redis.from_url(own_redis.url)
    async with one.lock(["ollama"], wait_s=1) as held:
        assert held
        client.set(f"{one._ns}:coord:lock:ollama", "intruder", px=60_000)
        await _eventually(lambda: _true(not held.held), timeout_s=RENEW_S * 3)
        assert not await one.drain("ollama", "a", wait_s=1)
    client.close()


async def test_after_a_restart_the_drain_waits_for_the_others_counts(
        replicas_on_own_redis: tuple[RedisCoordinator, RedisCoordinator],
        own_redis: RedisServer) -> None:
    one, two = replicas_on_own_redis
    two.leased("a", 1)  # a stream on two
    await _eventually(lambda: one.in_flight_elsewhere("a"), timeout_s=5)
    restart(own_redis)  # the count is forgotten
    async with one.lock(["ollama"], wait_s=SETTLE_S + 5) as held:
        assert held
        assert not await one.drain("ollama", "a", wait_s=1)  # two's count is back: it stays
        two.leased("a", -1)
        assert await one.drain("ollama", "a", wait_s=5)


def test_purging_the_cache_leaves_coordination_alone(start_gateway: Any, start_server: Any,
                                                    redis_url: str) -> None:
    """`DELETE /cache` removes cached answers only: the replicas' heartbeats, in-flight counts
    and swap locks stay, even for a model named `lock`."""
    ollama = start_server(ollama_emulator.create_app({"lock:7b": 4.0}, load_delay=0.01))
    namespace = f"test-{uuid.uuid4().hex[:8]}"
    gateway = start_gateway({
        "batching": {"window_ms": 0, "min_residency_ms": 0},
        "cache": {"redis_url": redis_url, "namespace": namespace, "redis_timeout_s": 1},
        "backends": {"ollama": {"kind": "ollama", "base_url": ollama.url}},
        "models": {"lock": {"path": "ollama:lock:7b", "size_gb": 4}},
    })
    body = {"model": "lock", "messages": [{"role": "user", "content": "hi"}], "temperature": 0}
    client = redis.Redis.from_url(redis_url)
    with httpx.Client(base_url=gateway.url, timeout=30) as http:
        assert http.post("/v1/chat/completions", json=body).headers["x-cache"] == "MISS"
        wait_until(lambda: client.keys(f"{namespace}:cache:*") != [], message="answer stored")
        assert http.post("/v1/chat/completions", json=body).headers["x-cache"] == "HIT"
        wait_until(lambda: client.exists(f"{namespace}:coord:inflight:lock") == 1,
                   message="in-flight counts written")
        client.set(f"{namespace}:coord:lock:ollama", "another-replica", px=60_000)
        coordination = sorted(client.keys(f"{namespace}:coord:*"))

        purged = http.delete("/cache")
        assert purged.status_code == 200 and purged.json()["removed"] == 1
        assert client.keys(f"{namespace}:cache:*") == []
        assert sorted(client.keys(f"{namespace}:coord:*")) == coordination
        assert http.post("/v1/chat/completions", json=body).headers["x-cache"] == "MISS"
    assert client.get(f"{namespace}:coord:lock:ollama") == b"another-replica"
    client.delete(f"{namespace}:coord:lock:ollama")
    client.close()
