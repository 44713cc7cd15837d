"""The OpenAI-compatible routes under /v1, and the identity shape: OpenAI answers as they came.

Every call goes the way `calls.pipeline` describes; this front only parses its requests.
"""

from __future__ import annotations

import time
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response

from gateway.calls.parse import ApiCall, parse_call, parse_upload
from gateway.calls.pipeline import Answer, CallPipeline, Frames, json_response
from gateway.config.schema import ModelConfig
from gateway.errors import GatewayError, model_not_found
from gateway.fronts.routing import Route
from gateway.relay.usage import UsageChunkFilter
from gateway.services import Services

_STARTED = int(time.time())


class OpenAIShape:
    """Answers as the backend sent them, but for the usage event the gateway asked for on
    behalf of a client that did not (left out of its stream)."""

    media_type = None

    def json(self, body: bytes) -> bytes:
        return body

    def frames(self, call: ApiCall) -> Frames | None:
        return UsageChunkFilter() if call.usage_added else None

    def heartbeat(self, text: str) -> bytes:
        return f": {text}\n\n".encode()

    def stream_error(self, error: GatewayError) -> bytes:
        return error.sse_event()


IDENTITY = OpenAIShape()


class OpenAIApi:
    def __init__(self, services: Services) -> None:
        self.services = services
        self.pipeline = CallPipeline(services)

    def routes(self) -> list[Route]:
        post = ["POST"]
        return [
            Route("/v1/chat/completions", self.endpoint("chat/completions"), methods=post),
            Route("/v1/completions", self.endpoint("completions"), methods=post),
            Route("/v1/embeddings", self.endpoint("embeddings"), methods=post),
            Route("/v1/responses", self.endpoint("responses"), methods=post),
            # llama.cpp, vLLM, Jina and Cohere clients call rerank by each of these paths
            *(Route(path, self.endpoint("rerank"), methods=post)
              for path in ("/v1/rerank", "/rerank", "/v2/rerank")),
            Route("/v1/images/generations", self.endpoint("images/generations"), methods=post),
            Route("/v1/audio/speech", self.endpoint("audio/speech"), methods=post),
            Route("/v1/audio/transcriptions", self.upload("audio/transcriptions"), methods=post),
            Route("/v1/audio/translations", self.upload("audio/translations"), methods=post),
            Route("/v1/models", self.list_models, methods=["GET"]),
            Route("/v1/models/{model_id:path}", self.get_model, methods=["GET"]),
        ]

    def endpoint(self, name: str) -> Any:
        async def handle(request: Request) -> Answer:
            call = parse_call(name, await self.pipeline.read(request))
            return await self.pipeline.run(request, call, IDENTITY)

        return handle

    def upload(self, name: str) -> Any:
        async def handle(request: Request) -> Answer:
            raw = await self.pipeline.read_upload(request)
            call = parse_upload(name, raw, request.headers.get("content-type", ""))
            return await self.pipeline.run(request, call, IDENTITY)

        return handle

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
