"""The old Swapper Service's REST API (the port 8890 contract), plus the gateway's additions."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from gateway import __version__
from gateway.errors import model_not_found
from gateway.metrics import render, wants_prometheus
from gateway.residency.scheduler import Slot
from gateway.services import Services
from policies.types import State


def _json(data: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(data), status_code=status, media_type="application/json")


def _iso(wall: float | None) -> str | None:
    return datetime.fromtimestamp(wall, UTC).isoformat() if wall is not None else None


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

    @property
    def _slots(self) -> dict[str, Slot]:
        """The public models' slots (fallback routes show in their model's status)."""
        return {name: slot for name, slot in self.services.scheduler.slots.items()
                if slot.model.route_of is None}

    def _slot(self, request: Request) -> Slot:
        model = self.services.catalog.resolve(request.path_params["name"])
        slot = self._slots.get(model.name)
        if slot is None:
            raise model_not_found(request.path_params["name"])
        return slot

    def _loaded(self) -> list[str]:
        return [n for n, s in self._slots.items() if s.residency.state is State.LOADED]

    async def health(self, request: Request) -> Response:
        loaded = self._loaded()
        return _json({
            "status": "healthy",
            "service": "swapper-gateway",
            "version": __version__,
            "mode": self.services.config.swapper.mode,
            "active_model": loaded[0] if loaded else None,
        })

    async def ready(self, request: Request) -> Response:
        """Readiness: 503 before the services started and while shutting down."""
        ready = self.services.ready
        return _json({"ready": ready}, status=200 if ready else 503)

    async def status(self, request: Request) -> Response:
        scheduler = self.services.scheduler
        loaded = self._loaded()
        return _json({
            "status": "running",
            "active_model": loaded[0] if loaded else None,
            "available_models": list(self._slots),
            "loaded_models": loaded,
            "mode": self.services.config.swapper.mode,
            "total_models": len(self._slots),
            "max_concurrent_models": self.services.config.swapper.max_concurrent_models,
            "memory_budget_gb": self.services.config.swapper.memory_budget_gb,
            "resident_gb": sum(s.model.size_gb for s in self._slots.values()
                               if s.managed and s.residency.state is State.LOADED),
            "models": {name: self._model_status(slot) for name, slot in self._slots.items()},
            "cache": self._cache_status(),
            "decisions": [
                {"at": _iso(d.at), "action": d.action, "model": d.model,
                 "waiting": d.waiting, "reason": d.reason,
                 "served": scheduler.served(d) if d.action == "load" else None}
                for d in reversed(scheduler.decisions)
            ],
        })

    def _cache_status(self) -> dict[str, Any]:
        cache = self.services.cache
        stats = cache.store.stats
        return {
            "backend": "redis" if cache.config.redis_url else "memory",
            "healthy": cache.store.healthy,
            "hits": cache.outcomes["HIT"], "misses": cache.outcomes["MISS"],
            "bypasses": cache.outcomes["BYPASS"], "bytes_written": stats.bytes_written,
            "errors": stats.errors,
        }

    def _model_status(self, slot: Slot) -> dict[str, Any]:
        r = slot.residency
        serving = self.services.fallback.choose(slot.model)
        return {
            "status": r.state.value,
            "backend": slot.model.backend,
            "serving_backend": serving.backend,
            "routes": {
                route.backend: self.services.scheduler.slots[route.name].residency.state.value
                for route in self.services.catalog.routes(slot.model)
            },
            "queue_depth": len(slot.queue),
            "in_flight": slot.in_flight,
            "error": r.error,
        }

    def _describe(self, slot: Slot) -> dict[str, Any]:
        r, model = slot.residency, slot.model
        return {
            "name": model.name,
            "ollama_name": model.served_name,
            "type": model.type,
            "size_gb": model.size_gb,
            "priority": model.priority,
            "status": r.state.value,
            "loaded_at": _iso(r.loaded_at),
            "unloaded_at": _iso(r.unloaded_at),
            "total_uptime_seconds": round(r.uptime_s(self.services.scheduler.clock()), 3),
            "backend": model.backend,
            "aliases": list(model.aliases),
            "request_count": slot.request_count,
            "load_count": r.load_count,
            "last_load_seconds": r.last_load_s,
            "error": r.error,
        }

    def _metrics(self, slot: Slot) -> dict[str, Any]:
        r = slot.residency
        uptime = r.uptime_s(self.services.scheduler.clock())
        return {
            "model_name": slot.model.name,
            "status": r.state.value,
            "loaded_at": _iso(r.loaded_at),
            "uptime_hours": round(uptime / 3600, 6),
            "request_count": slot.request_count,
            "total_uptime_seconds": round(uptime, 3),
            "load_count": r.load_count,
            "last_load_seconds": r.last_load_s,
        }

    async def list_models(self, request: Request) -> Response:
        models = [self._describe(slot) for slot in self._slots.values()]
        return _json({"models": models, "total_models": len(models)})

    async def get_model(self, request: Request) -> Response:
        return _json(self._describe(self._slot(request)))

    async def load(self, request: Request) -> Response:
        slot = self._slot(request)
        await self.services.scheduler.load(slot.model.name)
        return _json({"status": "success", "model": slot.model.name,
                      "message": f"Model {slot.model.name} loaded",
                      "model_status": slot.residency.state.value})

    async def unload(self, request: Request) -> Response:
        slot = self._slot(request)
        await self.services.scheduler.unload(slot.model.name)
        return _json({"status": "success", "model": slot.model.name,
                      "message": f"Model {slot.model.name} unloaded",
                      "model_status": slot.residency.state.value})

    async def metrics(self, request: Request) -> Response:
        accept = request.headers.get("accept", "")
        if wants_prometheus(accept):
            body, content_type = render(self.services.metrics.registry, accept)
            return Response(body, media_type=content_type)
        metrics = [self._metrics(slot) for slot in self._slots.values()]
        return _json({"models": metrics,
                      "total_requests": sum(m["request_count"] for m in metrics)})

    async def model_metrics(self, request: Request) -> Response:
        return _json(self._metrics(self._slot(request)))
