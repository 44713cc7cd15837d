"""Which of a model's backends serves it now: the first one that is up, in the configured order.

A route is out while its backend is marked down (unreachable, or failing request after request,
until its health check passes again) or while its model failed to load and waits out its
back-off. When every route is out, the first is used, so the client gets its real error.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class RouteView:
    backend_up: bool
    load_blocked: bool  # its model failed to load and may not be retried yet


def usable(route: RouteView) -> bool:
    return route.backend_up and not route.load_blocked


def choose_route(routes: Sequence[RouteView]) -> int:
    return next((i for i, route in enumerate(routes) if usable(route)), 0)


def backend_down(consecutive_failures: int, threshold: int) -> bool:
    """A backend that failed `threshold` requests in a row is taken out of rotation."""
    return consecutive_failures >= threshold
