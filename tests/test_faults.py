"""Faults, end to end: backends that die, refuse, hang or talk nonsense, a model process killed
with SIGKILL, Redis going away. Every request ends with an answer or a clear OpenAI error within
its timeout, and no lease is left behind."""

from __future__ import annotations

import asyncio
import os
import shlex
import signal
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import openai
import orjson
import pytest

from gateway.relay.stream import Receive, Scope, Send
from tests.emulators import ollama as ollama_emulator
from tests.emulators import openai_server as vllm_emulator
from tests.redis_server import RedisServer
from tests.servers import ServerThread, free_port, reaped, wait_until

ROOT = Path(__file__).resolve().parents[1]
CHAT = "/v1/chat/completions"
READ_TIMEOUT = 0.5
SLACK = 2.0  # scheduling noise on a busy CI machine, on top of a timeout


@pytest.fixture(autouse=True)
def _state_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Process backends record their servers in the test's own state directory."""
    monkeypatch.setenv("SWAPPER_STATE_DIR", str(tmp_path / "state"))


def ask(model: str = "m1", text: str = "hi", **fields: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": text}], **fields}


def emulator(server: ServerThread) -> Any:
    return server.server.config.app.state.emulator


def slot(gateway: ServerThread, model: str = "m1") -> Any:
    return gateway.app.state.services.scheduler.slots[model]  # type: ignore[attr-defined]


def static_config(url: str, **extra: Any) -> dict[str, Any]:
    return {
        "backends": {"vllm": {"kind": "openai", "base_url": url,
                              "timeouts": {"connect": 1, "read": READ_TIMEOUT}}},
        "models": {"m1": {"backend": "vllm", "served_name": "org/m1"}},
        **extra,
    }


def data_events(response: httpx.Response) -> list[str]:
    return [line.removeprefix("data: ") for line in response.iter_lines()
            if line.startswith("data: ")]


def stream(url: str, body: dict[str, Any], timeout: float = 10) -> tuple[int, list[str]]:
    with httpx.stream("POST", url + CHAT, json={**body, "stream": True},
                      timeout=timeout) as response:
        return response.status_code, data_events(response)


def error_of(event: str | bytes) -> dict[str, Any]:
    payload = orjson.loads(event)
    assert set(payload["error"]) == {"message", "type", "param", "code"}
    return payload["error"]


def assert_openai_error(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text[:300]
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == code and error["type"] == "server_error"
    return error


@pytest.fixture
def vllm(start_server: Any) -> ServerThread:
    return start_server(vllm_emulator.create_app(["org/m1"], tokens=20, token_delay=0.005))


@pytest.fixture
def gateway(start_gateway: Any, vllm: ServerThread) -> ServerThread:
    return start_gateway(static_config(vllm.url))


# -- a backend that dies ----------------------------------------------------------------------


def test_backend_dying_mid_stream_ends_it_with_an_error_event(gateway: ServerThread,
                                                             vllm: ServerThread) -> None:
    emulator(vllm).fail("drop", times=1)
    status, events = stream(gateway.url, ask())
    assert status == 200
    assert len(events) >= 2 and "[DONE]" not in events
    error = error_of(events[-1])
    assert error["code"] == "backend_error" and "'vllm'" in error["message"]
    wait_until(lambda: slot(gateway).in_flight == 0, message="lease released")
    assert emulator(vllm).dropped == 1
    status, events = stream(gateway.url, ask())  # the next one is whole
    assert status == 200 and events[-1] == "[DONE]"


def test_the_official_client_raises_on_the_error_event(gateway: ServerThread,
                                                       vllm: ServerThread) -> None:
    emulator(vllm).fail("drop", times=1)
    client = openai.OpenAI(base_url=gateway.url + "/v1", api_key="x", max_retries=0)
    chunks = client.chat.completions.create(model="m1", messages=ask()["messages"], stream=True)
    with pytest.raises(openai.APIError, match="vllm"):
        for _ in chunks:
            pass


def test_backend_dying_before_the_answer_is_complete_is_502(gateway: ServerThread,
                                                           vllm: ServerThread) -> None:
    emulator(vllm).fail("drop", times=1)
    response = httpx.post(gateway.url + CHAT, json=ask(), timeout=10)
    assert_openai_error(response, 502, "backend_error")
    assert slot(gateway).in_flight == 0


# -- a backend that refuses, hangs or talks nonsense ------------------------------------------


@pytest.mark.parametrize("streamed", [False, True], ids=["json", "stream"])
def test_refused_connection_is_502_at_once(start_gateway: Any, streamed: bool) -> None:
    port = free_port()
    gateway = start_gateway(static_config(f"http://127.0.0.1:{port}"))
    started = time.monotonic()
    response = httpx.post(gateway.url + CHAT, json=ask(stream=streamed), timeout=10)
    assert time.monotonic() - started < 1 + SLACK  # the connect timeout, at most
    error = assert_openai_error(response, 502, "backend_unreachable")
    # What happened, in words; not the backend's address nor the client library's exception.
    assert error["message"] == "Backend 'vllm' is unreachable (connection refused)."
    assert_tells_no_internals(response.text, str(port))
    assert slot(gateway).in_flight == 0


def assert_tells_no_internals(text: str, *also: str) -> None:
    for internal in ("127.0.0.1", "http://", "Error:", "Exception", "Traceback", *also):
        assert internal not in text, internal


def test_managed_backend_refusing_connections_is_503_load_failed(start_gateway: Any) -> None:
    config = {
        "swapper": {"model_swap_timeout": 10},
        "batching": {"window_ms": 0, "min_residency_ms": 0},
        "backends": {"ollama": {"kind": "ollama", "base_url": f"http://127.0.0.1:{free_port()}",
                                "timeouts": {"connect": 1}}},
        "models": {"a": {"path": "ollama:a:7b", "size_gb": 4}},
    }
    gateway = start_gateway(config)
    response = httpx.post(gateway.url + CHAT, json=ask("a"), timeout=15)
    assert response.status_code == 503
    error = response.json()["error"]
    assert error["code"] == "model_load_failed"
    assert error["message"] == "Model 'a' failed to load: backend 'ollama' is unreachable"
    assert_tells_no_internals(response.text, config["backends"]["ollama"]["base_url"])
    assert int(response.headers["retry-after"]) >= 1
    assert httpx.get(gateway.url + "/models/a").json()["state"] == "failed"


@pytest.mark.parametrize("streamed", [False, True], ids=["json", "stream"])
def test_hanging_backend_is_504_after_the_read_timeout(gateway: ServerThread, vllm: ServerThread,
                                                       streamed: bool) -> None:
    state = emulator(vllm)
    state.fail("hang", times=1)
    started = time.monotonic()
    response = httpx.post(gateway.url + CHAT, json=ask(stream=streamed), timeout=10)
    elapsed = time.monotonic() - started
    assert READ_TIMEOUT <= elapsed < READ_TIMEOUT + SLACK
    assert_openai_error(response, 504, "backend_timeout")
    # The gateway hung up, so the backend stops working on it too.
    wait_until(lambda: state.in_flight == 0 and state.cancelled == 1, message="upstream closed")
    assert slot(gateway).in_flight == 0


def test_backend_going_silent_mid_stream_ends_it_with_a_timeout_event(
        start_server: Any, start_gateway: Any) -> None:
    silent = start_server(vllm_emulator.create_app(["org/m1"], tokens=5, token_delay=5.0))
    gateway = start_gateway(static_config(silent.url))
    started = time.monotonic()
    status, events = stream(gateway.url, ask())
    assert time.monotonic() - started < READ_TIMEOUT + SLACK
    assert status == 200 and len(events) == 2  # the role chunk, then the error
    assert error_of(events[-1])["code"] == "backend_timeout"
    state = emulator(silent)
    wait_until(lambda: state.cancelled_streams == 1, message="upstream stream cancelled")
    assert slot(gateway).in_flight == 0


def test_garbage_from_backend_is_502(gateway: ServerThread, vllm: ServerThread) -> None:
    emulator(vllm).fail("garbage", times=1)
    response = httpx.post(gateway.url + CHAT, json=ask(), timeout=10)
    assert_openai_error(response, 502, "backend_invalid_response")
    assert slot(gateway).in_flight == 0


def test_garbage_from_backend_to_a_stream_request_is_502(gateway: ServerThread,
                                                         vllm: ServerThread) -> None:
    emulator(vllm).fail("garbage", times=1)
    response = httpx.post(gateway.url + CHAT, json=ask(stream=True), timeout=10)
    assert_openai_error(response, 502, "backend_invalid_response")


# -- never wedged -----------------------------------------------------------------------------


def outcome(gateway: ServerThread, body: dict[str, Any]) -> tuple[int, str, float]:
    """How one request ended (status, "ok" or the error's code) and how long it took."""
    started = time.monotonic()
    if body.get("stream"):
        with httpx.stream("POST", gateway.url + CHAT, json=body, timeout=30) as response:
            status = response.status_code
            as_json = response.headers["content-type"].startswith("application/json")
            events = data_events(response) if status == 200 and not as_json else ["[DONE]"]
            error = error_of(response.read()) if status != 200 else None
        if status == 200 and events[-1] != "[DONE]":
            error = error_of(events[-1])
    else:
        response = httpx.post(gateway.url + CHAT, json=body, timeout=30)
        status = response.status_code
        error = error_of(response.content) if status != 200 else None
    return status, "ok" if error is None else str(error["code"]), time.monotonic() - started


def test_every_request_ends_in_time_whatever_the_backend_does(gateway: ServerThread,
                                                              vllm: ServerThread) -> None:
    state = emulator(vllm)
    seen: dict[tuple[int, str], int] = {}
    with ThreadPoolExecutor(12) as pool:
        for mode in sorted(vllm_emulator.FAILURES):
            state.fail(mode, times=6)
            # JSON only: a stream request gets its own check above.
            streams = mode != "garbage"
            bodies = [ask(text=f"{mode} {i}", stream=streams and i % 2 == 0) for i in range(12)]
            for status, ended, seconds in pool.map(lambda b: outcome(gateway, b), bodies):
                assert seconds < READ_TIMEOUT + SLACK, (mode, status, ended, seconds)
                seen[status, ended] = seen.get((status, ended), 0) + 1
            state.fail(None)
    assert seen.pop((200, "ok")) >= 6 * len(vllm_emulator.FAILURES)  # the healthy half
    assert {status for status, _ in seen} <= {200, 500, 502, 504}  # 500: the backend's own
    wait_until(lambda: slot(gateway).in_flight == 0, message="every lease released")
    assert outcome(gateway, ask())[:2] == (200, "ok")


# -- a client that hangs up --------------------------------------------------------------------


class SlowToNotice:
    """ASGI wrapper: the app hears of a client's disconnect only `delay` seconds late, as a real
    inference server does when it notices a cancelled request at its next decoding step."""

    def __init__(self, app: Any, delay: float) -> None:
        self.app = app
        self.delay = delay

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def late() -> dict[str, Any]:
            message = await receive()
            if message["type"] == "http.disconnect":
                await asyncio.sleep(self.delay)
            return message

        await self.app(scope, late, send)


def test_a_hung_up_stream_never_lets_two_models_share_the_gpu(start_server: Any,
                                                              start_gateway: Any) -> None:
    app = ollama_emulator.create_app({"a:7b": 4.0, "b:7b": 4.0}, load_delay=0.01, tokens=20,
                                     token_delay=0.3)
    ollama = start_server(SlowToNotice(app, delay=0.5))
    gateway = start_gateway({
        "swapper": {"mode": "single-active", "model_swap_timeout": 30},
        "batching": {"window_ms": 0, "min_residency_ms": 0},
        "backends": {"ollama": {"kind": "ollama", "base_url": ollama.url}},
        "models": {name: {"path": f"ollama:{name}:7b", "size_gb": 4} for name in "ab"},
    })
    with httpx.stream("POST", gateway.url + CHAT, json=ask("a", stream=True),
                      timeout=30) as response:
        assert next(line for line in response.iter_lines() if line.startswith("data: "))
    # The client of model a is gone, and model b is wanted at once.
    answer = httpx.post(gateway.url + CHAT, json=ask("b", max_tokens=1), timeout=30)
    assert answer.status_code == 200
    state = app.state.emulator
    assert state.max_loaded_bytes <= 4 * 10**9, state.evictions  # decimal gigabytes


class SlowPath:
    """ASGI wrapper: requests to `path` wait `delay` seconds first (a slow load or unload)."""

    def __init__(self, app: Any, path: str, delay: float) -> None:
        self.app = app
        self.path = path
        self.delay = delay

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] == self.path:
            await asyncio.sleep(self.delay)
        await self.app(scope, receive, send)


def test_a_request_during_a_swap_never_takes_residency_over_the_budget(
        start_server: Any, start_gateway: Any) -> None:
    app = ollama_emulator.create_app({"a:7b": 4.0, "b:7b": 4.0, "c:7b": 8.0}, load_delay=0.01,
                                     tokens=10, token_delay=0.1)
    ollama = start_server(SlowPath(app, "/api/generate", delay=0.3))  # loads and unloads
    gateway = start_gateway({
        "swapper": {"mode": "multi-active", "max_concurrent_models": 3, "memory_budget_gb": 8,
                    "model_swap_timeout": 30},
        "batching": {"window_ms": 0, "min_residency_ms": 0},
        "backends": {"ollama": {"kind": "ollama", "base_url": ollama.url}},
        "models": {name: {"path": f"ollama:{name}:7b", "size_gb": size}
                   for name, size in (("a", 4), ("b", 4), ("c", 8))},
    })
    for name in "ab":
        assert httpx.post(gateway.url + CHAT, json=ask(name, max_tokens=1), timeout=30).is_success
    with ThreadPoolExecutor(1) as pool:
        wants_c = pool.submit(httpx.post, gateway.url + CHAT, json=ask("c", max_tokens=1),
                              timeout=30)  # evicts a and b
        wait_until(lambda: model_status(gateway, "a") == "unloading", message="swap under way")
        during = httpx.post(gateway.url + CHAT, json=ask("b"), timeout=30)  # b is a victim
        assert wants_c.result().status_code == 200
    assert during.status_code == 200
    assert app.state.emulator.max_loaded_bytes <= 8 * 10**9
    assert httpx.get(gateway.url + "/status").json()["resident_gb"] <= 8


# -- a model process killed with SIGKILL ------------------------------------------------------


def process_config(cmd: str) -> dict[str, Any]:
    return {
        "swapper": {"model_swap_timeout": 30},
        "batching": {"window_ms": 0, "min_residency_ms": 0},
        "backends": {"local": {"kind": "process", "cmd": cmd, "env": {"PYTHONPATH": str(ROOT)},
                               "start_timeout": 20, "stop_grace": 2}},
        "models": {"p1": {"backend": "local", "served_name": "org/p1"}},
    }


EMULATOR_CMD = (f"{shlex.quote(sys.executable)} -m tests.emulators.openai_server "
                "--port {port} --model {served_name} --tokens 200 --token-delay 0.02")


def model_pid(gateway: ServerThread, model: str = "p1") -> int:
    driver = gateway.app.state.services.drivers["local"]  # type: ignore[attr-defined]
    return int(driver._processes[model].pid)


def model_status(gateway: ServerThread, model: str = "p1") -> str:
    return str(httpx.get(f"{gateway.url}/models/{model}").json()["state"])


def test_killed_model_process_fails_the_stream_then_reloads(start_gateway: Any) -> None:
    gateway = start_gateway(process_config(EMULATOR_CMD))
    with httpx.stream("POST", gateway.url + CHAT, json=ask("p1", stream=True),
                      timeout=30) as response:
        lines = response.iter_lines()
        assert next(line for line in lines if line.startswith("data: "))  # it is streaming
        pid = model_pid(gateway)
        os.kill(pid, signal.SIGKILL)
        rest = [line.removeprefix("data: ") for line in lines if line.startswith("data: ")]
    assert rest and "[DONE]" not in rest
    assert error_of(rest[-1])["code"] == "backend_error"
    wait_until(lambda: model_status(gateway) == "failed", message="model marked failed")
    assert "signal 9" in httpx.get(gateway.url + "/models/p1").json()["error"]
    assert slot(gateway, "p1").in_flight == 0
    answer = httpx.post(gateway.url + CHAT, json=ask("p1", max_tokens=2), timeout=30)
    assert answer.status_code == 200 and answer.json()["model"] == "p1"
    assert model_pid(gateway) != pid
    assert httpx.get(gateway.url + "/models/p1").json()["load_count"] == 2


def test_a_request_just_after_the_process_died_is_not_a_crash(start_gateway: Any) -> None:
    # A grandchild in its own session keeps the output pipe open, so the driver takes its full
    # drain timeout to report the death: the gateway still believes the model loaded meanwhile.
    inner = EMULATOR_CMD.replace("{port}", "$0").replace("{served_name}", "$1")
    cmd = "sh -c " + shlex.quote(f"setsid sleep 2 & exec {inner}") + " {port} {served_name}"
    gateway = start_gateway(process_config(cmd))
    assert httpx.post(gateway.url + CHAT, json=ask("p1", max_tokens=1), timeout=30).is_success
    pid = model_pid(gateway)
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: reaped(pid), message="process reaped")
    response = httpx.post(gateway.url + CHAT, json=ask("p1", max_tokens=1), timeout=30)
    assert response.status_code != 500, response.text
    wait_until(lambda: model_status(gateway) != "loaded", message="death noticed")
    wait_until(lambda: slot(gateway, "p1").in_flight == 0, timeout=3, message="no lease leaked")


