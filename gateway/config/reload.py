"""Re-reading the configuration while serving: what may change live, and applying it.

A reload never drops a stream or a queued request. It applies atomically or not at all: a
config that is invalid, or that would change a model in use (its backend, its name at the
backend, or that backend's settings), is refused, and the old one stays in force.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from gateway.config.discovery import discover_ollama_models
from gateway.config.schema import ConfigError, GatewayConfig, ModelConfig, load_config

Loader = Callable[[], GatewayConfig]


def file_loader(source: str) -> Loader:
    """Reads the file the gateway started from again (and rediscovers Ollama's models)."""
    return lambda: discover_ollama_models(load_config(source))


def _route(model: ModelConfig, config: GatewayConfig) -> tuple[str, str, object]:
    return model.backend, model.served_name, config.backends.get(model.backend)


def reload_blockers(old: GatewayConfig, new: GatewayConfig,
                    in_use: Mapping[str, bool]) -> list[str]:
    """Why `new` cannot replace `old` now; empty when it can. `in_use`: model name -> whether
    it is resident, loading, queued for or serving requests."""
    blockers = []
    if (old.server.host, old.server.port) != (new.server.host, new.server.port):
        blockers.append("server.host/server.port change only with a restart")
    if old.cache.redis_url != new.cache.redis_url:
        blockers.append("cache.redis_url changes only with a restart")
    for name, model in old.models.items():
        if not in_use.get(name):
            continue
        replacement = new.models.get(name)
        if replacement is None:
            blockers.append(f"model {name!r} is in use and cannot be removed; unload it first")
        elif _route(model, old) != _route(replacement, new):
            blockers.append(f"model {name!r} is in use: its backend, served name or backend "
                            "settings cannot change; unload it first")
    return blockers


def checked(old: GatewayConfig, loader: Loader, in_use: Mapping[str, bool]) -> GatewayConfig:
    """The new config, or ConfigError saying why it is refused."""
    new = loader()
    blockers = reload_blockers(old, new, in_use)
    if blockers:
        raise ConfigError(f"{new.source}: reload refused: " + "; ".join(blockers))
    return new
