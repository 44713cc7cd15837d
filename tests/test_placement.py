"""policies/placement.py: which node serves a model that has routes on several."""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from policies.eviction import fits_at_all
from policies.placement import NodeView, RouteOption, move, place, room
from policies.rates import ArrivalRate
from policies.types import BatchingConfig, Budget, ModelView, State

CONFIG = BatchingConfig(window_ms=8000, max_wait_ms=60000, min_residency_ms=20000)
NOW = 1000.0


def node(name: str, budget: Budget, *models: ModelView) -> NodeView:
    return NodeView(name, budget, {m.name: m for m in models})


def route(node_name: str, **fields: Any) -> RouteOption:
    healthy = fields.pop("healthy", True)
    return RouteOption(ModelView(name=f"m@{node_name}", **fields), node_name, healthy)


def nodes_with(*views: NodeView, routes: list[RouteOption]) -> dict[str, NodeView]:
    """Each node holding its routes' views too (a route is a model on its node)."""
    out = {}
    for view in views:
        mine = {r.model.name: r.model for r in routes if r.node == view.name}
        out[view.name] = NodeView(view.name, view.budget, {**view.models, **mine})
    return out


def idle(name: str, **fields: Any) -> ModelView:
    return ModelView(name=name, state=State.LOADED, loaded_at=0.0, last_used=0.0, **fields)


TWELVE = Budget(memory_gb=12)


def test_where_it_is_resident_it_is_served() -> None:
    routes = [route("a", size_gb=4), route("b", size_gb=4, state=State.LOADED)]
    nodes = nodes_with(node("a", TWELVE), node("b", TWELVE), routes=routes)
    assert place(routes, nodes, CONFIG, NOW).index == 1


def test_the_least_busy_resident_copy_serves() -> None:
    routes = [route("a", state=State.LOADED, in_flight=5),
              route("b", state=State.LOADED, in_flight=1, queued=1)]
    nodes = nodes_with(node("a", TWELVE), node("b", TWELVE), routes=routes)
    assert place(routes, nodes, CONFIG, NOW).index == 1


def test_a_model_loading_somewhere_draws_its_requests_there() -> None:
    routes = [route("a", size_gb=4), route("b", size_gb=4, state=State.LOADING)]
    nodes = nodes_with(node("a", TWELVE), node("b", TWELVE), routes=routes)
    assert place(routes, nodes, CONFIG, NOW).index == 1


def test_where_it_fits_without_eviction_beats_where_room_must_be_made() -> None:
    routes = [route("a", size_gb=6), route("b", size_gb=6)]
    nodes = nodes_with(node("a", TWELVE, idle("x", size_gb=8)), node("b", TWELVE),
                       routes=routes)
    placement = place(routes, nodes, CONFIG, NOW)
    assert placement.index == 1 and "without eviction" in placement.reason


def test_of_the_nodes_where_it_fits_the_quicker_load_wins() -> None:
    routes = [route("a", size_gb=6, load_seconds=30), route("b", size_gb=6, load_seconds=8)]
    nodes = nodes_with(node("a", TWELVE), node("b", TWELVE), routes=routes)
    assert place(routes, nodes, CONFIG, NOW).index == 1


def test_room_is_made_where_the_victims_are_wanted_least() -> None:
    wanted = idle("coder", size_gb=8, priority="high", queued=0, in_flight=3, load_seconds=20)
    spare = idle("old", size_gb=8, priority="low", load_seconds=5)
    routes = [route("a", size_gb=6), route("b", size_gb=6)]
    nodes = nodes_with(node("a", TWELVE, wanted), node("b", TWELVE, spare), routes=routes)
    placement = place(routes, nodes, CONFIG, NOW)
    assert placement.index == 1 and "least eviction cost" in placement.reason


def test_a_victim_inside_its_min_residency_is_spared_if_another_node_can_make_room() -> None:
    fresh = ModelView("fresh", State.LOADED, size_gb=8, loaded_at=NOW - 1, last_used=NOW,
                      in_flight=1, load_seconds=2)
    settled = idle("settled", size_gb=8, load_seconds=3)
    routes = [route("a", size_gb=6), route("b", size_gb=6)]
    nodes = nodes_with(node("a", TWELVE, fresh), node("b", TWELVE, settled), routes=routes)
    # Node a's policy keeps `fresh` for 19 s more: the newcomer would wait that long there.
    assert room(routes[0], nodes["a"], CONFIG, NOW).cost >= 19
    assert place(routes, nodes, CONFIG, NOW).index == 1


