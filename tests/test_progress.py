"""Live progress: while a model loads, the log says how long it has run against its deadline,
every few seconds; a streaming client waiting for it hears the elapsed seconds too."""

from __future__ import annotations

import threading
from typing import Any

import httpx
from structlog.testing import capture_logs

from gateway.app import create_app
from gateway.config.reader import parse_config
from tests.emulators import ollama as ollama_emulator
from tests.servers import wait_until

MESSAGES = [{"role": "user", "content": "hi"}]


def test_a_long_load_is_logged_as_it_runs(start_server: Any) -> None:
    slow = start_server(ollama_emulator.create_app({"a:7b": 4.0}, load_delay=2.5))
    gateway = start_server(create_app(parse_config({
        "swapper": {"load_timeout_s": 60},
        "server": {"stream_hold_s": 0.2, "heartbeat_s": 0.5},
        "backends": {"ollama": {"kind": "ollama", "base_url": slow.url}},
        "models": {"alpha": {"path": "ollama:a:7b", "size_gb": 4.0}},
    }, source="test-config", env={}), progress_every_s=0.25))
    streamed: list[bytes] = []

    def ask() -> None:
        body = {"model": "alpha", "messages": MESSAGES, "stream": True}
        with httpx.stream("POST", gateway.url + "/v1/chat/completions", json=body,
                          timeout=30) as answer:
            streamed.extend(answer.iter_raw())

    with capture_logs() as logs:
        client = threading.Thread(target=ask)
        client.start()
        wait_until(lambda: any(e["event"] == "model.load_progress" and e["elapsed_s"] >= 2
                               for e in logs), timeout=20, message="the load's progress logged")
        client.join(30)
    progress = [e for e in logs if e["event"] == "model.load_progress"]
    assert progress[0]["message"] == f"loading alpha: {progress[0]['elapsed_s']:.0f} s of 60 s"
    assert progress[0]["elapsed_s"] >= 1  # a short load is not worth a line
    assert {e["model"] for e in progress} == {"alpha"} and progress[-1]["timeout_s"] == 60
    elapsed = [e["elapsed_s"] for e in progress]
    assert elapsed == sorted(elapsed) and len(elapsed) >= 3  # every few seconds, growing
    assert not [e for e in logs[logs.index(next(e for e in logs if e["event"] == "model.loaded")):]
                if e["event"] == "model.load_progress"]  # and not once it is done
    assert b": loading alpha (" in b"".join(streamed)  # the client's keep-alive says it too
