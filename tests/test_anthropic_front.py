"""Anthropic's Messages API in front, driven by the official `anthropic` client: translated to
chat completions for an emulated vLLM (stream and not, with a tool call), passed through to a
backend that declares `messages`, and errors in Anthropic's shape."""

from __future__ import annotations

import json
import re
from typing import Any

import anthropic
import httpx
import pytest

from tests.emulators import openai_server as vllm_emulator
from tests.servers import emulator

TOKENS = 6
HELLO = [{"role": "user", "content": "Say something about foxes."}]
WEATHER = {"name": "get_weather", "description": "The weather in a city",
           "input_schema": {"type": "object", "properties": {"city": {"type": "string"}},
                            "required": ["city"]}}
EVENTS = ["message_start", "content_block_start", "content_block_delta", "content_block_stop",
          "message_delta", "message_stop"]


@pytest.fixture
def vllm(start_server: Any) -> Any:
    return start_server(vllm_emulator.create_app(["org/m1"], tokens=TOKENS, sleep_mode=True,
                                                 asleep=True, wake_delay=0.01))


@pytest.fixture
def native(start_server: Any) -> Any:
    """A backend with Anthropic's API of its own (vLLM and llama.cpp serve /v1/messages)."""
    return start_server(vllm_emulator.create_app(["org/claude-like"], tokens=TOKENS))


def config(vllm: Any, native: Any, **extra: Any) -> dict[str, Any]:
    return {
        "swapper": {"mode": "single-active", "model_swap_timeout": 30},
        "server": {"heartbeat_s": 0.05},
        "batching": {"window_ms": 0, "min_residency_ms": 0},
        "backends": {
            "vllm": {"kind": "vllm-sleep", "base_url": vllm.url},
            "native": {"kind": "openai", "base_url": native.url,
                       "endpoints": ["chat/completions", "messages", "messages/count_tokens"]},
        },
        "models": {"m1": {"backend": "vllm", "served_name": "org/m1", "size_gb": 8,
                          "aliases": ["claude-3-haiku"]},
                   "native": {"backend": "native", "served_name": "org/claude-like"}},
        **extra,
    }


@pytest.fixture
def gateway(start_gateway: Any, vllm: Any, native: Any) -> Any:
    return start_gateway(config(vllm, native))


def client(gateway: Any, key: str = "unused") -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=gateway.url, api_key=key, max_retries=0, timeout=30)


def expected_text(messages: list[dict[str, Any]]) -> str:
    return vllm_emulator.plan_chat("org/m1", {"messages": messages}, TOKENS).text


# -- translated to chat completions ------------------------------------------------------------

def test_a_message_answered_by_a_chat_backend(gateway: Any, vllm: Any) -> None:
    message = client(gateway).messages.create(model="claude-3-haiku", max_tokens=64,
                                              system="Be brief.", messages=HELLO)
    sent = [{"role": "system", "content": "Be brief."}, *HELLO]
    assert message.model == "claude-3-haiku" and message.role == "assistant"
    assert [block.type for block in message.content] == ["text"]
    assert message.content[0].text == expected_text(sent)  # type: ignore[union-attr]
    assert message.stop_reason == "end_turn"
    assert message.usage.output_tokens == TOKENS and message.usage.input_tokens > 0
    upstream = emulator(vllm).last_request
    assert upstream["messages"] == sent and upstream["max_tokens"] == 64
    assert upstream["model"] == "org/m1"


def test_a_streamed_message_has_anthropics_event_sequence(gateway: Any) -> None:
    with client(gateway).messages.stream(model="m1", max_tokens=64, messages=HELLO) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == expected_text(HELLO)
    assert final.stop_reason == "end_turn" and final.usage.output_tokens == TOKENS
    assert final.usage.input_tokens > 0  # from message_delta: known only at the end
    events = [event.type for event in client(gateway).messages.create(
        model="m1", max_tokens=64, messages=HELLO, stream=True)]
    assert [e for i, e in enumerate(events) if i == 0 or events[i - 1] != e] == EVENTS


def test_max_tokens_ends_with_its_stop_reason(gateway: Any) -> None:
    message = client(gateway).messages.create(model="m1", max_tokens=2, messages=HELLO)
    assert message.stop_reason == "max_tokens" and message.usage.output_tokens == 2


