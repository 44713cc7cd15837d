"""Completion records: one stored answer, replayed as JSON or as an OpenAI SSE stream.

A record is the non-streamed OpenAI response body as a dict (`chat.completion`,
`text_completion`, the embeddings `list`, or a rerank answer with its `results`). Streamed
answers are folded into that same shape by `SseAccumulator`, so either kind of request can be
served from either kind of upstream answer.
Only complete answers become records: every choice has a `finish_reason` and, for streams, the
stream ended with `data: [DONE]`.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import orjson

_OBJECTS = {
    "chat/completions": "chat.completion",
    "completions": "text_completion",
    "embeddings": "list",
    "rerank": "rerank",  # no `object` of its own: the key only marks it as storable
}
_CHUNK_OBJECTS = {"chat.completion": "chat.completion.chunk", "text_completion": "text_completion"}
# Delta fields that arrive in pieces and are concatenated; every other scalar is set, not appended,
# because some backends repeat `id`, `type` or `function.name` in every tool-call delta.
_TEXT_FIELDS = frozenset(
    {"content", "text", "reasoning_content", "reasoning", "refusal", "arguments", "input"}
)
# Top-level chunk fields copied into the record; the rest (`obfuscation`, ...) is per-chunk noise.
_ENVELOPE_FIELDS = ("id", "created", "model", "system_fingerprint", "service_tier")
# finish_reason values some backends (vLLM) send for an answer cut short by the server.
_ABORTED = frozenset({"abort", "error", "cancelled"})
_LINE_BREAK = re.compile(rb"\r\n|\r|\n")
_RECORD_VERSION = 1

Record = dict[str, Any]


def record_from_json(endpoint: str, body: bytes) -> Record | None:
    """The record of a non-streamed upstream answer, or None if it is not a complete answer."""
    response = _loads_object(body)
    if response is None or "error" in response or endpoint not in _OBJECTS:
        return None
    if endpoint == "embeddings":
        return response if isinstance(response.get("data"), list) else None
    if endpoint == "rerank":
        return response if isinstance(response.get("results"), list) else None
    choices = response.get("choices")
    if not choices or not all(_finished(choice) for choice in choices):
        return None
    response["object"] = _OBJECTS[endpoint]
    return response


class SseAccumulator:
    """Folds a streamed chat or legacy completion, fed in arbitrary byte pieces, into a record."""

    def __init__(self, endpoint: str) -> None:
        if endpoint not in ("chat/completions", "completions"):
            raise ValueError(f"cannot accumulate a stream of {endpoint!r}")
        self._object = _OBJECTS[endpoint]
        self._chat = endpoint == "chat/completions"
        self._pending = b""
        self._data: list[bytes] = []
        self._envelope: dict[str, Any] = {}
        self._choices: dict[int, dict[str, Any]] = {}
        self._usage: Any = None
        self._done = False
        self._failed = False

    def feed(self, chunk: bytes) -> None:
        if self._failed or self._done:
            return
        data = self._pending + chunk
        # A trailing "\r" may be the first half of "\r\n": keep it until the next piece arrives.
        cut = len(data) - 1 if data.endswith(b"\r") else len(data)
        *lines, rest = _LINE_BREAK.split(data[:cut])
        self._pending = rest + data[cut:]
        for line in lines:
            self._line(line)

    def result(self) -> Record | None:
        """The record once the stream ended cleanly; None for an errored or incomplete stream."""
        if self._pending:
            self._line(self._pending.rstrip(b"\r"))
            self._pending = b""
        self._dispatch()
        if self._failed or not self._done or not self._choices:
            return None
        choices = [self._finish_choice(self._choices[index]) for index in sorted(self._choices)]
        if not all(_finished(choice) for choice in choices):
            return None
        record: Record = {**self._envelope, "object": self._object, "choices": choices}
        if self._usage is not None:
            record["usage"] = self._usage
        return record

    def _line(self, line: bytes) -> None:
        if not line:
            self._dispatch()
        elif line.startswith(b"data:"):
            self._data.append(line[6:] if line.startswith(b"data: ") else line[5:])
        elif line.startswith(b"event:") and line[6:].strip() == b"error":
            self._failed = True

    def _dispatch(self) -> None:
        if not self._data or self._failed or self._done:
            self._data.clear()
            return
        payload = b"\n".join(self._data)
        self._data.clear()
        if payload.strip() == b"[DONE]":
            self._done = True
            return
        chunk = _loads_object(payload)
        if chunk is None or "error" in chunk:
            self._failed = True
            return
        self._chunk(chunk)

    def _chunk(self, chunk: dict[str, Any]) -> None:
        for name in _ENVELOPE_FIELDS:
            if chunk.get(name) is not None:
                self._envelope[name] = chunk[name]
        if chunk.get("usage") is not None:
            self._usage = chunk["usage"]
        for choice in chunk.get("choices") or ():
            index = choice.get("index", 0)
            _merge(self._choices.setdefault(index, {"index": index}), choice)

    def _finish_choice(self, accumulated: dict[str, Any]) -> dict[str, Any]:
        choice = {"logprobs": None, "finish_reason": None, **accumulated}
        if not self._chat:
            return {"text": "", **choice}
        message = {"role": "assistant", "content": None, **choice.pop("delta", {})}
        if message.get("tool_calls"):
            calls = sorted(message["tool_calls"], key=lambda call: call.get("index", 0))
            message["tool_calls"] = [_without(call, "index") for call in calls]
        return {**choice, "message": message}


def render_json(record: Record) -> bytes:
    return orjson.dumps(record)


def render_sse(record: Record, *, include_usage: bool) -> Iterator[bytes]:
    """Replay a chat or legacy completion record as the stream OpenAI would have sent.

    Per choice: a role chunk, one chunk per text field (reasoning before content), one per tool
    call, then the finish chunk; then the usage chunk (`choices: []`) if asked for and known.
    """
    chunk_object = _CHUNK_OBJECTS.get(record.get("object", ""))
    if chunk_object is None:
        raise ValueError(f"cannot stream a {record.get('object')!r} record")
    envelope = {name: record[name] for name in _ENVELOPE_FIELDS if name in record}
    envelope["object"] = chunk_object
    if include_usage:
        envelope["usage"] = None
    pieces = _chat_pieces if chunk_object == "chat.completion.chunk" else _text_pieces
    for choice in record["choices"]:
        for piece in pieces(choice):
            yield _event({**envelope, "choices": [piece]})
    if include_usage and record.get("usage") is not None:
        yield _event({**envelope, "choices": [], "usage": record["usage"]})
    yield b"data: [DONE]\n\n"


def dumps_record(record: Record) -> bytes:
    return orjson.dumps({"v": _RECORD_VERSION, "record": record})


def loads_record(value: bytes) -> Record | None:
    """None for bytes this version cannot read (treated as a cache miss, not an error)."""
    stored = _loads_object(value)
    if stored is None or stored.get("v") != _RECORD_VERSION:
        return None
    record = stored.get("record")
    return record if isinstance(record, dict) else None


def _chat_pieces(choice: dict[str, Any]) -> Iterator[dict[str, Any]]:
    index = choice.get("index", 0)
    message = {"role": "assistant", **(choice.get("message") or {})}
    texts = {
        name: message.pop(name)
        for name in ("reasoning_content", "reasoning", "content", "refusal")
        if isinstance(message.get(name), str) and message[name]
    }
    tool_calls = message.pop("tool_calls") if message.get("tool_calls") else []
    logprobs = choice.get("logprobs")
    yield _piece(index, delta=message)
    for name, text in texts.items():
        yield _piece(index, delta={name: text}, logprobs=logprobs if name == "content" else None)
    for position, call in enumerate(tool_calls):
        yield _piece(index, delta={"tool_calls": [{"index": position, **call}]})
    yield {
        **_piece(index, delta={}, logprobs=None if "content" in texts else logprobs),
        **_extras(choice, "message"),
        "finish_reason": choice.get("finish_reason"),
    }


def _text_pieces(choice: dict[str, Any]) -> Iterator[dict[str, Any]]:
    index = choice.get("index", 0)
    logprobs = choice.get("logprobs")
    yield {
        "index": index,
        "text": choice.get("text", ""),
        "logprobs": logprobs,
        "finish_reason": None,
    }
    yield {
        "index": index,
        "text": "",
        "logprobs": None,
        **_extras(choice, "text"),
        "finish_reason": choice.get("finish_reason"),
    }


def _piece(index: int, *, delta: dict[str, Any], logprobs: Any = None) -> dict[str, Any]:
    return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": None}


def _extras(choice: dict[str, Any], body: str) -> dict[str, Any]:
    """Backend-specific choice fields (vLLM's `stop_reason`, ...), sent once with the finish."""
    standard = ("index", body, "logprobs", "finish_reason")
    return {name: value for name, value in choice.items() if name not in standard}


def _without(mapping: dict[str, Any], name: str) -> dict[str, Any]:
    return {key: value for key, value in mapping.items() if key != name}


def _event(chunk: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(chunk) + b"\n\n"


def _merge(into: dict[str, Any], delta: dict[str, Any]) -> None:
    """Fold one delta into the accumulated value: text appends, lists extend, dicts recurse.

    Parsed chunks belong to the accumulator, so their dicts and lists are adopted, not copied.
    """
    for name, value in delta.items():
        current = into.get(name)
        if value is None:
            into.setdefault(name, None)
        elif current is None:
            into[name] = value
        elif isinstance(value, str) and isinstance(current, str) and name in _TEXT_FIELDS:
            into[name] = current + value
        elif isinstance(value, dict) and isinstance(current, dict):
            _merge(current, value)
        elif isinstance(value, list) and isinstance(current, list):
            _merge_list(current, value)
        else:
            into[name] = value


def _merge_list(into: list[Any], delta: list[Any]) -> None:
    """Items with an `index` (tool calls) are merged into their slot; others are appended."""
    for item in delta:
        if not (isinstance(item, dict) and isinstance(item.get("index"), int)):
            into.append(item)
            continue
        slot = next((entry for entry in into if entry.get("index") == item["index"]), None)
        if slot is None:
            into.append(item)
        else:
            _merge(slot, item)


def _finished(choice: Any) -> bool:
    if not isinstance(choice, dict):
        return False
    reason = choice.get("finish_reason")
    return bool(reason) and reason not in _ABORTED


def _loads_object(body: bytes) -> dict[str, Any] | None:
    try:
        value = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None
