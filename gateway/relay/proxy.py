"""Forwarding one API call to its backend and turning every upstream failure into a GatewayError."""

from __future__ import annotations

import errno
import re
from collections.abc import Mapping
from dataclasses import dataclass

import orjson
import structlog

from gateway.calls.parse import ApiCall
from gateway.config.schema import BackendConfig
from gateway.errors import OPENAI_ERROR_TYPES, GatewayError
from gateway.redaction import first_meaningful, public_line
from gateway.relay.client import (
    Client,
    ConnectFailed,
    IncompleteAnswer,
    UpstreamError,
    UpstreamResponse,
    UpstreamTimeout,
)
from gateway.relay.health import BackendHealth
from gateway.relay.stream import ModelRenamer
from gateway.relay.upstream import Upstreams

# Request headers that belong to this hop (or to the gateway's own auth), never forwarded.
_DROP_REQUEST_HEADERS = frozenset({
    "host", "content-length", "connection", "keep-alive", "transfer-encoding", "te", "upgrade",
    "proxy-authorization", "proxy-connection", "authorization", "x-api-key", "cookie",
    "accept-encoding", "expect",
})
_DONE_MARKER = b"data: [DONE]"
# Ollama reloads a model when a request asks for another context size; the gateway pins it at
# load time (`num_ctx` in the model's config) and keeps requests from changing it.
_OLLAMA_RELOADING_FIELDS = frozenset({"options", "num_ctx"})
_ERROR_BODY_LIMIT = 64 * 1024

_HTML_TAG = re.compile(r"<[^>]*>")

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class Target:
    """Where one call goes: the backend, its base URL right now, and its name for the model."""

    backend: BackendConfig
    base_url: str
    served_name: str


def upstream_headers(client_headers: Mapping[str, str], backend: BackendConfig,
                     request_id: str, content_type: str = "application/json") -> dict[str, str]:
    headers = {k: v for k, v in client_headers.items() if k.lower() not in _DROP_REQUEST_HEADERS}
    headers["content-type"] = content_type
    headers["accept-encoding"] = "identity"  # relay bytes as they are; never re-encode
    headers["x-request-id"] = request_id
    if backend.api_key:
        headers["authorization"] = f"Bearer {backend.api_key}"
    return headers


def backend_failure(backend: BackendConfig, exc: BaseException) -> GatewayError:
    """The client-facing error for a failure to talk to `backend`: what happened, in words; the
    address and the exception stay in the log."""
    name = backend.name
    log.warning("backend.failed", backend=name, error=f"{type(exc).__name__}: {exc}"[:500])
    if isinstance(exc, ConnectFailed):
        return GatewayError(502, f"Backend '{name}' is unreachable ({_connect_failure(exc)}).",
                            code="backend_unreachable")
    if isinstance(exc, TimeoutError | UpstreamTimeout):
        return GatewayError(504, f"Backend '{name}' did not answer in time.",
                            code="backend_timeout")
    if isinstance(exc, IncompleteAnswer):
        return GatewayError(502, f"Backend '{name}' sent an incomplete answer.",
                            code="backend_error")
    return GatewayError(502, f"Backend '{name}' failed: the connection broke off.",
                        code="backend_error")


def _connect_failure(exc: ConnectFailed) -> str:
    if exc.errno is None:
        return "its host name does not resolve"
    reason = {errno.ECONNREFUSED: "connection refused", errno.ETIMEDOUT: "connection timed out",
              errno.EHOSTUNREACH: "host unreachable", errno.ENETUNREACH: "network unreachable"}
    return reason.get(exc.errno, "cannot connect")


