"""Which model to swap in next from queued demand: the swap-aware policy and the FIFO baseline.

Both are pure: the scheduler passes a snapshot and the time, executes the returned Plan, and calls
again on every event (request queued, lease released, load or unload finished) and at `wake_at`.
Every Plan names all the models that must not admit now (`drain`): a drain lasts while the plans
keep naming it, and ends when its swap happens or no swap is wanted any more.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace

from policies.eviction import choose_victims, fits_at_all, fits_beside, is_idle
from policies.tiers import with_sleep
from policies.types import PRIORITY_WEIGHT, BatchingConfig, Budget, ModelView, Plan, State

Models = Mapping[str, ModelView]

_TRANSITION = "waiting for a load or unload to finish"


def decide(models: Models, budget: Budget, config: BatchingConfig, now: float) -> Plan:
    """The swap-aware plan, with idle models past their ttl unloaded when no swap is due, and
    the victims that can sleep put to sleep while host memory allows (`policies.tiers`)."""
    plan = with_idle_ttl(_decide(models, budget, config, now), models, now)
    return with_sleep(plan, models, budget)


def decide_fifo(models: Models, budget: Budget, config: BatchingConfig, now: float) -> Plan:
    """The arrival-order plan, with the same idle-ttl unloads; its victims are unloaded, never
    put to sleep (no arrival-order proxy has that tier)."""
    return with_idle_ttl(_decide_fifo(models, budget, config, now), models, now)


def with_idle_ttl(plan: Plan, models: Models, now: float) -> Plan:
    """Unload idle models past their ttl when the plan swaps nothing; wake at the next expiry.

    Only idle models expire, so a model kept busy past its ttl wakes nobody: its release does.
    """
    if plan.evict or plan.load or in_transition(models):
        return plan
    expired = _names(m for m in models.values() if _expires_at(m) <= now)
    if expired:
        return replace(plan, evict=expired, reason="idle ttl")
    upcoming = [t for t in map(_expires_at, models.values()) if now < t < math.inf]
    if plan.wake_at is not None:
        upcoming.append(plan.wake_at)
    return replace(plan, wake_at=min(upcoming, default=None))


def idle_changes_plan(*, admitting: bool, anyone_waiting: bool, ttl_s: float, idle_since: float,
                      wake_at: float | None) -> bool:
    """Whether a model's last request ending can change a plan, so is worth a decision: when
    something waits (a queue anywhere, a drain or hold that waits for it), or when its idle ttl
    starts and no decision is due before it expires (`with_idle_ttl` arms that wake only for
    idle models). Otherwise the plan is the one already made: where nothing waits, a request's
    end takes no decision round."""
    if anyone_waiting or not admitting:
        return True
    return ttl_s > 0 and (wake_at is None or wake_at > idle_since + ttl_s)


def _expires_at(model: ModelView) -> float:
    """When an idle, loaded model with a ttl is due to be unloaded; never for any other."""
    idle = model.state is State.LOADED and is_idle(model) and model.queued == 0
    return model.last_used + model.ttl_s if idle and model.ttl_s > 0 else math.inf


def _decide(models: Models, budget: Budget, config: BatchingConfig, now: float) -> Plan:
    """Swap-aware: group demand so that one load serves many requests, bounded by max_wait.

    In order: a waiter about to pass max_wait wins outright; a model that fits beside the
    residents loads at once; otherwise, when several models want the box, demand is gathered for
    the window, the best score wins, and residents keep their minimum residency while active.
    Either winner yields to a waiter its load would push past max_wait (`pushed_late`).
    """
    admit = admissible(models)
    if in_transition(models):
        return Plan(admit=admit, drain=_names(draining(models)), reason=_TRANSITION)
    waiting = swap_candidates(models, budget, now)
    stalled = stalled_drains(models)
    wake_at = _next_change(models, config, now)
    if not waiting:
        return Plan(admit=admit + _names(stalled), wake_at=wake_at, reason="no swap needed")
    scores = {m.name: score(m, config, now) for m in waiting}
    turn = _Turn(models, budget, admit, scores, wake_at)
    urgent = most_overdue([*waiting, *stalled], config, now)
    if urgent is not None:
        return turn.override(urgent, "max_wait override")
    free = [m for m in waiting if fits_beside(m, models, budget)]
    if free:
        return _serve(turn, turn.best(free), waiting, frozenset(), "fits", config, now)
    crowded = contested(models, waiting, config, now)
    if crowded and now < window_end(waiting, config):
        return turn.hold("window: gathering demand")
    keep = protected(models, config, now)
    why = "window" if crowded else "swap"
    return _serve(turn, turn.best(waiting), waiting, keep, why, config, now)


def _serve(turn: _Turn, winner: ModelView, waiting: list[ModelView], keep: frozenset[str],
           why: str, config: BatchingConfig, now: float) -> Plan:
    """Swap to the winner, unless its load would push another waiter past max_wait."""
    late = pushed_late(winner, waiting, config, now)
    if late is not None:
        return turn.override(late, "max_wait ahead")
    return turn.swap_to(winner, keep, why)


def _decide_fifo(models: Models, budget: Budget, config: BatchingConfig, now: float) -> Plan:
    """Arrival order, like Ollama and llama-swap: swap at once to the oldest waiter's model.

    Its Plan releases a model's whole queue; a simulator that wants the strict arrival order of
    those proxies (ABAB loads four times) must release only the waiters ahead of other models'.
    """
    admit = admissible(models)
    if in_transition(models):
        return Plan(admit=admit, drain=_names(draining(models)), reason=_TRANSITION)
    waiting = [*swap_candidates(models, budget, now), *stalled_drains(models)]
    if not waiting:
        return Plan(admit=admit, reason="no swap needed")
    oldest = min(waiting, key=lambda m: (_oldest_since(m), m.name))  # names break ties
    return _Turn(models, budget, admit, {}, None).override(oldest, "fifo")


def score(model: ModelView, config: BatchingConfig, now: float) -> float:
    """Queued requests x priority weight, doubling as the oldest waiter's age nears max_wait."""
    weight = PRIORITY_WEIGHT.get(model.priority, 1.0)
    max_wait = _seconds(config.max_wait_ms)
    aging = _age(model, now) / max_wait if max_wait > 0 else 0.0
    return model.queued * weight * (1.0 + aging)


