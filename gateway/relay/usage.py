"""Token usage read off answers (for metrics and per-key token budgets), without parsing them:
a search for the usage object's numbers after the answer's last `"usage"`, in OpenAI's words
(`prompt_tokens`, `completion_tokens`) or Anthropic's (`input_tokens`, `output_tokens`: a
passed-through Messages stream says the first in its opening event and the second in its last)."""

from __future__ import annotations

import re
from dataclasses import dataclass

import orjson

_EMPTY_LIST = re.compile(rb"\[\]")  # a compiled search: bytes.find(b"[]") is 3x slower here
_FIELD = re.compile(
    rb'"(prompt_tokens|completion_tokens|total_tokens|input_tokens|output_tokens)"\s*:\s*(\d+)')
_NUMBERS_WITHIN = 512  # bytes after `"usage"` that hold its numbers
# An opening usage is read for its input tokens, which Anthropic's message_start names first.
_INPUT_WITHIN = 256
# What a stream's scanner keeps: its start, where an opening usage lies (after message_start's
# id and model), and its end, which holds the last usage event whole with room to spare.
_HEAD, _KEEP, _JOIN_EVERY = 1024, 2048, 32


@dataclass(frozen=True)
class Usage:
    prompt: int = 0
    completion: int = 0
    total: int = 0


def usage_of(payload: bytes, opening: bytes = b"") -> Usage:
    """The usage in one JSON answer or the tail of a stream; zeros when there is none.
    `opening`: a stream's first stretch mentioning usage; the tail's figures win over it."""
    fields = _fields(payload, payload.rfind(b'"usage"'))
    if b"prompt_tokens" not in fields and b"input_tokens" not in fields and opening:
        fields = {**_fields(opening, opening.find(b'"usage"')), **fields}
    prompt = fields.get(b"prompt_tokens", fields.get(b"input_tokens", 0))
    completion = fields.get(b"completion_tokens", fields.get(b"output_tokens", 0))
    return Usage(prompt, completion, fields.get(b"total_tokens", prompt + completion))


def _fields(stretch: bytes, start: int) -> dict[bytes, int]:
    if start < 0:
        return {}
    return {name: int(value) for name, value in _FIELD.findall(stretch, start)}


class UsageScanner:
    """Keeps a stream's first stretch (where an Anthropic stream says its input tokens) and its
    last (the usage chunk comes last), and reads the usage off them once the stream has ended.
    It sees every frame of every stream, so a frame costs it an append: the chunks are joined
    and cut to the last `_KEEP` bytes only every `_JOIN_EVERY` chunks."""

    def __init__(self) -> None:
        self._head: bytes | None = None  # the stream's start, once bytes have been dropped
        self._recent: list[bytes] = []

    def feed(self, chunk: bytes) -> bytes:
        """A relay step (`relay.stream.Step`): the chunk passes as it came."""
        recent = self._recent
        recent.append(chunk)
        if len(recent) >= _JOIN_EVERY:
            self._join()
        return chunk

    def flush(self) -> bytes:
        return b""

    def _join(self) -> None:
        joined = b"".join(self._recent)
        if len(joined) > _KEEP:
            if self._head is None:  # nothing dropped before: this is the stream's start
                self._head = joined[:_HEAD]
            joined = joined[-_KEEP:]
        self._recent = [joined]

    @property
    def usage(self) -> Usage:
        tail = b"".join(self._recent)
        head = tail if self._head is None else self._head
        opening = head.find(b'"usage"')
        closing = tail.rfind(b'"usage"')
        return usage_of(tail[closing:closing + _NUMBERS_WITHIN] if closing >= 0 else b"",
                        head[opening:opening + _INPUT_WITHIN] if opening >= 0 else b"")


class UsageChunkFilter:
    """Leaves out of a stream the usage-only event (`"choices": []`) that the gateway asked the
    backend for on behalf of a client that did not ask; every other byte passes as it came.

    Text after the last event boundary waits for the rest of its event; only an event that holds
    an empty `[]` is looked at, and only one that also mentions usage is parsed, so the usual
    chunk costs one search for `[]` and one for its last event boundary.
    """

    def __init__(self) -> None:
        self._pending = b""

    def feed(self, chunk: bytes) -> bytes:
        if not self._pending and chunk.endswith(b"\n\n") and not _EMPTY_LIST.search(chunk):
            return chunk  # whole events, none of them usage-only: most frames
        data = self._pending + chunk if self._pending else chunk
        cut = len(data) if data.endswith(b"\n\n") else _events_end(data)
        self._pending = data[cut:]
        return _without_usage(data[:cut]) if cut else b""

    def flush(self) -> bytes:
        data, self._pending = self._pending, b""
        return data


def _events_end(data: bytes, upto: int | None = None) -> int:
    """Where the last complete SSE event before `upto` ends (0 when none does)."""
    lf = data.rfind(b"\n\n", 0, upto)
    crlf = data.rfind(b"\n\r\n", max(lf, 0), upto)  # only one after `lf` can end later
    return max(lf + 2 if lf >= 0 else 0, crlf + 3 if crlf >= 0 else 0)


def _event_end(data: bytes, at: int) -> int:
    """Where the SSE event holding `at` ends, its blank line included."""
    lf = data.find(b"\n\n", at)
    crlf = data.find(b"\n\r\n", at, lf + 2 if lf >= 0 else len(data))  # one ending first
    if crlf >= 0:
        return crlf + 3
    return lf + 2 if lf >= 0 else len(data)


def _without_usage(data: bytes) -> bytes:
    """`data` (whole events) less its usage-only events. Only an event holding an empty `[]`
    can be one: those are found by a search, and no other event is split off or looked at
    (a regular expression splitting every event cost 90 us for 18 frames)."""
    kept, cut, end = [], 0, 0
    for found in _EMPTY_LIST.finditer(data):
        at = found.start()
        if at < end:
            continue  # in the event just looked at
        start, end = _events_end(data, at), _event_end(data, at)
        if _usage_only(data[start:end]):
            kept.append(data[cut:start])
            cut = end
    if not kept:
        return data
    kept.append(data[cut:])
    return b"".join(kept)


def _usage_only(event: bytes) -> bool:
    payload = event.strip()
    if not payload.startswith(b"data:") or b'"usage"' not in payload or b"[]" not in payload:
        return False
    try:
        data = orjson.loads(payload[5:])
    except orjson.JSONDecodeError:
        return False
    return isinstance(data, dict) and data.get("choices") == [] and bool(data.get("usage"))
