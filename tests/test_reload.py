"""Reloading the config while serving: applied at once, atomically, never dropping a stream."""

from __future__ import annotations

import dataclasses
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
from gateway.config.reader import load_config
from gateway.config.reload import file_loader
from gateway.config.schema import BackendConfig
from policies.types import State
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


# -- a reload cannot half-apply ----------------------------------------------------------------


def test_a_driver_that_cannot_be_built_refuses_the_whole_reload(setup: Any, ollama: Any,
                                                                start_server: Any) -> None:
    """Even a template the config reader let through (a reader of another version, say) is
    refused before anything changes: the old models, keys and routes all stay."""
    gateway, config = setup
    write(config, ollama.url, {"a": {"path": "ollama:a:7b", "size_gb": 4},
                               "b": {"path": "ollama:b:7b", "size_gb": 4}})
    good = load_config(config, env={})
    broken = dataclasses.replace(good, backends={
        **good.backends,
        "local": BackendConfig(name="local", kind="process", cmd="llama-server --port {prot}")})
    app = gateway.server.config.app
    app.state.services.loader = lambda: broken
    refused = reload(gateway)
    assert refused.status_code == 400
    assert "backends.local" in refused.text and "{prot}" in refused.text
    assert models_listed(gateway) == {"a"}  # not "b": nothing of the new config applied
    assert set(app.state.services.drivers) == {"ollama"}
    assert httpx.post(gateway.url + "/v1/chat/completions", **ask("a")).status_code == 200


def models_listed(gateway: Any) -> set[str]:
    answer = httpx.get(gateway.url + "/v1/models", headers={"authorization": f"Bearer {ADMIN}"})
    return {model["id"] for model in answer.json()["data"]}


def fallback_config(path: Path, dead_url: str, fallback: dict[str, Any] | None,
                    startup_delay: str = "0.1") -> None:
    cmd = (f"{sys.executable} -m tests.emulators.openai_server --port {{port}} "
           f"--model {{served_name}} --startup-delay {startup_delay}")
    model: dict[str, Any] = {"backend": "vllm", "served_name": "org/m", "size_gb": 4}
    if fallback is not None:
        model["fallback"] = [fallback]
    path.write_text(yaml.safe_dump({
        "auth": {"keys": [{"name": "ops", "key": ADMIN, "admin": True}]},
        "batching": {"window_ms": 0, "min_residency_ms": 0},
        "swapper": {"mode": "single-active", "model_swap_timeout": 30},
        "backends": {"vllm": {"kind": "openai", "base_url": dead_url},
                     "local": {"kind": "process", "cmd": cmd, "start_timeout": 20,
                               "stop_grace": 5, "env": {"PYTHONPATH": str(ROOT)}}},
        "models": {"m": model}}))


def test_a_fallback_in_use_cannot_be_removed_or_changed(tmp_path: Path, start_server: Any,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """The primary is down, so a fallback process serves: removing that fallback, or changing
    its command, would kill the server under its stream and drop its memory from the budget."""
    monkeypatch.setenv("SWAPPER_STATE_DIR", str(tmp_path / "state"))
    config = tmp_path / "swapper_config.yaml"
    dead = f"http://127.0.0.1:{free_port()}"
    fallback = {"backend": "local", "served_name": "m-local", "size_gb": 1}
    fallback_config(config, dead, fallback)
    gateway = start_server(create_app(load_config(config, env={}),
                                      loader=file_loader(str(config))))
    received: list[bytes] = []

    def stream() -> None:
        with httpx.stream("POST", gateway.url + "/v1/chat/completions",
                          **ask("m", stream=True, max_tokens=200)) as response:
            received.extend(response.iter_bytes())

    streaming = threading.Thread(target=stream)
    streaming.start()
    wait_until(lambda: bool(received), timeout=30, message="the fallback streaming")
    services = gateway.server.config.app.state.services
    process = services.drivers["local"]._processes["m@local"]
    for change in (None, fallback | {"served_name": "m-other"}):
        fallback_config(config, dead, change)
        refused = reload(gateway)
        assert refused.status_code == 400, refused.text
        assert "fallback on backend 'local' is in use" in refused.text
    fallback_config(config, dead, fallback, startup_delay="0.2")  # another cmd
    assert reload(gateway).status_code == 400
    streaming.join(30)
    assert b"".join(received).endswith(b"data: [DONE]\n\n")  # not cut
    assert services.drivers["local"]._processes["m@local"] is process  # the same server
    assert process.serving
    # Idle but resident, it still holds its memory: removing it still waits for an unload.
    fallback_config(config, dead, None)
    assert reload(gateway).status_code == 400
    route = services.scheduler.slots["m@local"]
    assert route.residency.state is State.LOADED and route.model.size_gb == 1
