"""Typed configuration: the old Swapper Service `swapper_config.yaml` plus the gateway's new keys.

This module is what the config is: its dataclasses, their defaults and `ConfigError`;
`config_keys()` lists every key the schema has, from the dataclasses' fields. `reader` turns
YAML and the environment into it.
"""

from __future__ import annotations

import dataclasses
import re
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from policies.caching import MAX_TTL_S
from policies.types import BatchingConfig, Budget

DEFAULT_PORT = 8890
DEFAULT_OLLAMA_URL = "http://localhost:11434"
BACKEND_KINDS = ("ollama", "openai", "process", "vllm-sleep", "llama-router")
OPENAI_ENDPOINTS = ("chat/completions", "completions", "embeddings", "responses", "messages",
                    "messages/count_tokens", "rerank", "audio/transcriptions",
                    "audio/translations", "audio/speech", "images/generations")
DEFAULT_ENDPOINTS = ("chat/completions", "completions", "embeddings")
# The node of every backend that names none: built from `swapper:` unless `nodes:` declares it.
DEFAULT_NODE = "default"
# What a `process` backend's `cmd` may name; the driver fills them in per model.
PROCESS_PLACEHOLDERS = ("path", "port", "name", "served_name", "host")
PLACEHOLDER = re.compile(r"\{(\w*)\}")


class ConfigError(ValueError):
    """A bad configuration; each message names the file and the key. `errors` holds every
    problem found, one message each; `str()` is one per line."""

    def __init__(self, message: str, errors: Sequence[str] | None = None) -> None:
        super().__init__(message)
        self.errors: tuple[str, ...] = (message,) if errors is None else tuple(errors)

    @classmethod
    def of(cls, errors: Sequence[str]) -> ConfigError:
        return cls("\n".join(errors), errors)


