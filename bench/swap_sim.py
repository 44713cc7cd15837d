"""Swap scheduling on request traces: the product's own policies against a simulated clock.

A discrete-event simulation of GPU nodes: requests arrive, wait in per-model queues, are served
`slots` at a time by a loaded model, and each node loads one model at a time (an unload first
costs `unload_seconds`); different nodes load at once. On every instant with events the
simulator builds, per node, the same ModelView snapshot the gateway builds, calls the policy with
that node's budget, and carries out the Plan with the executor the gateway's scheduler uses
(`policies.execution`). Idle ttls and the back-off after a failed load are the policy's too, so
traces with them replay the gateway's own rules.

Fleet traces give models routes on several nodes; a request for a model that is nowhere
resident is placed by `policies.placement` (what the gateway runs), by a random route, or on its
first route (each model pinned to one node, as a fleet of single-box proxies would run it).

    python bench/swap_sim.py [--seed N] [--requests N] [--window-ms MS] [--max-wait-ms MS]
                             [--min-residency-ms MS]
"""

from __future__ import annotations

import argparse
import heapq
import itertools
import math
import random
import statistics
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace

from policies.backoff import retry_delay
from policies.eviction import fits_together
from policies.execution import execute
from policies.placement import NodeView, RouteOption, move, place
from policies.rates import ArrivalRate
from policies.scheduling import decide, decide_fifo
from policies.tiers import host_gb
from policies.types import BatchingConfig, Budget, ModelView, Plan, State

_STAYING = (State.LOADED, State.LOADING)
_MOVING = (State.LOADING, State.UNLOADING)
_NEVER = (math.inf, "")
_BOX = "box"  # the one node of a single-node scenario

Policy = Callable[[Mapping[str, ModelView], Budget, BatchingConfig, float], Plan]


@dataclass(frozen=True)
class SimModel:
    name: str
    load_seconds: float  # on a node of load_factor 1
    size_gb: float = 1.0
    priority: str = "normal"
    ttl_s: float = 0.0  # unloaded after this long idle; 0 = never
    failing_loads: int = 0  # its first loads fail (a backend still starting, say)
    routes: tuple[str, ...] = ()  # the nodes that may serve it, its pinned one first; () = all
    wake_seconds: float | None = None  # it can sleep (vLLM level 1) and wakes in this long


@dataclass(frozen=True)
class SimNode:
    name: str
    budget: Budget  # its host_memory_gb holds the models put to sleep
    load_factor: float = 1.0  # a slower node (a Mac against a GPU server) loads slower
    sleeps: bool = False  # its servers can put models to sleep (vLLM sleep mode)


@dataclass(frozen=True)
class Request:
    arrival: float
    model: str
    service: float


@dataclass(frozen=True)
class Scenario:
    name: str
    models: tuple[SimModel, ...]
    requests: tuple[Request, ...]
    budget: Budget = Budget(max_models=1)  # the one node's, when `nodes` is empty
    slots: int = 4  # requests one loaded model serves at once; more wait inside the backend
    unload_seconds: float = 1.0
    nodes: tuple[SimNode, ...] = ()  # a fleet; empty: one node with `budget`

    def fleet(self) -> tuple[SimNode, ...]:
        return self.nodes or (SimNode(_BOX, self.budget),)


@dataclass(frozen=True)
class Outcome:
    swaps: int
    waits: tuple[float, ...]  # enqueue to lease
    latencies: tuple[float, ...]  # arrival to completion
    makespan: float
    loading_s: float = 0.0  # time spent loading, summed over nodes (failed loads too)

    @property
    def mean_latency(self) -> float:
        return statistics.fmean(self.latencies)

    @property
    def p50_latency(self) -> float:
        return percentile(self.latencies, 50)

    @property
    def p99_latency(self) -> float:
        return percentile(self.latencies, 99)

    @property
    def mean_wait(self) -> float:
        return statistics.fmean(self.waits)

    @property
    def p99_wait(self) -> float:
        return percentile(self.waits, 99)

    @property
    def max_wait(self) -> float:
        return max(self.waits)


class InvalidPlan(Exception):
    """The policy asked for something the scheduler must never do."""


class Stuck(Exception):
    """Requests are left but nothing will ever happen again: a policy deadlock."""


def percentile(values: tuple[float, ...], pct: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(pct / 100 * len(ordered)) - 1)]


@dataclass
class _Model:
    """One route: a model on one node (named as the gateway names routes)."""

    spec: SimModel
    name: str
    node: str
    load_seconds: float
    wake_seconds: float | None = None  # on a node that sleeps, for a model that can
    state: State = State.UNLOADED
    queue: deque[Request] = field(default_factory=deque)
    backlog: deque[Request] = field(default_factory=deque)  # leased, waiting for a slot
    running: int = 0
    loaded_at: float | None = None
    last_used: float = -math.inf
    admitting: bool = True
    loads_tried: int = 0
    failures: int = 0  # in a row
    retry_at: float | None = None
    rate: ArrivalRate = field(default_factory=lambda: ArrivalRate())
    asleep: bool = False  # put to sleep: its next load is a wake

    @property
    def in_flight(self) -> int:
        return self.running + len(self.backlog)

    def view(self, now: float = 0.0) -> ModelView:
        return ModelView(
            name=self.name,
            state=self.state,
            size_gb=self.spec.size_gb,
            priority=self.spec.priority,
            in_flight=self.in_flight,
            queued=len(self.queue),
            oldest_wait_since=self.queue[0].arrival if self.queue else None,
            loaded_at=self.loaded_at,
            last_used=self.last_used,
            admitting=self.admitting,
            load_seconds=self.next_load_seconds,
            retry_at=self.retry_at if self.state is State.FAILED else None,
            ttl_s=self.spec.ttl_s,
            rate_per_s=self.rate.per_s(now),
            wake_seconds=self.wake_seconds,
            asleep=self.asleep,
        )

    @property
    def next_load_seconds(self) -> float:
        """A wake for a model asleep, else a load."""
        if self.asleep and self.wake_seconds is not None:
            return self.wake_seconds
        return self.load_seconds


