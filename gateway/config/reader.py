"""Reading the config: YAML and the old service's environment variables into `schema`'s
dataclasses.

Precedence: environment variables of the old service > the YAML file > embedded defaults.
Every validation error names the file and the dotted key, and a file is read whole: every error
is reported at once (`ConfigError.errors`), and unknown keys come back as warnings with the
nearest known key.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import shlex
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml

from gateway.config.schema import (
    BACKEND_KINDS,
    DEFAULT_ENDPOINTS,
    DEFAULT_NODE,
    DEFAULT_OLLAMA_URL,
    OPENAI_ENDPOINTS,
    PLACEHOLDER,
    PROCESS_PLACEHOLDERS,
    AuthConfig,
    BackendConfig,
    CacheConfig,
    ConfigError,
    EmbeddingBatching,
    GatewayConfig,
    KeyConfig,
    ModelConfig,
    NodeConfig,
    ServerConfig,
    SwapperConfig,
    Timeouts,
)
from policies.eviction import fits_at_all
from policies.types import PRIORITY_WEIGHT, BatchingConfig, ModelView

T = TypeVar("T")
_MODES = ("single-active", "multi-active")
# A model `path` that names a file (not a hub id such as Qwen/Qwen2.5-7B) must exist.
_FILE_SUFFIXES = (".gguf", ".bin", ".safetensors", ".pt", ".pth", ".onnx", ".ggml")


_NAMED_SECTIONS = frozenset({"models", "backends", "nodes"})  # their keys are names, not settings
_FREE_FORM = frozenset({"env"})  # any key goes (environment variables of a process backend)


class _Reader:
    """Reads typed values out of nested YAML mappings, naming file and key on error, and
    remembering which keys it read so that the others can be reported as unknown."""

    def __init__(self, source: str, base_dir: Path | None = None) -> None:
        self.source = source
        self.base_dir = base_dir  # where a relative key_file is looked for: the file's own dir
        self.seen: set[tuple[str, str]] = set()
        self.errors: list[str] = []
        self.broken: set[str] = set()  # backends refused: their models are not blamed again

    def error(self, key: str, message: str) -> None:
        """Record a problem and read on, so that one run reports them all."""
        self.errors.append(str(self.fail(key, message)))

    def attempt(self, read: Callable[[], T]) -> T | None:
        """`read()`, or None when it refused its part of the file (the reason is recorded)."""
        try:
            return read()
        except ConfigError as exc:
            self.errors.extend(exc.errors)
            return None

    def known_at(self, path: str) -> list[str]:
        return sorted(key for at, key in self.seen if at == path)

    def warnings(self, data: Mapping[str, Any]) -> list[str]:
        """Each unknown key, with the nearest known key at its place when one is close."""
        found = []
        for path, key in self._unknown(data):
            hint = suggestion(key, self.known_at(path))
            found.append(f"unknown key {_join(path, key)} (ignored){hint}")
        return found

    def unknown_keys(self, data: Mapping[str, Any]) -> list[str]:
        return [_join(path, key) for path, key in self._unknown(data)]

    def _unknown(self, data: Mapping[str, Any], path: str = "") -> list[tuple[str, str]]:
        found: list[tuple[str, str]] = []
        for key, value in data.items():
            key, full = str(key), _join(path, str(key))
            if not path and key in _NAMED_SECTIONS and isinstance(value, Mapping):
                for name, item in value.items():
                    if isinstance(item, Mapping):
                        found += self._unknown(item, f"{key}.{name}")
            elif (path, key) not in self.seen:
                found.append((path, key))
            elif isinstance(value, Mapping) and key not in _FREE_FORM:
                found += self._unknown(value, full)
            elif isinstance(value, list):
                for i, item in enumerate(value):
                    if isinstance(item, Mapping):
                        found += self._unknown(item, f"{full}[{i}]")
        return found

    def fail(self, key: str, message: str) -> ConfigError:
        return ConfigError(f"{self.source}: {key}: {message}")

    def section(self, data: Mapping[str, Any], key: str, path: str) -> Mapping[str, Any]:
        self.seen.add((path, key))
        value = data.get(key)
        if value is None:
            return {}
        if not isinstance(value, Mapping):
            self.error(_join(path, key), f"expected a mapping, got {_shown(value)}")
            return {}
        return value

    def settings(self, data: Mapping[str, Any], path: str, schema: type,
                 kinds: Mapping[str, type]) -> dict[str, Any]:
        """Each key of `kinds` (named as its field in `schema`, read as its type) with the
        field's own default when it is absent: the defaults are written in `schema` alone."""
        return {key: self.get(data, key, path, kind, default(schema, key))
                for key, kind in kinds.items()}

    def get(self, data: Mapping[str, Any], key: str, path: str, kind: type, default: Any) -> Any:
        """The value at `key`, or `default` when it is absent or of the wrong type (recorded)."""
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
        self.error(_join(path, key), f"{_expected(kind, key, path)}, got {_shown(value)}")
        return default

    def choice(
        self, data: Mapping[str, Any], key: str, path: str, choices: tuple[str, ...], default: str
    ) -> str:
        value = self.get(data, key, path, str, default)
        if value not in choices:
            self.error(_join(path, key), f"must be one of {', '.join(choices)}, got {value!r}"
                       + suggestion(str(value), choices))
            return default
        return value

    def positive(self, value: float | None, key: str, *, allow_zero: bool = True) -> None:
        if value is not None and (value < 0 or (value == 0 and not allow_zero)):
            self.error(key, f"must be {'>= 0' if allow_zero else '> 0'}, got {value:g}")