def admissible(models: Models) -> tuple[str, ...]:
    """Loaded, admitting models with queued requests: release them now."""
    return _names(
        m for m in models.values() if m.state is State.LOADED and m.admitting and m.queued > 0
    )


def in_transition(models: Models) -> bool:
    """A load or unload is running: the box does one at a time, so no new load may start."""
    return any(m.state in (State.LOADING, State.UNLOADING) for m in models.values())


def swap_candidates(models: Models, budget: Budget, now: float) -> list[ModelView]:
    """Models with waiters that need a load and may have one now."""
    return [
        m for m in models.values() if m.queued > 0 and _loadable(m, now) and fits_at_all(m, budget)
    ]


def draining(models: Models) -> list[ModelView]:
    """Loaded models that stopped admitting for a swap decided earlier."""
    return [m for m in models.values() if m.state is State.LOADED and not m.admitting]


def stalled_drains(models: Models) -> list[ModelView]:
    """Draining models whose new requests queued behind the drain."""
    return [m for m in draining(models) if m.queued > 0]


def most_overdue(waiting: list[ModelView], config: BatchingConfig, now: float) -> ModelView | None:
    """The oldest waiter's model, once some waiter must be served now to meet max_wait."""
    overdue = [m for m in waiting if now >= _deadline(m, config)]
    return min(overdue, key=_oldest_since) if overdue else None


def pushed_late(winner: ModelView, waiting: list[ModelView], config: BatchingConfig,
                now: float) -> ModelView | None:
    """The waiter to load before the winner, if any: the earliest deadline among those whose
    deadline falls before the winner's load would end (the override would come a load too
    late), earlier than the winner's own, that still meet max_wait if loaded now, and whose
    queue is worth no less per second of load than the winner's (Smith's rule: loading it first
    costs the waiting requests no more, so max_wait is kept without trading mean latency)."""
    ends = now + winner.load_seconds
    late = [
        m for m in waiting
        if m.name != winner.name
        and _deadline(m, config) < min(ends, _deadline(winner, config))
        and now + m.load_seconds <= _oldest_since(m) + _seconds(config.max_wait_ms)
        and _worth_per_load_second(m) >= _worth_per_load_second(winner)
    ]
    return min(late, key=lambda m: _deadline(m, config), default=None)


def _worth_per_load_second(model: ModelView) -> float:
    weight = PRIORITY_WEIGHT.get(model.priority, 1.0)
    return model.queued * weight / max(model.load_seconds, 1e-3)


def contested(models: Models, waiting: list[ModelView], config: BatchingConfig, now: float) -> bool:
    """Several models want the box: more than one waits, or a loaded one is still active."""
    return len(waiting) > 1 or any(
        m.state is State.LOADED and _active(m, config, now) for m in models.values()
    )


def window_end(waiting: Iterable[ModelView], config: BatchingConfig) -> float:
    """The window runs from the enqueue time of the oldest waiter that needs a swap."""
    return min(map(_oldest_since, waiting)) + _seconds(config.window_ms)


