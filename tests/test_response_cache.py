"""The response cache through the whole gateway: replay either way, no swap on a hit, Redis."""

from __future__ import annotations

import uuid
from typing import Any

import httpx
import openai
import pytest
import redis

from policies.caching import MAX_TTL_S
from tests.emulators import ollama as ollama_emulator
from tests.emulators import openai_server as vllm_emulator
from tests.servers import emulator

MESSAGES = [{"role": "user", "content": "Tell me about caching."}]
TOOLS = [{"type": "function", "function": {
    "name": "lookup", "parameters": {"type": "object", "properties": {"q": {"type": "string"}}}}}]


def config(vllm_url: str, served: str = "org/m1", **cache: Any) -> dict[str, Any]:
    return {
        "backends": {"vllm": {"kind": "openai", "base_url": vllm_url}},
        "models": {"m1": {"backend": "vllm", "served_name": served, "aliases": ["one"]}},
        "cache": cache,
    }


@pytest.fixture
def vllm(start_server: Any) -> Any:
    return start_server(vllm_emulator.create_app(["org/m1"], tokens=6))


@pytest.fixture(params=["memory", "redis"])
def gateway(request: Any, start_gateway: Any, vllm: Any) -> Any:
    cache = {"redis_url": request.getfixturevalue("redis_url")} if request.param == "redis" else {}
    return start_gateway(config(vllm.url, namespace=f"t{id(request)}", **cache))


def client(gateway: Any) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway.url + "/v1", api_key="x", max_retries=0)


def post(gateway: Any, body: dict[str, Any], **headers: str) -> httpx.Response:
    return httpx.post(gateway.url + "/v1/chat/completions", json=body, headers=headers)


def test_deterministic_repeat_is_served_from_the_cache(gateway: Any, vllm: Any) -> None:
    body = {"model": "m1", "messages": MESSAGES, "temperature": 0}
    first, second = post(gateway, body), post(gateway, body)
    assert (first.headers["x-cache"], second.headers["x-cache"]) == ("MISS", "HIT")
    assert first.json() == second.json()
    assert emulator(vllm).requests["org/m1"] == 1
    # An alias resolves to the same model, so to the same entry; the name is the one asked for.
    aliased = post(gateway, body | {"model": "one"})
    assert aliased.headers["x-cache"] == "HIT" and aliased.json()["model"] == "one"


def test_stream_then_json_replay_field_by_field(gateway: Any, vllm: Any) -> None:
    c = client(gateway)
    chunks = list(c.chat.completions.create(
        model="m1", messages=MESSAGES, seed=7, stream=True,
        stream_options={"include_usage": True}))
    streamed_text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    raw = c.chat.completions.with_raw_response.create(model="m1", messages=MESSAGES, seed=7)
    assert raw.headers["x-cache"] == "HIT"
    replayed = raw.parse()
    assert replayed.choices[0].message.content == streamed_text
    assert replayed.choices[0].finish_reason == "stop"
    assert replayed.usage == chunks[-1].usage
    assert replayed.id == chunks[0].id and replayed.model == "m1"
    assert emulator(vllm).requests["org/m1"] == 1


