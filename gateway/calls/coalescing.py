"""Identical cacheable requests in flight at the same time share one upstream call.

The first such request leads: it goes upstream as usual. Requests with the same cache key that
arrive before it finishes follow: they wait for the leader's complete answer and replay it
(as JSON or as a stream, each as it asked). If the leader fails or its client leaves, followers
are released with nothing and make their own call, so no client is failed by another's fate.
"""

from __future__ import annotations

import asyncio

from gateway.cache.replay import Record


class Leadership:
    """The leader's promise to tell followers how its call ended, exactly once."""

    def __init__(self, key: str, registry: dict[str, Leadership]) -> None:
        self.key = key
        self._registry = registry
        self._result: asyncio.Future[Record | None] = asyncio.get_running_loop().create_future()

    def settle(self, record: Record | None) -> None:
        if self._registry.get(self.key) is self:
            del self._registry[self.key]
        if not self._result.done():
            self._result.set_result(record)

    async def outcome(self) -> Record | None:
        return await asyncio.shield(self._result)


class Coalescer:
    def __init__(self) -> None:
        self._leaders: dict[str, Leadership] = {}

    def join(self, key: str) -> tuple[Leadership, bool]:
        """(the call's leadership, whether the caller leads it)."""
        leader = self._leaders.get(key)
        if leader is not None:
            return leader, False
        leader = self._leaders[key] = Leadership(key, self._leaders)
        return leader, True

    def __len__(self) -> int:
        return len(self._leaders)
