"""Stopping background tasks that talk to Redis.

Python 3.11's `asyncio.wait_for`, which redis-py's every send goes through, returns a finished
send's result instead of a cancellation that arrives at that moment: one cancellation cannot be
counted on to stop a task that talks to Redis (a lock's renewal, a heartbeat, a swap waiting
for the coordinator's lock). `stop` cancels until the tasks have ended.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

STOP_RETRY_S = 0.1  # a task still running this long after its cancel is cancelled again


async def stop(tasks: Iterable[asyncio.Task[None]]) -> None:
    """Cancel `tasks` until every one has ended; what they raised is dropped, as they stop."""
    tasks = list(tasks)
    while pending := [task for task in tasks if not task.done()]:
        for task in pending:
            task.cancel()
        await asyncio.wait(pending, timeout=STOP_RETRY_S)
    for task in tasks:
        if not task.cancelled():
            task.exception()
