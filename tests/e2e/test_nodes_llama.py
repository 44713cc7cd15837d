"""Two nodes of real llama.cpp servers behind one gateway: each node its own budget and swap lane.

Each node is a `process` backend starting `llama-server` through a small wrapper that plays the
node: it starts the server after a delay (a model that takes a moment to load, so that two loads
at once and two in a row cannot be mistaken), and refuses to start any while the node is "down".
The models' GGUF files live in one directory per node, so every `llama-server` process on the
host can be counted per node, from /proc, while the test runs.
"""

from __future__ import annotations

import os
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.demo import SERVER_ARGS, write_models
from tests.e2e.conftest import CHAT_A, CHAT_B, MODELS, NO_WINDOW, START_TIMEOUT_S
from tests.servers import ServerThread

pytestmark = pytest.mark.e2e

START_DELAY_S = 0.8
NODE = """#!/bin/sh
# One node's llama-server: none starts while the node is down; each takes a moment to load.
if [ -e "$NODE_DIR/down" ]; then echo "node $NODE_DIR is down" >&2; exit 1; fi
sleep "$START_DELAY"
exec "$@"
"""
HELLO = [{"role": "user", "content": "hello"}]


class Fleet:
    """The two node directories (their GGUF files and the wrapper's `down` flag)."""

    def __init__(self, root: Path, binary: Path) -> None:
        self.root, self.binary = root, binary
        self.wrapper = root / "node.sh"
        self.wrapper.write_text(NODE)
        self.wrapper.chmod(0o755)
        self.dirs = {name: root / name for name in ("left", "right")}
        for directory in self.dirs.values():
            write_models(directory, [m for m in MODELS if m.name in (CHAT_A, CHAT_B)])
            shutil.copy(directory / f"{CHAT_A}.gguf", directory / "shared.gguf")

    def config(self) -> dict[str, Any]:
        cmd = f"{self.wrapper} {self.binary} {SERVER_ARGS} -t 1 -c 256"
        backends = {
            f"llama-{name}": {"kind": "process", "node": name, "cmd": cmd,
                              "start_timeout": START_TIMEOUT_S, "stop_grace": 5,
                              "env": {"NODE_DIR": str(directory),
                                      "START_DELAY": str(START_DELAY_S)}}
            for name, directory in self.dirs.items()
        }
        return {
            "swapper": {"model_swap_timeout": 60},
            "batching": NO_WINDOW | {"min_residency_ms": 0},
            "server": {"stream_hold_s": 0},
            "nodes": {"left": {"mode": "single-active", "memory_budget_gb": 4},
                      "right": {"mode": "single-active", "memory_budget_gb": 4}},
            "backends": backends,
            "models": {
                CHAT_A: {"backend": "llama-left", "path": str(self.dirs["left"] / "chat-a.gguf")},
                CHAT_B: {"backend": "llama-right",
                         "path": str(self.dirs["right"] / "chat-b.gguf")},
                "shared": {"routes": [
                    {"backend": f"llama-{name}", "path": str(directory / "shared.gguf")}
                    for name, directory in self.dirs.items()]},
            },
        }

    def servers_on(self, node: str) -> int:
        """llama-server processes running now with a model file of this node."""
        prefix = os.fsencode(self.dirs[node]) + b"/"
        count = 0
        for entry in Path("/proc").iterdir():
            try:
                argv = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if any(arg.startswith(prefix) for arg in argv) and not argv[0].endswith(b"sh"):
                count += 1
        return count

    def down(self, node: str) -> None:
        (self.dirs[node] / "down").touch()