def test_a_tool_call_and_its_result(gateway: Any, vllm: Any) -> None:
    first = client(gateway).messages.create(model="m1", max_tokens=64, messages=HELLO,
                                            tools=[WEATHER],
                                            tool_choice={"type": "tool", "name": "get_weather"})
    (use,) = [block for block in first.content if block.type == "tool_use"]
    assert first.stop_reason == "tool_use"
    assert use.name == "get_weather" and set(use.input) == {"city"}  # type: ignore[arg-type]
    upstream = emulator(vllm).last_request
    assert upstream["tools"] == [{"type": "function", "function": {
        "name": "get_weather", "parameters": WEATHER["input_schema"],
        "description": WEATHER["description"]}}]
    assert upstream["tool_choice"] == {"type": "function", "function": {"name": "get_weather"}}
    history = [*HELLO, {"role": "assistant", "content": first.content},
               {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id,
                                             "content": "sunny"}]}]
    second = client(gateway).messages.create(model="m1", max_tokens=64, messages=history,
                                             tools=[WEATHER])
    assert second.stop_reason == "end_turn" and second.content[0].type == "text"
    sent = emulator(vllm).last_request["messages"]
    assert sent[1]["tool_calls"][0]["id"] == use.id
    assert json.loads(sent[1]["tool_calls"][0]["function"]["arguments"]) == use.input
    assert sent[2] == {"role": "tool", "tool_call_id": use.id, "content": "sunny"}


def test_a_streamed_tool_call_arrives_as_input_json(gateway: Any) -> None:
    with client(gateway).messages.stream(model="m1", max_tokens=64, messages=HELLO,
                                         tools=[WEATHER]) as stream:
        events = list(stream)
        final = stream.get_final_message()
    (use,) = [block for block in final.content if block.type == "tool_use"]
    assert use.name == "get_weather" and isinstance(use.input, dict) and "city" in use.input
    assert final.stop_reason == "tool_use"
    assert any(e.type == "content_block_delta" and e.delta.type == "input_json_delta"
               for e in events)  # type: ignore[union-attr]


def test_stop_sequences_sampling_and_output_format_become_openai_fields(gateway: Any,
                                                                       vllm: Any) -> None:
    schema = {"type": "object", "properties": {"age": {"type": "integer"}}}
    message = client(gateway).messages.create(
        model="m1", max_tokens=64, messages=HELLO, stop_sequences=["\n\n"],
        output_config={"format": {"type": "json_schema", "schema": schema}},
        extra_body={"temperature": 0.3, "top_k": 4})  # what older clients still send
    assert isinstance(json.loads(message.content[0].text)["age"], int)  # type: ignore[union-attr]
    upstream = emulator(vllm).last_request
    assert (upstream["stop"], upstream["temperature"], upstream["top_k"]) == (["\n\n"], 0.3, 4)
    assert upstream["response_format"]["json_schema"]["schema"] == schema


def test_a_stream_that_waits_for_a_load_keeps_its_client_company(
        start_gateway: Any, start_server: Any, native: Any) -> None:
    slow = start_server(vllm_emulator.create_app(["org/m1"], tokens=TOKENS, sleep_mode=True,
                                                 asleep=True, wake_delay=0.5))
    gateway = start_gateway(config(slow, native, server={"heartbeat_s": 0.05,
                                                         "stream_hold_s": 0.05}))
    body = {"model": "m1", "max_tokens": 64, "messages": HELLO, "stream": True}
    with httpx.stream("POST", gateway.url + "/v1/messages", json=body, timeout=30) as answer:
        lines = list(answer.iter_lines())
    assert lines.count("event: ping") >= 3  # while the model loaded
    with client(gateway).messages.stream(model="m1", max_tokens=64, messages=HELLO) as stream:
        assert "".join(stream.text_stream) == expected_text(HELLO)


# -- passed through to a backend that speaks Messages ------------------------------------------

