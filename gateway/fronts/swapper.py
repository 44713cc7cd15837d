"""The old Swapper Service's REST API (the port 8890 contract), plus the gateway's additions.

Every key and value of that service's answers comes back as it did (`SWAPPER_API.md`); the
gateway's own figures are extra keys beside them. A caller sees only the models its key may use
(`Access.may_see`): any other is absent from lists and answers 404 like an unknown one.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from gateway import __version__
from gateway.access.auth import Access, access_of
from gateway.errors import model_not_found
from gateway.metrics import render, wants_prometheus
from gateway.residency.admission import Slot
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

    def _slots(self, access: Access) -> dict[str, Slot]:
        """The public models' slots the caller may see (fallback routes show in their model's
        status)."""
        return {name: slot for name, slot in self.services.scheduler.slots.items()
                if slot.model.route_of is None and access.may_see(slot.model)}

    def _slot(self, request: Request) -> Slot:
        name = request.path_params["name"]
        model = self.services.catalog.resolve(name)
        slot = self._slots(access_of(request.scope)).get(model.name)
        if slot is None:
            raise model_not_found(name)
        return slot

    @staticmethod
    def _loaded(slots: dict[str, Slot]) -> list[str]:
        return [n for n, s in slots.items() if s.residency.state is State.LOADED]

    # -- routes -----------------------------------------------------------------------------

    async def health(self, request: Request) -> Response:
        loaded = self._loaded(self._slots(access_of(request.scope)))
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
        slots = self._slots(access)
        loaded = self._loaded(slots)
        swapper = self.services.config.swapper
        return _json({
            "status": "healthy",
            "active_model": loaded[0] if loaded else None,
            "available_models": list(slots),
            "loaded_models": loaded,
            "mode": swapper.mode,
            "total_models": len(slots),
            "max_concurrent_models": swapper.max_concurrent_models,
            "memory_budget_gb": swapper.memory_budget_gb,
            "resident_gb": sum(s.model.size_gb for s in slots.values()
                               if s.managed and s.residency.state is State.LOADED),
            "models": {name: self._model_status(slot) for name, slot in slots.items()},
            "cache": self._cache_status(),
            "decisions": self._decisions(set(slots)),
        })

    def _decisions(self, visible: set[str]) -> list[dict[str, Any]]:
        scheduler = self.services.scheduler
        return [
            {"at": iso_local(d.at), "action": d.action, "model": d.model, "waiting": d.waiting,
             "reason": d.reason, "served": scheduler.served(d) if d.action == "load" else None}
            for d in reversed(scheduler.decisions) if d.model in visible
        ]

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
            "status": _OLD_STATUS[r.state],
            "state": r.state.value,
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

    def _request_count(self, slot: Slot) -> int:
        """API calls for the model, whichever of its routes served them."""
        slots = self.services.scheduler.slots
        return sum(slots[route.name].request_count
                   for route in self.services.catalog.routes(slot.model) if route.name in slots)

    def _describe(self, slot: Slot) -> dict[str, Any]:
        r, model = slot.residency, slot.model
        return {
            "name": model.name,
            "ollama_name": model.served_name,
            "type": model.type,
            "size_gb": model.size_gb,
            "priority": model.priority,
            "status": _OLD_STATUS[r.state],
            "loaded_at": iso_local(r.loaded_at),
            "unloaded_at": iso_local(r.unloaded_at),
            "total_uptime_seconds": round(r.uptime_s(self.services.scheduler.clock()), 3),
            "state": r.state.value,
            "backend": model.backend,
            "aliases": list(model.aliases),
            "request_count": self._request_count(slot),
            "load_count": r.load_count,
            "last_load_seconds": r.last_load_s,
            "error": r.error,
        }

    def _metrics(self, slot: Slot) -> dict[str, Any]:
        r = slot.residency
        uptime = r.uptime_s(self.services.scheduler.clock())
        return {
            "model_name": slot.model.name,
            "status": _OLD_STATUS[r.state],
            "loaded_at": iso_local(r.loaded_at),
            "uptime_hours": round(uptime / 3600, 6),
            "request_count": self._request_count(slot),
            "total_uptime_seconds": round(uptime, 3),
            "load_count": r.load_count,
            "last_load_seconds": r.last_load_s,
        }

    async def list_models(self, request: Request) -> Response:
        models = [self._describe(slot) for slot in self._slots(access_of(request.scope)).values()]
        return _json({"models": models, "total_models": len(models)})

    async def get_model(self, request: Request) -> Response:
        return _json(self._describe(self._slot(request)))

    async def load(self, request: Request) -> Response:
        slot = self._slot(request)
        await self.services.scheduler.load(slot.model.name)
        return self._done(slot, "loaded")

    async def unload(self, request: Request) -> Response:
        slot = self._slot(request)
        await self.services.scheduler.unload(slot.model.name)
        return self._done(slot, "unloaded")

    @staticmethod
    def _done(slot: Slot, what: str) -> Response:
        name = slot.model.name
        return _json({"status": "success", "model": name, "message": f"Model {name} {what}",
                      "model_status": _OLD_STATUS[slot.residency.state]})

    async def metrics(self, request: Request) -> Response:
        accept = request.headers.get("accept", "")
        if wants_prometheus(accept):
            body, content_type = render(self.services.metrics.registry, accept)
            return Response(body, media_type=content_type)
        slots = self._slots(access_of(request.scope))
        metrics = [self._metrics(slot) for slot in slots.values()]
        return _json({"metrics": metrics,
                      "total_requests": sum(m["request_count"] for m in metrics)})

    async def model_metrics(self, request: Request) -> Response:
        return _json(self._metrics(self._slot(request)))
