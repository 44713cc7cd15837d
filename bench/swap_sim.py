"""Swap scheduling on request traces: the product's own policies against a simulated clock.

A discrete-event simulation of one GPU box: requests arrive, wait in per-model queues, are served
`slots` at a time by a loaded model, and models load one at a time (an unload first costs
`unload_seconds`). On every instant with events the simulator builds the same ModelView snapshot
the gateway builds, calls the policy, and carries out the Plan with the executor the gateway's
scheduler uses (`policies.execution`). Idle ttls and the back-off after a failed load are the
policy's too, so traces with them replay the gateway's own rules.

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
from dataclasses import dataclass, field

from policies.backoff import retry_delay
from policies.eviction import fits_together
from policies.execution import execute
from policies.scheduling import decide, decide_fifo
from policies.types import BatchingConfig, Budget, ModelView, Plan, State

_STAYING = (State.LOADED, State.LOADING)
_MOVING = (State.LOADING, State.UNLOADING)
_NEVER = (math.inf, "")

Policy = Callable[[Mapping[str, ModelView], Budget, BatchingConfig, float], Plan]


@dataclass(frozen=True)
class SimModel:
    name: str
    load_seconds: float
    size_gb: float = 1.0
    priority: str = "normal"
    ttl_s: float = 0.0  # unloaded after this long idle; 0 = never
    failing_loads: int = 0  # its first loads fail (a backend still starting, say)


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
    budget: Budget = Budget(max_models=1)
    slots: int = 4  # requests one loaded model serves at once; more wait inside the backend
    unload_seconds: float = 1.0


@dataclass(frozen=True)
class Outcome:
    swaps: int
    waits: tuple[float, ...]  # enqueue to lease
    latencies: tuple[float, ...]  # arrival to completion
    makespan: float

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
    spec: SimModel
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

    @property
    def in_flight(self) -> int:
        return self.running + len(self.backlog)

    def view(self) -> ModelView:
        return ModelView(
            name=self.spec.name,
            state=self.state,
            size_gb=self.spec.size_gb,
            priority=self.spec.priority,
            in_flight=self.in_flight,
            queued=len(self.queue),
            oldest_wait_since=self.queue[0].arrival if self.queue else None,
            loaded_at=self.loaded_at,
            last_used=self.last_used,
            admitting=self.admitting,
            load_seconds=self.spec.load_seconds,
            retry_at=self.retry_at if self.state is State.FAILED else None,
            ttl_s=self.spec.ttl_s,
        )


class _Simulation:
    """One run over a scenario.

    `strict_order` releases only the waiters ahead of every other model's oldest waiter, the way
    Ollama's pending queue and llama-swap's swap lock serve requests (ABAB loads four times).
    """

    def __init__(
        self, scenario: Scenario, policy: Policy, config: BatchingConfig, strict_order: bool
    ) -> None:
        self.scenario = scenario
        self.policy = policy
        self.config = config
        self.strict_order = strict_order
        self.models = {m.name: _Model(m) for m in scenario.models}
        self.events: list[tuple[float, int, str, str, Request | None]] = []
        self.seq = itertools.count()
        self.wakes: set[float] = set()
        self.clock = 0.0
        self.swaps = 0
        self.failed_loads = 0
        self.waits: list[float] = []
        self.latencies: list[float] = []
        self.last_done = 0.0

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
        return Outcome(self.swaps, tuple(self.waits), tuple(self.latencies), self.last_done - first)

    def _at(self, time: float, kind: str, name: str = "", request: Request | None = None) -> None:
        heapq.heappush(self.events, (time, next(self.seq), kind, name, request))

    def _handle(self, kind: str, name: str, request: Request | None) -> None:
        if kind == "wake":
            return
        model = self.models[name]
        if request is not None:
            (self._arrive if kind == "arrive" else self._finish)(model, request)
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

    def _arrive(self, model: _Model, request: Request) -> None:
        behind = self.strict_order and any(m.queue for m in self.models.values())
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
        self._at(self.clock + request.service, "done", model.spec.name, request)

    def _finish(self, model: _Model, request: Request) -> None:
        self.latencies.append(self.clock - request.arrival)
        self.last_done = self.clock
        model.running -= 1
        model.last_used = self.clock
        if model.backlog:
            self._start(model, model.backlog.popleft())

    def _decide(self) -> None:
        views = {name: m.view() for name, m in self.models.items()}
        plan = self.policy(views, self.scenario.budget, self.config, self.clock)
        newly_drained = [self.models[n] for n in plan.drain if self.models[n].admitting]
        self._execute(plan)
        if any(not m.in_flight for m in newly_drained):
            # Strict order held its waiters back, so no lease release will come to wake us.
            self._at(self.clock, "wake")
        if plan.wake_at is not None and plan.wake_at not in self.wakes:
            if plan.wake_at <= self.clock:
                raise InvalidPlan(f"wake_at {plan.wake_at} is not after now ({self.clock})")
            self.wakes.add(plan.wake_at)
            self._at(plan.wake_at, "wake")

    def _execute(self, plan: Plan) -> None:
        if plan.load is not None and self.swap_running():
            raise InvalidPlan(f"load {plan.load} while another load or unload runs")
        execute(plan, self, self.models)
        self._check_budget()

    # The executor's side of a plan (policies.execution.Box).

    def set_admitting(self, name: str, admitting: bool) -> None:
        self.models[name].admitting = admitting

    def swap_running(self) -> bool:
        return any(m.state in _MOVING for m in self.models.values())

    def begin_swap(self, evict: tuple[str, ...], load: str | None, reason: str) -> None:
        """Unload the victims, then load once they are gone."""
        for name in evict:
            self._evict(self.models[name])
        if load is not None:
            self._load(self.models[load], after=self.scenario.unload_seconds if evict else 0.0)

    def admit(self, name: str) -> None:
        model = self.models[name]
        if model.state is not State.LOADED:
            raise InvalidPlan(f"admit {model.spec.name} while {model.state}")
        horizon = self._first_other_waiter(model) if self.strict_order else _NEVER
        while model.queue and (model.queue[0].arrival, model.spec.name) < horizon:
            self._lease(model, model.queue.popleft())

    def _first_other_waiter(self, model: _Model) -> tuple[float, str]:
        """Arrival of the oldest waiter of another model; the name breaks ties of arrival."""
        others = [(m.queue[0].arrival, m.spec.name) for m in self.models.values() if m.queue]
        return min((o for o in others if o[1] != model.spec.name), default=_NEVER)

    def _evict(self, model: _Model) -> None:
        if model.state is not State.LOADED or model.in_flight:
            raise InvalidPlan(f"evict {model.spec.name}: {model.state}, {model.in_flight} busy")
        model.state = State.UNLOADING
        self._at(self.clock + self.scenario.unload_seconds, "unloaded", model.spec.name)

    def _load(self, model: _Model, after: float) -> None:
        if model.state not in (State.UNLOADED, State.FAILED):
            raise InvalidPlan(f"load {model.spec.name} while {model.state}")
        model.state = State.LOADING
        self._at(self.clock + after + model.spec.load_seconds, "loaded", model.spec.name)

    def _check_budget(self) -> None:
        """Once the evictions finish, what stays and what loads must fit the budget."""
        staying = [m.view() for m in self.models.values() if m.state in _STAYING]
        if not fits_together(staying, self.scenario.budget):
            raise InvalidPlan(f"over budget: {[m.name for m in staying]}")


def simulate(
    scenario: Scenario,
    policy: Policy = decide,
    config: BatchingConfig | None = None,
    *,
    strict_order: bool = False,
) -> Outcome:
    """Replay the scenario through `policy`; raises InvalidPlan or Stuck on a policy bug."""
    return _Simulation(scenario, policy, config or BatchingConfig(), strict_order).run()


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
    lines = [
        "| scenario | run | " + " | ".join(_COLUMNS) + " |",
        "|---|---|" + "---:|" * len(_COLUMNS),
    ]
    for name, runs in results.items():
        for label, outcome in runs.items():
            lines.append(_row(name, label, [f"{x:.0f}" for x in _figures(outcome)]))
        for base in ("fifo", "fifo-collated"):
            ratios = map(_ratio, _figures(runs["decide"]), _figures(runs[base]))
            lines.append(_row(name, f"decide / {base}", [f"{r:.2f}" for r in ratios]))
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


def main(argv: list[str] | None = None) -> None:
    defaults = BatchingConfig()
    parser = argparse.ArgumentParser(description="Swap scheduling: decide against FIFO on traces.")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--requests", type=int, default=600, help="per trace")
    parser.add_argument("--window-ms", type=float, default=defaults.window_ms)
    parser.add_argument("--max-wait-ms", type=float, default=defaults.max_wait_ms)
    parser.add_argument("--min-residency-ms", type=float, default=defaults.min_residency_ms)
    parser.add_argument("--burst-gap-ms", type=float, default=defaults.burst_gap_ms)
    args = parser.parse_args(argv)
    config = BatchingConfig(args.window_ms, args.max_wait_ms, args.min_residency_ms,
                            args.burst_gap_ms)
    results = {s.name: compare(s, config) for s in scenarios(args.seed, args.requests)}
    print(f"seed {args.seed}, {args.requests} requests per trace, {config}\n")
    print(table(results))
    print("\nTargets (decide against FIFO in arrival order):")
    print(targets(results, config))


if __name__ == "__main__":
    main()
