"""How long a model whose load failed waits before the next try: doubling, capped."""

from __future__ import annotations

FIRST_S = 5.0
MAX_S = 300.0


def retry_delay(failures: int) -> float:
    """Seconds before load number `failures + 1`, after `failures` failed in a row."""
    return min(FIRST_S * 2 ** max(failures - 1, 0), MAX_S)
