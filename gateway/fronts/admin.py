"""Operator endpoints beyond the old Swapper API: cache purge, config reload."""

from __future__ import annotations

import orjson
from starlette.requests import Request
from starlette.responses import Response

from gateway.access.auth import access_of
from gateway.config.schema import ConfigError
from gateway.errors import GatewayError, model_not_found
from gateway.fronts.routing import Route
from gateway.services import Services


class AdminApi:
    def __init__(self, services: Services) -> None:
        self.services = services

    def routes(self) -> list[Route]:
        return [
            Route("/cache", self.purge_cache, methods=["DELETE"]),
            Route("/admin/reload", self.reload, methods=["POST"]),
        ]

    async def reload(self, request: Request) -> Response:
        """Re-read the config file; a bad or unsafe one is refused (400) and the old one kept."""
        try:
            config = await self.services.reload()
        except ConfigError as exc:
            raise GatewayError(400, str(exc), code="config_refused") from None
        body = {"status": "success", "source": config.source, "models": list(config.models)}
        return Response(orjson.dumps(body), media_type="application/json")

    async def purge_cache(self, request: Request) -> Response:
        """DELETE /cache purges everything; DELETE /cache?model=NAME one model's entries."""
        name = request.query_params.get("model")
        model = self.services.catalog.resolve(name) if name else None
        if model is not None and not access_of(request.scope).may_see(model):
            raise model_not_found(name)
        removed = await self.services.cache.purge(model.name if model else None)
        body = {"status": "success", "model": model.name if model else None, "removed": removed}
        return Response(orjson.dumps(body), media_type="application/json")
