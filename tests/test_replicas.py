"""Two gateway processes share one Ollama through Redis: no cut stream, no double load."""

from __future__ import annotations

import random
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
import yaml

from gateway.residency.coordination import SETTLE_S
from tests.emulators import ollama as ollama_emulator
from tests.redis_server import RedisServer
from tests.servers import free_port, stop_process, wait_until

ROOT = Path(__file__).resolve().parent.parent
GB = 1024**3

Replicas = Callable[[str, int], list[str]]


def _config(ollama_url: str, redis_url: str, models: str) -> dict[str, Any]:
    return {
        "swapper": {"mode": "single-active", "model_swap_timeout": 60},
        "batching": {"window_ms": 0, "min_residency_ms": 0},
        "cache": {"redis_url": redis_url, "namespace": f"test-{uuid.uuid4().hex[:8]}"},
        "backends": {"ollama": {"kind": "ollama", "base_url": ollama_url}},
        "models": {m: {"path": f"ollama:{m}:7b", "size_gb": 4} for m in models},
    }


@contextmanager
def _replica(config: Path, log: Path) -> Iterator[str]:
    port = free_port()
    with log.open("w") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "gateway", "serve", "--config", str(config), "--host",
             "127.0.0.1", "--port", str(port)], cwd=ROOT, stdout=out, stderr=out)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: _ready(url), timeout=20, message="replica ready")
        yield url
    finally:
        stop_process(process)
    assert "Traceback" not in log.read_text()


@contextmanager
def _replicas_on(redis_url: str, tmp_path: Path) -> Iterator[Replicas]:
    with ExitStack() as stack:

        def start(ollama_url: str, models: str, n: int = 2) -> list[str]:
            config = tmp_path / "swapper_config.yaml"
            config.write_text(yaml.safe_dump(_config(ollama_url, redis_url, models)))
            return [stack.enter_context(_replica(config, tmp_path / f"replica{i}.log"))
                    for i in range(n)]

        yield start  # type: ignore[misc]


@pytest.fixture
def replicas(redis_url: str, tmp_path: Path) -> Iterator[Replicas]:
    """Start n replicas of one config against the given Ollama; their URLs."""
    with _replicas_on(redis_url, tmp_path) as start:
        yield start


@pytest.fixture
def replicas_on_own_redis(own_redis: RedisServer, tmp_path: Path) -> Iterator[Replicas]:
    """Replicas coordinating through a Redis the test may kill; its log files in tmp_path."""
    with _replicas_on(own_redis.url, tmp_path) as start:
        yield start


def _ready(url: str) -> bool:
    try:
        return httpx.get(url + "/ready", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def _ask(model: str, stream: bool = False) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], "stream": stream}


def _assert_one_model_at_a_time(state: Any) -> None:
    assert state.max_loaded_bytes <= 4 * GB  # never two models resident at once
    assert state.unloads_while_busy == 0
    assert {reason for _, reason in state.evictions} <= {"unload"}  # Ollama evicted nothing
    for model, loads in state.load_count.items():
        # Every load but the current residency's ended in an unload: no load twice in a row.
        assert loads == state.unload_count[model] + (model in state.loaded), model


class _Stream:
    """A streamed answer read in its own thread; `started` once the first bytes arrived."""

    def __init__(self, url: str, model: str) -> None:
        self.started = threading.Event()
        self.body = b""
        self.ended = 0.0  # monotonic
        self._url, self._model = url, model
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        body = _ask(self._model, stream=True)
        with httpx.stream("POST", self._url + "/v1/chat/completions", json=body,
                          timeout=60) as answer:
            for chunk in answer.iter_bytes():
                self.body += chunk
                self.started.set()
        self.ended = time.monotonic()

    def result(self) -> bytes:
        self._thread.join(60)
        return self.body


def test_a_swap_on_one_replica_waits_for_the_streams_of_the_other(replicas: Any,
                                                                  start_server: Any) -> None:
    ollama = start_server(ollama_emulator.create_app(
        {"a:7b": 4.0, "b:7b": 4.0}, load_delay=0.05, tokens=60, token_delay=0.02))
    first, second = replicas(ollama.url, "ab")
    on_second = _Stream(second, "a")  # loads a
    assert on_second.started.wait(20)
    wait_until(lambda: on_second.body.count(b"data:") > 20, message="on_second half done")
    on_first = _Stream(first, "a")  # finds a resident: no second load; outlives on_second
    assert on_first.started.wait(20)
    other = httpx.post(second + "/v1/chat/completions", json=_ask("b"), timeout=60)
    assert other.status_code == 200, other.text
    answered = time.monotonic()
    for stream in (on_first, on_second):
        assert stream.result().endswith(b"data: [DONE]\n\n")  # not cut
    assert on_second.ended < on_first.ended < answered  # the swap waited for the other replica
    state = ollama.server.config.app.state.emulator
    _assert_one_model_at_a_time(state)
    assert state.load_count["a:7b"] == 1 and state.loaded == frozenset({"b:7b"})


