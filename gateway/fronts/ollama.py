"""Ollama's own API in front (/api/*), for Open WebUI, IDE plugins and the `ollama` clients.

Every call is translated to the OpenAI endpoint it means and goes the way of any other call
(`calls.pipeline`): to every backend, Ollama included (by its /v1), with the same swapping,
queueing, cache, coalescing and limits. Why translated and not passed on natively, and what each
field becomes: docs/fronts.md. Model files are the config's business: /api/pull, /api/delete
and the like answer an error naming the Swapper API route to use.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response

from gateway import __version__
from gateway.access.auth import access_of
from gateway.calls.parse import ApiCall, parse_call
from gateway.calls.pipeline import Answer, CallPipeline, Frames, Resolved, json_response
from gateway.config.schema import ModelConfig
from gateway.errors import GatewayError, model_not_found
from gateway.fronts.routing import Route
from gateway.fronts.translate import ollama
from gateway.residency.snapshot import ModelStatus
from gateway.services import Services
from policies.types import State

# The Ollama API version this front speaks (tools in streams, structured outputs, /api/embed);
# clients compare it to decide which fields they may send.
OLLAMA_API_VERSION = "0.9.0"
PREFIX = "/api/"
_FOREVER = timedelta(days=365 * 292)  # how Ollama shows a model that never expires
_MANAGED_ELSEWHERE = {
    "pull": "The gateway does not download models. Pull the model on its backend, add it to "
            "the gateway's config (`models:`) and POST /admin/reload; POST /models/NAME/load "
            "loads it.",
    "push": "The gateway does not push models to a registry: push from the Ollama server that "
            "holds the model. GET /models lists the models the gateway serves.",
    "create": "The gateway does not create models: create it on the Ollama server, then add it "
              "to the gateway's config (`models:`) and POST /admin/reload.",
    "copy": "The gateway does not copy models: give the model another name with `aliases:` in "
            "the gateway's config, then POST /admin/reload.",
    "delete": "The gateway does not delete models. POST /models/NAME/unload frees its memory; "
              "to stop serving it, remove it from the gateway's config and POST /admin/reload.",
    "blobs": "The gateway does not store model files: upload them to the Ollama server itself.",
}
_UNLOAD = ("Unloading is the gateway's decision (its scheduler and each model's `ttl`): an "
           "admin key may POST /models/{name}/unload.")


def owns(path: str) -> bool:
    return path.startswith(PREFIX)


def error_body(error: GatewayError) -> bytes:
    return ollama.error_body(error)


class OllamaShape:
    """/api/chat and /api/generate answers: one JSON document, or NDJSON lines."""

    media_type = ollama.NDJSON

    def __init__(self, request: Request, name: str, generate: bool) -> None:
        self.state: dict[str, Any] = request.scope["state"]
        self.name = name  # as the client spelled it: Ollama echoes it back
        self.generate = generate
        self.started = time.perf_counter()

    def timing(self) -> ollama.Timing:
        return ollama.Timing(self.started, (self.state.get("wait_ms") or 0) / 1000)

    def json(self, body: bytes) -> bytes:
        answer = ollama.chat_answer(orjson.loads(body), self.name, self.timing(),
                                    time.perf_counter(), self.generate)
        return orjson.dumps(answer)

    def frames(self, call: ApiCall) -> Frames | None:
        return ollama.NdjsonFrames(self.name, self.timing(), time.perf_counter, self.generate)

    def heartbeat(self, text: str) -> bytes:
        return ollama.heartbeat_line(self.name, self.generate)

    def stream_error(self, error: GatewayError) -> bytes:
        return ollama.error_body(error) + b"\n"


class OllamaEmbedShape(OllamaShape):
    """/api/embed and /api/embeddings answers (never streamed)."""

    media_type = "application/json"

    def __init__(self, request: Request, name: str, legacy: bool) -> None:
        super().__init__(request, name, generate=False)
        self.legacy = legacy

    def json(self, body: bytes) -> bytes:
        answer = ollama.embed_answer(orjson.loads(body), self.name, self.timing(),
                                     time.perf_counter(), self.legacy)
        return orjson.dumps(answer)


class OllamaApi:
    def __init__(self, services: Services) -> None:
        self.services = services
        self.pipeline = CallPipeline(services)
        self.started = datetime.now(UTC)

    def routes(self) -> list[Route]:
        post = ["POST"]
        return [
            Route("/api/chat", self.chat, methods=post),
            Route("/api/generate", self.generate, methods=post),
            Route("/api/embed", self.embed(legacy=False), methods=post),
            Route("/api/embeddings", self.embed(legacy=True), methods=post),
            Route("/api/tags", self.tags, methods=["GET"]),
            Route("/api/ps", self.ps, methods=["GET"]),
            Route("/api/show", self.show, methods=post),
            Route("/api/version", self.version, methods=["GET"]),
            *(Route(f"/api/{name}", self.managed_elsewhere(name), methods=["POST"])
              for name in ("pull", "push", "create", "copy")),
            Route("/api/delete", self.managed_elsewhere("delete"), methods=["DELETE"]),
            Route("/api/blobs/{digest}", self.managed_elsewhere("blobs"),
                  methods=["HEAD", "POST"]),
        ]

    # -- calls ------------------------------------------------------------------------------

    async def chat(self, request: Request) -> Answer:
        body, resolved = await self.read(request)
        if not body.get("messages"):
            return await self.load(request, body, resolved, generate=False)
        openai_body = ollama.chat_request(body, resolved.public.name)
        return await self.run(request, "chat/completions", openai_body, resolved,
                              OllamaShape(request, body["model"], generate=False))

    async def generate(self, request: Request) -> Answer:
        body, resolved = await self.read(request)
        if not body.get("prompt") and not body.get("suffix"):
            return await self.load(request, body, resolved, generate=True)
        endpoint, openai_body = ollama.generate_request(body, resolved.public.name)
        return await self.run(request, endpoint, openai_body, resolved,
                              OllamaShape(request, body["model"], generate=True))

    def embed(self, legacy: bool) -> Callable[[Request], Awaitable[Answer]]:
        async def handle(request: Request) -> Answer:
            body, resolved = await self.read(request)
            openai_body = ollama.embed_request(body, resolved.public.name, legacy)
            return await self.run(request, "embeddings", openai_body, resolved,
                                  OllamaEmbedShape(request, body["model"], legacy))

        return handle

    async def read(self, request: Request) -> tuple[dict[str, Any], Resolved]:
        body = ollama.request_body(await self.pipeline.read(request))
        return body, self.pipeline.resolve(request, self.known_name(body["model"]))

    async def run(self, request: Request, endpoint: str, body: dict[str, Any],
                  resolved: Resolved, shape: OllamaShape) -> Answer:
        # Parsed as an OpenAI body, so the same checks hold (ranges, required inputs).
        call = parse_call(endpoint, orjson.dumps(body))
        return await self.pipeline.run(request, call, shape, resolved)

    async def load(self, request: Request, body: dict[str, Any], resolved: Resolved,
                   generate: bool) -> Response:
        """No prompt: Ollama loads the model (`keep_alive: 0`: unloads it). The gateway loads
        it the way any call would; unloading is its own decision."""
        if body.get("keep_alive") in (0, "0", "0s", "0m"):
            raise GatewayError(501, _UNLOAD.format(name=resolved.public.name),
                               code="not_supported")
        await self.pipeline.leased(request, resolved)
        return json_response(orjson.dumps(ollama.loaded_answer(body["model"], generate)))

    def known_name(self, name: str) -> str:
        """Ollama clients may add the default tag to a name: `qwen:latest` means `qwen`."""
        if self.services.catalog.get(name) is None and name.endswith(":latest"):
            return name.removesuffix(":latest")
        return name

    # -- models -----------------------------------------------------------------------------

    def visible(self, request: Request) -> list[ModelConfig]:
        access = access_of(request.scope)
        return [model for model in self.services.catalog.models() if access.may_see(model)]

    async def tags(self, request: Request) -> Response:
        models = [self.tag(model) for model in self.visible(request)]
        return json_response(orjson.dumps({"models": models}))

    async def ps(self, request: Request) -> Response:
        status = self.services.scheduler.status()
        running = []
        for model in self.visible(request):
            loaded = [r for r in status.routes_of(model.name) if r.state is State.LOADED]
            if loaded:
                running.append(self.running(model, loaded[0]))
        return json_response(orjson.dumps({"models": running}))

    async def show(self, request: Request) -> Response:
        body = ollama.request_body(await self.pipeline.read(request))
        model = self.services.catalog.resolve(self.known_name(body["model"]))
        if not access_of(request.scope).may_see(model):
            raise model_not_found(body["model"])
        return json_response(orjson.dumps(self.describe(model)))

    async def version(self, request: Request) -> Response:
        return json_response(orjson.dumps({"version": OLLAMA_API_VERSION,
                                           "gateway": f"swapper-gateway {__version__}"}))

    def managed_elsewhere(self, name: str) -> Callable[[Request], Awaitable[Response]]:
        async def handle(request: Request) -> Response:
            raise GatewayError(501, _MANAGED_ELSEWHERE[name], code="not_supported")

        return handle

    def tag(self, model: ModelConfig) -> dict[str, Any]:
        return {
            "name": model.name,
            "model": model.name,
            "modified_at": self.started.isoformat(),
            "size": int(model.size_gb * 1e9),
            "digest": ollama.digest(model.name),
            "details": self.details(model),
        }

    def running(self, model: ModelConfig, route: ModelStatus) -> dict[str, Any]:
        """A loaded model as /api/ps shows it: its size as measured where the backend tells."""
        size = int(route.resident_gb * 1e9)
        wall = datetime.now(UTC)
        expires = (wall + _FOREVER if route.ttl_expires_at is None
                   else datetime.fromtimestamp(route.ttl_expires_at, UTC))
        entry = {**self.tag(model), "size": size, "size_vram": size,
                 "expires_at": expires.isoformat()}
        if model.num_ctx:
            entry["context_length"] = model.num_ctx
        return entry

    def describe(self, model: ModelConfig) -> dict[str, Any]:
        backend = self.services.catalog.backend_of(model)
        parameters = f"num_ctx {model.num_ctx}" if model.num_ctx else ""
        return {
            "modelfile": "",
            "parameters": parameters,
            "template": "",
            "details": self.details(model),
            "model_info": {"general.name": model.name, "swapper.backend": backend.name,
                           "swapper.backend_kind": backend.kind,
                           "swapper.served_name": model.served_name,
                           "swapper.size_gb": model.size_gb},
            "capabilities": ["embedding"] if model.type == "embedding" else ["completion"],
            "modified_at": self.started.isoformat(),
        }

    @staticmethod
    def details(model: ModelConfig) -> dict[str, Any]:
        # The gateway knows a model by its config, not its file: these stay unknown.
        return {"parent_model": "", "format": "", "family": "", "families": None,
                "parameter_size": "", "quantization_level": ""}
