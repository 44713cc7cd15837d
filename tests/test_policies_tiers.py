"""policies/tiers.py: a model leaving the GPU sleeps in host RAM while the host budget allows."""

from __future__ import annotations

from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from policies.placement import NodeView, RouteOption, room
from policies.scheduling import decide
from policies.tiers import host_gb, reload_seconds, sleepers
from policies.types import BatchingConfig, Budget, ModelView, State

NO_WINDOW = BatchingConfig(window_ms=0, min_residency_ms=0)


def loaded(name: str, **fields: Any) -> ModelView:
    return ModelView(name=name, state=State.LOADED, **fields)


def by_name(*models: ModelView) -> dict[str, ModelView]:
    return {m.name: m for m in models}


def test_a_victim_that_can_sleep_sleeps_when_the_swap_is_decided() -> None:
    models = by_name(loaded("a", size_gb=8, wake_seconds=1.0),
                     ModelView("b", size_gb=8, queued=1, oldest_wait_since=0.0))
    plan = decide(models, Budget(max_models=1), NO_WINDOW, 1.0)
    assert (plan.evict, plan.sleep) == (("a",), ("a",))


def test_a_victim_that_cannot_sleep_is_unloaded() -> None:
    models = by_name(loaded("a", size_gb=8), ModelView("b", queued=1, oldest_wait_since=0.0))
    plan = decide(models, Budget(max_models=1), NO_WINDOW, 1.0)
    assert (plan.evict, plan.sleep) == (("a",), ())


def test_with_host_memory_spoken_for_the_victim_is_unloaded_fully() -> None:
    models = by_name(ModelView("old", size_gb=8, asleep=True, wake_seconds=1.0),
                     loaded("a", size_gb=8, wake_seconds=1.0),
                     ModelView("b", queued=1, oldest_wait_since=0.0))
    budget = Budget(max_models=1, host_memory_gb=12)
    assert host_gb(models) == 8
    assert decide(models, budget, NO_WINDOW, 1.0).sleep == ()
    assert decide(models, Budget(max_models=1, host_memory_gb=16), NO_WINDOW, 1.0).sleep == (
        "a",)


def test_idle_ttl_unloads_put_models_to_sleep_too() -> None:
    models = by_name(loaded("a", size_gb=4, ttl_s=10, last_used=0.0, wake_seconds=0.5))
    plan = decide(models, Budget(max_models=2), NO_WINDOW, 20.0)
    assert (plan.evict, plan.sleep, plan.reason) == (("a",), ("a",), "idle ttl")


def test_a_model_asleep_reloads_for_the_price_of_a_wake() -> None:
    asleep = ModelView("a", asleep=True, wake_seconds=0.8, load_seconds=0.8)
    assert reload_seconds(loaded("a", wake_seconds=0.8, load_seconds=30)) == 0.8
    assert reload_seconds(loaded("a", load_seconds=30)) == 30
    assert reload_seconds(asleep) == 0.8


def test_placement_would_rather_evict_a_model_that_wakes_in_a_second() -> None:
    config = BatchingConfig()
    sleepy = loaded("sleepy", size_gb=8, load_seconds=40, wake_seconds=1, loaded_at=0.0)
    cold = loaded("cold", size_gb=8, load_seconds=40, loaded_at=0.0)
    route = RouteOption(ModelView("m", size_gb=6), "x")
    budget = Budget(memory_gb=12)
    on_sleepy = room(route, NodeView("x", budget, by_name(sleepy, route.model)),
                     config, 1000.0).cost
    on_cold = room(route, NodeView("x", budget, by_name(cold, route.model)), config, 1000.0).cost
    assert on_sleepy < on_cold


@given(st.lists(st.tuples(st.sampled_from([2.0, 4.0, 8.0]), st.booleans(), st.booleans()),
                min_size=1, max_size=6),
       st.sampled_from([None, 0.0, 8.0, 12.0]))
def test_sleepers_never_overfill_host_memory(victims: list[tuple[float, bool, bool]],
                                             host_room: float | None) -> None:
    models = {f"v{i}": loaded(f"v{i}", size_gb=gb, wake_seconds=1.0 if can else None)
              for i, (gb, can, _) in enumerate(victims)}
    models |= {f"z{i}": ModelView(f"z{i}", size_gb=gb, asleep=True, wake_seconds=1.0)
               for i, (gb, _, asleep) in enumerate(victims) if asleep}
    evict = tuple(n for n in models if n.startswith("v"))
    chosen = sleepers(evict, models, Budget(host_memory_gb=host_room))
    assert set(chosen) <= {n for n in evict if models[n].wake_seconds is not None}
    if host_room is not None:
        assert host_gb(models) + sum(models[n].size_gb for n in chosen) <= max(
            host_room, host_gb(models)) + 1e-9
