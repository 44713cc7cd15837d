"""Token usage read off answers (for metrics and per-key token budgets), without parsing them:
a search for the usage object's numbers after the answer's last `"usage"`."""

from __future__ import annotations

import re
from dataclasses import dataclass

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
