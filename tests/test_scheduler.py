"""Residency end to end: swaps on demand, queueing while loading, eviction without cutting
streams, bounded queues, failures, idle TTL and the backends' truth, all through real sockets."""

from __future__ import annotations

import random
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import openai
import pytest

from tests.emulators import ollama as ollama_emulator
from tests.servers import emulator, wait_until

GB = 1024**3


def ask(model: str, text: str = "hello") -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": text}]}


def services(gateway: Any) -> Any:
    return gateway.app.state.services


def three_models(ollama_url: str, **swapper: Any) -> dict[str, Any]:
    return {
        "swapper": {"mode": "single-active", "model_swap_timeout": 30, **swapper},
        "server": {"heartbeat_s": 0.05},
        "batching": {"window_ms": 20, "min_residency_ms": 50, "max_wait_ms": 5000},
        "backends": {"ollama": {"kind": "ollama", "base_url": ollama_url}},
        "models": {name: {"path": f"ollama:{name}:7b", "size_gb": 4} for name in "abc"},
    }


@pytest.fixture
def ollama(start_server: Any) -> Any:
    models = {f"{name}:7b": 4.0 for name in "abc"}
    return start_server(ollama_emulator.create_app(models, load_delay=0.05, tokens=4))


def test_fifty_clients_three_models_single_active(start_gateway: Any, ollama: Any) -> None:
    gateway = start_gateway(three_models(ollama.url))
    rng = random.Random(7)
    plan = [rng.choice("abc") for _ in range(50)]
    with httpx.Client(base_url=gateway.url, timeout=60) as http, ThreadPoolExecutor(50) as pool:
        results = list(pool.map(
            lambda m: http.post("/v1/chat/completions", json=ask(m)), plan))
    assert [r.status_code for r in results] == [200] * 50
    assert [r.json()["model"] for r in results] == plan
    state = emulator(ollama)
    assert state.max_loaded_bytes <= 4 * GB  # never two models resident at once
    slots = services(gateway).scheduler.slots
    # Every load the backend did was one the gateway asked for: no implicit or double loads.
    assert sum(state.load_count.values()) == sum(s.residency.load_count for s in slots.values())
    assert sum(s.request_count for s in slots.values()) == 50
    assert state.unloads_while_busy == 0


def test_eviction_waits_for_a_running_stream(start_gateway: Any, start_server: Any) -> None:
    slow = start_server(ollama_emulator.create_app(
        {"a:7b": 4.0, "b:7b": 4.0}, load_delay=0.05, tokens=40, token_delay=0.01))
    gateway = start_gateway(three_models(slow.url) | {
        "models": {n: {"path": f"ollama:{n}:7b", "size_gb": 4} for n in "ab"}})
    client = openai.OpenAI(base_url=gateway.url + "/v1", api_key="x", max_retries=0)
    stream = client.chat.completions.create(model="a", messages=ask("a")["messages"],
                                            stream=True)
    first = next(iter(stream))
    swap = threading.Thread(target=lambda: client.chat.completions.create(
        model="b", messages=ask("b")["messages"]))
    swap.start()
    rest = list(stream)
    swap.join(30)
    assert first.choices and rest[-1].choices[0].finish_reason == "stop"
    assert len(rest) >= 40  # the whole answer arrived
    state = emulator(slow)
    assert state.unloads_while_busy == 0
    assert state.load_count["b:7b"] == 1 and state.loaded == frozenset({"b:7b"})


