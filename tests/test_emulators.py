"""The backend emulators speak the documented protocols, on real sockets.

Shapes are checked with httpx and with the official `openai` client; residency (load, keep_alive,
eviction), failure modes, sleep mode and the subprocess mode are checked by waiting on conditions,
never by sleeping and hoping.
"""

from __future__ import annotations

import json
import re
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Generic, TypeVar

import httpx
import openai
import pytest

from tests.emulators import ollama, openai_server
from tests.emulators.openai_server import embedding_vector, plan_chat, plan_text
from tests.servers import serve, wait_until

ROOT = Path(__file__).resolve().parents[1]
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
            "required": ["city"],
        },
    },
}
ANSWER_SCHEMA = {
    "type": "object",
    "properties": {"answer": {"type": "string"}, "sure": {"type": "boolean"}},
}


def sse_events(raw: bytes) -> list[Any]:
    """Parse an SSE body strictly: only `data: ...` frames, each ended by a blank line."""
    frames = raw.decode().split("\n\n")
    assert frames[-1] == "", "the stream must end with a complete frame"
    assert all(f.startswith("data: ") for f in frames[:-1])
    payloads = [f.removeprefix("data: ") for f in frames[:-1]]
    assert payloads[-1] == "[DONE]"
    return [json.loads(p) for p in payloads[:-1]]


State = TypeVar("State")


@dataclass(frozen=True)
class Backend(Generic[State]):
    """An emulator on a real socket, with clients for it and its live state."""

    url: str
    http: httpx.Client
    sdk: openai.OpenAI
    state: State


def sdk(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="test", max_retries=0)


@contextmanager
def running(app: Any) -> Iterator[Backend[Any]]:
    with (
        serve(app) as server,
        httpx.Client(base_url=server.url) as http,
        sdk(server.url) as client,
    ):
        yield Backend(server.url, http, client, app.state.emulator)


OllamaBackend = Backend[ollama.EmulatorState]
VllmBackend = Backend[openai_server.EmulatorState]


# ---------------------------------------------------------------------------------------------
# Ollama
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def ollama_backend() -> Iterator[OllamaBackend]:
    models = {"llama3": 4.0, "qwen2.5:7b": 5.0, "tiny:1b": 1.0, "nomic-embed-text": 0.3}
    with running(ollama.create_app(models, load_delay=0.02)) as backend:
        yield backend


def test_ollama_listing_endpoints(ollama_backend: OllamaBackend) -> None:
    http = ollama_backend.http
    assert http.get("/").text == "Ollama is running"
    assert "version" in http.get("/api/version").json()
    tags = http.get("/api/tags").json()["models"]
    assert [m["name"] for m in tags] == [
        "llama3:latest",
        "qwen2.5:7b",
        "tiny:1b",
        "nomic-embed-text:latest",
    ]
    assert tags[0]["size"] == 4 * ollama.GB
    assert {"modified_at", "digest", "details"} <= tags[0].keys()
    assert http.get("/api/ps").json() == {"models": []}
    models = [m.id for m in ollama_backend.sdk.models.list()]
    assert models[:2] == ["llama3:latest", "qwen2.5:7b"]
    assert http.get("/v1/models/llama3").json()["owned_by"] == "library"
    missing = http.get("/v1/models/nope")
    assert missing.status_code == 404
    assert missing.json()["error"]["type"] == "not_found_error"


def test_ollama_load_ps_and_unload(ollama_backend: OllamaBackend) -> None:
    http, state = ollama_backend.http, ollama_backend.state

    loaded = http.post("/api/generate", json={"model": "llama3"}).json()
    assert loaded["done"] is True
    assert loaded["done_reason"] == "load"
    assert (loaded["model"], loaded["response"]) == ("llama3", "")
    http.post("/api/generate", json={"model": "llama3"})
    assert state.load_count == {"llama3:latest": 1}

    (running_model,) = http.get("/api/ps").json()["models"]
    assert running_model["name"] == running_model["model"] == "llama3:latest"
    assert running_model["size"] == running_model["size_vram"] == 4 * ollama.GB
    assert running_model["details"]["format"] == "gguf"
    expires = datetime.fromisoformat(running_model["expires_at"]) - datetime.now().astimezone()
    assert timedelta(minutes=4) < expires <= timedelta(minutes=5)

    unloaded = http.post("/api/generate", json={"model": "llama3", "keep_alive": 0}).json()
    assert (unloaded["done"], unloaded["done_reason"]) == (True, "unload")
    assert http.get("/api/ps").json()["models"] == []
    assert state.unload_count == {"llama3:latest": 1}
    assert state.evictions == [("llama3:latest", "unload")]

    forever = http.post("/api/chat", json={"model": "tiny:1b", "messages": [], "keep_alive": -1})
    assert forever.json()["done_reason"] == "load"
    assert forever.json()["message"] == {"role": "assistant", "content": ""}
    (running_model,) = http.get("/api/ps").json()["models"]
    assert datetime.fromisoformat(running_model["expires_at"]).year > 2200
    assert state.requests == {}  # load and unload calls are not inference requests


