"""Fallback between backends: vLLM first, Ollama behind it, and back when vLLM recovers."""

from __future__ import annotations

from typing import Any

import httpx
import openai
import pytest

from gateway.config.reader import parse_config
from gateway.config.schema import ConfigError
from tests.emulators import ollama as ollama_emulator
from tests.emulators import openai_server as vllm_emulator
from tests.servers import emulator, free_port

MESSAGES = [{"role": "user", "content": "hello"}]


def config(vllm_url: str, ollama_url: str) -> dict[str, Any]:
    return {
        "batching": {"window_ms": 0, "min_residency_ms": 0},
        "backends": {"vllm": {"kind": "openai", "base_url": vllm_url},
                     "ollama": {"kind": "ollama", "base_url": ollama_url}},
        "models": {"llama": {"backend": "vllm", "served_name": "meta/llama-8b", "size_gb": 16,
                             "fallback": [{"backend": "ollama", "served_name": "llama3:8b",
                                           "size_gb": 5}]}},
    }


@pytest.fixture
def ollama(start_server: Any) -> Any:
    return start_server(ollama_emulator.create_app({"llama3:8b": 5.0}, load_delay=0.01))


def chat(gateway: Any, **extra: Any) -> httpx.Response:
    return httpx.post(gateway.url + "/v1/chat/completions", timeout=30,
                      json={"model": "llama", "messages": MESSAGES, **extra})


def test_an_unreachable_primary_falls_back_without_a_failed_request(start_gateway: Any,
                                                                   ollama: Any) -> None:
    gateway = start_gateway(config(f"http://127.0.0.1:{free_port()}", ollama.url))
    client = openai.OpenAI(base_url=gateway.url + "/v1", api_key="x", max_retries=0)
    answer = client.chat.completions.create(model="llama", messages=MESSAGES)  # type: ignore[arg-type]
    assert answer.model == "llama" and answer.choices[0].message.content
    streamed = list(client.chat.completions.create(model="llama", messages=MESSAGES,  # type: ignore[arg-type]
                                                   stream=True))
    assert streamed[-1].choices[0].finish_reason == "stop"
    assert emulator(ollama).requests["llama3:8b"] == 2
    status = httpx.get(gateway.url + "/status").json()["models"]["llama"]
    assert status["serving_backend"] == "ollama" and status["routes"]["ollama"] == "loaded"


def test_a_failing_primary_is_left_and_traffic_returns_when_it_recovers(
        start_gateway: Any, start_server: Any, ollama: Any) -> None:
    vllm = start_server(vllm_emulator.create_app(["meta/llama-8b"]))
    gateway = start_gateway(config(vllm.url, ollama.url))
    assert chat(gateway).status_code == 200
    emulator(vllm).fail("500")  # keeps failing
    statuses = [chat(gateway).status_code for _ in range(5)]
    assert statuses[:3] == [500, 500, 500] and statuses[3:] == [200, 200]
    assert emulator(ollama).requests["llama3:8b"] == 2
    emulator(vllm).fail(None)
    fallback = gateway.app.state.services.fallback
    gateway.call(fallback.check())  # the periodic health check, run now
    assert chat(gateway).status_code == 200
    assert emulator(vllm).requests["meta/llama-8b"] == 5  # back on the primary
    status = httpx.get(gateway.url + "/status").json()["models"]["llama"]
    assert status["serving_backend"] == "vllm"


def test_fallback_routes_are_not_public_models(start_gateway: Any, ollama: Any) -> None:
    gateway = start_gateway(config(f"http://127.0.0.1:{free_port()}", ollama.url))
    ids = [m["id"] for m in httpx.get(gateway.url + "/v1/models").json()["data"]]
    assert ids == ["llama"]
    assert [m["name"] for m in httpx.get(gateway.url + "/models").json()["models"]] == ["llama"]
    assert httpx.post(gateway.url + "/v1/chat/completions", json={
        "model": "llama@ollama", "messages": MESSAGES}).status_code == 404


def test_a_fallback_naming_an_unknown_backend_is_refused() -> None:
    bad = config("http://a", "http://b")
    bad["models"]["llama"]["fallback"] = [{"backend": "sglang"}]
    with pytest.raises(ConfigError, match=r"models.llama.fallback\[0\].backend"):
        parse_config(bad, source="f.yaml", env={})
