"""API keys, admin rights and per-key limits, as ASGI middleware in front of every route.

No keys configured: the gateway is open (a warning at start). Keys configured: every route but
/health, /ready, /metrics and /ui needs `Authorization: Bearer KEY` or `x-api-key: KEY`; admin
routes need a key marked `admin`. Keys are compared by digest in constant time and never logged; the
key's name is the tenant everywhere (logs, cache scope, metrics).
"""

from __future__ import annotations

import hashlib
import hmac
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from aiolimiter import AsyncLimiter
from starlette.types import Receive, Scope, Send

from gateway.config.schema import AuthConfig, KeyConfig
from gateway.errors import GatewayError

# Probes, Prometheus and the read-only status page (no keys or prompts on it) stay open.
PUBLIC = frozenset({"/health", "/ready", "/metrics", "/ui"})
_WINDOW_S = 60.0


def is_admin_route(method: str, path: str) -> bool:
    return (
        (method == "POST" and path.startswith("/models/") and path.endswith(("/load", "/unload")))
        or (method == "DELETE" and path == "/cache")
        or (method == "POST" and path.startswith("/admin/"))
    )


def _digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


def remaining(limiter: AsyncLimiter) -> int:
    """Whole units the limiter would grant now (binary search over its public check)."""
    low, high = 0, int(limiter.max_rate)
    while low < high:
        mid = (low + high + 1) // 2
        if limiter.has_capacity(mid):
            low = mid
        else:
            high = mid - 1
    return low


@dataclass(eq=False)
class Tenant:
    """A key's live state: its limiters and how many of its requests are running."""

    config: KeyConfig
    requests: AsyncLimiter | None = None
    tokens: AsyncLimiter | None = None
    in_flight: int = 0
    digest: bytes = field(default=b"", repr=False)

    @property
    def name(self) -> str:
        return self.config.name

    def allows(self, model_names: set[str]) -> bool:
        return self.config.models is None or not self.config.models.isdisjoint(model_names)

    async def admit(self) -> None:
        """Count one request against the key's limits, or refuse it with 429."""
        limits = self.config
        if limits.max_concurrent is not None and self.in_flight >= limits.max_concurrent:
            raise self._limited(f"more than {limits.max_concurrent} concurrent requests", 1.0)
        if self.tokens is not None and not self.tokens.has_capacity(1):
            raise self._limited("the tokens-per-minute budget is spent",
                                _WINDOW_S / self.tokens.max_rate)
        if self.requests is not None:
            if not self.requests.has_capacity(1):
                raise self._limited("the requests-per-minute limit is reached",
                                    _WINDOW_S / self.requests.max_rate)
            await self.requests.acquire(1)  # has capacity: returns at once
        self.in_flight += 1

    async def charge_tokens(self, used: int) -> None:
        """Debit the answer's tokens, capped at what the budget still holds (so never waits):
        a request is admitted while any budget is left and charged after its answer."""
        if self.tokens is not None and used > 0:
            amount = min(used, remaining(self.tokens))
            if amount > 0:
                await self.tokens.acquire(amount)

    def headers(self) -> dict[str, str]:
        headers: dict[str, str] = {}
        for kind, limiter in (("requests", self.requests), ("tokens", self.tokens)):
            if limiter is not None:
                headers[f"x-ratelimit-limit-{kind}"] = str(int(limiter.max_rate))
                headers[f"x-ratelimit-remaining-{kind}"] = str(remaining(limiter))
                headers[f"x-ratelimit-reset-{kind}"] = f"{_WINDOW_S / limiter.max_rate:.3f}s"
        return headers

    def _limited(self, why: str, retry_s: float) -> GatewayError:
        return GatewayError(
            429, f"Rate limit for key '{self.name}': {why}. Retry after {retry_s:.1f} s.",
            code="rate_limit_exceeded",
            headers={"retry-after": str(max(1, math.ceil(retry_s))),
                     "retry-after-ms": str(int(retry_s * 1000)), **self.headers()},
        )


class KeyRing:
    def __init__(self, config: AuthConfig) -> None:
        self.open = config.open
        self._tenants = {_digest(key.secret): self._tenant(key) for key in config.keys}

    @staticmethod
    def _tenant(key: KeyConfig) -> Tenant:
        return Tenant(
            key,
            requests=AsyncLimiter(key.requests_per_minute, _WINDOW_S)
            if key.requests_per_minute else None,
            tokens=AsyncLimiter(key.tokens_per_minute, _WINDOW_S)
            if key.tokens_per_minute else None,
            digest=_digest(key.secret),
        )

    def identify(self, headers: Mapping[str, str]) -> Tenant:
        presented = _presented_key(headers)
        if presented is None:
            raise GatewayError(401, "You didn't provide an API key. Send it as "
                               "'Authorization: Bearer KEY'.", code="missing_api_key")
        digest = _digest(presented)
        tenant = self._tenants.get(digest)
        if tenant is None or not hmac.compare_digest(tenant.digest, digest):
            raise GatewayError(401, "Incorrect API key provided.", code="invalid_api_key")
        return tenant


def _presented_key(headers: Mapping[str, str]) -> str | None:
    authorization = headers.get("authorization", "")
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return headers.get("x-api-key") or None


class AuthMiddleware:
    """`keyring` is asked on every request, so a config reload takes effect at once."""

    def __init__(self, app: Any, keyring: Callable[[], KeyRing]) -> None:
        self.app = app
        self.keyring = keyring

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        keys = self.keyring()
        if scope["type"] != "http" or keys.open or scope["path"] in PUBLIC:
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        try:
            tenant = keys.identify(headers)
            if is_admin_route(scope["method"], scope["path"]) and not tenant.config.admin:
                raise GatewayError(403, "This endpoint needs an admin key.", code="admin_only")
            await tenant.admit()
        except GatewayError as error:
            scope.setdefault("state", {})["error"] = error.code
            await error.response()(scope, receive, send)
            return
        scope.setdefault("state", {}).update(tenant=tenant.name, key=tenant)
        try:
            await self.app(scope, receive, _with_headers(send, tenant.headers))
        finally:
            tenant.in_flight -= 1
            usage = scope["state"].get("usage")
            await tenant.charge_tokens(usage.total if usage else 0)


def _with_headers(send: Send, make: Any) -> Send:
    async def send_with_limits(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            extra = [(k.encode(), v.encode()) for k, v in make().items()]
            message["headers"] = [*message.get("headers", ()), *extra]
        await send(message)

    return send_with_limits