def _yaml(key: str | tuple[str, ...] | None, default: Any = dataclasses.MISSING,
          **extra: Any) -> Any:
    """A field whose YAML key differs from its name (None: not read from YAML at all)."""
    metadata = {"yaml": key, **extra}
    if isinstance(default, dict):
        return field(default_factory=dict, metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass(frozen=True)
class Timeouts:
    connect: float = 5.0  # TCP connect to the backend
    read: float = 600.0  # longest silence between two chunks of an answer
    pool: float = 30.0  # waiting for a free pooled connection
    # A request sent and not acknowledged this long, or a silent connection whose keep-alive
    # probes go unanswered: the backend's host is gone from the network (not merely slow).
    dead_host: float = 30.0


@dataclass(frozen=True)
class BackendConfig:
    name: str = _yaml(None)  # its key under `backends`
    kind: str = "openai"
    base_url: str | None = None
    api_key: str | None = None
    timeouts: Timeouts = Timeouts()
    max_connections: int = 4096  # one per open stream: 512 made the 513th stream wait
    endpoints: frozenset[str] = frozenset(DEFAULT_ENDPOINTS)
    # process driver: one command per model, PROCESS_PLACEHOLDERS are filled in.
    cmd: str | None = None
    health_path: str = "/health"
    start_timeout: float = 120.0
    stop_grace: float = 10.0
    env: Mapping[str, str] = field(default_factory=dict)
    node: str | None = None  # the node (memory, swap lane) it runs on; None: DEFAULT_NODE


@dataclass(frozen=True)
class ModelConfig:
    name: str = _yaml(None)  # its key under `models`
    backend: str = _yaml("backend")
    # the backend's own name for it (the old `ollama_name`)
    served_name: str = _yaml(("served_name", "ollama_name"))
    aliases: tuple[str, ...] = ()
    type: str = "llm"
    size_gb: float = 0.0
    priority: str = "normal"
    ttl_s: float = _yaml("ttl", 0.0)  # idle unload after this many seconds; 0 = never
    path: str | None = None
    num_ctx: int | None = None  # Ollama: pinned so requests cannot force a reload
    max_concurrent: int | None = None  # requests served at once; more wait in the queue
    cache_enabled: bool = _yaml("cache.enabled", True)
    cache_shared: bool = _yaml("cache.shared", False)  # one cache for all tenants, not per key
    # The model's other routes, each a backend with its own name for the model: `fallback:`
    # (tried in order) or, from `routes:`, the routes after the first (placed by the policy:
    # `placed`). A route is itself a ModelConfig named "<model>@<backend>", `route_of` = the model.
    fallbacks: tuple[ModelConfig, ...] = _yaml(
        ("fallback[]", "routes[]"), (), keys=("backend", "served_name", "path", "size_gb"))
    route_of: str | None = _yaml(None, None)
    placed: bool = _yaml(None, False)  # given as `routes:`: placement picks among them
    # A LoRA adapter served by its base model's vLLM (gateway.residency.adapters): the base's
    # name, and the adapter's folder as vLLM reads it (None: vLLM was started with it).
    adapter_of: str | None = None
    adapter_path: str | None = None

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
        return self.node().budget()

    def node(self) -> NodeConfig:
        """The node of an old config (no `nodes:`), and of every backend that names none."""
        return NodeConfig(name=DEFAULT_NODE, mode=self.mode,
                          max_concurrent_models=self.max_concurrent_models,
                          memory_budget_gb=self.memory_budget_gb)


@dataclass(frozen=True)
class NodeConfig:
    """A unit of memory and of swapping: a GPU server, a Mac. Its backends share its budget and
    its swap lane (one load or unload at a time on it; nodes swap in parallel)."""

    name: str = _yaml(None)  # its key under `nodes`
    mode: str = "multi-active"
    max_concurrent_models: int | None = None  # multi-active: None = as many as memory allows
    memory_budget_gb: float | None = None
    # Host RAM for models put to sleep (vLLM sleep level 1 keeps their weights there); beyond
    # it they are unloaded fully. None: no limit.
    host_memory_gb: float | None = None

    def budget(self) -> Budget:
        models = 1 if self.mode == "single-active" else self.max_concurrent_models
        return Budget(max_models=models, memory_gb=self.memory_budget_gb,
                      host_memory_gb=self.host_memory_gb)


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
    # The longest lifetime a client's X-Cache-TTL may ask for: a huge one would make Redis
    # refuse the write.
    max_ttl_s: float = MAX_TTL_S


@dataclass(frozen=True)
class KeyConfig:
    """One API key: its name is the tenant (logged, never the key itself)."""

    name: str = _yaml("name")
    secret: str = _yaml(("key", "key_env", "key_file"))  # inline, from the env, from a file
    models: frozenset[str] | None = None  # allow-list of model names/aliases; None = all
    requests_per_minute: float | None = None
    tokens_per_minute: float | None = None
    max_concurrent: int | None = None
    admin: bool = False


@dataclass(frozen=True)
class AuthConfig:
    keys: tuple[KeyConfig, ...] = _yaml("keys[]", ())

    @property
    def open(self) -> bool:
        return not self.keys


@dataclass(frozen=True)
class EmbeddingBatching:
    # embedding requests for one model within this are merged; 0 = off
    window_ms: float = _yaml("embeddings_window_ms", 5.0)
    # a batch is sent at once when it holds this many inputs
    max_inputs: int = _yaml("embeddings_max_inputs", 256)


@dataclass(frozen=True)
class GatewayConfig:
    swapper: SwapperConfig = SwapperConfig()
    server: ServerConfig = ServerConfig()
    nodes: Mapping[str, NodeConfig] = _yaml("nodes.*", {})  # as declared; see fleet()
    backends: Mapping[str, BackendConfig] = _yaml("backends.*", {})
    models: Mapping[str, ModelConfig] = _yaml("models.*", {})
    cache: CacheConfig = CacheConfig()
    batching: BatchingConfig = BatchingConfig()
    embedding_batching: EmbeddingBatching = _yaml("batching", EmbeddingBatching())
    auth: AuthConfig = AuthConfig()
    source: str = _yaml(None, "<defaults>")
    # read but not understood: typos, or newer keys
    unknown_keys: tuple[str, ...] = _yaml(None, ())
    warnings: tuple[str, ...] = _yaml(None, ())  # for people: unknown keys with a suggestion

    def node_of(self, backend: str) -> str:
        config = self.backends.get(backend)
        return config.node if config is not None and config.node else DEFAULT_NODE

    def fleet(self) -> dict[str, NodeConfig]:
        """Every node: those declared, and the one built from `swapper:` when no node is
        declared or a backend names none (an old config is that one node)."""
        nodes = dict(self.nodes)
        implicit = not nodes or any(not b.node for b in self.backends.values())
        if DEFAULT_NODE not in nodes and implicit:
            nodes = {DEFAULT_NODE: self.swapper.node(), **nodes}
        return nodes


def config_keys(schema: type | None = None, prefix: str = "") -> set[str]:
    """Every YAML key the schema's dataclass fields stand for, dotted, with `*` for a name
    (models.*.ttl) and `[]` for a list item (auth.keys[].key_env)."""
    schema = schema or GatewayConfig
    hints = typing.get_type_hints(schema)
    keys: set[str] = set()
    for item in dataclasses.fields(schema):
        yaml_key = item.metadata.get("yaml", item.name)
        if yaml_key is None:
            continue
        nested = _dataclass_in(hints[item.name])
        for name in (yaml_key,) if isinstance(yaml_key, str) else yaml_key:
            full = f"{prefix}.{name}" if prefix else name
            if "keys" in item.metadata:
                keys |= {f"{full}.{key}" for key in item.metadata["keys"]}
            elif nested is not None:
                keys |= config_keys(nested, full)
            else:
                keys.add(full)
    return keys


def _dataclass_in(hint: Any) -> type | None:
    """The dataclass a field holds: itself, or the values of a mapping or tuple of them."""
    if dataclasses.is_dataclass(hint):
        return hint  # type: ignore[return-value]
    return next((arg for arg in typing.get_args(hint) if dataclasses.is_dataclass(arg)), None)
