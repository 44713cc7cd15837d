"""The old Swapper Service API, kept field for field, plus manual load/unload and metrics."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from tests.emulators import ollama as ollama_emulator


@pytest.fixture
def ollama(start_server: Any) -> Any:
    return start_server(ollama_emulator.create_app({"qwen2.5:7b": 4.7, "nomic-embed-text": 0.3},
                                                   load_delay=0.05))


@pytest.fixture
def gateway(start_gateway: Any, ollama: Any) -> Any:
    return start_gateway({
        "swapper": {"mode": "single-active", "max_concurrent_models": 1},
        "backends": {"ollama": {"kind": "ollama", "base_url": ollama.url}},
        "models": {
            "qwen": {"path": "ollama:qwen2.5:7b", "type": "llm", "size_gb": 4.7,
                     "priority": "high"},
            "embed": {"path": "ollama:nomic-embed-text", "type": "embedding", "size_gb": 0.3,
                      "priority": "low"},
        },
    })


def emulator(server: Any) -> Any:
    return server.server.config.app.state.emulator


def test_status_has_the_old_fields(gateway: Any) -> None:
    status = httpx.get(gateway.url + "/status").json()
    for key in ("status", "active_model", "available_models", "loaded_models", "mode",
                "total_models"):
        assert key in status
    assert status["available_models"] == ["qwen", "embed"]
    assert (status["loaded_models"], status["active_model"]) == ([], None)
    assert (status["mode"], status["total_models"]) == ("single-active", 2)


def test_load_and_unload_through_the_api(gateway: Any, ollama: Any) -> None:
    loaded = httpx.post(gateway.url + "/models/qwen/load", timeout=10)
    assert loaded.status_code == 200 and loaded.json()["status"] == "success"
    assert emulator(ollama).loaded == frozenset({"qwen2.5:7b"})
    model = httpx.get(gateway.url + "/models/qwen").json()
    assert model["status"] == "loaded" and model["loaded_at"] and model["load_count"] == 1
    assert httpx.get(gateway.url + "/status").json()["active_model"] == "qwen"
    # Single-active: loading the other model evicts the first.
    assert httpx.post(gateway.url + "/models/embed/load", timeout=10).status_code == 200
    assert emulator(ollama).loaded == frozenset({"nomic-embed-text:latest"})
    unloaded = httpx.post(gateway.url + "/models/embed/unload", timeout=10)
    assert unloaded.status_code == 200
    assert emulator(ollama).loaded == frozenset()
    embed = httpx.get(gateway.url + "/models/embed").json()
    assert embed["status"] == "unloaded" and embed["unloaded_at"]


def test_models_have_the_old_per_model_fields(gateway: Any) -> None:
    models = httpx.get(gateway.url + "/models").json()["models"]
    fields = {"name", "ollama_name", "type", "size_gb", "priority", "status", "loaded_at",
              "unloaded_at", "total_uptime_seconds"}
    assert all(fields <= set(model) for model in models)
    qwen = next(m for m in models if m["name"] == "qwen")
    assert (qwen["ollama_name"], qwen["type"], qwen["size_gb"], qwen["priority"]) == (
        "qwen2.5:7b", "llm", 4.7, "high")


def test_unknown_model_in_the_swapper_api_is_404(gateway: Any) -> None:
    for method, path in (("GET", "/models/nope"), ("POST", "/models/nope/load"),
                         ("GET", "/metrics/nope")):
        response = httpx.request(method, gateway.url + path)
        assert response.status_code == 404
        assert response.json()["error"]["code"] == "model_not_found"


def test_errors_are_counted_by_code(gateway: Any) -> None:
    httpx.post(gateway.url + "/v1/chat/completions",
               json={"model": "ghost", "messages": [{"role": "user", "content": "hi"}]})
    httpx.post(gateway.url + "/v1/chat/completions", content=b"{oops")
    text = httpx.get(gateway.url + "/metrics", headers={"accept": "text/plain"}).text
    assert 'swapper_errors_total{code="model_not_found"} 1.0' in text
    assert 'swapper_errors_total{code="invalid_json"} 1.0' in text


def test_metrics_json_and_prometheus(gateway: Any) -> None:
    httpx.post(gateway.url + "/v1/chat/completions", timeout=10,
               json={"model": "qwen", "messages": [{"role": "user", "content": "hi"}]})
    metrics = httpx.get(gateway.url + "/metrics/qwen").json()
    assert set(metrics) >= {"model_name", "status", "loaded_at", "uptime_hours", "request_count",
                            "total_uptime_seconds"}
    assert metrics["request_count"] == 1 and metrics["status"] == "loaded"
    overall = httpx.get(gateway.url + "/metrics").json()
    assert overall["total_requests"] == 1
    text = httpx.get(gateway.url + "/metrics", headers={"accept": "text/plain"})
    assert text.headers["content-type"].startswith("text/plain")
    assert 'swapper_active_model{model="qwen"} 1.0' in text.text
    assert 'swapper_model_requests_total{model="qwen",status="200"} 1.0' in text.text
    assert 'swapper_model_load_seconds_count{model="qwen"} 1.0' in text.text
    assert 'swapper_time_to_first_byte_seconds_count{model="qwen"} 1.0' in text.text
    assert 'swapper_tokens_total{kind="completion",model="qwen"}' in text.text
    scraped = httpx.get(gateway.url + "/metrics", headers={
        "accept": "application/openmetrics-text; version=1.0.0"})
    assert scraped.headers["content-type"].startswith("application/openmetrics-text")
    assert scraped.text.rstrip().endswith("# EOF")