def test_streaming_client_gets_loading_comments_while_waiting(start_gateway: Any,
                                                              start_server: Any) -> None:
    slow = start_server(ollama_emulator.create_app({"a:7b": 4.0}, load_delay=0.4))
    gateway = start_gateway(three_models(slow.url) | {
        "server": {"heartbeat_s": 0.05, "stream_hold_s": 0.1},
        "models": {"a": {"path": "ollama:a:7b", "size_gb": 4}}})
    body = ask("a") | {"stream": True}
    with httpx.stream("POST", gateway.url + "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200
        lines = list(response.iter_lines())
    comments = [line for line in lines if line.startswith(":")]
    assert comments and comments[0] == ": loading a (0 s)"  # after the status line's hold
    assert lines.index(comments[-1]) < lines.index(next(x for x in lines if x.startswith("data")))
    assert lines[-2:] == ["data: [DONE]", ""] or lines[-1] == "data: [DONE]"
    # The official client ignores the comments.
    client = openai.OpenAI(base_url=gateway.url + "/v1", api_key="x", max_retries=0)
    services(gateway).scheduler  # noqa: B018 - same gateway, model now loaded
    text = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model="a", messages=ask("a")["messages"], stream=True) if c.choices)
    assert text


def test_full_queue_is_429_with_retry_after(start_gateway: Any, start_server: Any) -> None:
    slow = start_server(ollama_emulator.create_app({"a:7b": 4.0}, load_delay=1.0))
    gateway = start_gateway(three_models(slow.url, max_queue_per_model=2) | {
        "models": {"a": {"path": "ollama:a:7b", "size_gb": 4}}})
    with httpx.Client(base_url=gateway.url, timeout=30) as http, ThreadPoolExecutor(5) as pool:
        results = list(pool.map(lambda _: http.post("/v1/chat/completions", json=ask("a")),
                                range(5)))
    statuses = sorted(r.status_code for r in results)
    assert statuses == [200, 200, 429, 429, 429]
    refused = next(r for r in results if r.status_code == 429)
    assert refused.headers["retry-after"] and refused.json()["error"]["code"] == "queue_full"
    assert refused.json()["error"]["type"] == "rate_limit_error"


def test_swap_timeout_is_503_with_retry_headers(start_gateway: Any, start_server: Any) -> None:
    slow = start_server(ollama_emulator.create_app({"a:7b": 4.0}, load_delay=1.5))
    gateway = start_gateway(three_models(slow.url) | {
        "models": {"a": {"path": "ollama:a:7b", "size_gb": 4}}})
    response = httpx.post(gateway.url + "/v1/chat/completions", json=ask("a"),
                          headers={"x-swap-timeout": "0.2"}, timeout=10)
    assert response.status_code == 503
    assert response.headers["retry-after"] and response.headers["x-should-retry"] == "true"
    assert response.json()["error"]["code"] == "model_swap_timeout"
    # The load goes on and the model serves the next request.
    wait_until(lambda: "a:7b" in emulator(slow).loaded, message="model a loaded")
    assert httpx.post(gateway.url + "/v1/chat/completions", json=ask("a")).status_code == 200


def test_failed_load_answers_503_naming_the_cause_and_backs_off(start_gateway: Any,
                                                               ollama: Any) -> None:
    emulator(ollama).load_errors["a:7b"] = "model requires more system memory (64 GiB)"
    gateway = start_gateway(three_models(ollama.url))
    first = httpx.post(gateway.url + "/v1/chat/completions", json=ask("a"), timeout=10)
    assert first.status_code == 503
    assert "more system memory" in first.json()["error"]["message"]
    assert first.json()["error"]["code"] == "model_load_failed"
    again = httpx.post(gateway.url + "/v1/chat/completions", json=ask("a"), timeout=10)
    assert again.status_code == 503 and int(again.headers["retry-after"]) >= 1
    assert emulator(ollama).load_count["a:7b"] == 0  # refused at once during the backoff
    status = httpx.get(gateway.url + "/models/a").json()
    assert status["status"] == "unloaded"  # the old service knew no "failed"
    assert status["state"] == "failed" and "more system memory" in status["error"]
    assert status["failures"] == 1 and status["retry_at"] is not None
    # Nothing is wedged: the other models still serve.
    assert httpx.post(gateway.url + "/v1/chat/completions", json=ask("b")).status_code == 200


