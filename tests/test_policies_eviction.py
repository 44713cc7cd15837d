"""policies/eviction.py: who leaves so that a newcomer fits the residency budget."""

from __future__ import annotations

from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from policies.eviction import (
    choose_drains,
    choose_evictions,
    choose_victims,
    fits_at_all,
    fits_beside,
    fits_together,
    is_idle,
)
from policies.types import Budget, ModelView, State

SINGLE = Budget(max_models=1)


def loaded(name: str, **fields: Any) -> ModelView:
    return ModelView(name=name, state=State.LOADED, **fields)


def by_name(*models: ModelView) -> dict[str, ModelView]:
    return {m.name: m for m in models}


def test_single_active_evicts_the_idle_resident() -> None:
    models = by_name(loaded("a"), ModelView("b", queued=1))
    assert choose_evictions(models["b"], models, SINGLE) == ("a",)


def test_nothing_to_evict_when_the_newcomer_fits() -> None:
    models = by_name(loaded("a", size_gb=4), ModelView("b", size_gb=4))
    assert choose_evictions(models["b"], models, Budget(max_models=2, memory_gb=8)) == ()
    assert fits_beside(models["b"], models, Budget(max_models=2, memory_gb=8))


def test_a_resident_newcomer_needs_nothing() -> None:
    models = by_name(loaded("a"), loaded("b"))
    assert choose_evictions(models["a"], models, SINGLE) == ()


def test_busy_models_are_never_evicted() -> None:
    models = by_name(loaded("a", in_flight=1), ModelView("b"))
    assert choose_evictions(models["b"], models, SINGLE) is None
    assert choose_drains(models["b"], models, SINGLE) == ("a",)


def test_a_model_about_to_be_admitted_is_not_idle() -> None:
    waiting = loaded("a", queued=2)
    assert not is_idle(waiting)
    assert is_idle(loaded("a", queued=2, admitting=False))


def test_loading_and_unloading_models_are_not_victims() -> None:
    for state in (State.LOADING, State.UNLOADING):
        models = by_name(ModelView("a", state=state), ModelView("b"))
        assert choose_evictions(models["b"], models, SINGLE) is None
        assert choose_drains(models["b"], models, SINGLE) is None


def test_low_priority_goes_first_then_least_recently_used() -> None:
    models = by_name(
        loaded("high", priority="high", last_used=1.0),
        loaded("low-recent", priority="low", last_used=9.0),
        loaded("low-old", priority="low", last_used=2.0),
        ModelView("new"),
    )
    assert choose_evictions(models["new"], models, Budget(max_models=3)) == ("low-old",)
    assert choose_evictions(models["new"], models, Budget(max_models=2)) == (
        "low-old",
        "low-recent",
    )


def test_one_large_victim_instead_of_several_small_ones() -> None:
    models = by_name(
        loaded("small-1", size_gb=4, last_used=1.0),
        loaded("small-2", size_gb=4, last_used=2.0),
        loaded("large", size_gb=12, last_used=3.0),
        ModelView("new", size_gb=10),
    )
    assert choose_evictions(models["new"], models, Budget(memory_gb=24)) == ("large",)


def test_fewer_evictions_never_outrank_priority() -> None:
    models = by_name(
        loaded("low-1", size_gb=4, priority="low"),
        loaded("low-2", size_gb=8, priority="low"),
        loaded("normal", size_gb=12),
        ModelView("new", size_gb=10),
    )
    assert choose_evictions(models["new"], models, Budget(memory_gb=24)) == ("low-1", "low-2")


def test_draining_models_are_the_first_victims() -> None:
    models = by_name(
        loaded("draining", admitting=False, in_flight=1, priority="high"),
        loaded("idle", priority="low"),
        ModelView("new"),
    )
    assert choose_victims(models["new"], models, Budget(max_models=2)) == ("draining",)


