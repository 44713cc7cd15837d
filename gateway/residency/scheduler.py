"""The scheduler: leases on models, the bounded wait queue, and the swaps that serve it.

Every request asks `request(model)`: a resident, admitting model gets a `Lease` at once; any
other request becomes a `Waiter` in its model's queue. On every event (enqueue, release, load
done, timer) the scheduler snapshots all models and asks the pure policy
(`policies.scheduling.decide`) what to do: admit queued requests, stop admitting a model so it
drains, unload idle models, load the next one. One swap runs at a time (one GPU box).

Replicas sharing the box (see `gateway.residency.coordination`) swap under a lock per backend,
reconcile before they swap, and hold a model another replica is draining: it admits nothing
until that replica's swap is over.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import structlog

from gateway.config.catalog import Catalog
from gateway.config.schema import GatewayConfig, ModelConfig
from gateway.errors import GatewayError
from gateway.relay.proxy import Target
from gateway.residency.coordination import Coordinator, LocalCoordinator, Notice
from gateway.residency.drivers.base import Driver, DriverError
from gateway.residency.state import Residency
from policies.scheduling import decide
from policies.types import ModelView, Plan, State

log = structlog.get_logger("gateway.residency.scheduler")

RECONCILE_INTERVAL_S = 10.0
DECISION_LOG_SIZE = 50
DRAIN_WAIT_S = 5.0  # for other replicas' requests on a victim; then the swap is deferred
HOLD_S = 60.0  # a hold outlives a replica that died mid-swap by this much at most


@dataclass
class Lease:
    """The right to send requests for one model to `target` until released."""

    target: Target
    _on_release: Callable[[], None] | None = field(default=None, repr=False)

    def release(self) -> None:
        callback, self._on_release = self._on_release, None
        if callback is not None:
            callback()


@dataclass(eq=False)
class Waiter:
    model: str
    enqueued_at: float
    future: asyncio.Future[Lease]


@dataclass
class Slot:
    """Everything the scheduler tracks about one model."""

    residency: Residency
    driver: Driver
    queue: deque[Waiter] = field(default_factory=deque)
    in_flight: int = 0
    admitting: bool = True
    unload_requested: bool = False
    request_count: int = 0
    last_used: float = 0.0
    idle: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def model(self) -> ModelConfig:
        return self.residency.model

    @property
    def managed(self) -> bool:
        return self.driver.manages_residency

    @property
    def has_room(self) -> bool:
        """Below the model's own concurrency limit, if it has one."""
        limit = self.residency.model.max_concurrent
        return limit is None or self.in_flight < limit

    def view(self, now: float) -> ModelView:
        r = self.residency
        return ModelView(
            name=r.model.name, state=r.state, size_gb=r.model.size_gb,
            priority=r.model.priority, in_flight=self.in_flight, queued=len(self.queue),
            oldest_wait_since=self.queue[0].enqueued_at if self.queue else None,
            loaded_at=r.loaded_since, last_used=self.last_used,
            admitting=self.admitting and not self.unload_requested,
            load_seconds=r.last_load_s or 5.0,
            retry_at=r.retry_at if r.state is State.FAILED else None,
        )


@dataclass
class Decision:
    """One line of the decision log shown in /status."""

    at: float  # wall clock
    action: str  # "load" or "unload"
    model: str
    waiting: int  # requests queued for it when it was chosen
    reason: str
    requests_before: int = 0  # the model's request count when it was chosen
    served: int | None = None  # requests served by this residency, once it ended


def swap_timeout(model: str, seconds: float) -> GatewayError:
    return GatewayError(
        503, f"Model '{model}' was not ready within {seconds:g} s; it is still being loaded "
        "or waiting for its turn. Retry shortly.", code="model_swap_timeout",
        headers={"retry-after": "5", "x-should-retry": "true"},
    )


def load_failed(model: str, error: str, retry_in: float) -> GatewayError:
    return GatewayError(
        503, f"Model '{model}' failed to load: {error}", code="model_load_failed",
        headers={"retry-after": str(max(1, math.ceil(retry_in))), "x-should-retry": "true"},
    )