@dataclass
class _Lane:
    """One node: its models (routes) and its budget; it loads or unloads one at a time."""

    node: SimNode
    models: dict[str, _Model] = field(default_factory=dict)

    def views(self, now: float) -> dict[str, ModelView]:
        return {name: m.view(now) for name, m in self.models.items()}

    def exclusive(self) -> frozenset[str]:
        """The models that have no route but this node."""
        return frozenset(name for name, m in self.models.items()
                         if m.spec.routes in ((), (self.node.name,)))


Placer = Callable[[list[_Model], Mapping[str, _Lane], BatchingConfig, float], _Model]
# Where a queue placed on routes[at] whose load has not begun goes instead, or None to stay.
Mover = Callable[[list[_Model], int, Mapping[str, _Lane], BatchingConfig, float], _Model | None]


class _LaneBox:
    """What one node's plan acts on (policies.execution.Box), as the gateway's _NodeBox."""

    def __init__(self, simulation: _Simulation, lane: _Lane) -> None:
        self.simulation, self.lane = simulation, lane

    def set_admitting(self, name: str, admitting: bool) -> None:
        self.lane.models[name].admitting = admitting

    def admit(self, name: str) -> None:
        self.simulation.admit(self.lane, name)

    def swap_running(self) -> bool:
        return any(m.state in _MOVING for m in self.lane.models.values())

    def begin_swap(self, evict: tuple[str, ...], load: str | None, reason: str,
                   sleep: tuple[str, ...] = ()) -> None:
        """Unload the victims (or put them to sleep), then load once they are gone."""
        self.simulation.begin_swap(self.lane, evict, load, sleep)


