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
from typing import Any

import httpx
import pytest

from gateway.demo import INSTALL_COMMAND, TinyModel, find_llama_server, process_cmd, write_models
from tests.servers import free_port, wait_until

CHAT_A, CHAT_B, EMBED = "chat-a", "chat-b", "embed"
MODELS = (TinyModel(CHAT_A, dim=64, layers=2), TinyModel(CHAT_B, dim=128, layers=2),
          TinyModel(EMBED, dim=64, layers=2, embedding=True))
START_TIMEOUT_S = 30.0


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


def gateway_config(binary: Path, paths: dict[str, Path], *names: str,
                   **swapper: Any) -> dict[str, Any]:
    """Single-active gateway over one `process` backend per kind (chat, embedding)."""
    embedding = {m.name for m in MODELS if m.embedding}
    backend = {"kind": "process", "start_timeout": START_TIMEOUT_S, "stop_grace": 5}
    return {
        "swapper": {"mode": "single-active", **swapper},
        "backends": {
            "llama": {**backend, "cmd": process_cmd(binary)},
            "llama-embed": {**backend, "cmd": process_cmd(binary, embedding=True)},
        },
        "models": {name: {"backend": "llama-embed" if name in embedding else "llama",
                          "path": str(paths[name])} for name in names},
    }


class Router:
    """`llama-server` in router mode over a directory of GGUF files, stopped with the test."""

    def __init__(self, binary: Path, models_dir: Path) -> None:
        self.url = f"http://127.0.0.1:{free_port()}"
        port = self.url.rsplit(":", 1)[1]
        # --models-max 0: the gateway alone decides what to evict.
        argv = [str(binary), "--models-dir", str(models_dir), "--models-max", "0",
                "--host", "127.0.0.1", "--port", port]
        self.process = subprocess.Popen(argv, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL, start_new_session=True)

    def healthy(self) -> bool:
        assert self.process.poll() is None, f"router exited with {self.process.returncode}"
        with contextlib.suppress(httpx.HTTPError):
            return httpx.get(f"{self.url}/health", timeout=2).status_code == 200
        return False

    def statuses(self) -> dict[str, str]:
        models = httpx.get(f"{self.url}/models", timeout=5).json()["data"]
        return {entry["id"]: entry["status"]["value"] for entry in models}

    def stop(self) -> None:
        """SIGTERM to the router's group (it and its model children), SIGKILL if that stalls."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


@pytest.fixture
def llama_router(llama_server: Path, tiny_models: dict[str, Path]) -> Iterator[Router]:
    router = Router(llama_server, tiny_models[CHAT_A].parent)
    try:
        wait_until(router.healthy, timeout=START_TIMEOUT_S, message="the llama.cpp router")
        yield router
    finally:
        router.stop()
