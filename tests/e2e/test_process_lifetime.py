"""Real `llama-server` processes never outlive the gateway: killed with it (even by SIGKILL),
found and stopped by the next start when something escaped, and their failures reported to
clients as one line without the server's paths or output."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.e2e.conftest import CHAT_A, CHAT_B, gateway_config
from tests.e2e.test_llama_cpp import pids_running
from tests.servers import ServerThread, free_port, stop_process, wait_until

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
GONE_WITHIN_S = 5.0
HELLO = [{"role": "user", "content": "hello"}]


class Gateway:
    """`swapper-gateway serve` as a process of its own, so that a test can SIGKILL it."""

    def __init__(self, config: Path, state_dir: Path, log: Path) -> None:
        self.url = f"http://127.0.0.1:{free_port()}"
        self.log = log
        with log.open("a") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "gateway", "serve", "--config", str(config), "--host",
                 "127.0.0.1", "--port", self.url.rsplit(":", 1)[1]],
                cwd=ROOT, stdout=out, stderr=out,
                env={**os.environ, "SWAPPER_STATE_DIR": str(state_dir)})
        wait_until(self._ready, timeout=30, message="gateway ready")

    def _ready(self) -> bool:
        assert self.process.poll() is None, self.log.read_text()[-2000:]
        try:
            return httpx.get(self.url + "/ready", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    def chat(self, model: str) -> httpx.Response:
        return httpx.post(self.url + "/v1/chat/completions", timeout=60,
                          json={"model": model, "messages": HELLO, "max_tokens": 4})

    def children(self) -> list[int]:
        """Processes whose parent is the gateway (its model servers and the watchdog)."""
        found = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                except (OSError, IndexError, ValueError):
                    continue
                if ppid == self.process.pid:
                    found.append(int(entry.name))
        return found

    def kill(self) -> None:
        self.process.kill()
        self.process.wait()


@pytest.fixture(autouse=True)
def own_state_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Gateways started in this process keep their state in the test's directory too."""
    monkeypatch.setenv("SWAPPER_STATE_DIR", str(tmp_path / "state-in-process"))


@pytest.fixture
def gateways(tmp_path: Path) -> Iterator[Callable[[dict[str, Any]], Gateway]]:
    """Start gateways on one config file and one state directory, as restarts would."""
    started: list[Gateway] = []

    def start(config: dict[str, Any]) -> Gateway:
        path = tmp_path / "swapper_config.yaml"
        path.write_text(yaml.safe_dump(config))
        started.append(Gateway(path, tmp_path / "state", tmp_path / "gateway.log"))
        return started[-1]

    yield start
    for gateway in started:
        if gateway.process.poll() is None:
            stop_process(gateway.process, grace_s=20)
    assert "Traceback" not in (tmp_path / "gateway.log").read_text()


