"""policies/scheduling.py: which model to swap in next, on snapshots and on simulated traces."""

from __future__ import annotations

import random
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bench.swap_sim import Request, Scenario, SimModel, poisson_trace, simulate
from policies.eviction import fits_together
from policies.scheduling import decide, decide_fifo, idle_changes_plan
from policies.types import BatchingConfig, Budget, ModelView, Plan, State

NOW = 1_000.0
SINGLE = Budget(max_models=1)
CONFIG = BatchingConfig(window_ms=2_000, max_wait_ms=60_000, min_residency_ms=20_000,
                        burst_gap_ms=2_000)
# The profile for many concurrent clients: a recent request keeps a model's burst going.
THROUGHPUT = BatchingConfig(burst_gap_ms=BatchingConfig().window_ms)
POLICIES = [decide, decide_fifo]


def view(name: str, **fields: Any) -> ModelView:
    return ModelView(name=name, **fields)


def loaded(name: str, **fields: Any) -> ModelView:
    fields.setdefault("loaded_at", NOW - 600)
    fields.setdefault("last_used", NOW - 600)
    return ModelView(name=name, state=State.LOADED, **fields)


def waiting(name: str, queued: int = 1, since: float = NOW - 10, **fields: Any) -> ModelView:
    return ModelView(name=name, queued=queued, oldest_wait_since=since, **fields)


def plan_for(*models: ModelView, budget: Budget = SINGLE, now: float = NOW) -> Plan:
    return decide({m.name: m for m in models}, budget, CONFIG, now)


def test_loaded_models_with_queued_requests_are_admitted() -> None:
    plan = plan_for(loaded("a", queued=3, oldest_wait_since=NOW - 1))
    assert plan.admit == ("a",)
    assert plan.load is None


def test_an_empty_box_loads_at_once() -> None:
    plan = plan_for(waiting("b", since=NOW))
    assert plan.load == "b"
    assert plan.reason.startswith("fits")


def test_a_lone_waiter_facing_an_idle_resident_swaps_without_a_window() -> None:
    plan = plan_for(loaded("a"), waiting("b", since=NOW))
    assert (plan.load, plan.evict) == ("b", ("a",))


def test_competing_demand_is_gathered_for_the_window() -> None:
    plan = plan_for(loaded("a", in_flight=1), waiting("b", since=NOW - 0.5))
    assert (plan.load, plan.evict, plan.drain) == (None, (), ())
    assert plan.wake_at == pytest.approx(NOW + 1.5)
    plan = plan_for(loaded("a"), waiting("b", since=NOW - 0.5), waiting("c", since=NOW))
    assert plan.load is None
    assert plan.reason.startswith("window")


def test_after_the_window_the_best_score_wins_and_a_busy_resident_drains() -> None:
    plan = plan_for(loaded("a", in_flight=2), waiting("b", queued=2), waiting("c", queued=1))
    assert (plan.load, plan.drain, plan.evict) == (None, ("a",), ())
    assert plan.scores["b"] > plan.scores["c"]
    assert "b (2 queued x normal)" in plan.reason


def test_priority_weighs_on_the_score() -> None:
    high, low = waiting("b", priority="high"), waiting("c", queued=2, priority="low")
    plan = plan_for(loaded("a"), high, low)
    assert (plan.load, plan.evict) == ("b", ("a",))


def test_an_active_model_keeps_its_minimum_residency() -> None:
    a = loaded("a", in_flight=1, loaded_at=NOW - 5, last_used=NOW - 1)
    plan = plan_for(a, waiting("b", queued=5))
    assert (plan.load, plan.evict, plan.drain) == (None, (), ())
    assert plan.reason.startswith("min residency")
    assert plan.wake_at is not None and NOW < plan.wake_at <= NOW + 15


def test_an_idle_model_loses_its_minimum_residency() -> None:
    plan = plan_for(loaded("a", loaded_at=NOW - 5, last_used=NOW - 4), waiting("b"))
    assert (plan.load, plan.evict) == ("b", ("a",))


def test_a_burst_goes_on_while_requests_come_within_the_window() -> None:
    plan = plan_for(loaded("a", loaded_at=NOW - 5, last_used=NOW - 1), waiting("b"))
    assert plan.load is None
    assert plan.wake_at == pytest.approx(NOW + 1)


