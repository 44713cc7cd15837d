"""Real llama.cpp behind the gateway: the server binary, tiny GGUF models, and a router process.

Every test here skips, naming the install command, where llama.cpp's server is not installed.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest

from gateway.demo import INSTALL_COMMAND, TinyModel, find_llama_server, llama_config, write_models
from tests.servers import free_port, wait_until

CHAT_A, CHAT_B, EMBED = "chat-a", "chat-b", "embed"
MODELS = (TinyModel(CHAT_A, dim=64, layers=2), TinyModel(CHAT_B, dim=128, layers=2),
          TinyModel(EMBED, dim=64, layers=2, embedding=True))
START_TIMEOUT_S = 30.0
# Models that load in milliseconds need no window to gather demand before a swap.
NO_WINDOW = {"window_ms": 0}


@pytest.fixture(scope="session")
def llama_server() -> Path:
    pytest.importorskip("gguf", reason="the `demo` extra (gguf, numpy) is not installed")
    binary = find_llama_server()
    if binary is None:
        pytest.skip(f"llama.cpp's server is not installed: {INSTALL_COMMAND} "
                    "(or scripts/install-llama-cpp)")
    return binary


@pytest.fixture(scope="session")
def tiny_models(llama_server: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return write_models(tmp_path_factory.mktemp("gguf"), MODELS)


def gateway_config(binary: Path, paths: dict[str, Path], *names: str) -> dict[str, Any]:
    """Single-active gateway over the named models, each in its own `llama-server` process."""
    models = [m for m in MODELS if m.name in names]
    return {"swapper": {"mode": "single-active"}, "batching": NO_WINDOW,
            **llama_config(binary, models, paths, start_timeout=START_TIMEOUT_S, stop_grace=5)}


class ServerProcess:
    """A server started by a test, in its own process group so that stopping it reaches what it
    forked (the router's model servers, vLLM's engine)."""

    def __init__(self, argv: list[str], port: int, env: dict[str, str] | None = None) -> None:
        self.url = f"http://127.0.0.1:{port}"
        self.process = subprocess.Popen(argv, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL, start_new_session=True,
                                        env={**os.environ, **(env or {})})

    def wait_healthy(self, timeout: float) -> None:
        wait_until(self._healthy, timeout=timeout, message=f"{self.url}/health")

    def _healthy(self) -> bool:
        assert self.process.poll() is None, f"server exited with {self.process.returncode}"
        with contextlib.suppress(httpx.HTTPError):
            return httpx.get(f"{self.url}/health", timeout=2).status_code == 200
        return False

    def stop(self) -> None:
        """SIGTERM to the group, SIGKILL if that stalls."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


S = TypeVar("S", bound=ServerProcess)


@contextlib.contextmanager
def running(server: S, start_timeout: float) -> Iterator[S]:
    try:
        server.wait_healthy(start_timeout)
        yield server
    finally:
        server.stop()


class Router(ServerProcess):
    """`llama-server` in router mode over a directory of GGUF files."""

    def __init__(self, binary: Path, models_dir: Path) -> None:
        port = free_port()
        # --models-max 0: the gateway alone decides what to evict.
        super().__init__([str(binary), "--models-dir", str(models_dir), "--models-max", "0",
                          "--host", "127.0.0.1", "--port", str(port)], port)

    def statuses(self) -> dict[str, str]:
        models = httpx.get(f"{self.url}/models", timeout=5).json()["data"]
        return {entry["id"]: entry["status"]["value"] for entry in models}


@pytest.fixture
def llama_router(llama_server: Path, tmp_path: Path) -> Iterator[Router]:
    """A router over the two chat models and `broken`, a file llama.cpp cannot load."""
    write_models(tmp_path, MODELS[:2])
    (tmp_path / "broken.gguf").write_bytes(b"GGUF but not really")
    with running(Router(llama_server, tmp_path), START_TIMEOUT_S) as router:
        yield router
