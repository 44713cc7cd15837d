from __future__ import annotations

import itertools
from collections.abc import Iterable
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st
from openai.lib.streaming.chat import ChatCompletionStreamState
from openai.types import Completion
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from gateway.cache.replay import (
    SseAccumulator,
    dumps_record,
    loads_record,
    record_from_json,
    render_json,
    render_sse,
)

ENVELOPE = {"id": "chatcmpl-1", "created": 1700000000, "model": "qwen3:8b"}
USAGE = {"prompt_tokens": 9, "completion_tokens": 12, "total_tokens": 21}


def chunk(*choices: dict[str, Any], **top: Any) -> dict[str, Any]:
    return {**ENVELOPE, "object": "chat.completion.chunk", "choices": list(choices), **top}


def delta(index: int = 0, finish_reason: str | None = None, **fields: Any) -> dict[str, Any]:
    return {"index": index, "delta": fields, "logprobs": None, "finish_reason": finish_reason}


def sse(events: Iterable[dict[str, Any] | str], newline: bytes = b"\n") -> bytes:
    lines = []
    for event in events:
        data = event if isinstance(event, str) else orjson.dumps(event).decode()
        lines.append(b"data: " + data.encode() + newline + newline)
    return b"".join(lines)


# A reasoning model answering in tokens, as vLLM / llama.cpp stream it, with usage at the end.
REASONING_STREAM = [
    chunk(delta(role="assistant", content="")),
    chunk(delta(reasoning_content="Two plus")),
    chunk(delta(reasoning_content=" two…")),
    chunk(delta(content="It is ")),
    chunk(delta(content="4 — «vier».")),
    chunk(delta(finish_reason="stop")),
    chunk(usage=USAGE),
    "[DONE]",
]
REASONING_RECORD = {
    **ENVELOPE,
    "object": "chat.completion",
    "choices": [
        {
            "index": 0,
            "message": {
                "role": "assistant",
                "content": "It is 4 — «vier».",
                "reasoning_content": "Two plus two…",
            },
            "logprobs": None,
            "finish_reason": "stop",
        }
    ],
    "usage": USAGE,
}


def tool_call(call_id: str, name: str, arguments: str) -> dict[str, Any]:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


def tool_delta(
    index: int, arguments: str, *, first: tuple[str, str] | None = None
) -> dict[str, Any]:
    """A tool-call chunk; `first` = (id, name) for the chunk that opens the call."""
    call = {"index": index, "function": {"arguments": arguments}}
    if first is not None:
        call = {"index": index, **tool_call(*first, arguments)}
    return chunk(delta(tool_calls=[call]))


# Two parallel tool calls, arguments split mid-token, as OpenAI streams them.
TOOL_STREAM = [
    chunk(delta(role="assistant", content=None)),
    tool_delta(0, "", first=("call_a", "weather")),
    tool_delta(0, '{"city": "Pa'),
    tool_delta(1, '{"tz"', first=("call_b", "time")),
    tool_delta(0, 'ris"}'),
    tool_delta(1, ': "CET"}'),
    chunk(delta(finish_reason="tool_calls")),
    "[DONE]",
]
TOOL_RECORD = {
    **ENVELOPE,
    "object": "chat.completion",
    "choices": [
        {
            "index": 0,
            "message": {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    tool_call("call_a", "weather", '{"city": "Paris"}'),
                    tool_call("call_b", "time", '{"tz": "CET"}'),
                ],
            },
            "logprobs": None,
            "finish_reason": "tool_calls",
        }
    ],
}


def text_chunk(text: str, finish_reason: str | None = None, **extra: Any) -> dict[str, Any]:
    choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason, **extra}
    return {**ENVELOPE, "id": "cmpl-1", "object": "text_completion", "choices": [choice]}


def text_logprobs(tokens: list[str], offset: int) -> dict[str, Any]:
    return {
        "tokens": tokens,
        "token_logprobs": [-0.5] * len(tokens),
        "top_logprobs": [{token: -0.5} for token in tokens],
        "text_offset": list(range(offset, offset + len(tokens))),
    }


