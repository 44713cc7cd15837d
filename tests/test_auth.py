"""API keys, admin rights, model allow-lists, per-key limits and tenant-scoped caching."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from structlog.testing import capture_logs

from gateway.config.schema import ConfigError, parse_config
from tests.emulators import openai_server as vllm_emulator
from tests.servers import wait_until

ADMIN, TEAM_A, TEAM_B = "sk-admin-0123", "sk-team-a-4567", "sk-team-b-89ab"
MESSAGES = [{"role": "user", "content": "hello"}]


def emulator(server: Any) -> Any:
    return server.server.config.app.state.emulator


@pytest.fixture
def vllm(start_server: Any) -> Any:
    return start_server(vllm_emulator.create_app(["org/m1", "org/m2"], tokens=6,
                                                 token_delay=0.01))


def gateway_with(start_gateway: Any, vllm: Any, **team_a: Any) -> Any:
    return start_gateway({
        "auth": {"keys": [
            {"name": "ops", "key": ADMIN, "admin": True},
            {"name": "team-a", "key": TEAM_A, "models": ["m1"], **team_a},
            {"name": "team-b", "key": TEAM_B},
        ]},
        "backends": {"vllm": {"kind": "openai", "base_url": vllm.url}},
        "models": {"m1": {"backend": "vllm", "served_name": "org/m1"},
                   "m2": {"backend": "vllm", "served_name": "org/m2"}},
    })


@pytest.fixture
def gateway(start_gateway: Any, vllm: Any) -> Any:
    return gateway_with(start_gateway, vllm)


def chat(gateway: Any, key: str | None, model: str = "m1", **extra: Any) -> httpx.Response:
    headers = {"authorization": f"Bearer {key}"} if key else {}
    return httpx.post(gateway.url + "/v1/chat/completions", headers=headers, timeout=30,
                      json={"model": model, "messages": MESSAGES, **extra})


def test_keys_are_required_and_checked(gateway: Any) -> None:
    missing = chat(gateway, None)
    assert missing.status_code == 401 and missing.json()["error"]["code"] == "missing_api_key"
    wrong = chat(gateway, "sk-nope")
    assert wrong.status_code == 401 and wrong.json()["error"]["type"] == "authentication_error"
    assert chat(gateway, TEAM_B).status_code == 200
    by_header = httpx.post(gateway.url + "/v1/chat/completions", headers={"x-api-key": TEAM_B},
                           json={"model": "m1", "messages": MESSAGES})
    assert by_header.status_code == 200
    client = openai.OpenAI(base_url=gateway.url + "/v1", api_key="sk-nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        client.models.list()


def test_health_and_metrics_stay_open(gateway: Any) -> None:
    assert httpx.get(gateway.url + "/health").status_code == 200
    assert httpx.get(gateway.url + "/metrics").status_code == 200
    assert httpx.get(gateway.url + "/status").status_code == 401


def test_admin_routes_need_an_admin_key(gateway: Any) -> None:
    refused = httpx.delete(gateway.url + "/cache", headers={"authorization": f"Bearer {TEAM_B}"})
    assert refused.status_code == 403 and refused.json()["error"]["code"] == "admin_only"
    allowed = httpx.delete(gateway.url + "/cache", headers={"authorization": f"Bearer {ADMIN}"})
    assert allowed.status_code == 200


def test_model_allow_list(gateway: Any) -> None:
    assert chat(gateway, TEAM_A, "m1").status_code == 200
    hidden = chat(gateway, TEAM_A, "m2")
    assert hidden.status_code == 404 and hidden.json()["error"]["code"] == "model_not_found"
    client = openai.OpenAI(base_url=gateway.url + "/v1", api_key=TEAM_A, max_retries=0)
    assert [m.id for m in client.models.list()] == ["m1"]
    assert chat(gateway, TEAM_B, "m2").status_code == 200


def test_requests_per_minute_gives_openai_style_429(start_gateway: Any, vllm: Any) -> None:
    gateway = gateway_with(start_gateway, vllm, requests_per_minute=2)
    first = chat(gateway, TEAM_A)
    assert first.headers["x-ratelimit-limit-requests"] == "2"
    assert first.headers["x-ratelimit-remaining-requests"] == "1"
    assert chat(gateway, TEAM_A).status_code == 200
    limited = chat(gateway, TEAM_A)
    assert limited.status_code == 429
    assert limited.json()["error"]["type"] == "rate_limit_error"
    assert int(limited.headers["retry-after"]) >= 1 and int(limited.headers["retry-after-ms"]) > 0
    assert limited.headers["x-ratelimit-remaining-requests"] == "0"
    assert chat(gateway, TEAM_B).status_code == 200  # other keys are not affected
    client = openai.OpenAI(base_url=gateway.url + "/v1", api_key=TEAM_A, max_retries=0)
    with pytest.raises(openai.RateLimitError):
        client.chat.completions.create(model="m1", messages=MESSAGES)  # type: ignore[arg-type]


def test_max_concurrent_per_key(start_gateway: Any, start_server: Any) -> None:
    slow = start_server(vllm_emulator.create_app(["org/m1", "org/m2"], tokens=200,
                                                 token_delay=0.01))
    gateway = gateway_with(start_gateway, slow, max_concurrent=1)
    body = {"model": "m1", "messages": MESSAGES, "stream": True}
    with httpx.stream("POST", gateway.url + "/v1/chat/completions", json=body,
                      headers={"authorization": f"Bearer {TEAM_A}"}) as running:
        chunks = running.iter_raw()  # held: a dropped iterator would close the stream
        next(chunks)
        second = chat(gateway, TEAM_A)
        assert second.status_code == 429 and "concurrent" in second.json()["error"]["message"]
    wait_until(lambda: chat(gateway, TEAM_A).status_code == 200, message="slot freed")


def test_token_budget_counts_streamed_usage(start_gateway: Any, vllm: Any) -> None:
    gateway = gateway_with(start_gateway, vllm, tokens_per_minute=12)
    streamed = chat(gateway, TEAM_A, stream=True, stream_options={"include_usage": True})
    assert streamed.status_code == 200  # about 7 tokens: some budget is left
    assert chat(gateway, TEAM_A).status_code == 200  # admitted, then charged
    spent = chat(gateway, TEAM_A)
    assert spent.status_code == 429 and "tokens" in spent.json()["error"]["message"]


def test_tenants_do_not_share_cache_entries(gateway: Any) -> None:
    assert chat(gateway, TEAM_A, temperature=0).headers["x-cache"] == "MISS"
    assert chat(gateway, TEAM_A, temperature=0).headers["x-cache"] == "HIT"
    assert chat(gateway, TEAM_B, temperature=0).headers["x-cache"] == "MISS"


def test_keys_are_never_logged(gateway: Any) -> None:
    with capture_logs() as logs:
        chat(gateway, TEAM_B)
        chat(gateway, "sk-wrong-secret")
    done = [entry for entry in logs if entry["event"] == "request.done"]
    assert [entry["tenant"] for entry in done] == ["team-b", None]
    assert TEAM_B not in repr(logs) and "sk-wrong-secret" not in repr(logs)


def test_keys_from_env_and_secret_file(tmp_path: Path) -> None:
    secret = tmp_path / "key"
    secret.write_text("sk-from-file\n")
    config = parse_config({"auth": {"keys": [
        {"name": "file", "key_file": str(secret)},
        {"name": "env", "key_env": "TEAM_KEY"}]}},
        env={"TEAM_KEY": "sk-from-env", "SWAPPER_API_KEYS": "ci:sk-ci,bot:sk-bot",
             "SWAPPER_ADMIN_KEY": "sk-root"})
    keys = {key.name: key for key in config.auth.keys}
    assert keys["file"].secret == "sk-from-file" and keys["env"].secret == "sk-from-env"
    assert keys["ci"].secret == "sk-ci" and keys["admin"].admin
    with pytest.raises(ConfigError, match=r"auth.keys\[0\].key_env"):
        parse_config({"auth": {"keys": [{"name": "x", "key_env": "UNSET"}]}}, env={})


def test_open_gateway_without_keys(start_gateway: Any, vllm: Any) -> None:
    gateway = start_gateway({
        "backends": {"vllm": {"kind": "openai", "base_url": vllm.url}},
        "models": {"m1": {"backend": "vllm", "served_name": "org/m1"}}})
    assert chat(gateway, None).status_code == 200


def test_concurrency_slot_is_freed_when_a_client_leaves(start_gateway: Any, vllm: Any) -> None:
    gateway = gateway_with(start_gateway, vllm, max_concurrent=1)
    done = threading.Event()

    def leave_midway() -> None:
        body = {"model": "m1", "messages": MESSAGES, "stream": True}
        with httpx.stream("POST", gateway.url + "/v1/chat/completions", json=body,
                          headers={"authorization": f"Bearer {TEAM_A}"}) as response:
            next(response.iter_raw())
        done.set()

    leave_midway()
    assert done.is_set()
    wait_until(lambda: chat(gateway, TEAM_A).status_code == 200, message="slot freed")
