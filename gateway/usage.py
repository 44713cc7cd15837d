"""Token usage read off answers (for per-key token budgets), without slowing the relay."""

from __future__ import annotations

from typing import Any

import orjson


def usage_tokens(payload: bytes) -> int:
    """`usage.total_tokens` of one JSON answer or SSE event; 0 when absent or unreadable."""
    try:
        data: Any = orjson.loads(payload)
    except orjson.JSONDecodeError:
        return 0
    usage = data.get("usage") if isinstance(data, dict) else None
    if not isinstance(usage, dict):
        return 0
    total = usage.get("total_tokens")
    if not isinstance(total, int):
        total = sum(v for k, v in usage.items() if k.endswith("_tokens") and isinstance(v, int))
    return max(total, 0)


class UsageScanner:
    """Remembers the last SSE `data:` line that mentions usage (the usage chunk comes last)."""

    def __init__(self) -> None:
        self._pending = b""
        self._last = b""

    def feed(self, chunk: bytes) -> None:
        data = self._pending + chunk
        cut = data.rfind(b"\n") + 1
        self._pending = data[cut:]
        if b'"usage"' not in data[:cut]:
            return
        for line in data[:cut].splitlines():
            if line.startswith(b"data:") and b'"usage"' in line:
                self._last = line[5:].strip()

    @property
    def tokens(self) -> int:
        return usage_tokens(self._last) if self._last else 0