def test_a_victim_asked_for_often_is_worth_more_than_one_asked_for_rarely() -> None:
    hot = idle("hot", size_gb=8, load_seconds=10, rate_per_s=0.5)
    cold = idle("cold", size_gb=8, load_seconds=10, rate_per_s=0.01)
    routes = [route("a", size_gb=6), route("b", size_gb=6)]
    nodes = nodes_with(node("a", TWELVE, hot), node("b", TWELVE, cold), routes=routes)
    assert place(routes, nodes, CONFIG, NOW).index == 1


def test_of_two_nodes_with_room_the_one_not_busy_loading_wins() -> None:
    loading = ModelView("other", State.LOADING, size_gb=2, load_seconds=20)
    routes = [route("a", size_gb=4, load_seconds=5), route("b", size_gb=4, load_seconds=8)]
    nodes = nodes_with(node("a", TWELVE, loading), node("b", TWELVE), routes=routes)
    assert place(routes, nodes, CONFIG, NOW).index == 1


def test_a_node_whose_lane_is_busy_with_a_long_load_loses_to_a_cheap_eviction() -> None:
    # Node a has room, but its lane loads a 70B for a minute first; node b evicts a small
    # model hardly anyone uses and loads at once.
    seventy = ModelView("seventy", State.LOADING, size_gb=2, load_seconds=60)
    spare = idle("spare", size_gb=8, priority="low", load_seconds=2, rate_per_s=0.001)
    routes = [route("a", size_gb=6, load_seconds=6), route("b", size_gb=6, load_seconds=6)]
    nodes = nodes_with(node("a", TWELVE, seventy), node("b", TWELVE, spare), routes=routes)
    placement = place(routes, nodes, CONFIG, NOW)
    assert placement.index == 1 and "least eviction cost" in placement.reason


def test_with_every_node_mid_swap_the_one_whose_swap_ends_sooner_wins() -> None:
    # Both nodes are loading a model that leaves no room: room is made once that load is done
    # (and its minimum residency has passed), so the quicker swap wins, not the first route.
    slow = ModelView("slow", State.LOADING, size_gb=10, load_seconds=60, queued=1)
    quick = ModelView("quick", State.LOADING, size_gb=10, load_seconds=5, queued=1)
    routes = [route("a", size_gb=6), route("b", size_gb=6)]
    nodes = nodes_with(node("a", TWELVE, slow), node("b", TWELVE, quick), routes=routes)
    rooms = [room(r, nodes[r.node], CONFIG, NOW) for r in routes]
    assert all(r.cost < math.inf for r in rooms)
    assert place(routes, nodes, CONFIG, NOW).index == 1


def seventy_on_the_mac(rate_per_s: float) -> tuple[list[RouteOption], dict[str, NodeView]]:
    """A 32B that may go to the Mac, where the 70B only that node serves is loaded, or to the
    GPU server, which must evict three models in use for it."""
    mac, gpu = Budget(max_models=1, memory_gb=56), Budget(max_models=3, memory_gb=20)
    seventy = idle("seventy", size_gb=42, load_seconds=60, rate_per_s=rate_per_s)
    small = [idle(f"s{i}", size_gb=6, load_seconds=10, rate_per_s=0.1, in_flight=3)
             for i in range(3)]
    routes = [route("mac", size_gb=20, load_seconds=30), route("gpu", size_gb=20, load_seconds=20)]
    nodes = {"mac": NodeView("mac", mac, {"seventy": seventy, routes[0].model.name:
                                          routes[0].model}, frozenset({"seventy"})),
             "gpu": nodes_with(node("gpu", gpu, *small), routes=routes)["gpu"]}
    return routes, nodes


def test_a_model_only_one_node_serves_keeps_its_room_from_a_model_that_can_go_elsewhere() -> None:
    # The Mac holds the 70B, which no other node can run and which is asked for every minute.
    # The 32B could take the Mac more cheaply by the cost alone (the GPU must evict three
    # models in use), but the 70B would then wait a minute's reload with nowhere else to go.
    routes, nodes = seventy_on_the_mac(rate_per_s=1 / 60)
    mac_room, gpu_room = (room(r, nodes[r.node], CONFIG, NOW) for r in routes)
    assert mac_room.takes_a_home and mac_room.cost < gpu_room.cost
    assert place(routes, nodes, CONFIG, NOW).index == 1
    _, quiet = seventy_on_the_mac(rate_per_s=1 / 600)
    assert place(routes, quiet, CONFIG, NOW).index == 0  # not wanted now


