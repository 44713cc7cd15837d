"""A call's way from admission to its end, one regression test per defect the request-lifecycle
issue found: nothing waits forever, nothing spins, nothing is told to retry what cannot work."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import openai
import orjson
import pytest

from gateway.config.reader import parse_config
from gateway.config.schema import ConfigError
from tests.emulators import ollama as ollama_emulator
from tests.emulators import openai_server as vllm_emulator
from tests.servers import emulator, wait_until
from tests.test_config import _cli

CHAT = [{"role": "user", "content": "Say something."}]


def services(gateway: Any) -> Any:
    return gateway.app.state.services


def leases_in_flight(gateway: Any) -> int:
    return sum(slot.in_flight for slot in services(gateway).scheduler.slots.values())


def vllm_gateway(start_gateway: Any, upstream: Any, **extra: Any) -> Any:
    return start_gateway({
        "server": {"heartbeat_s": 0.05},
        "backends": {"vllm": {"kind": "openai", "base_url": upstream.url}},
        "models": {"m1": {"backend": "vllm", "served_name": "org/m1"},
                   "e1": {"backend": "vllm", "served_name": "org/e1", "type": "embedding"}},
        **extra,
    })


def ollama_config(url: str, **swapper: Any) -> dict[str, Any]:
    return {
        "swapper": {"mode": "single-active", "model_swap_timeout": 30, **swapper},
        "server": {"heartbeat_s": 0.05},
        "batching": {"window_ms": 0, "min_residency_ms": 0},
        "backends": {"ollama": {"kind": "ollama", "base_url": url}},
        "models": {"a": {"path": "ollama:a:7b", "size_gb": 4, "aliases": ["alpha"]}},
    }


# 1. A stream answered with JSON settles its leadership ------------------------------------------

def test_streamed_embeddings_are_refused_and_the_same_call_still_answers(
        start_gateway: Any, start_server: Any) -> None:
    upstream = start_server(vllm_emulator.create_app(["org/e1"], embedding=True))
    gateway = vllm_gateway(start_gateway, upstream)
    body = {"model": "e1", "input": "hello"}
    with httpx.Client(base_url=gateway.url, timeout=10) as http:
        refused = http.post("/v1/embeddings", json={**body, "stream": True})
        answered = http.post("/v1/embeddings", json=body)
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "stream"
    assert answered.status_code == 200 and len(answered.json()["data"]) == 1


def test_identical_call_after_a_stream_answered_with_json_is_answered(
        start_gateway: Any, start_server: Any) -> None:
    upstream = start_server(vllm_emulator.create_app(["org/m1"]))
    gateway = vllm_gateway(start_gateway, upstream)
    emulator(upstream).fail("ignore_stream", times=1)
    body = {"model": "m1", "messages": CHAT, "temperature": 0}
    with httpx.Client(base_url=gateway.url, timeout=10) as http:
        first = http.post("/v1/chat/completions", json={**body, "stream": True})
        again = http.post("/v1/chat/completions", json=body)
    assert first.headers["content-type"].startswith("application/json")
    assert again.status_code == 200
    assert again.json()["choices"][0]["message"] == first.json()["choices"][0]["message"]
    assert len(services(gateway).coalescer) == 0


# 2. No spin while a model with a ttl is kept busy past it ---------------------------------------

def test_a_stream_longer_than_the_ttl_does_not_spin_the_scheduler(
        start_gateway: Any, start_server: Any) -> None:
    slow = start_server(ollama_emulator.create_app(
        {"a:7b": 4.0}, load_delay=0.01, tokens=30, token_delay=0.02))
    config = ollama_config(slow.url)
    config["models"]["a"]["ttl"] = 0.05
    gateway = start_gateway(config)
    scheduler = services(gateway).scheduler
    body = {"model": "a", "messages": CHAT, "stream": True}
    with httpx.stream("POST", gateway.url + "/v1/chat/completions", json=body,
                      timeout=10) as response:
        lines = response.iter_lines()
        next(lines)
        steps = scheduler.steps
        rest = list(lines)  # 0.6 s of stream: twelve ttls long
    assert rest[-1] == "data: [DONE]" or rest[-2] == "data: [DONE]"
    assert scheduler.steps - steps < 10  # a spin takes thousands of steps in that time
    wait_until(lambda: scheduler.slots["a"].residency.state.value == "unloaded",
               message="the idle ttl unloading it once the stream ended")


# 3. A stream follower's own call gives its lease back -------------------------------------------

def test_a_stream_follower_whose_leader_fails_leaves_no_lease(
        start_gateway: Any, start_server: Any) -> None:
    upstream = start_server(vllm_emulator.create_app(["org/m1"], first_byte_delay=0.3))
    gateway = vllm_gateway(start_gateway, upstream)
    emulator(upstream).fail("slow_first_byte", times=1)
    body = {"model": "m1", "messages": CHAT, "temperature": 0, "stream": True}
    gave_up: list[Exception] = []

    def lead() -> None:
        try:
            httpx.post(gateway.url + "/v1/chat/completions", json=body, timeout=0.15)
        except httpx.ReadTimeout as exc:
            gave_up.append(exc)

    leader = threading.Thread(target=lead)
    leader.start()  # its client gives up before the first byte: no answer for the followers
    wait_until(lambda: len(services(gateway).coalescer) == 1, message="the leader in flight")
    with httpx.stream("POST", gateway.url + "/v1/chat/completions", json=body,
                      timeout=10) as follower:
        assert follower.headers["x-coalesced"] == "true"
        lines = follower.iter_lines()
        assert next(lines).startswith(": waiting for m1")
        # The leader failed: the follower makes its own call, and its client leaves just then.
        assert next(line for line in lines if line and not line.startswith(": waiting"))
    leader.join()
    assert gave_up  # the leader's client did leave first
    wait_until(lambda: leases_in_flight(gateway) == 0, message="every lease given back")
    assert len(services(gateway).coalescer) == 0


# 4. Batched embeddings always end -----------------------------------------------------------------

@pytest.mark.parametrize("mode", ["malformed", "odd_embeddings"])
def test_batched_embedding_clients_get_an_error_for_an_answer_that_cannot_be_split(
        start_gateway: Any, start_server: Any, mode: str) -> None:
    upstream = start_server(vllm_emulator.create_app(["org/e1"], embedding=True))
    gateway = vllm_gateway(start_gateway, upstream,
                           batching={"embeddings_window_ms": 5000, "embeddings_max_inputs": 3})
    emulator(upstream).fail(mode, times=1)
    with ThreadPoolExecutor(3) as pool:
        answers = list(pool.map(lambda i: httpx.post(
            gateway.url + "/v1/embeddings", json={"model": "e1", "input": f"text {i}"},
            timeout=10), range(3)))
    assert [a.status_code for a in answers] == [502] * 3
    assert {a.json()["error"]["code"] for a in answers} == {"backend_invalid_response"}
    assert leases_in_flight(gateway) == 0


# 5. A request's wait is not the load's deadline ------------------------------------------------

def test_a_swap_timeout_leaves_the_load_running_to_success(start_gateway: Any,
                                                           start_server: Any) -> None:
    slow = start_server(ollama_emulator.create_app({"a:7b": 4.0}, load_delay=0.6))
    gateway = start_gateway(ollama_config(slow.url, model_swap_timeout=0.2))
    answer = httpx.post(gateway.url + "/v1/chat/completions",
                        json={"model": "a", "messages": CHAT}, timeout=10)
    assert answer.status_code == 503
    assert answer.json()["error"]["code"] == "model_swap_timeout"
    residency = services(gateway).scheduler.slots["a"].residency
    wait_until(lambda: residency.state.value != "loading", message="the load to end")
    assert (residency.state.value, residency.load_count, residency.error) == ("loaded", 1, None)


# 6. What can never fit is refused when the config is read -----------------------------------------

def test_a_model_larger_than_the_budget_is_refused_by_the_config(tmp_path: Any) -> None:
    config = {"swapper": {"mode": "multi-active", "memory_budget_gb": 20},
              "models": {"big": {"path": "ollama:big:70b", "size_gb": 42}}}
    with pytest.raises(ConfigError, match=r"models\.big\.size_gb.*42 GB does not fit"):
        parse_config(config, env={})
    path = tmp_path / "config.yaml"
    path.write_bytes(orjson.dumps(config))  # JSON is YAML
    result = _cli("check-config", str(path))
    assert result.returncode != 0 and "does not fit" in result.stdout + result.stderr


# 7. default_model may be an alias ----------------------------------------------------------------

def test_default_model_given_as_an_alias_is_loaded_at_start(start_gateway: Any,
                                                            start_server: Any) -> None:
    ollama = start_server(ollama_emulator.create_app({"a:7b": 4.0}, load_delay=0.01))
    gateway = start_gateway(ollama_config(ollama.url, default_model="alpha"))
    slot = services(gateway).scheduler.slots["a"]
    wait_until(lambda: slot.residency.state.value == "loaded", message="the preload")
    assert slot.request_count == 0  # 11: a preload is no API call


# 8. Usage is kept even when the client did not ask for it -----------------------------------------

def test_usage_is_stored_from_a_stream_whose_client_did_not_ask_for_it(
        start_gateway: Any, start_server: Any) -> None:
    upstream = start_server(vllm_emulator.create_app(["org/m1"]))
    gateway = vllm_gateway(start_gateway, upstream)
    client = openai.OpenAI(base_url=gateway.url + "/v1", api_key="x", max_retries=0)
    asked = {"model": "m1", "messages": CHAT, "temperature": 0}
    chunks = list(client.chat.completions.create(**asked, stream=True))
    assert all(chunk.choices for chunk in chunks)  # no usage-only chunk it did not ask for
    assert emulator(upstream).last_request["stream_options"] == {"include_usage": True}
    replayed = client.chat.completions.with_raw_response.create(**asked)
    assert replayed.headers["x-cache"] == "HIT"
    usage = replayed.parse().usage
    assert usage is not None and usage.completion_tokens > 0
    streamed = list(client.chat.completions.create(
        **asked, stream=True, stream_options={"include_usage": True}))
    assert streamed[-1].choices == [] and streamed[-1].usage == usage


# 9. Retry-After from the expected wait, spread out ----------------------------------------------

def test_queue_full_says_when_to_come_back_and_spreads_clients(start_gateway: Any,
                                                               start_server: Any) -> None:
    slow = start_server(ollama_emulator.create_app({"a:7b": 4.0}, load_delay=1.0))
    gateway = start_gateway(ollama_config(slow.url, max_queue_per_model=1))
    waiting = threading.Thread(target=lambda: httpx.post(
        gateway.url + "/v1/chat/completions", json={"model": "a", "messages": CHAT}, timeout=10))
    waiting.start()
    slot = services(gateway).scheduler.slots["a"]
    wait_until(lambda: slot.queue or slot.in_flight, message="the first request queued")
    refused = [httpx.post(gateway.url + "/v1/chat/completions",
                          json={"model": "a", "messages": CHAT}, timeout=10) for _ in range(5)]
    waiting.join()
    assert {r.status_code for r in refused} == {429}
    waits_ms = [int(r.headers["retry-after-ms"]) for r in refused]
    assert all(int(r.headers["retry-after"]) >= 1 for r in refused)
    assert min(waits_ms) >= 400  # most of the 1 s load (its estimate) is still ahead
    assert len(set(waits_ms)) > 1  # jittered: the clients do not come back in lockstep


# 10. A stream whose model loads slower than the swap timeout still ends in an answer --------------

@pytest.mark.parametrize("stream", [False, True])
def test_the_sdk_gets_an_answer_when_the_load_outlasts_the_swap_timeout(
        start_gateway: Any, start_server: Any, stream: bool) -> None:
    slow = start_server(ollama_emulator.create_app({"a:7b": 4.0}, load_delay=1.5, tokens=4))
    gateway = start_gateway(ollama_config(slow.url, model_swap_timeout=0.5))
    client = openai.OpenAI(base_url=gateway.url + "/v1", api_key="x", max_retries=2)
    started = time.monotonic()
    if stream:
        chunks = client.chat.completions.create(model="a", messages=CHAT, stream=True)
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    else:
        answer = client.chat.completions.create(model="a", messages=CHAT)
        text = answer.choices[0].message.content or ""
    assert text and time.monotonic() - started >= 1.5
    assert services(gateway).scheduler.slots["a"].residency.load_count == 1


def test_a_long_load_starts_the_stream_and_keeps_it_to_the_answer(
        start_gateway: Any, start_server: Any) -> None:
    slow = start_server(ollama_emulator.create_app({"a:7b": 4.0}, load_delay=0.8, tokens=4))
    config = ollama_config(slow.url, model_swap_timeout=0.5)
    config["server"]["stream_hold_s"] = 0.1
    gateway = start_gateway(config)
    body = {"model": "a", "messages": CHAT, "stream": True}
    with httpx.stream("POST", gateway.url + "/v1/chat/completions", json=body,
                      timeout=10) as response:
        lines = list(response.iter_lines())
    assert response.status_code == 200 and lines[0].startswith(": loading a")
    assert "data: [DONE]" in lines and not any('"error"' in line for line in lines)


# 11 and 12. request_count counts API calls; time to first byte is the backend's -------------------

def test_admin_loads_are_not_requests_and_ttfb_is_measured_at_the_first_upstream_byte(
        start_gateway: Any, start_server: Any) -> None:
    slow = start_server(ollama_emulator.create_app({"a:7b": 4.0}, load_delay=0.4))
    config = ollama_config(slow.url)
    config["server"]["stream_hold_s"] = 0
    gateway = start_gateway(config)
    with httpx.Client(base_url=gateway.url, timeout=10) as http:
        assert http.post("/models/a/load").status_code == 200
        assert http.post("/models/a/unload").status_code == 200
        assert http.get("/metrics/a").json()["request_count"] == 0
        lines = http.post("/v1/chat/completions", json={
            "model": "a", "messages": CHAT, "stream": True}).text.splitlines()
        assert lines[0].startswith(": loading a")
        assert http.get("/metrics/a").json()["request_count"] == 1
        prometheus = http.get("/metrics", headers={"accept": "text/plain"}).text
    ttfb_sum = next(float(line.split()[-1]) for line in prometheus.splitlines()
                    if line.startswith("swapper_time_to_first_byte_seconds_sum"))
    assert ttfb_sum >= 0.4  # after the load, not at the first `: loading` comment
