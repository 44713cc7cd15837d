"""Ollama <-> OpenAI translation as pure functions: requests, answers, and streams cut anywhere."""

from __future__ import annotations

import itertools
import json
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.errors import GatewayError
from gateway.fronts.translate import ollama
from gateway.fronts.translate.ollama import NdjsonFrames, Timing


def sse(*events: Any) -> bytes:
    return b"".join(b"data: " + (e if isinstance(e, bytes) else orjson.dumps(e)) + b"\n\n"
                    for e in events)


def chunk(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> dict[str, Any]:
    return {"id": "chatcmpl-1", "object": "chat.completion.chunk", "model": "m",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], **extra}


USAGE = {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}
STREAM = sse(chunk({"role": "assistant", "content": ""}), chunk({"content": "Hel"}),
             chunk({"content": "lo"}), chunk({}, "stop"),
             {"id": "chatcmpl-1", "choices": [], "usage": USAGE}, b"[DONE]")


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        self.now += 0.25
        return self.now


def frames(generate: bool = False) -> NdjsonFrames:
    return NdjsonFrames("qwen", Timing(started=100.0, waited_s=0.5), Clock(), generate)


def lines(data: bytes) -> list[dict[str, Any]]:
    return [json.loads(line) for line in data.splitlines()]


# -- requests ------------------------------------------------------------------------------------

def test_chat_request_maps_options_format_and_streaming() -> None:
    body = {"model": "qwen:latest", "messages": [{"role": "user", "content": "hi"}],
            "format": "json", "keep_alive": "1h",
            "options": {"temperature": 0.1, "num_predict": 20, "top_k": 3, "num_ctx": 8192,
                        "stop": ["\n"]}}
    assert ollama.chat_request(body, "qwen") == {
        "model": "qwen", "messages": [{"role": "user", "content": "hi"}],
        "temperature": 0.1, "stop": ["\n"], "top_k": 3, "max_tokens": 20,
        "response_format": {"type": "json_object"},
        "stream": True, "stream_options": {"include_usage": True}}


def test_no_limit_and_not_streamed() -> None:
    body = {"model": "m", "messages": [], "stream": False, "options": {"num_predict": -1}}
    assert ollama.chat_request(body, "m") == {"model": "m", "messages": []}


def test_generate_is_a_chat_unless_raw_or_suffix() -> None:
    body = {"model": "m", "prompt": "why?", "system": "be brief", "stream": False}
    assert ollama.generate_request(body, "m") == ("chat/completions", {"model": "m", "messages": [
        {"role": "system", "content": "be brief"}, {"role": "user", "content": "why?"}]})
    raw = {"model": "m", "prompt": "def f(", "suffix": "return x", "stream": False}
    assert ollama.generate_request(raw, "m") == (
        "completions", {"model": "m", "prompt": "def f(", "suffix": "return x"})


def test_tool_calls_and_results_are_tied_by_id() -> None:
    messages = [
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"function": {"name": "weather", "arguments": {"city": "Paris"}}},
            {"function": {"name": "time", "arguments": {}}}]},
        {"role": "tool", "content": "12:00", "tool_name": "time"},
        {"role": "tool", "content": "sunny"},
    ]
    out = ollama.chat_messages(messages)
    ids = [call["id"] for call in out[1]["tool_calls"]]
    assert out[1]["tool_calls"][0]["function"] == {"name": "weather",
                                                   "arguments": '{"city":"Paris"}'}
    assert out[2] == {"role": "tool", "tool_call_id": ids[1], "content": "12:00"}  # by name
    assert out[3] == {"role": "tool", "tool_call_id": ids[1], "content": "sunny"}  # by order
    assert len(set(ids)) == 2


def test_images_become_data_urls_by_their_bytes() -> None:
    (message,) = ollama.chat_messages([{"role": "user", "content": "look",
                                        "images": ["/9j/4AAQ", "iVBORw0K"]}])
    assert [p["image_url"]["url"] for p in message["content"][1:]] == [
        "data:image/jpeg;base64,/9j/4AAQ", "data:image/png;base64,iVBORw0K"]


def test_a_schema_format_is_a_json_schema_response_format() -> None:
    schema = {"type": "object"}
    assert ollama.sampling({"format": schema})["response_format"] == {
        "type": "json_schema", "json_schema": {"name": "format", "schema": schema}}
    with pytest.raises(GatewayError) as bad:
        ollama.sampling({"format": "yaml"})
    assert bad.value.status == 400 and bad.value.param == "format"


@pytest.mark.parametrize("raw", [b"[]", b"nope", b'{"messages": []}', b'{"model": ""}'])
def test_a_request_must_be_an_object_with_a_model(raw: bytes) -> None:
    with pytest.raises(GatewayError) as bad:
        ollama.request_body(raw)
    assert bad.value.status == 400


# -- answers -------------------------------------------------------------------------------------