def test_a_model_only_one_node_serves_is_wanted_soon_within_a_newcomers_stay() -> None:
    # Asked for every 90 s with a 50 s load: a newcomer taking its room keeps it out for the
    # newcomer's 20 s of minimum residency and then the reload, and within those 70 s a request
    # is more likely than not (1 - exp(-70/90) = 0.54).
    big = ModelView("big", size_gb=10, load_seconds=50, rate_per_s=1 / 90)
    routes = [route("a", size_gb=6, load_seconds=2), route("b", size_gb=6, load_seconds=2)]
    a = NodeView("a", TWELVE, {"big": big, routes[0].model.name: routes[0].model},
                 frozenset({"big"}))
    b = nodes_with(node("b", TWELVE, idle("spare", size_gb=8, load_seconds=2)),
                   routes=routes)["b"]
    assert place(routes, {"a": a, "b": b}, CONFIG, NOW).index == 1


def test_a_queue_whose_load_has_not_begun_moves_where_it_is_loaded_before_it_could_begin() -> None:
    # Placed on a when a's lane was free; a has since begun a minute's load of another model,
    # while b is idle: b has it loaded in 6 s, a could only begin in 60.
    seventy = ModelView("seventy", State.LOADING, size_gb=4, load_seconds=60)
    routes = [route("a", size_gb=6, load_seconds=6, queued=2, oldest_wait_since=NOW - 3),
              route("b", size_gb=6, load_seconds=6)]
    nodes = nodes_with(node("a", TWELVE, seventy), node("b", TWELVE), routes=routes)
    moved = move(routes, nodes, CONFIG, NOW, 0)
    assert moved is not None and moved.index == 1 and "before a could begin" in moved.reason
    assert move(routes, nodes, CONFIG, NOW, 1) is None  # nothing is queued on b


def test_a_queue_stays_where_its_load_can_begin_sooner_than_it_would_be_loaded_elsewhere() -> None:
    # b is cheaper by the cost (a must evict a model in use), but a begins the load in 0 s
    # and b would take 6 s to have it: the queue is not moved for that.
    busy = idle("busy", size_gb=8, in_flight=2, load_seconds=20, rate_per_s=0.2)
    routes = [route("a", size_gb=6, load_seconds=6, queued=2, oldest_wait_since=NOW - 3),
              route("b", size_gb=6, load_seconds=6)]
    nodes = nodes_with(node("a", TWELVE, busy), node("b", TWELVE), routes=routes)
    assert place(routes, nodes, CONFIG, NOW).index == 0  # already placed: it stays there
    assert room(routes[1], nodes["b"], CONFIG, NOW).cost < room(routes[0], nodes["a"], CONFIG,
                                                                  NOW).cost
    assert move(routes, nodes, CONFIG, NOW, 0) is None
    loading = replace(routes[0], model=replace(routes[0].model, state=State.LOADING))
    assert move([loading, routes[1]], nodes, CONFIG, NOW, 0) is None  # its load has begun


def test_an_arrival_rate_follows_the_gaps_and_decays_in_silence() -> None:
    rate = ArrivalRate()
    assert rate.per_s(0.0) == 0.0
    for t in range(0, 20, 2):
        rate.arrived(float(t))
    assert rate.per_s(18.0) == pytest.approx(0.5)
    assert rate.per_s(118.0) == pytest.approx(0.01)  # 100 s without a request


def test_a_route_whose_backend_is_down_is_left_even_where_the_model_is_resident() -> None:
    routes = [route("a", state=State.LOADED, healthy=False), route("b", size_gb=4)]
    nodes = nodes_with(node("a", TWELVE), node("b", TWELVE), routes=routes)
    assert place(routes, nodes, CONFIG, NOW).index == 1


def test_a_route_backing_off_after_a_failed_load_is_left() -> None:
    routes = [route("a", state=State.FAILED, retry_at=NOW + 30), route("b", size_gb=4)]
    nodes = nodes_with(node("a", TWELVE), node("b", TWELVE), routes=routes)
    assert place(routes, nodes, CONFIG, NOW).index == 1


