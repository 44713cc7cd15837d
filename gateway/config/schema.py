"""Typed configuration: the old Swapper Service `swapper_config.yaml` plus the gateway's new keys.

Precedence: environment variables of the old service > the YAML file > embedded defaults.
Every validation error names the file and the dotted key.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from policies.eviction import fits_at_all
from policies.types import PRIORITY_WEIGHT, BatchingConfig, Budget, ModelView

DEFAULT_PORT = 8890
DEFAULT_OLLAMA_URL = "http://localhost:11434"
BACKEND_KINDS = ("ollama", "openai", "process", "vllm-sleep", "llama-router")
OPENAI_ENDPOINTS = ("chat/completions", "completions", "embeddings", "responses", "messages")
_DEFAULT_ENDPOINTS = ("chat/completions", "completions", "embeddings")
_MODES = ("single-active", "multi-active")


class ConfigError(ValueError):
    """A bad configuration; the message names the file and the key."""


@dataclass(frozen=True)
class Timeouts:
    connect: float = 5.0  # TCP connect to the backend
    read: float = 600.0  # longest silence between two chunks of an answer
    pool: float = 30.0  # waiting for a free pooled connection


@dataclass(frozen=True)
class BackendConfig:
    name: str
    kind: str = "openai"
    base_url: str | None = None
    api_key: str | None = None
    timeouts: Timeouts = Timeouts()
    max_connections: int = 512
    endpoints: frozenset[str] = frozenset(_DEFAULT_ENDPOINTS)
    # process driver: one command per model, `{path}`, `{port}`, `{name}` and `{served_name}`
    # are filled in.
    cmd: str | None = None
    health_path: str = "/health"
    start_timeout: float = 120.0
    stop_grace: float = 10.0
    env: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class ModelConfig:
    name: str
    backend: str
    served_name: str  # the backend's own name for it (the old `ollama_name`)
    aliases: tuple[str, ...] = ()
    type: str = "llm"
    size_gb: float = 0.0
    priority: str = "normal"
    ttl_s: float = 0.0  # idle unload after this many seconds; 0 = never
    path: str | None = None
    num_ctx: int | None = None  # Ollama: pinned so requests cannot force a reload
    max_concurrent: int | None = None  # requests served at once; more wait in the queue
    cache_enabled: bool = True
    cache_shared: bool = False  # one cache for all tenants instead of one per key
    # Backends to fall back on, in order, each with its own name for the model. A fallback
    # route is itself a ModelConfig named "<model>@<backend>" with `route_of` = the model.
    fallbacks: tuple[ModelConfig, ...] = ()
    route_of: str | None = None

    @property
    def public_name(self) -> str:
        return self.route_of or self.name


@dataclass(frozen=True)
class SwapperConfig:
    mode: str = "single-active"
    max_concurrent_models: int = 1
    model_swap_timeout: float = 300.0
    gpu_enabled: bool = True
    metal_acceleration: bool = False
    default_model: str | None = None
    memory_budget_gb: float | None = None
    max_queue_per_model: int = 256  # waiting requests per model before 429
    max_queue_total: int = 1024
    # A load's own deadline; a request's wait for its model is model_swap_timeout.
    load_timeout_s: float = 600.0

    def budget(self) -> Budget:
        if self.mode == "single-active":
            return Budget(max_models=1, memory_gb=self.memory_budget_gb)
        return Budget(max_models=self.max_concurrent_models, memory_gb=self.memory_budget_gb)


@dataclass(frozen=True)
class ServerConfig:
    host: str = "0.0.0.0"
    port: int = DEFAULT_PORT
    max_body_bytes: int = 8 * 1024 * 1024
    rewrite_model_name: bool = True  # answers name the model as the client asked for it
    log_level: str = "info"
    shutdown_grace_s: float = 30.0
    heartbeat_s: float = 5.0  # SSE `: loading` comments while a streaming request waits
    # A streaming request waiting for its model gets its status line this late at most, so a
    # short wait can still end in a real 503 that SDKs retry.
    stream_hold_s: float = 5.0
    body_timeout_s: float = 30.0  # a request body not received within this is refused (408)
    max_header_bytes: int = 64 * 1024


@dataclass(frozen=True)
class CacheConfig:
    redis_url: str | None = None
    ttl_s: float = 3600.0
    max_entry_bytes: int = 1024 * 1024
    max_memory_bytes: int = 64 * 1024 * 1024
    namespace: str = "swapper"
    enabled: bool = True
    redis_timeout_s: float = 0.05  # one Redis call; slower counts as Redis being down


@dataclass(frozen=True)
class KeyConfig:
    """One API key: its name is the tenant (logged, never the key itself)."""

    name: str
    secret: str
    models: frozenset[str] | None = None  # allow-list of model names/aliases; None = all
    requests_per_minute: float | None = None
    tokens_per_minute: float | None = None
    max_concurrent: int | None = None
    admin: bool = False


@dataclass(frozen=True)
class AuthConfig:
    keys: tuple[KeyConfig, ...] = ()

    @property
    def open(self) -> bool:
        return not self.keys


@dataclass(frozen=True)
class EmbeddingBatching:
    window_ms: float = 5.0  # embedding requests for one model within this are merged; 0 = off
    max_inputs: int = 256  # a batch is sent at once when it holds this many inputs


@dataclass(frozen=True)
class GatewayConfig:
    swapper: SwapperConfig = SwapperConfig()
    server: ServerConfig = ServerConfig()
    backends: Mapping[str, BackendConfig] = field(default_factory=dict)
    models: Mapping[str, ModelConfig] = field(default_factory=dict)
    cache: CacheConfig = CacheConfig()
    batching: BatchingConfig = BatchingConfig()
    embedding_batching: EmbeddingBatching = EmbeddingBatching()
    auth: AuthConfig = AuthConfig()
    source: str = "<defaults>"
    unknown_keys: tuple[str, ...] = ()  # read but not understood: typos, or newer keys


_NAMED_SECTIONS = frozenset({"models", "backends"})  # their keys are names, not settings
_FREE_FORM = frozenset({"env"})  # any key goes (environment variables of a process backend)


class _Reader:
    """Reads typed values out of nested YAML mappings, naming file and key on error, and
    remembering which keys it read so that the others can be reported as unknown."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.seen: set[tuple[str, str]] = set()

    def unknown_keys(self, data: Mapping[str, Any], path: str = "") -> list[str]:
        found: list[str] = []
        for key, value in data.items():
            key, full = str(key), _join(path, str(key))
            if not path and key in _NAMED_SECTIONS and isinstance(value, Mapping):
                for name, item in value.items():
                    if isinstance(item, Mapping):
                        found += self.unknown_keys(item, f"{key}.{name}")
            elif (path, key) not in self.seen:
                found.append(full)
            elif isinstance(value, Mapping) and key not in _FREE_FORM:
                found += self.unknown_keys(value, full)
            elif isinstance(value, list):
                for i, item in enumerate(value):
                    if isinstance(item, Mapping):
                        found += self.unknown_keys(item, f"{full}[{i}]")
        return found

    def fail(self, key: str, message: str) -> ConfigError:
        return ConfigError(f"{self.source}: {key}: {message}")

    def section(self, data: Mapping[str, Any], key: str, path: str) -> Mapping[str, Any]:
        self.seen.add((path, key))
        value = data.get(key)
        if value is None:
            return {}
        if not isinstance(value, Mapping):
            raise self.fail(_join(path, key), f"expected a mapping, got {_kind(value)}")
        return value

    def get(self, data: Mapping[str, Any], key: str, path: str, kind: type, default: Any) -> Any:
        self.seen.add((path, key))
        value = data.get(key, default)
        if value is None or value is default:
            return value
        if kind is float and isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if kind is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if kind in (str, bool, list) and isinstance(value, kind):
            return value
        raise self.fail(_join(path, key), f"expected {kind.__name__}, got {_kind(value)}")

    def choice(
        self, data: Mapping[str, Any], key: str, path: str, choices: tuple[str, ...], default: str
    ) -> str:
        value = self.get(data, key, path, str, default)
        if value not in choices:
            raise self.fail(_join(path, key), f"must be one of {', '.join(choices)}, got {value!r}")
        return value

    def positive(self, value: float | None, key: str, *, allow_zero: bool = True) -> None:
        if value is not None and (value < 0 or (value == 0 and not allow_zero)):
            raise self.fail(key, f"must be {'>= 0' if allow_zero else '> 0'}, got {value}")


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _kind(value: Any) -> str:
    return type(value).__name__ if value is not None else "null"


