"""The vllm-sleep and process drivers behind the gateway, with real servers and processes."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.emulators import openai_server as vllm_emulator
from tests.servers import emulator, reaped, wait_until

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def _state_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Process backends record their servers in the test's own state directory."""
    monkeypatch.setenv("SWAPPER_STATE_DIR", str(tmp_path / "state"))


def ask(model: str) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "hello"}]}


def test_vllm_sleep_mode_swaps_two_servers(start_server: Any, start_gateway: Any) -> None:
    first = start_server(vllm_emulator.create_app(["org/a"], sleep_mode=True, wake_delay=0.05,
                                                  sleep_delay=0.01))
    second = start_server(vllm_emulator.create_app(["org/b"], sleep_mode=True, wake_delay=0.05,
                                                   sleep_delay=0.01))
    for server in (first, second):  # both start asleep, as the operator would leave them
        httpx.post(server.url + "/sleep?level=1")
    gateway = start_gateway({
        "swapper": {"mode": "single-active"},
        "batching": {"window_ms": 0, "min_residency_ms": 0},
        "backends": {"va": {"kind": "vllm-sleep", "base_url": first.url},
                     "vb": {"kind": "vllm-sleep", "base_url": second.url}},
        "models": {"a": {"backend": "va", "served_name": "org/a", "size_gb": 10},
                   "b": {"backend": "vb", "served_name": "org/b", "size_gb": 10}},
    })
    a, b = emulator(first), emulator(second)
    assert httpx.post(gateway.url + "/v1/chat/completions", json=ask("a")).status_code == 200
    assert (a.sleeping, a.wake_count) == (False, 1)
    assert httpx.post(gateway.url + "/v1/chat/completions", json=ask("b"),
                      timeout=10).status_code == 200
    assert (a.sleeping, a.sleep_count, b.sleeping) == (True, 2, False)
    assert a.sleeps_while_busy == 0
    assert httpx.get(gateway.url + "/status").json()["loaded_models"] == ["b"]


def process_config(**backend: Any) -> dict[str, Any]:
    cmd = (f"{sys.executable} -m tests.emulators.openai_server --port {{port}} "
           "--model {served_name} --startup-delay 0.2")
    return {
        "swapper": {"mode": "single-active", "model_swap_timeout": 30},
        "batching": {"window_ms": 0, "min_residency_ms": 0},
        "backends": {"local": {"kind": "process", "cmd": cmd, "start_timeout": 20,
                               "stop_grace": 5, "env": {"PYTHONPATH": ROOT}, **backend}},
        "models": {"tiny-a": {"backend": "local", "served_name": "tiny-a", "size_gb": 1},
                   "tiny-b": {"backend": "local", "served_name": "tiny-b", "size_gb": 1}},
    }


def test_process_models_swap_and_recover_from_a_crash(start_gateway: Any) -> None:
    gateway = start_gateway(process_config())
    driver = gateway.app.state.services.drivers["local"]
    first = httpx.post(gateway.url + "/v1/chat/completions", json=ask("tiny-a"), timeout=30)
    assert first.status_code == 200 and first.json()["model"] == "tiny-a"
    pid_a = driver._processes["tiny-a"].pid
    # Swapping to b stops a's process.
    assert httpx.post(gateway.url + "/v1/chat/completions", json=ask("tiny-b"),
                      timeout=30).status_code == 200
    wait_until(lambda: reaped(pid_a), message="tiny-a process gone")
    # b crashes while loaded: the gateway notices, marks it failed, and reloads on demand.
    pid_b = driver._processes["tiny-b"].pid
    os.kill(pid_b, signal.SIGKILL)
    wait_until(lambda: httpx.get(gateway.url + "/models/tiny-b").json()["state"] == "failed",
               message="crash noticed")
    assert "signal" in httpx.get(gateway.url + "/models/tiny-b").json()["error"]
    again = httpx.post(gateway.url + "/v1/chat/completions", json=ask("tiny-b"), timeout=30)
    assert again.status_code == 200
    assert driver._processes["tiny-b"].pid != pid_b


