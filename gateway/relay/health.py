"""Consecutive request failures per backend: the signal that takes a backend out of rotation."""

from __future__ import annotations

from collections import Counter

import structlog

from policies.fallback import backend_down

log = structlog.get_logger("gateway.relay.health")

FAILURES_BEFORE_DOWN = 3


class BackendHealth:
    """Consecutive request failures per backend."""

    def __init__(self, threshold: int = FAILURES_BEFORE_DOWN) -> None:
        self.threshold = threshold
        self.failures: Counter[str] = Counter()

    def ok(self, backend: str) -> None:
        if self.failures.pop(backend, 0) >= self.threshold:
            log.info("backend.up", backend=backend)

    def failed(self, backend: str, *, unreachable: bool = False) -> None:
        """Count a failure; a backend that refuses connections is down at once."""
        self.failures[backend] = max(self.failures[backend] + 1,
                                     self.threshold if unreachable else 0)
        if self.failures[backend] == self.threshold:
            log.warning("backend.down", backend=backend, failures=self.threshold)

    def up(self, backend: str) -> bool:
        return not backend_down(self.failures[backend], self.threshold)

    def down(self) -> list[str]:
        return [name for name in self.failures if not self.up(name)]
