"""Errors in the shape of the API the client speaks.

Every error the gateway answers is a GatewayError rendered in OpenAI's shape, wherever it is
raised: a handler, the router (unknown route, wrong method), the auth middleware (401, 403, 429)
or the header limit (431). On the routes of another front, this middleware renders the same
error, status and headers in that front's shape instead (Ollama's `{"error": "..."}`, Anthropic's
`{"type": "error", "error": {...}}`). Answers that are not OpenAI errors pass untouched, and the
OpenAI routes are not looked at.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import orjson
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.errors import GatewayError

Render = Callable[[GatewayError], bytes]
Front = tuple[Callable[[str], bool], Render]  # (does this path belong to it, its error body)


class FrontErrors:
    def __init__(self, app: ASGIApp, fronts: Sequence[Front]) -> None:
        self.app = app
        self.fronts = tuple(fronts)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        render = self._render_for(scope)
        if render is None:
            await self.app(scope, receive, send)
            return
        await self.app(scope, receive, _Reshaping(send, render))

    def _render_for(self, scope: Scope) -> Render | None:
        if scope["type"] != "http":
            return None
        return next((render for owns, render in self.fronts if owns(scope["path"])), None)


class _Reshaping:
    """A `send` that holds back an error answer until its body is whole, then re-renders it."""

    def __init__(self, send: Send, render: Render) -> None:
        self.send = send
        self.render = render
        self.start: Message | None = None
        self.body = b""

    async def __call__(self, message: Message) -> None:
        if message["type"] == "http.response.start" and message["status"] >= 400 \
                and _is_json(message):
            self.start = message
            return
        if self.start is None or message["type"] != "http.response.body":
            await self.send(message)
            return
        self.body += message.get("body", b"")
        if message.get("more_body", False):
            return
        start, body = self.start, self._reshaped(self.start["status"], self.body)
        headers = [(k, v) for k, v in start.get("headers", ()) if k.lower() != b"content-length"]
        headers.append((b"content-length", str(len(body)).encode()))
        await self.send({**start, "headers": headers})
        await self.send({"type": "http.response.body", "body": body, "more_body": False})

    def _reshaped(self, status: int, body: bytes) -> bytes:
        error = _openai_error(status, body)
        return body if error is None else self.render(error)


def _is_json(message: Message) -> bool:
    return any(k.lower() == b"content-type" and v.startswith(b"application/json")
               for k, v in message.get("headers", ()))


def _openai_error(status: int, body: bytes) -> GatewayError | None:
    try:
        payload: Any = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    error = payload.get("error") if isinstance(payload, dict) else None
    if not isinstance(error, dict) or not isinstance(error.get("message"), str):
        return None
    return GatewayError(status, error["message"], code=error.get("code"),
                        param=error.get("param"), type=error.get("type"))
