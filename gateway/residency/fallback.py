"""Fallback between a model's backends (vLLM in production, Ollama behind it, say).

Requests go to the first route whose backend is up and whose model is not waiting out a failed
load. A backend is down after `threshold` failed requests in a row (unreachable, timing out,
answering 5xx); a background check asks its driver's health every few seconds and brings it
back, and traffic with it, as soon as it answers.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping

import structlog

from gateway.config.catalog import Catalog
from gateway.config.schema import ModelConfig
from gateway.residency.backend_health import BackendHealth
from gateway.residency.drivers.base import Driver
from gateway.residency.scheduler import Scheduler
from gateway.residency.snapshot import SchedulerStatus
from policies.fallback import RouteView, choose_route

log = structlog.get_logger("gateway.residency.fallback")

HEALTH_INTERVAL_S = 5.0


class Fallback:
    def __init__(self, catalog: Callable[[], Catalog], scheduler: Scheduler,
                 drivers: Mapping[str, Driver], health: BackendHealth) -> None:
        self._catalog = catalog
        self.scheduler = scheduler
        self.drivers = drivers
        self.health = health

    def choose(self, model: ModelConfig, status: SchedulerStatus | None = None) -> ModelConfig:
        """The route that serves `model` now (`status`: a snapshot the caller already has)."""
        routes = self._catalog().routes(model)
        if len(routes) == 1:
            return model
        status = status or self.scheduler.status()
        return routes[choose_route([self._view(route, status) for route in routes])]

    def _view(self, route: ModelConfig, status: SchedulerStatus) -> RouteView:
        shown = status.models.get(route.name)
        blocked = shown is not None and shown.load_blocked
        return RouteView(backend_up=self.health.up(route.backend), load_blocked=blocked)

    async def watch(self) -> None:
        """Bring backends back as soon as their health check passes."""
        while True:
            await asyncio.sleep(HEALTH_INTERVAL_S)
            await self.check()

    async def check(self) -> None:
        for name in self.health.down():
            driver = self.drivers.get(name)
            if driver is not None and await driver.health():
                self.health.ok(name)
