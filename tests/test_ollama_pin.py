"""Residency is the gateway's decision, not Ollama's timer: every request through Ollama's OpenAI
layer resets a model's keep-alive to the server default (OLLAMA_KEEP_ALIVE), and the gateway puts
its pin back. The emulator runs with a one-second server default, so a model nobody pins is
gone a second after its last request."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest

from gateway.residency.drivers import ollama as ollama_driver
from tests.emulators import ollama as ollama_emulator
from tests.servers import ServerThread, wait_until

SERVER_DEFAULT_S = 1.0  # OLLAMA_KEEP_ALIVE of the emulated Ollama
CHAT = "/v1/chat/completions"


def ask(model: str, **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], **extra}


@pytest.fixture
def ollama(start_server: Any) -> ServerThread:
    return start_server(ollama_emulator.create_app(
        {"a:7b": 4.0, "b:7b": 4.0, "control:7b": 1.0}, load_delay=0.01, tokens=20,
        token_delay=0.05, default_keep_alive=SERVER_DEFAULT_S))


def emulator(server: ServerThread) -> Any:
    return server.server.config.app.state.emulator


def start(start_gateway: Any, ollama: ServerThread, mode: str = "multi-active",
          **models: dict[str, Any]) -> ServerThread:
    return start_gateway({
        "swapper": {"mode": mode, "max_concurrent_models": 2},
        "batching": {"window_ms": 0, "min_residency_ms": 0},
        "backends": {"ollama": {"kind": "ollama", "base_url": ollama.url}},
        "models": {name: {"path": f"ollama:{name}:7b", "size_gb": 4, **options}
                   for name, options in models.items()},
    })


def server_default_elapsed(ollama: ServerThread) -> None:
    """Wait until a model nobody pins, asked for directly after everything else, has expired:
    then the server default has run out for every request made before it."""
    answer = httpx.post(ollama.url + CHAT, json=ask("control:7b"), timeout=10)
    assert answer.status_code == 200
    state = emulator(ollama)
    wait_until(lambda: not any(r.name == "control:7b" for r, _ in state.running()),
               timeout=SERVER_DEFAULT_S + 5, message="Ollama's own timer to run out")
    assert ("control:7b", "expired") in state.evictions


def pins_settled(gateway: ServerThread) -> bool:
    driver = gateway.app.state.services.drivers["ollama"]  # type: ignore[attr-defined]
    return driver.pins_pending == 1  # only the periodic check remains


def test_a_model_stays_loaded_after_ollamas_default_keep_alive(start_gateway: Any,
                                                               ollama: ServerThread) -> None:
    gateway = start(start_gateway, ollama, a={})
    with httpx.stream("POST", gateway.url + CHAT, json=ask("a", stream=True),
                      timeout=30) as streamed:  # one second of tokens: longer than the pin delay
        assert b"".join(streamed.iter_bytes()).endswith(b"data: [DONE]\n\n")
    assert httpx.post(gateway.url + CHAT, json=ask("a"), timeout=30).status_code == 200
    wait_until(lambda: pins_settled(gateway), message="the pin put back")

    server_default_elapsed(ollama)

    state = emulator(ollama)
    assert "a:7b" in state.loaded and state.load_count["a:7b"] == 1
    assert [r.keep_alive for r in state.resident.values() if r.name == "a:7b"] == [None]
    assert httpx.get(gateway.url + "/models/a").json()["state"] == "loaded"


def test_the_gateways_ttl_is_what_unloads(start_gateway: Any, ollama: ServerThread) -> None:
    gateway = start(start_gateway, ollama, a={"ttl": 3})
    assert httpx.post(gateway.url + CHAT, json=ask("a"), timeout=30).status_code == 200
    server_default_elapsed(ollama)
    state = emulator(ollama)
    assert "a:7b" in state.loaded  # Ollama's timer did not take it
    wait_until(lambda: "a:7b" not in state.loaded, timeout=10, message="the gateway's ttl")
    assert ("a:7b", "unload") in state.evictions  # unloaded by the gateway, not expired


def test_a_burst_of_requests_costs_few_pins(start_gateway: Any, ollama: ServerThread) -> None:
    gateway = start(start_gateway, ollama, a={})
    with httpx.Client(timeout=30) as http, ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda _: http.post(gateway.url + CHAT, json=ask("a")),
                                range(24)))
    assert [a.status_code for a in answers] == [200] * 24  # pinning blocks no request
    wait_until(lambda: pins_settled(gateway), message="the pins sent")
    # The load, then one pin per half second of traffic at most: not one per request.
    assert emulator(ollama).keep_alive_calls["a:7b"] <= 6


def test_a_pin_never_reloads_a_model_the_gateway_swapped_out(start_gateway: Any,
                                                             ollama: ServerThread) -> None:
    gateway = start(start_gateway, ollama, mode="single-active", a={}, b={})
    assert httpx.post(gateway.url + CHAT, json=ask("a"), timeout=30).status_code == 200
    assert httpx.post(gateway.url + CHAT, json=ask("b"), timeout=30).status_code == 200
    wait_until(lambda: pins_settled(gateway), message="the pins sent")
    state = emulator(ollama)
    assert state.loaded == frozenset({"b:7b"})
    assert state.load_count["a:7b"] == 1 and state.max_loaded_bytes <= 4 * 10**9


def test_a_request_that_bypassed_the_gateway_is_pinned_again(
        start_gateway: Any, ollama: ServerThread, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ollama_driver, "PIN_CHECK_S", 0.2)
    gateway = start(start_gateway, ollama, a={})
    assert httpx.post(gateway.url + CHAT, json=ask("a"), timeout=30).status_code == 200
    wait_until(lambda: pins_settled(gateway), message="the pin after our request")
    state = emulator(ollama)
    pins = state.keep_alive_calls["a:7b"]
    direct = httpx.post(ollama.url + CHAT, json=ask("a:7b"), timeout=10)  # not through us
    assert direct.status_code == 200
    wait_until(lambda: state.keep_alive_calls["a:7b"] > pins,
               message="the pin put back by the periodic check")
    server_default_elapsed(ollama)
    assert "a:7b" in state.loaded and state.load_count["a:7b"] == 1
