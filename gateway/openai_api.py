"""The OpenAI-compatible routes under /v1."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
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
from gateway.replay import Record
from gateway.response_cache import CacheTicket
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


def json_response(body: bytes, status: int = 200,
                  headers: dict[str, str] | None = None) -> Response:
    return Response(body, status_code=status, headers=headers, media_type="application/json")


@dataclass
class Exchange:
    """One API call on its way through the gateway."""

    request: Request
    call: ApiCall
    model: ModelConfig
    ticket: CacheTicket

    @property
    def request_id(self) -> str:
        return self.request.scope["state"]["request_id"]

    @property
    def swap_timeout(self) -> float | None:
        return _swap_timeout(self.request)


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
        state = request.scope["state"]
        state.update(model=model.name, backend=backend.name)
        ticket = services.cache.ticket(call, model, request.headers, state.get("tenant"))
        exchange = Exchange(request, call, model, ticket)
        record = await services.cache.lookup(exchange.ticket)
        if record is not None:
            return self.replay(exchange, record)
        state["cache"] = exchange.ticket.header
        if call.stream:
            return await self.stream(exchange)
        return await until_disconnect(request.receive, self.complete(exchange))

    def replay(self, exchange: Exchange, record: Record) -> Response | RelayResponse:
        """A cache hit: answered without the scheduler, so no model is loaded for it."""
        exchange.request.scope["state"]["cache"] = "HIT"
        body = self.services.cache.replay(exchange.call, record)
        if isinstance(body, bytes):
            return json_response(body, headers={"x-cache": "HIT"})
        return RelayResponse(_async(body), headers={**SSE_HEADERS, "x-cache": "HIT"})

    async def complete(self, exchange: Exchange) -> Response:
        proxy, call = self.services.proxy, exchange.call
        lease = await self.services.scheduler.acquire(exchange.model, exchange.swap_timeout)
        try:
            response = await proxy.open(call, lease.target, exchange.request.headers,
                                        exchange.request_id)
            body = await proxy.read_json(response, lease.target, proxy.renamer(call, lease.target))
        finally:
            lease.release()
        self.services.cache.store_json(exchange.ticket, call, body)
        return json_response(body, headers={"x-cache": exchange.ticket.header})

    async def stream(self, exchange: Exchange) -> RelayResponse:
        ticket = self.services.scheduler.request(exchange.model)
        headers = {**SSE_HEADERS, "x-cache": exchange.ticket.header}
        if isinstance(ticket, Waiter):
            # Answer at once and keep the client company while the model loads.
            return RelayResponse(self.stream_after_wait(exchange, ticket), headers=headers)
        try:
            response = await until_disconnect(exchange.request.receive, self.services.proxy.open(
                exchange.call, ticket.target, exchange.request.headers, exchange.request_id))
        except BaseException:
            ticket.release()
            raise
        headers["content-type"] = response.headers.get("content-type", headers["content-type"])
        return RelayResponse(self.relay(exchange, response, ticket), headers=headers)

    async def stream_after_wait(self, exchange: Exchange,
                                waiter: Waiter) -> AsyncIterator[bytes]:
        scheduler, proxy = self.services.scheduler, self.services.proxy
        waiting = asyncio.ensure_future(scheduler.wait(waiter, exchange.swap_timeout))
        try:
            while not waiting.done():
                yield f": loading {exchange.call.model}\n\n".encode()
                await asyncio.wait((waiting,), timeout=self.services.config.server.heartbeat_s)
            lease = waiting.result()
        except GatewayError as exc:
            yield exc.sse_event()
            return
        finally:
            waiting.cancel()
        try:
            response = await proxy.open(exchange.call, lease.target, exchange.request.headers,
                                        exchange.request_id)
        except BaseException as exc:
            lease.release()
            if not isinstance(exc, GatewayError):
                raise
            yield exc.sse_event()
            return
        async for chunk in self.relay(exchange, response, lease):
            yield chunk

    async def relay(self, exchange: Exchange, response: ClientResponse,
                    lease: Lease) -> AsyncIterator[bytes]:
        """The upstream stream, teed into the cache; the lease is released however it ends."""
        proxy, call = self.services.proxy, exchange.call
        chunks = proxy.iter_stream(call, response, lease.target, proxy.renamer(call, lease.target))
        if exchange.ticket.decision.write:
            chunks = self.services.cache.tee(exchange.ticket, call, chunks)
        try:
            async for chunk in chunks:
                yield chunk
        finally:
            await chunks.aclose()  # type: ignore[attr-defined]
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


async def _async(chunks: Iterator[bytes]) -> AsyncIterator[bytes]:
    for chunk in chunks:
        yield chunk
