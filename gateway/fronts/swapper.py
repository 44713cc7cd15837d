"""The old Swapper Service's REST API (the port 8890 contract), plus the gateway's additions.

Every key and value of that service's answers comes back as it did (`SWAPPER_API.md`); the
gateway's own figures are extra keys beside them. A caller sees only the models its key may use
(`Access.may_see`): any other is absent from lists and answers 404 like an unknown one.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response

from gateway import __version__
from gateway.access.auth import Access, access_of
from gateway.config.schema import ModelConfig
from gateway.errors import model_not_found
from gateway.fronts.routing import Route
from gateway.metrics import render, wants_prometheus
from gateway.residency.snapshot import ModelStatus, SchedulerStatus
from gateway.services import Services
from policies.types import State

SERVICE = "swapper-service"  # the old service's name: its health checks compare it
# The old service knew loaded, unloaded and loading; the gateway's finer states map onto them
# (the exact one is in the extra key `state`).
_OLD_STATUS = {State.LOADED: "loaded", State.LOADING: "loading", State.UNLOADING: "unloaded",
               State.UNLOADED: "unloaded", State.FAILED: "unloaded"}


def _json(data: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(data), status_code=status, media_type="application/json")


def iso_local(wall: float | None) -> str | None:
    """ISO 8601 local time with its offset, as the old service's clients parse it."""
    if wall is None:
        return None
    return datetime.fromtimestamp(wall).astimezone().isoformat(timespec="seconds")


_RESIDENT_FIRST = (State.LOADED, State.LOADING, State.UNLOADING, State.FAILED, State.UNLOADED)


def _most_resident(routes: list[ModelStatus]) -> ModelStatus:
    """The route that best says where a placed model is: loaded, else loading, ..."""
    return min(routes, key=lambda m: _RESIDENT_FIRST.index(m.state))


@dataclass(frozen=True)
class _Shown:
    """A public model as the caller sees it: its config, its own route's status, all routes."""

    config: ModelConfig
    status: ModelStatus
    routes: list[ModelStatus]

    @property
    def request_count(self) -> int:
        """API calls for the model, whichever of its routes served them."""
        return sum(route.request_count for route in self.routes)


@dataclass(frozen=True)
class _View:
    status: SchedulerStatus
    models: dict[str, _Shown]

    @property
    def loaded(self) -> list[str]:
        return [name for name, shown in self.models.items() if shown.status.state is State.LOADED]


