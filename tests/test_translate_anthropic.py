"""Anthropic Messages <-> OpenAI chat translation as pure functions: requests, answers, and the
streaming event sequence, with streams cut anywhere."""

from __future__ import annotations

import itertools
import json
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.errors import GatewayError
from gateway.fronts.translate import anthropic
from gateway.fronts.translate.anthropic import MessageEvents


def sse(*events: Any) -> bytes:
    return b"".join(b"data: " + (e if isinstance(e, bytes) else orjson.dumps(e)) + b"\n\n"
                    for e in events)


def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
    return {"id": "chatcmpl-abc", "choices": [{"index": 0, "delta": delta,
                                               "finish_reason": finish}]}


USAGE = {"id": "chatcmpl-abc", "choices": [],
         "usage": {"prompt_tokens": 9, "completion_tokens": 4, "total_tokens": 13}}
TEXT_STREAM = sse(chunk({"role": "assistant", "content": ""}), chunk({"content": "Hi"}),
                  chunk({"content": " there"}), chunk({}, "stop"), USAGE, b"[DONE]")


def events(data: bytes) -> list[dict[str, Any]]:
    """The `data:` payloads of an Anthropic stream, each checked against its `event:` line."""
    out = []
    for block in data.decode().split("\n\n"):
        if block:
            name, payload = block.split("\n")
            parsed = json.loads(payload.removeprefix("data: "))
            assert name == f"event: {parsed['type']}"
            out.append(parsed)
    return out


# -- requests ------------------------------------------------------------------------------------

def test_a_request_with_system_blocks_images_and_tools() -> None:
    body = {
        "model": "claude", "max_tokens": 100, "stream": True,
        "system": [{"type": "text", "text": "Be "}, {"type": "text", "text": "brief."}],
        "stop_sequences": ["END"], "temperature": 0.5, "metadata": {"user_id": "u7"},
        "tools": [{"name": "f", "description": "does f", "input_schema": {"type": "object"}}],
        "tool_choice": {"type": "any", "disable_parallel_tool_use": True},
        "messages": [{"role": "user", "content": [
            {"type": "text", "text": "What is "},
            {"type": "image", "source": {"type": "base64", "media_type": "image/gif",
                                         "data": "R0lG"}}]}],
    }
    assert anthropic.chat_request(body, "m") == {
        "model": "m", "max_tokens": 100, "stop": ["END"], "temperature": 0.5, "user": "u7",
        "messages": [{"role": "system", "content": "Be brief."},
                     {"role": "user", "content": [
                         {"type": "text", "text": "What is "},
                         {"type": "image_url", "image_url": {"url": "data:image/gif;base64,R0lG"}},
                     ]}],
        "tools": [{"type": "function", "function": {"name": "f", "description": "does f",
                                                    "parameters": {"type": "object"}}}],
        "tool_choice": "required", "parallel_tool_calls": False,
        "stream": True, "stream_options": {"include_usage": True},
    }


def test_tool_use_and_tool_result_blocks() -> None:
    assistant = {"role": "assistant", "content": [
        {"type": "thinking", "thinking": "let me see", "signature": "x"},
        {"type": "text", "text": "Checking."},
        {"type": "tool_use", "id": "toolu_1", "name": "weather", "input": {"city": "Rome"}}]}
    assert anthropic.chat_messages(assistant) == [{
        "role": "assistant", "content": "Checking.",
        "tool_calls": [{"id": "toolu_1", "type": "function",
                        "function": {"name": "weather", "arguments": '{"city":"Rome"}'}}]}]
    user = {"role": "user", "content": [
        {"type": "tool_result", "tool_use_id": "toolu_1",
         "content": [{"type": "text", "text": "sunny"}]},
        {"type": "text", "text": "And tomorrow?"}]}
    assert anthropic.chat_messages(user) == [
        {"role": "tool", "tool_call_id": "toolu_1", "content": "sunny"},
        {"role": "user", "content": "And tomorrow?"}]


@pytest.mark.parametrize("choice, fields", [
    ({"type": "auto"}, {"tool_choice": "auto"}),
    ({"type": "none"}, {"tool_choice": "none"}),
    ({"type": "tool", "name": "f"}, {"tool_choice": {"type": "function",
                                                     "function": {"name": "f"}}}),
])
def test_tool_choice(choice: dict[str, Any], fields: dict[str, Any]) -> None:
    body = {"model": "m", "max_tokens": 1, "messages": [{"role": "user", "content": "x"}],
            "tool_choice": choice}
    request = anthropic.chat_request(body, "m")
    assert {name: request[name] for name in fields} == fields


@pytest.mark.parametrize("body, param", [
    ({"max_tokens": 5, "messages": [{"role": "user", "content": "x"}]}, "model"),
    ({"model": "m", "messages": [{"role": "user", "content": "x"}]}, "max_tokens"),
    ({"model": "m", "max_tokens": 0, "messages": [{"role": "user", "content": "x"}]},
     "max_tokens"),
    ({"model": "m", "max_tokens": 5, "messages": []}, "messages"),
    ({"model": "m", "max_tokens": 5, "messages": [{"role": "system", "content": "x"}]},
     "messages"),
])
def test_a_request_is_checked_as_anthropic_checks_it(body: dict[str, Any], param: str) -> None:
    with pytest.raises(GatewayError) as bad:
        anthropic.request_body(orjson.dumps(body))
    assert bad.value.status == 400 and bad.value.param == param