def test_a_route_too_large_for_its_node_is_left() -> None:
    routes = [route("a", size_gb=16), route("b", size_gb=4)]
    nodes = nodes_with(node("a", TWELVE), node("b", TWELVE, idle("x", size_gb=10)),
                       routes=routes)
    assert place(routes, nodes, CONFIG, NOW).index == 1


def test_with_every_route_out_the_first_answers_with_its_error() -> None:
    routes = [route("a", healthy=False), route("b", healthy=False)]
    nodes = nodes_with(node("a", TWELVE), node("b", TWELVE), routes=routes)
    assert place(routes, nodes, CONFIG, NOW).index == 0


# -- properties over arbitrary fleets -----------------------------------------------------------

STATES = st.sampled_from(list(State))
PRIORITIES = st.sampled_from(["high", "normal", "low"])


@st.composite
def other_model(draw: Any, name: str) -> ModelView:
    state = draw(STATES)
    return ModelView(
        name=name, state=state, size_gb=draw(st.sampled_from([2.0, 4.0, 6.0, 8.0])),
        priority=draw(PRIORITIES), in_flight=draw(st.integers(0, 3)) if state is State.LOADED
        else 0, queued=draw(st.integers(0, 4)), loaded_at=draw(st.floats(0, NOW)),
        last_used=draw(st.floats(0, NOW)), admitting=draw(st.booleans()),
        load_seconds=draw(st.floats(1, 30)),
        oldest_wait_since=draw(st.floats(NOW - 50, NOW)))


@st.composite
def fleets(draw: Any) -> tuple[list[RouteOption], dict[str, NodeView]]:
    names = [f"n{i}" for i in range(draw(st.integers(2, 3)))]
    views, routes = [], []
    for name in names:
        budget = Budget(max_models=draw(st.sampled_from([None, 1, 2, 3])),
                        memory_gb=draw(st.sampled_from([None, 8.0, 12.0, 20.0])))
        others = [draw(other_model(f"{name}-x{j}")) for j in range(draw(st.integers(0, 3)))]
        views.append(node(name, budget, *others))
        state = draw(STATES)
        routes.append(RouteOption(ModelView(
            name=f"m@{name}", state=state, size_gb=draw(st.sampled_from([2.0, 4.0, 6.0, 10.0])),
            in_flight=draw(st.integers(0, 2)) if state is State.LOADED else 0,
            queued=draw(st.integers(0, 3)), admitting=draw(st.booleans()),
            load_seconds=draw(st.floats(1, 30)),
            retry_at=draw(st.sampled_from([None, NOW - 1, NOW + 10]))), name,
            healthy=draw(st.booleans())))
    return routes, nodes_with(*views, routes=routes)


def usable(option: RouteOption, nodes: dict[str, NodeView]) -> bool:
    m = option.model
    backing_off = m.state is State.FAILED and m.retry_at is not None and m.retry_at > NOW
    fits = m.state is State.LOADED or fits_at_all(m, nodes[option.node].budget)
    return option.healthy and not backing_off and fits


@settings(max_examples=400, deadline=None)
@given(fleets())
def test_placement_never_picks_a_route_that_is_out_while_another_is_usable(fleet: Any) -> None:
    routes, nodes = fleet
    chosen = place(routes, nodes, CONFIG, NOW)
    assert 0 <= chosen.index < len(routes)
    if any(usable(r, nodes) for r in routes):
        assert usable(routes[chosen.index], nodes)


@settings(max_examples=400, deadline=None)
@given(fleets())
def test_a_serving_copy_is_used_and_the_least_busy_one(fleet: Any) -> None:
    routes, nodes = fleet
    serving = [r for r in routes if usable(r, nodes) and r.model.state is State.LOADED
               and r.model.admitting]
    if not serving:
        return
    chosen = routes[place(routes, nodes, CONFIG, NOW).index].model
    assert chosen.state is State.LOADED and chosen.admitting
    assert chosen.in_flight + chosen.queued == min(r.model.in_flight + r.model.queued
                                                   for r in serving)


