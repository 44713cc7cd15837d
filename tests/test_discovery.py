"""With no models configured, the gateway serves the models the default Ollama has pulled."""

from __future__ import annotations

from typing import Any

import httpx

from gateway.app import create_app
from gateway.config.discovery import discover_ollama_models
from gateway.config.reader import parse_config
from tests.emulators import ollama as ollama_emulator
from tests.servers import free_port


def test_models_are_discovered_from_ollama(start_server: Any) -> None:
    ollama = start_server(ollama_emulator.create_app({"qwen2.5:7b": 4.7, "llama3": 4.0},
                                                     load_delay=0.01))
    config = discover_ollama_models(parse_config({}, env={"OLLAMA_BASE_URL": ollama.url}))
    assert set(config.models) == {"qwen2.5:7b", "llama3:latest"}
    assert config.models["llama3:latest"].aliases == ("llama3",)
    gateway = start_server(create_app(config))
    answer = httpx.post(gateway.url + "/v1/chat/completions", timeout=10, json={
        "model": "llama3", "messages": [{"role": "user", "content": "hi"}]})
    assert answer.status_code == 200 and answer.json()["model"] == "llama3"


def test_unreachable_ollama_leaves_an_empty_catalog() -> None:
    config = parse_config({}, env={"OLLAMA_BASE_URL": f"http://127.0.0.1:{free_port()}"})
    assert discover_ollama_models(config, timeout_s=1).models == {}


def test_configured_models_are_never_replaced(start_server: Any) -> None:
    ollama = start_server(ollama_emulator.create_app({"other:7b": 1.0}))
    config = parse_config({"models": {"mine": {"path": "ollama:mine:7b"}}},
                          env={"OLLAMA_BASE_URL": ollama.url})
    assert set(discover_ollama_models(config).models) == {"mine"}
