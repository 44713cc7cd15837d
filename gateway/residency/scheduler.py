"""The scheduler: leases on models, and the swaps that serve the queues.

Every request asks `request(model)`: a model that admits gets a `Lease` at once; any other
request becomes a `Waiter` in its model's queue (see `admission`). On every event (enqueue,
release, load done, timer) the scheduler snapshots each node's models, asks the pure policy
(`policies.scheduling.decide`) for that node's plan against that node's budget, carries it out
with the executor the simulator shares (`policies.execution`) and does the swap's I/O. One swap
runs at a time per node, on its lane (see `nodes`); different nodes swap at once.

Replicas sharing a node (see `coordination`) swap under that node's lock, reconcile before
they swap, and hold a model another replica is draining (see `reconcile`).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import AsyncIterator, Callable, Collection, Coroutine, Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any

import structlog

from gateway.config.catalog import Catalog
from gateway.config.schema import GatewayConfig, ModelConfig
from gateway.errors import GatewayError
from gateway.relay.proxy import Target
from gateway.residency import tasks
from gateway.residency.adapters import Adapters, SessionFor
from gateway.residency.admission import (
    HOLD_S,
    Admission,
    Lease,
    Slot,
    Waiter,
    load_failed,
    queue_full,
    shutting_down,
    swap_timeout,
    too_large,
    unavailable,
)
from gateway.residency.coordination import Coordinator, LocalCoordinator
from gateway.residency.decisions import Decision, DecisionLog
from gateway.residency.drivers.base import Driver, DriverError
from gateway.residency.memory import Meter, book_for
from gateway.residency.nodes import Lane, lanes_for
from gateway.residency.reconcile import Truth
from gateway.residency.snapshot import DecisionStatus, ModelStatus, NodeStatus, SchedulerStatus
from gateway.residency.state import Residency
from policies.backoff import retry_delay
from policies.eviction import fits_at_all
from policies.execution import execute
from policies.scheduling import decide, idle_changes_plan
from policies.tiers import host_gb, sleepers
from policies.types import ModelView, State

log = structlog.get_logger("gateway.scheduler")

RECONCILE_INTERVAL_S = 10.0
DRAIN_WAIT_S = 5.0  # for other replicas' requests on a victim; then the swap is deferred


class Scheduler:
    def __init__(self, config: GatewayConfig, catalog: Catalog, drivers: Mapping[str, Driver],
                 sessions: SessionFor, clock: Callable[[], float] = time.monotonic,
                 coordinator: Coordinator | None = None,
                 jitter: Callable[[], float] = random.random) -> None:
        """`sessions`: each backend's HTTP session, for the adapters' registrations."""
        self.coordinator: Coordinator = coordinator or LocalCoordinator()
        self.clock = clock
        self.adapters = Adapters(sessions, clock)
        self.jitter = jitter  # spreads the Retry-After of refused clients
        self.slots: dict[str, Slot] = {}
        self.truth = Truth(self.slots, clock, self.wake, self._spawn)
        self.decisions = DecisionLog(lambda name: self.slots[name].request_count)
        self.steps = 0  # decisions taken: with nothing happening, this stands still
        self._wake = asyncio.Event()
        self._wake_at: float | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._closing = False
        self.lanes: dict[str, Lane] = {}  # one per node: its budget and its swap lane
        self.meter = Meter(book_for(config))  # what models really hold, kept across restarts
        self.on_loaded: Callable[[str, float], None] | None = None  # (model, seconds), metrics
        # Another route for a placed model whose load failed (route choice sets it), or None.
        self.reroute: Callable[[ModelConfig], ModelConfig | None] | None = None
        # Where a placed model's queue on a route whose load has not begun goes now (route
        # choice sets it), or None to stay.
        self.move: Callable[[ModelConfig], ModelConfig | None] | None = None
        self.apply(config, catalog, drivers)

    def apply(self, config: GatewayConfig, catalog: Catalog,
              drivers: Mapping[str, Driver]) -> None:
        """Take a (re)loaded config: new models get a slot, kept ones keep their state."""
        self.config, self.catalog, self.drivers = config, catalog, drivers
        managed = {name for name, driver in drivers.items() if driver.manages_residency}
        self.lanes = lanes_for(config, managed, self.lanes)
        models = {model.name: model for model in catalog.all_models()}
        for name in set(self.slots) - set(models):
            del self.slots[name]  # a reload removes only models not in use
        for name, model in models.items():
            slot = self.slots.get(name)
            if slot is None:
                slot = self.slots[name] = Slot(Residency(model), drivers[model.backend])
                slot.measured = self.meter.recall(model)
                slot.idle.set()
                if not slot.managed and model.adapter_of is None:
                    slot.residency.found(self.clock(), time.time())
            slot.residency.model, slot.driver = model, drivers[model.backend]
            slot.node = config.node_of(model.backend)
        self.wake()

    def in_use(self) -> dict[str, bool]:
        """Per model: resident (for a managed model), queued for or serving requests."""
        busy_states = (State.LOADED, State.LOADING, State.UNLOADING)
        return {
            name: bool(slot.queue) or slot.in_flight > 0
            or (slot.managed and slot.residency.state in busy_states)
            for name, slot in self.slots.items()
        }

    # -- the request path -------------------------------------------------------------------

    def request(self, model: ModelConfig, *, counted: bool = True) -> Lease | Waiter:
        """A lease at once if the model admits, else a place in its queue (or 429/503).

        `counted`: an API call, counted in the model's request_count (an admin load is not).
        """
        if self._closing:
            raise shutting_down()
        if model.adapter_of is not None:
            return self._request_adapter(model, counted)
        slot = self.slots[model.name]
        now = self.clock()
        if counted:
            slot.rate.arrived(now)
        if slot.ready:
            return self._grant(slot, now, counted)
        self._refuse_impossible(slot, now)
        self._refuse_when_full(slot, now)
        waiter = Waiter(model.name, now, asyncio.get_running_loop().create_future(), counted)
        slot.queue.append(waiter)
        self.wake()
        return waiter

    async def wait(self, waiter: Waiter, timeout_s: float | None = None) -> Lease:
        """The lease for a queued request; 503 after the swap timeout. Cancel-safe."""
        timeout_s = timeout_s or self.config.swapper.model_swap_timeout
        try:
            async with asyncio.timeout(timeout_s):
                return await asyncio.shield(waiter.future)
        except TimeoutError:
            raise self.gave_up(waiter, timeout_s) from None
        except asyncio.CancelledError:
            self.abandon(waiter)
            raise

    def gave_up(self, waiter: Waiter, waited_s: float) -> GatewayError:
        """A waiter whose deadline passed leaves the queue; the 503 says when to come back."""
        self.abandon(waiter)
        wait_s = self.slots[waiter.model].expected_wait_s(self.clock())
        return swap_timeout(waiter.model, waited_s, wait_s, self.jitter())

    async def acquire(self, model: ModelConfig, timeout_s: float | None = None, *,
                      counted: bool = True) -> Lease:
        ticket = self.request(model, counted=counted)
        return ticket if isinstance(ticket, Lease) else await self.wait(ticket, timeout_s)

    def leased(self, model: ModelConfig, timeout_s: float | None = None) -> Leased:
        """A lease for the span of one block: for calls whose answer is read whole."""
        return Leased(self, model, timeout_s)

    def _request_adapter(self, model: ModelConfig, counted: bool) -> Lease | Waiter:
        """A LoRA adapter's call is its base's demand (see `adapters`): a lease on the base,
        taken as the adapter's once the adapter is registered on the base's residency."""
        adapter, base = self.slots[model.name], self.slots[model.adapter_of or ""]
        now = self.clock()
        _refuse_backing_off(adapter, now)  # vLLM refused it: it backs off like a failed load
        if counted:
            adapter.rate.arrived(now)
            base.rate.arrived(now)  # the base's demand, as placement and the policy see it
        ticket = self.request(base.model, counted=False)
        if isinstance(ticket, Waiter):
            ticket.adapter, ticket.counted = model.name, counted
            return ticket
        if self.adapters.ready(adapter, base):
            return self._adapter_lease(adapter, ticket, now, counted)
        waiter = Waiter(base.model.name, now, asyncio.get_running_loop().create_future(),
                        counted, adapter=model.name)
        self._spawn(self._adapt(waiter, ticket))
        return waiter

    async def _adapt(self, waiter: Waiter, base_lease: Lease) -> None:
        """Register the waiter's adapter on its base, then hand it the adapter's lease."""
        adapter, base = self.slots[waiter.adapter or ""], self.slots[waiter.model]
        try:
            await self.adapters.register(adapter, base, base_lease.target.base_url)
        except DriverError as exc:
            base_lease.release()
            r = adapter.residency
            if not waiter.future.done():
                waiter.future.set_exception(load_failed(
                    adapter.model.name, str(exc), (r.retry_at or 0) - self.clock(), r.retryable))
            return
        except BaseException:  # the gateway is stopping
            base_lease.release()
            if not waiter.future.done():
                waiter.future.set_exception(shutting_down())
            raise
        if waiter.future.done():  # its client left meanwhile
            base_lease.release()
        else:
            waiter.future.set_result(
                self._adapter_lease(adapter, base_lease, self.clock(), waiter.counted))

    def _adapter_lease(self, adapter: Slot, base_lease: Lease, now: float,
                       counted: bool) -> Lease:
        adapter.leased(now, counted)
        target = replace(base_lease.target, served_name=adapter.model.served_name)

        def release() -> None:
            base_lease.release()
            adapter.released(self.clock(), now)

        return Lease(target, release)

    def queue_depth(self, name: str) -> int:
        return len(self.slots[name].queue)

    def _refuse_impossible(self, slot: Slot, now: float) -> None:
        """Refuse at once what waiting cannot help: a load backing off, a model too large."""
        _refuse_backing_off(slot, now)
        r = slot.residency
        budget = self.lanes[slot.node].budget
        if slot.managed and not fits_at_all(slot.view(now), budget):
            raise too_large(r.model.name, r.model.size_gb, budget.memory_gb)

    def _refuse_when_full(self, slot: Slot, now: float) -> None:
        limits = self.config.swapper
        total = sum(len(s.queue) for s in self.slots.values())
        if len(slot.queue) >= limits.max_queue_per_model or total >= limits.max_queue_total:
            raise queue_full(slot.model.name, slot.expected_wait_s(now), self.jitter())

    def _grant(self, slot: Slot, now: float, counted: bool) -> Lease:
        try:
            url = slot.driver.url_for(slot.model)
        except DriverError as exc:
            # Its process died a moment ago and the driver knows before the scheduler does.
            self.truth.model_lost(slot.model.name, str(exc))
            raise unavailable(slot.model.name, str(exc)) from exc
        slot.leased(now, counted)
        self.coordinator.leased(slot.model.name, 1)
        target = Target(self.drivers[slot.model.backend].backend, url, slot.model.served_name)
        return Lease(target, lambda: self._release(slot, now))

    def _release(self, slot: Slot, started: float) -> None:
        now = self.clock()
        slot.released(now, started)
        self.coordinator.leased(slot.model.name, -1)
        slot.driver.after_request(slot.model)  # Ollama: re-assert the keep-alive pin
        if slot.queue or (slot.in_flight == 0 and self._idle_changes_plan(slot, now)):
            self.wake()

    def _idle_changes_plan(self, slot: Slot, now: float) -> bool:
        return idle_changes_plan(
            admitting=slot.admission is Admission.OPEN,
            anyone_waiting=any(s.queue for s in self.slots.values()),
            ttl_s=slot.ttl_s, idle_since=now,
            wake_at=self._wake_at)

    def abandon(self, waiter: Waiter) -> None:
        """The waiter's client is gone: leave the queue, or give back a lease granted to it."""
        slot = self.slots[waiter.model]
        if waiter in slot.queue:
            slot.queue.remove(waiter)
        elif waiter.future.done() and not waiter.future.cancelled() \
                and waiter.future.exception() is None:
            waiter.future.result().release()  # granted just as its client gave up
        else:
            waiter.future.cancel()  # an adapter being registered: `_adapt` gives the lease back
        self.wake()

    # -- deciding ---------------------------------------------------------------------------

    def wake(self) -> None:
        self._wake.set()

    @property
    def wake_at(self) -> float | None:
        """When the scheduler will decide again with no event (None: only on the next one)."""
        return self._wake_at

    async def _run(self) -> None:
        while True:
            delay = None if self._wake_at is None else max(0.0, self._wake_at - self.clock())
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._wake.wait()
            self._wake.clear()
            self.steps += 1
            self._step()

    def _step(self) -> None:
        now = self.clock()
        for slot in self.slots.values():
            if slot.hold_expired(now):
                slot.reopen(Admission.HELD)
            if slot.model.adapter_of is not None:
                self.adapters.follow_base(slot, self.slots[slot.model.adapter_of])
        self._move_queues()
        wakes = [self._step_node(lane, now) for lane in self.lanes.values()]
        for slot in self.slots.values():
            if not slot.managed:
                self._admit_all(slot, now)  # always on: only its concurrency limit holds it
        holds = [s.held_since + HOLD_S for s in self.slots.values()
                 if s.admission is Admission.HELD]
        self._wake_at = min((t for t in (*wakes, *holds) if t is not None), default=None)

    def _step_node(self, lane: Lane, now: float) -> float | None:
        """One node's plan, over its own models and budget; when to decide for it again."""
        managed = {name: slot for name, slot in self.slots.items()
                   if slot.managed and slot.node == lane.name}
        lane.views = {name: self._view(slot, now) for name, slot in managed.items()}
        plan = decide(lane.views, lane.room(), self.config.batching, now)
        execute(plan, _NodeBox(self, lane), managed)
        return plan.wake_at

    def _view(self, slot: Slot, now: float) -> ModelView:
        """A held model is being unloaded, as far as the policy is concerned: no swap meanwhile."""
        view = slot.view(now)
        held = view.state is State.LOADED and slot.admission is Admission.HELD
        return replace(view, state=State.UNLOADING) if held else view

    # The executor's side of a plan (policies.execution.Box, one per node: `_NodeBox`).

    def set_admitting(self, name: str, admitting: bool) -> None:
        self.slots[name].follow_plan(drain=not admitting)

    def admit(self, name: str) -> None:
        self._admit_all(self.slots[name], self.clock())

    def swap_running(self) -> bool:
        """A load or unload runs on some node."""
        return any(lane.swapping for lane in self.lanes.values())

    def begin_swap(self, lane: Lane, evict: tuple[str, ...], load: str | None,
                   reason: str, sleep: tuple[str, ...] = ()) -> None:
        """From the decision on, victims admit nothing, so none is busy when its turn comes.
        `sleep`: the victims put to sleep rather than unloaded."""
        self.decisions.record(time.time(), evict, load, reason, lane.views, lane.name, sleep)
        log.info("scheduler.plan", node=lane.name, load=load, evict=evict, reason=reason,
                 sleep=sleep or None)
        lane.swapping = True
        for name in evict:
            self.slots[name].close(Admission.EVICTING)
        self._spawn(self._swap(lane, evict, load, self.truth.surprises, reason, sleep))

    def _admit_all(self, slot: Slot, now: float) -> None:
        while slot.queue and slot.has_room:
            waiter = slot.queue.popleft()
            if waiter.future.done():
                continue
            try:
                lease = self._grant(slot, now, waiter.counted and waiter.adapter is None)
            except GatewayError as error:
                waiter.future.set_exception(error)
                continue
            if waiter.adapter is None:
                waiter.future.set_result(lease)
            else:
                self._spawn(self._adapt(waiter, lease))

    # -- swapping ---------------------------------------------------------------------------

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _swap(self, lane: Lane, evict: tuple[str, ...], load: str | None, surprises: int,
                    reason: str, sleep: tuple[str, ...] = ()) -> None:
        try:
            models = [*evict, *([load] if load else [])]
            async with self._exclusive(lane, models, surprises) as turn:
                if not turn:
                    log.info("scheduler.swap_deferred", load=load, evict=evict,
                             reason="node busy or changed by another replica")
                    return
                for name in evict:
                    await self._unload(self.slots[name], reason, asleep=name in sleep)
                still_resident = [n for n in evict if self.slots[n].residency.state is State.LOADED]
                if load is not None and not turn.lock:
                    log.info("scheduler.swap_deferred", load=load, reason="node lock lost")
                elif load is not None and not still_resident:
                    if await self._room_for(lane, self.slots[load]):
                        await self._load(self.slots[load])
                        await self._measure(lane)
                elif load is not None:
                    log.info("scheduler.swap_deferred", load=load, busy=still_resident)
        finally:
            lane.swapping = False
            for name in evict:
                if name in self.slots:
                    self.slots[name].reopen(Admission.EVICTING)
            self.wake()

    @contextlib.asynccontextmanager
    async def _exclusive(self, lane: Lane, models: Iterable[str],
                         surprises: int) -> AsyncIterator[_Turn]:
        """The right to load and unload on this node; False if the plan is stale.

        The node's lock is every managed backend on it, taken together: its memory is one pool,
        whichever backend fills it. Another replica may have swapped since the plan was made
        (`surprises` then): its truth comes first, and a changed backend means deciding again
        rather than loading twice or over the budget.
        """
        touched = {self.slots[name].model.backend for name in models}
        backends = set(lane.backends) | touched
        async with lane.lock, self.coordinator.lock(
                backends, self.config.swapper.model_swap_timeout) as locked:
            try:
                if locked and self.coordinator.shared:
                    await self.truth.reconcile(backends)
                yield _Turn(locked, self.truth.surprises == surprises)
            finally:
                await self.coordinator.changed(touched)

    async def _load(self, slot: Slot) -> None:
        r = slot.residency
        r.begin_load(self.clock())
        timeout_s = self.config.swapper.load_timeout_s
        log.info("model.loading", model=r.model.name, queued=len(slot.queue))
        try:
            async with asyncio.timeout(timeout_s):
                await slot.driver.load(r.model)
        except DriverError as exc:
            self._load_failed(slot, str(exc), exc.retryable, exc.detail)
            return
        except TimeoutError:
            self._load_failed(slot, f"no answer within {timeout_s:g} s", True, None)
            return
        r.loaded(self.clock(), time.time())
        log.info("model.loaded", model=r.model.name, seconds=round(r.last_load_s or 0, 3))
        if self.on_loaded is not None:
            self.on_loaded(r.model.name, r.last_load_s or 0.0)

    def _load_failed(self, slot: Slot, error: str, retryable: bool, detail: str | None) -> None:
        r = slot.residency
        retry_in = retry_delay(r.failures + 1)
        r.load_failed(self.clock(), error, retry_in, retryable, detail)
        log.warning("model.load_failed", model=r.model.name, error=error,
                    retry_in_s=round(retry_in, 1), failures=r.failures)
        if not self._reroute_queue(slot):
            self._fail_queue(slot, load_failed(r.model.name, error, retry_in, retryable))

    def _reroute_queue(self, slot: Slot) -> bool:
        """A placed model's load failed on this route (its node down, say): its waiters move to
        the route placement picks now, if there is another, rather than failing."""
        other = self.reroute(slot.model) if self.reroute is not None and slot.queue else None
        return self._hand_queue(slot, other, "scheduler.rerouted")

    def _move_queues(self) -> None:
        """Queues of placed models whose load has not begun go where placement sends them
        now (`policies.placement.move`): a node quicker to load them than theirs to begin."""
        if self.move is None:
            return
        for slot in list(self.slots.values()):
            if slot.queue and slot.managed and slot.residency.state is State.UNLOADED:
                self._hand_queue(slot, self.move(slot.model), "scheduler.moved")

    def _hand_queue(self, slot: Slot, other: ModelConfig | None, event: str) -> bool:
        """Give this route's waiters to route `other`, in their order."""
        if other is None or other.name not in self.slots or other.name == slot.model.name:
            return False
        target = self.slots[other.name]
        moved = 0
        while slot.queue:
            waiter = slot.queue.popleft()
            if not waiter.future.done():
                waiter.model = other.name
                target.queue.append(waiter)
                moved += 1
        log.info(event, model=slot.model.name, to=other.name, node=target.node, waiters=moved)
        self.wake()
        return True

    async def _unload(self, slot: Slot, reason: str = "", *, asleep: bool = False) -> None:
        """Unload the model, or with `asleep` put it to sleep (its weights to host RAM)."""
        r = slot.residency
        if r.state is not State.LOADED or slot.in_flight:
            return
        if not await self.coordinator.drain(r.model.backend, r.model.name, DRAIN_WAIT_S):
            return  # others still serve it: it stays, and the swap is decided again
        asleep = asleep and slot.sleeps
        r.begin_unload()
        log.info("model.unloading", model=r.model.name, reason=reason or None,
                 tier="sleep" if asleep else None)
        try:
            await (slot.driver.unload if asleep else slot.driver.unload_fully)(r.model)
        except (DriverError, TimeoutError) as exc:
            # The memory may still be held; reconciling with the backend's truth will tell.
            log.warning("model.unload_failed", model=r.model.name, error=str(exc))
        r.unloaded(self.clock(), time.time(), asleep=asleep)
        self.decisions.residency_ended(r.model.name)
        log.info("model.asleep" if asleep else "model.unloaded", model=r.model.name)

    def served(self, decision: Decision) -> int:
        return self.decisions.served(decision)

    # -- the read model -----------------------------------------------------------------------

    def status(self, only: Collection[str] | None = None, *,
               nodes_too: bool = False) -> SchedulerStatus:
        """A frozen snapshot of nodes, models and decisions: what every reader reads.

        `only`: just these routes, without decisions, and with their nodes if `nodes_too`
        (route choice, which runs on every request, needs no more).
        """
        now, wall = self.clock(), time.time()
        names = list(self.slots) if only is None else [n for n in only if n in self.slots]
        models = {name: self._model_status(self.slots[name], now, wall) for name in names}
        nodes = self.lanes if only is None else {
            m.node: self.lanes[m.node] for m in models.values()
            if nodes_too and m.node in self.lanes}
        decisions = () if only is not None else tuple(
            self._decision_status(d) for d in reversed(self.decisions))
        return SchedulerStatus(
            at=wall, swapping=self.swap_running(), models=models, decisions=decisions,
            nodes={name: self._node_status(lane, now) for name, lane in nodes.items()})

    def _model_status(self, slot: Slot, now: float, wall: float) -> ModelStatus:
        r, model, view = slot.residency, slot.model, slot.view(now)

        def wall_of(at: float | None) -> float | None:
            return None if at is None else wall - (now - at)

        loading = r.state is State.LOADING and r.load_started is not None
        return ModelStatus(
            name=model.name, model=model.public_name, backend=model.backend, node=slot.node,
            managed=slot.managed, adapter_of=model.adapter_of, state=r.state,
            admission=slot.admission.value,
            queue=len(slot.queue), in_flight=slot.in_flight, request_count=slot.request_count,
            load_count=r.load_count, size_gb=model.size_gb,
            measured_gb=slot.measured.gb if slot.measured else None,
            measured_source=slot.measured.source if slot.measured else None,
            priority=model.priority, loaded_at=r.loaded_at, unloaded_at=r.unloaded_at,
            last_used=wall_of(slot.last_used) if slot.last_used else None,
            uptime_s=r.uptime_s(now), ttl_expires_at=wall_of(_ttl_due(view)),
            load_elapsed_s=now - (r.load_started or now) if loading else None,
            load_timeout_s=self.config.swapper.load_timeout_s if loading else None,
            last_load_s=r.last_load_s, error=r.error, error_detail=r.error_detail,
            failures=r.failures,
            retry_at=wall_of(r.retry_at) if r.state is State.FAILED else None,
            retryable=r.retryable, load_blocked=r.state is State.FAILED and not r.may_load(now),
            server=slot.driver.server_of(model),
            asleep=r.asleep and r.state is not State.LOADED, last_wake_s=r.last_wake_s,
            view=view,
        )

    def _node_status(self, lane: Lane, now: float) -> NodeStatus:
        mine = {name: slot for name, slot in self.slots.items()
                if slot.managed and slot.node == lane.name}
        views = {name: slot.view(now) for name, slot in mine.items()}
        resident = [name for name, view in views.items() if view.state is State.LOADED]
        measured = [mine[n].measured.gb for n in resident if mine[n].measured is not None]
        budget = lane.budget
        return NodeStatus(
            name=lane.name, mode=lane.config.mode, max_models=budget.max_models,
            memory_budget_gb=budget.memory_gb, host_memory_gb=budget.host_memory_gb,
            budget=budget,
            backends=tuple(b for b in self.config.backends
                           if self.config.node_of(b) == lane.name),
            models=tuple(mine), resident=tuple(resident),
            resident_gb=sum(view.size_gb for view in views.values() if view.resident),
            measured_gb=sum(measured) if measured else None, free_gb=lane.free_gb,
            swapping=lane.swapping,
            asleep=tuple(n for n, view in views.items() if view.asleep and not view.resident),
            host_gb=host_gb(views), views=views)

    def _decision_status(self, decision: Decision) -> DecisionStatus:
        served = self.served(decision) if decision.action == "load" else None
        return DecisionStatus(at=decision.at, node=decision.node, action=decision.action,
                              model=decision.model, waiting=decision.waiting,
                              reason=decision.reason, served=served)

    def _fail_queue(self, slot: Slot, error: GatewayError) -> None:
        while slot.queue:
            waiter = slot.queue.popleft()
            if not waiter.future.done():
                waiter.future.set_exception(error)

    # -- the admin API ----------------------------------------------------------------------

    async def load(self, name: str, timeout_s: float | None = None) -> None:
        """Load a model now (as a request for it would), evicting others as the policy says."""
        slot = self.slots[name]
        slot.reopen(Admission.CLOSING)
        if slot.managed or slot.model.adapter_of is not None:
            (await self.acquire(slot.model, timeout_s, counted=False)).release()

    async def unload(self, name: str) -> None:
        """Stop admitting, let in-flight requests finish, then unload."""
        slot = self.slots[name]
        if slot.model.adapter_of is not None:
            return await self._unload_adapter(slot)
        if not slot.managed or slot.residency.state is not State.LOADED:
            return
        slot.close(Admission.CLOSING)
        try:
            await slot.idle.wait()
            lane = self.lanes[slot.node]
            async with self._exclusive(lane, [name], self.truth.surprises) as ready:
                if ready and slot.in_flight == 0:
                    await self._unload(slot, "requested", asleep=self._may_sleep(lane, name))
        finally:
            slot.reopen(Admission.CLOSING)
            self.wake()

    async def _unload_adapter(self, adapter: Slot) -> None:
        """Drop an adapter from its base's vLLM once its calls have finished; the base stays."""
        base = self.slots[adapter.model.adapter_of or ""]
        adapter.close(Admission.CLOSING)
        try:
            await adapter.idle.wait()
            if self.adapters.ready(adapter, base):
                await self.adapters.unregister(adapter, base, base.driver.url_for(base.model))
        except DriverError as exc:
            log.warning("model.unload_failed", model=adapter.model.name, error=str(exc))
        finally:
            adapter.reopen(Admission.CLOSING)

    # -- truth from the backends ------------------------------------------------------------

    async def reconcile(self) -> None:
        await self.truth.reconcile()

    def backend_returned(self, backend: str) -> None:
        """Its health check passes again after it was down: the loads that failed there may
        be tried at once."""
        now = self.clock()
        for slot in self.slots.values():
            if slot.model.backend == backend:
                slot.residency.retry_now(now)
        self.wake()

    def model_lost(self, name: str, reason: str) -> None:
        self.truth.model_lost(name, reason)

    async def _reconcile_forever(self) -> None:
        while True:
            await asyncio.sleep(RECONCILE_INTERVAL_S)
            await self.reconcile()
            changed = [await self._measure(lane) for lane in list(self.lanes.values())]
            if any(changed):
                self.wake()  # a figure the budget counts moved: worth a decision

    def _may_sleep(self, lane: Lane, name: str) -> bool:
        """Whether an admin unload puts the model to sleep: the policy's rule, for one."""
        now = self.clock()
        views = {n: s.view(now) for n, s in self.slots.items()
                 if s.managed and s.node == lane.name}
        return name in sleepers((name,), views, lane.room())

    # -- measured memory -------------------------------------------------------------------

    async def _measure(self, lane: Lane) -> bool:
        return await self.meter.measure_node(lane, self._drivers_of(lane), self.slots.values())

    async def _room_for(self, lane: Lane, slot: Slot) -> bool:
        return await self.meter.room_for(lane, self._drivers_of(lane), self.slots.values(), slot)

    def _drivers_of(self, lane: Lane) -> list[Driver]:
        drivers = {id(self.drivers[b]): self.drivers[b] for b in lane.backends
                   if b in self.drivers}
        return list(drivers.values())

    # -- lifecycle --------------------------------------------------------------------------

    async def start(self) -> None:
        await self.meter.start()
        for slot in self.slots.values():
            slot.measured = slot.measured or self.meter.recall(slot.model)
        for driver in {id(d): d for d in self.drivers.values()}.values():
            await driver.start(self.model_lost)
        await self.coordinator.start(self.truth.on_notice)
        await self.reconcile()
        self._spawn(self._run())
        self._spawn(self._reconcile_forever())
        default = self.config.swapper.default_model
        if default:
            self._spawn(self._preload(self.catalog.resolve(default).name))

    async def _preload(self, name: str) -> None:
        try:
            await self.load(name)
        except GatewayError as exc:
            log.warning("model.preload_failed", model=name, error=exc.message)

    async def stop(self) -> None:
        self._closing = True
        for slot in self.slots.values():
            self._fail_queue(slot, shutting_down())
        await tasks.stop(self._tasks)  # a swap waiting for the coordinator's lock among them
        await self.coordinator.close()
        await self.meter.book.close()
        for driver in {id(d): d for d in self.drivers.values()}.values():
            await driver.close()


