"""The OpenAI-compatible routes, end to end: official client -> gateway -> emulated backends."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import openai
import orjson
import pytest

from tests.emulators import ollama as ollama_emulator
from tests.emulators import openai_server as vllm_emulator
from tests.servers import emulator, free_port, wait_until

MESSAGES = [{"role": "user", "content": "Say something about foxes."}]


@pytest.fixture
def vllm(start_server: Any) -> Any:
    return start_server(vllm_emulator.create_app(["org/m1"], tokens=6))


@pytest.fixture
def ollama(start_server: Any) -> Any:
    return start_server(ollama_emulator.create_app({"llama3:8b": 4.0}, load_delay=0.05))


def base_config(vllm_url: str, ollama_url: str, **server: Any) -> dict[str, Any]:
    return {
        "server": {"max_body_bytes": 64 * 1024, **server},
        "backends": {
            "vllm": {"kind": "openai", "base_url": vllm_url + "/v1",
                     "endpoints": ["chat/completions", "completions", "embeddings", "responses"],
                     "timeouts": {"read": 2}},
            "ollama": {"kind": "ollama", "base_url": ollama_url},
        },
        "models": {
            "m1": {"backend": "vllm", "served_name": "org/m1", "aliases": ["one"]},
            "llama": {"path": "ollama:llama3:8b", "size_gb": 4},
        },
    }


@pytest.fixture
def gateway(start_gateway: Any, vllm: Any, ollama: Any) -> Any:
    return start_gateway(base_config(vllm.url, ollama.url))


def client(gateway: Any, **options: Any) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway.url + "/v1", api_key="unused", max_retries=0, **options)


def test_chat_json_through_alias_names_the_model_as_asked(gateway: Any, vllm: Any) -> None:
    answer = client(gateway).chat.completions.create(model="one", messages=MESSAGES)
    assert answer.model == "one"
    assert answer.choices[0].message.content
    assert answer.usage is not None and answer.usage.completion_tokens == 6
    upstream = emulator(vllm).last_request
    assert upstream["model"] == "org/m1"  # the backend got its own name for the model


def test_json_answer_is_byte_for_byte_the_backends_but_for_the_name(gateway: Any,
                                                                     vllm: Any) -> None:
    response = httpx.post(gateway.url + "/v1/chat/completions",
                          json={"model": "m1", "messages": MESSAGES})
    assert response.status_code == 200
    expected = emulator(vllm).last_body.replace(b'"model":"org/m1"', b'"model":"m1"')
    assert response.content == expected


def test_stream_is_relayed_byte_for_byte(gateway: Any, vllm: Any) -> None:
    body = {"model": "m1", "messages": MESSAGES, "stream": True,
            "stream_options": {"include_usage": True}}
    with httpx.stream("POST", gateway.url + "/v1/chat/completions", json=body) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        received = b"".join(response.iter_raw())
    # The emulator records a stream as sent after its last send, which we may read first
    wait_until(lambda: emulator(vllm).last_body.replace(b'"model":"org/m1"', b'"model":"m1"')
               == received, message="the stream relayed as the backend sent it")
    assert received.endswith(b"data: [DONE]\n\n")


def test_stream_with_official_client_and_usage(gateway: Any) -> None:
    stream = client(gateway).chat.completions.create(
        model="m1", messages=MESSAGES, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 6
    assert {c.model for c in chunks} == {"m1"}


def test_async_client_streams_concurrently(gateway: Any) -> None:
    async def run() -> list[str]:
        async with openai.AsyncOpenAI(base_url=gateway.url + "/v1", api_key="x") as aclient:
            async def one(i: int) -> str:
                stream = await aclient.chat.completions.create(
                    model="m1", stream=True,
                    messages=[{"role": "user", "content": f"question {i}"}])
                return "".join([c.choices[0].delta.content or "" async for c in stream
                                if c.choices])
            return await asyncio.gather(*(one(i) for i in range(8)))

    answers = asyncio.run(run())
    assert all(answers) and len(set(answers)) > 1  # each got its own answer


def test_tools_and_response_format_pass_through_untouched(gateway: Any, vllm: Any) -> None:
    tools = [{"type": "function", "function": {
        "name": "get_weather", "description": "Weather for a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                       "required": ["city"]}}}]
    answer = client(gateway).chat.completions.create(
        model="m1", messages=MESSAGES, tools=tools, tool_choice="auto")
    assert emulator(vllm).last_request["tools"] == tools
    assert answer.choices[0].message.tool_calls[0].function.name == "get_weather"
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "object", "properties": {"a": {"type": "string"}}}}}
    client(gateway).chat.completions.create(model="m1", messages=MESSAGES,
                                            response_format=fmt)  # type: ignore[arg-type]
    assert emulator(vllm).last_request["response_format"] == fmt


def test_legacy_completions_and_embeddings(gateway: Any) -> None:
    c = client(gateway)
    completion = c.completions.create(model="m1", prompt="Once upon a time", max_tokens=4)
    assert completion.model == "m1" and completion.choices[0].text
    embedding = c.embeddings.create(model="llama", input=["a", "b"])
    assert len(embedding.data) == 2 and embedding.data[0].embedding != embedding.data[1].embedding


def test_ollama_backend_serves_through_its_v1(gateway: Any, ollama: Any) -> None:
    answer = client(gateway).chat.completions.create(model="llama", messages=MESSAGES)
    assert answer.model == "llama"
    assert emulator(ollama).requests["llama3:8b"] == 1


def test_responses_passthrough_only_where_declared(gateway: Any) -> None:
    response = httpx.post(gateway.url + "/v1/responses", json={"model": "m1", "input": "hi"})
    assert response.status_code == 200 and response.json()["object"] == "response"
    refused = httpx.post(gateway.url + "/v1/responses", json={"model": "llama", "input": "hi"})
    assert refused.status_code == 404
    assert refused.json()["error"]["code"] == "unsupported_endpoint"


def test_models_list_and_lookup(gateway: Any) -> None:
    c = client(gateway)
    listed = {m.id: m for m in c.models.list()}
    assert set(listed) == {"m1", "llama"}
    assert listed["m1"].owned_by == "vllm"
    assert c.models.retrieve("one").id == "m1"
    with pytest.raises(openai.NotFoundError) as caught:
        c.models.retrieve("ghost")
    assert caught.value.body["code"] == "model_not_found"  # type: ignore[index]


def test_unknown_model_is_404_model_not_found(gateway: Any) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        client(gateway).chat.completions.create(model="gpt-17", messages=MESSAGES)
    assert caught.value.body == {  # type: ignore[comparison-overlap]
        "message": "The model 'gpt-17' does not exist or you do not have access to it.",
        "type": "invalid_request_error", "param": "model", "code": "model_not_found"}


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        (b"{not json", 400, None),
        (b"[1, 2]", 400, None),
        (b'{"messages": []}', 400, "model"),
        (b'{"model": "m1"}', 400, "messages"),
        (b'{"model": "m1", "messages": "hi"}', 400, "messages"),
        (b'{"model": "m1", "messages": [{"role": "user"}], "stream": "yes"}', 400, "stream"),
        (b'{"model": "m1", "messages": [{"role": "user"}], "max_tokens": 0}', 400, "max_tokens"),
        (b'{"model": "m1", "messages": [{"role": "user"}], "temperature": 9}', 400,
         "temperature"),
    ],
)
def test_bad_requests_get_openai_shaped_400(gateway: Any, body: bytes, status: int,
                                            param: str | None) -> None:
    response = httpx.post(gateway.url + "/v1/chat/completions", content=body,
                          headers={"content-type": "application/json"})
    assert response.status_code == status
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param
    assert error["message"]


def test_oversize_body_is_413(gateway: Any) -> None:
    big = {"model": "m1", "messages": [{"role": "user", "content": "x" * 70_000}]}
    response = httpx.post(gateway.url + "/v1/chat/completions", json=big)
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "request_too_large"


def test_unknown_endpoint_and_method_are_openai_shaped(gateway: Any) -> None:
    missing = httpx.post(gateway.url + "/v1/fine_tuning/jobs", json={})
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "unknown_endpoint"
    wrong = httpx.get(gateway.url + "/v1/chat/completions")
    assert wrong.status_code == 405 and "error" in wrong.json()


def test_backend_errors_pass_through_and_are_rewrapped(gateway: Any, vllm: Any) -> None:
    state = emulator(vllm)
    state.fail("500", times=1)
    response = httpx.post(gateway.url + "/v1/chat/completions",
                          json={"model": "m1", "messages": MESSAGES})
    assert response.status_code == 500
    assert response.json()["error"]["message"]
    state.fail("text500", times=1)
    response = httpx.post(gateway.url + "/v1/chat/completions",
                          json={"model": "m1", "messages": MESSAGES})
    assert response.status_code == 500
    error = response.json()["error"]
    assert "vllm" in error["message"] and error["code"] == "backend_error"


def test_garbage_from_backend_is_502(gateway: Any, vllm: Any) -> None:
    emulator(vllm).fail("garbage", times=1)
    response = httpx.post(gateway.url + "/v1/chat/completions",
                          json={"model": "m1", "messages": MESSAGES})
    assert response.status_code == 502
    assert response.json()["error"]["code"] == "backend_invalid_response"


def test_hanging_backend_is_504(gateway: Any, vllm: Any) -> None:
    emulator(vllm).fail("hang", times=1)
    response = httpx.post(gateway.url + "/v1/chat/completions",
                          json={"model": "m1", "messages": MESSAGES}, timeout=10)
    assert response.status_code == 504
    assert "vllm" in response.json()["error"]["message"]


def test_unreachable_backend_is_502_naming_it(start_gateway: Any, ollama: Any) -> None:
    gateway = start_gateway(base_config(f"http://127.0.0.1:{free_port()}", ollama.url))
    response = httpx.post(gateway.url + "/v1/chat/completions",
                          json={"model": "m1", "messages": MESSAGES})
    assert response.status_code == 502
    error = response.json()["error"]
    assert error["code"] == "backend_unreachable" and "'vllm'" in error["message"]


def test_stream_dropped_midway_ends_with_one_error_event(gateway: Any, vllm: Any) -> None:
    emulator(vllm).fail("drop", times=1)
    body = {"model": "m1", "messages": MESSAGES, "stream": True}
    with httpx.stream("POST", gateway.url + "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200
        events = [line for line in response.iter_lines() if line.startswith("data: ")]
    assert len(events) >= 2
    last = orjson.loads(events[-1].removeprefix("data: "))
    assert last["error"]["code"] in ("backend_error", "backend_stream_incomplete")
    assert "[DONE]" not in events[-1]


def test_client_disconnect_cancels_the_upstream_stream(start_gateway: Any, start_server: Any,
                                                      ollama: Any) -> None:
    slow = start_server(vllm_emulator.create_app(["org/m1"], tokens=200, token_delay=0.02))
    gateway = start_gateway(base_config(slow.url, ollama.url))
    state = emulator(slow)
    body = {"model": "m1", "messages": MESSAGES, "stream": True}
    with httpx.stream("POST", gateway.url + "/v1/chat/completions", json=body) as response:
        next(response.iter_raw())  # the stream has started
    wait_until(lambda: state.cancelled_streams == 1, message="upstream stream cancelled")
    assert state.streams_in_flight == 0
    services = gateway.app.state.services
    wait_until(lambda: services.scheduler.slots["m1"].in_flight == 0, message="lease released")


def test_request_id_is_returned_and_generated(gateway: Any, vllm: Any) -> None:
    response = httpx.get(gateway.url + "/v1/models", headers={"x-request-id": "abc-123"})
    assert response.headers["x-request-id"] == "abc-123"
    generated = httpx.get(gateway.url + "/v1/models").headers["x-request-id"]
    assert len(generated) == 32


def test_health_answers_in_the_swapper_shape(gateway: Any) -> None:
    body = httpx.get(gateway.url + "/health").json()
    assert body["status"] == "healthy"
