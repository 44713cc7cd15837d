"""Live progress, read from the read model: while the gateway runs, a small task reads
`Scheduler.status()` every few seconds and hands each snapshot to its observers.

One observer says what a long load is doing, in the log, every few seconds:

    model.load_progress  message='loading qwen: 24 s of 600 s'  model=qwen  node=default ...

(a streaming client that waits for the load hears the same from its `: loading qwen (24 s)`
keep-alive comments). Another is the status page's memory of residencies (`ui_recent`). The
scheduler needs no hook for either: the snapshot has each load's elapsed time and deadline.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence

import structlog

from gateway.residency.snapshot import SchedulerStatus

log = structlog.get_logger("gateway.progress")

EVERY_S = 5.0
QUIET_S = 1.0  # a load shorter than this is told by model.loading and model.loaded alone

Observer = Callable[[SchedulerStatus], None]


async def watch(read: Callable[[], SchedulerStatus], observers: Sequence[Observer],
                every_s: float = EVERY_S) -> None:
    """Until cancelled (the app's lifespan cancels it at shutdown)."""
    while True:
        await asyncio.sleep(every_s)
        status = read()
        for observe in observers:
            observe(status)


def log_loads(status: SchedulerStatus) -> None:
    for model in status.models.values():
        elapsed, timeout = model.load_elapsed_s, model.load_timeout_s
        if elapsed is None or timeout is None or elapsed < QUIET_S:
            continue
        log.info("model.load_progress", message=load_progress(model.name, elapsed, timeout),
                 model=model.name, node=model.node, elapsed_s=round(elapsed, 1),
                 timeout_s=timeout, queued=model.queue)


def load_progress(name: str, elapsed_s: float, timeout_s: float) -> str:
    return f"loading {name}: {elapsed_s:.0f} s of {timeout_s:.0f} s"