def test_ollama_rejects_unknown_models_and_bad_keep_alive(ollama_backend: OllamaBackend) -> None:
    http = ollama_backend.http
    missing = http.post("/api/generate", json={"model": "nope", "prompt": "hi"})
    assert missing.status_code == 404
    assert missing.json() == {"error": 'model "nope" not found, try pulling it first'}
    bad = http.post("/api/generate", json={"model": "llama3", "keep_alive": "300"})
    assert bad.status_code == 400
    assert "duration" in bad.json()["error"]
    with pytest.raises(openai.NotFoundError) as raised:
        ollama_backend.sdk.chat.completions.create(
            model="nope", messages=[{"role": "user", "content": "hi"}]
        )
    error = raised.value.response.json()["error"]
    assert error["type"] == "not_found_error"
    assert error["message"] == 'model "nope" not found, try pulling it first'


def test_ollama_keep_alive_expiry_and_forced_eviction(ollama_backend: OllamaBackend) -> None:
    http, state = ollama_backend.http, ollama_backend.state
    http.post("/api/generate", json={"model": "tiny:1b", "keep_alive": 0.05})
    http.post("/api/generate", json={"model": "llama3", "keep_alive": "1h"})

    def only_llama3_left() -> bool:
        return [m["name"] for m in http.get("/api/ps").json()["models"]] == ["llama3:latest"]

    wait_until(only_llama3_left)
    assert state.evictions == [("tiny:1b", "expired")]

    assert state.evict("llama3") is True
    assert state.evict("llama3") is False
    assert http.get("/api/ps").json()["models"] == []
    assert state.evictions[-1] == ("llama3:latest", "forced")


def test_ollama_evicts_least_recently_used_idle_model_under_memory_pressure() -> None:
    app = ollama.create_app({"a:1b": 4, "b:1b": 5, "c:1b": 3}, load_delay=0.01, memory_gb=10)
    with running(app) as backend:
        http, state = backend.http, backend.state
        http.post("/api/generate", json={"model": "a:1b"})
        http.post("/api/generate", json={"model": "b:1b"})
        # Using a makes b the least recently used.
        http.post("/api/generate", json={"model": "a:1b", "prompt": "hi", "stream": False})
        http.post("/api/generate", json={"model": "c:1b"})
        assert state.loaded == {"a:1b", "c:1b"}
        assert state.evictions == [("b:1b", "memory")]
        assert state.max_loaded_bytes == 9 * ollama.GB
        assert state.loaded_bytes == 7 * ollama.GB


def test_ollama_max_loaded_models_and_load_failures() -> None:
    app = ollama.create_app(["a:1b", "b:1b", "c:1b"], load_delay=0.01, max_loaded=1)
    with running(app) as backend:
        http, state = backend.http, backend.state
        http.post("/api/generate", json={"model": "a:1b"})
        http.post("/api/generate", json={"model": "b:1b"})
        assert state.loaded == {"b:1b"}
        assert state.evictions == [("a:1b", "max_loaded")]

        state.load_errors["c:1b"] = "llama runner process has terminated: exit status 2"
        failed = http.post("/api/generate", json={"model": "c:1b", "prompt": "hi"})
        assert failed.status_code == 500
        assert failed.json() == {"error": state.load_errors["c:1b"]}
        with pytest.raises(openai.InternalServerError):
            backend.sdk.completions.create(model="c:1b", prompt="hi")
        assert state.loaded == {"b:1b"}
        assert state.in_flight == 0


def test_ollama_never_evicts_or_unloads_a_busy_model() -> None:
    app = ollama.create_app({"a:1b": 4, "b:1b": 4}, load_delay=0.01, memory_gb=5, token_delay=0.02)
    with (
        running(app) as backend,
        httpx.Client(base_url=backend.url) as other,
        ThreadPoolExecutor(1) as pool,
        backend.http.stream("POST", "/api/generate", json={"model": "a:1b", "prompt": "hi"}) as s,
    ):
        state = backend.state
        assert s.headers["content-type"] == "application/x-ndjson"
        lines = s.iter_lines()
        assert json.loads(next(lines))["done"] is False
        unload = other.post("/api/generate", json={"model": "a:1b", "keep_alive": 0}).json()
        assert unload["done_reason"] == "unload"
        loading_b = pool.submit(other.post, "/api/generate", json={"model": "b:1b"})
        assert state.in_flight == 1
        assert state.loaded == {"a:1b"}  # held by the stream: neither unloaded nor evicted
        assert json.loads(list(lines)[-1])["done"] is True
        assert loading_b.result(timeout=5).json()["done_reason"] == "load"
    assert state.unloads_while_busy == 1
    assert state.loaded == {"b:1b"}
    assert state.evictions == [("a:1b", "unload")]
    assert state.in_flight == 0


