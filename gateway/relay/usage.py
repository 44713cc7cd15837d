"""Token usage read off answers (for metrics and per-key token budgets), without parsing them:
a search for the usage object's numbers after the answer's last `"usage"`."""

from __future__ import annotations

import re
from dataclasses import dataclass

import orjson

_EVENT_END = re.compile(rb"\r?\n\r?\n")
_FIELD = re.compile(rb'"(prompt_tokens|completion_tokens|total_tokens)"\s*:\s*(\d+)')


@dataclass(frozen=True)
class Usage:
    prompt: int = 0
    completion: int = 0
    total: int = 0


def usage_of(payload: bytes) -> Usage:
    """The usage in one JSON answer or the tail of a stream; zeros when there is none."""
    start = payload.rfind(b'"usage"')
    if start < 0:
        return Usage()
    fields = {name: int(value) for name, value in _FIELD.findall(payload, start)}
    prompt = fields.get(b"prompt_tokens", 0)
    completion = fields.get(b"completion_tokens", 0)
    return Usage(prompt, completion, fields.get(b"total_tokens", prompt + completion))


class UsageScanner:
    """Keeps the last stretch of a stream that mentions usage (the usage chunk comes last)."""

    def __init__(self) -> None:
        self._last = b""
        self._tail = b""

    def feed(self, chunk: bytes) -> None:
        window = self._tail + chunk  # a `"usage"` may be split between two chunks
        if b'"usage"' in window:
            self._last = window[window.rfind(b'"usage"'):]
        elif self._last and len(self._last) < 512:
            self._last += chunk  # the usage object's numbers may come in the next chunk
        self._tail = chunk[-8:]

    @property
    def usage(self) -> Usage:
        return usage_of(self._last)


class UsageChunkFilter:
    """Leaves out of a stream the usage-only event (`"choices": []`) that the gateway asked the
    backend for on behalf of a client that did not ask; every other byte passes as it came.

    Text after the last event boundary waits for the rest of its event; only a stretch that
    holds an empty `[]` is split into events, and only an event that also mentions usage is
    parsed, so the usual frame costs a few byte searches.
    """

    def __init__(self) -> None:
        self._pending = b""

    def feed(self, chunk: bytes) -> bytes:
        if not self._pending and chunk.endswith(b"\n\n") and b"[]" not in chunk:
            return chunk  # whole events, none of them usage-only
        data = self._pending + chunk
        cut = _events_end(data)
        self._pending = data[cut:]
        complete = data[:cut]
        return complete if b"[]" not in complete else _without_usage(complete)

    def flush(self) -> bytes:
        data, self._pending = self._pending, b""
        return data


def _events_end(data: bytes) -> int:
    """Where the last complete SSE event ends (0 when none does)."""
    lf, crlf = data.rfind(b"\n\n"), data.rfind(b"\n\r\n")
    return max(lf + 2 if lf >= 0 else 0, crlf + 3 if crlf >= 0 else 0)


def _without_usage(data: bytes) -> bytes:
    kept, start = [], 0
    for end in _EVENT_END.finditer(data):
        event = data[start:end.end()]
        if not _usage_only(event):
            kept.append(event)
        start = end.end()
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
