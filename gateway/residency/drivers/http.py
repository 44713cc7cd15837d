"""Shared plumbing of the drivers that steer a backend over HTTP."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import aiohttp
import orjson

from gateway.config.schema import BackendConfig, ModelConfig
from gateway.redaction import public_line
from gateway.relay.upstream import Upstreams
from gateway.residency.drivers.base import DriverError, LostCallback, Measured

# Refusals that may pass by themselves; any other 4xx stays until an operator acts (a model
# Ollama has not pulled, a vLLM started without sleep mode).
_TRANSIENT = frozenset({408, 409, 425, 429})


async def call(session: aiohttp.ClientSession, method: str, url: str, *,
               json: Any = None, limit_s: float | None = None, who: str = "the backend") -> Any:
    """One control request; its JSON answer, or DriverError saying what went wrong in words a
    client may read (`who` names the backend), with the URL and the cause in its detail."""
    client_timeout = aiohttp.ClientTimeout(total=limit_s) if limit_s else None
    data = orjson.dumps(json) if json is not None else None
    headers = {"content-type": "application/json"} if data is not None else None
    try:
        async with session.request(method, url, data=data, headers=headers,
                                   timeout=client_timeout) as response:
            body = await response.read()
    except (aiohttp.ClientError, TimeoutError) as exc:
        detail = f"{method} {url} failed: {type(exc).__name__} {exc}".strip()
        raise DriverError(_unreachable(who, exc), detail=detail) from exc
    if response.status >= 400:
        text = body.decode("utf-8", "replace")
        raise DriverError(f"{who} answered {response.status}: {_error_text(text)}",
                          detail=f"{method} {url} answered {response.status}: {text[:2000]}",
                          retryable=response.status >= 500 or response.status in _TRANSIENT,
                          status=response.status)
    try:
        return orjson.loads(body) if body.strip() else None
    except orjson.JSONDecodeError:
        return body.decode("utf-8", "replace")


def _unreachable(who: str, exc: BaseException) -> str:
    if isinstance(exc, TimeoutError | aiohttp.ServerTimeoutError):
        return f"{who} did not answer in time"
    if isinstance(exc, aiohttp.ClientConnectorError):
        return f"{who} is unreachable"
    return f"{who} broke off the connection"


def _error_text(body: str) -> str:
    """A backend's error, as one line: the `error` (or `error.message`) of a JSON body."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        data = None
    error = data.get("error") if isinstance(data, dict) else None
    if isinstance(error, dict):
        error = error.get("message")
    return public_line(error if isinstance(error, str) else body) or "(no details)"


async def answers(session: aiohttp.ClientSession, url: str, limit_s: float = 5.0) -> bool:
    try:
        await call(session, "GET", url, limit_s=limit_s)
    except DriverError:
        return False
    return True


class HttpDriver:
    """What every driver of a long-running HTTP backend shares: one base URL for all its
    models, the backend's pooled session, and nothing to start or stop."""

    manages_residency = True
    sleeps = False

    def __init__(self, backend: BackendConfig, models: Sequence[ModelConfig],
                 upstreams: Upstreams) -> None:
        assert backend.base_url is not None
        self.backend = backend
        self.base_url = backend.base_url
        self.upstreams = upstreams
        self.models = list(models)

    @property
    def _session(self) -> aiohttp.ClientSession:
        return self.upstreams.session(self.backend.name)

    async def _call(self, method: str, path: str, *, json: Any = None,
                    limit_s: float | None = None) -> Any:
        """One control request to `base_url + path` (see `call`)."""
        return await call(self._session, method, self.base_url + path, json=json,
                          limit_s=limit_s, who=f"backend '{self.backend.name}'")

    async def _answers(self, path: str) -> bool:
        return await answers(self._session, self.base_url + path)

    async def start(self, on_lost: LostCallback) -> None:
        pass  # a model that vanishes is found by reconciling with the backend's truth

    def url_for(self, model: ModelConfig) -> str:
        return self.base_url

    def server_of(self, model: ModelConfig) -> tuple[int, int] | None:
        return None  # a server someone else runs

    def after_request(self, model: ModelConfig) -> None:
        pass

    async def unload(self, model: ModelConfig) -> None:
        raise NotImplementedError

    async def unload_fully(self, model: ModelConfig) -> None:
        await self.unload(model)

    async def measure(self) -> dict[str, Measured] | None:
        return None  # a server that does not say what its models hold

    async def free_gb(self) -> float | None:
        return None  # on another host, most likely: this host's GPUs say nothing of it

    async def close(self) -> None:
        pass