def test_the_back_off_grows_in_status_and_the_drivers_detail_is_for_admins_only(
        start_gateway: Any, ollama: Any) -> None:
    emulator(ollama).load_errors["a:7b"] = "model requires more system memory (64 GiB)"
    config = three_models(ollama.url) | {"auth": {"keys": [
        {"name": "ops", "key": "admin-key", "admin": True},
        {"name": "team", "key": "team-key"}]}}
    gateway = start_gateway(config)
    scheduler = services(gateway).scheduler
    slot = scheduler.slots["a"]
    # No kept-alive connection across the 5 s back-off: uvicorn closes idle ones after 5 s.
    with httpx.Client(base_url=gateway.url, timeout=10, headers={
            "authorization": "Bearer team-key"},
            limits=httpx.Limits(max_keepalive_connections=0)) as team:
        retries = []
        for attempt in (1, 2):
            wait_until(lambda: slot.residency.may_load(scheduler.clock()), timeout=15,
                       message="the back-off to pass")
            assert team.post("/v1/chat/completions", json=ask("a")).status_code == 503
            shown = team.get("/status").json()["models"]["a"]
            assert shown["failures"] == attempt and "error_detail" not in shown
            retries.append(slot.residency.retry_at - scheduler.clock())
    assert retries[1] > retries[0] * 1.5  # each failure doubles the wait (5 s, then 10 s)
    admin = httpx.get(gateway.url + "/status", headers={"authorization": "Bearer admin-key"})
    assert "error_detail" in admin.json()["models"]["a"]


def test_model_evicted_by_the_backend_is_noticed_and_reloaded(start_gateway: Any,
                                                             ollama: Any) -> None:
    gateway = start_gateway(three_models(ollama.url))
    assert httpx.post(gateway.url + "/v1/chat/completions", json=ask("a")).status_code == 200
    scheduler = services(gateway).scheduler
    emulator(ollama).evict("a:7b")
    gateway.call(scheduler.reconcile())
    assert httpx.get(gateway.url + "/models/a").json()["status"] == "unloaded"
    assert httpx.post(gateway.url + "/v1/chat/completions", json=ask("a")).status_code == 200
    assert emulator(ollama).load_count["a:7b"] == 2


def test_model_loaded_behind_the_gateways_back_is_found(start_gateway: Any, ollama: Any) -> None:
    httpx.post(ollama.url + "/api/generate", json={"model": "b:7b", "keep_alive": -1})
    gateway = start_gateway(three_models(ollama.url))  # reconciles at start
    assert httpx.get(gateway.url + "/models/b").json()["status"] == "loaded"


def test_idle_model_unloads_after_its_ttl(start_gateway: Any, ollama: Any) -> None:
    config = three_models(ollama.url)
    config["models"]["a"]["ttl"] = 0.3
    gateway = start_gateway(config)
    assert httpx.post(gateway.url + "/v1/chat/completions", json=ask("a")).status_code == 200
    wait_until(lambda: "a:7b" not in emulator(ollama).loaded, message="idle unload")
    assert httpx.get(gateway.url + "/models/a").json()["status"] == "unloaded"


def test_answers_on_a_loaded_model_take_no_decision_rounds(start_gateway: Any,
                                                           ollama: Any) -> None:
    """With nothing waiting, a request's end changes no plan: the scheduler does not plan
    again after each answer (it did, over every model, for every request on an idle gateway)."""
    gateway = start_gateway(three_models(ollama.url))
    scheduler = services(gateway).scheduler
    with httpx.Client(base_url=gateway.url, timeout=30) as client:
        assert client.post("/v1/chat/completions", json=ask("a")).status_code == 200
        steps = scheduler.steps
        for _ in range(30):
            assert client.post("/v1/chat/completions", json=ask("a")).status_code == 200
    assert scheduler.steps - steps < 10  # one a request before: 30
    answer = httpx.post(gateway.url + "/v1/chat/completions", json=ask("b"), timeout=30)
    assert answer.status_code == 200  # a swap still gets its decisions


