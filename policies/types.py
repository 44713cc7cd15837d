"""Value types the pure policies decide over; the gateway builds them from its live state."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum


class State(StrEnum):
    UNLOADED = "unloaded"
    LOADING = "loading"
    LOADED = "loaded"
    UNLOADING = "unloading"
    FAILED = "failed"


# Old Swapper Service priorities; a larger weight is served first.
PRIORITY_WEIGHT = {"high": 3.0, "normal": 2.0, "low": 1.0}


@dataclass(frozen=True)
class Budget:
    """How much may be resident at once; None means no limit."""

    max_models: int | None = None
    memory_gb: float | None = None
    host_memory_gb: float | None = None  # host RAM for models put to sleep; None: no limit


@dataclass(frozen=True)
class ModelView:
    """One model as the policies see it at an instant."""

    name: str
    state: State = State.UNLOADED
    size_gb: float = 0.0
    priority: str = "normal"
    in_flight: int = 0  # leases held right now
    queued: int = 0  # requests waiting for this model
    oldest_wait_since: float | None = None  # enqueue time of its oldest waiter
    loaded_at: float | None = None  # when it became loaded (for min residency)
    last_used: float = 0.0  # last lease start or end
    admitting: bool = True  # False while the scheduler drains it to swap it out
    load_seconds: float = 5.0  # estimate of one load
    retry_at: float | None = None  # a failed model may not be loaded before this
    ttl_s: float = 0.0  # unloaded after this long idle; 0 = never
    rate_per_s: float = 0.0  # requests per second lately (placement's measure of demand)
    # The sleep tier (vLLM sleep level 1: weights in host RAM). `wake_seconds` is None for a
    # model that cannot sleep, else the estimate of one wake; `asleep`: unloaded to host RAM,
    # so its next load is a wake (and `load_seconds` says as much).
    wake_seconds: float | None = None
    asleep: bool = False

    @property
    def resident(self) -> bool:
        """Counts toward the budget: loaded, loading or still unloading."""
        return self.state in (State.LOADED, State.LOADING, State.UNLOADING)

    @property
    def busy(self) -> bool:
        return self.in_flight > 0


@dataclass(frozen=True)
class BatchingConfig:
    """Defaults tuned with bench/swap_sim.py for loads of 2-20 s; window_ms 0 turns grouping off."""

    # Gather competing demand this long before choosing a swap; a burst also goes on while its
    # requests come less than a window apart.
    window_ms: float = 8_000.0
    max_wait_ms: float = 60_000.0  # age after which a waiter overrides every other preference
    min_residency_ms: float = 20_000.0  # keep a swapped-in model this long while it has demand
    # A model whose last request ended less than this ago still counts as busy. 0 by default:
    # a client alternating models one request at a time (an agent's planner and coder) has no
    # competing demand, so it should never wait for a window.
    burst_gap_ms: float = 0.0


@dataclass(frozen=True)
class Plan:
    """What the scheduler should do now.

    Execute in this order: set admitting on every model (False exactly for `drain`), release
    the queues of `admit`, unload `evict`, and once those unloads finish, load `load`.

    load: model to load once `evict` are unloaded (it fits then); None while any model moves.
    evict: idle loaded models to unload now (never one with in_flight > 0).
    sleep: those of `evict` put to sleep (their weights kept in host RAM, a wake away) rather
        than unloaded.
    drain: every loaded model that must not admit now (new requests queue, in-flight ones
        finish) so that it can be evicted later; a drain lasts while the plans keep naming it.
    admit: loaded models whose queued requests are released now; one may also be in `drain`
        when it was just loaded but must already make way for an overdue waiter.
    wake_at: when to decide again even if nothing happens (None: only on the next event).
    reason: one short human-readable line for the decision log.
    """

    load: str | None = None
    evict: tuple[str, ...] = ()
    sleep: tuple[str, ...] = ()
    drain: tuple[str, ...] = ()
    admit: tuple[str, ...] = ()
    wake_at: float | None = None
    reason: str = ""
    scores: dict[str, float] = field(default_factory=dict)