def test_keep_shields_a_model() -> None:
    models = by_name(loaded("a"), loaded("b", last_used=5.0), ModelView("c"))
    assert choose_evictions(models["c"], models, Budget(max_models=2), keep={"a"}) == ("b",)
    assert choose_evictions(models["c"], models, SINGLE, keep={"a"}) is None


def test_drains_name_only_the_busy_victims() -> None:
    models = by_name(
        loaded("idle", size_gb=8),
        loaded("busy", size_gb=8, in_flight=2),
        ModelView("new", size_gb=16),
    )
    assert choose_drains(models["new"], models, Budget(memory_gb=16)) == ("busy",)
    assert set(choose_victims(models["new"], models, Budget(memory_gb=16)) or ()) == {
        "idle",
        "busy",
    }


def test_a_newcomer_larger_than_the_box_never_fits() -> None:
    models = by_name(ModelView("huge", size_gb=80))
    assert not fits_at_all(models["huge"], Budget(memory_gb=48))
    assert choose_evictions(models["huge"], models, Budget(memory_gb=48)) is None
    assert fits_at_all(models["huge"], Budget(max_models=1))


def test_float_sizes_fit_exactly() -> None:
    pair = [ModelView("a", size_gb=0.1), ModelView("b", size_gb=0.2)]
    assert fits_together(pair, Budget(memory_gb=0.3))
    assert not fits_together(pair, Budget(memory_gb=0.29))
    assert not fits_together(pair, Budget(max_models=1))


Box = tuple[dict[str, ModelView], ModelView, Budget]


@st.composite
def boxes(draw: st.DrawFn) -> Box:
    """A resident set within its budget and a newcomer that is not resident."""
    budget = Budget(
        max_models=draw(st.none() | st.integers(1, 4)),
        memory_gb=draw(st.none() | st.floats(4, 48)),
    )
    states = st.sampled_from([State.LOADED, State.LOADED, State.LOADING, State.UNLOADING])
    residents: list[ModelView] = []
    for i in range(draw(st.integers(0, 5))):
        candidate = ModelView(
            name=f"m{i}",
            state=draw(states),
            size_gb=draw(st.floats(0.5, 24)),
            priority=draw(st.sampled_from(["low", "normal", "high"])),
            in_flight=draw(st.integers(0, 2)),
            queued=draw(st.integers(0, 2)),
            last_used=draw(st.floats(0, 100)),
            admitting=draw(st.booleans()),
        )
        if fits_together([*residents, candidate], budget):
            residents.append(candidate)
    newcomer = ModelView("new", size_gb=draw(st.floats(0.5, 30)))
    return {m.name: m for m in [*residents, newcomer]}, newcomer, budget


@given(boxes())
def test_evictions_make_room_and_touch_only_idle_loaded_models(box: Box) -> None:
    models, newcomer, budget = box
    evict = choose_evictions(newcomer, models, budget)
    if evict is None:
        return
    assert all(models[v].state is State.LOADED and is_idle(models[v]) for v in evict)
    staying = [m for m in models.values() if m.resident and m.name not in evict]
    assert fits_together([*staying, newcomer], budget)
    for spared in evict:  # minimal: no victim could have stayed
        rest = [m for m in models.values() if m.resident and m.name not in set(evict) - {spared}]
        assert not fits_together([*rest, newcomer], budget)


@given(boxes())
def test_victims_make_room_and_only_busy_ones_are_drained(box: Box) -> None:
    models, newcomer, budget = box
    victims = choose_victims(newcomer, models, budget)
    drains = choose_drains(newcomer, models, budget)
    assert (victims is None) == (drains is None)
    if victims is None or drains is None:
        assert choose_evictions(newcomer, models, budget) is None
        return
    staying = [m for m in models.values() if m.resident and m.name not in victims]
    assert fits_together([*staying, newcomer], budget)
    assert set(drains) == {v for v in victims if not is_idle(models[v])}
    assert all(models[v].state is State.LOADED for v in victims)
