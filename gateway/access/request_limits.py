"""Limits on what a client may send before its request is even routed."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from starlette.types import Receive, Scope, Send

from gateway.errors import GatewayError


class HeaderLimit:
    """ASGI middleware: 431 when the request's headers exceed `max_bytes` in all (the HTTP
    parser buffers any size, and the proxy would forward them to the backend)."""

    def __init__(self, app: Any, max_bytes: Callable[[], int]) -> None:
        self.app = app
        self.max_bytes = max_bytes  # asked per request: a reload may change it

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            size = sum(len(name) + len(value) for name, value in scope["headers"])
            limit = self.max_bytes()
            if size > limit:
                error = GatewayError(431, f"The request's headers exceed {limit} bytes.",
                                     code="request_header_fields_too_large")
                scope.setdefault("state", {})["error"] = error.code
                await error.response()(scope, receive, send)
                return
        await self.app(scope, receive, send)
