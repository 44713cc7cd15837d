"""The fronts' routes, and the one layer that turns what a handler or the router raises into an
answer.

Starlette answers exceptions in three layers a request (ServerErrorMiddleware outermost,
ExceptionMiddleware inside the middlewares, and one more around each route), each a coroutine
and a wrapper of `send` that every frame of a stream passes through. `Failures` does it once,
just outside the router, so the access log sees the status and `FrontErrors` reshapes the error
for the front's clients, a crash's 500 included. `Route` is Starlette's, minus its own layer.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import structlog
from starlette import routing
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from gateway.errors import GatewayError
from gateway.relay.stream import ClientGone

log = structlog.get_logger("gateway")
_ANSWERING = "gateway.answering"  # a scope key: the handler returned, its answer is being sent
Handler = Callable[[Request], Awaitable[Any]]  # answers a Response or a RelayResponse


class Route(routing.Route):
    def __init__(self, path: str, handler: Handler, *, methods: Sequence[str]) -> None:
        super().__init__(path, _Endpoint(handler), methods=methods, name=handler.__name__)


class _Endpoint:
    """A handler as an ASGI app: a class, so Starlette adds no exception layer of its own."""

    __slots__ = ("handler",)

    def __init__(self, handler: Handler) -> None:
        self.handler = handler

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = await self.handler(Request(scope, receive, send))
        scope[_ANSWERING] = True  # from here on, a failure may come after the status line
        await response(scope, receive, send)


class Failures:
    """ASGI middleware: an exception before the answer started becomes the answer; one after
    it cannot (the status line is out), and goes on to the server, which closes the
    connection. Every route's endpoint says when its answer begins (`_ANSWERING`): a wrapper
    of `send` would tell as well, but every frame of a stream would pass through it."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        try:
            await self.app(scope, receive, send)
        except Exception as exc:
            if scope.get(_ANSWERING):
                if not isinstance(exc, ClientGone | ClientDisconnect | OSError):
                    log.error("request.crashed", error=repr(exc), exc_info=exc)
                raise
            await answer_for(scope, exc)(scope, receive, send)


def answer_for(scope: Scope, exc: Exception) -> Response:
    """The answer to `exc`; the error's code goes to the access log."""
    if isinstance(exc, ClientGone | ClientDisconnect):
        return Response(status_code=499)  # nginx's "client closed request"; nobody reads it
    if isinstance(exc, GatewayError):
        error = exc
    elif isinstance(exc, HTTPException):
        error = _routing_error(scope, exc)
    else:
        log.error("request.crashed", error=repr(exc), exc_info=exc)
        error = GatewayError(500, "The gateway failed to handle this request.",
                             code="internal_error")
    scope.setdefault("state", {})["error"] = error.code or error.type
    return error.response()


def _routing_error(scope: Scope, exc: HTTPException) -> GatewayError:
    """The router's 404 and 405, said in the words of an API."""
    method, path = scope["method"], scope["path"]
    if exc.status_code == 404:
        return GatewayError(404, f"Unknown endpoint: {method} {path}", headers=exc.headers,
                            code="unknown_endpoint")
    if exc.status_code == 405:
        return GatewayError(405, f"Method {method} is not allowed on {path}",
                            headers=exc.headers)
    return GatewayError(exc.status_code, str(exc.detail), headers=exc.headers)
