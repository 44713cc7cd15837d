"""Soak: thousands of interleaved requests for three models sharing one "GPU" (single-active on
an emulated Ollama), JSON and streams, some clients hanging up after the first chunk.

Nothing may be lost (each request gets its answer or a clear 429/503/504), and nothing may leak:
tasks on the gateway's loop, upstream connections, file descriptors, memory. The size comes from
$SOAK_REQUESTS (default 1500, well under a minute); run with `pytest -m soak`.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from tests.emulators import ollama as ollama_emulator
from tests.servers import ServerThread, wait_until

pytestmark = pytest.mark.soak

REQUESTS = int(os.environ.get("SOAK_REQUESTS", "1500"))
CONCURRENCY = 32
WARM_UP = 0.2  # share of the requests run before the baseline is taken
MODELS = ("a", "b", "c")
CLEAR_ERRORS = {429, 503, 504}
MAX_RSS_GROWTH_MB = 64


@dataclass(frozen=True)
class Plan:
    model: str
    stream: bool
    hang_up: bool  # close the stream after its first chunk
    temperature: float
    prompt: str


def plans(count: int, seed: int) -> list[Plan]:
    rng = random.Random(seed)
    result = []
    for i in range(count):
        stream = rng.random() < 0.5
        cached = rng.random() < 0.1  # a few deterministic repeats take the cache's path
        result.append(Plan(
            model=rng.choice(MODELS), stream=stream, hang_up=stream and rng.random() < 0.2,
            temperature=0.0 if cached else 0.7,
            prompt=f"repeat {i % 5}" if cached else f"question {i}",
        ))
    return result


def clear_error(status: int, body: bytes) -> str:
    """The status of an OpenAI-shaped 429/503/504, or "lost" for anything else."""
    try:
        error = orjson.loads(body)["error"]
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return "lost"
    shaped = set(error) == {"message", "type", "param", "code"} and error["message"]
    return str(status) if shaped and status in CLEAR_ERRORS else "lost"


async def run_one(http: httpx.AsyncClient, plan: Plan) -> str:
    """How the request ended: "ok", "hung up", "429"/"503"/"504", or "lost"."""
    body = {"model": plan.model, "stream": plan.stream, "temperature": plan.temperature,
            "messages": [{"role": "user", "content": plan.prompt}]}
    try:
        async with http.stream("POST", "/v1/chat/completions", json=body) as response:
            if response.status_code != 200:
                return clear_error(response.status_code, await response.aread())
            if plan.hang_up:
                async for _ in response.aiter_raw():
                    return "hung up"
            data = await response.aread()
    except httpx.HTTPError:
        return "lost"
    if not plan.stream:
        return "ok" if orjson.loads(data)["choices"] else "lost"
    events = [line for line in data.split(b"\n") if line.startswith(b"data: ")]
    last = events[-1] if events else b"(no event)"
    if last == b"data: [DONE]":
        return "ok"
    if not last.startswith(b'data: {"error"'):
        return "lost"
    error = orjson.loads(last.removeprefix(b"data: "))["error"]  # a failure after the start
    return {"model_swap_timeout": "503", "queue_full": "429"}.get(error["code"], "lost")


async def run_all(url: str, work: list[Plan]) -> Counter[str]:
    queue = list(reversed(work))
    outcomes: Counter[str] = Counter()
    limits = httpx.Limits(max_connections=CONCURRENCY, max_keepalive_connections=CONCURRENCY)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as http:

        async def worker() -> None:
            while queue:
                outcomes[await run_one(http, queue.pop())] += 1

        await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
    return outcomes


@dataclass(frozen=True)
class Figures:
    rss_mb: float
    fds: int
    tasks: int
    upstream_in_use: int
    upstream_idle: int


def measure(gateway: ServerThread) -> Figures:
    status = Path("/proc/self/status").read_text()
    rss_kb = int(next(line for line in status.splitlines() if line.startswith("VmRSS:")).split()[1])

    async def inspect() -> tuple[int, int, int]:
        upstreams = gateway.app.state.services.upstreams  # type: ignore[attr-defined]
        relay = upstreams.client("ollama")  # every relayed call's connections
        connector: Any = upstreams.session("ollama").connector  # the driver's calls
        idle = relay.idle + sum(len(pooled) for pooled in connector._conns.values())
        return len(asyncio.all_tasks()), relay.in_use + len(connector._acquired), idle

    tasks, in_use, idle = gateway.call(inspect())
    return Figures(rss_kb / 1024, len(os.listdir("/proc/self/fd")), tasks, in_use, idle)


def test_soak_three_models_single_active(start_server: Any, start_gateway: Any,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    ollama = start_server(ollama_emulator.create_app(
        {f"{name}:7b": 4.0 for name in MODELS}, load_delay=0.01, tokens=6, token_delay=0.001))
    gateway = start_gateway({
        "swapper": {"mode": "single-active", "model_swap_timeout": 30},
        "server": {"heartbeat_s": 0.2},
        "batching": {"window_ms": 50, "min_residency_ms": 200, "max_wait_ms": 5000},
        "backends": {"ollama": {"kind": "ollama", "base_url": ollama.url}},
        "models": {name: {"path": f"ollama:{name}:7b", "size_gb": 4} for name in MODELS},
    })
    work = plans(REQUESTS, seed=20240611)
    split = int(len(work) * WARM_UP)
    warm = asyncio.run(run_all(gateway.url, work[:split]))
    scheduler = gateway.app.state.services.scheduler  # type: ignore[attr-defined]

    def settled() -> bool:
        return all(s.in_flight == 0 and not s.queue for s in scheduler.slots.values())

    wait_until(settled, message="warm-up settled")
    before = measure(gateway)
    started = time.monotonic()
    outcomes = asyncio.run(run_all(gateway.url, work[split:]))
    duration = time.monotonic() - started
    wait_until(settled, message="soak settled")
    wait_until(lambda: measure(gateway).tasks <= before.tasks, message="tasks back to baseline")
    after = measure(gateway)

    state = ollama.server.config.app.state.emulator
    wait_until(lambda: state.in_flight == 0, message="the backend idle")

    outcomes.update(warm)
    loads = sum(s.residency.load_count for s in scheduler.slots.values())
    with capsys.disabled():
        print(f"\nsoak: {REQUESTS} requests ({split} warm-up, {REQUESTS - split} measured in"
              f" {duration:.1f} s); outcomes {dict(outcomes)}; {loads} loads;"
              f" RSS {before.rss_mb:.1f} -> {after.rss_mb:.1f} MB;"
              f" fds {before.fds} -> {after.fds}; tasks {before.tasks} -> {after.tasks};"
              f" upstream connections in use {after.upstream_in_use},"
              f" idle {before.upstream_idle} -> {after.upstream_idle};"
              f" backend peak {state.max_loaded_bytes / 1e9:g} GB,"
              f" unloads while busy {state.unloads_while_busy}")

    assert outcomes["lost"] == 0
    assert sum(outcomes.values()) == REQUESTS
    assert outcomes["ok"] >= REQUESTS * 0.5
    assert after.upstream_in_use == 0
    assert after.upstream_idle <= CONCURRENCY + 1  # one pool's worth, plus the driver's call
    assert after.fds - before.fds <= 2 * CONCURRENCY  # both ends of each pooled connection
    assert after.rss_mb - before.rss_mb <= MAX_RSS_GROWTH_MB
    assert state.max_loaded_bytes <= 4 * 10**9  # single-active: one 4 GB model at a time
