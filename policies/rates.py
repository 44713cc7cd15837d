"""How often a model is asked for: a smoothed arrival rate, the demand placement weighs."""

from __future__ import annotations

import math
from dataclasses import dataclass

_SMOOTHING = 0.2  # weight of the newest gap between two requests


@dataclass
class ArrivalRate:
    """Requests per second, from the smoothed gap between arrivals; it decays while none come
    (a gap still open counts once it is longer than the smoothed one)."""

    gap_s: float | None = None
    last: float = -math.inf

    def arrived(self, now: float) -> None:
        if self.last > -math.inf:
            gap = now - self.last
            self.gap_s = gap if self.gap_s is None else (
                (1 - _SMOOTHING) * self.gap_s + _SMOOTHING * gap)
        self.last = now

    def per_s(self, now: float) -> float:
        if self.gap_s is None:
            return 0.0
        return 1.0 / max(self.gap_s, now - self.last, 1e-3)