class _Simulation:
    """One run over a scenario.

    `strict_order` releases only the waiters ahead of every other model's oldest waiter on the
    node, the way Ollama's pending queue and llama-swap's swap lock serve requests (ABAB loads
    four times). `placer` picks the route of a request (the pinned one by default); `mover`,
    if any, places again a queue whose load has not begun, before each round of plans.
    """

    def __init__(
        self, scenario: Scenario, policy: Policy, config: BatchingConfig, strict_order: bool,
        placer: Placer | None = None, mover: Mover | None = None,
    ) -> None:
        self.scenario = scenario
        self.policy = policy
        self.config = config
        self.strict_order = strict_order
        self.placer = placer or pinned
        self.mover = mover
        self.lanes = {node.name: _Lane(node) for node in scenario.fleet()}
        self.routes: dict[str, list[_Model]] = {m.name: self._routes(m) for m in scenario.models}
        self.models = {r.name: r for routes in self.routes.values() for r in routes}
        self.events: list[tuple[float, int, str, str, Request | None]] = []
        self.seq = itertools.count()
        self.wakes: set[float] = set()
        self.clock = 0.0
        self.swaps = 0
        self.failed_loads = 0
        self.loading_s = 0.0
        self.waits: list[float] = []
        self.latencies: list[float] = []
        self.last_done = 0.0

    def _routes(self, spec: SimModel) -> list[_Model]:
        """Its routes, the first named as the model (as the gateway names them)."""
        nodes = [self.lanes[n].node for n in spec.routes] or [
            lane.node for lane in self.lanes.values()]
        routes = []
        for i, node in enumerate(nodes):
            name = spec.name if i == 0 else f"{spec.name}@{node.name}"
            wake = spec.wake_seconds if node.sleeps else None
            route = _Model(spec, name, node.name, round(spec.load_seconds * node.load_factor, 3),
                           wake)
            self.lanes[node.name].models[name] = route
            routes.append(route)
        return routes

    def run(self) -> Outcome:
        for request in self.scenario.requests:
            self._at(request.arrival, "arrive", request.model, request)
        decisions_left = 1_000 + 100 * len(self.scenario.requests)  # a policy loop runs out
        while self.events:
            decisions_left -= 1
            if decisions_left < 0:
                raise Stuck(f"still deciding at t={self.clock:.3f}: the policy loops")
            self.clock = self.events[0][0]
            while self.events and self.events[0][0] == self.clock:
                _, _, kind, name, request = heapq.heappop(self.events)
                self._handle(kind, name, request)
            self._decide()
        unserved = len(self.scenario.requests) - len(self.latencies)
        if unserved:
            raise Stuck(f"{unserved} requests never served")
        first = min(r.arrival for r in self.scenario.requests)
        return Outcome(self.swaps, tuple(self.waits), tuple(self.latencies),
                       self.last_done - first, self.loading_s)

    def _at(self, time: float, kind: str, name: str = "", request: Request | None = None) -> None:
        heapq.heappush(self.events, (time, next(self.seq), kind, name, request))

    def _handle(self, kind: str, name: str, request: Request | None) -> None:
        if kind == "wake":
            return
        if kind == "arrive" and request is not None:
            self._arrive(request)
            return
        model = self.models[name]
        if request is not None:
            self._finish(model, request)
        elif kind == "loaded":
            self._loaded(model)
        else:
            model.state, model.loaded_at = State.UNLOADED, None

    def _loaded(self, model: _Model) -> None:
        model.loads_tried += 1
        if model.loads_tried <= model.spec.failing_loads:
            model.failures += 1
            model.state, model.retry_at = State.FAILED, self.clock + retry_delay(model.failures)
            self.failed_loads += 1
            return
        model.state, model.loaded_at, model.failures = State.LOADED, self.clock, 0
        self.swaps += 1

    def _arrive(self, request: Request) -> None:
        routes = self.routes[request.model]
        model = routes[0] if len(routes) == 1 else self.placer(
            routes, self.lanes, self.config, self.clock)
        model.rate.arrived(self.clock)
        lane = self.lanes[model.node]
        behind = self.strict_order and any(m.queue for m in lane.models.values())
        if model.state is State.LOADED and model.admitting and not behind:
            self._lease(model, request)
        else:
            model.queue.append(request)

    def _lease(self, model: _Model, request: Request) -> None:
        self.waits.append(self.clock - request.arrival)
        model.last_used = self.clock
        if model.running < self.scenario.slots:
            self._start(model, request)
        else:
            model.backlog.append(request)

    def _start(self, model: _Model, request: Request) -> None:
        model.running += 1
        self._at(self.clock + request.service, "done", model.name, request)

    def _finish(self, model: _Model, request: Request) -> None:
        self.latencies.append(self.clock - request.arrival)
        self.last_done = self.clock
        model.running -= 1
        model.last_used = self.clock
        if model.backlog:
            self._start(model, model.backlog.popleft())

    def _decide(self) -> None:
        if self.mover is not None:
            self._move_queues(self.mover)
        for lane in self.lanes.values():
            self._decide_node(lane)

    def _move_queues(self, mover: Mover) -> None:
        """Queues whose load has not begun go where placement sends them now, as the
        gateway's scheduler moves them."""
        for routes in self.routes.values():
            for at, route in enumerate(routes):
                if len(routes) < 2 or not route.queue or route.state is not State.UNLOADED:
                    continue
                target = mover(routes, at, self.lanes, self.config, self.clock)
                if target is not None:
                    target.queue = deque(sorted([*target.queue, *route.queue],
                                                key=lambda r: r.arrival))
                    route.queue.clear()

    def _decide_node(self, lane: _Lane) -> None:
        plan = self.policy(lane.views(self.clock), lane.node.budget, self.config, self.clock)
        newly_drained = [lane.models[n] for n in plan.drain if lane.models[n].admitting]
        self._execute(lane, plan)
        if any(not m.in_flight for m in newly_drained):
            # Strict order held its waiters back, so no lease release will come to wake us.
            self._at(self.clock, "wake")
        if plan.wake_at is not None and plan.wake_at not in self.wakes:
            if plan.wake_at <= self.clock:
                raise InvalidPlan(f"wake_at {plan.wake_at} is not after now ({self.clock})")
            self.wakes.add(plan.wake_at)
            self._at(plan.wake_at, "wake")

    def _execute(self, lane: _Lane, plan: Plan) -> None:
        box = _LaneBox(self, lane)
        if plan.load is not None and box.swap_running():
            raise InvalidPlan(f"load {plan.load} while another load or unload runs")
        execute(plan, box, lane.models)
        self._check_budget(lane)

    def begin_swap(self, lane: _Lane, evict: tuple[str, ...], load: str | None,
                   sleep: tuple[str, ...] = ()) -> None:
        for name in evict:
            self._evict(lane.models[name], asleep=name in sleep)
        if load is not None:
            self._load(lane.models[load], after=self.scenario.unload_seconds if evict else 0.0)

    def admit(self, lane: _Lane, name: str) -> None:
        model = lane.models[name]
        if model.state is not State.LOADED:
            raise InvalidPlan(f"admit {model.name} while {model.state}")
        horizon = self._first_other_waiter(lane, model) if self.strict_order else _NEVER
        while model.queue and (model.queue[0].arrival, model.name) < horizon:
            self._lease(model, model.queue.popleft())

    @staticmethod
    def _first_other_waiter(lane: _Lane, model: _Model) -> tuple[float, str]:
        """Arrival of the oldest waiter of another model on the node; the name breaks ties."""
        others = [(m.queue[0].arrival, m.name) for m in lane.models.values() if m.queue]
        return min((o for o in others if o[1] != model.name), default=_NEVER)

    def _evict(self, model: _Model, asleep: bool = False) -> None:
        if model.state is not State.LOADED or model.in_flight:
            raise InvalidPlan(f"evict {model.name}: {model.state}, {model.in_flight} busy")
        if asleep and model.wake_seconds is None:
            raise InvalidPlan(f"sleep {model.name}: it cannot sleep")
        model.state, model.asleep = State.UNLOADING, asleep
        self._at(self.clock + self.scenario.unload_seconds, "unloaded", model.name)

    def _load(self, model: _Model, after: float) -> None:
        if model.state not in (State.UNLOADED, State.FAILED):
            raise InvalidPlan(f"load {model.name} while {model.state}")
        model.state = State.LOADING
        took = model.next_load_seconds
        model.asleep = False
        self.loading_s += took
        self._at(self.clock + after + took, "loaded", model.name)

    def _check_budget(self, lane: _Lane) -> None:
        """Once the evictions finish, what stays and what loads must fit the node's budget."""
        staying = [m.view() for m in lane.models.values() if m.state in _STAYING]
        if not fits_together(staying, lane.node.budget):
            raise InvalidPlan(f"over budget on {lane.node.name}: {[m.name for m in staying]}")
        asleep = host_gb({m.name: m.view() for m in lane.models.values()})
        if asleep > (lane.node.budget.host_memory_gb or math.inf) + 1e-9:
            raise InvalidPlan(f"over the host budget on {lane.node.name}: {asleep:g} GB asleep")


