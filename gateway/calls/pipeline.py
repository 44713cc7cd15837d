"""The way of one API call, whichever API its client speaks.

A front turns its request into an `ApiCall` for an OpenAI endpoint and names a `Shape` (how its
client wants answers); from there every call goes the same way, so every front gets the same
swapping, queueing, cache, coalescing and limits:

    resolve the model ─► cache lookup ──hit──► replay the record, in the front's shape
                                      └─miss─► join an identical call in flight, or lead one
    CallOwner ─► lease from the scheduler (queueing while the model loads; a stream holds its
    status line for a short load, then keeps its client company with heartbeats)
    ─► proxy to the backend ─► relay, tee into the cache ─► the front's shape ─► client
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import structlog
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.types import Send

from gateway.cache.replay import Record, record_from_json, render_sse
from gateway.cache.responses import CacheTicket
from gateway.calls.coalescing import Leadership
from gateway.calls.owner import CallOwner
from gateway.calls.parse import ApiCall, too_large
from gateway.config.schema import BackendConfig, ModelConfig
from gateway.errors import GatewayError, model_not_found
from gateway.relay.client import UpstreamResponse
from gateway.relay.proxy import UpstreamStream, check_stream_answer
from gateway.relay.stream import (
    SSE_HEADERS,
    Body,
    Relay,
    RelayResponse,
    Step,
    body_of,
    until_disconnect,
    write,
)
from gateway.relay.usage import UsageScanner, usage_of
from gateway.residency.admission import Lease
from gateway.services import Services

T = TypeVar("T")
Answer = Response | RelayResponse
log = structlog.get_logger("gateway")


Frames = Step  # a front's translation of one stream, fed the upstream bytes piece by piece


class Shape(Protocol):
    """How a front presents a call's answers. Errors before the answer are raised as
    GatewayError and rendered in the front's shape by `fronts.errors.FrontErrors`."""

    # Of the front's streams; None: as the backend sent it (the OpenAI front relays bytes).
    media_type: str | None

    def json(self, body: bytes) -> bytes:
        """The complete OpenAI JSON answer in the front's shape."""
        ...

    def frames(self, call: ApiCall) -> Frames | None:
        """A translator for one upstream OpenAI SSE stream; None relays it as it comes."""
        ...

    def heartbeat(self, text: str) -> bytes:
        """A frame that keeps the client company while the model loads (and says `text`)."""
        ...

    def stream_error(self, error: GatewayError) -> bytes:
        """An error once the stream has started, in the front's stream."""
        ...


async def read_body(request: Request, limit: int, timeout_s: float) -> bytes:
    chunks: list[bytes] = []
    await _receive(request, limit, timeout_s, chunks.append)
    return b"".join(chunks)


async def read_upload(request: Request, limit: int, timeout_s: float) -> bytearray:
    """An upload held once: each piece is appended where it will stay (a bytearray grows in
    place), not collected and joined into a second copy."""
    buffer = bytearray()
    await _receive(request, limit, timeout_s, buffer.extend)
    return buffer


async def _receive(request: Request, limit: int, timeout_s: float,
                   keep: Callable[[bytes], object]) -> None:
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise too_large(limit)
    size, receive = 0, request.receive
    try:
        async with asyncio.timeout(timeout_s):
            while True:  # the ASGI messages themselves: Starlette's stream() costs more
                message = await receive()
                if message["type"] == "http.disconnect":
                    raise ClientDisconnect
                chunk = message.get("body", b"")
                size += len(chunk)
                if size > limit:
                    raise too_large(limit)
                keep(chunk)
                if not message.get("more_body", False):
                    return
    except TimeoutError:
        raise GatewayError(408, f"The request body did not arrive within {timeout_s:g} s.",
                           code="request_timeout") from None


def json_response(body: bytes, status: int = 200,
                  headers: dict[str, str] | None = None) -> Response:
    return Response(body, status_code=status, headers=headers, media_type="application/json")


@dataclass(frozen=True)
class Resolved:
    """The model a client named, as the gateway serves it now."""

    public: ModelConfig  # the model as configured
    model: ModelConfig  # the route serving it now (a fallback, when the first is down)
    backend: BackendConfig  # the route's


