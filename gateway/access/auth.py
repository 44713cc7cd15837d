"""API keys, admin rights and per-key limits, as ASGI middleware in front of every route.

One rule for who sees what (the table is docs/access.md): no keys configured, the gateway is open
(a warning at start). Keys configured: the probes (/health, /ready) and the Prometheus scrape need
no key; every other route needs `Authorization: Bearer KEY` or `x-api-key: KEY` (or, for a
browser reading /ui, the key as a Basic password); admin routes need a key marked `admin`. A
caller sees only the models its key may use (`Access.may_see`): any other answers 404 like an
unknown one. Keys are compared by digest in constant time and never logged; the key's name is the
tenant everywhere (logs, cache scope, metrics).

Cross-site requests never act. A browser sends cached Basic credentials by itself, even on a
request another site's page makes, so Basic counts only for reading /ui; and an admin route
refuses a request whose `Origin` names another site (open gateway included), which a browser
always sends on a cross-site POST or DELETE. The status page's actions send the key typed into
the page in an `Authorization` header from the page's own origin.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from aiolimiter import AsyncLimiter
from starlette.types import Receive, Scope, Send

from gateway.config.schema import AuthConfig, KeyConfig, ModelConfig
from gateway.errors import GatewayError
from gateway.metrics import wants_prometheus

# Probes answer without a key: a kubelet or Docker HEALTHCHECK carries none.
PROBES = frozenset({"/health", "/ready"})
_WINDOW_S = 60.0
_REALM = {"www-authenticate": 'Basic realm="Swapper Gateway"'}  # a browser asks for the key


def is_public(method: str, path: str, headers: Mapping[str, str]) -> bool:
    """Probes, and the Prometheus scrape (a ServiceMonitor sends no key)."""
    if method not in ("GET", "HEAD"):
        return False
    return path in PROBES or (path == "/metrics" and wants_prometheus(headers.get("accept", "")))


def is_admin_route(method: str, path: str) -> bool:
    return (
        (method == "POST" and path.startswith("/models/") and path.endswith(("/load", "/unload")))
        or (method == "DELETE" and path == "/cache")
        or (method == "POST" and path.startswith("/admin/"))
    )


def reads_the_page(method: str, path: str) -> bool:
    """The one request a Basic password may authenticate: a browser reading the status page."""
    return method in ("GET", "HEAD") and path == "/ui"


def cross_site(headers: Mapping[str, str]) -> bool:
    """A browser request made by another site's page: its `Origin` is not this gateway's own
    host (as the client addressed it, or as a proxy in front forwarded it). No `Origin`: not a
    browser's cross-site request (curl, SDKs, same-origin GETs)."""
    origin = headers.get("origin")
    if origin is None:
        return False
    _, _, netloc = origin.partition("://")
    if not netloc:
        return True  # "null": a sandboxed frame, a file:// page
    hosts = {headers.get("host", "")}
    hosts.update(h.strip() for h in headers.get("x-forwarded-host", "").split(",") if h.strip())
    return netloc.lower() not in {h.lower() for h in hosts}


def _refuse_cross_site() -> GatewayError:
    return GatewayError(403, "Admin actions are refused from another site's page (its Origin "
                        "is not this gateway).", code="cross_origin")


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


@dataclass(frozen=True)
class Access:
    """Who is asking, for the routes that decide what to show. Set on every HTTP request as
    `scope["state"]["access"]` (`scope["state"]["key"]` holds the same tenant)."""

    tenant: Tenant | None  # None: no valid key was presented
    open: bool = False  # no keys configured: everyone sees everything

    @property
    def admin(self) -> bool:
        return self.open or (self.tenant is not None and self.tenant.config.admin)

    def may_see(self, model: ModelConfig) -> bool:
        """Whether the caller may use `model` (and so see its name, state and figures)."""
        if self.open:
            return True
        return self.tenant is not None and self.tenant.allows({model.name, *model.aliases})


_CLOSED = Access(None)


def access_of(scope: Scope) -> Access:
    """The caller's access; without the middleware's word, nothing is visible (fail closed)."""
    access = scope.get("state", {}).get("access")
    return access if isinstance(access, Access) else _CLOSED


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

    def identify(self, headers: Mapping[str, str], page: bool = False) -> Tenant:
        """The presented key's tenant, or 401. `page`: a browser reading /ui, which may send
        the key as a Basic password and is asked for it (a Basic challenge)."""
        presented = _presented_key(headers, basic=page)
        extra = _REALM if page else None
        if presented is None:
            raise GatewayError(401, "You didn't provide an API key. Send it as "
                               "'Authorization: Bearer KEY'.", code="missing_api_key",
                               headers=extra)
        tenant = self.find(presented)
        if tenant is None:
            raise GatewayError(401, "Incorrect API key provided.", code="invalid_api_key",
                               headers=extra)
        return tenant

    def find(self, presented: str) -> Tenant | None:
        digest = _digest(presented)
        tenant = self._tenants.get(digest)
        if tenant is None or not hmac.compare_digest(tenant.digest, digest):
            return None
        return tenant

    def optional(self, headers: Mapping[str, str]) -> Tenant | None:
        """On a public route: a valid key widens what is shown, a bad one is no key at all."""
        presented = _presented_key(headers)
        return self.find(presented) if presented is not None else None


def _presented_key(headers: Mapping[str, str], basic: bool = False) -> str | None:
    """`basic`: a Basic password counts as the key (see the module's note on cross-site)."""
    authorization = headers.get("authorization", "")
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    if scheme.lower() == "basic" and token.strip():
        return _basic_password(token.strip()) if basic else None
    return headers.get("x-api-key") or None


def _basic_password(token: str) -> str | None:
    """A browser's `Basic base64(user:password)`: the password is the key, any user name."""
    try:
        decoded = base64.b64decode(token, validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None
    return decoded.partition(":")[2] or None


class AuthMiddleware:
    """`keyring` is asked on every request, so a config reload takes effect at once."""

    def __init__(self, app: Any, keyring: Callable[[], KeyRing]) -> None:
        self.app = app
        self.keyring = keyring

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        keys = self.keyring()
        state = scope.setdefault("state", {})
        method, path = scope["method"], scope["path"]
        admin = is_admin_route(method, path)
        # An open gateway reads no header but on its admin routes (the usual call: none)
        headers = {} if keys.open and not admin else {
            k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        if admin and cross_site(headers):
            error = _refuse_cross_site()
            state["error"] = error.code
            await error.response()(scope, receive, send)
            return
        if keys.open:
            state["access"] = Access(None, open=True)
            await self.app(scope, receive, send)
            return
        if is_public(method, path, headers):
            tenant = keys.optional(headers)  # no limits counted: probes and scrapes are free
            state["access"] = Access(tenant)
            if tenant is not None:
                state.update(tenant=tenant.name, key=tenant)
            await self.app(scope, receive, send)
            return
        try:
            tenant = keys.identify(headers, page=reads_the_page(method, path))
            if is_admin_route(method, path) and not tenant.config.admin:
                raise GatewayError(403, "This endpoint needs an admin key.", code="admin_only")
            await tenant.admit()
        except GatewayError as error:
            state["error"] = error.code
            await error.response()(scope, receive, send)
            return
        state.update(tenant=tenant.name, key=tenant, access=Access(tenant))
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