def test_a_sequential_client_alternating_models_never_waits_for_a_window() -> None:
    idle = loaded("a", loaded_at=NOW - 5, last_used=NOW - 0.01)
    plan = decide({m.name: m for m in (idle, waiting("b"))}, SINGLE, BatchingConfig(), NOW)
    assert plan.load == "b" and plan.evict == ("a",)


def test_max_wait_overrides_minimum_residency() -> None:
    a = loaded("a", in_flight=1, loaded_at=NOW - 1, last_used=NOW)
    plan = plan_for(a, waiting("b", since=NOW - 56, load_seconds=5))
    assert plan.drain == ("a",)
    assert plan.reason.startswith("max_wait override")


def test_a_load_longer_than_max_wait_does_not_jump_the_waiters_before_it() -> None:
    # The 70B's load alone (60 s) passes max_wait, so no start meets it: it waits out the
    # window like any other, and the 32B asked for before it goes first; once the window is
    # over it is overdue and overrides.
    older = waiting("reason", since=NOW - 1.5, load_seconds=30)
    big = waiting("llama", since=NOW - 0.5, load_seconds=60)
    assert plan_for(loaded("embed"), older, big).reason.startswith("window")
    assert plan_for(loaded("embed"), older, big, now=NOW + 1).load == "reason"
    overdue = plan_for(loaded("embed"), older, big, now=NOW + 2)
    assert overdue.load == "llama" and overdue.reason.startswith("max_wait override")


def test_a_winner_yields_to_a_waiter_its_load_would_push_past_max_wait() -> None:
    # b wins on score, but its 10 s load would end after c's deadline (NOW + 8: 60 s less c's
    # 2 s load), so c would be served late; c goes first: it costs the queue no more, since c
    # is worth more per second of load (1 request per 2 s against 3 per 10 s).
    b = waiting("b", queued=3, since=NOW - 5, load_seconds=10)
    c = waiting("c", queued=1, since=NOW - 50, load_seconds=2)
    plan = plan_for(b, c)
    assert plan.scores["b"] > plan.scores["c"]
    assert plan.load == "c" and plan.reason.startswith("max_wait ahead")
    after_the_window = plan_for(loaded("a"), b, c)
    assert (after_the_window.load, after_the_window.evict) == ("c", ("a",))


def test_a_waiter_worth_less_per_second_of_load_does_not_jump_the_winner() -> None:
    # Loading the rare model first would keep its one request within max_wait but make the
    # hot queue wait 15 s more each: the score's order stands.
    hot = waiting("hot", queued=10, since=NOW - 5, load_seconds=5)
    rare = waiting("rare", queued=1, since=NOW - 41, load_seconds=15)
    assert plan_for(hot, rare).load == "hot"


def test_the_override_serves_the_oldest_waiter_not_the_biggest_queue() -> None:
    big, old = waiting("b", queued=20, since=NOW - 30), waiting("c", since=NOW - 59)
    plan = plan_for(loaded("a"), big, old)
    assert plan.load == "c"


def test_a_zero_max_wait_serves_the_oldest_waiter_at_once() -> None:
    models = {m.name: m for m in (loaded("a", in_flight=1), waiting("b", queued=5), waiting("c"))}
    plan = decide(models, SINGLE, BatchingConfig(window_ms=2_000, max_wait_ms=0), NOW)
    assert plan.drain == ("a",)
    assert plan.reason == "max_wait override: b (5 queued x normal)"


def test_no_load_starts_while_another_model_moves() -> None:
    for state in (State.LOADING, State.UNLOADING):
        plan = plan_for(view("a", state=state), waiting("b"), budget=Budget())
        assert plan.load is None


def test_a_failed_model_waits_for_its_retry_time() -> None:
    failed = waiting("b", state=State.FAILED, retry_at=NOW + 10)
    plan = plan_for(failed)
    assert plan.load is None
    assert plan.wake_at is not None and plan.wake_at <= NOW + 10
    assert plan_for(failed, now=NOW + 10).load == "b"


def test_a_model_larger_than_the_box_is_never_loaded() -> None:
    assert plan_for(waiting("huge", size_gb=80), budget=Budget(memory_gb=48)).load is None


def test_drains_last_through_holds_and_transitions() -> None:
    draining = loaded("a", admitting=False, in_flight=1)
    hold = plan_for(draining, waiting("b", since=NOW - 0.5), waiting("c", since=NOW - 0.2))
    assert (hold.drain, hold.reason) == (("a",), "window: gathering demand")
    loading = view("x", state=State.LOADING)
    assert plan_for(draining, loading, waiting("b"), budget=Budget()).drain == ("a",)