def test_a_chat_answer_with_counts_and_nanoseconds() -> None:
    answer = {"choices": [{"index": 0, "finish_reason": "length",
                           "message": {"role": "assistant", "content": "Hi",
                                       "reasoning_content": "hmm"}}], "usage": USAGE}
    out = ollama.chat_answer(answer, "qwen:latest", Timing(started=10.0, waited_s=1.0), 12.5,
                             generate=False)
    assert out["model"] == "qwen:latest" and out["done"] is True
    assert out["message"] == {"role": "assistant", "content": "Hi", "thinking": "hmm"}
    assert out["done_reason"] == "length"
    assert (out["prompt_eval_count"], out["eval_count"]) == (7, 3)
    assert out["total_duration"] == 2_500_000_000 and out["load_duration"] == 1_000_000_000
    assert out["eval_duration"] == 1_500_000_000


def test_tool_calls_get_object_arguments() -> None:
    call = {"id": "c1", "type": "function",
            "function": {"name": "weather", "arguments": '{"city": "Paris"}'}}
    assert ollama.ollama_tool_call(call) == {"function": {"name": "weather",
                                                          "arguments": {"city": "Paris"}}}
    broken = {"function": {"name": "f", "arguments": '{"city": '}}
    assert ollama.ollama_tool_call(broken)["function"]["arguments"] == {"arguments": '{"city": '}


def test_embed_answers_keep_the_input_order() -> None:
    answer = {"data": [{"index": 1, "embedding": [2.0]}, {"index": 0, "embedding": [1.0]}],
              "usage": {"prompt_tokens": 4}}
    out = ollama.embed_answer(answer, "e", Timing(0.0), 1.0, legacy=False)
    assert out["embeddings"] == [[1.0], [2.0]] and out["prompt_eval_count"] == 4
    assert ollama.embed_answer(answer, "e", Timing(0.0), 1.0, legacy=True) == {"embedding": [1.0]}


def test_errors_are_one_string() -> None:
    assert ollama.error_body(GatewayError(404, "no such model")) == b'{"error":"no such model"}'


# -- streams -------------------------------------------------------------------------------------

def test_a_stream_becomes_ndjson_pieces_and_a_last_line() -> None:
    out = lines(frames().feed(STREAM))
    assert [line["message"]["content"] for line in out] == ["Hel", "lo", ""]
    assert [line["done"] for line in out] == [False, False, True]
    last = out[-1]
    assert (last["done_reason"], last["prompt_eval_count"], last["eval_count"]) == ("stop", 7, 3)
    assert last["load_duration"] == 500_000_000
    assert last["total_duration"] >= last["eval_duration"] > 0


@given(st.lists(st.integers(min_value=1, max_value=len(STREAM) - 1), unique=True))
def test_a_stream_cut_anywhere_gives_the_same_lines(cuts: list[int]) -> None:
    translator = frames()
    edges = [0, *sorted(cuts), len(STREAM)]
    out = b"".join(translator.feed(STREAM[a:b]) for a, b in itertools.pairwise(edges))
    out += translator.flush()
    assert [(line["message"]["content"], line["done"]) for line in lines(out)] == [
        ("Hel", False), ("lo", False), ("", True)]


def test_generate_streams_carry_the_response_field() -> None:
    completion = sse({"choices": [{"index": 0, "text": "ab", "finish_reason": None}]},
                     {"choices": [{"index": 0, "text": "", "finish_reason": "stop"}]}, b"[DONE]")
    out = lines(frames(generate=True).feed(completion))
    assert [line["response"] for line in out] == ["ab", ""]


def test_streamed_tool_calls_come_whole_before_the_last_line() -> None:
    stream = sse(
        chunk({"tool_calls": [{"index": 0, "id": "c", "function": {"name": "weather",
                                                                   "arguments": '{"ci'}}]}),
        chunk({"tool_calls": [{"index": 0, "function": {"arguments": 'ty": "Oslo"}'}}]}),
        chunk({}, "tool_calls"), b"[DONE]")
    out = lines(frames().feed(stream))
    assert out[0]["message"]["tool_calls"] == [{"function": {"name": "weather",
                                                             "arguments": {"city": "Oslo"}}}]
    assert out[1]["done"] and out[1]["done_reason"] == "stop"


def test_an_error_event_is_an_error_line_and_the_end() -> None:
    failure = {"error": {"message": "Backend 'b' failed: the connection broke off."}}
    translator = frames()
    out = translator.feed(sse(chunk({"content": "a"}), failure, chunk({"content": "b"})))
    assert lines(out)[-1] == {"error": "Backend 'b' failed: the connection broke off."}
    assert translator.flush() == b""


def test_a_stream_that_stops_short_ends_with_an_error_line() -> None:
    translator = frames()
    translator.feed(sse(chunk({"content": "a"})))
    assert "error" in lines(translator.flush())[0]


def test_comments_are_passed_over() -> None:
    assert frames().feed(b": loading m (3 s)\n\n") == b""
