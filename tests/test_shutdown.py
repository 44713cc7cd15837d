"""Graceful shutdown of a real gateway process: streams finish, its own processes stop."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import yaml

from tests.emulators import openai_server as vllm_emulator
from tests.servers import free_port, reaped, wait_until

ROOT = Path(__file__).resolve().parent.parent




def test_sigterm_lets_streams_finish_and_stops_owned_processes(start_server: Any,
                                                               tmp_path: Path) -> None:
    slow = start_server(vllm_emulator.create_app(["org/m1"], tokens=60, token_delay=0.02))
    port = free_port()
    config = tmp_path / "swapper_config.yaml"
    config.write_text(yaml.safe_dump({
        "server": {"shutdown_grace_s": 20},
        "backends": {
            "vllm": {"kind": "openai", "base_url": slow.url},
            "local": {"kind": "process", "env": {"PYTHONPATH": str(ROOT)},
                      "cmd": f"{sys.executable} -m tests.emulators.openai_server "
                             "--port {port} --model {served_name}"},
        },
        "models": {"m1": {"backend": "vllm", "served_name": "org/m1"},
                   "tiny": {"backend": "local", "served_name": "tiny"}},
    }))
    gateway = subprocess.Popen(
        [sys.executable, "-m", "gateway", "serve", "--config", str(config), "--host",
         "127.0.0.1", "--port", str(port)], cwd=ROOT, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: _answers(url), timeout=20, message="gateway up")
        tiny = httpx.post(url + "/v1/chat/completions", timeout=30, json={
            "model": "tiny", "messages": [{"role": "user", "content": "hi"}]})
        assert tiny.status_code == 200
        child = _child_pids(gateway.pid)
        assert child, "the process backend's server should be running"
        body = {"model": "m1", "messages": [{"role": "user", "content": "hi"}], "stream": True}
        with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=30) as stream:
            chunks = stream.iter_bytes()
            received = [next(chunks)]
            gateway.send_signal(signal.SIGTERM)
            received.extend(chunks)
        assert b"".join(received).endswith(b"data: [DONE]\n\n")  # the stream was not cut
        gateway.wait(30)
        assert all(reaped(pid) for pid in child)
    finally:
        if gateway.poll() is None:
            gateway.kill()
            gateway.wait()
    assert "Traceback" not in (gateway.stderr.read() if gateway.stderr else "")


def _answers(url: str) -> bool:
    try:
        return httpx.get(url + "/health", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def _child_pids(parent: int) -> list[int]:
    children = Path(f"/proc/{parent}/task/{parent}/children")
    return [int(pid) for pid in children.read_text().split()] if children.exists() else []
