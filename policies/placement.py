"""Where a model with several routes (`routes:`) is served: the pure placement policy.

Each route is the model on one backend, on one node. In order:

1. a route that is out (its backend down, its load backing off, or too large for its node's
   budget) is never chosen, unless every route is out: then the first, so the client gets the
   real error;
2. resident and admitting somewhere: the least busy copy (fewest requests in flight or queued);
3. already on its way somewhere (loading, or requests queued for it, or draining): there, so
   that one load serves all the requests that want it;
4. fits beside what a node holds, and beside the models that only that node can serve and that
   are wanted soon, evicting nothing: where it would be ready soonest (the node's
   lane first finishes the load running on it and the loads already queued there, then loads
   this one: `backlog` plus its own load time);
5. else the node where making room costs least, in request-seconds: each victim's demand (its
   queued and in-flight requests, times its priority weight) waits one reload, and one more
   reload is paid when it is wanted again; the newcomer waits the node's backlog, the time its
   victims still have of their minimum residency (the node's policy keeps them that long) and
   its own load.

`place` decides from a snapshot and the time; it has no clock and no I/O.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

from policies.eviction import choose_victims, fits_at_all, fits_beside
from policies.scheduling import protected
from policies.tiers import reload_seconds
from policies.types import PRIORITY_WEIGHT, BatchingConfig, Budget, ModelView, State


@dataclass(frozen=True)
class NodeView:
    """A node as placement sees it: its budget and every managed model on it."""

    name: str
    budget: Budget
    models: Mapping[str, ModelView]
    # Models that can run on this node only: while they are in demand the node's room is
    # theirs, even when they are not resident right now.
    exclusive: frozenset[str] = frozenset()


@dataclass(frozen=True)
class RouteOption:
    """One route of the model being placed: the model on that route, and where it is."""

    model: ModelView  # the route's own view (its name is the route's, e.g. qwen@mac-ollama)
    node: str
    healthy: bool = True  # its backend answers


@dataclass(frozen=True)
class Placement:
    index: int  # into the routes given
    reason: str
    cost: float = 0.0  # the eviction cost paid, when room had to be made


def place(routes: Sequence[RouteOption], nodes: Mapping[str, NodeView],
          config: BatchingConfig, now: float) -> Placement:
    """The route to send a request for this model to now (see the module's rules)."""
    usable = [i for i, r in enumerate(routes) if _usable(r, nodes, now)]
    if not usable:
        return Placement(0, "no usable route: the first one answers")
    serving = [i for i in usable if _serving(routes[i].model)]
    if serving:
        best = min(serving, key=lambda i: (_busy(routes[i].model), i))
        return Placement(best, f"resident on {routes[best].node}: least busy copy")
    coming = [i for i in usable if _coming(routes[i].model)]
    if coming:
        best = max(coming, key=lambda i: (routes[i].model.queued, -i))
        return Placement(best, f"already placed on {routes[best].node}")
    free = [i for i in usable if _fits_now(routes[i], nodes)]
    if free:
        ready = {i: backlog(nodes[routes[i].node], routes[i].model) + routes[i].model.load_seconds
                 for i in free}
        best = min(free, key=lambda i: (ready[i], i))
        return Placement(best, f"fits on {routes[best].node} without eviction")
    costs = {i: eviction_cost(routes[i], nodes[routes[i].node], config, now) for i in usable}
    best = min(usable, key=lambda i: (costs[i], i))
    return Placement(best, f"least eviction cost on {routes[best].node} ({costs[best]:.0f})",
                     costs[best])


def eviction_cost(route: RouteOption, node: NodeView, config: BatchingConfig,
                  now: float) -> float:
    """What making room on `node` and loading there costs, in request-seconds (see the
    module's rule 5); infinite when no eviction can make room there now."""
    models = claimed(node)
    keep = protected(models, config, now)
    victims = choose_victims(route.model, models, node.budget, keep)
    if victims is None:  # only by taking models inside their minimum residency
        victims = choose_victims(route.model, models, node.budget)
    if victims is None:
        return math.inf
    held_for = max((_residency_left(models[v], config, now) for v in victims if v in keep),
                   default=0.0)
    weight = PRIORITY_WEIGHT.get(route.model.priority, 1.0)
    own = weight * (backlog(node, route.model) + held_for + route.model.load_seconds)
    return sum(_victim_cost(models[v]) for v in victims) + own


def backlog(node: NodeView, newcomer: ModelView) -> float:
    """Seconds of loading the node's lane has ahead of a newcomer: the load running, and a load
    for each other model queued for there that is not resident."""
    ahead = [m for m in node.models.values() if m.name != newcomer.name
             and (m.state is State.LOADING or (m.queued > 0 and not m.resident))]
    return sum(m.load_seconds for m in ahead)


def _residency_left(model: ModelView, config: BatchingConfig, now: float) -> float:
    loaded_at = model.loaded_at if model.loaded_at is not None else -math.inf
    return max(0.0, loaded_at + config.min_residency_ms / 1000.0 - now)


def _victim_cost(victim: ModelView) -> float:
    """Requests left waiting for it, weighted by priority, each waiting one reload: those queued
    or in flight now, and those its recent rate brings within one reload; plus the reload
    itself, since an evicted model that was used is likely wanted again."""
    weight = PRIORITY_WEIGHT.get(victim.priority, 1.0)
    reload = reload_seconds(victim)  # a wake, for a model that can sleep
    coming = victim.rate_per_s * reload
    demand = (victim.queued + victim.in_flight + coming) * weight
    return (demand + 1.0) * reload


def _usable(route: RouteOption, nodes: Mapping[str, NodeView], now: float) -> bool:
    node = nodes.get(route.node)
    if not route.healthy or node is None:
        return False
    model = route.model
    if model.state is State.FAILED and model.retry_at is not None and model.retry_at > now:
        return False
    return model.state is State.LOADED or fits_at_all(model, node.budget)


def _serving(model: ModelView) -> bool:
    return model.state is State.LOADED and model.admitting


def _coming(model: ModelView) -> bool:
    """On its way on that route: loading, queued for, or loaded but draining (its queue waits)."""
    return model.state is State.LOADING or model.queued > 0 or model.state is State.LOADED


def _busy(model: ModelView) -> int:
    return model.in_flight + model.queued


def _fits_now(route: RouteOption, nodes: Mapping[str, NodeView]) -> bool:
    node = nodes[route.node]
    return fits_beside(route.model, claimed(node), node.budget)


def claimed(node: NodeView) -> dict[str, ModelView]:
    """The node's models, with those only it can serve that are wanted soon counted as
    resident: taking their room means evicting them, or being evicted by them, next time."""
    held = {name: replace(m, state=State.LOADED, loaded_at=-math.inf)
            for name, m in node.models.items()
            if name in node.exclusive and _wanted_soon(m) and not m.resident}
    return {**node.models, **held}


def _wanted_soon(model: ModelView) -> bool:
    """Its recent rate brings a request within one of its loads."""
    return model.queued > 0 or model.rate_per_s * model.load_seconds >= 1.0