def test_ollama_native_generate_and_chat(ollama_backend: OllamaBackend) -> None:
    http = ollama_backend.http
    expected = plan_text("llama3:latest", "why?", tokens=8).text

    streamed = http.post("/api/generate", json={"model": "llama3", "prompt": "why?"})
    frames = [json.loads(line) for line in streamed.text.splitlines()]
    assert "".join(f["response"] for f in frames) == expected
    assert [f["done"] for f in frames] == [False] * 8 + [True]
    assert frames[-1]["done_reason"] == "stop"
    assert frames[-1]["eval_count"] == 8
    assert frames[-1]["load_duration"] > 0  # this request loaded the model

    whole = http.post("/api/generate", json={"model": "llama3", "prompt": "why?", "stream": False})
    assert whole.json()["response"] == expected
    assert whole.json()["load_duration"] == 0

    short = http.post(
        "/api/generate",
        json={"model": "llama3", "prompt": "why?", "stream": False, "options": {"num_predict": 3}},
    ).json()
    assert (short["done_reason"], short["eval_count"]) == ("length", 3)

    chat = [{"role": "user", "content": "hello"}]
    lines = http.post("/api/chat", json={"model": "llama3", "messages": chat}).text.splitlines()
    content = "".join(json.loads(line)["message"]["content"] for line in lines)
    assert content == plan_chat("llama3:latest", {"messages": chat}, 8).text
    tool = http.post(
        "/api/chat",
        json={"model": "llama3", "messages": chat, "tools": [WEATHER_TOOL], "stream": False},
    ).json()
    (call,) = tool["message"]["tool_calls"]
    assert call["function"]["name"] == "get_weather"
    assert set(call["function"]["arguments"]) == {"city", "days"}
    assert ollama_backend.state.requests == {"llama3:latest": 5}


