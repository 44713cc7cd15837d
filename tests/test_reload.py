"""Reloading the config while serving: applied at once, atomically, never dropping a stream."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from gateway.app import create_app
from gateway.config.reload import file_loader
from gateway.config.schema import load_config
from tests.emulators import ollama as ollama_emulator
from tests.emulators import openai_server as vllm_emulator
from tests.servers import free_port, stop_process, wait_until

ROOT = Path(__file__).resolve().parent.parent
ADMIN = "sk-admin-reload"


def ask(model: str, key: str = ADMIN, **extra: Any) -> dict[str, Any]:
    return {"json": {"model": model, "messages": [{"role": "user", "content": "hi"}], **extra},
            "headers": {"authorization": f"Bearer {key}"}, "timeout": 30}


@pytest.fixture
def ollama(start_server: Any) -> Any:
    return start_server(ollama_emulator.create_app(
        {"a:7b": 4.0, "b:7b": 4.0, "c:7b": 4.0}, load_delay=0.01, tokens=30, token_delay=0.01))


def write(path: Path, ollama_url: str, models: dict[str, Any], **extra: Any) -> None:
    path.write_text(yaml.safe_dump({
        "auth": {"keys": [{"name": "ops", "key": ADMIN, "admin": True}]},
        "batching": {"window_ms": 0, "min_residency_ms": 0},
        "swapper": {"mode": "multi-active", "max_concurrent_models": 3},
        "backends": {"ollama": {"kind": "ollama", "base_url": ollama_url}},
        "models": models, **extra}))


@pytest.fixture
def setup(tmp_path: Path, ollama: Any, start_server: Any) -> tuple[Any, Path]:
    config = tmp_path / "swapper_config.yaml"
    write(config, ollama.url, {"a": {"path": "ollama:a:7b", "size_gb": 4}})
    gateway = start_server(create_app(load_config(config, env={}),
                                      loader=file_loader(str(config))))
    return gateway, config


def reload(gateway: Any, key: str = ADMIN) -> httpx.Response:
    return httpx.post(gateway.url + "/admin/reload", headers={"authorization": f"Bearer {key}"},
                      timeout=30)


def test_a_new_model_and_alias_serve_after_a_reload(setup: Any, ollama: Any) -> None:
    gateway, config = setup
    assert httpx.post(gateway.url + "/v1/chat/completions", **ask("c")).status_code == 404
    write(config, ollama.url, {"a": {"path": "ollama:a:7b", "size_gb": 4, "aliases": ["alpha"]},
                               "c": {"path": "ollama:c:7b", "size_gb": 4}})
    answer = reload(gateway)
    assert answer.status_code == 200 and answer.json()["models"] == ["a", "c"]
    assert httpx.post(gateway.url + "/v1/chat/completions", **ask("c")).status_code == 200
    assert httpx.post(gateway.url + "/v1/chat/completions", **ask("alpha")).status_code == 200


def test_a_stream_runs_on_through_a_reload(setup: Any, ollama: Any) -> None:
    gateway, config = setup
    received: list[bytes] = []

    def stream() -> None:
        with httpx.stream("POST", gateway.url + "/v1/chat/completions",
                          **ask("a", stream=True)) as response:
            received.extend(response.iter_bytes())

    streaming = threading.Thread(target=stream)
    streaming.start()
    wait_until(lambda: bool(received), message="the stream started")
    write(config, ollama.url, {"a": {"path": "ollama:a:7b", "size_gb": 4, "priority": "high"},
                               "b": {"path": "ollama:b:7b", "size_gb": 4}})
    assert reload(gateway).status_code == 200
    streaming.join(30)
    assert b"".join(received).endswith(b"data: [DONE]\n\n")


def test_a_bad_config_is_refused_and_the_old_one_kept(setup: Any) -> None:
    gateway, config = setup
    config.write_text("models: {a: [\n")
    refused = reload(gateway)
    assert refused.status_code == 400 and "invalid YAML" in refused.json()["error"]["message"]
    assert httpx.post(gateway.url + "/v1/chat/completions", **ask("a")).status_code == 200


def test_a_model_in_use_cannot_change_backend(setup: Any, ollama: Any) -> None:
    gateway, config = setup
    assert httpx.post(gateway.url + "/v1/chat/completions", **ask("a")).status_code == 200
    write(config, ollama.url, {"a": {"path": "ollama:b:7b", "size_gb": 4}})
    refused = reload(gateway)
    assert refused.status_code == 400 and "model 'a' is in use" in refused.text
    headers = {"authorization": f"Bearer {ADMIN}"}
    assert httpx.post(gateway.url + "/models/a/unload", headers=headers,
                      timeout=30).status_code == 200
    assert reload(gateway).status_code == 200
    assert httpx.post(gateway.url + "/v1/chat/completions", **ask("a")).status_code == 200
    assert ollama.server.config.app.state.emulator.requests["b:7b"] == 1


def test_new_keys_apply_at_once(setup: Any, ollama: Any) -> None:
    gateway, config = setup
    write(config, ollama.url, {"a": {"path": "ollama:a:7b", "size_gb": 4}},
          auth={"keys": [{"name": "ops2", "key": "sk-new-admin", "admin": True}]})
    assert reload(gateway).status_code == 200
    assert httpx.post(gateway.url + "/v1/chat/completions", **ask("a")).status_code == 401
    assert httpx.post(gateway.url + "/v1/chat/completions",
                      **ask("a", key="sk-new-admin")).status_code == 200


def test_reload_needs_an_admin_key(setup: Any) -> None:
    gateway, _ = setup
    assert httpx.post(gateway.url + "/admin/reload").status_code == 401


def test_sighup_and_the_cli_reload_a_running_gateway(tmp_path: Path, start_server: Any) -> None:
    backend = start_server(vllm_emulator.create_app(["org/m1", "org/m2"]))
    config = tmp_path / "swapper_config.yaml"

    def configure(*names: str) -> None:
        config.write_text(yaml.safe_dump({
            "auth": {"keys": [{"name": "ops", "key": ADMIN, "admin": True}]},
            "backends": {"vllm": {"kind": "openai", "base_url": backend.url}},
            "models": {n: {"backend": "vllm", "served_name": f"org/{n}"} for n in names}}))

    configure("m1")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    gateway = subprocess.Popen([sys.executable, "-m", "gateway", "serve", "--config",
                                str(config), "--host", "127.0.0.1", "--port", str(port)],
                               cwd=ROOT, stderr=subprocess.DEVNULL)
    headers = {"authorization": f"Bearer {ADMIN}"}

    def models() -> set[str]:
        try:
            answer = httpx.get(url + "/v1/models", headers=headers, timeout=2)
        except httpx.HTTPError:
            return set()
        return {m["id"] for m in answer.json()["data"]} if answer.status_code == 200 else set()

    try:
        wait_until(lambda: models() == {"m1"}, timeout=20, message="gateway up")
        configure("m1", "m2")
        gateway.send_signal(signal.SIGHUP)
        wait_until(lambda: models() == {"m1", "m2"}, message="SIGHUP reload")
        configure("m2")
        cli = subprocess.run([sys.executable, "-m", "gateway", "reload", "--url", url, "--key",
                              ADMIN], cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert cli.returncode == 0, cli.stderr
        assert models() == {"m2"}
        config.write_text("models: [")
        refused = subprocess.run([sys.executable, "-m", "gateway", "reload", "--url", url,
                                  "--key", ADMIN], cwd=ROOT, capture_output=True, text=True,
                                 timeout=60)
        assert refused.returncode == 1 and "invalid YAML" in refused.stderr
        assert models() == {"m2"}
    finally:
        stop_process(gateway, grace_s=20)
