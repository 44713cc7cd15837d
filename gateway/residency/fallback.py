"""Route choice between a model's backends: ordered fallback, or placement across nodes.

`fallback:` (vLLM in production, Ollama behind it, say): requests go to the first route whose
backend is up and whose model is not waiting out a failed load (`policies.fallback`).
`routes:`: the placement policy picks the route (`policies.placement`): where the model is
resident (the least busy copy), else where it is already on its way, else on the node where
it costs least (the wait there plus what making room costs), among routes whose backend is up.

A backend is down after `threshold` failed requests in a row (unreachable, timing out,
answering 5xx); a background check asks its driver's health every few seconds and brings it
back, and traffic with it, as soon as it answers.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping

import structlog

from gateway.config.catalog import Catalog
from gateway.config.schema import ModelConfig
from gateway.relay.health import BackendHealth
from gateway.residency.drivers.base import Driver
from gateway.residency.scheduler import Scheduler
from gateway.residency.snapshot import SchedulerStatus
from policies.fallback import RouteView, choose_route
from policies.placement import NodeView, Placement, RouteOption, move, place

log = structlog.get_logger("gateway.residency.fallback")

HEALTH_INTERVAL_S = 5.0


class Fallback:
    def __init__(self, catalog: Callable[[], Catalog], scheduler: Scheduler,
                 drivers: Mapping[str, Driver], health: BackendHealth) -> None:
        self._catalog = catalog
        self.scheduler = scheduler
        self.drivers = drivers
        self.health = health
        scheduler.reroute = self.reroute  # a failed load of a placed model tries elsewhere
        scheduler.move = self.move  # a placed queue whose load has not begun may go elsewhere

    def choose(self, model: ModelConfig, status: SchedulerStatus | None = None) -> ModelConfig:
        """The route that serves `model` now (`status`: a snapshot the caller already has)."""
        routes = self._catalog().routes(model)
        if len(routes) == 1:
            return model
        status = status or self.scheduler.status(only=[route.name for route in routes],
                                                 nodes_too=model.placed)
        if model.placed:
            return routes[self._place(routes, status).index]
        return routes[choose_route([self._view(route, status) for route in routes])]

    def reroute(self, route: ModelConfig) -> ModelConfig | None:
        """Where a placed model's requests go when its load on `route` just failed: the route
        placement picks now (the failed one backs off, so it is out), or None if that is it."""
        public = self._catalog().get(route.public_name)
        if public is None or not public.placed:
            return None  # `fallback:` and single routes fail as they always did
        chosen = self.choose(public)
        return None if chosen.name == route.name else chosen

    def move(self, route: ModelConfig) -> ModelConfig | None:
        """Where the requests queued on `route` of a placed model, whose load has not begun,
        go now; None to stay (`policies.placement.move`)."""
        public = self._catalog().get(route.public_name)
        if public is None or not public.placed:
            return None
        routes = self._catalog().routes(public)
        at = next((i for i, r in enumerate(routes) if r.name == route.name), None)
        views = self._views(routes, self.scheduler.status(
            only=[r.name for r in routes], nodes_too=True))
        if at is None or views is None:
            return None
        moved = move(*views, self.scheduler.config.batching, self.scheduler.clock(), at)
        if moved is None:
            return None
        log.info("placement.moved", model=route.name, to=routes[moved.index].name,
                 reason=moved.reason)
        return routes[moved.index]

    def _place(self, routes: list[ModelConfig], status: SchedulerStatus) -> Placement:
        views = self._views(routes, status)
        if views is None:
            return Placement(0, "not in the scheduler yet")  # between a reload's two halves
        return place(*views, self.scheduler.config.batching, self.scheduler.clock())

    def _views(self, routes: list[ModelConfig], status: SchedulerStatus
               ) -> tuple[list[RouteOption], dict[str, NodeView]] | None:
        """The routes and their nodes as placement sees them; None while a route is not in
        the scheduler."""
        shown = [status.models[route.name] for route in routes if route.name in status.models]
        if len(shown) != len(routes):
            return None
        options = [RouteOption(m.view, m.node, self.health.up(m.backend)) for m in shown]
        catalog = self._catalog()
        nodes = {name: NodeView(name, node.budget, node.views, frozenset(
                     n for n in node.views if _single_route(catalog.get(n))))
                 for name, node in status.nodes.items() if name in {m.node for m in shown}}
        return options, nodes

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
                self.scheduler.backend_returned(name)


def _single_route(model: ModelConfig | None) -> bool:
    """A model no other backend can serve (a route `x@backend` is never one)."""
    return model is not None and model.route_of is None and not model.fallbacks