def _timeouts(reader: _Reader, data: Mapping[str, Any], path: str) -> Timeouts:
    section = reader.section(data, "timeouts", path)
    path = _join(path, "timeouts")
    values = {
        name: reader.get(section, name, path, float, getattr(Timeouts, name))
        for name in ("connect", "read", "pool")
    }
    for name, value in values.items():
        reader.positive(value, _join(path, name), allow_zero=False)
    return Timeouts(**values)


def _backend(reader: _Reader, name: str, data: Any, ollama_url: str) -> BackendConfig:
    path = f"backends.{name}"
    if not isinstance(data, Mapping):
        raise reader.fail(path, f"expected a mapping, got {_kind(data)}")
    kind = reader.choice(data, "kind", path, BACKEND_KINDS, "openai")
    default_url = ollama_url if kind == "ollama" else None
    base_url = reader.get(data, "base_url", path, str, default_url)
    if kind != "process" and not base_url:
        raise reader.fail(_join(path, "base_url"), f"is required for kind {kind}")
    cmd = reader.get(data, "cmd", path, str, None)
    if kind == "process" and not cmd:
        raise reader.fail(_join(path, "cmd"), "is required for kind process")
    endpoints = reader.get(data, "endpoints", path, list, list(_DEFAULT_ENDPOINTS))
    for endpoint in endpoints:
        if endpoint not in OPENAI_ENDPOINTS:
            raise reader.fail(
                _join(path, "endpoints"),
                f"unknown endpoint {endpoint!r} (known: {', '.join(OPENAI_ENDPOINTS)})",
            )
    env = reader.section(data, "env", path)
    return BackendConfig(
        name=name,
        kind=kind,
        base_url=_normalise_url(base_url),
        api_key=reader.get(data, "api_key", path, str, None),
        timeouts=_timeouts(reader, data, path),
        max_connections=reader.get(data, "max_connections", path, int, 512),
        endpoints=frozenset(endpoints),
        cmd=cmd,
        health_path=reader.get(data, "health_path", path, str, "/health"),
        start_timeout=reader.get(data, "start_timeout", path, float, 120.0),
        stop_grace=reader.get(data, "stop_grace", path, float, 10.0),
        env={str(k): str(v) for k, v in env.items()},
    )


