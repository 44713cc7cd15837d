"""Admission: may a model take a request now? Each model's slot, its queue of waiters, the leases
it has granted, and the errors a request can meet on the way in.

A model's admission is one explicit state:

    open ──policy drains it──► draining ──the drain is called off──► open
      │                            │
      └──── its swap is decided ───┴──► evicting ──the swap ends──► open
    open ──another replica drains it──► held ──that swap ends (or HOLD_S passes)──► open
    open ──an admin unloads it──► closing ──the unload ends──► open

Only `open` grants leases; in every other state new requests queue and leases in flight finish.
`evicting`, `held` and `closing` are each ended by the event that began them; the policy's plans
move a model only between `open` and `draining`.
"""

from __future__ import annotations

import asyncio
import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum

from gateway.config.schema import ModelConfig
from gateway.errors import GatewayError
from gateway.relay.proxy import Target
from gateway.residency.drivers.base import Driver, Measured
from gateway.residency.state import Residency
from policies.admission import expected_wait
from policies.rates import ArrivalRate
from policies.types import ModelView, State

HOLD_S = 60.0  # a hold outlives a replica that died mid-swap by this much at most
_LEASE_SMOOTHING = 0.2  # weight of the newest lease in the mean lease time
_FIRST_LOAD_S = 5.0  # what a load is expected to take before one has been timed


class Admission(StrEnum):
    OPEN = "open"
    DRAINING = "draining"  # the policy wants it out once its requests finish
    EVICTING = "evicting"  # a victim of the swap running now
    HELD = "held"  # another replica is draining it for its own swap
    CLOSING = "closing"  # an admin asked to unload it


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
    counted: bool = True  # an API call (counted in request_count), not an admin load
    # Queued in its base's queue for a LoRA adapter (this name): its lease is the adapter's.
    adapter: str | None = None


@dataclass
class Slot:
    """Everything the scheduler tracks about one model."""

    residency: Residency
    driver: Driver
    node: str = "default"  # the node its backend sits on: its budget and swap lane
    queue: deque[Waiter] = field(default_factory=deque)
    in_flight: int = 0
    admission: Admission = Admission.OPEN
    held_since: float = -math.inf
    request_count: int = 0
    last_used: float = 0.0
    lease_s: float | None = None  # smoothed duration of one lease, for expected waits
    idle: asyncio.Event = field(default_factory=asyncio.Event)
    rate: ArrivalRate = field(default_factory=ArrivalRate)  # requests lately, for placement
    measured: Measured | None = None  # what it was seen to hold; counts instead of size_gb

    @property
    def model(self) -> ModelConfig:
        return self.residency.model

    @property
    def managed(self) -> bool:
        """Its residency is the scheduler's to plan: an adapter's is its base's (adapters)."""
        return self.driver.manages_residency and self.model.adapter_of is None

    @property
    def ttl_s(self) -> float:
        """Its idle ttl, where its residency is the scheduler's to plan (0: none)."""
        return self.residency.model.ttl_s if self.managed else 0.0

    @property
    def sleeps(self) -> bool:
        """Its backend can put it to sleep (weights to host RAM) instead of unloading it."""
        return bool(getattr(self.driver, "sleeps", False))

    @property
    def size_gb(self) -> float:
        """What it counts for in its node's budget: measured, else the configured guess."""
        return self.measured.gb if self.measured is not None else self.residency.model.size_gb

    @property
    def has_room(self) -> bool:
        """Below the model's own concurrency limit, if it has one."""
        limit = self.residency.model.max_concurrent
        return limit is None or self.in_flight < limit

    @property
    def ready(self) -> bool:
        """A request may have a lease at once, without queueing."""
        resident = self.residency.state is State.LOADED or not self.managed
        return resident and self.admission is Admission.OPEN and not self.queue and self.has_room

    def follow_plan(self, drain: bool) -> None:
        """The policy moves a model only between open and draining."""
        if self.admission in (Admission.OPEN, Admission.DRAINING):
            self.admission = Admission.DRAINING if drain else Admission.OPEN

    def close(self, why: Admission) -> None:
        self.admission = why

    def reopen(self, why: Admission) -> None:
        """End the state `why` began; a later state begun by another event stays."""
        if self.admission is why:
            self.admission = Admission.OPEN

    def hold(self, now: float) -> None:
        self.held_since = now
        if self.admission in (Admission.OPEN, Admission.DRAINING):
            self.admission = Admission.HELD

    def hold_expired(self, now: float) -> bool:
        return self.admission is Admission.HELD and self.held_since + HOLD_S <= now

    def leased(self, now: float, counted: bool) -> None:
        self.in_flight += 1
        self.request_count += counted
        self.last_used = now
        self.idle.clear()

    def released(self, now: float, started: float) -> None:
        self.in_flight -= 1
        self.last_used = now
        took = now - started
        self.lease_s = took if self.lease_s is None else (
            (1 - _LEASE_SMOOTHING) * self.lease_s + _LEASE_SMOOTHING * took)
        if self.in_flight == 0:
            self.idle.set()

    def view(self, now: float) -> ModelView:
        r = self.residency
        return ModelView(
            name=r.model.name, state=r.state, size_gb=self.size_gb,
            priority=r.model.priority, in_flight=self.in_flight, queued=len(self.queue),
            oldest_wait_since=self.queue[0].enqueued_at if self.queue else None,
            loaded_at=r.loaded_since, last_used=self.last_used,
            admitting=self.admission is Admission.OPEN,
            load_seconds=r.load_estimate(_FIRST_LOAD_S),
            retry_at=r.retry_at if r.state is State.FAILED else None,
            ttl_s=self.ttl_s,
            rate_per_s=self.rate.per_s(now),
            wake_seconds=r.wake_estimate(_FIRST_LOAD_S) if self.sleeps else None,
            asleep=r.asleep,
        )

    def expected_wait_s(self, now: float) -> float:
        """How long a request queued now should expect to wait for its lease."""
        r = self.residency
        loading_for = now - r.load_started if r.state is State.LOADING and r.load_started else 0.0
        return expected_wait(
            state=r.state, load_s=r.load_estimate(_FIRST_LOAD_S), loading_for_s=loading_for,
            ahead=len(self.queue), lease_s=self.lease_s or 1.0,
            parallel=self.model.max_concurrent or 1,
        )


