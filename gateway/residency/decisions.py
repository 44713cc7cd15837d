"""The decision log shown in /status and /ui: what each swap loaded and unloaded, why, how many
requests were waiting, and how many the residency it began went on to serve."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

from policies.types import ModelView

DECISION_LOG_SIZE = 50


@dataclass
class Decision:
    """One line of the decision log."""

    at: float  # wall clock
    action: str  # "load", "unload", or "sleep" (unloaded to host RAM)
    model: str
    waiting: int  # requests queued for it when it was chosen
    reason: str
    requests_before: int = 0  # the model's request count when it was chosen
    served: int | None = None  # requests served by this residency, once it ended
    node: str = "default"  # the node whose lane it ran on


class DecisionLog:
    def __init__(self, request_count: Callable[[str], int]) -> None:
        self._count = request_count
        self._entries: deque[Decision] = deque(maxlen=DECISION_LOG_SIZE)

    def __iter__(self) -> Iterator[Decision]:
        return iter(self._entries)

    def __reversed__(self) -> Iterator[Decision]:
        return reversed(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def record(self, at: float, evict: tuple[str, ...], load: str | None, reason: str,
               views: Mapping[str, ModelView], node: str = "default",
               sleep: tuple[str, ...] = ()) -> None:
        for name in evict:
            action = "sleep" if name in sleep else "unload"
            self._entries.append(Decision(at, action, name, 0, reason, node=node))
        if load is not None:
            self._entries.append(Decision(at, "load", load, views[load].queued, reason,
                                          self._count(load), node=node))

    def served(self, decision: Decision) -> int:
        """Requests the residency a load decision began has served (so far, if still on)."""
        if decision.served is not None:
            return decision.served
        return self._count(decision.model) - decision.requests_before

    def residency_ended(self, model: str) -> None:
        for decision in reversed(self._entries):
            if decision.model == model and decision.action == "load":
                if decision.served is None:
                    decision.served = self.served(decision)
                return