def _normalise_url(url: str | None) -> str | None:
    """`http://host:8000/v1/` and `http://host:8000` name the same server."""
    if url is None:
        return None
    url = url.rstrip("/")
    return url[: -len("/v1")] if url.endswith("/v1") else url


def _priority(reader: _Reader, data: Mapping[str, Any], path: str) -> str:
    value = reader.get(data, "priority", path, str, "normal")
    value = "normal" if value == "medium" else value
    if value not in PRIORITY_WEIGHT:
        raise reader.fail(_join(path, "priority"), f"must be high, normal or low, got {value!r}")
    return value


def _model(
    reader: _Reader, name: str, data: Any, backends: dict[str, BackendConfig], ollama_url: str
) -> ModelConfig:
    path = f"models.{name}"
    if not isinstance(data, Mapping):
        raise reader.fail(path, f"expected a mapping, got {_kind(data)}")
    model_path = reader.get(data, "path", path, str, None)
    backend = reader.get(data, "backend", path, str, None)
    served = reader.get(data, "served_name", path, str, None) or reader.get(
        data, "ollama_name", path, str, None
    )
    if model_path and model_path.startswith("ollama:"):
        served = served or model_path.removeprefix("ollama:")
        if backend is None:
            backend = "ollama"
            backends.setdefault("ollama", BackendConfig(name="ollama", kind="ollama",
                                                        base_url=_normalise_url(ollama_url)))
    if backend is None:
        raise reader.fail(_join(path, "backend"), "is required (or a path of the form ollama:NAME)")
    if backend not in backends:
        known = ", ".join(sorted(backends)) or "none"
        raise reader.fail(_join(path, "backend"), f"unknown backend {backend!r} (known: {known})")
    aliases = reader.get(data, "aliases", path, list, [])
    if not all(isinstance(alias, str) for alias in aliases):
        raise reader.fail(_join(path, "aliases"), "expected a list of strings")
    cache = reader.section(data, "cache", path)
    size_gb = reader.get(data, "size_gb", path, float, 0.0)
    ttl = reader.get(data, "ttl", path, float, 0.0)
    reader.positive(size_gb, _join(path, "size_gb"))
    reader.positive(ttl, _join(path, "ttl"))
    model = ModelConfig(
        name=name,
        backend=backend,
        served_name=served or name,
        aliases=tuple(aliases),
        type=reader.get(data, "type", path, str, "llm"),
        size_gb=size_gb,
        priority=_priority(reader, data, path),
        ttl_s=ttl,
        path=model_path,
        num_ctx=reader.get(data, "num_ctx", path, int, None),
        max_concurrent=_positive_int(reader, data, "max_concurrent", path),
        cache_enabled=reader.get(cache, "enabled", _join(path, "cache"), bool, True),
        cache_shared=reader.get(cache, "shared", _join(path, "cache"), bool, False),
    )
    routes = reader.get(data, "fallback", path, list, [])
    fallbacks = tuple(_fallback(reader, model, i, item, backends) for i, item in enumerate(routes))
    return dataclasses.replace(model, fallbacks=fallbacks)


