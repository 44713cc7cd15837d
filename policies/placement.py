"""Where a model with several routes (`routes:`) is served: the pure placement policy.

Each route is the model on one backend, on one node. In order:

1. a route that is out (its backend down, its load backing off, or too large for its node's
   budget) is never chosen, unless every route is out: then the first, so the client gets the
   real error;
2. resident and admitting somewhere: the least busy copy (fewest requests in flight or queued);
3. already on its way somewhere (loading, or requests queued for it, or draining): there, so
   that one load serves all the requests that want it;
4. else the node where it costs least, in request-seconds, seen as it will be once the swap
   running on it is done (what loads is loaded and inside its minimum residency, what unloads
   is gone): the newcomer waits the node's backlog (the load running there and those already
   queued), the time its victims still have of their minimum residency (the node's policy keeps
   them that long) and its own load, times its priority weight; each victim's demand (queued,
   in flight, and what its arrival rate brings within one reload, times its priority weight)
   waits one reload, and one more reload is paid when it is wanted again. A node with room
   pays only the wait, so an idle node beats one whose lane is busy with a long load only
   while that wait is shorter than what making room elsewhere costs;
5. a model that only one node can serve keeps that room while it is wanted soon (a request
   for it is more likely than not within the time a newcomer taking its room keeps it away:
   the newcomer's minimum residency, then up to max_wait, since the newcomer's own requests
   keep coming to it there and the node's plan may keep a waiter that long, then its own
   reload; twice that, since its measured rate falls through a quiet spell): a model with
   routes elsewhere takes it, evicting it or being evicted by it, only when no other node can
   make room now. Its reload is the longest wait of all: it has nowhere else to go.

A queue already placed is placed again (`move`) while its load has not begun: it goes where
rule 4 and 5 would send it now, but only if it would be loaded there before its own node could
begin loading it. A node's lane that was free when the queue came may since have taken a long
load, or another node may have made room; a move that merely costs a little less is not made,
since the room the queue leaves was already being made for it.

`place` and `move` decide from a snapshot and the time; they have no clock and no I/O.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

from policies.eviction import choose_victims, fits_at_all
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
    cost: float = 0.0  # what placing it there costs (rule 4), when it was not there already


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
    rooms = {i: room(routes[i], nodes[routes[i].node], config, now) for i in usable}
    best = _cheapest(rooms)
    return Placement(best, rooms[best].reason(routes[best].node), rooms[best].cost)


def move(routes: Sequence[RouteOption], nodes: Mapping[str, NodeView], config: BatchingConfig,
         now: float, at: int) -> Placement | None:
    """Where the queue waiting on `routes[at]` for a load not begun yet should go instead, or
    None to stay: the route rules 4 and 5 pick for it now, if it would be loaded there before
    its own node could begin its load (see the module's last rule)."""
    queued = routes[at].model
    if queued.state is not State.UNLOADED or queued.queued == 0:
        return None
    lifted = [r if i == at else replace(r, model=replace(
                  r.model, queued=queued.queued, oldest_wait_since=queued.oldest_wait_since))
              for i, r in enumerate(routes)]
    usable = [i for i, r in enumerate(lifted) if r.model.state is State.UNLOADED
              and _usable(r, nodes, now)]
    if at not in usable:
        return None
    rooms = {i: room(lifted[i], nodes[lifted[i].node], config, now) for i in usable}
    best, here = _cheapest(rooms), rooms[at]
    there = rooms[best]
    if best == at or there.ready_in >= here.starts_in or (there.takes_a_home
                                                          and not here.takes_a_home):
        return None
    why = f"loaded on {routes[best].node} in {there.ready_in:.0f} s, before {routes[at].node} " \
          f"could begin in {here.starts_in:.0f} s"
    return Placement(best, why, there.cost)


def _cheapest(rooms: Mapping[int, Room]) -> int:
    """Rules 4 and 5: room that can be made, then no single-home model's room, then cost."""
    return min(rooms, key=lambda i: (rooms[i].cost == math.inf, rooms[i].takes_a_home,
                                     rooms[i].cost, i))


@dataclass(frozen=True)
class Room:
    """What placing a model on one node takes: the models it evicts there and the cost."""

    victims: tuple[str, ...] = ()
    cost: float = math.inf  # request-seconds (module rule 4); inf: no room can be made now
    takes_a_home: bool = False  # a victim is a model only that node serves, wanted soon
    starts_in: float = math.inf  # seconds until its load can begin there
    ready_in: float = math.inf  # seconds until it is loaded there

    def reason(self, node: str) -> str:
        if self.cost == math.inf:
            return f"no room anywhere now: queued on {node}"
        if not self.victims:
            return f"fits on {node} without eviction ({self.cost:.0f})"
        home = ", taking the room of a model only it serves" if self.takes_a_home else ""
        return f"least eviction cost on {node} ({self.cost:.0f}){home}"


def room(route: RouteOption, node: NodeView, config: BatchingConfig, now: float) -> Room:
    """The room the route's model would take on `node`, and its cost (module rules 4, 5)."""
    models = _settled(_claimed(node, config), now)
    newcomer = _after_transition(route.model, now)  # a copy still unloading holds no room
    keep = protected(models, config, now)
    victims = choose_victims(newcomer, models, node.budget, keep)
    if victims is None:  # only by taking models inside their minimum residency
        victims = choose_victims(newcomer, models, node.budget)
    if victims is None:
        return Room()
    held_for = max((_residency_left(models[v], config, now) for v in victims if v in keep),
                   default=0.0)
    weight = PRIORITY_WEIGHT.get(route.model.priority, 1.0)
    starts_in = backlog(node, route.model) + held_for
    ready_in = starts_in + route.model.load_seconds
    cost = sum(_victim_cost(models[v]) for v in victims) + weight * ready_in
    home = any(v in node.exclusive and _wanted_soon(models[v], config) for v in victims)
    return Room(victims, cost, home, starts_in, ready_in)


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


def _claimed(node: NodeView, config: BatchingConfig) -> dict[str, ModelView]:
    """The node's models, with those only it can serve that are wanted soon counted as
    resident: taking their room means evicting them, or being evicted by them, next time."""
    held = {name: replace(m, state=State.LOADED, loaded_at=-math.inf)
            for name, m in node.models.items()
            if name in node.exclusive and _wanted_soon(m, config) and not m.resident}
    return {**node.models, **held}


def _settled(models: Mapping[str, ModelView], now: float) -> dict[str, ModelView]:
    """The node once its lane's current work is done: what loads is loaded (just now, so
    inside its minimum residency), what unloads is gone; `backlog` counts the time."""
    return {name: _after_transition(m, now) for name, m in models.items()}


def _after_transition(model: ModelView, now: float) -> ModelView:
    if model.state is State.LOADING:
        return replace(model, state=State.LOADED, loaded_at=now, last_used=now)
    if model.state is State.UNLOADING:
        return replace(model, state=State.UNLOADED)
    return model


# The rate falls as a quiet spell lengthens (1 / the open gap, once longer than the usual
# one), so a model asked for every 75 s reads as unwanted after 200 s of quiet, as 7 % of its
# gaps are; testing against twice the time away, only gaps over 400 s (0.5 %) let its room go.
_AWAY_MARGIN = 2.0


def _wanted_soon(model: ModelView, config: BatchingConfig) -> bool:
    """More likely than not asked for (arriving at its recent rate, as a Poisson stream) within
    twice the time a newcomer taking its room keeps it away (`_AWAY_MARGIN`): the newcomer's
    minimum residency, then up to max_wait (the newcomer, served there, stays past its
    residency while its requests come, and the node's plan may keep a waiter that long), then
    its own reload; P(a request within t) = 1 - exp(-rate * t) >= 1/2."""
    away = (config.min_residency_ms + config.max_wait_ms) / 1000.0 + reload_seconds(model)
    return model.queued > 0 or model.rate_per_s * _AWAY_MARGIN * away >= math.log(2)
