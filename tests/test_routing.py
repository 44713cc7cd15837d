"""What a handler or the router raises, answered through a real socket: a crash is a 500 in the
front's own error shape that says nothing of the internals, an exception after the answer began
cuts the connection, and the gateway serves on either way."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from structlog.testing import capture_logs

from gateway.config.schema import ModelConfig
from tests.emulators import openai_server as vllm_emulator
from tests.servers import ServerThread, wait_until

SECRET = "internals at http://10.0.0.7:8000"


@pytest.fixture(scope="module")
def backend() -> Iterator[ServerThread]:
    server = ServerThread(vllm_emulator.create_app(["org/m1"], tokens=3)).start()
    yield server
    server.stop()


@pytest.fixture
def gateway(start_gateway: Any, backend: ServerThread) -> ServerThread:
    server = start_gateway({
        "backends": {"vllm": {"kind": "openai", "base_url": backend.url}},
        "models": {"m1": {"backend": "vllm", "served_name": "org/m1"},
                   "boom": {"backend": "vllm", "served_name": "org/m1"}},
    })
    catalog = server.app.state.services.catalog  # type: ignore[attr-defined]
    resolve = catalog.resolve

    def resolving(name: str) -> ModelConfig:  # a bug, for the model named "boom"
        if name == "boom":
            raise RuntimeError(SECRET)
        return resolve(name)

    catalog.resolve = resolving
    return server


def chat(model: str, **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], **extra}


def assert_serves(gateway: ServerThread) -> None:
    answer = httpx.post(f"{gateway.url}/v1/chat/completions", json=chat("m1"), timeout=10)
    assert answer.status_code == 200 and answer.json()["choices"]


def test_a_crash_is_a_500_in_the_fronts_shape_that_hides_the_internals(
        gateway: ServerThread) -> None:
    with capture_logs() as logs:
        openai = httpx.post(f"{gateway.url}/v1/chat/completions", json=chat("boom"), timeout=10)
        ollama = httpx.post(f"{gateway.url}/api/chat", json=chat("boom", stream=False),
                            timeout=10)
        wait_until(lambda: sum(e["event"] == "request.done" for e in logs) == 2,
                   message="both access lines")
    assert openai.status_code == 500 and ollama.status_code == 500
    assert openai.json()["error"]["code"] == "internal_error"
    assert openai.json()["error"]["type"] == "server_error"
    assert isinstance(ollama.json()["error"], str)  # Ollama's {"error": "..."}
    for answer in (openai, ollama):
        assert "10.0.0.7" not in answer.text and "Traceback" not in answer.text
    crashes = [e for e in logs if e["event"] == "request.crashed"]
    assert len(crashes) == 2 and SECRET in crashes[0]["error"]
    done = [e for e in logs if e["event"] == "request.done"]
    assert {(e["status"], e["error"]) for e in done} == {(500, "internal_error")}
    assert_serves(gateway)


def test_a_crash_after_the_answer_began_cuts_the_connection(gateway: ServerThread) -> None:
    proxy = gateway.app.state.services.proxy  # type: ignore[attr-defined]
    renamer = proxy.renamer

    class Breaking:
        """A relay step that passes its first chunk, then fails."""

        fed = 0

        def feed(self, chunk: bytes) -> bytes:
            self.fed += 1
            if self.fed > 1:
                raise RuntimeError(SECRET)
            return chunk

        def flush(self) -> bytes:
            raise RuntimeError(SECRET)

    proxy.renamer = lambda call, target: Breaking()
    with capture_logs() as logs:
        with pytest.raises(httpx.RemoteProtocolError):  # an incomplete chunked body
            with httpx.stream("POST", f"{gateway.url}/v1/chat/completions",
                              json=chat("m1", stream=True), timeout=10) as answer:
                assert answer.status_code == 200
                for _ in answer.iter_bytes():
                    pass
        wait_until(lambda: any(e["event"] == "request.crashed" for e in logs),
                   message="the crash logged")
    proxy.renamer = renamer
    assert_serves(gateway)


@pytest.mark.parametrize(("method", "path", "status"), [
    ("GET", "/v1/nothing-here", 404), ("GET", "/v1/chat/completions", 405),
    ("GET", "/api/nothing-here", 404), ("GET", "/api/chat", 405),
])
def test_the_routers_refusals_speak_the_fronts_language(gateway: ServerThread, method: str,
                                                       path: str, status: int) -> None:
    answer = httpx.request(method, f"{gateway.url}{path}", timeout=10)
    assert answer.status_code == status
    error = answer.json()["error"]
    message = error if path.startswith("/api/") else error["message"]
    assert path in message
    if status == 405:
        assert answer.headers["allow"] == "POST"