def suggestion(word: str, known: Iterable[str]) -> str:
    """`; did you mean 'mode'?` for the nearest known word, or nothing when none is close."""
    close = difflib.get_close_matches(word, list(known), n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


# Units by key, so that `ttl: "10m"` says what it wants: seconds, as a number.
_UNITS = (("_ms", "milliseconds"), ("_gb", "GB"), ("_bytes", "bytes"), ("_s", "seconds"),
          ("ttl", "seconds"), ("timeout", "seconds"), ("grace", "seconds"))
_TIMEOUT_SECTIONS = ("timeouts",)


def _expected(kind: type, key: str, path: str) -> str:
    if kind in (int, float):
        unit = next((u for suffix, u in _UNITS if key.endswith(suffix)), None)
        if unit is None and path.endswith(_TIMEOUT_SECTIONS):
            unit = "seconds"
        number = "a whole number" if kind is int else "a number"
        return f"{unit} expected ({number})" if unit else f"{number} expected"
    names = {str: "a string", bool: "true or false", list: "a list"}
    return f"{names.get(kind, kind.__name__)} expected"


def _shown(value: Any) -> str:
    """The offending value as the user wrote it, shortened."""
    if isinstance(value, Mapping | list):
        return f"a {_kind(value)}"
    text = repr(value)
    return f"{_kind(value)} {text if len(text) <= 40 else text[:37] + '...'}"


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _kind(value: Any) -> str:
    return type(value).__name__ if value is not None else "null"


def _timeouts(reader: _Reader, data: Mapping[str, Any], path: str) -> Timeouts:
    section = reader.section(data, "timeouts", path)
    path = _join(path, "timeouts")
    values = reader.settings(section, path, Timeouts,
                             dict.fromkeys(("connect", "read", "pool", "dead_host"), float))
    for name, value in values.items():
        reader.positive(value, _join(path, name), allow_zero=False)
    return Timeouts(**values)


def _backend(reader: _Reader, name: str, data: Any, ollama_url: str) -> BackendConfig:
    path = f"backends.{name}"
    if not isinstance(data, Mapping):
        raise reader.fail(path, f"expected a mapping, got {_shown(data)}")
    kind = reader.choice(data, "kind", path, BACKEND_KINDS, "openai")
    default_url = ollama_url if kind == "ollama" else None
    base_url = reader.get(data, "base_url", path, str, default_url)
    if kind != "process" and not base_url:
        reader.error(_join(path, "base_url"), f"is required for kind {kind}")
    cmd = reader.get(data, "cmd", path, str, None)
    if kind == "process":
        _check_cmd(reader, cmd, _join(path, "cmd"))
    endpoints = reader.get(data, "endpoints", path, list, list(DEFAULT_ENDPOINTS))
    for endpoint in endpoints:
        if endpoint not in OPENAI_ENDPOINTS:
            reader.error(
                _join(path, "endpoints"),
                f"unknown endpoint {endpoint!r} (known: {', '.join(OPENAI_ENDPOINTS)})"
                + suggestion(str(endpoint), OPENAI_ENDPOINTS),
            )
    env = reader.section(data, "env", path)
    return BackendConfig(
        name=name,
        kind=kind,
        base_url=_normalise_url(base_url),
        api_key=reader.get(data, "api_key", path, str, None),
        timeouts=_timeouts(reader, data, path),
        endpoints=frozenset(endpoints),
        cmd=cmd,
        **reader.settings(data, path, BackendConfig, {
            "max_connections": int, "health_path": str, "start_timeout": float,
            "stop_grace": float}),
        env={str(k): str(v) for k, v in env.items()},
        node=reader.get(data, "node", path, str, None),
    )


def _check_cmd(reader: _Reader, cmd: str | None, key: str) -> None:
    """A process command template: it must split like a command line, name only the
    placeholders the driver fills in, and pass the port it is given (else nothing could reach
    the server)."""
    if not cmd:
        reader.error(key, "is required for kind process")
        return
    try:
        argv = shlex.split(cmd)
    except ValueError as exc:
        reader.error(key, f"cannot be split into arguments: {exc}")
        return
    names = [name for arg in argv for name in PLACEHOLDER.findall(arg)]
    known = ", ".join(f"{{{name}}}" for name in PROCESS_PLACEHOLDERS)
    for unknown in dict.fromkeys(n for n in names if n not in PROCESS_PLACEHOLDERS):
        close = difflib.get_close_matches(unknown, PROCESS_PLACEHOLDERS, n=1, cutoff=0.6)
        hint = f"; did you mean {{{close[0]}}}?" if close else ""
        reader.error(key, f"unknown placeholder {{{unknown}}} (known: {known}){hint}")
    if "port" not in names:
        reader.error(key, "has no {port}: the gateway picks each model's port and must pass "
                          "it to the server (e.g. --port {port})")


def _check_model_file(reader: _Reader, model: ModelConfig, key: str,
                      backends: Mapping[str, BackendConfig]) -> None:
    """A `process` model's `path` that names a file (a GGUF) or a folder (a Hugging Face model
    for vLLM) must exist: the server would fail to start on the first request, far from the
    config that caused it."""
    backend = backends.get(model.backend)
    if backend is None or backend.kind != "process" or not model.path:
        return
    if "{path}" not in (backend.cmd or ""):
        return
    path = model.path
    if path.startswith("~"):
        reader.error(key, f"{path!r}: '~' is not expanded (the command runs without a shell); "
                          "write the full path")
    elif _names_a_file(path) and not Path(path).exists():
        where = "" if Path(path).is_absolute() else f" (relative to {Path.cwd()})"
        reader.error(key, f"not found: {path}{where}")


def _names_a_file(path: str) -> bool:
    """A file path, as opposed to a name the server resolves itself (a hub id: org/model)."""
    return (Path(path).is_absolute() or path.startswith(("./", "../"))
            or path.lower().endswith(_FILE_SUFFIXES))


def _normalise_url(url: str | None) -> str | None:
    """`http://host:8000/v1/` and `http://host:8000` name the same server."""
    if url is None:
        return None
    url = url.rstrip("/")
    return url[: -len("/v1")] if url.endswith("/v1") else url


def _priority(reader: _Reader, data: Mapping[str, Any], path: str) -> str:
    value = reader.get(data, "priority", path, str, default(ModelConfig, "priority"))
    value = "normal" if value == "medium" else value
    if value not in PRIORITY_WEIGHT:
        reader.error(_join(path, "priority"), f"must be high, normal or low, got {value!r}"
                     + suggestion(value, PRIORITY_WEIGHT))
        return "normal"
    return value


def _model(
    reader: _Reader, name: str, data: Any, backends: dict[str, BackendConfig], ollama_url: str
) -> ModelConfig:
    path = f"models.{name}"
    if not isinstance(data, Mapping):
        raise reader.fail(path, f"expected a mapping, got {_shown(data)}")
    model_path = reader.get(data, "path", path, str, None)
    backend = reader.get(data, "backend", path, str, None)
    served = reader.get(data, "served_name", path, str, None)
    served = served or reader.get(data, "ollama_name", path, str, None)
    placed = _items(reader, data, "routes", path)
    ordered = _items(reader, data, "fallback", path)
    if placed and (backend is not None or ordered):
        raise reader.fail(_join(path, "routes"), "names every backend of the model: give "
                          "neither `backend` nor `fallback` beside it")
    if placed:
        first = placed[0]
        backend = first.get("backend") if isinstance(first, Mapping) else None
    if model_path and model_path.startswith("ollama:"):
        served = served or model_path.removeprefix("ollama:")
        if backend is None and not placed:
            backend = "ollama"
            backends.setdefault("ollama", BackendConfig(name="ollama", kind="ollama",
                                                        base_url=_normalise_url(ollama_url)))
    if backend is None and not placed:
        raise reader.fail(_join(path, "backend"), "is required (or a path of the form ollama:NAME)")
    if not placed:
        _known_backend(reader, backend, _join(path, "backend"), backends)
    size_gb = reader.get(data, "size_gb", path, float, default(ModelConfig, "size_gb"))
    ttl = reader.get(data, "ttl", path, float, default(ModelConfig, "ttl_s"))
    reader.positive(size_gb, _join(path, "size_gb"))
    reader.positive(ttl, _join(path, "ttl"))
    model = ModelConfig(
        name=name,
        backend=str(backend),
        served_name=served or name,
        type=reader.get(data, "type", path, str, default(ModelConfig, "type")),
        size_gb=size_gb,
        priority=_priority(reader, data, path),
        ttl_s=ttl,
        path=model_path,
        num_ctx=reader.get(data, "num_ctx", path, int, None),
        **_served(reader, data, path),
    )
    if placed:
        return _placed(reader, model, placed, backends)
    _check_model_file(reader, model, _join(path, "path"), backends)
    fallbacks = [reader.attempt(lambda i=i, item=item: _route(
                     reader, model, "fallback", i, item, backends))
                 for i, item in enumerate(ordered)]
    return dataclasses.replace(model, fallbacks=tuple(f for f in fallbacks if f is not None))


def _served(reader: _Reader, data: Mapping[str, Any], path: str) -> dict[str, Any]:
    """How a model is served to clients, whatever holds it: its aliases, its concurrency
    limit and its cache settings (an adapter has these of its own)."""
    aliases = reader.get(data, "aliases", path, list, [])
    if not all(isinstance(alias, str) for alias in aliases):
        reader.error(_join(path, "aliases"), "expected a list of strings")
        aliases = []
    cache = reader.section(data, "cache", path)
    return {
        "aliases": tuple(aliases),
        "max_concurrent": _positive_int(reader, data, "max_concurrent", path),
        "cache_enabled": reader.get(cache, "enabled", _join(path, "cache"), bool,
                                    default(ModelConfig, "cache_enabled")),
        "cache_shared": reader.get(cache, "shared", _join(path, "cache"), bool,
                                   default(ModelConfig, "cache_shared")),
    }


def default(schema: type, name: str) -> Any:
    """A field's default as its dataclass declares it: each default is written once, there."""
    return next(f.default for f in dataclasses.fields(schema) if f.name == name)


def _items(reader: _Reader, data: Mapping[str, Any], key: str, path: str) -> list[Any]:
    return reader.get(data, key, path, list, []) or []


def _placed(reader: _Reader, model: ModelConfig, items: list[Any],
            backends: Mapping[str, BackendConfig]) -> ModelConfig:
    """`routes:`: the first is the model itself (its name, its slot), the others
    `<model>@<backend>`; placement picks among all of them."""
    routes = [reader.attempt(lambda i=i, item=item: _route(
                  reader, model, "routes", i, item, backends)) for i, item in enumerate(items)]
    if routes[0] is None:
        raise ConfigError.of([])  # its own error says why; without it there is no model
    first = dataclasses.replace(routes[0], name=model.name, route_of=None,
                                aliases=model.aliases, placed=True)
    rest = [dataclasses.replace(r, placed=True) for r in routes[1:] if r is not None]
    seen: set[str] = {first.backend}
    for i, route in enumerate(rest, start=1):
        if route.backend in seen:
            reader.error(f"models.{model.name}.routes[{i}].backend",
                         f"backend {route.backend!r} is named by two routes")
        seen.add(route.backend)
    return dataclasses.replace(first, fallbacks=tuple(rest))


def _known_backend(reader: _Reader, backend: Any, key: str,
                   backends: Mapping[str, BackendConfig]) -> None:
    """Raise (the model is left out) when `backend` names none; quietly when that backend was
    itself refused, as its own errors say why."""
    if backend in backends:
        return
    if backend in reader.broken:
        raise ConfigError.of([])
    known = ", ".join(sorted(backends)) or "none"
    raise reader.fail(key, f"unknown backend {backend!r} (known: {known})"
                      + suggestion(str(backend), backends))


def _route(reader: _Reader, model: ModelConfig, key: str, index: int, data: Any,
           backends: Mapping[str, BackendConfig]) -> ModelConfig:
    """One of a model's routes (`fallback:` or `routes:`): its backend and its own name there."""
    path = f"models.{model.name}.{key}[{index}]"
    if not isinstance(data, Mapping):
        raise reader.fail(path, f"expected a mapping, got {_shown(data)}")
    backend = reader.get(data, "backend", path, str, None)
    if backend is None:
        raise reader.fail(_join(path, "backend"), "is required")
    _known_backend(reader, backend, _join(path, "backend"), backends)
    size_gb = reader.get(data, "size_gb", path, float, model.size_gb)
    reader.positive(size_gb, _join(path, "size_gb"))
    # A placed route shares the model's path unless it names its own; a fallback names its own.
    default_path = model.path if key == "routes" else None
    route = dataclasses.replace(
        model, name=f"{model.name}@{backend}", backend=backend, aliases=(),
        served_name=reader.get(data, "served_name", path, str, None) or model.served_name,
        path=reader.get(data, "path", path, str, default_path), size_gb=size_gb,
        route_of=model.name,
    )
    _check_model_file(reader, route, _join(path, "path"), backends)
    return route


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
            section[key] = _env_value(reader, var, env[var], kind, section.get(key))
    config = SwapperConfig(
        mode=reader.choice(section, "mode", "swapper", _MODES, default(SwapperConfig, "mode")),
        **reader.settings(section, "swapper", SwapperConfig, {
            "max_concurrent_models": int, "model_swap_timeout": float, "gpu_enabled": bool,
            "metal_acceleration": bool, "default_model": str, "memory_budget_gb": float,
            "max_queue_per_model": int, "max_queue_total": int, "load_timeout_s": float}),
    )
    reader.positive(config.max_concurrent_models, "swapper.max_concurrent_models", allow_zero=False)
    reader.positive(config.model_swap_timeout, "swapper.model_swap_timeout", allow_zero=False)
    reader.positive(config.memory_budget_gb, "swapper.memory_budget_gb", allow_zero=False)
    reader.positive(config.max_queue_per_model, "swapper.max_queue_per_model", allow_zero=False)
    reader.positive(config.max_queue_total, "swapper.max_queue_total", allow_zero=False)
    reader.positive(config.load_timeout_s, "swapper.load_timeout_s", allow_zero=False)
    return config


def _env_value(reader: _Reader, var: str, raw: str, kind: type, fallback: Any) -> Any:
    try:
        return kind(raw)
    except ValueError:
        reader.errors.append(f"environment: {var}: {_expected(kind, var.lower(), '')}, "
                             f"got {raw!r}")
        return fallback


def _server(reader: _Reader, data: Mapping[str, Any]) -> ServerConfig:
    section = reader.section(data, "server", "")
    config = ServerConfig(**reader.settings(section, "server", ServerConfig, {
        "host": str, "port": int, "max_body_bytes": int, "rewrite_model_name": bool,
        "log_level": str, "shutdown_grace_s": float, "heartbeat_s": float,
        "stream_hold_s": float, "body_timeout_s": float, "max_header_bytes": int}))
    reader.positive(config.max_body_bytes, "server.max_body_bytes", allow_zero=False)
    reader.positive(config.heartbeat_s, "server.heartbeat_s", allow_zero=False)
    reader.positive(config.stream_hold_s, "server.stream_hold_s")
    reader.positive(config.body_timeout_s, "server.body_timeout_s", allow_zero=False)
    reader.positive(config.max_header_bytes, "server.max_header_bytes", allow_zero=False)
    return config


def _cache(reader: _Reader, data: Mapping[str, Any]) -> CacheConfig:
    section = reader.section(data, "cache", "")
    return CacheConfig(**reader.settings(section, "cache", CacheConfig, {
        "redis_url": str, "ttl_s": float, "max_entry_bytes": int, "max_memory_bytes": int,
        "namespace": str, "enabled": bool, "redis_timeout_s": float, "max_ttl_s": float}))


def _batching(reader: _Reader, data: Mapping[str, Any]) -> BatchingConfig:
    section = reader.section(data, "batching", "")
    values = reader.settings(section, "batching", BatchingConfig, dict.fromkeys(
        ("window_ms", "max_wait_ms", "min_residency_ms", "burst_gap_ms"), float))
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
        secret = Path(file)
        if not secret.is_absolute() and reader.base_dir is not None:
            secret = reader.base_dir / secret  # beside the config, wherever it is run from
        try:
            inline = secret.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise reader.fail(_join(path, "key_file"),
                              f"cannot read {secret}: {exc.strerror or exc}") from None
    if not inline:
        raise reader.fail(path, "needs one of key, key_env or key_file")
    return inline


def _key(reader: _Reader, index: int, data: Any, env: Mapping[str, str]) -> KeyConfig:
    path = f"auth.keys[{index}]"
    if not isinstance(data, Mapping):
        raise reader.fail(path, f"expected a mapping, got {_shown(data)}")
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
        max_concurrent=concurrent, **limits,
        admin=reader.get(data, "admin", path, bool, default(KeyConfig, "admin")),
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
    read = [reader.attempt(lambda i=i, item=item: _key(reader, i, item, env))
            for i, item in enumerate(items)]
    keys = [key for key in read if key is not None]
    keys += reader.attempt(lambda: _env_keys(env.get("SWAPPER_API_KEYS", ""))) or []
    admin = env.get("SWAPPER_ADMIN_KEY")
    if admin:
        keys.append(KeyConfig(name="admin", secret=admin, admin=True))
    seen: set[str] = set()
    for key in keys:
        if key.secret in seen:
            reader.error("auth.keys", f"key of {key.name!r} is given twice")
        seen.add(key.secret)
    return AuthConfig(tuple(keys))


def _check_names(reader: _Reader, models: Mapping[str, ModelConfig], default: str | None) -> None:
    seen: dict[str, str] = {}
    for model in models.values():
        for alias in (model.name, *model.aliases):
            if alias in seen and seen[alias] != model.name:
                reader.error(
                    f"models.{model.name}.aliases",
                    f"name {alias!r} is already used by model {seen[alias]!r}",
                )
            seen.setdefault(alias, model.name)
    if default and default not in seen:
        reader.error("swapper.default_model", f"unknown model {default!r}"
                     + suggestion(default, seen))


def _check_fits(reader: _Reader, config: GatewayConfig) -> None:
    """A model that fits no budget it may use would wait for a swap that can never happen."""
    fleet = config.fleet()
    for model in config.models.values():
        routes = [r for r in (model, *model.fallbacks) if config.node_of(r.backend) in fleet]
        if not routes:
            continue  # its nodes are unknown: said where the backends name them
        if not any(fits_at_all(ModelView(r.name, size_gb=r.size_gb),
                               fleet[config.node_of(r.backend)].budget()) for r in routes):
            node = config.node_of(routes[0].backend)
            where = ("swapper.memory_budget_gb" if node not in config.nodes
                     else f"nodes.{node}.memory_budget_gb")
            reader.error(
                f"models.{model.name}.size_gb",
                f"{model.size_gb:g} GB does not fit the memory budget of "
                f"{fleet[node].memory_budget_gb:g} GB ({where})",
            )


def _nodes(reader: _Reader, data: Mapping[str, Any]) -> dict[str, NodeConfig]:
    nodes = {}
    for name, spec in reader.section(data, "nodes", "").items():
        node = reader.attempt(lambda name=name, spec=spec: _node(reader, str(name), spec))
        if node is not None:
            nodes[str(name)] = node
    return nodes


def _node(reader: _Reader, name: str, data: Any) -> NodeConfig:
    path = f"nodes.{name}"
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise reader.fail(path, f"expected a mapping, got {_shown(data)}")
    node = NodeConfig(
        name=name,
        mode=reader.choice(data, "mode", path, _MODES, "multi-active"),
        max_concurrent_models=_positive_int(reader, data, "max_concurrent_models", path),
        memory_budget_gb=reader.get(data, "memory_budget_gb", path, float, None),
        host_memory_gb=reader.get(data, "host_memory_gb", path, float, None),
    )
    reader.positive(node.memory_budget_gb, _join(path, "memory_budget_gb"), allow_zero=False)
    reader.positive(node.host_memory_gb, _join(path, "host_memory_gb"))
    return node


def _check_backend_nodes(reader: _Reader, backends: Mapping[str, BackendConfig],
                         nodes: Mapping[str, NodeConfig]) -> None:
    """Each backend's `node` names a declared node (or the default one, built from swapper:)."""
    known = [*nodes, DEFAULT_NODE] if DEFAULT_NODE not in nodes else list(nodes)
    for backend in backends.values():
        if backend.node and backend.node not in known:
            reader.error(f"backends.{backend.name}.node",
                         f"unknown node {backend.node!r} (known: {', '.join(known)})"
                         + suggestion(backend.node, known))


def _backends(reader: _Reader, data: Mapping[str, Any],
              ollama_url: str) -> dict[str, BackendConfig]:
    backends = {}
    for name, spec in reader.section(data, "backends", "").items():
        backend = reader.attempt(lambda name=name, spec=spec: _backend(
            reader, str(name), spec, ollama_url))
        if backend is None:
            reader.broken.add(str(name))
        else:
            backends[str(name)] = backend
    return backends


def _models(reader: _Reader, data: Mapping[str, Any], backends: dict[str, BackendConfig],
            ollama_url: str) -> dict[str, ModelConfig]:
    specs = {str(name): spec for name, spec in reader.section(data, "models", "").items()}
    adapters = {name: spec for name, spec in specs.items()
                if isinstance(spec, Mapping) and "adapter_of" in spec}
    read = {name: reader.attempt(lambda name=name, spec=spec: _model(
                reader, name, spec, backends, ollama_url))
            for name, spec in specs.items() if name not in adapters}
    bases = {name: model for name, model in read.items() if model is not None}
    for name, spec in adapters.items():  # after every base, wherever the YAML lists them
        read[name] = reader.attempt(lambda name=name, spec=spec: _adapter(
            reader, name, spec, bases, backends))
    return {name: read[name] for name in specs if read.get(name) is not None}


_ADAPTER_BACKENDS = frozenset({"process", "openai", "vllm-sleep"})  # where a vLLM may run
# Keys whose value an adapter takes from its base: it has no memory or residency of its own.
_BASE_KEYS = ("backend", "routes", "fallback", "path", "size_gb", "ttl", "num_ctx")


def _adapter(reader: _Reader, name: str, data: Mapping[str, Any],
             bases: Mapping[str, ModelConfig],
             backends: Mapping[str, BackendConfig]) -> ModelConfig:
    """`adapter_of: BASE`: a LoRA adapter that BASE's vLLM serves beside it."""
    path = f"models.{name}"
    base_name = reader.get(data, "adapter_of", path, str, None)
    base = bases.get(str(base_name))
    if base is None:
        raise reader.fail(_join(path, "adapter_of"), f"unknown base model {base_name!r}"
                          + suggestion(str(base_name), bases))
    for key in _BASE_KEYS:
        if key in data:
            raise reader.fail(_join(path, key), f"an adapter takes its {key} from its base "
                              f"model {base.name!r}: leave it out")
    if base.fallbacks:
        raise reader.fail(_join(path, "adapter_of"), f"base model {base.name!r} has several "
                          "routes; an adapter needs a base served by one vLLM")
    kind = backends[base.backend].kind
    if kind not in _ADAPTER_BACKENDS:
        raise reader.fail(_join(path, "adapter_of"), f"base model {base.name!r} is served by "
                          f"a {kind!r} backend; LoRA adapters need vLLM (a process, openai "
                          "or vllm-sleep backend)")
    return ModelConfig(
        name=name, backend=base.backend,
        served_name=reader.get(data, "served_name", path, str, None) or name,
        type=base.type, priority=base.priority, **_served(reader, data, path),
        adapter_of=base.name, adapter_path=reader.get(data, "adapter_path", path, str, None),
    )


def _check_serves_something(reader: _Reader, models: Mapping[str, ModelConfig],
                            backends: Mapping[str, BackendConfig]) -> None:
    """No models is fine while an `ollama` backend can be asked for its own (discovery at
    start); otherwise the gateway would answer every request with 404."""
    ollama = backends.get("ollama")
    if models or reader.errors or (ollama is not None and ollama.kind == "ollama"):
        return
    first = next(iter(backends), "BACKEND")
    reader.error("models", f"no models configured, so nothing can be served. Add one, e.g. "
                 f"models: {{my-model: {{backend: {first}, served_name: NAME}}}}, or name an "
                 "Ollama backend `ollama` to serve the models it has pulled")


def _parse(reader: _Reader, data: Any, env: Mapping[str, str]) -> GatewayConfig:
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise reader.fail("<top>", f"expected a mapping, got {_shown(data)}")
    ollama_url = env.get("OLLAMA_BASE_URL") or DEFAULT_OLLAMA_URL
    backends = _backends(reader, data, ollama_url)
    models = _models(reader, data, backends, ollama_url)
    if not backends and not reader.broken:
        backends["ollama"] = BackendConfig(name="ollama", kind="ollama",
                                           base_url=_normalise_url(ollama_url))
    swapper = _swapper(reader, data, env)
    nodes = _nodes(reader, data)
    _check_backend_nodes(reader, backends, nodes)
    _check_names(reader, models, swapper.default_model)
    config = GatewayConfig(
        swapper=swapper,
        nodes=nodes,
        server=_server(reader, data),
        backends=backends,
        models=models,
        cache=_cache(reader, data),
        batching=_batching(reader, data),
        embedding_batching=_embedding_batching(reader, data),
        auth=_auth(reader, data, env),
        source=reader.source,
        unknown_keys=tuple(reader.unknown_keys(data)),
        warnings=tuple(reader.warnings(data)),
    )
    _check_fits(reader, config)
    _check_serves_something(reader, models, backends)
    return config


def parse_config(
    data: Any, *, source: str = "<config>", env: Mapping[str, str] | None = None,
    base_dir: Path | None = None,
) -> GatewayConfig:
    """The typed config, or ConfigError listing every problem of `data`. `base_dir`: where
    relative `key_file`s are (the config file's directory; default the working directory)."""
    reader = _Reader(source, base_dir)
    config = _parse(reader, data, os.environ if env is None else env)
    if reader.errors:
        raise ConfigError.of(reader.errors)
    return config


def keys_read(data: Any, env: Mapping[str, str] | None = None) -> set[str]:
    """Every setting the reader asks `data` for, spelled as `config_keys()` spells them
    (models.*.ttl): a test compares the two, so that no key is read that the schema lacks."""
    reader = _Reader("<keys>")
    reader.attempt(lambda: _parse(reader, data, {} if env is None else env))
    names = sorted(((f"{section}.{name}", f"{section}.*") for section in _NAMED_SECTIONS
                    for name in (data or {}).get(section) or {}), key=lambda n: -len(n[0]))
    found = {re.sub(r"\[\d+\]", "[]", _generic(_join(path, key), names))
             for path, key in reader.seen}
    # A section is not a setting: what it holds is.
    return {key for key in found if not any(other.startswith((f"{key}.", f"{key}["))
                                            for other in found)}


def _generic(key: str, names: Sequence[tuple[str, str]]) -> str:
    """`models.qwen2.5-7b.ttl` -> `models.*.ttl` (model names may hold dots)."""
    for prefix, pattern in names:
        if key.startswith(f"{prefix}."):
            return pattern + key[len(prefix):]
    return key


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
    return parse_config(data, source=str(file), env=env, base_dir=file.parent)
