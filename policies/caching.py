"""Whether a request may use the response cache, for how long, and under which key."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import orjson

ENDPOINTS = frozenset({"chat/completions", "completions", "embeddings", "rerank"})
# Answers that are a pure function of the input, whatever the sampling fields say.
_PURE = frozenset({"embeddings", "rerank"})

# Body fields that never change the answer: transport (`stream`, `stream_options`: a completion is
# stored once and replayed either way), the resolved model (already in the key), and bookkeeping.
_IGNORED_FIELDS = frozenset(
    {
        "model",
        "stream",
        "stream_options",
        "user",
        "metadata",
        "store",
        "safety_identifier",
        "prompt_cache_key",
    }
)
_INT64_MIN, _UINT64_MAX = -(2**63), 2**64 - 1
# The longest lifetime a stored answer may get, whatever a client's `X-Cache-TTL` or `max-age`
# asks: Redis refuses an expiry beyond 64-bit milliseconds, and one client must not be able to
# make the cache's writes fail for everyone. (`cache.max_ttl_s` sets it.)
MAX_TTL_S = 30 * 24 * 3600.0
# Cache keys live in a key space of their own under the namespace, beside the replicas'
# coordination keys (`<namespace>:coord:...`), so that purging the cache never touches those.
KEY_SPACE = "cache"


@dataclass(frozen=True)
class CacheDecision:
    """read: a stored answer may be served; write: a fresh complete answer may be stored."""

    read: bool
    write: bool
    ttl_s: float
    reason: str

    @property
    def bypass(self) -> bool:
        return not (self.read or self.write)


def cache_decision(
    endpoint: str,
    body: Mapping[str, Any],
    headers: Mapping[str, str],
    *,
    model_enabled: bool,
    default_ttl_s: float,
    max_ttl_s: float = MAX_TTL_S,
) -> CacheDecision:
    """Decide from the endpoint, the body's determinism and the client's cache headers.

    `Cache-Control: no-store` skips the cache entirely, `no-cache` skips reading only.
    `X-Cache-TTL: N` (preferred) or `Cache-Control: max-age=N` sets the lifetime of a stored
    answer and also opts a non-deterministic request in; a lifetime of 0 means "do not cache".
    Every lifetime is cut to `max_ttl_s`.
    """
    if endpoint not in ENDPOINTS or not model_enabled:  # the headers are not even read
        return CacheDecision(read=False, write=False, ttl_s=min(default_ttl_s, max_ttl_s),
                             reason="endpoint" if endpoint not in ENDPOINTS else "model_disabled")
    lowered = {name.lower(): value for name, value in headers.items()}
    directives = _cache_control(lowered.get("cache-control", ""))
    client_ttl = _client_ttl(lowered.get("x-cache-ttl"), directives.get("max-age"))
    ttl_s = min(default_ttl_s if client_ttl is None else client_ttl, max_ttl_s)

    def no(reason: str) -> CacheDecision:
        return CacheDecision(read=False, write=False, ttl_s=ttl_s, reason=reason)

    if "no-store" in directives:
        return no("no-store")
    if ttl_s <= 0:
        return no("ttl_zero")
    if endpoint in _PURE:
        reason = endpoint
    elif _deterministic(body):
        reason = "deterministic"
    elif client_ttl is not None:
        reason = "client_opt_in"
    else:
        return no("nondeterministic")
    if "no-cache" in directives:
        return CacheDecision(read=False, write=True, ttl_s=ttl_s, reason="no-cache")
    return CacheDecision(read=True, write=True, ttl_s=ttl_s, reason=reason)


def cache_key(
    *, model: str, endpoint: str, body: Mapping[str, Any], tenant: str | None, namespace: str
) -> str:
    """`<namespace>:cache:<model>:<sha256>` over the endpoint, the tenant and the body's
    output-affecting fields.

    `model` is the resolved model, never the alias. `tenant=None` means the shared cache. The
    model is readable (percent-encoded, so it holds no `:`) so that `key_prefix` can purge it.
    """
    fields = {name: value for name, value in body.items() if name not in _IGNORED_FIELDS}
    identity = {"endpoint": endpoint, "model": model, "tenant": tenant, "body": fields}
    canonical = orjson.dumps(_canonical(identity), option=orjson.OPT_SORT_KEYS)
    return key_prefix(namespace, model) + hashlib.sha256(canonical).hexdigest()


def key_prefix(namespace: str, model: str | None = None) -> str:
    """The prefix shared by every cached answer of the namespace, or of one model in it (for
    purging); never a prefix of the namespace's coordination keys."""
    if model is None:
        return f"{namespace}:{KEY_SPACE}:"
    return f"{namespace}:{KEY_SPACE}:{quote(model, safe='')}:"


def _deterministic(body: Mapping[str, Any]) -> bool:
    temperature = body.get("temperature")
    seed = body.get("seed")
    return (_is_number(temperature) and temperature == 0) or (
        isinstance(seed, int) and not isinstance(seed, bool)
    )


def _cache_control(value: str) -> dict[str, str | None]:
    directives: dict[str, str | None] = {}
    for part in value.split(","):
        name, _, argument = part.strip().partition("=")
        if name:
            directives[name.lower()] = argument.strip().strip('"') or None
    return directives


def _client_ttl(x_cache_ttl: str | None, max_age: str | None) -> float | None:
    for raw in (x_cache_ttl, max_age):
        ttl = _non_negative(raw)
        if ttl is not None:
            return ttl
    return None


def _non_negative(raw: str | None) -> float | None:
    if raw is None:
        return None
    try:
        value = float(raw)
    except ValueError:
        return None
    return value if value >= 0 and value != float("inf") else None


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _canonical(value: Any) -> Any:
    """JSON does not tell 1 from 1.0; neither may the key (`temperature: 0` == `0.0`)."""
    if isinstance(value, Mapping):
        return {str(name): _canonical(item) for name, item in value.items()}
    if isinstance(value, list | tuple):
        return [_canonical(item) for item in value]
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, int) and not _INT64_MIN <= value <= _UINT64_MAX:
        return str(value)  # orjson encodes 64-bit integers only
    return value