class Scheduler:
    def __init__(self, config: GatewayConfig, catalog: Catalog, drivers: Mapping[str, Driver],
                 clock: Callable[[], float] = time.monotonic,
                 coordinator: Coordinator | None = None) -> None:
        self.config = config
        self.coordinator: Coordinator = coordinator or LocalCoordinator()
        self.budget = config.swapper.budget()
        self.clock = clock
        self.drivers = drivers
        self.slots: dict[str, Slot] = {}
        self.decisions: deque[Decision] = deque(maxlen=DECISION_LOG_SIZE)
        self._wake = asyncio.Event()
        self._wake_at: float | None = None
        self._swap_lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[None]] = set()
        self._swapping = False
        self._evicting: set[str] = set()  # victims of the running swap: they admit nothing
        self._held: dict[str, float] = {}  # model -> since when another replica drains it
        self._surprises = 0  # states reconciling changed: plans made before them may be stale
        self._closing = False
        self.on_loaded: Callable[[str, float], None] | None = None  # (model, seconds), metrics
        self.apply(config, catalog, drivers)

    def apply(self, config: GatewayConfig, catalog: Catalog,
              drivers: Mapping[str, Driver]) -> None:
        """Take a (re)loaded config: new models get a slot, kept ones keep their state."""
        self.config, self.budget, self.drivers = config, config.swapper.budget(), drivers
        models = {model.name: model for model in catalog.all_models()}
        for name in set(self.slots) - set(models):
            del self.slots[name]  # a reload removes only models not in use
        for name, model in models.items():
            slot = self.slots.get(name)
            if slot is None:
                slot = self.slots[name] = Slot(Residency(model), drivers[model.backend])
                slot.idle.set()
                if not slot.managed:
                    slot.residency.found(self.clock(), time.time())
            slot.residency.model, slot.driver = model, drivers[model.backend]
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

    def request(self, model: ModelConfig) -> Lease | Waiter:
        """A lease at once if the model is ready, else a place in its queue (or 429/503)."""
        slot = self.slots[model.name]
        now = self.clock()
        if self._closing:
            raise GatewayError(503, "The gateway is shutting down.", code="shutting_down",
                               headers={"retry-after": "5"})
        ready = (slot.residency.state is State.LOADED or not slot.managed) and slot.admitting
        if ready and not slot.unload_requested and not slot.queue and slot.has_room:
            return self._grant(slot, now)
        self._refuse_failed(slot, now)
        self._admission(slot)
        waiter = Waiter(model.name, now, asyncio.get_running_loop().create_future())
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
            self.abandon(waiter)
            raise swap_timeout(waiter.model, timeout_s) from None
        except asyncio.CancelledError:
            self.abandon(waiter)
            raise

    async def acquire(self, model: ModelConfig, timeout_s: float | None = None) -> Lease:
        ticket = self.request(model)
        return ticket if isinstance(ticket, Lease) else await self.wait(ticket, timeout_s)

    def queue_depth(self, name: str) -> int:
        return len(self.slots[name].queue)

    def _refuse_failed(self, slot: Slot, now: float) -> None:
        r = slot.residency
        if r.state is State.FAILED and not r.may_load(now):
            raise load_failed(r.model.name, r.error or "unknown error", (r.retry_at or now) - now)

    def _admission(self, slot: Slot) -> None:
        limits = self.config.swapper
        total = sum(len(s.queue) for s in self.slots.values())
        if len(slot.queue) >= limits.max_queue_per_model or total >= limits.max_queue_total:
            raise GatewayError(
                429, f"Too many requests are waiting for model '{slot.model.name}'; "
                "retry shortly.", code="queue_full", headers={"retry-after": "2"},
            )

    def _grant(self, slot: Slot, now: float) -> Lease:
        try:
            url = slot.driver.url_for(slot.model)
        except DriverError as exc:
            # Its process died a moment ago and the driver knows before the scheduler does.
            self.model_lost(slot.model.name, str(exc))
            raise GatewayError(503, f"Model '{slot.model.name}' is not available: {exc}",
                               code="model_unavailable",
                               headers={"retry-after": "1", "x-should-retry": "true"}) from exc
        slot.in_flight += 1
        self.coordinator.leased(slot.model.name, 1)
        slot.request_count += 1
        slot.last_used = now
        slot.idle.clear()
        target = Target(self.drivers[slot.model.backend].backend, url, slot.model.served_name)
        return Lease(target, lambda: self._release(slot))

    def _release(self, slot: Slot) -> None:
        slot.in_flight -= 1
        self.coordinator.leased(slot.model.name, -1)
        slot.last_used = self.clock()
        if slot.in_flight == 0:
            slot.idle.set()
        if slot.in_flight == 0 or slot.queue:
            self.wake()

    def abandon(self, waiter: Waiter) -> None:
        """The waiter's client is gone: leave the queue, or give back a lease granted to it."""
        slot = self.slots[waiter.model]
        if waiter in slot.queue:
            slot.queue.remove(waiter)
        elif waiter.future.done() and not waiter.future.cancelled() \
                and waiter.future.exception() is None:
            waiter.future.result().release()  # granted just as its client gave up
        self.wake()

    # -- deciding ---------------------------------------------------------------------------

    def wake(self) -> None:
        self._wake.set()

    async def _run(self) -> None:
        while True:
            delay = None if self._wake_at is None else max(0.0, self._wake_at - self.clock())
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._wake.wait()
            self._wake.clear()
            self._step()

    def _step(self) -> None:
        now = self.clock()
        self._held = {name: t for name, t in self._held.items() if t + HOLD_S > now}
        managed = {name: slot for name, slot in self.slots.items() if slot.managed}
        views = {name: self._view(slot, now) for name, slot in managed.items()}
        plan = decide(views, self.budget, self.config.batching, now)
        for name, slot in managed.items():
            slot.admitting = (name not in plan.drain and name not in self._evicting
                              and not self._is_held(name, now))
        for name in plan.admit:
            self._admit_all(self.slots[name], now)
        for slot in self.slots.values():
            if not slot.managed:
                self._admit_all(slot, now)  # always on: only its concurrency limit holds it
        expired = self._idle_expired(now)
        self._wake_at = min((t for t in (plan.wake_at, self._next_expiry(now),
                                         *(t + HOLD_S for t in self._held.values()))
                            if t is not None), default=None)
        if self._swapping:
            return
        if plan.evict or plan.load:
            self._record(plan, views)
            self._begin_swap(plan.evict)
            self._spawn(self._swap(plan.evict, plan.load, self._surprises))
        elif expired:
            self._begin_swap(expired)
            self._spawn(self._swap(expired, None, self._surprises, reason="idle ttl"))

    def _view(self, slot: Slot, now: float) -> ModelView:
        """A held model is being unloaded, as far as the policy is concerned: no swap meanwhile."""
        view = slot.view(now)
        held = view.state is State.LOADED and self._is_held(view.name, now)
        return replace(view, state=State.UNLOADING) if held else view

    def _is_held(self, name: str, now: float) -> bool:
        return self._held.get(name, -math.inf) + HOLD_S > now

    def _begin_swap(self, victims: tuple[str, ...]) -> None:
        """From the decision on, victims admit nothing, so none is busy when its turn comes."""
        self._swapping = True
        self._evicting.update(victims)
        for name in victims:
            self.slots[name].admitting = False

    def _admit_all(self, slot: Slot, now: float) -> None:
        while slot.queue and slot.has_room:
            waiter = slot.queue.popleft()
            if waiter.future.done():
                continue
            try:
                waiter.future.set_result(self._grant(slot, now))
            except GatewayError as error:
                waiter.future.set_exception(error)

    def _idle_expired(self, now: float) -> tuple[str, ...]:
        return tuple(
            name for name, slot in self.slots.items()
            if slot.managed and slot.model.ttl_s > 0 and slot.residency.state is State.LOADED
            and slot.in_flight == 0 and not slot.queue
            and now - slot.last_used >= slot.model.ttl_s
        )

    def _next_expiry(self, now: float) -> float | None:
        times = [
            slot.last_used + slot.model.ttl_s for slot in self.slots.values()
            if slot.managed and slot.model.ttl_s > 0 and slot.residency.state is State.LOADED
        ]
        return min(times, default=None)

    def _record(self, plan: Plan, views: Mapping[str, ModelView]) -> None:
        wall = time.time()
        for name in plan.evict:
            self.decisions.append(Decision(wall, "unload", name, 0, plan.reason))
        if plan.load:
            self.decisions.append(Decision(wall, "load", plan.load, views[plan.load].queued,
                                           plan.reason, self.slots[plan.load].request_count))
        log.info("scheduler.plan", load=plan.load, evict=plan.evict, drain=plan.drain,
                 reason=plan.reason)

    # -- swapping ---------------------------------------------------------------------------

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _swap(self, evict: tuple[str, ...], load: str | None, surprises: int,
                    reason: str = "") -> None:
        try:
            async with self._exclusive([*evict, *([load] if load else [])], surprises) as ready:
                if not ready:
                    log.info("scheduler.swap_deferred", load=load, evict=evict,
                             reason="backend busy or changed by another replica")
                    return
                for name in evict:
                    await self._unload(self.slots[name], reason)
                still_resident = [n for n in evict if self.slots[n].residency.state is State.LOADED]
                if load is not None and not still_resident:
                    await self._load(self.slots[load])
                elif load is not None:
                    log.info("scheduler.swap_deferred", load=load, busy=still_resident)
        finally:
            self._swapping = False
            self._evicting.difference_update(evict)
            self.wake()

    @contextlib.asynccontextmanager
    async def _exclusive(self, models: Iterable[str], surprises: int) -> AsyncIterator[bool]:
        """The right to load and unload these models' backends; False if the plan is stale.

        Another replica may have swapped since the plan was made (`surprises` then): its truth
        comes first, and a changed backend means deciding again rather than loading twice or
        over the budget.
        """
        backends = {self.slots[name].model.backend for name in models}
        async with self._swap_lock, self.coordinator.lock(
                backends, self.config.swapper.model_swap_timeout) as locked:
            try:
                if locked and self.coordinator.shared:
                    await self._reconcile(backends)
                yield locked and self._surprises == surprises
            finally:
                await self.coordinator.changed(backends)

    async def _load(self, slot: Slot) -> None:
        r = slot.residency
        r.begin_load(self.clock())
        log.info("model.loading", model=r.model.name, queued=len(slot.queue))
        try:
            async with asyncio.timeout(self.config.swapper.model_swap_timeout):
                await slot.driver.load(r.model)
        except (DriverError, TimeoutError) as exc:
            error = str(exc) or f"no answer within {self.config.swapper.model_swap_timeout:g} s"
            r.load_failed(self.clock(), error)
            log.warning("model.load_failed", model=r.model.name, error=error,
                        retry_in_s=round((r.retry_at or 0) - self.clock(), 1))
            self._fail_queue(slot, load_failed(r.model.name, error, (r.retry_at or 0) -
                                               self.clock()))
            return
        r.loaded(self.clock(), time.time())
        log.info("model.loaded", model=r.model.name, seconds=round(r.last_load_s or 0, 3))
        if self.on_loaded is not None:
            self.on_loaded(r.model.name, r.last_load_s or 0.0)

    async def _unload(self, slot: Slot, reason: str = "") -> None:
        r = slot.residency
        if r.state is not State.LOADED or slot.in_flight:
            return
        if not await self.coordinator.drain(r.model.backend, r.model.name, DRAIN_WAIT_S):
            return  # others still serve it: it stays, and the swap is decided again
        r.begin_unload()
        log.info("model.unloading", model=r.model.name, reason=reason or None)
        try:
            await slot.driver.unload(r.model)
        except (DriverError, TimeoutError) as exc:
            # The memory may still be held; reconciling with the backend's truth will tell.
            log.warning("model.unload_failed", model=r.model.name, error=str(exc))
        r.unloaded(self.clock(), time.time())
        self._close_residency(slot)
        log.info("model.unloaded", model=r.model.name)

    def served(self, decision: Decision) -> int:
        """Requests the residency a load decision began has served (so far, if still on)."""
        if decision.served is not None:
            return decision.served
        return self.slots[decision.model].request_count - decision.requests_before

    def _close_residency(self, slot: Slot) -> None:
        for decision in reversed(self.decisions):
            if decision.model == slot.model.name and decision.action == "load":
                if decision.served is None:
                    decision.served = self.served(decision)
                return

    def _fail_queue(self, slot: Slot, error: GatewayError) -> None:
        while slot.queue:
            waiter = slot.queue.popleft()
            if not waiter.future.done():
                waiter.future.set_exception(error)

    # -- the admin API ----------------------------------------------------------------------

    async def load(self, name: str, timeout_s: float | None = None) -> None:
        """Load a model now (as a request for it would), evicting others as the policy says."""
        slot = self.slots[name]
        slot.unload_requested = False
        if slot.managed:
            (await self.acquire(slot.model, timeout_s)).release()

    async def unload(self, name: str) -> None:
        """Stop admitting, let in-flight requests finish, then unload."""
        slot = self.slots[name]
        if not slot.managed or slot.residency.state is not State.LOADED:
            return
        slot.unload_requested = True
        try:
            await slot.idle.wait()
            async with self._exclusive([name], self._surprises) as ready:
                if ready and slot.in_flight == 0:
                    await self._unload(slot, "requested")
        finally:
            slot.unload_requested = False
            self.wake()

    # -- truth from the backends ------------------------------------------------------------

    async def reconcile(self) -> None:
        """Align the states with what each backend says it holds."""
        await self._reconcile()

    async def _reconcile(self, backends: set[str] | None = None) -> None:
        """Reconcile these backends (all if None)."""
        for driver in {id(s.driver): s.driver for s in self.slots.values() if s.managed}.values():
            if backends is None or driver.backend.name in backends:
                await self._reconcile_driver(driver)
        self.wake()

    async def _reconcile_driver(self, driver: Driver) -> None:
        slots = [s for s in self.slots.values() if s.driver is driver]
        before = {id(s): s.residency.generation for s in slots}
        try:
            truth = await driver.resident()
        except DriverError as exc:
            log.warning("reconcile.failed", backend=driver.backend.name, error=str(exc))
            return
        if truth is None:
            return
        for slot in slots:
            if slot.residency.generation == before[id(slot)]:
                self._align(slot, slot.model.name in truth)

    def _align(self, slot: Slot, resident: bool) -> None:
        r = slot.residency
        if r.state is State.LOADED and not resident and slot.in_flight == 0:
            r.lost(self.clock(), time.time())
            log.info("model.lost", model=r.model.name, reason="not resident on the backend")
        elif r.state in (State.UNLOADED, State.FAILED) and resident:
            r.found(self.clock(), time.time())
            log.info("model.found", model=r.model.name, reason="resident on the backend")
        else:
            return
        self._surprises += 1

    def _on_notice(self, notice: Notice) -> None:
        """Another replica drains a model (hold it at once) or ended a swap (look again)."""
        if notice.draining is None:
            self._spawn(self._follow(notice.backend))
        elif notice.draining in self.slots:
            self._held[notice.draining] = self.clock()
            self.slots[notice.draining].admitting = False
            self.wake()

    async def _follow(self, backend: str) -> None:
        """Holds end only once the truth is in: a held model may be gone from the backend."""
        noticed = self.clock()
        await self._reconcile({backend})
        for name, since in list(self._held.items()):
            slot = self.slots.get(name)
            if since <= noticed and (slot is None or slot.model.backend == backend):
                self._held.pop(name, None)  # a hold noticed meanwhile is for the next swap
        self.wake()

    def model_lost(self, name: str, reason: str) -> None:
        """A driver's report that a loaded model went away (its process crashed)."""
        slot = self.slots.get(name)
        if slot is None or slot.residency.state not in (State.LOADED, State.UNLOADING):
            return
        slot.residency.crashed(self.clock(), time.time(), reason)
        log.warning("model.crashed", model=name, reason=reason)
        self.wake()

    async def _reconcile_forever(self) -> None:
        while True:
            await asyncio.sleep(RECONCILE_INTERVAL_S)
            await self.reconcile()

    # -- lifecycle --------------------------------------------------------------------------

    async def start(self) -> None:
        for driver in {id(d): d for d in self.drivers.values()}.values():
            await driver.start(self.model_lost)
        await self.coordinator.start(self._on_notice)
        await self.reconcile()
        self._spawn(self._run())
        self._spawn(self._reconcile_forever())
        default = self.config.swapper.default_model
        if default:
            self._spawn(self._preload(default))

    async def _preload(self, name: str) -> None:
        try:
            await self.load(name)
        except GatewayError as exc:
            log.warning("model.preload_failed", model=name, error=exc.message)

    async def stop(self) -> None:
        self._closing = True
        closing = GatewayError(503, "The gateway is shutting down.", code="shutting_down",
                               headers={"retry-after": "5"})
        for slot in self.slots.values():
            self._fail_queue(slot, closing)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.coordinator.close()
        for driver in {id(d): d for d in self.drivers.values()}.values():
            await driver.close()