@settings(max_examples=400, deadline=None)
@given(fleets())
def test_a_new_home_is_the_cheapest_node_that_takes_no_single_home_models_room(
        fleet: Any) -> None:
    routes, nodes = fleet
    placement = place(routes, nodes, CONFIG, NOW)
    if "eviction" not in placement.reason:
        return  # served, joined or queued where it already was
    chosen = room(routes[placement.index], nodes[routes[placement.index].node], CONFIG, NOW)
    for r in routes:
        if usable(r, nodes):
            other = room(r, nodes[r.node], CONFIG, NOW)
            if not other.takes_a_home and other.cost < math.inf:
                assert not chosen.takes_a_home and chosen.cost <= other.cost


@settings(max_examples=200, deadline=None)
@given(fleets())
def test_placement_is_a_pure_function_of_its_snapshot(fleet: Any) -> None:
    routes, nodes = fleet
    assert place(routes, nodes, CONFIG, NOW) == place(list(routes), dict(nodes), CONFIG, NOW)


def test_room_that_a_model_only_this_node_serves_is_about_to_want_is_not_free() -> None:
    # Node a is empty, but its big model (no other node can run it) is asked for every 10 s
    # and loads in 40: a newcomer there would be evicted by it, or evict it. Node b needs room
    # made, cheaply.
    big = ModelView("big", size_gb=10, load_seconds=40, rate_per_s=0.1)
    routes = [route("a", size_gb=6, load_seconds=2), route("b", size_gb=6, load_seconds=2)]
    a = NodeView("a", TWELVE, {"big": big, routes[0].model.name: routes[0].model},
                 frozenset({"big"}))
    b = nodes_with(node("b", TWELVE, idle("spare", size_gb=8, load_seconds=2)),
                   routes=routes)["b"]
    placement = place(routes, {"a": a, "b": b}, CONFIG, NOW)
    assert placement.index == 1 and "least eviction cost" in placement.reason
    quiet = NodeView("a", TWELVE, {**a.models, "big": replace(big, rate_per_s=0.001)},
                     a.exclusive)
    assert place(routes, {"a": quiet, "b": b}, CONFIG, NOW).index == 0  # not wanted: free


def test_a_model_only_one_node_serves_keeps_its_room_through_a_quiet_spell() -> None:
    # The 70B is asked for every 75 s, but none has come for 300 s, so its rate reads 1/300:
    # within the 140 s a newcomer would keep it away a request is less likely than not
    # (0.37), yet quiet spells that long are 2 % of its gaps. Within twice that time (0.61)
    # it is wanted, so the newcomer goes where room is made instead.
    routes, nodes = seventy_on_the_mac(rate_per_s=1 / 300)
    assert room(routes[0], nodes["mac"], CONFIG, NOW).takes_a_home
    assert place(routes, nodes, CONFIG, NOW).index == 1
    _, rare = seventy_on_the_mac(rate_per_s=1 / 600)  # 0.37 within twice the time: free
    assert not room(routes[0], rare["mac"], CONFIG, NOW).takes_a_home


def test_a_copy_still_unloading_is_not_room_to_load_it_again() -> None:
    # Node a is unloading the model's copy beside a model that fills the rest: once that copy
    # is gone it needs room made again, so node b, where it fits, takes it, a second slower.
    routes = [route("a", size_gb=6, state=State.UNLOADING, load_seconds=5),
              route("b", size_gb=6, load_seconds=6)]
    nodes = nodes_with(node("a", TWELVE, idle("x", size_gb=8, load_seconds=4)),
                       node("b", TWELVE), routes=routes)
    assert room(routes[0], nodes["a"], CONFIG, NOW).victims == ("x",)
    placement = place(routes, nodes, CONFIG, NOW)
    assert placement.index == 1 and "without eviction" in placement.reason


def test_a_model_only_one_node_serves_keeps_its_room_past_a_newcomers_minimum_residency() -> None:
    # The 70B, asked for every 3 minutes, loads in a minute. A newcomer on the Mac would be
    # served there past its 20 s of minimum residency, and a waiter for the 70B may then wait
    # max_wait (60 s) before its reload: within those 140 s a request for it is more likely
    # than not (1 - exp(-140/180) = 0.54), so the newcomer goes where room is made instead.
    routes, nodes = seventy_on_the_mac(rate_per_s=1 / 180)
    assert room(routes[0], nodes["mac"], CONFIG, NOW).takes_a_home
    assert place(routes, nodes, CONFIG, NOW).index == 1
    _, rare = seventy_on_the_mac(rate_per_s=1 / 600)
    assert place(routes, rare, CONFIG, NOW).index == 0  # not wanted soon