def test_json_then_stream_replay_field_by_field(gateway: Any, vllm: Any) -> None:
    c = client(gateway)
    original = c.chat.completions.create(model="m1", messages=MESSAGES, temperature=0)
    chunks = list(c.chat.completions.create(
        model="m1", messages=MESSAGES, temperature=0, stream=True,
        stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == original.choices[0].message.content
    finish = [ch.choices[0].finish_reason for ch in chunks if ch.choices]
    assert finish[-1] == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage == original.usage
    assert emulator(vllm).requests["org/m1"] == 1


def test_tool_calls_replay_from_a_stream(gateway: Any, vllm: Any) -> None:
    c = client(gateway)
    streamed = list(c.chat.completions.create(model="m1", messages=MESSAGES, temperature=0,
                                              tools=TOOLS, stream=True))  # type: ignore[arg-type]
    name = "".join(ch.choices[0].delta.tool_calls[0].function.name or ""
                   for ch in streamed if ch.choices and ch.choices[0].delta.tool_calls)
    replayed = c.chat.completions.create(model="m1", messages=MESSAGES, temperature=0,
                                         tools=TOOLS)  # type: ignore[arg-type]
    call = replayed.choices[0].message.tool_calls[0]
    assert call.function.name == name == "lookup"
    assert replayed.choices[0].finish_reason == "tool_calls"
    assert emulator(vllm).requests["org/m1"] == 1


def test_sampled_requests_bypass_and_headers_opt_out(gateway: Any, vllm: Any) -> None:
    sampled = {"model": "m1", "messages": MESSAGES, "temperature": 0.8}
    assert post(gateway, sampled).headers["x-cache"] == "BYPASS"
    assert post(gateway, sampled).headers["x-cache"] == "BYPASS"
    fixed = {"model": "m1", "messages": MESSAGES, "temperature": 0}
    assert post(gateway, fixed, **{"cache-control": "no-store"}).headers["x-cache"] == "BYPASS"
    assert post(gateway, fixed).headers["x-cache"] == "MISS"
    assert post(gateway, fixed, **{"cache-control": "no-cache"}).headers["x-cache"] == "MISS"
    assert post(gateway, fixed).headers["x-cache"] == "HIT"
    assert emulator(vllm).requests["org/m1"] == 5


def test_incomplete_stream_is_not_stored(gateway: Any, vllm: Any) -> None:
    emulator(vllm).fail("drop", times=1)
    body = {"model": "m1", "messages": MESSAGES, "temperature": 0, "stream": True}
    with httpx.stream("POST", gateway.url + "/v1/chat/completions", json=body) as response:
        assert b'"error"' in response.read()
    assert post(gateway, body | {"stream": False}).headers["x-cache"] == "MISS"


def test_embeddings_are_always_cached(start_gateway: Any, start_server: Any) -> None:
    embedder = start_server(vllm_emulator.create_app(["org/embed"], embedding=True))
    c = client(start_gateway(config(embedder.url, served="org/embed")))
    first = c.embeddings.with_raw_response.create(model="m1", input=["a", "b"])
    second = c.embeddings.with_raw_response.create(model="m1", input=["a", "b"])
    assert (first.headers["x-cache"], second.headers["x-cache"]) == ("MISS", "HIT")
    assert first.parse().data == second.parse().data


def test_purge_empties_the_cache(gateway: Any) -> None:
    body = {"model": "m1", "messages": MESSAGES, "temperature": 0}
    post(gateway, body)
    assert post(gateway, body).headers["x-cache"] == "HIT"
    purged = httpx.delete(gateway.url + "/cache", params={"model": "one"})
    assert purged.json()["removed"] == 1
    assert post(gateway, body).headers["x-cache"] == "MISS"


def test_hit_for_an_unloaded_model_does_not_load_it(start_server: Any,
                                                   start_gateway: Any) -> None:
    ollama = start_server(ollama_emulator.create_app({"a:7b": 4.0, "b:7b": 4.0},
                                                     load_delay=0.05))
    gateway = start_gateway({
        "swapper": {"mode": "single-active"},
        "batching": {"window_ms": 0, "min_residency_ms": 0},
        "backends": {"ollama": {"kind": "ollama", "base_url": ollama.url}},
        "models": {"a": {"path": "ollama:a:7b", "size_gb": 4},
                   "b": {"path": "ollama:b:7b", "size_gb": 4}},
    })
    ask_a = {"model": "a", "messages": MESSAGES, "temperature": 0}
    assert post(gateway, ask_a).headers["x-cache"] == "MISS"
    assert post(gateway, {"model": "b", "messages": MESSAGES}).status_code == 200
    state = emulator(ollama)
    assert state.loaded == frozenset({"b:7b"})
    hit = post(gateway, ask_a)
    assert hit.status_code == 200 and hit.headers["x-cache"] == "HIT"
    assert state.loaded == frozenset({"b:7b"}) and state.load_count["a:7b"] == 1
    assert gateway.app.state.services.scheduler.slots["a"].request_count == 1


def test_redis_dying_midway_loses_no_request(start_gateway: Any, vllm: Any,
                                            own_redis: Any) -> None:
    gateway = start_gateway(config(vllm.url, redis_url=own_redis.url))
    body = {"model": "m1", "messages": MESSAGES, "temperature": 0}
    assert post(gateway, body).headers["x-cache"] == "MISS"
    assert post(gateway, body).headers["x-cache"] == "HIT"
    own_redis.stop()
    answers = [post(gateway, body) for _ in range(5)]
    assert [a.status_code for a in answers] == [200] * 5
    assert {a.headers["x-cache"] for a in answers} == {"MISS"}
    assert not gateway.app.state.services.cache.store.healthy


def test_a_huge_client_ttl_is_cut_and_turns_no_cache_off(start_gateway: Any, vllm: Any,
                                                         redis_url: str) -> None:
    namespace = f"huge-ttl-{uuid.uuid4().hex[:8]}"
    gateway = start_gateway(config(vllm.url, redis_url=redis_url, namespace=namespace))
    sampled = {"model": "m1", "messages": MESSAGES, "temperature": 1}
    first = post(gateway, sampled, **{"X-Cache-TTL": "1e17"})
    assert first.status_code == 200 and first.headers["x-cache"] == "MISS"
    again = post(gateway, sampled, **{"X-Cache-TTL": "1e17"})
    assert again.headers["x-cache"] == "HIT"  # stored, with the longest lifetime allowed
    with redis.Redis.from_url(redis_url) as client:
        [key] = client.keys(f"{namespace}:cache:*")
        assert 0 < client.pttl(key) <= MAX_TTL_S * 1000
    store = gateway.app.state.services.cache.store
    assert store.healthy and store.stats.refused == 0
    other = {"model": "m1", "messages": MESSAGES, "temperature": 0}
    assert post(gateway, other).headers["x-cache"] == "MISS"
    assert post(gateway, other).headers["x-cache"] == "HIT"  # the cache works for everyone
