"""Re-reading the configuration while serving: what may change live, and applying it.

A reload never drops a stream or a queued request. It applies atomically or not at all: a
config that is invalid, or that would change a route in use (a model's or one of its fallbacks':
its backend, its name at the backend, or that backend's settings such as a process `cmd`), or
remove one, is refused, and the old one stays in force. A route is in use while it is resident,
loading, queued for or serving requests: removing a resident one would drop its memory from the
budget while the backend still holds it, so it must be unloaded first.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from gateway.config.discovery import discover_ollama_models
from gateway.config.reader import load_config
from gateway.config.schema import ConfigError, GatewayConfig, ModelConfig

Loader = Callable[[], GatewayConfig]


def file_loader(source: str) -> Loader:
    """Reads the file the gateway started from again (and rediscovers Ollama's models)."""
    return lambda: discover_ollama_models(load_config(source))


def _route(model: ModelConfig, config: GatewayConfig) -> tuple[str, str, object]:
    return model.backend, model.served_name, config.backends.get(model.backend)


def _routes(config: GatewayConfig) -> dict[str, ModelConfig]:
    """Every route by its name: each model (`qwen`) and each of its fallbacks (`qwen@ollama`)."""
    return {route.name: route for model in config.models.values()
            for route in (model, *model.fallbacks)}


def _describe(route: ModelConfig) -> str:
    if route.route_of is None:
        return f"model {route.name!r}"
    return f"model {route.route_of!r}'s fallback on backend {route.backend!r}"


def reload_blockers(old: GatewayConfig, new: GatewayConfig,
                    in_use: Mapping[str, bool]) -> list[str]:
    """Why `new` cannot replace `old` now; empty when it can. `in_use`: model name -> whether
    it is resident, loading, queued for or serving requests."""
    blockers = []
    if (old.server.host, old.server.port) != (new.server.host, new.server.port):
        blockers.append("server.host/server.port change only with a restart")
    if old.cache.redis_url != new.cache.redis_url:
        blockers.append("cache.redis_url changes only with a restart")
    replacements = _routes(new)
    for name, route in _routes(old).items():
        if not in_use.get(name):
            continue
        replacement = replacements.get(name)
        if replacement is None:
            blockers.append(f"{_describe(route)} is in use (resident or serving) and cannot be "
                            "removed; unload it first")
        elif _route(route, old) != _route(replacement, new):
            blockers.append(f"{_describe(route)} is in use: its backend, served name or backend "
                            "settings cannot change; unload it first")
    return blockers


def refuse_if_blocked(old: GatewayConfig, new: GatewayConfig,
                      in_use: Mapping[str, bool]) -> None:
    """ConfigError saying why `new` cannot replace `old` now, if it cannot."""
    blockers = reload_blockers(old, new, in_use)
    if blockers:
        raise ConfigError(f"{new.source}: reload refused: " + "; ".join(blockers))


def checked(old: GatewayConfig, loader: Loader, in_use: Mapping[str, bool]) -> GatewayConfig:
    """The new config, or ConfigError saying why it is refused."""
    new = loader()
    refuse_if_blocked(old, new, in_use)
    return new