def test_a_drained_model_resumes_when_nobody_else_waits() -> None:
    plan = plan_for(loaded("a", admitting=False, queued=2, oldest_wait_since=NOW - 1))
    assert plan.admit == ("a",)


def test_a_model_just_loaded_is_admitted_then_drained_for_an_overdue_waiter() -> None:
    fresh = loaded("a", queued=3, oldest_wait_since=NOW - 20, loaded_at=NOW)
    plan = plan_for(fresh, waiting("b", since=NOW - 59))
    assert plan.admit == ("a",)
    assert (plan.drain, plan.evict, plan.load) == (("a",), (), None)


def test_fifo_serves_the_oldest_waiter_at_once() -> None:
    models = {
        m.name: m
        for m in (
            loaded("a", in_flight=1, loaded_at=NOW - 1),
            waiting("b", queued=9, since=NOW - 1),
            waiting("c", since=NOW - 2),
        )
    }
    plan = decide_fifo(models, SINGLE, CONFIG, NOW)
    assert plan.drain == ("a",)
    assert plan.reason.startswith("fifo: c")


# Properties of single decisions on arbitrary snapshots.


@st.composite
def snapshots(draw: st.DrawFn) -> tuple[dict[str, ModelView], Budget, float]:
    """A plausible scheduler state: loaded and loading models within budget, at most one moving."""
    now = NOW
    budget = Budget(
        max_models=draw(st.none() | st.integers(1, 3)),
        memory_gb=draw(st.none() | st.floats(8, 48)),
    )
    moving = draw(st.sampled_from([None, State.LOADING, State.UNLOADING]))
    models: dict[str, ModelView] = {}
    for i in range(draw(st.integers(1, 5))):
        state = draw(st.sampled_from([State.UNLOADED, State.LOADED, State.FAILED]))
        if i == 0 and moving is not None:
            state = moving
        queued = draw(st.integers(0, 4))
        model = ModelView(
            name=f"m{i}",
            state=state,
            size_gb=draw(st.floats(1, 30)),
            priority=draw(st.sampled_from(["low", "normal", "high"])),
            in_flight=draw(st.integers(0, 3)) if state is State.LOADED else 0,
            queued=queued,
            oldest_wait_since=now - draw(st.floats(0, 90)) if queued else None,
            loaded_at=now - draw(st.floats(0, 60)) if state is State.LOADED else None,
            last_used=now - draw(st.floats(0, 60)),
            admitting=draw(st.booleans()) if state is State.LOADED else True,
            load_seconds=draw(st.floats(2, 20)),
            retry_at=now + draw(st.floats(-30, 30)) if state is State.FAILED else None,
        )
        staying = [m for m in models.values() if m.state in (State.LOADED, State.LOADING)]
        if not model.resident or fits_together([*staying, model], budget):
            models[model.name] = model
    return models, budget, now


CONFIGS = [CONFIG, BatchingConfig(), BatchingConfig(0, 0, 0)]


@pytest.mark.parametrize("policy", POLICIES)
@given(snapshot=snapshots(), config=st.sampled_from(CONFIGS))
def test_plans_respect_the_scheduler_contract(
    policy: Any, snapshot: tuple[dict[str, ModelView], Budget, float], config: BatchingConfig
) -> None:
    models, budget, now = snapshot
    plan = policy(models, budget, config, now)
    loaded_names = {m.name for m in models.values() if m.state is State.LOADED}
    assert set(plan.admit) | set(plan.drain) | set(plan.evict) <= loaded_names
    assert all(models[v].in_flight == 0 for v in plan.evict), "evicted a busy model"
    assert not set(plan.evict) & (set(plan.admit) | set(plan.drain))
    assert plan.wake_at is None or plan.wake_at > now
    if plan.load is not None:
        assert not plan.drain
        assert all(m.state not in (State.LOADING, State.UNLOADING) for m in models.values())
        newcomer = models[plan.load]
        assert newcomer.state in (State.UNLOADED, State.FAILED)
        assert newcomer.retry_at is None or newcomer.retry_at <= now
        staying = [m for m in models.values() if m.resident and m.name not in plan.evict]
        assert fits_together([*staying, newcomer], budget), "over budget after the plan"


