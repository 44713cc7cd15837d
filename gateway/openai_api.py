"""The OpenAI-compatible routes under /v1."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import orjson
from aiohttp import ClientResponse
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from gateway.calls import ApiCall, parse_call, too_large
from gateway.config import ModelConfig
from gateway.errors import GatewayError
from gateway.relay import SSE_HEADERS, RelayResponse, until_disconnect
from gateway.scheduler import Lease, Waiter
from gateway.services import Services

_STARTED = int(time.time())


async def read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise too_large(limit)
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large(limit)
        chunks.append(chunk)
    return b"".join(chunks)


def json_response(body: bytes, status: int = 200) -> Response:
    return Response(body, status_code=status, media_type="application/json")


class OpenAIApi:
    def __init__(self, services: Services) -> None:
        self.services = services

    def routes(self) -> list[Route]:
        post = ["POST"]
        return [
            Route("/v1/chat/completions", self.endpoint("chat/completions"), methods=post),
            Route("/v1/completions", self.endpoint("completions"), methods=post),
            Route("/v1/embeddings", self.endpoint("embeddings"), methods=post),
            Route("/v1/responses", self.endpoint("responses"), methods=post),
            Route("/v1/messages", self.endpoint("messages"), methods=post),
            Route("/v1/models", self.list_models, methods=["GET"]),
            Route("/v1/models/{model_id:path}", self.get_model, methods=["GET"]),
        ]

    def endpoint(self, name: str) -> Any:
        async def handle(request: Request) -> Response | RelayResponse:
            return await self.handle(request, name)

        return handle

    async def handle(self, request: Request, endpoint: str) -> Response | RelayResponse:
        services = self.services
        raw = await read_body(request, services.config.server.max_body_bytes)
        call = parse_call(endpoint, raw)
        model = services.catalog.resolve(call.model)
        backend = services.catalog.backend_of(model)
        if endpoint not in backend.endpoints:
            raise GatewayError(
                404, f"Model '{call.model}' (backend '{backend.name}') does not serve "
                f"/v1/{endpoint}.", code="unsupported_endpoint", param="model",
            )
        request.scope["state"].update(model=model.name, backend=backend.name)
        if call.stream:
            return await self.stream(request, call, model)
        return await until_disconnect(request.receive, self.complete(request, call, model))

    async def complete(self, request: Request, call: ApiCall, model: ModelConfig) -> Response:
        proxy = self.services.proxy
        lease = await self.services.scheduler.acquire(model, _swap_timeout(request))
        try:
            response = await proxy.open(call, lease.target, request.headers, _rid(request))
            body = await proxy.read_json(response, lease.target, proxy.renamer(call, lease.target))
        finally:
            lease.release()
        return json_response(body)

    async def stream(self, request: Request, call: ApiCall, model: ModelConfig) -> RelayResponse:
        scheduler = self.services.scheduler
        ticket = scheduler.request(model)
        if isinstance(ticket, Waiter):
            # Answer at once and keep the client company while the model loads.
            return RelayResponse(self.stream_after_wait(request, call, ticket))
        try:
            response = await until_disconnect(
                request.receive, self.services.proxy.open(call, ticket.target, request.headers,
                                                          _rid(request))
            )
        except BaseException:
            ticket.release()
            raise
        headers = dict(SSE_HEADERS)
        headers["content-type"] = response.headers.get("content-type", SSE_HEADERS["content-type"])
        return RelayResponse(self.relay(call, response, ticket), headers=headers)

    async def stream_after_wait(self, request: Request, call: ApiCall,
                                waiter: Waiter) -> AsyncIterator[bytes]:
        scheduler, proxy = self.services.scheduler, self.services.proxy
        waiting = asyncio.ensure_future(scheduler.wait(waiter, _swap_timeout(request)))
        try:
            while not waiting.done():
                yield f": loading {call.model}\n\n".encode()
                await asyncio.wait((waiting,), timeout=self.services.config.server.heartbeat_s)
            lease = waiting.result()
        except GatewayError as exc:
            yield exc.sse_event()
            return
        finally:
            waiting.cancel()
        try:
            response = await proxy.open(call, lease.target, request.headers, _rid(request))
        except BaseException as exc:
            lease.release()
            if not isinstance(exc, GatewayError):
                raise
            yield exc.sse_event()
            return
        async for chunk in self.relay(call, response, lease):
            yield chunk

    async def relay(self, call: ApiCall, response: ClientResponse,
                    lease: Lease) -> AsyncIterator[bytes]:
        """The upstream stream; the lease is released however it ends."""
        proxy = self.services.proxy
        chunks = proxy.iter_stream(call, response, lease.target, proxy.renamer(call, lease.target))
        try:
            async for chunk in chunks:
                yield chunk
        finally:
            await chunks.aclose()
            lease.release()

    async def list_models(self, request: Request) -> Response:
        data = [self.describe(model) for model in self.services.catalog.models()]
        return json_response(orjson.dumps({"object": "list", "data": data}))

    async def get_model(self, request: Request) -> Response:
        model = self.services.catalog.resolve(request.path_params["model_id"])
        return json_response(orjson.dumps(self.describe(model)))

    def describe(self, model: ModelConfig) -> dict[str, Any]:
        backend = self.services.catalog.backend_of(model)
        return {
            "id": model.name,
            "object": "model",
            "created": _STARTED,
            "owned_by": backend.name,
            "backend": backend.kind,
            "served_name": model.served_name,
            "aliases": list(model.aliases),
            "type": model.type,
            "size_gb": model.size_gb,
        }


def _swap_timeout(request: Request) -> float | None:
    """A client may shorten or lengthen its own wait for a swap with `X-Swap-Timeout: SECONDS`."""
    raw = request.headers.get("x-swap-timeout")
    try:
        value = float(raw) if raw else None
    except ValueError:
        value = None
    if raw and (value is None or not 0 < value < 86400):
        raise GatewayError(400, "X-Swap-Timeout must be a number of seconds between 0 and 86400.",
                           param="X-Swap-Timeout")
    return value


def _rid(request: Request) -> str:
    return request.scope["state"]["request_id"]