# -- answers -------------------------------------------------------------------------------------

def test_a_chat_answer_as_a_message() -> None:
    answer = {"id": "chatcmpl-xyz", "usage": USAGE["usage"], "choices": [{
        "index": 0, "finish_reason": "tool_calls",
        "message": {"role": "assistant", "content": "Let me look.", "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "weather", "arguments": '{"city": "Rome"}'}}]}}]}
    assert anthropic.message(answer, "claude") == {
        "id": "msg_xyz", "type": "message", "role": "assistant", "model": "claude",
        "content": [{"type": "text", "text": "Let me look."},
                    {"type": "tool_use", "id": "call_1", "name": "weather",
                     "input": {"city": "Rome"}}],
        "stop_reason": "tool_use", "stop_sequence": None,
        "usage": {"input_tokens": 9, "output_tokens": 4}}


@pytest.mark.parametrize("choice, reason", [
    ({"finish_reason": "stop"}, ("end_turn", None)),
    ({"finish_reason": "length"}, ("max_tokens", None)),
    ({"finish_reason": "stop", "stop_reason": "END"}, ("stop_sequence", "END")),
    ({"finish_reason": "stop", "stop_reason": 2}, ("end_turn", None)),  # vLLM: a token id
])
def test_stop_reasons(choice: dict[str, Any], reason: tuple[str, str | None]) -> None:
    assert anthropic.stop_reason(choice) == reason


def test_errors_by_status() -> None:
    assert orjson.loads(anthropic.error_body(GatewayError(429, "slow down"))) == {
        "type": "error", "error": {"type": "rate_limit_error", "message": "slow down"}}
    assert anthropic.error_type(502) == "api_error"
    assert anthropic.error_type(503) == "overloaded_error"


# -- streams -------------------------------------------------------------------------------------

def test_a_text_stream_is_the_event_sequence() -> None:
    out = events(MessageEvents("claude").feed(TEXT_STREAM))
    assert [e["type"] for e in out] == [
        "message_start", "content_block_start", "content_block_delta", "content_block_delta",
        "content_block_stop", "message_delta", "message_stop"]
    assert out[0]["message"]["id"] == "msg_abc" and out[0]["message"]["model"] == "claude"
    assert [e["delta"]["text"] for e in out[2:4]] == ["Hi", " there"]
    assert out[5]["delta"] == {"stop_reason": "end_turn", "stop_sequence": None}
    assert out[5]["usage"] == {"input_tokens": 9, "output_tokens": 4}


@given(st.lists(st.integers(min_value=1, max_value=len(TEXT_STREAM) - 1), unique=True))
def test_a_stream_cut_anywhere_gives_the_same_events(cuts: list[int]) -> None:
    translator = MessageEvents("claude")
    edges = [0, *sorted(cuts), len(TEXT_STREAM)]
    out = b"".join(translator.feed(TEXT_STREAM[a:b]) for a, b in itertools.pairwise(edges))
    assert out + translator.flush() == MessageEvents("claude").feed(TEXT_STREAM)


def test_thinking_then_text_then_two_tool_calls_are_four_blocks() -> None:
    stream = sse(
        chunk({"reasoning_content": "hmm"}), chunk({"content": "Sure."}),
        chunk({"tool_calls": [{"index": 0, "id": "a", "function": {"name": "f",
                                                                   "arguments": '{"x"'}}]}),
        chunk({"tool_calls": [{"index": 0, "function": {"arguments": ": 1}"}}]}),
        chunk({"tool_calls": [{"index": 1, "id": "b", "function": {"name": "g",
                                                                   "arguments": "{}"}}]}),
        chunk({}, "tool_calls"), b"[DONE]")
    out = events(MessageEvents("c").feed(stream))
    starts = [e["content_block"] for e in out if e["type"] == "content_block_start"]
    assert [b["type"] for b in starts] == ["thinking", "text", "tool_use", "tool_use"]
    assert (starts[2]["id"], starts[2]["name"], starts[3]["id"]) == ("a", "f", "b")
    json_pieces = [e["delta"]["partial_json"] for e in out
                   if e["type"] == "content_block_delta" and e["index"] == 2]
    assert "".join(json_pieces) == '{"x": 1}'
    assert [e["index"] for e in out if e["type"] == "content_block_stop"] == [0, 1, 2, 3]
    assert out[-2]["delta"]["stop_reason"] == "tool_use"


def test_an_error_event_ends_the_stream() -> None:
    translator = MessageEvents("c")
    out = events(translator.feed(sse(chunk({"content": "a"}),
                                     {"error": {"message": "backend gone"}})))
    assert out[-1] == {"type": "error", "error": {"type": "api_error",
                                                  "message": "backend gone"}}
    assert translator.flush() == b""


def test_a_stream_that_stops_short_ends_with_an_error_event() -> None:
    translator = MessageEvents("c")
    translator.feed(sse(chunk({"content": "a"})))
    assert events(translator.flush())[-1]["type"] == "error"
