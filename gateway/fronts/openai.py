"""The OpenAI-compatible routes under /v1.

The way of one call: parse → resolve the model → cache lookup (a hit is answered here, without
the scheduler) → join an identical call already in flight, or lead one → lease from the
scheduler (queueing while the model loads) → proxy to the backend → relay, tee into the cache.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import orjson
import structlog
from aiohttp import ClientResponse
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from gateway.cache.replay import Record
from gateway.cache.responses import CacheTicket
from gateway.calls.coalescing import Leadership
from gateway.calls.owner import CallOwner
from gateway.calls.parse import ApiCall, parse_call, too_large
from gateway.config.schema import ModelConfig
from gateway.errors import GatewayError, model_not_found
from gateway.relay.proxy import check_stream_answer
from gateway.relay.stream import SSE_HEADERS, RelayResponse, until_disconnect
from gateway.relay.usage import UsageChunkFilter, UsageScanner, usage_of
from gateway.residency.admission import Lease
from gateway.services import Services

_STARTED = int(time.time())
T = TypeVar("T")
log = structlog.get_logger("gateway")


async def read_body(request: Request, limit: int, timeout_s: float) -> bytes:
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise too_large(limit)
    chunks: list[bytes] = []
    size = 0
    try:
        async with asyncio.timeout(timeout_s):
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise too_large(limit)
                chunks.append(chunk)
    except TimeoutError:
        raise GatewayError(408, f"The request body did not arrive within {timeout_s:g} s.",
                           code="request_timeout") from None
    return b"".join(chunks)


def json_response(body: bytes, status: int = 200,
                  headers: dict[str, str] | None = None) -> Response:
    return Response(body, status_code=status, headers=headers, media_type="application/json")


@dataclass
class Exchange:
    """One API call on its way through the gateway."""

    request: Request
    call: ApiCall
    model: ModelConfig  # the route serving it now
    cache: CacheTicket
    swap_timeout: float | None  # the client's X-Swap-Timeout, if it sent one
    public: ModelConfig  # the model as configured

    @property
    def state(self) -> dict[str, Any]:
        return self.request.scope["state"]

    @property
    def request_id(self) -> str:
        return self.state["request_id"]


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

    # -- the way of one call ----------------------------------------------------------------

    async def handle(self, request: Request, endpoint: str) -> Response | RelayResponse:
        exchange = await self.prepare(request, endpoint)
        services = self.services
        record = await services.cache.lookup(exchange.cache)
        if record is not None:
            return self.replay(exchange, record, "HIT")
        exchange.state["cache"] = exchange.cache.header
        leadership = None
        if exchange.cache.decision.write:
            leadership, leads = services.coalescer.join(exchange.cache.key)
            if not leads:
                return await self.follow(exchange, leadership)
        return await self.owned(CallOwner(services.scheduler, leadership), exchange)

    async def owned(self, owner: CallOwner, exchange: Exchange) -> Response | RelayResponse:
        """Answer under `owner`, which closes when the answer ends: here, or for a stream,
        when the stream does."""
        try:
            if exchange.call.stream:
                response = await self.stream(exchange, owner)
            else:
                response = await until_disconnect(exchange.request.receive,
                                                  self.complete(exchange, owner))
        except BaseException:
            owner.close()
            raise
        return _carry(owner, response)

    async def prepare(self, request: Request, endpoint: str) -> Exchange:
        services = self.services
        server = services.config.server
        raw = await read_body(request, server.max_body_bytes, server.body_timeout_s)
        call = parse_call(endpoint, raw)
        public = services.catalog.resolve(call.model)
        state = request.scope["state"]
        tenant = state.get("key")
        if tenant is not None and not tenant.allows({public.name, call.model}):
            raise model_not_found(call.model)
        model = services.fallback.choose(public)  # the route that serves it now
        backend = services.catalog.backend_of(model)
        if endpoint not in backend.endpoints:
            raise GatewayError(
                404, f"Model '{call.model}' (backend '{backend.name}') does not serve "
                f"/v1/{endpoint}.", code="unsupported_endpoint", param="model",
            )
        state.update(model=public.name, backend=backend.name)
        ticket = services.cache.ticket(call, public, request.headers, state.get("tenant"))
        return Exchange(request, call, model, ticket, _swap_timeout(request), public)

    def replay(self, exchange: Exchange, record: Record,
               cache_header: str) -> Response | RelayResponse:
        """A stored or shared answer: no scheduler, so no model is loaded for it."""
        exchange.state["cache"] = cache_header
        body = self.services.cache.replay(exchange.call, record)
        if isinstance(body, bytes):
            return json_response(body, headers={"x-cache": cache_header})
        return RelayResponse(_async(body), headers={**SSE_HEADERS, "x-cache": cache_header})

    async def follow(self, exchange: Exchange,
                     leadership: Leadership) -> Response | RelayResponse:
        """Wait for the identical call in flight; make our own if it ends without an answer."""
        owner = CallOwner(self.services.scheduler)  # for that call of our own, if it comes to it
        if exchange.call.stream:
            headers = {**SSE_HEADERS, "x-cache": "MISS", "x-coalesced": "true"}
            return _carry(owner, RelayResponse(self.stream_after_follow(exchange, owner,
                                                                        leadership),
                                               headers=headers))
        record = await until_disconnect(exchange.request.receive, leadership.outcome())
        if record is not None:
            return self.replay(exchange, record, "MISS")
        return await self.owned(owner, exchange)

    async def complete(self, exchange: Exchange, owner: CallOwner) -> Response:
        call, services = exchange.call, self.services
        body = await self.on_next_route(exchange, owner, lambda route: (
            services.embeddings.submit(call, route) if call.endpoint == "embeddings"
            else services.fetch_json(call, route, exchange.request.headers,
                                     exchange.request_id, exchange.swap_timeout)))
        owner.answered(services.cache.store_json(exchange.cache, call, body))
        exchange.state["usage"] = usage_of(body)
        return json_response(body, headers={"x-cache": exchange.cache.header})

    async def on_next_route(self, exchange: Exchange, owner: CallOwner,
                            attempt: Callable[[ModelConfig], Awaitable[T]]) -> T:
        """Run `attempt` on the model's route; if its backend refuses connections and the
        model has a fallback that is up, run it once more there."""
        try:
            return await attempt(exchange.model)
        except GatewayError as error:
            alternative = self.services.fallback.choose(exchange.public)
            if error.code != "backend_unreachable" or alternative is exchange.model:
                raise
        log.info("fallback.used", model=exchange.public.name, backend=alternative.backend)
        owner.drop_lease()  # the first route's, if the attempt took one
        exchange.model = alternative
        exchange.state["backend"] = alternative.backend
        return await attempt(alternative)

    # -- streams ----------------------------------------------------------------------------

    async def stream(self, exchange: Exchange, owner: CallOwner) -> Response | RelayResponse:
        return await self.on_next_route(exchange, owner,
                                        lambda route: self.stream_on(exchange, owner, route))

    async def stream_on(self, exchange: Exchange, owner: CallOwner,
                        route: ModelConfig) -> Response | RelayResponse:
        """Hold the status line while the model loads, up to `stream_hold_s`: a short wait can
        still end in a real 503 with Retry-After, which SDKs retry. Past that, start the stream
        and keep the client company with `: loading` comments until the lease comes."""
        swapper, server = self.services.config.swapper, self.services.config.server
        swap_timeout = exchange.swap_timeout or swapper.model_swap_timeout
        granted = owner.ask(route, max(swap_timeout, swapper.load_timeout_s))
        hold = min(server.stream_hold_s, swap_timeout)
        if not granted.done():
            await until_disconnect(exchange.request.receive, asyncio.wait((granted,), timeout=hold))
        if not granted.done() and hold >= swap_timeout:
            raise owner.gave_up(swap_timeout)
        headers = {**SSE_HEADERS, "x-cache": exchange.cache.header}
        if not granted.done():
            return RelayResponse(self.stream_after_wait(exchange, owner, granted),
                                 headers=headers)
        lease = granted.result()  # a failed load is raised here, with its own status
        response = await until_disconnect(exchange.request.receive,
                                          self.open_stream(exchange, owner, lease))
        if response.content_type == "application/json":  # a backend that does not stream
            proxy = self.services.proxy
            body = await proxy.read_json(response, lease.target,
                                         proxy.renamer(exchange.call, lease.target))
            owner.answered(self.services.cache.store_json(exchange.cache, exchange.call, body))
            return json_response(body, headers={"x-cache": exchange.cache.header})
        headers["content-type"] = response.headers.get("content-type", headers["content-type"])
        return RelayResponse(self.relay(exchange, owner, response, lease), headers=headers)

    async def open_stream(self, exchange: Exchange, owner: CallOwner,
                          lease: Lease) -> ClientResponse:
        exchange.state["wait_ms"] = owner.waited_ms()
        response = await self.services.proxy.open(
            exchange.call, lease.target, exchange.request.headers, exchange.request_id)
        owner.opened(response)
        check_stream_answer(lease.target.backend, response)
        return response

    async def heartbeat(self, exchange: Exchange, task: asyncio.Future[Any],
                        what: str) -> AsyncIterator[bytes]:
        """SSE comments every few seconds until `task` is done, so no proxy times out; each
        says how long the wait has lasted."""
        interval = self.services.config.server.heartbeat_s
        started = time.monotonic()
        while not task.done():
            waited = time.monotonic() - started
            yield f": {what} {exchange.call.model} ({waited:.0f} s)\n\n".encode()
            await asyncio.wait((task,), timeout=interval)

    async def stream_after_follow(self, exchange: Exchange, owner: CallOwner,
                                  leadership: Leadership) -> AsyncIterator[bytes]:
        outcome = asyncio.ensure_future(leadership.outcome())
        try:
            async for comment in self.heartbeat(exchange, outcome, "waiting for"):
                yield comment
        finally:
            outcome.cancel()
        record = outcome.result()
        if record is not None:
            for chunk in self.services.cache.replay(exchange.call, record):
                yield chunk  # type: ignore[misc]
            return
        swapper = self.services.config.swapper
        try:
            granted = owner.ask(exchange.model, swapper.load_timeout_s)
        except GatewayError as exc:
            yield exc.sse_event()
            return
        async for chunk in self.stream_after_wait(exchange, owner, granted):
            yield chunk

    async def stream_after_wait(self, exchange: Exchange, owner: CallOwner,
                                granted: asyncio.Future[Lease]) -> AsyncIterator[bytes]:
        async for comment in self.heartbeat(exchange, granted, "loading"):
            yield comment
        try:
            response = await self.open_stream(exchange, owner, granted.result())
        except GatewayError as exc:
            yield exc.sse_event()
            return
        async with contextlib.aclosing(
                self.relay(exchange, owner, response, granted.result())) as chunks:
            async for chunk in chunks:  # closed at once if our own client leaves
                yield chunk

    async def relay(self, exchange: Exchange, owner: CallOwner, response: ClientResponse,
                    lease: Lease) -> AsyncIterator[bytes]:
        """The upstream stream, teed into the cache; usage the gateway asked for on the
        client's behalf is read, then left out of what the client sees."""
        proxy, call = self.services.proxy, exchange.call
        chunks = proxy.iter_stream(call, response, lease.target, proxy.renamer(call, lease.target))
        if exchange.cache.decision.write:
            chunks = self.services.cache.tee(exchange.cache, call, chunks, owner.answered)
        scanner = UsageScanner()
        hidden = UsageChunkFilter() if call.usage_added else None
        try:
            async for chunk in chunks:
                exchange.state.setdefault("first_byte_at", time.perf_counter())
                scanner.feed(chunk)
                yield hidden.feed(chunk) if hidden else chunk
            if hidden:
                yield hidden.flush()
        finally:
            await chunks.aclose()  # type: ignore[attr-defined]
            exchange.state["usage"] = scanner.usage

    # -- models ------------------------------------------------------------------------------

    async def list_models(self, request: Request) -> Response:
        tenant = request.scope["state"].get("key")
        data = [self.describe(model) for model in self.services.catalog.models()
                if tenant is None or tenant.allows({model.name, *model.aliases})]
        return json_response(orjson.dumps({"object": "list", "data": data}))

    async def get_model(self, request: Request) -> Response:
        name = request.path_params["model_id"]
        model = self.services.catalog.resolve(name)
        tenant = request.scope["state"].get("key")
        if tenant is not None and not tenant.allows({model.name, name}):
            raise model_not_found(name)
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


def _carry(owner: CallOwner, response: Response | RelayResponse) -> Response | RelayResponse:
    """A stream takes its call's owner along and closes it when it ends; any other answer is
    complete here, and so is the call."""
    if isinstance(response, RelayResponse):
        response.on_close = owner.close
    else:
        owner.close()
    return response


async def _async(chunks: Iterator[bytes]) -> AsyncIterator[bytes]:
    for chunk in chunks:
        yield chunk

