"""What the scheduler shows the rest of the gateway: one frozen snapshot, `Scheduler.status()`.

The Swapper API, `/status`, `/ui`, the Prometheus collector and route choice read this, never
the scheduler's slots, so the scheduler can change inside without breaking them. Times users
read are wall-clock seconds (`time.time()`); durations are seconds. Each model's `view` is what
the policies decide over (monotonic times), for the readers that are themselves policy callers.

    SchedulerStatus                    (`status(only=routes)`: those routes, no decisions)
      at, swapping
      nodes:     {name: NodeStatus}    budget, backends, models on it, resident, GB, swapping
      models:    {name: ModelStatus}   one per route: `qwen`, `qwen@ollama` (its fallback)
      decisions: (DecisionStatus, ...) newest first
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from policies.types import Budget, ModelView, State


@dataclass(frozen=True)
class ModelStatus:
    """One route of a model (`qwen`, or its fallback `qwen@ollama`) at the snapshot's instant."""

    name: str  # the route's name (a public model's own name for its first route)
    model: str  # the public model it serves
    backend: str
    node: str
    managed: bool  # False: a server someone else runs, always on, outside every budget
    adapter_of: str | None  # a LoRA adapter of this base model (its residency is the base's)
    state: State
    admission: str  # open | draining | evicting | held | closing (see residency.admission)
    queue: int
    in_flight: int
    request_count: int  # API calls it served (admin loads are not counted)
    load_count: int
    size_gb: float  # what the config says (a first guess when the memory is measured)
    measured_gb: float | None  # what the backend was seen to hold after a load, if known
    measured_source: str | None  # ollama (its /api/ps) | nvidia-smi | rss
    priority: str
    loaded_at: float | None  # wall clock
    unloaded_at: float | None
    last_used: float | None  # wall clock of the last lease's start or end; None: never
    uptime_s: float  # every residency so far, the current one included
    ttl_expires_at: float | None  # wall clock of the idle unload due, while idle and loaded
    load_elapsed_s: float | None  # during a load: how long it has run
    load_timeout_s: float | None  # during a load: when it counts as failed
    last_load_s: float | None
    error: str | None
    error_detail: str | None  # what the driver saw: for admins only (paths, addresses, output)
    failures: int  # loads failed in a row: each doubles the back-off
    retry_at: float | None  # wall clock: a failed load is not tried again before this
    retryable: bool
    load_blocked: bool  # failed and backing off: no request can load it now
    server: tuple[int, int] | None  # (pid, port) of its server, for a `process` backend
    asleep: bool  # put to sleep: its weights in host RAM, a wake away (vLLM sleep level 1)
    last_wake_s: float | None  # how long its last wake from sleep took
    view: ModelView  # the policies' view of it (monotonic times)

    @property
    def resident_gb(self) -> float:
        """What it counts for in its node's budget: the measured size once there is one."""
        return self.view.size_gb


@dataclass(frozen=True)
class NodeStatus:
    """A unit of memory and of swapping: its budget and what it holds."""

    name: str
    mode: str  # single-active | multi-active
    max_models: int | None
    memory_budget_gb: float | None
    host_memory_gb: float | None  # for models put to sleep (their weights in host RAM)
    budget: Budget
    backends: tuple[str, ...]
    models: tuple[str, ...]  # managed routes on this node
    resident: tuple[str, ...]  # loaded now
    resident_gb: float  # what the budget counts: measured sizes where known, else size_gb
    measured_gb: float | None  # the sum of measured sizes of resident models, when any is known
    free_gb: float | None  # free GPU memory as the node last reported it, when it can tell
    swapping: bool  # a load or unload runs on its lane now
    asleep: tuple[str, ...]  # put to sleep: holding host RAM, not GPU memory
    host_gb: float  # host RAM the models asleep hold (against host_memory_gb)
    views: Mapping[str, ModelView]  # the policies' view of each of its models


@dataclass(frozen=True)
class DecisionStatus:
    """One line of the decision log."""

    at: float  # wall clock
    node: str
    action: str  # load | unload
    model: str
    waiting: int  # requests queued for it when it was chosen
    reason: str
    served: int | None  # loads: requests its residency served (so far, while it lasts)


@dataclass(frozen=True)
class SchedulerStatus:
    at: float  # wall clock
    swapping: bool  # a swap runs on some node
    nodes: Mapping[str, NodeStatus]
    models: Mapping[str, ModelStatus]
    decisions: tuple[DecisionStatus, ...]  # newest first

    def routes_of(self, model: str) -> list[ModelStatus]:
        """Every route of a public model, its own first."""
        return [m for m in self.models.values() if m.model == model]