# -- placement: which route a request for a model that has several goes to --------------------


def pinned(routes: list[_Model], lanes: Mapping[str, _Lane], config: BatchingConfig,
           now: float) -> _Model:
    """Each model on its first route only: a fleet of single-box proxies."""
    return routes[0]


def placed(routes: list[_Model], lanes: Mapping[str, _Lane], config: BatchingConfig,
           now: float) -> _Model:
    """The gateway's own placement policy."""
    return routes[place(*_placement_views(routes, lanes, now), config, now).index]


def re_placed(routes: list[_Model], at: int, lanes: Mapping[str, _Lane],
              config: BatchingConfig, now: float) -> _Model | None:
    """The gateway's placement again, for a queue whose load has not begun."""
    moved = move(*_placement_views(routes, lanes, now), config, now, at)
    return None if moved is None else routes[moved.index]


def _placement_views(routes: list[_Model], lanes: Mapping[str, _Lane],
                     now: float) -> tuple[list[RouteOption], dict[str, NodeView]]:
    options = [RouteOption(r.view(now), r.node) for r in routes]
    nodes = {name: NodeView(name, lane.node.budget, lane.views(now), lane.exclusive())
             for name, lane in lanes.items()}
    return options, nodes


def random_placer(seed: int) -> Placer:
    """Where it is resident or on its way, else a random route: placement without the fit and
    the cost, so the difference is what they buy."""
    rng = random.Random(seed)

    def choose(routes: list[_Model], lanes: Mapping[str, _Lane], config: BatchingConfig,
               now: float) -> _Model:
        there = [r for r in routes if r.state in _STAYING or r.queue]
        return there[0] if there else rng.choice(routes)

    return choose


def simulate(
    scenario: Scenario,
    policy: Policy = decide,
    config: BatchingConfig | None = None,
    *,
    strict_order: bool = False,
    placer: Placer | None = None,
    mover: Mover | None = None,
) -> Outcome:
    """Replay the scenario through `policy`; raises InvalidPlan or Stuck on a policy bug."""
    run = _Simulation(scenario, policy, config or BatchingConfig(), strict_order, placer, mover)
    return run.run()


def poisson_trace(
    rng: random.Random, weights: Mapping[str, float], n: int, mean_gap: float
) -> tuple[Request, ...]:
    """Poisson arrivals, each for a model drawn by weight: interleaved, hot-and-rare, mixes."""
    names, shares = list(weights), list(weights.values())
    clock, requests = 0.0, []
    for _ in range(n):
        clock += rng.expovariate(1.0 / mean_gap)
        requests.append(Request(clock, rng.choices(names, shares)[0], _service(rng)))
    return tuple(requests)


def bursty_trace(
    rng: random.Random, names: list[str], bursts: int, burst_size: int, mean_gap: float
) -> tuple[Request, ...]:
    """Bursts of requests for one model (an agent's run) that start by Poisson and overlap."""
    clock, requests = 0.0, []
    for _ in range(bursts):
        clock += rng.expovariate(1.0 / mean_gap)
        name, at = rng.choice(names), clock
        for _ in range(rng.randint(1, burst_size)):
            at += rng.expovariate(2.0)
            requests.append(Request(at, name, _service(rng)))
    return tuple(sorted(requests, key=lambda r: r.arrival))


def shifting_trace(
    rng: random.Random, names: list[str], n: int, mean_gap: float, hot: int = 3,
    phase: int = 100, share: float = 0.9,
) -> tuple[Request, ...]:
    """Poisson arrivals over a working set that shifts: every `phase` requests `hot` models
    become the busy ones (a team moves from one task to the next); `share` of the requests
    are for them, the rest for any model."""
    clock, requests, working = 0.0, [], names[:hot]
    for i in range(n):
        if i % phase == 0:
            working = rng.sample(names, hot)
        clock += rng.expovariate(1.0 / mean_gap)
        name = rng.choice(working) if rng.random() < share else rng.choice(names)
        requests.append(Request(clock, name, _service(rng)))
    return tuple(requests)


def _service(rng: random.Random) -> float:
    """A chat completion of a few hundred tokens."""
    return rng.uniform(1.0, 5.0)