def test_interleaved_traffic_on_two_replicas_never_loads_twice(replicas: Any,
                                                               start_server: Any) -> None:
    ollama = start_server(ollama_emulator.create_app(
        {f"{m}:7b": 4.0 for m in "abc"}, load_delay=0.05, tokens=4, token_delay=0.01))
    urls = replicas(ollama.url, "abc")
    rng = random.Random(7)
    plan = [(rng.choice(urls), rng.choice("abc")) for _ in range(30)]
    with httpx.Client(timeout=90) as http, ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(
            lambda job: http.post(job[0] + "/v1/chat/completions", json=_ask(job[1])), plan))
    assert [a.status_code for a in answers] == [200] * len(plan), [a.text for a in answers]
    assert [a.json()["model"] for a in answers] == [model for _, model in plan]
    state = ollama.server.config.app.state.emulator
    wait_until(lambda: state.in_flight == 0, message="the emulator idle")
    _assert_one_model_at_a_time(state)


# -- Redis failing mid-swap -------------------------------------------------------------------


def _settled(server: RedisServer) -> None:
    """Redis older than SETTLE_S: before that, nobody swaps (it may have forgotten a lock)."""
    client = redis.Redis.from_url(server.url)
    wait_until(lambda: client.info("server")["uptime_in_seconds"] >= SETTLE_S,
               timeout=SETTLE_S + 5, message="Redis settled")
    client.close()


def _model(url: str, model: str) -> dict[str, Any]:
    """The model as the replica's /status shows it (state, queue_depth, in_flight...)."""
    return httpx.get(f"{url}/status", timeout=5).json()["models"][model]


class _Ask:
    """A non-streamed request answered in its own thread."""

    def __init__(self, url: str, model: str) -> None:
        self.response: httpx.Response | None = None
        self._thread = threading.Thread(target=self._run, args=(url, model), daemon=True)
        self._thread.start()

    def _run(self, url: str, model: str) -> None:
        self.response = httpx.post(url + "/v1/chat/completions", json=_ask(model), timeout=90)

    def result(self) -> httpx.Response:
        self._thread.join(90)
        assert self.response is not None
        return self.response


def _said(log: Path, event: str) -> bool:
    return event in log.read_text()


def test_redis_dying_while_a_replica_drains_cuts_no_stream(
        replicas_on_own_redis: Replicas, own_redis: RedisServer, start_server: Any,
        tmp_path: Path) -> None:
    """Replica 2 wants b and waits for replica 1's stream on a; Redis dies meanwhile. Without
    the others' counts it must not unload a: it waits for Redis, then swaps."""
    ollama = start_server(ollama_emulator.create_app(
        {"a:7b": 4.0, "b:7b": 4.0}, load_delay=0.2, tokens=60, token_delay=0.05))
    first, second = replicas_on_own_redis(ollama.url, "ab")
    _settled(own_redis)
    assert httpx.post(first + "/v1/chat/completions", json=_ask("a"), timeout=60).status_code == 200
    on_first = _Stream(first, "a")
    assert on_first.started.wait(20)
    wants_b = _Ask(second, "b")
    wait_until(lambda: _model(second, "b")["queue_depth"] == 1, message="b wanted on second")
    own_redis.stop()
    assert on_first.result().endswith(b"data: [DONE]\n\n")  # not cut
    wait_until(lambda: _said(tmp_path / "replica1.log", "coordination.unavailable"),
               message="second to find Redis gone")
    state = ollama.server.config.app.state.emulator
    assert state.loaded == frozenset({"a:7b"}) and state.unloads_while_busy == 0
    own_redis.start()
    answer = wants_b.result()
    assert answer.status_code == 200, answer.text  # service resumed with Redis
    _assert_one_model_at_a_time(state)
    assert state.loaded == frozenset({"b:7b"})


def test_redis_dying_while_a_replica_loads_never_exceeds_the_budget(
        replicas_on_own_redis: Replicas, own_redis: RedisServer, start_server: Any,
        tmp_path: Path) -> None:
    """Replica 2 is loading b when Redis dies; replica 1, asked for a meanwhile, cannot get the
    lock and must not load a beside b: it waits for Redis, then swaps in turn."""
    ollama = start_server(ollama_emulator.create_app(
        {"a:7b": 4.0, "b:7b": 4.0}, load_delay=2.0, tokens=4, token_delay=0.01))
    first, second = replicas_on_own_redis(ollama.url, "ab")
    _settled(own_redis)
    assert httpx.post(first + "/v1/chat/completions", json=_ask("a"), timeout=60).status_code == 200
    wants_b = _Ask(second, "b")
    wait_until(lambda: _model(second, "b")["state"] == "loading", message="b loading on second")
    own_redis.stop()
    wants_a = _Ask(first, "a")
    assert wants_b.result().status_code == 200  # the load under way finished
    wait_until(lambda: _said(tmp_path / "replica0.log", "coordination.unavailable"),
               message="first to find Redis gone")
    state = ollama.server.config.app.state.emulator
    assert state.loaded == frozenset({"b:7b"}) and state.max_loaded_bytes <= 4 * GB
    own_redis.start()
    answer = wants_a.result()
    assert answer.status_code == 200, answer.text
    _assert_one_model_at_a_time(state)
    assert state.loaded == frozenset({"a:7b"})
