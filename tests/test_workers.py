"""`serve --workers N`: several worker processes, coordinated through Redis, one /metrics view."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import yaml

from tests.emulators import openai_server as vllm_emulator
from tests.servers import free_port, stop_process, wait_until

ROOT = Path(__file__).resolve().parent.parent


def write_config(path: Path, backend_url: str, redis_url: str | None) -> None:
    path.write_text(yaml.safe_dump({
        "backends": {"vllm": {"kind": "openai", "base_url": backend_url}},
        "models": {"m1": {"backend": "vllm", "served_name": "org/m1"}},
        "cache": {"redis_url": redis_url, "namespace": f"workers{os.getpid()}"}
        if redis_url else {},
    }))


def serve(config: Path, port: int, env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "gateway", "serve", "--config", str(config), "--host",
         "127.0.0.1", "--port", str(port), "--workers", "2"],
        cwd=ROOT, env={**os.environ, **env}, stderr=subprocess.PIPE, text=True)


def test_several_workers_need_redis(tmp_path: Path, start_server: Any) -> None:
    backend = start_server(vllm_emulator.create_app(["org/m1"]))
    config = tmp_path / "swapper_config.yaml"
    write_config(config, backend.url, None)
    refused = serve(config, free_port(), {})
    assert refused.wait(30) == 2
    assert "cache.redis_url" in (refused.stderr.read() if refused.stderr else "")


def test_metrics_add_up_across_workers(tmp_path: Path, start_server: Any,
                                       redis_url: str) -> None:
    backend = start_server(vllm_emulator.create_app(["org/m1"]))
    config = tmp_path / "swapper_config.yaml"
    write_config(config, backend.url, redis_url)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    metrics_dir = tmp_path / "metrics"
    metrics_dir.mkdir()
    gateway = serve(config, port, {"PROMETHEUS_MULTIPROC_DIR": str(metrics_dir)})

    def up() -> bool:
        try:
            return httpx.get(url + "/health", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_until(up, timeout=30, message="workers up")
        body = {"model": "m1", "messages": [{"role": "user", "content": "hi"}]}
        for _ in range(20):  # a new connection each: the kernel spreads them over the workers
            assert httpx.post(url + "/v1/chat/completions", json=body).status_code == 200
        counted = re.compile(r'swapper_model_requests_total\{model="m1",status="200"\} (\S+)')
        for _ in range(5):  # whichever worker answers the scrape
            text = httpx.get(url + "/metrics", headers={"accept": "text/plain"}).text
            match = counted.search(text)
            assert match and float(match.group(1)) == 20.0
        assert emulator_requests(backend) == 20
        writers = {f.stem.rsplit("_", 1)[-1] for f in metrics_dir.glob("counter_*.db")}
        assert len(writers) == 2  # both workers served, and the scrapes added them up
    finally:
        stop_process(gateway, grace_s=30)


def emulator_requests(server: Any) -> int:
    return server.server.config.app.state.emulator.requests["org/m1"]