@dataclass(frozen=True)
class _Turn:
    """A node's turn to swap: truthy when its lock is held and the plan is not stale. The lock
    may be lost midway (`lock` turns falsy): no further load or unload may begin then."""

    lock: Any  # the coordinator's SwapLock (truthy while held)
    fresh: bool  # nothing changed behind the plan's back before the lock was got

    def __bool__(self) -> bool:
        return bool(self.lock) and self.fresh


class _NodeBox:
    """What one node's plan acts on (policies.execution.Box): the scheduler's slots, and the
    node's own lane for the swap."""

    def __init__(self, scheduler: Scheduler, lane: Lane) -> None:
        self._scheduler, self._lane = scheduler, lane

    def set_admitting(self, name: str, admitting: bool) -> None:
        self._scheduler.set_admitting(name, admitting)

    def admit(self, name: str) -> None:
        self._scheduler.admit(name)

    def swap_running(self) -> bool:
        return self._lane.swapping

    def begin_swap(self, evict: tuple[str, ...], load: str | None, reason: str,
                   sleep: tuple[str, ...] = ()) -> None:
        self._scheduler.begin_swap(self._lane, evict, load, reason, sleep)


class Leased:
    """`async with scheduler.leased(model) as lease`: a class rather than a generator-based
    context manager, which costs four times as much, since every non-streamed call takes one."""

    __slots__ = ("_lease", "_model", "_scheduler", "_timeout_s")

    def __init__(self, scheduler: Scheduler, model: ModelConfig, timeout_s: float | None) -> None:
        self._scheduler, self._model, self._timeout_s = scheduler, model, timeout_s
        self._lease: Lease | None = None

    async def __aenter__(self) -> Lease:
        self._lease = await self._scheduler.acquire(self._model, self._timeout_s)
        return self._lease

    async def __aexit__(self, *exc_info: object) -> None:
        if self._lease is not None:
            self._lease.release()


def _refuse_backing_off(slot: Slot, now: float) -> None:
    """A model whose last load failed is refused until its back-off has passed."""
    r = slot.residency
    if r.state is State.FAILED and not r.may_load(now):
        raise load_failed(r.model.name, r.error or "unknown error", (r.retry_at or now) - now,
                          r.retryable)


def _ttl_due(view: ModelView) -> float | None:
    """When an idle loaded model's ttl unloads it (monotonic); None when none is due."""
    idle = view.state is State.LOADED and view.in_flight == 0 and view.queued == 0
    return view.last_used + view.ttl_s if idle and view.ttl_s > 0 else None
