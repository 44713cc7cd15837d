"""The lifecycle's invariants under random interleavings (seeded, bounded).

JSON and streaming calls, identical and not, batched embeddings, clients hanging up at random
points, backend errors and malformed answers, admin loads and unloads, idle-ttl expiries, all at
once against emulated Ollama and vLLM backends. Afterwards: every call ended (an answer or a
clear error) within its deadline, no lease is held, no coalescing or batch entry is left, no task
leaked, and with nothing happening the scheduler takes no steps.
"""

from __future__ import annotations

import asyncio
import os
import random
from collections import Counter
from typing import Any

import httpx
import pytest

from tests.emulators import ollama as ollama_emulator
from tests.emulators import openai_server as vllm_emulator
from tests.servers import emulator, wait_until

CALLS = int(os.environ.get("INVARIANT_CALLS", "600"))
CONCURRENCY = 24
DEADLINE_S = 20.0
SEEDS = (11, 12)
FAILURES = ("500", "garbage", "malformed", "drop", "ignore_stream", "odd_embeddings")


def config(ollama_url: str, vllm_url: str, embed_url: str) -> dict[str, Any]:
    return {
        "swapper": {"mode": "multi-active", "max_concurrent_models": 2,
                    "model_swap_timeout": 10},
        "server": {"heartbeat_s": 0.05, "stream_hold_s": 0.05},
        "batching": {"window_ms": 20, "min_residency_ms": 50, "max_wait_ms": 2000,
                     "embeddings_window_ms": 5},
        "backends": {"ollama": {"kind": "ollama", "base_url": ollama_url},
                     "vllm": {"kind": "openai", "base_url": vllm_url},
                     "embedder": {"kind": "openai", "base_url": embed_url}},
        "models": {
            "a": {"path": "ollama:a:7b", "size_gb": 4},
            "b": {"path": "ollama:b:7b", "size_gb": 4, "ttl": 0.3},
            "c": {"path": "ollama:c:7b", "size_gb": 4},
            "v": {"backend": "vllm", "served_name": "org/v"},
            "e": {"backend": "embedder", "served_name": "org/e", "type": "embedding"},
        },
    }


async def one_call(http: httpx.AsyncClient, rng: random.Random, upstreams: list[Any]) -> str:
    """One random action; the outcome's kind (answer, error status, hang-up)."""
    kind = rng.choice(["json", "json", "stream", "stream", "embed", "embed", "admin", "fault"])
    model = rng.choice("abcv")
    cached = rng.random() < 0.3  # identical deterministic calls: cache hits and coalescing
    body = {"model": model, "messages": [{"role": "user", "content": (
        f"repeat {rng.randrange(3)}" if cached else f"question {rng.random()}")}],
        "temperature": 0 if cached else 0.7}
    if kind == "fault":
        emulator(rng.choice(upstreams)).fail(rng.choice(FAILURES), times=1)
        return "fault"
    if kind == "admin":
        action = rng.choice(["load", "unload"])
        answer = await http.post(f"/models/{rng.choice('abc')}/{action}")
        return f"admin {answer.status_code}"
    if kind == "embed":
        answer = await http.post("/v1/embeddings", json={"model": "e", "input": [
            f"text {rng.randrange(5)}" for _ in range(rng.randint(1, 3))]})
        return checked(answer.status_code, answer.content)
    if kind == "json":
        answer = await http.post("/v1/chat/completions", json=body)
        return checked(answer.status_code, answer.content)
    hang_up_after = rng.choice([None, None, 0, 1, 3])
    async with http.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as s:
        lines: list[str] = []
        async for line in s.aiter_lines():
            if hang_up_after is not None and len(lines) >= hang_up_after:
                return "hung up"
            lines.append(line)
    as_json = s.headers["content-type"].startswith("application/json")  # backend ignored stream
    ended = as_json or "data: [DONE]" in lines or any('"error"' in x for x in lines)
    assert ended, lines[-3:]  # a stream ends with its answer or an error event
    return checked(s.status_code, "\n".join(lines).encode())


def checked(status: int, body: bytes) -> str:
    """Every answer is a success or an OpenAI-shaped error: nothing unexplained."""
    if status != 200:
        assert b'"error"' in body, (status, body[:200])
    return str(status)


async def run_calls(url: str, seed: int, upstreams: list[Any]) -> Counter[str]:
    rng = random.Random(seed)
    outcomes: Counter[str] = Counter()
    queue = list(range(CALLS))
    limits = httpx.Limits(max_connections=CONCURRENCY * 2)
    async with httpx.AsyncClient(base_url=url, timeout=DEADLINE_S, limits=limits) as http:

        async def worker(worker_rng: random.Random) -> None:
            while queue:
                queue.pop()
                async with asyncio.timeout(DEADLINE_S):  # no call waits past its deadline
                    outcomes[await one_call(http, worker_rng, upstreams)] += 1

        await asyncio.gather(*(worker(random.Random(rng.random())) for _ in range(CONCURRENCY)))
    return outcomes


async def loop_tasks() -> int:
    return len(asyncio.all_tasks()) - 1  # this one aside


@pytest.mark.parametrize("seed", SEEDS)
def test_random_interleavings_end_every_call_and_leave_nothing_behind(
        start_gateway: Any, start_server: Any, seed: int) -> None:
    ollama = start_server(ollama_emulator.create_app(
        {f"{m}:7b": 4.0 for m in "abc"}, load_delay=0.05, tokens=6, token_delay=0.002))
    vllm = start_server(vllm_emulator.create_app("org/v", tokens=6, token_delay=0.002,
                                                 first_byte_delay=0.2))
    embedder = start_server(vllm_emulator.create_app("org/e", embedding=True))
    gateway = start_gateway(config(ollama.url, vllm.url, embedder.url))
    services = gateway.app.state.services
    scheduler = services.scheduler
    baseline = gateway.call(loop_tasks())

    outcomes = asyncio.run(run_calls(gateway.url, seed, [vllm, embedder]))

    assert sum(outcomes.values()) == CALLS and outcomes["200"] > CALLS / 4, outcomes
    idle = ("every lease released, queue left, coalescing and batch entry settled, "
            "and the idle ttl run")
    wait_until(lambda: (
        sum(s.in_flight + len(s.queue) for s in scheduler.slots.values()) == 0
        and len(services.coalescer) == 0 and not services.embeddings._open
        and not services.embeddings._tasks
        and scheduler.slots["b"].residency.state.value in ("unloaded", "failed")
        and not scheduler.swap_running() and scheduler.wake_at is None
    ), timeout=15, message=idle)
    wait_until(lambda: gateway.call(loop_tasks()) <= baseline, timeout=10,
               message=f"the gateway's tasks back to {baseline}")
    steps = scheduler.steps
    asyncio.run(asyncio.sleep(0.5))  # nothing happens: the loop must stand still meanwhile
    assert scheduler.steps == steps