class SwapperApi:
    def __init__(self, services: Services) -> None:
        self.services = services

    def routes(self) -> list[Route]:
        return [
            Route("/health", self.health, methods=["GET"]),
            Route("/ready", self.ready, methods=["GET"]),
            Route("/status", self.status, methods=["GET"]),
            Route("/models", self.list_models, methods=["GET"]),
            Route("/models/{name:path}/load", self.load, methods=["POST"]),
            Route("/models/{name:path}/unload", self.unload, methods=["POST"]),
            Route("/models/{name:path}", self.get_model, methods=["GET"]),
            Route("/metrics", self.metrics, methods=["GET"]),
            Route("/metrics/{name:path}", self.model_metrics, methods=["GET"]),
        ]

    # -- what the caller may see ------------------------------------------------------------

    def _visible(self, access: Access) -> _View:
        """The public models the caller may see, from one snapshot of the scheduler (fallback
        routes show in their model's status)."""
        status = self.services.scheduler.status()
        catalog = self.services.catalog
        models = {}
        for name, model in status.models.items():
            config = catalog.get(name)
            if model.name == model.model and config is not None and access.may_see(config):
                routes = status.routes_of(name)
                # A placed model is wherever placement put it: its most resident route speaks
                # for it. A fallback model is its primary, as before.
                shown = self._placed_at(routes) if config.placed else model
                models[name] = _Shown(config, shown, routes)
        return _View(status, models)

    def _placed_at(self, routes: list[ModelStatus]) -> ModelStatus:
        """Where a placed model is: its most resident route whose backend is up, if any."""
        up = [route for route in routes if self.services.health.up(route.backend)]
        return _most_resident(up or routes)

    def _one(self, request: Request) -> _Shown:
        name = request.path_params["name"]
        model = self.services.catalog.resolve(name)
        shown = self._visible(access_of(request.scope)).models.get(model.name)
        if shown is None:
            raise model_not_found(name)
        return shown

    # -- routes -----------------------------------------------------------------------------

    async def health(self, request: Request) -> Response:
        loaded = self._visible(access_of(request.scope)).loaded
        return _json({
            "status": "healthy",
            "service": SERVICE,
            "active_model": loaded[0] if loaded else None,
            "mode": self.services.config.swapper.mode,
            "version": __version__,
        })

    async def ready(self, request: Request) -> Response:
        """Readiness: 503 before the services started and while shutting down."""
        ready = self.services.ready
        return _json({"ready": ready}, status=200 if ready else 503)

    async def status(self, request: Request) -> Response:
        access = access_of(request.scope)
        view = self._visible(access)
        loaded = view.loaded
        swapper = self.services.config.swapper
        return _json({
            "status": "healthy",
            "active_model": loaded[0] if loaded else None,
            "available_models": list(view.models),
            "loaded_models": loaded,
            "mode": swapper.mode,
            "total_models": len(view.models),
            "max_concurrent_models": swapper.max_concurrent_models,
            "memory_budget_gb": swapper.memory_budget_gb,
            "resident_gb": sum(shown.status.size_gb for shown in view.models.values()
                               if shown.status.managed and shown.status.state is State.LOADED),
            "models": {name: self._model_status(shown, view.status, access.admin)
                       for name, shown in view.models.items()},
            "cache": self._cache_status(),
            "decisions": self._decisions(view),
            "nodes": self._nodes(view),
        })

    @staticmethod
    def _decisions(view: _View) -> list[dict[str, Any]]:
        visible = {route.name for shown in view.models.values() for route in shown.routes}
        return [
            {"at": iso_local(d.at), "action": d.action, "model": d.model, "waiting": d.waiting,
             "reason": d.reason, "served": d.served, "node": d.node}
            for d in view.status.decisions if d.model in visible
        ]

    @staticmethod
    def _nodes(view: _View) -> dict[str, Any]:
        """Each node's budget and what it holds (the routes the caller may see)."""
        visible = {route.name for shown in view.models.values() for route in shown.routes}
        return {
            name: {
                "mode": node.mode,
                "max_concurrent_models": node.max_models,
                "memory_budget_gb": node.memory_budget_gb,
                "host_memory_gb": node.host_memory_gb,
                "backends": list(node.backends),
                "resident_models": [m for m in node.resident if m in visible],
                "resident_gb": round(node.resident_gb, 3),
                "asleep_models": [m for m in node.asleep if m in visible],
                "host_gb": round(node.host_gb, 3),
                "measured_gb": node.measured_gb,
                "free_gb": node.free_gb,
                "swapping": node.swapping,
            }
            for name, node in view.status.nodes.items()
        }

    def _cache_status(self) -> dict[str, Any]:
        cache = self.services.cache
        stats, outcomes = cache.store.stats, cache.totals()
        return {
            "backend": "redis" if cache.config.redis_url else "memory",
            "healthy": cache.store.healthy,
            "hits": outcomes["HIT"], "misses": outcomes["MISS"],
            "bypasses": outcomes["BYPASS"], "bytes_written": stats.bytes_written,
            "errors": stats.errors,
        }

    def _model_status(self, shown: _Shown, status: SchedulerStatus,
                      admin: bool) -> dict[str, Any]:
        m = shown.status
        serving = self.services.fallback.choose(shown.config, status)
        return {
            **_failure(m, admin),
            "status": _OLD_STATUS[m.state],
            "state": m.state.value,
            "backend": m.backend,
            "serving_backend": serving.backend,
            "routes": {route.backend: route.state.value for route in shown.routes},
            "queue_depth": m.queue,
            "in_flight": m.in_flight,
            "node": m.node,
            "nodes": {route.backend: route.node for route in shown.routes},
            "adapter_of": m.adapter_of,
            "measured_gb": m.measured_gb,
            "asleep": m.asleep,
            "server": {"pid": m.server[0], "port": m.server[1]} if m.server else None,
        }

    def _describe(self, shown: _Shown) -> dict[str, Any]:
        m, model = shown.status, shown.config
        return {
            "name": model.name,
            "ollama_name": model.served_name,
            "type": model.type,
            "size_gb": model.size_gb,
            "priority": model.priority,
            "status": _OLD_STATUS[m.state],
            "loaded_at": iso_local(m.loaded_at),
            "unloaded_at": iso_local(m.unloaded_at),
            "total_uptime_seconds": round(m.uptime_s, 3),
            "state": m.state.value,
            "backend": m.backend,
            "aliases": list(model.aliases),
            "request_count": shown.request_count,
            "load_count": m.load_count,
            "last_load_seconds": m.last_load_s,
            **_failure(m, admin=False),
            "node": m.node,
            "measured_gb": m.measured_gb,
            "asleep": m.asleep,
            "last_wake_seconds": m.last_wake_s,
        }

    @staticmethod
    def _metrics(shown: _Shown) -> dict[str, Any]:
        m = shown.status
        return {
            "model_name": shown.config.name,
            "status": _OLD_STATUS[m.state],
            "loaded_at": iso_local(m.loaded_at),
            "uptime_hours": round(m.uptime_s / 3600, 6),
            "request_count": shown.request_count,
            "total_uptime_seconds": round(m.uptime_s, 3),
            "load_count": m.load_count,
            "last_load_seconds": m.last_load_s,
        }

    async def list_models(self, request: Request) -> Response:
        view = self._visible(access_of(request.scope))
        models = [self._describe(shown) for shown in view.models.values()]
        return _json({"models": models, "total_models": len(models)})

    async def get_model(self, request: Request) -> Response:
        return _json(self._describe(self._one(request)))

    async def load(self, request: Request) -> Response:
        config = self._one(request).config
        # A placed model loads where placement puts it; any other on its own route.
        route = self.services.fallback.choose(config) if config.placed else config
        await self.services.scheduler.load(route.name)
        return self._done(config, "loaded")

    async def unload(self, request: Request) -> Response:
        config = self._one(request).config
        routes = self.services.catalog.routes(config) if config.placed else [config]
        for route in routes:  # a placed model leaves every node that holds it
            await self.services.scheduler.unload(route.name)
        return self._done(config, "unloaded")

    def _done(self, config: ModelConfig, what: str) -> Response:
        routes = self.services.scheduler.status().routes_of(config.name)
        state = (self._placed_at(routes) if config.placed else routes[0]).state
        name = config.name
        return _json({"status": "success", "model": name, "message": f"Model {name} {what}",
                      "model_status": _OLD_STATUS[state]})

    async def metrics(self, request: Request) -> Response:
        accept = request.headers.get("accept", "")
        if wants_prometheus(accept):
            body, content_type = render(self.services.metrics.registry, accept)
            return Response(body, media_type=content_type)
        view = self._visible(access_of(request.scope))
        metrics = [self._metrics(shown) for shown in view.models.values()]
        return _json({"metrics": metrics,
                      "total_requests": sum(m["request_count"] for m in metrics)})

    async def model_metrics(self, request: Request) -> Response:
        return _json(self._metrics(self._one(request)))


def _failure(m: ModelStatus, admin: bool) -> dict[str, Any]:
    """A failed load's one-line error, how many failed in a row and when the next try may
    come (each failure doubles the wait); the driver's detail (server output, paths) only for
    admins."""
    shown = {"error": m.error, "failures": m.failures, "retry_at": iso_local(m.retry_at),
             "retryable": m.retryable}
    return {**shown, "error_detail": m.error_detail} if admin else shown
