"""The old Swapper Service API (../shared/SWAPPER_API.md), key for key and value for value.

Each route is checked against the shape that document gives: every key it names is present,
with the type it had and, where it was fixed, the very value. Extra keys are allowed.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

import httpx
import pytest

from tests.emulators import ollama as ollama_emulator
from tests.servers import emulator, wait_until

Check = Callable[[Any], bool]
NUMBER = (int, float)
STATUSES = ("loaded", "unloaded", "loading")


def number(value: Any) -> bool:
    return isinstance(value, NUMBER) and not isinstance(value, bool)


def iso_local(value: Any) -> bool:
    """ISO 8601, in local time: what a client's ISO parser reads as the wall clock now."""
    if not isinstance(value, str):
        return False
    stamp = datetime.fromisoformat(value)
    local = datetime.fromtimestamp(stamp.timestamp()).astimezone()
    return stamp.utcoffset() == local.utcoffset() and abs(
        stamp - datetime.now().astimezone()) < timedelta(minutes=5)


def optional(check: Check) -> Check:
    return lambda value: value is None or check(value)


def string_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(item, str) for item in value)


def one_of(*values: Any) -> Check:
    return lambda value: value in values


# The document's shapes: a fixed value, or a check for values that vary.
HEALTH = {"status": "healthy", "service": "swapper-service",
          "active_model": optional(lambda v: isinstance(v, str)), "mode": "single-active"}
STATUS = {"status": "healthy", "active_model": optional(lambda v: isinstance(v, str)),
          "available_models": string_list, "loaded_models": string_list,
          "mode": "single-active", "total_models": lambda v: type(v) is int}
MODEL_IN_LIST = {"name": str, "ollama_name": str, "type": str, "size_gb": number,
                 "priority": one_of("high", "normal", "low"), "status": one_of(*STATUSES)}
MODEL = {**MODEL_IN_LIST, "loaded_at": optional(iso_local), "unloaded_at": optional(iso_local),
         "total_uptime_seconds": number}
METRIC = {"model_name": str, "status": one_of(*STATUSES), "loaded_at": optional(iso_local),
          "uptime_hours": number, "request_count": lambda v: type(v) is int,
          "total_uptime_seconds": number}


def assert_shape(answer: Any, shape: dict[str, Any]) -> None:
    assert isinstance(answer, dict), answer
    missing = set(shape) - set(answer)
    assert not missing, f"keys missing: {sorted(missing)} in {answer}"
    for key, expected in shape.items():
        value = answer[key]
        if isinstance(expected, type):
            ok = isinstance(value, expected)
        elif callable(expected):
            ok = expected(value)
        else:
            ok = value == expected and type(value) is type(expected)
        assert ok, f"{key}: {value!r} does not match the old service's {expected!r}"


@pytest.fixture
def ollama(start_server: Any) -> Any:
    return start_server(ollama_emulator.create_app({"qwen2.5:7b": 4.7, "nomic-embed-text": 0.3},
                                                   load_delay=0.05))


def config(ollama_url: str, **swapper: Any) -> dict[str, Any]:
    return {
        "swapper": {"mode": "single-active", "max_concurrent_models": 1, **swapper},
        "backends": {"ollama": {"kind": "ollama", "base_url": ollama_url}},
        "models": {
            "qwen": {"path": "ollama:qwen2.5:7b", "type": "llm", "size_gb": 4.7,
                     "priority": "high"},
            "embed": {"path": "ollama:nomic-embed-text", "type": "embedding", "size_gb": 0.3,
                      "priority": "low"},
        },
    }


@pytest.fixture
def gateway(start_gateway: Any, ollama: Any) -> Any:
    return start_gateway(config(ollama.url))


def get(gateway: Any, path: str) -> Any:
    response = httpx.get(gateway.url + path, timeout=10)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/json"
    return response.json()


def post(gateway: Any, path: str) -> Any:
    response = httpx.post(gateway.url + path, timeout=10)
    assert response.status_code == 200, response.text
    return response.json()


def chat(gateway: Any, model: str = "qwen") -> None:
    answer = httpx.post(gateway.url + "/v1/chat/completions", timeout=10, json={
        "model": model, "messages": [{"role": "user", "content": "hi"}]})
    assert answer.status_code == 200, answer.text


def test_health_has_the_old_shape(gateway: Any) -> None:
    health = get(gateway, "/health")
    assert_shape(health, HEALTH)
    assert health["active_model"] is None
    post(gateway, "/models/qwen/load")
    assert get(gateway, "/health")["active_model"] == "qwen"


