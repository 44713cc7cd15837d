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
import yaml

from tests.emulators import ollama as ollama_emulator
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


@pytest.fixture
def replicas(redis_url: str, tmp_path: Path) -> Iterator[Replicas]:
    """Start n replicas of one config against the given Ollama; their URLs."""
    with ExitStack() as stack:

        def start(ollama_url: str, models: str, n: int = 2) -> list[str]:
            config = tmp_path / "swapper_config.yaml"
            config.write_text(yaml.safe_dump(_config(ollama_url, redis_url, models)))
            return [stack.enter_context(_replica(config, tmp_path / f"replica{i}.log"))
                    for i in range(n)]

        yield start  # type: ignore[misc]


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
