"""RedisCoordinator against a real Redis: the lock, in-flight counts, notices."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx
import pytest
import redis

from gateway.residency.coordination import Notice, RedisCoordinator
from tests.emulators import ollama as ollama_emulator
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
    assert await one.drain("ollama", "a", wait_s=1)
    await _eventually(heard_draining)
    assert heard["one"] == []  # a replica does not hear itself


def test_purging_the_cache_leaves_coordination_alone(start_gateway: Any, start_server: Any,
                                                    redis_url: str) -> None:
    """`DELETE /cache` removes cached answers only: the replicas' heartbeats, in-flight counts
    and swap locks stay, even for a model named `lock`."""
    ollama = start_server(ollama_emulator.create_app({"lock:7b": 4.0}, load_delay=0.01))
    namespace = f"test-{uuid.uuid4().hex[:8]}"
    gateway = start_gateway({
        "batching": {"window_ms": 0, "min_residency_ms": 0},
        "cache": {"redis_url": redis_url, "namespace": namespace},
        "backends": {"ollama": {"kind": "ollama", "base_url": ollama.url}},
        "models": {"lock": {"path": "ollama:lock:7b", "size_gb": 4}},
    })
    body = {"model": "lock", "messages": [{"role": "user", "content": "hi"}], "temperature": 0}
    client = redis.Redis.from_url(redis_url)
    with httpx.Client(base_url=gateway.url, timeout=30) as http:
        assert http.post("/v1/chat/completions", json=body).headers["x-cache"] == "MISS"
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
