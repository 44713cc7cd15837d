"""OpenAI's server-sent events read back: the JSON of each complete `data:` event."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import orjson

_EVENT_END = re.compile(rb"\r?\n\r?\n")
DONE = "[DONE]"


class SseEvents:
    """Bytes fed in arbitrary pieces, out as whole events: each `data:` payload parsed (a dict),
    or DONE for `data: [DONE]`. Comments (`: loading ...`) and other fields are passed over;
    a payload that is not a JSON object comes out as an error event, so it is never lost."""

    def __init__(self) -> None:
        self._pending = b""

    def feed(self, chunk: bytes) -> Iterator[dict[str, Any] | str]:
        data = self._pending + chunk
        start = 0
        for end in _EVENT_END.finditer(data):
            event = self._event(data[start:end.start()])
            start = end.end()
            if event is not None:
                yield event
        self._pending = data[start:]

    def flush(self) -> Iterator[dict[str, Any] | str]:
        """The last event, had the stream no blank line after it."""
        data, self._pending = self._pending, b""
        event = self._event(data.strip())
        if event is not None:
            yield event

    @staticmethod
    def _event(raw: bytes) -> dict[str, Any] | str | None:
        lines = [line[5:].removeprefix(b" ") for line in raw.splitlines()
                 if line.startswith(b"data:")]
        if not lines:
            return None
        payload = b"\n".join(lines)
        if payload.strip() == b"[DONE]":
            return DONE
        try:
            parsed = orjson.loads(payload)
        except orjson.JSONDecodeError:
            parsed = None
        if not isinstance(parsed, dict):
            message = "The backend sent a stream event that is not a JSON object."
            return {"error": {"message": message, "type": "server_error",
                              "code": "backend_invalid_response"}}
        return parsed


INCOMPLETE = "The backend ended the stream before it was complete."


class StreamTranslation:
    """The frame of every translation of an OpenAI stream: its events, in order, until
    `data: [DONE]` or an error event; a stream that stops before either ends with an error.
    A front's translation says what a chunk, the end and an error become (`chunk`, `done`,
    `error`)."""

    def __init__(self) -> None:
        self._events = SseEvents()
        self._ended = False

    def feed(self, chunk: bytes) -> bytes:
        return b"".join(self._on(event) for event in self._events.feed(chunk))

    def flush(self) -> bytes:
        tail = b"".join(self._on(event) for event in self._events.flush())
        return tail + (b"" if self._ended else self._fail(INCOMPLETE))

    def _on(self, event: dict[str, Any] | str) -> bytes:
        if self._ended:
            return b""
        if event == DONE:
            self._ended = True
            return self.done()
        assert isinstance(event, dict)
        if "error" in event:
            error = event["error"]
            return self._fail(str(error.get("message") if isinstance(error, dict) else error))
        return self.chunk(event)

    def _fail(self, message: str) -> bytes:
        self._ended = True
        return self.error(message)

    def chunk(self, event: dict[str, Any]) -> bytes:
        raise NotImplementedError

    def done(self) -> bytes:
        raise NotImplementedError

    def error(self, message: str) -> bytes:
        raise NotImplementedError
