"""Carrying out a Plan: one order of steps, shared by the gateway's scheduler and the simulator
(`bench/swap_sim.py`), so what is simulated is what runs."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

from policies.types import Plan


class Box(Protocol):
    """What a plan acts on: the gateway's scheduler or the simulator's clock and queues."""

    def set_admitting(self, name: str, admitting: bool) -> None: ...

    def admit(self, name: str) -> None: ...

    def swap_running(self) -> bool: ...

    def begin_swap(self, evict: tuple[str, ...], load: str | None, reason: str,
                   sleep: tuple[str, ...] = ()) -> None: ...


def execute(plan: Plan, box: Box, managed: Iterable[str]) -> None:
    """Drain exactly `plan.drain`, release the queues of `plan.admit`, then start the plan's
    swap unless one is running: a box swaps one model at a time."""
    for name in managed:
        box.set_admitting(name, name not in plan.drain)
    for name in plan.admit:
        box.admit(name)
    if (plan.evict or plan.load) and not box.swap_running():
        box.begin_swap(plan.evict, plan.load, plan.reason, plan.sleep)