def _fallback(reader: _Reader, model: ModelConfig, index: int, data: Any,
              backends: Mapping[str, BackendConfig]) -> ModelConfig:
    path = f"models.{model.name}.fallback[{index}]"
    if not isinstance(data, Mapping):
        raise reader.fail(path, f"expected a mapping, got {_kind(data)}")
    backend = reader.get(data, "backend", path, str, None)
    if backend not in backends:
        known = ", ".join(sorted(backends)) or "none"
        raise reader.fail(_join(path, "backend"), f"unknown backend {backend!r} (known: {known})")
    size_gb = reader.get(data, "size_gb", path, float, model.size_gb)
    reader.positive(size_gb, _join(path, "size_gb"))
    return dataclasses.replace(
        model, name=f"{model.name}@{backend}", backend=backend, aliases=(),
        served_name=reader.get(data, "served_name", path, str, None) or model.served_name,
        path=reader.get(data, "path", path, str, None), size_gb=size_gb, route_of=model.name,
    )


def _positive_int(reader: _Reader, data: Mapping[str, Any], key: str, path: str) -> int | None:
    value = reader.get(data, key, path, int, None)
    reader.positive(value, _join(path, key), allow_zero=False)
    return value


def _swapper(reader: _Reader, data: Mapping[str, Any], env: Mapping[str, str]) -> SwapperConfig:
    section = dict(reader.section(data, "swapper", ""))
    for var, key, kind in (
        ("SWAPPER_MODE", "mode", str),
        ("MAX_CONCURRENT_MODELS", "max_concurrent_models", int),
        ("MODEL_SWAP_TIMEOUT", "model_swap_timeout", float),
    ):
        if env.get(var):
            section[key] = _env_value(var, env[var], kind)
    config = SwapperConfig(
        mode=reader.choice(section, "mode", "swapper", _MODES, "single-active"),
        max_concurrent_models=reader.get(section, "max_concurrent_models", "swapper", int, 1),
        model_swap_timeout=reader.get(section, "model_swap_timeout", "swapper", float, 300.0),
        gpu_enabled=reader.get(section, "gpu_enabled", "swapper", bool, True),
        metal_acceleration=reader.get(section, "metal_acceleration", "swapper", bool, False),
        default_model=reader.get(section, "default_model", "swapper", str, None),
        memory_budget_gb=reader.get(section, "memory_budget_gb", "swapper", float, None),
        max_queue_per_model=reader.get(section, "max_queue_per_model", "swapper", int, 256),
        max_queue_total=reader.get(section, "max_queue_total", "swapper", int, 1024),
        load_timeout_s=reader.get(section, "load_timeout_s", "swapper", float, 600.0),
    )
    reader.positive(config.max_concurrent_models, "swapper.max_concurrent_models", allow_zero=False)
    reader.positive(config.model_swap_timeout, "swapper.model_swap_timeout", allow_zero=False)
    reader.positive(config.memory_budget_gb, "swapper.memory_budget_gb", allow_zero=False)
    reader.positive(config.max_queue_per_model, "swapper.max_queue_per_model", allow_zero=False)
    reader.positive(config.max_queue_total, "swapper.max_queue_total", allow_zero=False)
    reader.positive(config.load_timeout_s, "swapper.load_timeout_s", allow_zero=False)
    return config


