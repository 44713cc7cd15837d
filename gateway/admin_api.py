"""Operator endpoints beyond the old Swapper API: cache purge."""

from __future__ import annotations

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from gateway.services import Services


class AdminApi:
    def __init__(self, services: Services) -> None:
        self.services = services

    def routes(self) -> list[Route]:
        return [Route("/cache", self.purge_cache, methods=["DELETE"])]

    async def purge_cache(self, request: Request) -> Response:
        """DELETE /cache purges everything; DELETE /cache?model=NAME one model's entries."""
        name = request.query_params.get("model")
        model = self.services.catalog.resolve(name).name if name else None
        removed = await self.services.cache.purge(model)
        body = {"status": "success", "model": model, "removed": removed}
        return Response(orjson.dumps(body), media_type="application/json")