def test_ollama_openai_layer_with_the_official_client(ollama_backend: OllamaBackend) -> None:
    client, state = ollama_backend.sdk, ollama_backend.state
    messages: list[Any] = [{"role": "user", "content": "hello"}]
    expected = plan_chat("qwen2.5:7b", {"messages": messages}, 8).text

    reply = client.chat.completions.create(model="qwen2.5:7b", messages=messages)
    assert reply.id.startswith("chatcmpl-")
    assert reply.system_fingerprint == "fp_ollama"
    assert reply.choices[0].message.content == expected
    assert reply.choices[0].finish_reason == "stop"
    assert reply.usage is not None and reply.usage.completion_tokens == 8
    assert state.load_count == {"qwen2.5:7b": 1}  # loaded implicitly

    chunks = list(
        client.chat.completions.create(
            model="qwen2.5:7b",
            messages=messages,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected
    assert chunks[-2].choices[0].finish_reason == "stop"
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None and chunks[-1].usage.total_tokens > 8
    # The emulator records what it sent once its send is done, maybe after the client has read it.
    wait_until(lambda: state.last_body.endswith(b"data: [DONE]\n\n"), message="the stream sent")

    tool = client.chat.completions.create(
        model="qwen2.5:7b", messages=messages, tools=[WEATHER_TOOL]
    )
    assert tool.choices[0].finish_reason == "tool_calls"
    (call,) = tool.choices[0].message.tool_calls or []
    assert call.function.name == "get_weather"
    assert isinstance(json.loads(call.function.arguments)["city"], str)

    schema = {"type": "json_schema", "json_schema": {"name": "a", "schema": ANSWER_SCHEMA}}
    structured = client.chat.completions.create(
        model="qwen2.5:7b", messages=messages, response_format=schema
    )
    assert json.loads(structured.choices[0].message.content or "").keys() == {"answer", "sure"}

    completion = client.completions.create(model="tiny:1b", prompt="once upon")
    assert completion.choices[0].text == plan_text("tiny:1b", "once upon", tokens=8).text

    embedded = client.embeddings.create(model="nomic-embed-text", input=["a", "b"])
    assert [d.embedding for d in embedded.data] == [
        embedding_vector("nomic-embed-text:latest", text) for text in ("a", "b")
    ]
    assert embedded.usage.prompt_tokens == 2
    assert state.requests["qwen2.5:7b"] == 4
    assert state.in_flight == 0


# ---------------------------------------------------------------------------------------------
# vLLM-like OpenAI server
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def vllm() -> Iterator[VllmBackend]:
    with running(openai_server.create_app(["m1", "m2"], sleep_mode=True, wake_delay=0.05)) as b:
        yield b


def test_vllm_chat_json_and_stream(vllm: VllmBackend) -> None:
    client, http, state = vllm.sdk, vllm.http, vllm.state
    messages: list[Any] = [{"role": "user", "content": "hi"}]
    expected = plan_chat("m2", {"messages": messages}, 8).text
    assert http.get("/health").status_code == 200
    state.healthy = False
    assert http.get("/health").status_code == 503
    state.healthy = True
    assert [m.id for m in client.models.list()] == ["m1", "m2"]

    reply = client.chat.completions.create(model="m2", messages=messages, temperature=0, seed=1)
    assert reply.id.startswith("chatcmpl-")
    seeded = plan_chat("m2", {"messages": messages, "seed": 1}, 8).text
    assert reply.choices[0].message.content == seeded != expected  # the seed shapes the answer

    stream = client.chat.completions.create(
        model="m2", messages=messages, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected
    assert chunks[-2].choices[0].finish_reason == "stop"
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 8

    raw = http.post(
        "/v1/chat/completions",
        json={"model": "m2", "messages": messages, "stream": True, "max_tokens": 3},
    )
    assert raw.headers["content-type"].startswith("text/event-stream")
    wait_until(lambda: raw.content == state.last_body,  # what was sent is what arrived
               message="the stream recorded as sent")
    events = sse_events(raw.content)
    assert {e["object"] for e in events} == {"chat.completion.chunk"}
    assert len({e["id"] for e in events}) == 1
    assert [e["choices"][0]["finish_reason"] for e in events] == [None] * 4 + ["length"]

    tool = client.chat.completions.create(model="m1", messages=messages, tools=[WEATHER_TOOL])
    assert tool.choices[0].finish_reason == "tool_calls"
    (call,) = tool.choices[0].message.tool_calls or []
    assert call.function.name == "get_weather"
    with_result = [
        *messages,
        {"role": "assistant", "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": "sunny"},
    ]
    after = client.chat.completions.create(model="m1", messages=with_result, tools=[WEATHER_TOOL])
    assert after.choices[0].finish_reason == "stop"  # the tool's answer ends the loop
    assert state.last_request == {"model": "m1", "messages": with_result, "tools": [WEATHER_TOOL]}
    assert state.requests == {"m2": 3, "m1": 2}


def test_vllm_completions_responses_and_errors(vllm: VllmBackend) -> None:
    client = vllm.sdk
    expected = plan_text("m1", "once", tokens=8).text
    assert client.completions.create(model="m1", prompt="once").choices[0].text == expected
    usage = {"include_usage": True}
    raw = vllm.http.post(
        "/v1/completions",
        json={"model": "m1", "prompt": "once", "stream": True, "stream_options": usage},
    )
    events = sse_events(raw.content)
    assert "".join(c["text"] for e in events for c in e["choices"]) == expected
    assert events[-1]["usage"]["completion_tokens"] == 8
    assert {e["object"] for e in events} == {"text_completion"}

    response = client.responses.create(model="m1", input="once")
    assert response.output_text == expected
    assert response.status == "completed"

    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    assert missing.value.response.json() == {
        "error": {
            "message": "The model `nope` does not exist.",
            "type": "NotFoundError",
            "param": "model",
            "code": 404,
        }
    }
    with pytest.raises(openai.BadRequestError, match="does not support Embeddings API"):
        client.embeddings.create(model="m1", input="x")


def test_vllm_embedding_server() -> None:
    with running(openai_server.create_app(["e5"], embedding=True, embedding_dim=8)) as backend:
        one = backend.sdk.embeddings.create(model="e5", input="hello")  # base64 on the wire
        assert one.data[0].embedding == embedding_vector("e5", "hello", 8)
        floats = backend.http.post(
            "/v1/embeddings",
            json={"model": "e5", "input": ["a", "b"], "encoding_format": "float"},
        ).json()
        assert [d["index"] for d in floats["data"]] == [0, 1]
        assert floats["data"][1]["embedding"] == embedding_vector("e5", "b", 8)
        with pytest.raises(openai.BadRequestError, match="Chat Completions API"):
            backend.sdk.chat.completions.create(
                model="e5", messages=[{"role": "user", "content": "x"}]
            )


def test_vllm_failure_modes(vllm: VllmBackend) -> None:
    http, state = vllm.http, vllm.state
    body = {"model": "m1", "messages": [{"role": "user", "content": "hi"}]}
    path = "/v1/chat/completions"

    state.fail("500", times=1)
    failed = http.post(path, json=body)
    assert failed.status_code == 500
    assert failed.json()["error"]["code"] == 500
    assert http.post(path, json=body).status_code == 200  # failed once, then recovered

    state.fail("text500")
    plain = http.post(path, json=body)
    assert (plain.status_code, plain.text) == (500, "Internal Server Error")
    state.fail("garbage")
    garbage = http.post(path, json=body)
    assert garbage.status_code == 200
    with pytest.raises(json.JSONDecodeError):
        garbage.json()

    state.fail("drop")
    with pytest.raises(httpx.RemoteProtocolError):
        http.post(path, json={**body, "stream": True})
    state.drop_delay = 0  # dies right behind its last bytes
    with pytest.raises(httpx.RemoteProtocolError):
        http.post(path, json=body)
    wait_until(lambda: state.dropped == 2)

    state.fail("hang")
    with pytest.raises(httpx.ReadTimeout):
        http.post(path, json=body, timeout=0.2)
    wait_until(lambda: state.cancelled == 1 and state.in_flight == 0)

    state.fail("slow_first_byte")
    state.first_byte_delay = 0.1
    started = time.monotonic()
    assert http.post(path, json=body).status_code == 200
    assert time.monotonic() - started >= 0.1
    with pytest.raises(ValueError, match="unknown failure mode"):
        state.fail("explode")


def test_vllm_client_disconnect_cancels_the_stream() -> None:
    app = openai_server.create_app(["m"], token_delay=0.01, tokens=500)
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    with running(app) as backend:
        state = backend.state
        with backend.http.stream("POST", "/v1/chat/completions", json=body) as stream:
            lines = stream.iter_lines()  # keep it: a discarded httpx iterator closes the stream
            assert next(lines).startswith("data: ")
            assert state.streams_in_flight == 1
        wait_until(lambda: state.cancelled_streams == 1)
        assert (state.in_flight, state.streams_in_flight, state.completed) == (0, 0, 0)


def test_vllm_sleep_mode(vllm: VllmBackend) -> None:
    http, state = vllm.http, vllm.state
    chat = {"model": "m1", "messages": [{"role": "user", "content": "hi"}]}
    assert http.get("/is_sleeping").json() == {"is_sleeping": False}

    assert http.post("/sleep", params={"level": 1}).status_code == 200
    assert http.get("/is_sleeping").json() == {"is_sleeping": True}
    assert state.sleep_level == 1
    asleep = http.post("/v1/chat/completions", json=chat)
    assert asleep.status_code == 503
    assert asleep.json()["error"]["code"] == 503
    assert http.get("/v1/models").status_code == 200  # needs no weights

    assert http.post("/wake_up").status_code == 200
    assert http.get("/is_sleeping").json() == {"is_sleeping": False}
    assert http.post("/v1/chat/completions", json=chat).status_code == 200
    assert (state.sleep_count, state.wake_count, state.sleeps_while_busy) == (1, 1, 0)
    assert http.post("/sleep", params={"level": "deep"}).status_code == 400

    with running(openai_server.create_app(["m"])) as plain:
        assert plain.http.post("/sleep").status_code == 404


def test_openai_server_runs_as_a_process() -> None:
    command = [sys.executable, "-m", "tests.emulators.openai_server", "--port", "0"]
    command += ["--model", "m1", "--model", "m2", "--startup-delay", "0.5"]
    messages: list[Any] = [{"role": "user", "content": "hi"}]
    with subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, text=True) as proc:
        try:
            assert proc.stdout is not None
            readable, _, _ = select.select([proc.stdout], [], [], 10)
            assert readable, "no startup line"
            match = re.search(r"http://127\.0\.0\.1:\d+", proc.stdout.readline())
            assert match is not None
            with httpx.Client(base_url=match.group()) as http, sdk(match.group()) as client:
                statuses = [http.get("/health").status_code]

                def healthy() -> bool:
                    statuses.append(http.get("/health").status_code)
                    return statuses[-1] == 200

                wait_until(healthy)
                assert statuses[0] == 503  # still "loading the model"
                reply = client.chat.completions.create(model="m2", messages=messages)
                assert (
                    reply.choices[0].message.content
                    == plan_chat("m2", {"messages": messages}, 8).text
                )

            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=10) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