COMPLETION_STREAM = [
    text_chunk("Once", logprobs=text_logprobs(["Once"], 0)),
    text_chunk(" upon", logprobs=text_logprobs([" upon"], 1)),
    text_chunk("", finish_reason="length"),
    {**text_chunk(""), "choices": [], "usage": USAGE},
    "[DONE]",
]
COMPLETION_RECORD = {
    **ENVELOPE,
    "id": "cmpl-1",
    "object": "text_completion",
    "choices": [
        {
            "index": 0,
            "text": "Once upon",
            "logprobs": {
                "tokens": ["Once", " upon"],
                "token_logprobs": [-0.5, -0.5],
                "top_logprobs": [{"Once": -0.5}, {" upon": -0.5}],
                "text_offset": [0, 1],
            },
            "finish_reason": "length",
        }
    ],
    "usage": USAGE,
}

STREAMS = {
    "reasoning": ("chat/completions", REASONING_STREAM, REASONING_RECORD),
    "tools": ("chat/completions", TOOL_STREAM, TOOL_RECORD),
    "completion": ("completions", COMPLETION_STREAM, COMPLETION_RECORD),
}


def accumulate(endpoint: str, pieces: Iterable[bytes]) -> dict[str, Any] | None:
    accumulator = SseAccumulator(endpoint)
    for piece in pieces:
        accumulator.feed(piece)
    return accumulator.result()


def split(data: bytes, cuts: Iterable[int]) -> list[bytes]:
    points = sorted({0, len(data), *(cut % (len(data) + 1) for cut in cuts)})
    return [data[start:end] for start, end in itertools.pairwise(points)]


def events(stream: bytes) -> list[dict[str, Any]]:
    """The JSON chunks of an SSE body, checking it ends with exactly one [DONE]."""
    blocks = stream.decode().split("\n\n")
    assert blocks[-2:] == ["data: [DONE]", ""]
    assert all(block.startswith("data: ") for block in blocks[:-2])
    return [orjson.loads(block[6:]) for block in blocks[:-2]]


# --- stream -> record -----------------------------------------------------------------------


@pytest.mark.parametrize("name", STREAMS)
def test_stream_folds_into_the_json_record(name: str) -> None:
    endpoint, stream, record = STREAMS[name]
    assert accumulate(endpoint, [sse(stream)]) == record


@pytest.mark.parametrize("name", STREAMS)
@given(cuts=st.lists(st.integers(min_value=0, max_value=10_000), max_size=40))
def test_split_points_do_not_matter(name: str, cuts: list[int]) -> None:
    endpoint, stream, record = STREAMS[name]
    assert accumulate(endpoint, split(sse(stream), cuts)) == record


@given(cuts=st.lists(st.integers(min_value=0, max_value=10_000), max_size=40))
def test_crlf_streams_split_anywhere(cuts: list[int]) -> None:
    assert accumulate("chat/completions", split(sse(TOOL_STREAM, b"\r\n"), cuts)) == TOOL_RECORD


def test_byte_by_byte_feeding() -> None:
    data = sse(REASONING_STREAM)
    assert accumulate("chat/completions", [data[i : i + 1] for i in range(len(data))]) == (
        REASONING_RECORD
    )


def test_comments_and_multiline_data_are_understood() -> None:
    body = sse(REASONING_STREAM[:3])
    body = b": loading qwen3\n\n" + body + b'data: {"choices": [{"index": 0,\ndata: '
    body += b'"delta": {"content": "It is 4 \\u2014 \\u00abvier\\u00bb."}}]}\n\n'
    body += sse(REASONING_STREAM[5:])
    assert accumulate("chat/completions", [body]) == REASONING_RECORD


def test_repeated_tool_call_ids_and_names_are_not_doubled() -> None:
    # Some backends resend id, type and name in every tool-call delta.
    call = {"index": 0, "id": "call_a", "type": "function"}
    stream = [
        chunk(delta(role="assistant", tool_calls=[{**call, "function": {"name": "f"}}])),
        chunk(delta(tool_calls=[{**call, "function": {"name": "f", "arguments": "{}"}}])),
        chunk(delta(finish_reason="tool_calls")),
        "[DONE]",
    ]
    record = accumulate("chat/completions", [sse(stream)])
    assert record is not None
    assert record["choices"][0]["message"]["tool_calls"] == [tool_call("call_a", "f", "{}")]


