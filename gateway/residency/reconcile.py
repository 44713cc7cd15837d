"""Truth from outside the scheduler: what each backend says it holds, what other replicas are
draining, and which models' processes died.

Every state this changes counts as a surprise: a swap planned before it may be stale, so the
scheduler decides again instead of loading twice or over the budget.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Coroutine, Mapping
from typing import Any

import structlog

from gateway.residency.admission import Admission, Slot
from gateway.residency.coordination import Notice
from gateway.residency.drivers.base import Driver, DriverError
from policies.types import State

log = structlog.get_logger("gateway.residency")


class Truth:
    def __init__(self, slots: Mapping[str, Slot], clock: Callable[[], float],
                 wake: Callable[[], None],
                 spawn: Callable[[Coroutine[Any, Any, None]], None]) -> None:
        self.slots = slots  # the scheduler's own, kept up to date by it
        self.clock = clock
        self.wake = wake
        self.spawn = spawn
        self.surprises = 0

    async def reconcile(self, backends: set[str] | None = None) -> None:
        """Align the states of these backends' models (all if None) with what each holds."""
        drivers = {id(s.driver): s.driver for s in self.slots.values() if s.managed}
        surprises = self.surprises
        for driver in drivers.values():
            if backends is None or driver.backend.name in backends:
                await self._reconcile_driver(driver)
        if self.surprises != surprises:
            self.wake()  # only news is worth a decision

    async def _reconcile_driver(self, driver: Driver) -> None:
        slots = [s for s in self.slots.values() if s.driver is driver and s.managed]
        before = {id(s): s.residency.generation for s in slots}
        try:
            truth = await driver.resident()
        except DriverError as exc:
            log.warning("reconcile.failed", backend=driver.backend.name, error=str(exc))
            return
        if truth is None:
            return
        for slot in slots:
            if slot.residency.generation == before[id(slot)]:  # none moved it meanwhile
                self._align(slot, slot.model.name in truth)

    def _align(self, slot: Slot, resident: bool) -> None:
        r = slot.residency
        if r.state is State.LOADED and not resident and slot.in_flight == 0:
            r.lost(self.clock(), time.time(), asleep=slot.sleeps)  # asleep, if it can sleep
            log.info("model.lost", model=r.model.name, reason="not resident on the backend")
        elif r.state in (State.UNLOADED, State.FAILED) and resident:
            r.found(self.clock(), time.time())
            log.info("model.found", model=r.model.name, reason="resident on the backend")
        else:
            return
        self.surprises += 1

    def on_notice(self, notice: Notice) -> None:
        """Another replica drains a model (hold it at once) or ended a swap (look again)."""
        if notice.draining is None:
            self.spawn(self._after_swap(notice.backend))
        elif notice.draining in self.slots:
            self.slots[notice.draining].hold(self.clock())
            self.wake()

    async def _after_swap(self, backend: str) -> None:
        """Holds end only once the truth is in: a held model may be gone from the backend."""
        noticed = self.clock()
        await self.reconcile({backend})
        for slot in self.slots.values():
            if slot.model.backend == backend and slot.held_since <= noticed:
                slot.reopen(Admission.HELD)  # a hold noticed meanwhile is for the next swap
        self.wake()

    def model_lost(self, name: str, reason: str) -> None:
        """A driver's report that a loaded model went away (its process crashed)."""
        slot = self.slots.get(name)
        if slot is None or slot.residency.state not in (State.LOADED, State.UNLOADING):
            return
        slot.residency.crashed(self.clock(), time.time(), reason)
        log.warning("model.crashed", model=name, reason=reason)
        self.wake()
