"""One model's residency as an explicit state machine, with the counters the Swapper API shows.

    unloaded ──begin_load──► loading ──loaded──► loaded ──begin_unload──► unloading ──unloaded──►
        ▲                       └──load_failed──► failed ──begin_load──► loading
        └──────── lost (backend evicted it) ◄── loaded ──crashed──► failed (reload on next request)

`asleep` marks an unloaded model put to sleep (its weights in host RAM): its next load is a
wake, timed apart from cold loads (`last_wake_s`, `cold_load_s`) so each estimate learns its own.

Times are passed in (monotonic for durations, wall clock for what users read), so the machine
itself has no clock and no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass

from gateway.config.schema import ModelConfig
from policies.types import State


class InvalidTransition(RuntimeError):
    """A transition asked for from a state it does not start in: a bug in the caller."""


@dataclass
class Residency:
    model: ModelConfig
    state: State = State.UNLOADED
    loaded_at: float | None = None  # wall clock, for users
    unloaded_at: float | None = None  # wall clock
    loaded_since: float | None = None  # monotonic, for uptime
    total_uptime_s: float = 0.0  # completed residencies
    load_started: float | None = None  # monotonic
    load_count: int = 0
    last_load_s: float | None = None  # the last load, a wake or a cold one
    cold_load_s: float | None = None  # the last cold load
    last_wake_s: float | None = None  # the last wake from sleep
    asleep: bool = False  # unloaded to host RAM (sleep level 1): a wake brings it back
    waking: bool = False  # the load running is a wake
    error: str | None = None
    error_detail: str | None = None  # never shown to clients: it may name paths and addresses
    retry_at: float | None = None  # monotonic; a failed model is not loaded before this
    failures: int = 0
    retryable: bool = True  # whether the last failure may pass by itself (a file missing won't)
    generation: int = 0  # bumped on every transition, so async observers can detect change

    def _move(self, expected: tuple[State, ...], to: State) -> None:
        if self.state not in expected:
            raise InvalidTransition(f"{self.model.name}: {self.state} -> {to}")
        self.state = to
        self.generation += 1

    def begin_load(self, now: float) -> None:
        self._move((State.UNLOADED, State.FAILED), State.LOADING)
        self.load_started = now
        self.waking, self.asleep = self.asleep, False

    def loaded(self, now: float, wall: float) -> None:
        self._move((State.LOADING,), State.LOADED)
        self.last_load_s = now - (self.load_started or now)
        if self.waking:
            self.last_wake_s = self.last_load_s
        else:
            self.cold_load_s = self.last_load_s
        self.load_count += 1
        self.failures = 0
        self.retryable = True
        self.error = self.error_detail = self.retry_at = None
        self._became_resident(now, wall)

    def load_failed(self, now: float, error: str, retry_in: float, retryable: bool = True,
                    detail: str | None = None) -> None:
        """`retry_in`: the back-off the policy chose (policies.backoff); `detail`: what the
        driver saw (server output, addresses), for logs and admins only."""
        self._move((State.LOADING,), State.FAILED)
        self.asleep = self.waking  # a wake that failed leaves the weights where they were
        self.failures += 1
        self.error = error
        self.error_detail = detail
        self.retryable = retryable
        self.retry_at = now + retry_in

    def begin_unload(self) -> None:
        self._move((State.LOADED,), State.UNLOADING)

    def unloaded(self, now: float, wall: float, asleep: bool = False) -> None:
        """`asleep`: put to sleep (its weights in host RAM), not unloaded for good."""
        self._move((State.UNLOADING,), State.UNLOADED)
        self._left(now, wall)
        self.asleep = asleep

    def lost(self, now: float, wall: float, asleep: bool = False) -> None:
        """The backend no longer holds the model (it evicted it by itself, or, for a backend
        that sleeps, it is asleep)."""
        self._move((State.LOADED,), State.UNLOADED)
        self._left(now, wall)
        self.asleep = asleep

    def load_estimate(self, default_s: float) -> float:
        """How long its next load (or the one running) should take: a wake for a model asleep
        (or waking), else a cold load."""
        cold = self.cold_load_s or self.last_load_s or default_s
        waking = self.waking if self.state is State.LOADING else self.asleep
        return (self.last_wake_s or cold) if waking else cold

    def wake_estimate(self, default_s: float) -> float:
        return self.last_wake_s or self.cold_load_s or self.last_load_s or default_s

    def crashed(self, now: float, wall: float, reason: str) -> None:
        """The model's process died; it may be loaded again at once."""
        self._move((State.LOADED, State.UNLOADING), State.FAILED)
        self._left(now, wall)
        self.asleep = False
        self.error = reason
        self.retry_at = now

    def found(self, now: float, wall: float) -> None:
        """The backend holds the model although the gateway did not load it."""
        self._move((State.UNLOADED, State.FAILED), State.LOADED)
        self.asleep = False
        self.error = self.error_detail = self.retry_at = None
        self._became_resident(now, wall)

    def _became_resident(self, now: float, wall: float) -> None:
        self.loaded_since = now
        self.loaded_at = wall

    def _left(self, now: float, wall: float) -> None:
        if self.loaded_since is not None:
            self.total_uptime_s += now - self.loaded_since
        self.loaded_since = None
        self.unloaded_at = wall

    def uptime_s(self, now: float) -> float:
        """Total time resident, the current residency included."""
        current = now - self.loaded_since if self.loaded_since is not None else 0.0
        return self.total_uptime_s + current

    def retry_now(self, now: float) -> None:
        """What made the last load fail has passed (its backend answers again): no need to
        wait out the back-off. A failure only an operator can fix stays backed off."""
        if self.state is State.FAILED and self.retryable:
            self.retry_at = now

    def may_load(self, now: float) -> bool:
        return self.state is not State.FAILED or self.retry_at is None or now >= self.retry_at
