"""`swapper-gateway demo` with llama.cpp's real server, as the README runs it, and the client
snippet it prints, run as printed."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.servers import free_port, reaped, wait_until
from tests.test_cli import ROOT, Gateway

pytestmark = pytest.mark.e2e


@pytest.fixture
def demo(llama_server: Path, tmp_path: Path) -> Iterator[Gateway]:
    port = free_port()
    gateway = Gateway("demo", "--port", str(port), "--dir", str(tmp_path / "demo"),
                      "--log-format", "console", port=port,
                      env={"LLAMA_SERVER": str(llama_server)})
    try:
        yield gateway.wait_up(timeout=60)
    finally:
        gateway.stop()


def test_the_demo_and_its_printed_snippet(demo: Gateway) -> None:
    demo.wait_for("swapper-gateway serve --config")  # the instructions' last line
    snippet = textwrap.dedent(demo.output.split("<<'EOF'", 1)[1].split("\n", 1)[1]
                              .split("\n  EOF", 1)[0])
    ran = subprocess.run([sys.executable, "-c", snippet], capture_output=True, text=True,
                         timeout=180, cwd=ROOT)
    assert ran.returncode == 0, ran.stderr
    printed = ran.stdout.splitlines()
    assert [line.split()[0] for line in printed] == ["tiny-chat", "small-chat"] * 2
    assert all(len(line.split(maxsplit=1)) == 2 for line in printed)  # real tokens came back
    loads = [d["model"] for d in httpx.get(demo.url + "/status").json()["decisions"]
             if d["action"] == "load"]
    assert loads[::-1][-4:] == ["tiny-chat", "small-chat", "tiny-chat", "small-chat"]
    demo.wait_for("model.loaded                   model=small-chat")  # shown as it happens
    embedded = httpx.post(demo.url + "/v1/embeddings", timeout=60,
                          json={"model": "tiny-embed", "input": "hello"})
    assert embedded.status_code == 200 and embedded.json()["data"][0]["embedding"]
    servers = children(demo.process.pid)
    assert servers, "the resident model's llama-server should be running"
    demo.process.send_signal(signal.SIGINT)
    assert demo.wait_exit(timeout=60) == 0
    assert "Traceback" not in demo.output
    wait_until(lambda: all(reaped(pid) for pid in servers), timeout=15,
               message="the demo's llama-server processes gone")


def children(parent: int) -> list[int]:
    listed = Path(f"/proc/{parent}/task/{parent}/children")
    return [int(pid) for pid in listed.read_text().split()] if listed.exists() else []