@pytest.fixture
def fleet(llama_server: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Fleet:
    monkeypatch.setenv("SWAPPER_STATE_DIR", str(tmp_path / "state"))
    return Fleet(tmp_path, llama_server)


@pytest.fixture
def watch(fleet: Fleet) -> Iterator[Callable[[], dict[str, int]]]:
    """The most llama-server processes seen at once on each node, sampled the whole test."""
    peak = {node: 0 for node in fleet.dirs}
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            for node in peak:
                peak[node] = max(peak[node], fleet.servers_on(node))
            stop.wait(0.01)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    yield lambda: dict(peak)
    stop.set()
    sampler.join()


def chat(gateway: ServerThread, model: str) -> httpx.Response:
    return httpx.post(f"{gateway.url}/v1/chat/completions", timeout=60,
                      json={"model": model, "messages": HELLO, "max_tokens": 4})


def loaded_span(gateway: ServerThread, name: str) -> tuple[float, float]:
    """(start, end) of a route's last load, wall clock, from the read model."""
    model = gateway.app.state.services.scheduler.status().models[name]  # type: ignore[attr-defined]
    assert model.loaded_at is not None and model.last_load_s is not None
    return model.loaded_at - model.last_load_s, model.loaded_at


def test_loads_on_two_nodes_of_real_servers_run_at_once(
        start_gateway: Callable[..., ServerThread], fleet: Fleet,
        watch: Callable[[], dict[str, int]]) -> None:
    gateway = start_gateway(fleet.config())
    together = threading.Barrier(2)

    def call(model: str) -> int:
        together.wait()
        return chat(gateway, model).status_code

    started = time.monotonic()
    with ThreadPoolExecutor(2) as pool:
        assert list(pool.map(call, [CHAT_A, CHAT_B])) == [200, 200]
    took = time.monotonic() - started
    (a_start, a_end), (b_start, b_end) = loaded_span(gateway, CHAT_A), loaded_span(gateway, CHAT_B)
    assert max(a_start, b_start) < min(a_end, b_end), "the two loads did not overlap"
    assert took < 2 * START_DELAY_S + 1.0, f"{took:.2f} s: the loads ran one after the other"
    assert watch() == {"left": 1, "right": 1}


def test_each_nodes_budget_holds_with_real_processes(
        start_gateway: Callable[..., ServerThread], fleet: Fleet,
        watch: Callable[[], dict[str, int]]) -> None:
    gateway = start_gateway(fleet.config())
    trace = [CHAT_A, CHAT_B, "shared", CHAT_A, "shared", CHAT_B, CHAT_A, "shared"]
    with ThreadPoolExecutor(4) as pool:
        assert [r.status_code for r in pool.map(lambda m: chat(gateway, m), trace)] == [
            200] * len(trace)
    assert max(watch().values()) == 1  # single-active on both, never two servers at once
    status = httpx.get(f"{gateway.url}/status", timeout=10).json()
    for node in status["nodes"].values():
        assert len(node["resident_models"]) <= 1
        assert node["measured_gb"] is None or node["measured_gb"] > 0  # what the RSS says


def test_a_placed_model_goes_where_there_is_room_and_stays_there(
        start_gateway: Callable[..., ServerThread], fleet: Fleet) -> None:
    gateway = start_gateway(fleet.config())
    assert chat(gateway, CHAT_A).status_code == 200  # left is full now
    assert chat(gateway, "shared").status_code == 200
    assert (fleet.servers_on("left"), fleet.servers_on("right")) == (1, 1)
    status = httpx.get(f"{gateway.url}/status", timeout=10).json()
    assert status["models"]["shared"]["routes"] == {"llama-left": "unloaded",
                                                    "llama-right": "loaded"}
    assert status["models"][CHAT_A]["status"] == "loaded"  # not evicted for it
    assert chat(gateway, "shared").status_code == 200
    routes = gateway.app.state.services.scheduler.status().routes_of("shared")  # type: ignore[attr-defined]
    assert [r.load_count for r in routes] == [0, 1]


def test_a_node_that_goes_down_has_its_model_served_from_the_other(
        start_gateway: Callable[..., ServerThread], fleet: Fleet) -> None:
    gateway = start_gateway(fleet.config())
    assert chat(gateway, "shared").status_code == 200  # both empty: left, the first route
    assert (fleet.servers_on("left"), fleet.servers_on("right")) == (1, 0)
    fleet.down("left")
    for pid in _pids_on(fleet.dirs["left"]):
        os.kill(pid, 9)  # the node dies, and will start nothing again
    answer = chat(gateway, "shared")
    assert answer.status_code == 200, answer.text
    assert (fleet.servers_on("left"), fleet.servers_on("right")) == (0, 1)
    shown = httpx.get(f"{gateway.url}/status", timeout=10).json()["models"]["shared"]
    assert (shown["status"], shown["serving_backend"]) == ("loaded", "llama-right")


def _pids_on(directory: Path) -> list[int]:
    prefix = os.fsencode(directory) + b"/"
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(arg.startswith(prefix) for arg in argv):
            pids.append(int(entry.name))
    return pids