@dataclass
class Exchange:
    """One API call on its way through the gateway."""

    request: Request
    call: ApiCall
    model: ModelConfig  # the route serving it now
    cache: CacheTicket
    swap_timeout: float | None  # the client's X-Swap-Timeout, if it sent one
    public: ModelConfig  # the model as configured
    shape: Shape

    @property
    def state(self) -> dict[str, Any]:
        return self.request.scope["state"]

    @property
    def request_id(self) -> str:
        return self.state["request_id"]


class CallPipeline:
    def __init__(self, services: Services) -> None:
        self.services = services

    async def read(self, request: Request) -> bytes:
        server = self.services.config.server
        return await read_body(request, server.max_body_bytes, server.body_timeout_s)

    async def read_upload(self, request: Request) -> bytearray:
        server = self.services.config.server
        return await read_upload(request, server.max_body_bytes, server.body_timeout_s)

    def resolve(self, request: Request, name: str) -> Resolved:
        """The model `name` means for this caller; 404 for one its key may not use."""
        services = self.services
        public = services.catalog.resolve(name)
        tenant = request.scope["state"].get("key")
        if tenant is not None and not tenant.allows({public.name, name}):
            raise model_not_found(name)
        model = services.fallback.choose(public)
        return Resolved(public, model, services.catalog.backend_of(model))

    # -- the way of one call ----------------------------------------------------------------

    async def run(self, request: Request, call: ApiCall, shape: Shape,
                  resolved: Resolved | None = None) -> Answer:
        exchange = self.prepare(request, call, shape, resolved)
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

    async def leased(self, request: Request, resolved: Resolved,
                     swap_timeout: float | None = None) -> None:
        """Load the model (queueing like any call) and give its lease straight back: what a
        client's "load this model" asks for, on fronts that have such a call."""
        request.scope["state"].update(model=resolved.public.name, backend=resolved.backend.name)
        async with self.services.scheduler.leased(resolved.model,
                                                  swap_timeout or _swap_timeout(request)):
            pass

    def prepare(self, request: Request, call: ApiCall, shape: Shape,
                resolved: Resolved | None) -> Exchange:
        services = self.services
        resolved = resolved or self.resolve(request, call.model)
        backend = resolved.backend
        state = request.scope["state"]
        state.update(model=resolved.public.name, backend=backend.name)  # errors count for it too
        if call.endpoint not in backend.endpoints:
            raise GatewayError(
                404, f"Model '{call.model}' (backend '{backend.name}') does not serve "
                f"/v1/{call.endpoint}.", code="unsupported_endpoint", param="model",
            )
        ticket = services.cache.ticket(call, resolved.public, request.headers, state.get("tenant"))
        return Exchange(request, call, resolved.model, ticket, _swap_timeout(request),
                        resolved.public, shape)

    async def owned(self, owner: CallOwner, exchange: Exchange) -> Answer:
        """Answer under `owner`, which closes when the answer ends: here, or for a stream,
        when the stream does."""
        try:
            if exchange.call.stream or exchange.call.relayed:
                response = await self.stream(exchange, owner)
            else:
                response = await until_disconnect(exchange.request.receive,
                                                  self.complete(exchange, owner))
        except BaseException:
            owner.close()
            raise
        return _carry(owner, response)

    def replay(self, exchange: Exchange, record: Record, cache_header: str) -> Answer:
        """A stored or shared answer: no scheduler, so no model is loaded for it."""
        exchange.state["cache"] = cache_header
        body = self.services.cache.replay(exchange.call, record)
        if isinstance(body, bytes):
            return json_response(exchange.shape.json(body), headers={"x-cache": cache_header})
        return RelayResponse(body_of(self.shaped(exchange, body)),
                             headers=self.stream_headers(exchange, cache_header))

    def shaped(self, exchange: Exchange, chunks: Iterable[bytes]) -> Iterator[bytes]:
        """A replayed OpenAI stream in the front's shape."""
        frames = exchange.shape.frames(exchange.call)
        if frames is None:
            yield from chunks
            return
        for chunk in chunks:
            yield frames.feed(chunk)
        yield frames.flush()

    def stream_headers(self, exchange: Exchange, cache_header: str,
                       upstream_type: str | None = None) -> dict[str, str]:
        headers = {**SSE_HEADERS, "x-cache": cache_header}
        media_type = exchange.shape.media_type or upstream_type
        if media_type:
            headers["content-type"] = media_type
        return headers

    async def follow(self, exchange: Exchange, leadership: Leadership) -> Answer:
        """Wait for the identical call in flight; make our own if it ends without an answer."""
        owner = CallOwner(self.services.scheduler)  # for that call of our own, if it comes to it
        if exchange.call.stream:
            headers = {**self.stream_headers(exchange, "MISS"), "x-coalesced": "true"}
            return _carry(owner, RelayResponse(self.after_follow(exchange, owner, leadership),
                                               headers=headers))
        record = await until_disconnect(exchange.request.receive, leadership.outcome())
        if record is not None:
            return self.replay(exchange, record, "MISS")
        return await self.owned(owner, exchange)

    async def complete(self, exchange: Exchange, owner: CallOwner) -> Response:
        call, services = exchange.call, self.services
        body = await self.on_next_route(exchange, lambda route: (
            services.embeddings.submit(call, route) if call.endpoint == "embeddings"
            else services.fetch_json(call, route, exchange.request.headers,
                                     exchange.request_id, exchange.swap_timeout)))
        owner.answered(services.cache.store_json(exchange.cache, call, body))
        exchange.state["usage"] = usage_of(body)
        return json_response(exchange.shape.json(body),
                             headers={"x-cache": exchange.cache.header})

    async def on_next_route(self, exchange: Exchange,
                            attempt: Callable[[ModelConfig], Awaitable[T]]) -> T:
        """Run `attempt` on the model's route; if its backend refuses connections and the
        model has a fallback that is up, run it once more there (a stream's second `ask`
        gives back what the first route held)."""
        try:
            return await attempt(exchange.model)
        except GatewayError as error:
            alternative = self.services.fallback.choose(exchange.public)
            if error.code != "backend_unreachable" or alternative is exchange.model:
                raise
        log.info("fallback.used", model=exchange.public.name, backend=alternative.backend)
        exchange.model = alternative
        exchange.state["backend"] = alternative.backend
        return await attempt(alternative)

    # -- streams ----------------------------------------------------------------------------

    async def stream(self, exchange: Exchange, owner: CallOwner) -> Answer:
        return await self.on_next_route(exchange,
                                        lambda route: self.stream_on(exchange, owner, route))

    async def stream_on(self, exchange: Exchange, owner: CallOwner,
                        route: ModelConfig) -> Answer:
        """Hold the status line while the model loads, up to `stream_hold_s`: a short wait can
        still end in a real 503 with Retry-After, which SDKs retry. Past that, start the stream
        and keep the client company with heartbeats until the lease comes. An answer relayed
        as it comes (audio) has no frame to keep company with: it holds the status line for
        the whole wait, as a JSON call does."""
        swapper, server = self.services.config.swapper, self.services.config.server
        swap_timeout = exchange.swap_timeout or swapper.model_swap_timeout
        granted = owner.ask(route, max(swap_timeout, swapper.load_timeout_s))
        hold = swap_timeout if exchange.call.relayed else min(server.stream_hold_s, swap_timeout)
        if not granted.done():
            await until_disconnect(exchange.request.receive, asyncio.wait((granted,), timeout=hold))
        if not granted.done() and hold >= swap_timeout:
            raise owner.gave_up(swap_timeout)
        if not granted.done():
            return RelayResponse(self.after_wait(exchange, owner, granted),
                                 headers=self.stream_headers(exchange, exchange.cache.header))
        lease = granted.result()  # a failed load is raised here, with its own status
        response = await until_disconnect(exchange.request.receive,
                                          self.open_stream(exchange, owner, lease))
        if response.content_type == "application/json" and not exchange.call.relayed:
            return await self.json_to_stream(exchange, owner, response, lease)
        headers = self.stream_headers(exchange, exchange.cache.header,
                                      response.headers.get("content-type"))
        return RelayResponse(self.relay(exchange, owner, response, lease), headers=headers)

    async def json_to_stream(self, exchange: Exchange, owner: CallOwner,
                             response: UpstreamResponse, lease: Lease) -> Answer:
        """A backend that does not stream answered JSON: the OpenAI front passes it on as it
        is; a translating front gets it as the stream its client asked for."""
        proxy, call = self.services.proxy, exchange.call
        body = await proxy.read_json(response, lease.target, proxy.renamer(call, lease.target))
        owner.answered(self.services.cache.store_json(exchange.cache, call, body))
        exchange.state["usage"] = usage_of(body)
        record = record_from_json(call.endpoint, body)
        if exchange.shape.media_type is None or record is None:
            return json_response(exchange.shape.json(body),
                                 headers={"x-cache": exchange.cache.header})
        chunks = render_sse({**record, "model": call.model}, include_usage=True)
        return RelayResponse(body_of(self.shaped(exchange, chunks)),
                             headers=self.stream_headers(exchange, exchange.cache.header))

    async def open_stream(self, exchange: Exchange, owner: CallOwner,
                          lease: Lease) -> UpstreamResponse:
        exchange.state["wait_ms"] = owner.waited_ms()
        response = await self.services.proxy.open(
            exchange.call, lease.target, exchange.request.headers, exchange.request_id)
        owner.opened(response)
        if not exchange.call.relayed:
            check_stream_answer(lease.target.backend, response)
        return response

    async def heartbeat(self, exchange: Exchange, task: asyncio.Future[Any],
                        what: str) -> AsyncIterator[bytes]:
        """A heartbeat every few seconds until `task` is done, so no proxy times out; each
        says how long the wait has lasted."""
        interval = self.services.config.server.heartbeat_s
        started = time.monotonic()
        while not task.done():
            waited = time.monotonic() - started
            yield exchange.shape.heartbeat(f"{what} {exchange.call.model} ({waited:.0f} s)")
            await asyncio.wait((task,), timeout=interval)

    def after_follow(self, exchange: Exchange, owner: CallOwner,
                     leadership: Leadership) -> Body:
        async def body(send: Send) -> None:
            outcome = asyncio.ensure_future(leadership.outcome())
            try:
                await body_of(self.heartbeat(exchange, outcome, "waiting for"))(send)
            finally:
                outcome.cancel()
            record = outcome.result()
            if record is not None:
                replayed = self.services.cache.replay(exchange.call, record)
                await body_of(self.shaped(exchange, replayed))(send)
                return
            swapper = self.services.config.swapper
            try:
                granted = owner.ask(exchange.model, swapper.load_timeout_s)
            except GatewayError as exc:
                await write(send, exchange.shape.stream_error(exc))
                return
            await self.after_wait(exchange, owner, granted)(send)

        return body

    def after_wait(self, exchange: Exchange, owner: CallOwner,
                   granted: asyncio.Future[Lease]) -> Body:
        async def body(send: Send) -> None:
            await body_of(self.heartbeat(exchange, granted, "loading"))(send)
            try:
                response = await self.open_stream(exchange, owner, granted.result())
            except GatewayError as exc:
                await write(send, exchange.shape.stream_error(exc))
                return
            await self.relay(exchange, owner, response, granted.result())(send)

        return body

    def relay(self, exchange: Exchange, owner: CallOwner, response: UpstreamResponse,
              lease: Lease) -> Relay:
        """The upstream stream, renamed, teed into the cache, its usage read, in the front's
        shape (for the OpenAI front: as it came, but for the usage the gateway asked for on
        the client's behalf, which is read, then left out of what the client sees)."""
        services, call, state = self.services, exchange.call, exchange.state
        steps: list[Step] = []
        renamer = services.proxy.renamer(call, lease.target)
        if renamer is not None:
            steps.append(renamer)
        tee = None
        if exchange.cache.decision.write:
            tee = services.cache.tee(exchange.cache, call, owner.answered)
            steps.append(tee)
        scanner = UsageScanner()
        steps.append(scanner)
        frames = exchange.shape.frames(call)
        if frames is not None:
            steps.append(frames)

        def first() -> None:
            state["first_byte_at"] = time.perf_counter()

        def end(whole: bool) -> None:
            state["usage"] = scanner.usage
            if tee is not None:
                tee.end(whole)

        return Relay(UpstreamStream(call, response, lease.target.backend), steps, first, end)


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


def _carry(owner: CallOwner, response: Answer) -> Answer:
    """A stream takes its call's owner along and closes it when it ends; any other answer is
    complete here, and so is the call."""
    if isinstance(response, RelayResponse):
        response.on_close = owner.close
    else:
        owner.close()
    return response