def test_several_choices_are_kept_apart() -> None:
    stream = [
        chunk(delta(0, role="assistant", content="A"), delta(1, role="assistant", content="B")),
        chunk(delta(1, content="b", finish_reason="stop")),
        chunk(delta(0, content="a", finish_reason="length")),
        "[DONE]",
    ]
    record = accumulate("chat/completions", [sse(stream)])
    assert record is not None
    assert [(c["message"]["content"], c["finish_reason"]) for c in record["choices"]] == [
        ("Aa", "length"),
        ("Bb", "stop"),
    ]


@pytest.mark.parametrize(
    "stream",
    [
        pytest.param(REASONING_STREAM[:-1], id="no-done"),
        pytest.param(REASONING_STREAM[:4], id="dropped-mid-answer"),
        pytest.param([*REASONING_STREAM[:5], "[DONE]"], id="no-finish-reason"),
        pytest.param(
            [*REASONING_STREAM[:5], chunk(delta(finish_reason="abort")), "[DONE]"], id="aborted"
        ),
        pytest.param(
            [*REASONING_STREAM[:5], {"error": {"message": "boom"}}, "[DONE]"], id="error-data"
        ),
        pytest.param([*REASONING_STREAM[:5], "{not json", "[DONE]"], id="garbled"),
        pytest.param(["[DONE]"], id="empty"),
    ],
)
def test_incomplete_or_failed_streams_give_no_record(stream: list[Any]) -> None:
    assert accumulate("chat/completions", [sse(stream)]) is None


def test_error_event_gives_no_record() -> None:
    body = sse(REASONING_STREAM[:5]) + b'event: error\ndata: {"message": "x"}\n\n'
    assert accumulate("chat/completions", [body + sse(REASONING_STREAM[5:])]) is None


def test_truncated_last_event_gives_no_record() -> None:
    body = sse(REASONING_STREAM[:-1])
    assert accumulate("chat/completions", [body, b'data: {"choices": [{"ind']) is None


def test_embeddings_cannot_be_accumulated() -> None:
    with pytest.raises(ValueError):
        SseAccumulator("embeddings")


# --- json -> record -------------------------------------------------------------------------


def test_json_answer_is_its_own_record() -> None:
    assert record_from_json("chat/completions", orjson.dumps(TOOL_RECORD)) == TOOL_RECORD
    body = orjson.dumps(COMPLETION_RECORD)
    assert record_from_json("completions", body) == COMPLETION_RECORD


def test_embeddings_record() -> None:
    answer = {
        "object": "list",
        "data": [{"object": "embedding", "index": 0, "embedding": [0.5]}],
        "model": "nomic",
        "usage": {"prompt_tokens": 2, "total_tokens": 2},
    }
    record = record_from_json("embeddings", orjson.dumps(answer))
    assert record == answer
    assert orjson.loads(render_json(record)) == answer
    with pytest.raises(ValueError):
        list(render_sse(answer, include_usage=True))


@pytest.mark.parametrize(
    "body",
    [
        b'{"error": {"message": "model is loading", "type": "server_error"}}',
        b"<html>502 Bad Gateway</html>",
        b"[]",
        orjson.dumps({**TOOL_RECORD, "choices": []}),
        orjson.dumps({**TOOL_RECORD, "choices": [{"index": 0, "message": {}}]}),
    ],
)
def test_json_that_is_not_a_complete_answer_gives_no_record(body: bytes) -> None:
    assert record_from_json("chat/completions", body) is None


# --- record -> stream -----------------------------------------------------------------------


@pytest.mark.parametrize("name", STREAMS)
def test_replayed_stream_folds_back_into_the_same_record(name: str) -> None:
    endpoint, _, record = STREAMS[name]
    assert accumulate(endpoint, render_sse(record, include_usage=True)) == record