def test_default_model_is_loaded_at_start(start_gateway: Any, ollama: Any) -> None:
    gateway = start_gateway(three_models(ollama.url, default_model="c"))
    wait_until(lambda: emulator(ollama).loaded == frozenset({"c:7b"}), message="preload")
    wait_until(lambda: httpx.get(gateway.url + "/status").json()["active_model"] == "c",
               message="status shows c")


def test_multi_active_keeps_the_memory_budget(start_gateway: Any, ollama: Any) -> None:
    config = three_models(ollama.url, mode="multi-active", max_concurrent_models=3,
                          memory_budget_gb=8)
    gateway = start_gateway(config)
    for name in "abcab":
        assert httpx.post(gateway.url + "/v1/chat/completions",
                          json=ask(name)).status_code == 200
    assert emulator(ollama).max_loaded_bytes <= 8 * GB
    assert len(httpx.get(gateway.url + "/status").json()["loaded_models"]) == 2


def test_batching_window_serves_interleaved_traffic_with_few_swaps(start_gateway: Any,
                                                                   start_server: Any) -> None:
    slow = start_server(ollama_emulator.create_app(
        {f"{n}:7b": 4.0 for n in "abc"}, load_delay=0.2, tokens=5, token_delay=0.01))
    config = three_models(slow.url)
    config["batching"] = {"window_ms": 400, "min_residency_ms": 400, "max_wait_ms": 20000}
    gateway = start_gateway(config)
    trace = list("abc" * 8)  # every request changes the model: 23 changes in arrival order
    with httpx.Client(base_url=gateway.url, timeout=60) as http, ThreadPoolExecutor(24) as pool:
        futures = []
        for name in trace:  # paced arrivals, as a trace replays them
            futures.append(pool.submit(http.post, "/v1/chat/completions", json=ask(name)))
            threading.Event().wait(0.02)
        results = [f.result() for f in futures]
    assert [r.status_code for r in results] == [200] * len(trace)
    loads = sum(emulator(slow).load_count.values())
    assert loads <= 6, f"{loads} loads for {len(trace) - 1} changes of model"
    decisions = httpx.get(gateway.url + "/status").json()["decisions"]
    load_decisions = [d for d in decisions if d["action"] == "load"]
    assert len(load_decisions) == loads and all(d["waiting"] >= 1 for d in load_decisions)
    assert all(d["reason"] for d in load_decisions)
    assert sum(d["served"] for d in load_decisions) == len(trace)  # every request, once


def test_per_model_concurrency_limit_queues_the_rest(start_gateway: Any,
                                                    start_server: Any) -> None:
    from tests.emulators import openai_server as vllm_emulator

    slow = start_server(vllm_emulator.create_app(["org/m1"], tokens=20, token_delay=0.01))
    gateway = start_gateway({
        "backends": {"vllm": {"kind": "openai", "base_url": slow.url}},
        "models": {"m1": {"backend": "vllm", "served_name": "org/m1", "max_concurrent": 2}},
    })
    state = emulator(slow)
    peak = []
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            peak.append(state.in_flight)
            stop.wait(0.002)

    watcher = threading.Thread(target=watch)
    watcher.start()
    with httpx.Client(base_url=gateway.url, timeout=30) as http, ThreadPoolExecutor(6) as pool:
        results = list(pool.map(lambda i: http.post("/v1/chat/completions",
                                                     json=ask("m1", f"q{i}")), range(6)))
    stop.set()
    watcher.join()
    assert [r.status_code for r in results] == [200] * 6
    assert max(peak) == 2


def test_requests_cannot_change_ollamas_context_size(start_gateway: Any, ollama: Any) -> None:
    gateway = start_gateway(three_models(ollama.url))
    body = ask("a") | {"options": {"num_ctx": 65536}, "num_ctx": 65536}
    assert httpx.post(gateway.url + "/v1/chat/completions", json=body).status_code == 200
    upstream = emulator(ollama).last_request
    assert "options" not in upstream and "num_ctx" not in upstream