def wrap_backend_error(backend: BackendConfig, status: int, body: bytes) -> GatewayError:
    """A backend's own 4xx/5xx, kept as it is when OpenAI-shaped (the backend meant it for
    clients), re-wrapped as one scrubbed line otherwise (an HTML page, a traceback)."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        data = None
    error = data.get("error") if isinstance(data, dict) else None
    if isinstance(error, dict) and isinstance(error.get("message"), str):
        # vLLM says type "BadRequestError" and code 400: keep to OpenAI's vocabulary.
        kind = error.get("type")
        code = error.get("code")
        param = error.get("param")
        return GatewayError(
            status, error["message"], code=code if isinstance(code, str) else None,
            param=param if isinstance(param, str) else None,
            type=kind if kind in OPENAI_ERROR_TYPES else None,
        )
    text = error if isinstance(error, str) else body.decode("utf-8", "replace")
    if text.strip():
        log.info("backend.error_answer", backend=backend.name, status=status, body=text[:2000])
    lines = _HTML_TAG.sub(" ", text).splitlines()  # a proxy's error page says it in its title
    said = first_meaningful(lines) or public_line("\n".join(lines))
    message = f"Backend '{backend.name}' answered {status}: {said or '(empty body)'}"
    return GatewayError(status, message, code="backend_error")


def check_stream_answer(backend: BackendConfig, response: UpstreamResponse) -> None:
    """A stream request's answer is SSE, or JSON from a backend that does not stream; anything
    else (an HTML error page from a proxy in between, say) is not relayed."""
    kind = response.content_type
    if kind not in ("text/event-stream", "application/json"):
        response.close()
        raise GatewayError(502, f"Backend '{backend.name}' answered a stream request with "
                                f"'{kind}'.", code="backend_invalid_response")


def _is_json(body: bytes) -> bool:
    """A whole JSON document (a few µs for an answer of a few KB: cheap next to relaying it)."""
    try:
        orjson.loads(body)
    except orjson.JSONDecodeError:
        return False
    return True


class Proxy:
    def __init__(self, upstreams: Upstreams, *, rename_models: bool = True,
                 health: BackendHealth | None = None) -> None:
        self.upstreams = upstreams
        self.rename_models = rename_models
        self.health = health or BackendHealth()

    def renamer(self, call: ApiCall, target: Target) -> ModelRenamer | None:
        if not self.rename_models or call.model == target.served_name or call.relayed:
            return None  # audio is relayed untouched: it names no model
        return ModelRenamer(target.served_name, call.model)

    async def open(self, call: ApiCall, target: Target, headers: Mapping[str, str],
                   request_id: str) -> UpstreamResponse:
        """Send the call; a non-2xx answer is read and raised as a GatewayError."""
        client = self.upstreams.client(target.backend.name)
        url = f"{target.base_url}/v1/{call.endpoint}"
        drop = _OLLAMA_RELOADING_FIELDS if target.backend.kind == "ollama" else frozenset()
        body = call.body_for(target.served_name, drop)
        sent_headers = upstream_headers(headers, target.backend, request_id, call.content_type)
        try:
            response = await self._send(client, url, body, sent_headers, target.backend)
        except GatewayError as error:
            self.health.failed(target.backend.name,
                               unreachable=error.code == "backend_unreachable")
            raise
        if response.status >= 500:
            self.health.failed(target.backend.name)
        else:
            self.health.ok(target.backend.name)
        if response.status >= 400:
            try:
                body = await response.read(_ERROR_BODY_LIMIT)
            except (UpstreamError, TimeoutError) as exc:
                raise backend_failure(target.backend, exc) from exc
            finally:
                response.close()
            raise wrap_backend_error(target.backend, response.status, body)
        return response

    @staticmethod
    async def _send(client: Client, url: str, body: bytes | bytearray,
                    headers: Mapping[str, str], backend: BackendConfig) -> UpstreamResponse:
        try:
            return await client.post(url, body, headers)
        except (UpstreamError, TimeoutError) as exc:
            raise backend_failure(backend, exc) from exc

    async def read_json(self, response: UpstreamResponse, target: Target,
                        renamer: ModelRenamer | None) -> bytes:
        """The whole JSON answer, checked to be JSON and renamed."""
        try:
            body = await response.read()
        except (UpstreamError, TimeoutError) as exc:
            response.close()
            raise backend_failure(target.backend, exc) from exc
        except BaseException:
            response.close()  # cancelled (client gone): drop the connection, stop the backend
            raise
        response.release()
        if not _is_json(body):
            raise GatewayError(502, f"Backend '{target.backend.name}' returned a non-JSON answer.",
                               code="backend_invalid_response")
        return renamer.rename(body) if renamer else body



class UpstreamStream:
    """An upstream SSE answer as a relay reads it (`relay.stream.Source`): its chunks as they
    arrive, and the event that ends it when it broke off or stopped short."""

    __slots__ = ("_backend", "_marked", "_response", "next_chunk")

    def __init__(self, call: ApiCall, response: UpstreamResponse,
                 backend: BackendConfig) -> None:
        self.next_chunk = response.next_chunk  # all that is buffered, in one piece
        self._response, self._backend = response, backend
        self._marked = call.endpoint in ("chat/completions", "completions")  # ends with [DONE]

    def ended(self) -> bytes:
        self._response.release()
        if self._marked and _DONE_MARKER not in self._response.tail():
            message = f"Backend '{self._backend.name}' ended the stream before it was complete."
            return GatewayError(502, message, code="backend_stream_incomplete").sse_event()
        return b""

    def failed(self, exc: UpstreamError | TimeoutError) -> bytes:
        self._response.close()
        return backend_failure(self._backend, exc).sse_event()

    def close(self) -> None:
        self._response.close()  # after `ended`, nothing: the connection went back to the pool
