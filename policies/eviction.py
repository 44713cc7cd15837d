"""Which resident models must leave so that a newcomer fits the residency budget.

Victims are taken in `victim_order` (already draining, idle, low priority, least recently used)
until the newcomer fits, except that a larger model of the same priority is taken instead when it
alone finishes the job; at the end every victim that turned out unnecessary is spared.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence

from policies.types import PRIORITY_WEIGHT, Budget, ModelView, State

Models = Mapping[str, ModelView]

# Sizes are sums of floats from YAML; 0.1 + 0.2 must still fit a budget of 0.3.
_GB_TOLERANCE = 1e-9


def fits_together(models: Sequence[ModelView], budget: Budget) -> bool:
    """Whether these models may all be resident at once."""
    count_ok = budget.max_models is None or len(models) <= budget.max_models
    size_gb = sum(m.size_gb for m in models)
    return count_ok and (budget.memory_gb is None or size_gb <= budget.memory_gb + _GB_TOLERANCE)


def fits_at_all(newcomer: ModelView, budget: Budget) -> bool:
    """Whether the newcomer fits an empty box; if not, no eviction can ever make room."""
    return fits_together([newcomer], budget)


def fits_beside(newcomer: ModelView, models: Models, budget: Budget) -> bool:
    """Whether the newcomer fits next to everything resident now, evicting nothing."""
    return newcomer.resident or fits_together([*_others(newcomer, models), newcomer], budget)


def choose_evictions(
    newcomer: ModelView, models: Models, budget: Budget, keep: Collection[str] = ()
) -> tuple[str, ...] | None:
    """The idle loaded models to unload so the newcomer fits; () if it fits already.

    None when it cannot fit without touching busy, transitioning or `keep` models, or when it
    does not fit at all (tell the two apart with `fits_at_all`).
    """
    return _victims(newcomer, models, budget, lambda m: is_idle(m) and m.name not in keep)


def choose_drains(
    newcomer: ModelView, models: Models, budget: Budget, keep: Collection[str] = ()
) -> tuple[str, ...] | None:
    """The busy models to drain so that, once they and some idle ones are evicted, it fits.

    () when evicting idle models is enough; None when even draining every loaded model outside
    `keep` would not make room.
    """
    victims = choose_victims(newcomer, models, budget, keep)
    return None if victims is None else tuple(v for v in victims if not is_idle(models[v]))


def choose_victims(
    newcomer: ModelView, models: Models, budget: Budget, keep: Collection[str] = ()
) -> tuple[str, ...] | None:
    """The loaded models (idle or busy, never in `keep`) that must leave so the newcomer fits.

    The idle ones can be evicted now, the busy ones must be drained first; None if impossible.
    """
    return _victims(newcomer, models, budget, lambda m: m.name not in keep)


def is_idle(model: ModelView) -> bool:
    """Nothing in flight and nothing about to be admitted: it may be unloaded right now."""
    return not model.busy and not (model.admitting and model.queued > 0)


def victim_order(model: ModelView) -> tuple[bool, bool, float, float]:
    """Sort key, first evicted first: already draining, idle, low priority, least recently used."""
    weight = PRIORITY_WEIGHT.get(model.priority, 1.0)
    return (model.admitting, not is_idle(model), weight, model.last_used)


def _victims(
    newcomer: ModelView, models: Models, budget: Budget, eligible: Callable[[ModelView], bool]
) -> tuple[str, ...] | None:
    if newcomer.resident:
        return ()
    if not fits_at_all(newcomer, budget):
        return None
    residents = _others(newcomer, models)
    candidates = sorted(
        (m for m in residents if m.state is State.LOADED and eligible(m)), key=victim_order
    )
    victims: list[ModelView] = []
    while candidates and not _fits_without(newcomer, residents, victims, budget):
        pick = _next_victim(newcomer, residents, victims, candidates, budget)
        victims.append(pick)
        candidates.remove(pick)
    if not _fits_without(newcomer, residents, victims, budget):
        return None
    return tuple(m.name for m in _spare_unneeded(newcomer, residents, victims, budget))


def _next_victim(
    newcomer: ModelView,
    residents: list[ModelView],
    victims: list[ModelView],
    candidates: list[ModelView],
    budget: Budget,
) -> ModelView:
    """The first candidate, unless one of the same tier (drain state, priority) is large enough
    to finish the job alone: then the least recently used of those, to evict fewer models."""
    tier = victim_order(candidates[0])[:3]
    same_tier = (m for m in candidates if victim_order(m)[:3] == tier)
    finishers = (m for m in same_tier if _fits_without(newcomer, residents, [*victims, m], budget))
    return next(finishers, candidates[0])


def _spare_unneeded(
    newcomer: ModelView, residents: list[ModelView], victims: list[ModelView], budget: Budget
) -> list[ModelView]:
    """Drop victims that are not needed, trying the last chosen (least preferred) first."""
    needed = list(victims)
    for victim in reversed(victims):
        rest = [m for m in needed if m.name != victim.name]
        if _fits_without(newcomer, residents, rest, budget):
            needed = rest
    return needed


def _fits_without(
    newcomer: ModelView, residents: list[ModelView], victims: list[ModelView], budget: Budget
) -> bool:
    leaving = {m.name for m in victims}
    return fits_together([*(m for m in residents if m.name not in leaving), newcomer], budget)


def _others(newcomer: ModelView, models: Models) -> list[ModelView]:
    """Every resident model but the newcomer: loaded, loading and still unloading count."""
    return [m for m in models.values() if m.resident and m.name != newcomer.name]