def retry_headers(seconds: float, jitter: float) -> dict[str, str]:
    """`Retry-After` (whole seconds) and `retry-after-ms`, spread by `jitter` (0..1) so clients
    told to come back do not all come back at once."""
    spread = max(seconds, 0.5) * (1.0 + 0.5 * jitter)
    return {"retry-after": str(max(1, math.ceil(spread))),
            "retry-after-ms": str(round(spread * 1000)), "x-should-retry": "true"}


def queue_full(model: str, wait_s: float, jitter: float) -> GatewayError:
    return GatewayError(
        429, f"Too many requests are waiting for model '{model}'; retry shortly.",
        code="queue_full", headers=retry_headers(wait_s, jitter),
    )


def swap_timeout(model: str, seconds: float, wait_s: float, jitter: float) -> GatewayError:
    return GatewayError(
        503, f"Model '{model}' was not ready within {seconds:g} s; it is still being loaded "
        "or waiting for its turn. Retry shortly.", code="model_swap_timeout",
        headers=retry_headers(wait_s, jitter),
    )


def load_failed(model: str, error: str, retry_in: float, retryable: bool = True) -> GatewayError:
    if not retryable:
        return GatewayError(503, f"Model '{model}' cannot be loaded: {error}",
                            code="model_load_failed", headers={"x-should-retry": "false"})
    return GatewayError(
        503, f"Model '{model}' failed to load: {error}", code="model_load_failed",
        headers={"retry-after": str(max(1, math.ceil(retry_in))), "x-should-retry": "true"},
    )


def too_large(model: str, size_gb: float, budget_gb: float | None) -> GatewayError:
    return GatewayError(
        503, f"Model '{model}' needs {size_gb:g} GB, more than the memory budget of "
        f"{budget_gb:g} GB: it can never be loaded here.", code="model_too_large",
        headers={"x-should-retry": "false"},
    )


def shutting_down() -> GatewayError:
    return GatewayError(503, "The gateway is shutting down.", code="shutting_down",
                        headers={"retry-after": "5", "x-should-retry": "true"})


def unavailable(model: str, reason: str) -> GatewayError:
    return GatewayError(503, f"Model '{model}' is not available: {reason}",
                        code="model_unavailable",
                        headers={"retry-after": "1", "x-should-retry": "true"})