def protected(models: Models, config: BatchingConfig, now: float) -> frozenset[str]:
    """Admitting loaded models inside their minimum residency whose burst is still going on.

    A model already draining is not protected: once a swap is decided it goes through.
    """
    return frozenset(
        m.name
        for m in models.values()
        if m.state is State.LOADED
        and m.admitting
        and now < _residency_end(m, config)
        and _active(m, config, now)
    )


@dataclass(frozen=True)
class _Turn:
    """What every plan of one decision shares."""

    models: Models
    budget: Budget
    admit: tuple[str, ...]
    scores: dict[str, float]
    wake_at: float | None

    def best(self, candidates: list[ModelView]) -> ModelView:
        """Highest score; ties go to the oldest waiter."""
        return max(candidates, key=lambda m: (self.scores[m.name], -_oldest_since(m)))

    def hold(self, reason: str) -> Plan:
        """No swap yet; drains already decided go on."""
        return Plan(
            drain=_names(draining(self.models)),
            admit=self.admit,
            wake_at=self.wake_at,
            reason=reason,
            scores=self.scores,
        )

    def override(self, oldest: ModelView, why: str) -> Plan:
        """Serve the oldest waiter's model whatever residency says; a drained one resumes."""
        if not oldest.resident:
            return self.swap_to(oldest, frozenset(), why)
        return Plan(
            drain=_names(m for m in draining(self.models) if m.name != oldest.name),
            admit=(*self.admit, oldest.name),
            wake_at=self.wake_at,
            reason=f"{why}: {oldest.name} resumes",
            scores=self.scores,
        )

    def swap_to(self, winner: ModelView, keep: frozenset[str], why: str) -> Plan:
        """Make room: evict idle victims now, drain busy ones, load once nothing is draining."""
        victims = choose_victims(winner, self.models, self.budget, keep)
        if victims is None:
            return self.hold(f"min residency: {', '.join(sorted(keep))} kept")
        evict = tuple(v for v in victims if is_idle(self.models[v]))
        drain = tuple(v for v in victims if v not in evict)
        # A drain decided for an earlier winner that this one does not need is called off.
        resume = _names(m for m in stalled_drains(self.models) if m.name not in victims)
        return Plan(
            load=None if drain else winner.name,
            evict=evict,
            drain=drain,
            admit=self.admit + resume,
            wake_at=self.wake_at,
            reason=f"{why}: {winner.name} ({winner.queued} queued x {winner.priority})",
            scores=self.scores,
        )


def _next_change(models: Models, config: BatchingConfig, now: float) -> float | None:
    """The earliest future instant at which the decision could change without any event.

    Waking early is harmless (the same plan comes back), so every such instant is a candidate.
    """
    window = _seconds(config.window_ms)
    waiting = [m for m in models.values() if m.queued > 0]
    loaded = [m for m in models.values() if m.state is State.LOADED]
    times = [
        *(_deadline(m, config) for m in waiting),
        *(_oldest_since(m) + window for m in waiting),
        *(_residency_end(m, config) for m in loaded),
        *(m.last_used + _seconds(config.burst_gap_ms) for m in loaded),
        *(m.retry_at for m in waiting if m.retry_at is not None),
    ]
    return min((t for t in times if t > now), default=None)


def _deadline(model: ModelView, config: BatchingConfig) -> float:
    """Latest start that still serves the oldest waiter within max_wait: its load comes first.

    A load that alone takes nearly max_wait or more (a 70B on a Mac) can meet it from no start,
    so it still waits out the window: overdue at its first request, it would jump every waiter
    that came before it.
    """
    load = 0.0 if model.resident else model.load_seconds
    max_wait = _seconds(config.max_wait_ms)
    return _oldest_since(model) + max(max_wait - load, min(_seconds(config.window_ms), max_wait))


def _residency_end(model: ModelView, config: BatchingConfig) -> float:
    loaded_at = model.loaded_at if model.loaded_at is not None else -math.inf
    return loaded_at + _seconds(config.min_residency_ms)


def _active(model: ModelView, config: BatchingConfig, now: float) -> bool:
    """Its burst goes on: requests in flight or queued, or a lease ended within the burst gap."""
    recent = now - model.last_used < _seconds(config.burst_gap_ms)
    return model.busy or model.queued > 0 or recent


def _loadable(model: ModelView, now: float) -> bool:
    """Unloaded, or failed with its retry time passed."""
    if model.state is State.FAILED:
        return model.retry_at is None or model.retry_at <= now
    return model.state is State.UNLOADED


def _age(model: ModelView, now: float) -> float:
    return max(0.0, now - _oldest_since(model))


def _oldest_since(model: ModelView) -> float:
    return model.oldest_wait_since if model.oldest_wait_since is not None else math.inf


def _seconds(ms: float) -> float:
    return ms / 1000.0


def _names(models: Iterable[ModelView]) -> tuple[str, ...]:
    return tuple(m.name for m in models)
