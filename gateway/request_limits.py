"""Limits on what a client may send before its request is even routed."""

from __future__ import annotations

from typing import Any

from gateway.errors import GatewayError
from gateway.relay import Receive, Scope, Send


class HeaderLimit:
    """ASGI middleware: 431 when the request's headers exceed `max_bytes` in all (the HTTP
    parser buffers any size, and the proxy would forward them to the backend)."""

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            size = sum(len(name) + len(value) for name, value in scope["headers"])
            if size > self.max_bytes:
                error = GatewayError(431, f"The request's headers exceed {self.max_bytes} bytes.",
                                     code="request_header_fields_too_large")
                await error.response()(scope, receive, send)
                return
        await self.app(scope, receive, send)