def _env_value(var: str, raw: str, kind: type) -> Any:
    try:
        return kind(raw)
    except ValueError:
        raise ConfigError(f"environment: {var}: expected {kind.__name__}, got {raw!r}") from None


def _server(reader: _Reader, data: Mapping[str, Any]) -> ServerConfig:
    section = reader.section(data, "server", "")
    d = ServerConfig()
    config = ServerConfig(
        host=reader.get(section, "host", "server", str, d.host),
        port=reader.get(section, "port", "server", int, d.port),
        max_body_bytes=reader.get(section, "max_body_bytes", "server", int, d.max_body_bytes),
        rewrite_model_name=reader.get(
            section, "rewrite_model_name", "server", bool, d.rewrite_model_name
        ),
        log_level=reader.get(section, "log_level", "server", str, d.log_level),
        shutdown_grace_s=reader.get(
            section, "shutdown_grace_s", "server", float, d.shutdown_grace_s
        ),
        heartbeat_s=reader.get(section, "heartbeat_s", "server", float, d.heartbeat_s),
        stream_hold_s=reader.get(section, "stream_hold_s", "server", float, d.stream_hold_s),
        body_timeout_s=reader.get(section, "body_timeout_s", "server", float, d.body_timeout_s),
        max_header_bytes=reader.get(
            section, "max_header_bytes", "server", int, d.max_header_bytes
        ),
    )
    reader.positive(config.max_body_bytes, "server.max_body_bytes", allow_zero=False)
    reader.positive(config.heartbeat_s, "server.heartbeat_s", allow_zero=False)
    reader.positive(config.stream_hold_s, "server.stream_hold_s")
    reader.positive(config.body_timeout_s, "server.body_timeout_s", allow_zero=False)
    reader.positive(config.max_header_bytes, "server.max_header_bytes", allow_zero=False)
    return config


def _cache(reader: _Reader, data: Mapping[str, Any]) -> CacheConfig:
    section = reader.section(data, "cache", "")
    d = CacheConfig()
    return CacheConfig(
        redis_url=reader.get(section, "redis_url", "cache", str, d.redis_url),
        ttl_s=reader.get(section, "ttl_s", "cache", float, d.ttl_s),
        max_entry_bytes=reader.get(section, "max_entry_bytes", "cache", int, d.max_entry_bytes),
        max_memory_bytes=reader.get(section, "max_memory_bytes", "cache", int, d.max_memory_bytes),
        namespace=reader.get(section, "namespace", "cache", str, d.namespace),
        enabled=reader.get(section, "enabled", "cache", bool, d.enabled),
        redis_timeout_s=reader.get(section, "redis_timeout_s", "cache", float, d.redis_timeout_s),
    )


