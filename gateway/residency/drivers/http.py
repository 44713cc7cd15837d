"""Shared plumbing of the drivers that steer a backend over HTTP."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import aiohttp
import orjson

from gateway.config.schema import BackendConfig, ModelConfig
from gateway.relay.upstream import Upstreams
from gateway.residency.drivers.base import DriverError, LostCallback


async def call(session: aiohttp.ClientSession, method: str, url: str, *,
               json: Any = None, limit_s: float | None = None) -> Any:
    """One control request; its JSON answer, or DriverError naming the URL and the cause."""
    client_timeout = aiohttp.ClientTimeout(total=limit_s) if limit_s else None
    data = orjson.dumps(json) if json is not None else None
    headers = {"content-type": "application/json"} if data is not None else None
    try:
        async with session.request(method, url, data=data, headers=headers,
                                   timeout=client_timeout) as response:
            body = await response.read()
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise DriverError(f"{method} {url} failed: {type(exc).__name__} {exc}".strip()) from exc
    if response.status >= 400:
        text = body.decode("utf-8", "replace")[:500]
        raise DriverError(f"{method} {url} answered {response.status}: {text}")
    try:
        return orjson.loads(body) if body.strip() else None
    except orjson.JSONDecodeError:
        return body.decode("utf-8", "replace")


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

    async def start(self, on_lost: LostCallback) -> None:
        pass  # a model that vanishes is found by reconciling with the backend's truth

    def url_for(self, model: ModelConfig) -> str:
        return self.base_url

    async def close(self) -> None:
        pass