# -- Redis going away -------------------------------------------------------------------------


@pytest.fixture
def cached_gateway(start_gateway: Any, own_redis: RedisServer,
                   start_server: Any) -> ServerThread:
    backend = start_server(vllm_emulator.create_app(["org/m1"], tokens=4))
    return start_gateway(static_config(backend.url, cache={"redis_url": own_redis.url}))


@pytest.mark.parametrize("outage", ["stopped", "paused"])
def test_redis_going_away_under_load_loses_no_request(cached_gateway: ServerThread,
                                                      own_redis: RedisServer,
                                                      outage: str) -> None:
    questions = [ask(text=f"question {i % 10}", temperature=0) for i in range(200)]

    def post(body: dict[str, Any]) -> tuple[int, str]:
        response = httpx.post(cached_gateway.url + CHAT, json=body, timeout=10)
        return response.status_code, response.headers.get("x-cache", "")

    wait_until(lambda: post(questions[0]) == (200, "HIT"), message="the cache in use")
    with ThreadPoolExecutor(16) as pool:
        answers = pool.map(post, questions)  # under way while Redis goes
        own_redis.stop() if outage == "stopped" else own_redis.pause()
        statuses = [status for status, _ in answers]
    assert statuses == [200] * len(questions)
    stats = cached_gateway.app.state.services.cache.store.stats  # type: ignore[attr-defined]
    wait_until(lambda: stats.outages >= 1, message="the outage noticed")
    late = [post(body) for body in questions[:20]]
    assert late == [(200, "MISS")] * 20  # served fresh, without the cache