def _batching(reader: _Reader, data: Mapping[str, Any]) -> BatchingConfig:
    section = reader.section(data, "batching", "")
    d = BatchingConfig()
    values = {
        key: reader.get(section, key, "batching", float, getattr(d, key))
        for key in ("window_ms", "max_wait_ms", "min_residency_ms", "burst_gap_ms")
    }
    for key, value in values.items():
        reader.positive(value, f"batching.{key}")
    return BatchingConfig(**values)


def _embedding_batching(reader: _Reader, data: Mapping[str, Any]) -> EmbeddingBatching:
    section = reader.section(data, "batching", "")
    d = EmbeddingBatching()
    config = EmbeddingBatching(
        window_ms=reader.get(section, "embeddings_window_ms", "batching", float, d.window_ms),
        max_inputs=reader.get(section, "embeddings_max_inputs", "batching", int, d.max_inputs),
    )
    reader.positive(config.window_ms, "batching.embeddings_window_ms")
    reader.positive(config.max_inputs, "batching.embeddings_max_inputs", allow_zero=False)
    return config


def _secret(reader: _Reader, data: Mapping[str, Any], path: str,
            env: Mapping[str, str]) -> str:
    """A key given inline, by environment variable or by a mounted secret file."""
    inline = reader.get(data, "key", path, str, None)
    variable = reader.get(data, "key_env", path, str, None)
    file = reader.get(data, "key_file", path, str, None)
    if variable:
        inline = env.get(variable)
        if not inline:
            raise reader.fail(_join(path, "key_env"), f"environment variable {variable} is unset")
    elif file:
        try:
            inline = Path(file).read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise reader.fail(_join(path, "key_file"), f"cannot read {file}: {exc}") from None
    if not inline:
        raise reader.fail(path, "needs one of key, key_env or key_file")
    return inline


def _key(reader: _Reader, index: int, data: Any, env: Mapping[str, str]) -> KeyConfig:
    path = f"auth.keys[{index}]"
    if not isinstance(data, Mapping):
        raise reader.fail(path, f"expected a mapping, got {_kind(data)}")
    name = reader.get(data, "name", path, str, None)
    if not name:
        raise reader.fail(_join(path, "name"), "is required (it names the tenant)")
    models = reader.get(data, "models", path, list, None)
    limits = {key: reader.get(data, key, path, float, None)
              for key in ("requests_per_minute", "tokens_per_minute")}
    for key, value in limits.items():
        reader.positive(value, _join(path, key), allow_zero=False)
    concurrent = reader.get(data, "max_concurrent", path, int, None)
    reader.positive(concurrent, _join(path, "max_concurrent"), allow_zero=False)
    return KeyConfig(
        name=name, secret=_secret(reader, data, path, env),
        models=frozenset(models) if models is not None else None,
        max_concurrent=concurrent, admin=reader.get(data, "admin", path, bool, False), **limits,
    )


def _env_keys(raw: str) -> list[KeyConfig]:
    """$SWAPPER_API_KEYS: `name:key,name:key` (what a Kubernetes Secret puts in the env)."""
    keys = []
    for item in filter(None, (part.strip() for part in raw.split(","))):
        name, sep, secret = item.partition(":")
        if not sep or not name or not secret:
            raise ConfigError("environment: SWAPPER_API_KEYS: expected name:key[,name:key...]")
        keys.append(KeyConfig(name=name, secret=secret))
    return keys