def test_a_messages_backend_gets_the_request_as_it_came(gateway: Any, native: Any) -> None:
    message = client(gateway).messages.create(model="native", max_tokens=64, messages=HELLO,
                                              metadata={"user_id": "u1"})
    upstream = emulator(native)
    assert upstream.paths["/v1/messages"] == 1 and upstream.paths["/v1/chat/completions"] == 0
    assert upstream.last_request == {"model": "org/claude-like", "max_tokens": 64,
                                     "messages": HELLO, "metadata": {"user_id": "u1"}}
    assert message.model == "native"
    assert message.content[0].text  # type: ignore[union-attr]
    with client(gateway).messages.stream(model="native", max_tokens=64,
                                         messages=HELLO) as stream:
        assert "".join(stream.text_stream) == message.content[0].text  # type: ignore[union-attr]


def test_passed_through_answers_are_counted_in_tokens(gateway: Any) -> None:
    """Usage in Anthropic's words (input_tokens, output_tokens) is read too: a stream says the
    input in its first event and the output in its last."""
    message = client(gateway).messages.create(model="native", max_tokens=64, messages=HELLO)
    with client(gateway).messages.stream(model="native", max_tokens=64,
                                         messages=HELLO) as stream:
        final = stream.get_final_message()
    metrics = httpx.get(gateway.url + "/metrics", headers={"accept": "text/plain"}).text
    counted = {kind: float(re.search(  # type: ignore[union-attr]
        rf'swapper_tokens_total{{kind="{kind}",model="native"}} ([\d.]+)', metrics)[1])
        for kind in ("prompt", "completion")}
    assert counted == {"prompt": message.usage.input_tokens + final.usage.input_tokens,
                       "completion": message.usage.output_tokens + final.usage.output_tokens}
    assert counted["prompt"] > 0 and counted["completion"] == 2 * TOKENS


def test_count_tokens_where_the_backend_counts_them(gateway: Any) -> None:
    counted = client(gateway).messages.count_tokens(model="native", messages=HELLO)
    assert counted.input_tokens == vllm_emulator.count_tokens(
        vllm_emulator.anthropic_prompt({"messages": HELLO}))
    with pytest.raises(anthropic.NotFoundError) as missing:
        client(gateway).messages.count_tokens(model="m1", messages=HELLO)
    assert missing.value.body["error"]["type"] == "not_found_error"  # type: ignore[index]


# -- errors ------------------------------------------------------------------------------------

def test_an_unknown_model_is_anthropics_not_found_error(gateway: Any) -> None:
    with pytest.raises(anthropic.NotFoundError) as missing:
        client(gateway).messages.create(model="ghost", max_tokens=8, messages=HELLO)
    assert missing.value.body == {"type": "error", "error": {
        "type": "not_found_error",
        "message": "The model 'ghost' does not exist or you do not have access to it."}}


def test_a_request_without_max_tokens_is_an_invalid_request_error(gateway: Any) -> None:
    answer = httpx.post(gateway.url + "/v1/messages", json={"model": "m1", "messages": HELLO})
    assert answer.status_code == 400
    assert answer.json()["error"]["type"] == "invalid_request_error"
    assert "max_tokens" in answer.json()["error"]["message"]


def test_a_missing_key_is_anthropics_authentication_error(start_gateway: Any, vllm: Any,
                                                          native: Any) -> None:
    gateway = start_gateway(config(vllm, native, auth={"keys": [{"name": "a", "key": "sk-a1"}]}))
    with pytest.raises(anthropic.AuthenticationError) as refused:
        client(gateway, key="sk-wrong").messages.create(model="m1", max_tokens=8,
                                                        messages=HELLO)
    assert refused.value.body["error"]["type"] == "authentication_error"  # type: ignore[index]
    message = client(gateway, key="sk-a1").messages.create(model="m1", max_tokens=8,
                                                           messages=HELLO)
    assert message.content


def test_a_backend_failure_mid_stream_is_an_error_event(gateway: Any, vllm: Any) -> None:
    client(gateway).messages.create(model="m1", max_tokens=8, messages=HELLO)  # loaded
    emulator(vllm).fail("drop", times=1)
    with pytest.raises(anthropic.APIStatusError) as failed:
        with client(gateway).messages.stream(model="m1", max_tokens=64, messages=HELLO) as s:
            list(s)
    assert "incomplete" in str(failed.value) or "broke off" in str(failed.value)