def test_status_has_the_old_shape(gateway: Any) -> None:
    status = get(gateway, "/status")
    assert_shape(status, STATUS)
    assert status["available_models"] == ["qwen", "embed"]
    assert (status["loaded_models"], status["active_model"], status["total_models"]) == (
        [], None, 2)
    post(gateway, "/models/qwen/load")
    status = get(gateway, "/status")
    assert_shape(status, STATUS)
    assert (status["loaded_models"], status["active_model"]) == (["qwen"], "qwen")


def test_models_have_the_old_shape(gateway: Any) -> None:
    models = get(gateway, "/models")["models"]
    assert [m["name"] for m in models] == ["qwen", "embed"]
    for model in models:
        assert_shape(model, MODEL_IN_LIST)
    qwen = models[0]
    assert (qwen["ollama_name"], qwen["type"], qwen["size_gb"], qwen["priority"],
            qwen["status"]) == ("qwen2.5:7b", "llm", 4.7, "high", "unloaded")
    one = get(gateway, "/models/qwen")
    assert_shape(one, MODEL)
    assert (one["loaded_at"], one["unloaded_at"], one["total_uptime_seconds"]) == (None, None, 0)


def test_load_and_unload_have_the_old_shape(gateway: Any, ollama: Any) -> None:
    loaded = post(gateway, "/models/qwen/load")
    assert_shape(loaded, {"status": "success", "model": "qwen", "message": "Model qwen loaded"})
    assert emulator(ollama).loaded == frozenset({"qwen2.5:7b"})
    model = get(gateway, "/models/qwen")
    assert_shape(model, MODEL)
    assert model["status"] == "loaded" and model["loaded_at"] and model["unloaded_at"] is None
    # Single-active: loading the other model evicts the first.
    post(gateway, "/models/embed/load")
    assert emulator(ollama).loaded == frozenset({"nomic-embed-text:latest"})
    unloaded = post(gateway, "/models/embed/unload")
    assert_shape(unloaded, {"status": "success", "model": "embed",
                            "message": "Model embed unloaded"})
    assert emulator(ollama).loaded == frozenset()
    embed = get(gateway, "/models/embed")
    assert_shape(embed, MODEL)
    assert embed["status"] == "unloaded" and embed["unloaded_at"] and embed["loaded_at"]
    assert embed["total_uptime_seconds"] > 0


def test_metrics_json_has_the_old_shape(gateway: Any) -> None:
    chat(gateway)
    overall = get(gateway, "/metrics")
    assert set(overall) >= {"metrics"} and "models" not in overall
    assert [m["model_name"] for m in overall["metrics"]] == ["qwen", "embed"]
    for metric in overall["metrics"]:
        assert_shape(metric, METRIC)
    one = get(gateway, "/metrics/qwen")
    assert_shape(one, METRIC)
    listed = next(m for m in overall["metrics"] if m["model_name"] == "qwen")
    steady = ("model_name", "status", "loaded_at", "request_count")
    assert {k: one[k] for k in steady} == {k: listed[k] for k in steady}
    assert (one["status"], one["request_count"]) == ("loaded", 1)
    assert one["uptime_hours"] == pytest.approx(one["total_uptime_seconds"] / 3600, abs=1e-5)


def test_request_count_counts_api_calls_only(start_gateway: Any, ollama: Any) -> None:
    """Not the start-up preload of default_model, not an admin load."""
    gateway = start_gateway(config(ollama.url, default_model="qwen"))
    wait_until(lambda: get(gateway, "/models/qwen")["status"] == "loaded", message="preload")
    post(gateway, "/models/qwen/load")
    assert get(gateway, "/metrics/qwen")["request_count"] == 0
    chat(gateway)
    chat(gateway)
    assert get(gateway, "/metrics/qwen")["request_count"] == 2
    assert get(gateway, "/metrics")["total_requests"] == 2


def test_timestamps_are_local_iso_8601(gateway: Any) -> None:
    before = time.time()
    post(gateway, "/models/qwen/load")
    loaded_at = get(gateway, "/models/qwen")["loaded_at"]
    assert iso_local(loaded_at)
    assert datetime.fromisoformat(loaded_at).timestamp() >= int(before)
    assert get(gateway, "/metrics/qwen")["loaded_at"] == loaded_at


def test_unknown_model_in_the_swapper_api_is_404(gateway: Any) -> None:
    for method, path in (("GET", "/models/nope"), ("POST", "/models/nope/load"),
                         ("POST", "/models/nope/unload"), ("GET", "/metrics/nope")):
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


def test_metrics_prometheus(gateway: Any) -> None:
    chat(gateway)
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