def test_replayed_chat_stream_shape() -> None:
    chunks = events(b"".join(render_sse(REASONING_RECORD, include_usage=True)))
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == "chatcmpl-1" for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert [c["choices"][0]["delta"] for c in chunks[1:3]] == [
        {"reasoning_content": "Two plus two…"},
        {"content": "It is 4 — «vier»."},
    ]
    finish = chunks[-2]["choices"][0]
    assert (finish["delta"], finish["finish_reason"]) == ({}, "stop")
    assert (chunks[-1]["choices"], chunks[-1]["usage"]) == ([], USAGE)
    assert all(c["usage"] is None for c in chunks[:-1])


def test_usage_chunk_only_when_asked_for() -> None:
    chunks = events(b"".join(render_sse(REASONING_RECORD, include_usage=False)))
    assert all(c["choices"] and "usage" not in c for c in chunks)


def test_replayed_tool_calls_carry_their_index() -> None:
    chunks = events(b"".join(render_sse(TOOL_RECORD, include_usage=False)))
    calls = [c["choices"][0]["delta"]["tool_calls"][0] for c in chunks[1:3]]
    assert [(call["index"], call["id"]) for call in calls] == [(0, "call_a"), (1, "call_b")]


@pytest.mark.parametrize("name", ["reasoning", "tools"])
def test_openai_sdk_reads_the_replayed_stream(name: str) -> None:
    _, _, record = STREAMS[name]
    state = ChatCompletionStreamState()
    for event in events(b"".join(render_sse(record, include_usage=True))):
        state.handle_chunk(ChatCompletionChunk.model_validate(event))
    final = state.get_final_completion()
    expected = ChatCompletion.model_validate(record)
    assert final.choices[0].finish_reason == expected.choices[0].finish_reason
    assert final.choices[0].message.content == expected.choices[0].message.content
    assert calls(final) == calls(expected)
    assert final.usage == expected.usage


def calls(answer: ChatCompletion) -> list[tuple[str, str, str, str]]:
    tool_calls = answer.choices[0].message.tool_calls or []
    return [(c.id, c.type, c.function.name, c.function.arguments) for c in tool_calls]


def test_replayed_legacy_stream_is_valid_for_the_sdk() -> None:
    text, finish, usage = events(b"".join(render_sse(COMPLETION_RECORD, include_usage=True)))
    # The SDK types finish_reason as never null, so only the last two chunks validate strictly.
    assert Completion.model_validate(finish).choices[0].finish_reason == "length"
    assert Completion.model_validate(usage).usage is not None and usage["choices"] == []
    assert text["choices"][0].keys() == finish["choices"][0].keys()
    assert text["choices"][0]["text"] + finish["choices"][0]["text"] == "Once upon"


def test_stream_born_record_replays_as_json() -> None:
    record = accumulate("chat/completions", [sse(TOOL_STREAM)])
    assert record is not None
    answer = ChatCompletion.model_validate_json(render_json(record))
    assert answer.choices[0].message.tool_calls is not None
    assert answer.choices[0].message.tool_calls[1].function.arguments == '{"tz": "CET"}'


def test_json_round_trip_keeps_backend_extras_and_empty_content() -> None:
    record = {
        **ENVELOPE,
        "object": "chat.completion",
        "system_fingerprint": "fp_1",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "", "refusal": None, "tool_calls": []},
                "logprobs": {"content": [{"token": "x", "logprob": -1.0, "top_logprobs": []}]},
                "finish_reason": "stop",
                "stop_reason": None,
            }
        ],
    }
    assert accumulate("chat/completions", render_sse(record, include_usage=False)) == record


# --- storage --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", STREAMS)
def test_records_survive_the_store(name: str) -> None:
    record = STREAMS[name][2]
    assert loads_record(dumps_record(record)) == record


@pytest.mark.parametrize("value", [b"", b"garbage", b'{"v": 0, "record": {}}', b'{"v": 1}'])
def test_unreadable_stored_bytes_are_a_miss(value: bytes) -> None:
    assert loads_record(value) is None
