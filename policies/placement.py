"""Where a model with several routes (`routes:`) is served: the pure placement policy.

Each route is the model on one backend, on one node. In order:

1. a route that is out (its backend down, its load backing off, or too large for its node's
   budget) is never chosen, unless every route is out: then the first, so the client gets the
   real error;
2. resident and admitting somewhere: the least busy copy (fewest requests in flight or queued);
3. already on its way somewhere (loading, or requests queued for it, or draining): there, so
   that one load serves all the requests that want it;
4. fits beside what a node holds, evicting nothing: the quickest load of those;
5. else the node where making room costs least: for each victim, the requests it would
   leave waiting (queued and in flight, times its priority weight) times its reload time, plus
   one reload (it will be wanted again), plus the newcomer's own load; a node whose victims
   are inside their minimum residency and still busy comes after every node whose are not.

`place` decides from a snapshot and the time; it has no clock and no I/O.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from policies.eviction import choose_victims, fits_at_all, fits_beside
from policies.scheduling import protected
from policies.types import PRIORITY_WEIGHT, BatchingConfig, Budget, ModelView, State


@dataclass(frozen=True)
class NodeView:
    """A node as placement sees it: its budget and every managed model on it."""

    name: str
    budget: Budget
    models: Mapping[str, ModelView]


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
        best = min(free, key=lambda i: (routes[i].model.load_seconds, i))
        return Placement(best, f"fits on {routes[best].node} without eviction")
    costs = {i: eviction_cost(routes[i], nodes[routes[i].node], config, now) for i in usable}
    best = min(usable, key=lambda i: (*costs[i], i))
    breaks, cost = costs[best]
    why = "inside min residency" if breaks else "least eviction cost"
    return Placement(best, f"{why} on {routes[best].node} ({cost:.0f})", cost)


def eviction_cost(route: RouteOption, node: NodeView, config: BatchingConfig,
                  now: float) -> tuple[bool, float]:
    """(whether room takes victims inside their min residency, the cost of making room and
    loading there). Infinite when no eviction can make room now (everything is busy moving)."""
    keep = protected(node.models, config, now)
    victims = choose_victims(route.model, node.models, node.budget, keep)
    breaks = victims is None
    if victims is None:
        victims = choose_victims(route.model, node.models, node.budget)
    if victims is None:
        return True, math.inf
    lost = sum(_victim_cost(node.models[v]) for v in victims)
    return breaks, lost + route.model.load_seconds


def _victim_cost(victim: ModelView) -> float:
    """Requests left waiting for it, weighted by priority, each waiting one reload; plus the
    reload itself, since an evicted model that was used is likely wanted again."""
    weight = PRIORITY_WEIGHT.get(victim.priority, 1.0)
    demand = (victim.queued + victim.in_flight) * weight
    return (demand + 1.0) * victim.load_seconds


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
    return fits_beside(route.model, node.models, node.budget)
