"""Residency tiers: a model leaving the GPU goes to sleep (host RAM) rather than away, while the
node's host-memory budget holds it.

A vLLM model put to sleep (level 1) keeps its weights in host RAM and wakes in a fraction of a
second to a few seconds, against tens of seconds for a cold start; it holds no GPU memory. So
of the models a plan evicts, those that can sleep do, in the plan's order, as long as they fit
the host budget beside the models already asleep there; the others are unloaded for good (for
vLLM: sleep level 2, nothing kept). A wake costs what the model's wakes have cost (learned like
load times), which is what `load_seconds` says of a sleeping model, so every rule that weighs a
load (deadlines, windows, placement) sees a wake as the small thing it is.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import replace

from policies.types import Budget, ModelView, Plan, State

_GB_TOLERANCE = 1e-9


def sleepers(evict: Sequence[str], models: Mapping[str, ModelView],
             budget: Budget) -> tuple[str, ...]:
    """The victims that go to sleep: those that can, in order, while host memory holds them."""
    room = math.inf if budget.host_memory_gb is None else budget.host_memory_gb
    used = host_gb(models)
    chosen = []
    for name in evict:
        model = models[name]
        if model.wake_seconds is not None and used + model.size_gb <= room + _GB_TOLERANCE:
            chosen.append(name)
            used += model.size_gb
    return tuple(chosen)


def host_gb(models: Mapping[str, ModelView]) -> float:
    """Host memory the models asleep hold."""
    return sum(m.size_gb for m in models.values() if m.asleep and not m.resident)


def with_sleep(plan: Plan, models: Mapping[str, ModelView], budget: Budget) -> Plan:
    """The plan, with the victims that go to sleep named."""
    if not plan.evict:
        return plan
    return replace(plan, sleep=sleepers(plan.evict, models, budget))


def reload_seconds(model: ModelView) -> float:
    """What bringing an evicted model back costs: a wake for one that can sleep."""
    if model.wake_seconds is not None and model.state is State.LOADED:
        return model.wake_seconds
    return model.load_seconds
