"""Anthropic's Messages API in front (/v1/messages), for Claude-style agents and SDKs.

A backend that declares the `messages` endpoint gets the request as it came, and its answer goes
back as it came; for every other backend the call is translated to chat/completions and the answer
back to a Message or its event stream (`translate.anthropic`). Either way it goes the way of any
other call (`calls.pipeline`). Errors come in Anthropic's shape (`fronts.errors`).
"""

from __future__ import annotations

import orjson
from starlette.requests import Request

from gateway.calls.parse import ApiCall, parse_call
from gateway.calls.pipeline import Answer, CallPipeline, Frames
from gateway.errors import GatewayError
from gateway.fronts.routing import Route
from gateway.fronts.translate import anthropic
from gateway.services import Services

PATHS = ("/v1/messages", "/v1/messages/count_tokens")


class MessagesShape:
    """A backend's own Messages answers, passed on as they came."""

    media_type: str | None = None

    def json(self, body: bytes) -> bytes:
        return body

    def frames(self, call: ApiCall) -> Frames | None:
        return None

    def heartbeat(self, text: str) -> bytes:
        return anthropic.PING  # Anthropic's own keep-alive event, which clients skip

    def stream_error(self, error: GatewayError) -> bytes:
        return anthropic.event(anthropic.error_payload(error))


class TranslatedShape(MessagesShape):
    """Chat completions answers as Messages."""

    media_type = anthropic.SSE

    def __init__(self, name: str) -> None:
        self.name = name  # as the client asked for it

    def json(self, body: bytes) -> bytes:
        return orjson.dumps(anthropic.message(orjson.loads(body), self.name))

    def frames(self, call: ApiCall) -> Frames | None:
        return anthropic.MessageEvents(self.name)


PASSTHROUGH = MessagesShape()


class AnthropicApi:
    def __init__(self, services: Services) -> None:
        self.pipeline = CallPipeline(services)

    def routes(self) -> list[Route]:
        return [Route("/v1/messages", self.messages, methods=["POST"]),
                Route("/v1/messages/count_tokens", self.count_tokens, methods=["POST"])]

    async def messages(self, request: Request) -> Answer:
        raw = await self.pipeline.read(request)
        body = anthropic.request_body(raw)
        resolved = self.pipeline.resolve(request, body["model"])
        if "messages" in resolved.backend.endpoints:
            call = parse_call("messages", raw)
            return await self.pipeline.run(request, call, PASSTHROUGH, resolved)
        chat = anthropic.chat_request(body, resolved.public.name)
        call = parse_call("chat/completions", orjson.dumps(chat))
        return await self.pipeline.run(request, call, TranslatedShape(body["model"]), resolved)

    async def count_tokens(self, request: Request) -> Answer:
        """Only a backend that counts them can: it must declare `messages/count_tokens`."""
        call = parse_call("messages/count_tokens", await self.pipeline.read(request))
        return await self.pipeline.run(request, call, PASSTHROUGH)


def owns(path: str) -> bool:
    return path in PATHS


def error_body(error: GatewayError) -> bytes:
    return anthropic.error_body(error)

