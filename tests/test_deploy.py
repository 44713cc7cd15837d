"""The Dockerfile, checked as far as possible without docker.

Its key lines are read from the file, and its ENTRYPOINT + CMD and its HEALTHCHECK command are run
directly from the venv, with the image's environment, as the container would run them.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.servers import free_port

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = (ROOT / "Dockerfile").read_text(encoding="utf-8")
BIN = Path(sys.executable).parent


def instructions(keyword: str) -> list[str]:
    """The arguments of every `keyword` instruction, continuation lines joined."""
    joined = re.sub(r"\\\n\s*", " ", DOCKERFILE)
    return [line.split(None, 1)[1].strip() for line in joined.splitlines()
            if line.split(None, 1)[:1] == [keyword]]


def image_env() -> dict[str, str]:
    """The runtime stage's ENV (KEY=VALUE forms only), `$PATH` left out: ours runs the venv."""
    pairs = re.findall(r"(\w+)=(\S+)", instructions("ENV")[-1])
    return {key: value for key, value in pairs if key != "PATH"}


def test_dockerfile_key_lines() -> None:
    stages = instructions("FROM")
    assert len(stages) == 2 and stages[1].endswith("AS runtime"), "multi-stage build"
    assert re.search(r"PYTHON_IMAGE=python:3\.11-slim", DOCKERFILE)
    user = instructions("USER")[-1].split(":")[0]
    assert user not in ("root", "0"), "runs as a non-root user"
    assert instructions("EXPOSE") == ["8890"]
    assert json.loads(instructions("ENTRYPOINT")[0]) == ["swapper-gateway"]
    assert json.loads(instructions("CMD")[0]) == ["serve"]
    assert image_env()["SWAPPER_CONFIG_PATH"] == "/etc/swapper/swapper_config.yaml"
    assert "examples/swapper_config.yaml /etc/swapper/swapper_config.yaml" in instructions("COPY")
    assert image_env()["SWAPPER_HEALTH_URL"] == "http://127.0.0.1:8890/health"
    assert "CMD" in instructions("HEALTHCHECK")[0]


def healthcheck_command() -> list[str]:
    _, exec_form = instructions("HEALTHCHECK")[0].split("CMD", 1)
    command = json.loads(exec_form)
    assert command[0] == "python", "the image has no curl; python asks /health"
    return [sys.executable, *command[1:]]


@dataclass
class Gateway:
    process: subprocess.Popen[bytes]
    health_url: str
    log: Path

    def output(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")


@pytest.fixture
def gateway(tmp_path: Path) -> Iterator[Gateway]:
    """ENTRYPOINT + CMD with the image's environment; the config as the image ships it."""
    port = free_port()
    config = tmp_path / "swapper_config.yaml"
    config.write_text((ROOT / "examples" / "swapper_config.yaml").read_text(encoding="utf-8"))
    env = {**os.environ, **image_env(), "SWAPPER_CONFIG_PATH": str(config),
           "OLLAMA_BASE_URL": f"http://127.0.0.1:{free_port()}"}  # nobody listens: still healthy
    command = [str(BIN / json.loads(instructions("ENTRYPOINT")[0])[0]),
               *json.loads(instructions("CMD")[0]), "--port", str(port)]
    log = tmp_path / "gateway.log"
    with log.open("wb") as sink:  # a file, not a pipe: a full pipe would block the gateway
        process = subprocess.Popen(command, env=env, cwd=tmp_path, stdout=sink,
                                   stderr=subprocess.STDOUT)
    try:
        yield Gateway(process, f"http://127.0.0.1:{port}/health", log)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_entrypoint_serves_health_and_stops_cleanly_on_sigterm(gateway: Gateway) -> None:
    check = healthcheck_command()
    env = {**os.environ, "SWAPPER_HEALTH_URL": gateway.health_url}
    deadline = time.monotonic() + 20
    while subprocess.run(check, env=env, capture_output=True, check=False).returncode != 0:
        assert gateway.process.poll() is None, gateway.output()
        assert time.monotonic() < deadline, "HEALTHCHECK never passed"
        time.sleep(0.1)
    gateway.process.send_signal(signal.SIGTERM)
    # uvicorn shuts down gracefully, then re-raises the signal it caught: a normal termination.
    assert gateway.process.wait(timeout=15) in (0, -signal.SIGTERM), gateway.output()
    assert "Traceback" not in gateway.output()
    assert "gateway.stopped" in gateway.output()


def test_healthcheck_fails_when_nothing_answers() -> None:
    env = {**os.environ, "SWAPPER_HEALTH_URL": f"http://127.0.0.1:{free_port()}/health"}
    assert subprocess.run(healthcheck_command(), env=env, capture_output=True,
                          check=False).returncode != 0