def dead(pid: int) -> bool:
    """Not running (an orphan may linger as a zombie until init reaps it)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return True
    return state == "Z"


def cmdline(pid: int) -> list[bytes]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return []


def live_servers(*paths: Path) -> list[int]:
    return [pid for path in paths for pid in pids_running(path) if not dead(pid)]


def both_resident(llama_server: Path, tiny_models: dict[str, Path]) -> dict[str, Any]:
    config = gateway_config(llama_server, tiny_models, CHAT_A, CHAT_B)
    return {**config, "swapper": {"mode": "multi-active", "max_concurrent_models": 2}}


def test_sigkill_of_the_gateway_takes_its_llama_servers_along(
        gateways: Callable[[dict[str, Any]], Gateway], llama_server: Path,
        tiny_models: dict[str, Path], tmp_path: Path) -> None:
    config = both_resident(llama_server, tiny_models)
    gateway = gateways(config)
    assert gateway.chat(CHAT_A).status_code == 200 and gateway.chat(CHAT_B).status_code == 200
    servers = live_servers(tiny_models[CHAT_A], tiny_models[CHAT_B])
    assert len(servers) == 2

    gateway.kill()

    wait_until(lambda: not live_servers(tiny_models[CHAT_A], tiny_models[CHAT_B]),
               timeout=GONE_WITHIN_S, message="llama-servers gone with the gateway")
    again = gateways(config)  # same state directory: nothing stale to find, nothing in the way
    answer = again.chat(CHAT_A)
    assert answer.status_code == 200 and answer.json()["choices"][0]["message"]["content"]
    assert len(live_servers(tiny_models[CHAT_A])) == 1
    assert len(list((tmp_path / "state" / "processes").glob("*.json"))) == 1  # the new one


def test_a_server_that_escaped_is_stopped_by_the_next_start(
        gateways: Callable[[dict[str, Any]], Gateway], llama_server: Path,
        tiny_models: dict[str, Path]) -> None:
    """A `cmd` that wraps the server in a script (as many deployments do) leaves it one step
    from the gateway, out of reach of the death signal; with the watchdog killed as well (the
    OOM killer, say), the server survives, holding its memory, until the next gateway starts."""
    config = gateway_config(llama_server, tiny_models, CHAT_A)
    cmd = config["backends"]["llama"]["cmd"]
    config["backends"]["llama"]["cmd"] = shlex.join(["sh", "-c", f"{cmd} & wait"])
    gateway = gateways(config)
    assert gateway.chat(CHAT_A).status_code == 200
    [server] = live_servers(tiny_models[CHAT_A])
    [watchdog] = [c for c in gateway.children() if b"-c" in cmdline(c) and b"sh" not in cmdline(c)]
    os.kill(watchdog, signal.SIGKILL)
    gateway.kill()  # the wrapper gets its death signal; the server it started does not
    wait_until(lambda: not [c for c in gateway.children() if not dead(c)],
               message="the gateway's children gone")
    assert live_servers(tiny_models[CHAT_A]) == [server]  # escaped

    again = gateways(config)  # ready only once the leftover is stopped

    assert dead(server)
    assert again.chat(CHAT_A).status_code == 200
    assert len(live_servers(tiny_models[CHAT_A])) == 1
    assert "process.leftover_stopped" in gateway.log.read_text()


def test_a_missing_model_file_is_one_line_and_not_worth_retrying(
        start_gateway: Callable[[dict[str, Any]], ServerThread], llama_server: Path,
        tmp_path: Path, tiny_models: dict[str, Path]) -> None:
    weights = tmp_path / "secret-dir" / f"{CHAT_A}.gguf"
    weights.parent.mkdir()
    weights.write_bytes(tiny_models[CHAT_A].read_bytes())
    gateway = start_gateway(gateway_config(llama_server, {CHAT_A: weights}, CHAT_A))
    weights.unlink()  # gone after the config was read: moved, or a volume not mounted

    answer = httpx.post(gateway.url + "/v1/chat/completions", timeout=60,
                        json={"model": CHAT_A, "messages": HELLO})

    assert answer.status_code == 503
    assert answer.headers["x-should-retry"] == "false"
    message = answer.json()["error"]["message"]
    assert message.endswith(f"model file not found: {CHAT_A}.gguf")
    assert "secret-dir" not in answer.text and "\n" not in message


def test_a_file_llama_cpp_cannot_read_is_reported_in_one_line(
        start_gateway: Callable[[dict[str, Any]], ServerThread], llama_server: Path,
        tmp_path: Path, tiny_models: dict[str, Path]) -> None:
    broken = tmp_path / "secret-dir" / f"{CHAT_A}.gguf"
    broken.parent.mkdir()
    broken.write_bytes(b"GGUF but not really")
    gateway = start_gateway(gateway_config(llama_server, {CHAT_A: broken}, CHAT_A))

    answer = httpx.post(gateway.url + "/v1/chat/completions", timeout=60,
                        json={"model": CHAT_A, "messages": HELLO})

    assert answer.status_code == 503, answer.text
    message = answer.json()["error"]["message"]
    assert "the server exited with code" in message
    assert "\n" not in message and "secret-dir" not in answer.text and len(message) < 400