# Properties of whole traces run through the simulator (which raises on any broken rule).

UNLOAD = 1.0


@st.composite
def workloads(draw: st.DrawFn) -> tuple[Scenario, BatchingConfig]:
    """Feasible traffic: a full round of loads fits well inside max_wait."""
    names = draw(st.lists(st.sampled_from("ABC"), min_size=1, max_size=3, unique=True))
    models = tuple(
        SimModel(name, draw(st.floats(2, 12)), size_gb=draw(st.sampled_from([4.0, 8.0, 12.0])))
        for name in names
    )
    clock, requests = 0.0, []
    for _ in range(draw(st.integers(1, 40))):
        clock += draw(st.floats(0, 8))
        requests.append(Request(clock, draw(st.sampled_from(names)), draw(st.floats(0.5, 4))))
    budget = draw(st.sampled_from([SINGLE, Budget(memory_gb=16.0), Budget(max_models=2)]))
    config = BatchingConfig(
        window_ms=draw(st.sampled_from([0.0, 2_000.0, 8_000.0])),
        max_wait_ms=60_000.0,
        min_residency_ms=draw(st.sampled_from([0.0, 5_000.0, 20_000.0])),
    )
    scenario = Scenario("random", models, tuple(requests), budget, 64, UNLOAD)
    return scenario, config


@settings(max_examples=150, deadline=None)
@given(workloads())
def test_no_request_starves(workload: tuple[Scenario, BatchingConfig]) -> None:
    """Within max_wait plus one load, plus what no policy can skip: the requests already
    admitted finish (one service time, as slots are plenty) and the victim unloads."""
    scenario, config = workload
    outcome = simulate(scenario, decide, config)
    slowest_load = max(m.load_seconds for m in scenario.models)
    drain = max(r.service for r in scenario.requests)
    assert outcome.max_wait <= config.max_wait_ms / 1000 + slowest_load + UNLOAD + drain


@settings(max_examples=50, deadline=None)
@given(workloads(), st.booleans())
def test_fifo_serves_every_request(workload: tuple[Scenario, BatchingConfig], strict: bool) -> None:
    scenario, config = workload
    outcome = simulate(scenario, decide_fifo, config, strict_order=strict)
    assert len(outcome.latencies) == len(scenario.requests)


def test_strict_arrival_order_loads_on_every_change_of_model() -> None:
    models = (SimModel("A", 5.0), SimModel("B", 5.0))
    trace = tuple(Request(0.1 * i, name, 1.0) for i, name in enumerate("ABAB"))
    scenario = Scenario("abab", models, trace)
    assert simulate(scenario, decide_fifo, strict_order=True).swaps == 4
    assert simulate(scenario, decide_fifo).swaps == 2


def test_the_policy_swaps_far_less_than_fifo_on_interleaved_traffic() -> None:
    models = (SimModel("A", 4.0), SimModel("B", 9.0), SimModel("C", 15.0))
    trace = poisson_trace(random.Random(3), dict.fromkeys("ABC", 1.0), 300, 4.0)
    scenario = Scenario("interleaved", models, trace)
    fifo = simulate(scenario, decide_fifo, strict_order=True)
    collated = simulate(scenario, decide_fifo)
    policy = simulate(scenario, decide, THROUGHPUT)
    assert policy.swaps * 3 <= fifo.swaps
    assert policy.swaps < collated.swaps
    assert policy.mean_latency * 2 <= fifo.mean_latency
    assert policy.p99_wait <= BatchingConfig().max_wait_ms / 1000 + 15.0


def test_an_answer_ending_asks_for_a_decision_only_when_one_can_change() -> None:
    quiet = {"admitting": True, "anyone_waiting": False, "ttl_s": 0.0, "idle_since": 100.0,
             "wake_at": None}
    assert not idle_changes_plan(**quiet)
    assert idle_changes_plan(**quiet | {"anyone_waiting": True})  # a swap may wait on it
    assert idle_changes_plan(**quiet | {"admitting": False})  # a drain waits for it
    assert idle_changes_plan(**quiet | {"ttl_s": 30.0})  # its ttl needs a wake
    assert not idle_changes_plan(**quiet | {"ttl_s": 30.0, "wake_at": 110.0})  # one comes first
    assert idle_changes_plan(**quiet | {"ttl_s": 5.0, "wake_at": 110.0})  # too late for it