def _auth(reader: _Reader, data: Mapping[str, Any], env: Mapping[str, str]) -> AuthConfig:
    section = reader.section(data, "auth", "")
    items = reader.get(section, "keys", "auth", list, [])
    keys = [_key(reader, i, item, env) for i, item in enumerate(items)]
    keys += _env_keys(env.get("SWAPPER_API_KEYS", ""))
    admin = env.get("SWAPPER_ADMIN_KEY")
    if admin:
        keys.append(KeyConfig(name="admin", secret=admin, admin=True))
    seen: set[str] = set()
    for key in keys:
        if key.secret in seen:
            raise reader.fail("auth.keys", f"key of {key.name!r} is given twice")
        seen.add(key.secret)
    return AuthConfig(tuple(keys))


def _check_names(reader: _Reader, models: Mapping[str, ModelConfig], default: str | None) -> None:
    seen: dict[str, str] = {}
    for model in models.values():
        for alias in (model.name, *model.aliases):
            if alias in seen and seen[alias] != model.name:
                raise reader.fail(
                    f"models.{model.name}.aliases",
                    f"name {alias!r} is already used by model {seen[alias]!r}",
                )
            seen[alias] = model.name
    if default and default not in seen:
        raise reader.fail("swapper.default_model", f"unknown model {default!r}")


def _check_fits(reader: _Reader, models: Mapping[str, ModelConfig], budget: Budget) -> None:
    """A model that fits no budget it may use would wait for a swap that can never happen."""
    for model in models.values():
        routes = (model, *model.fallbacks)
        if not any(fits_at_all(ModelView(r.name, size_gb=r.size_gb), budget) for r in routes):
            raise reader.fail(
                f"models.{model.name}.size_gb",
                f"{model.size_gb:g} GB does not fit the memory budget of "
                f"{budget.memory_gb:g} GB (swapper.memory_budget_gb)",
            )


def parse_config(
    data: Any, *, source: str = "<config>", env: Mapping[str, str] | None = None
) -> GatewayConfig:
    env = os.environ if env is None else env
    reader = _Reader(source)
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise reader.fail("<top>", f"expected a mapping, got {_kind(data)}")
    ollama_url = env.get("OLLAMA_BASE_URL") or DEFAULT_OLLAMA_URL
    backend_data = reader.section(data, "backends", "")
    backends = {
        str(name): _backend(reader, str(name), spec, ollama_url)
        for name, spec in backend_data.items()
    }
    models = {
        str(name): _model(reader, str(name), spec, backends, ollama_url)
        for name, spec in reader.section(data, "models", "").items()
    }
    if not backends:
        backends["ollama"] = BackendConfig(name="ollama", kind="ollama",
                                           base_url=_normalise_url(ollama_url))
    swapper = _swapper(reader, data, env)
    _check_names(reader, models, swapper.default_model)
    _check_fits(reader, models, swapper.budget())
    return GatewayConfig(
        swapper=swapper,
        server=_server(reader, data),
        backends=backends,
        models=models,
        cache=_cache(reader, data),
        batching=_batching(reader, data),
        embedding_batching=_embedding_batching(reader, data),
        auth=_auth(reader, data, env),
        source=source,
        unknown_keys=tuple(reader.unknown_keys(data)),
    )


def load_config(path: str | os.PathLike[str] | None = None,
                env: Mapping[str, str] | None = None) -> GatewayConfig:
    """Load from `path`, else $SWAPPER_CONFIG_PATH, else ./swapper_config.yaml, else defaults."""
    env = os.environ if env is None else env
    candidate = path or env.get("SWAPPER_CONFIG_PATH")
    if candidate is None and Path("swapper_config.yaml").is_file():
        candidate = "swapper_config.yaml"
    if candidate is None:
        return parse_config({}, source="<defaults>", env=env)
    file = Path(candidate)
    try:
        text = file.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{file}: cannot read: {exc.strerror or exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{file}: invalid YAML: {exc}") from None
    return parse_config(data, source=str(file), env=env)