_ABC = (SimModel("A", 4.0), SimModel("B", 9.0), SimModel("C", 15.0))
_HOT = (SimModel("hot", 6.0), SimModel("r1", 10.0), SimModel("r2", 14.0), SimModel("r3", 18.0))
_MIX = (
    SimModel("coder", 12.0, priority="high"),
    SimModel("chat", 5.0),
    SimModel("embed", 2.0, priority="low"),
    SimModel("reason", 20.0),
    SimModel("vision", 9.0, priority="low"),
)
# Multi-active with idle ttls, and a model whose first two loads fail (back-off 5 s, then 10 s).
_TTL = (SimModel("t4", 4.8, size_gb=4, ttl_s=20.0), SimModel("t8", 9.6, size_gb=8, ttl_s=20.0),
        SimModel("flaky", 7.2, size_gb=6, ttl_s=60.0, failing_loads=2))
# Multi-active: a 24 GB card, loads of about 1.2 s per GB.
_SIZED = tuple(SimModel(f"m{gb}", round(1.2 * gb, 1), size_gb=gb) for gb in (4, 6, 8, 10, 12, 16))


def scenarios(seed: int, n: int) -> list[Scenario]:
    """The benchmark's traces; `interleaved` ones carry the issue's targets."""
    rng = random.Random(seed)
    uniform = dict.fromkeys("ABC", 1.0)
    mix_weights = {"coder": 0.3, "chat": 0.3, "embed": 0.15, "reason": 0.15, "vision": 0.1}
    return [
        Scenario("interleaved A/B/C, dense (3 s)", _ABC, poisson_trace(rng, uniform, n, 3.0)),
        Scenario("interleaved A/B/C, busy (5 s)", _ABC, poisson_trace(rng, uniform, n, 5.0)),
        Scenario("interleaved A/B/C, light (10 s)", _ABC, poisson_trace(rng, uniform, n, 10.0)),
        Scenario("bursty agent runs", _ABC, bursty_trace(rng, ["A", "B", "C"], n // 5, 9, 15.0)),
        Scenario(
            "one hot + three rare",
            _HOT,
            poisson_trace(rng, {"hot": 0.85, "r1": 0.05, "r2": 0.05, "r3": 0.05}, n, 4.0),
        ),
        Scenario("poisson mix, priorities", _MIX, poisson_trace(rng, mix_weights, n, 4.0)),
        Scenario(
            "multi-active 24 GB, 6 models",
            _SIZED,
            poisson_trace(rng, {m.name: 1.0 for m in _SIZED}, n, 3.0),
            budget=Budget(memory_gb=24.0),
        ),
        Scenario(
            "ttl 20-60 s, a flaky load, 12 GB",
            _TTL,
            poisson_trace(rng, {m.name: 1.0 for m in _TTL}, n, 8.0),
            budget=Budget(memory_gb=12.0),
        ),
    ]


_RUNS: dict[str, tuple[Policy, bool]] = {
    "fifo": (decide_fifo, True),
    "fifo-collated": (decide_fifo, False),
    "decide": (decide, False),
}


def compare(scenario: Scenario, config: BatchingConfig) -> dict[str, Outcome]:
    """FIFO in arrival order (Ollama, llama-swap), FIFO collating each model's queue, decide."""
    return {
        label: simulate(scenario, policy, config, strict_order=strict)
        for label, (policy, strict) in _RUNS.items()
    }


_COLUMNS = ("swaps", "mean s", "p50 s", "p99 s", "p99 wait", "max wait", "makespan")


def _figures(outcome: Outcome) -> tuple[float, ...]:
    return (
        outcome.swaps,
        outcome.mean_latency,
        outcome.p50_latency,
        outcome.p99_latency,
        outcome.p99_wait,
        outcome.max_wait,
        outcome.makespan,
    )


def table(results: Mapping[str, Mapping[str, Outcome]]) -> str:
    """A markdown table: each run's figures, then decide's ratios to both FIFOs."""
    return _ratio_table(results, "scenario", _COLUMNS, _figures,
                        ("decide", "decide"), ("fifo", "fifo-collated"))


def _ratio_table(results: Mapping[str, Mapping[str, Outcome]], heading: str,
                 columns: tuple[str, ...], figures: Callable[[Outcome], tuple[float, ...]],
                 run: tuple[str, str], bases: tuple[str, ...]) -> str:
    """Each run's figures, then `run`'s (its label, its short name) ratios to each base."""
    label, short = run
    lines = [
        f"| {heading} | run | " + " | ".join(columns) + " |",
        "|---|---|" + "---:|" * len(columns),
    ]
    for name, runs in results.items():
        for each, outcome in runs.items():
            lines.append(_row(name, each, [f"{x:.0f}" for x in figures(outcome)]))
        for base in bases:
            ratios = map(_ratio, figures(runs[label]), figures(runs[base]))
            lines.append(_row(name, f"{short} / {base}", [f"{r:.2f}" for r in ratios]))
    return "\n".join(lines)


def _row(scenario: str, label: str, cells: list[str]) -> str:
    return f"| {scenario} | {label} | " + " | ".join(cells) + " |"


def _ratio(value: float, base: float) -> float:
    return value / base if base else math.nan


def targets(results: Mapping[str, Mapping[str, Outcome]], config: BatchingConfig) -> str:
    """The issue's goals, on the interleaved traces, for decide against FIFO in arrival order."""
    bound = config.max_wait_ms / 1000 + max(m.load_seconds for m in _ABC)
    lines = []
    for name, runs in results.items():
        if name.startswith("interleaved"):
            checks = _target_checks(runs["decide"], runs["fifo"], bound)
            marks = ", ".join(f"{text} {'ok' if ok else 'MISSED'}" for text, ok in checks.items())
            lines.append(f"- {name}: {marks}")
    return "\n".join(lines)


def _target_checks(policy: Outcome, fifo: Outcome, bound: float) -> dict[str, bool]:
    """Swaps <= 1/3 and mean latency <= 1/2 of FIFO's, p99 wait <= max_wait + one load."""
    swaps, mean = policy.swaps / fifo.swaps, policy.mean_latency / fifo.mean_latency
    return {
        f"swaps {swaps:.2f} <= 0.33": swaps <= 1 / 3,
        f"mean latency {mean:.2f} <= 0.50": mean <= 0.5,
        f"p99 wait {policy.p99_wait:.0f} s <= {bound:.0f} s": policy.p99_wait <= bound,
    }


# -- fleets -------------------------------------------------------------------------------------

# The two machines: a 20 GB GPU server (three models at once) beside a 64 GB Mac with a
# 56 GB budget (one model at a time, loads 1.5x slower). Loads of about 1 s per GB on the GPU.
# Each model's first route is the node it would be pinned to; the 70B model fits the Mac alone.
_GPU = SimNode("gpu", Budget(max_models=3, memory_gb=20.0))
_MAC = SimNode("mac", Budget(max_models=1, memory_gb=56.0), load_factor=1.5)
_PAIR = (
    SimModel("chat-8b", 6.0, size_gb=6, routes=("gpu", "mac")),
    SimModel("coder-14b", 10.0, size_gb=10, priority="high", routes=("gpu", "mac")),
    SimModel("vision-11b", 8.0, size_gb=8, routes=("gpu", "mac")),
    SimModel("embed", 1.0, size_gb=1, priority="low", routes=("gpu", "mac")),
    SimModel("reason-32b", 20.0, size_gb=20, routes=("mac", "gpu")),
    SimModel("llama-70b", 40.0, size_gb=42, routes=("mac",)),
)
# Two nodes with room for a working set but not for every model: a 24 GB GPU server and a
# Mac with 48 GB for models (three at once, loads 1.5x slower); eight models of 6-12 GB, half
# pinned to each node, each with a route on the other.
_GPU24 = SimNode("gpu", Budget(max_models=3, memory_gb=24.0))
_MAC48 = SimNode("mac", Budget(max_models=3, memory_gb=48.0), load_factor=1.5)
_EIGHT = tuple(
    SimModel(f"m{i}-{gb}gb", float(gb), size_gb=gb,
             routes=("gpu", "mac") if i % 2 == 0 else ("mac", "gpu"))
    for i, gb in enumerate((6, 8, 10, 12, 6, 8, 10, 12)))
# The two machines again, the GPU server running vLLM with sleep mode and 64 GB of
# host RAM for sleeping models: a wake takes a tenth of a cold start (at least a second).
_GPU_SLEEP = SimNode("gpu", Budget(max_models=3, memory_gb=20.0, host_memory_gb=64.0),
                     sleeps=True)
_PAIR_SLEEP = tuple(replace(m, wake_seconds=max(1.0, round(m.load_seconds / 10, 1)))
                    for m in _PAIR)
# Three nodes, nine models: two GPU servers and the Mac.
_GPU_A = SimNode("gpu-a", Budget(max_models=3, memory_gb=24.0))
_GPU_B = SimNode("gpu-b", Budget(max_models=2, memory_gb=16.0), load_factor=1.2)
_TRIO = (
    SimModel("chat-8b", 6.0, size_gb=6, routes=("gpu-a", "gpu-b", "mac")),
    SimModel("coder-14b", 10.0, size_gb=10, priority="high", routes=("gpu-a", "mac")),
    SimModel("sql-7b", 5.0, size_gb=5, routes=("gpu-a", "gpu-b")),
    SimModel("embed", 1.0, size_gb=1, priority="low", routes=("gpu-a", "gpu-b")),
    SimModel("vision-11b", 8.0, size_gb=8, routes=("gpu-b", "gpu-a")),
    SimModel("math-7b", 5.0, size_gb=5, routes=("gpu-b", "mac")),
    SimModel("rerank", 1.0, size_gb=1, priority="low", routes=("gpu-b", "gpu-a")),
    SimModel("reason-32b", 20.0, size_gb=20, routes=("mac", "gpu-a")),
    SimModel("llama-70b", 40.0, size_gb=42, routes=("mac",)),
)


def fleet_scenarios(seed: int, n: int) -> list[Scenario]:
    """Fleet traces: the single-node shapes (interleaved at three rates, bursty) on 2-3 nodes."""
    rng = random.Random(seed)
    pair = {m.name: 1.0 for m in _PAIR}
    trio = {"chat-8b": 3, "coder-14b": 2, "sql-7b": 1, "embed": 2, "vision-11b": 1,
            "math-7b": 1, "rerank": 1, "reason-32b": 1, "llama-70b": 0.5}
    fleet2, fleet3, duo = (_GPU, _MAC), (_GPU_A, _GPU_B, _MAC), (_GPU24, _MAC48)
    names, eight = [m.name for m in _PAIR], [m.name for m in _EIGHT]
    return [
        Scenario("2 nodes, 6 models, dense (2 s)", _PAIR, poisson_trace(rng, pair, n, 2.0),
                 nodes=fleet2),
        Scenario("2 nodes, 6 models, busy (4 s)", _PAIR, poisson_trace(rng, pair, n, 4.0),
                 nodes=fleet2),
        Scenario("2 nodes, 6 models, light (10 s)", _PAIR, poisson_trace(rng, pair, n, 10.0),
                 nodes=fleet2),
        Scenario("2 nodes, bursty agent runs", _PAIR, bursty_trace(rng, names, n // 5, 9, 12.0),
                 nodes=fleet2),
        Scenario("2 nodes, 8 models, shifting set, dense (2 s)", _EIGHT,
                 shifting_trace(rng, eight, n, 2.0), nodes=duo),
        Scenario("2 nodes, 8 models, shifting set, busy (4 s)", _EIGHT,
                 shifting_trace(rng, eight, n, 4.0), nodes=duo),
        Scenario("2 nodes, GPU sleeps, dense (2 s)", _PAIR_SLEEP,
                 poisson_trace(rng, pair, n, 2.0), nodes=(_GPU_SLEEP, _MAC)),
        Scenario("2 nodes, GPU sleeps, busy (4 s)", _PAIR_SLEEP,
                 poisson_trace(rng, pair, n, 4.0), nodes=(_GPU_SLEEP, _MAC)),
        Scenario("3 nodes, 9 models, dense (1.5 s)", _TRIO, poisson_trace(rng, trio, n, 1.5),
                 nodes=fleet3),
        Scenario("3 nodes, 9 models, busy (3 s)", _TRIO, poisson_trace(rng, trio, n, 3.0),
                 nodes=fleet3),
    ]


def fleet_runs(seed: int) -> dict[str, tuple[Policy, Placer, Mover | None]]:
    """Pinned + fifo-collated (what single-box proxies run), random placement, the gateway."""
    return {
        "pinned fifo-collated": (decide_fifo, pinned, None),
        "pinned decide": (decide, pinned, None),
        "random decide": (decide, random_placer(seed), None),
        "placed decide": (decide, placed, re_placed),
    }


def compare_fleet(scenario: Scenario, config: BatchingConfig, seed: int) -> dict[str, Outcome]:
    return {label: simulate(scenario, policy, config, placer=placer, mover=mover)
            for label, (policy, placer, mover) in fleet_runs(seed).items()}


_FLEET_COLUMNS = ("swaps", "loading s", "mean wait", "p99 wait", "max wait", "mean s", "p99 s",
                  "makespan")


def _fleet_figures(outcome: Outcome) -> tuple[float, ...]:
    return (outcome.swaps, outcome.loading_s, outcome.mean_wait, outcome.p99_wait,
            outcome.max_wait, outcome.mean_latency, outcome.p99_latency, outcome.makespan)


def fleet_table(results: Mapping[str, Mapping[str, Outcome]]) -> str:
    """Each run's figures, then the gateway's ratios to pinned fifo-collated and to random."""
    return _ratio_table(results, "fleet trace", _FLEET_COLUMNS, _fleet_figures,
                        ("placed decide", "placed"), ("pinned fifo-collated", "random decide"))


def fleet_targets(results: Mapping[str, Mapping[str, Outcome]], config: BatchingConfig) -> str:
    """The issue's goals on the dense and busy fleet traces, against pinned fifo-collated:
    30 % less time loading, half the p99 wait, and no starvation (p99 <= max_wait + a load)."""
    lines = []
    for scenario in fleet_scenarios(0, 1):
        if "dense" not in scenario.name and "busy" not in scenario.name:
            continue
        runs = results[scenario.name]
        ours, base = runs["placed decide"], runs["pinned fifo-collated"]
        bound = config.max_wait_ms / 1000 + _longest_load(scenario)
        loading, p99 = ours.loading_s / base.loading_s, ours.p99_wait / base.p99_wait
        checks = {f"loading {loading:.2f} <= 0.70": loading <= 0.7,
                  f"p99 wait {p99:.2f} <= 0.50": p99 <= 0.5,
                  f"p99 wait {ours.p99_wait:.0f} s <= {bound:.0f} s": ours.p99_wait <= bound}
        marks = ", ".join(f"{text} {'ok' if ok else 'MISSED'}" for text, ok in checks.items())
        lines.append(f"- {scenario.name}: {marks}")
    return "\n".join(lines)


def _longest_load(scenario: Scenario) -> float:
    factors = {node.name: node.load_factor for node in scenario.fleet()}
    return max(m.load_seconds * max(factors[n] for n in m.routes or factors)
               for m in scenario.models)


# -- what any policy must pay, and the best fixed assignment --------------------------------------


def cold_start_waits(scenario: Scenario) -> tuple[float, ...]:
    """What each request must wait under any policy that loads on demand, the fleet empty at
    the start: a model's load begins at its first request at the earliest and takes its
    quickest route's load, so every request for it before that load ends waits until then."""
    factors = {node.name: node.load_factor for node in scenario.fleet()}
    ready = {}
    for request in scenario.requests:
        if request.model not in ready:
            spec = next(m for m in scenario.models if m.name == request.model)
            ready[spec.name] = request.arrival + min(
                spec.load_seconds * factors[n] for n in spec.routes or factors)
    return tuple(max(0.0, ready[r.model] - r.arrival) for r in scenario.requests)


def fixed_assignments(scenario: Scenario, config: BatchingConfig) -> dict[tuple[str, ...], Outcome]:
    """Every assignment of each model to one of its routes, each node running `decide`: the
    best of them is the best a policy that never moves a model could do, knowing the trace."""
    nodes = [node.name for node in scenario.fleet()]
    choices = [m.routes or tuple(nodes) for m in scenario.models]
    runs = {}
    for assignment in itertools.product(*choices):
        where = {m.name: node for m, node in zip(scenario.models, assignment, strict=True)}

        def fixed(routes: list[_Model], lanes: Mapping[str, _Lane], config: BatchingConfig,
                  now: float, where: dict[str, str] = where) -> _Model:
            return next(r for r in routes if r.node == where[r.spec.name])

        runs[assignment] = simulate(scenario, decide, config, placer=fixed)
    return runs


def bound_table(seed: int, n: int, config: BatchingConfig) -> str:
    """Per dense and busy fleet trace: the goal, the cold-start bound on the p99 wait, the best
    fixed assignment found by trying them all, and placement; times in seconds."""
    lines = ["| fleet trace | goal: p99 wait, loading | cold-start p99 bound | best fixed: p99 "
             "wait, loading, both goals met by one | placed: p99 wait, loading |",
             "|---|---|---:|---|---|"]
    for scenario in fleet_scenarios(seed, n):
        if "dense" not in scenario.name and "busy" not in scenario.name:
            continue
        base = simulate(scenario, decide_fifo, config, placer=pinned)
        ours = simulate(scenario, decide, config, placer=placed, mover=re_placed)
        p99_goal, loading_goal = 0.5 * base.p99_wait, 0.7 * base.loading_s
        fixed = fixed_assignments(scenario, config).values()
        both = any(o.p99_wait <= p99_goal and o.loading_s <= loading_goal for o in fixed)
        lines.append(
            f"| {scenario.name} | {p99_goal:.1f}, {loading_goal:.0f} | "
            f"{percentile(cold_start_waits(scenario), 99):.1f} | "
            f"{min(o.p99_wait for o in fixed):.1f}, {min(o.loading_s for o in fixed):.0f}, "
            f"{'yes' if both else 'no'} | {ours.p99_wait:.1f}, {ours.loading_s:.0f} |")
    return "\n".join(lines)


def collated_summary(results: Mapping[str, Mapping[str, Outcome]]) -> str:
    """Single node, decide against fifo-collated (llama-swap's real order): the range of
    swaps and mean latency ratios, and the traces where the window buys nothing."""
    swaps = {n: r["decide"].swaps / r["fifo-collated"].swaps for n, r in results.items()}
    means = {n: r["decide"].mean_latency / r["fifo-collated"].mean_latency
             for n, r in results.items()}
    p99 = {n: r["decide"].p99_wait / r["fifo-collated"].p99_wait for n, r in results.items()}
    flat = [n for n in results if means[n] > 0.95]
    return "\n".join([
        f"- swaps {min(swaps.values()):.2f}-{max(swaps.values()):.2f}, mean latency "
        f"{min(means.values()):.2f}-{max(means.values()):.2f}, p99 wait "
        f"{min(p99.values()):.2f}-{max(p99.values()):.2f} of fifo-collated's",
        f"- little or nothing gained (mean latency > 0.95): {', '.join(flat) or 'none'}",
    ])


def main(argv: list[str] | None = None) -> None:
    defaults = BatchingConfig()
    parser = argparse.ArgumentParser(description="Swap scheduling: decide against FIFO on traces.")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--requests", type=int, default=600, help="per trace")
    parser.add_argument("--window-ms", type=float, default=defaults.window_ms)
    parser.add_argument("--max-wait-ms", type=float, default=defaults.max_wait_ms)
    parser.add_argument("--min-residency-ms", type=float, default=defaults.min_residency_ms)
    parser.add_argument("--burst-gap-ms", type=float, default=defaults.burst_gap_ms)
    parser.add_argument("--bound", action="store_true",
                        help="only the fleet goals against what any policy must pay and the "
                             "best fixed assignment (minutes: every assignment is run)")
    args = parser.parse_args(argv)
    config = BatchingConfig(args.window_ms, args.max_wait_ms, args.min_residency_ms,
                            args.burst_gap_ms)
    if args.bound:
        print(bound_table(args.seed, args.requests, config))
        return
    results = {s.name: compare(s, config) for s in scenarios(args.seed, args.requests)}
    print(f"seed {args.seed}, {args.requests} requests per trace, {config}\n")
    print(table(results))
    print("\nTargets (decide against FIFO in arrival order):")
    print(targets(results, config))
    print("\nAgainst fifo-collated (a model's whole queue per swap, as llama-swap serves it):")
    print(collated_summary(results))
    fleet = {s.name: compare_fleet(s, config, args.seed)
             for s in fleet_scenarios(args.seed, args.requests)}
    print("\nFleets: placement + per-node lanes against each model pinned to one node\n")
    print(fleet_table(fleet))
    print("\nTargets (placed decide against pinned fifo-collated):")
    print(fleet_targets(fleet, config))


if __name__ == "__main__":
    main()
