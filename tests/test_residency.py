"""The residency state machine: named transitions, their guards and the counters they keep."""

from __future__ import annotations

import pytest

from gateway.config.schema import ModelConfig
from gateway.residency.state import InvalidTransition, Residency
from policies.backoff import retry_delay
from policies.types import State


def fresh() -> Residency:
    return Residency(ModelConfig(name="m", backend="b", served_name="m"))


def test_load_then_unload_accumulates_uptime_and_counts() -> None:
    r = fresh()
    r.begin_load(10.0)
    assert r.state is State.LOADING
    r.loaded(12.5, wall=1000.0)
    assert (r.state, r.last_load_s, r.load_count, r.loaded_at) == (State.LOADED, 2.5, 1, 1000.0)
    assert r.uptime_s(20.5) == 8.0
    r.begin_unload()
    r.unloaded(30.5, wall=1018.0)
    assert (r.state, r.unloaded_at) == (State.UNLOADED, 1018.0)
    assert r.uptime_s(99.0) == 18.0  # no longer growing


def test_failed_load_waits_out_the_policys_back_off_and_recovers() -> None:
    r = fresh()
    r.begin_load(0.0)
    r.load_failed(1.0, "out of memory", retry_delay(r.failures + 1))
    assert (r.state, r.error) == (State.FAILED, "out of memory")
    assert not r.may_load(5.0) and r.may_load(6.0)
    r.begin_load(6.0)
    r.load_failed(7.0, "out of memory", retry_delay(r.failures + 1))
    assert not r.may_load(16.0) and r.may_load(17.0)  # 10 s the second time
    r.begin_load(17.0)
    r.loaded(18.0, wall=0.0)
    assert (r.error, r.retry_at, r.failures) == (None, None, 0)


def test_a_backend_back_lifts_the_back_off_of_what_may_pass_by_itself() -> None:
    unreachable, missing = fresh(), fresh()
    for r, retryable in ((unreachable, True), (missing, False)):
        r.begin_load(0.0)
        r.load_failed(1.0, "boom", retry_delay(1), retryable)
        r.retry_now(2.0)
    assert unreachable.may_load(2.0)  # its backend answers again: try at once
    assert not missing.may_load(2.0)  # a model file missing is still missing


def test_crash_allows_an_immediate_reload() -> None:
    r = fresh()
    r.begin_load(0.0)
    r.loaded(1.0, wall=0.0)
    r.crashed(5.0, wall=4.0, reason="exit code 9")
    assert r.state is State.FAILED and r.error == "exit code 9" and r.may_load(5.0)
    assert r.uptime_s(100.0) == 4.0


def test_backend_truth_moves_states_both_ways() -> None:
    r = fresh()
    r.found(3.0, wall=3.0)
    assert r.state is State.LOADED and r.load_count == 0
    r.lost(5.0, wall=5.0)
    assert r.state is State.UNLOADED and r.uptime_s(9.0) == 2.0


@pytest.mark.parametrize(
    ("setup", "transition"),
    [
        ([], "begin_unload"),
        ([("begin_load", 0.0)], "begin_unload"),
        ([("begin_load", 0.0)], "found"),
        ([], "lost"),
    ],
)
def test_transitions_from_the_wrong_state_are_refused(setup: list, transition: str) -> None:
    r = fresh()
    for name, arg in setup:
        getattr(r, name)(arg)
    before = r.generation
    with pytest.raises(InvalidTransition):
        if transition == "begin_unload":
            r.begin_unload()
        else:
            getattr(r, transition)(1.0, 1.0)
    assert r.generation == before


def test_every_transition_bumps_the_generation() -> None:
    r = fresh()
    r.begin_load(0.0)
    r.loaded(1.0, wall=0.0)
    r.begin_unload()
    r.unloaded(2.0, wall=0.0)
    assert r.generation == 4
