"""With no models configured, the gateway serves whatever the default Ollama has pulled.

At start the Ollama is asked once (`discover_ollama_models`). If it does not answer, or has no
model pulled, the gateway starts anyway with no models and asks again in the background
(`wait_for_ollama`, backing off) until it has some; the caller then re-reads the config.
"""

from __future__ import annotations

import asyncio
import dataclasses

import httpx
import structlog

from gateway.config.schema import GatewayConfig, ModelConfig

log = structlog.get_logger("gateway.config.discovery")

RETRY_FIRST_S, RETRY_MAX_S = 0.5, 10.0


def discovery_applies(config: GatewayConfig) -> bool:
    """The config names no model and has an Ollama backend called `ollama` to ask."""
    backend = config.backends.get("ollama")
    return not config.models and backend is not None and backend.kind == "ollama"


def ollama_url(config: GatewayConfig) -> str | None:
    backend = config.backends.get("ollama")
    return backend.base_url if backend is not None else None


def discover_ollama_models(config: GatewayConfig, timeout_s: float = 3.0) -> GatewayConfig:
    """The config with Ollama's pulled models added, when it names no model of its own."""
    if not discovery_applies(config):
        return config
    url = ollama_url(config)
    try:
        response = httpx.get(f"{url}/api/tags", timeout=timeout_s)
        models = _models(response.raise_for_status().json())
    except (httpx.HTTPError, ValueError, KeyError, TypeError) as exc:
        log.warning("discovery.failed", backend=url, error=str(exc))
        return config
    log.info("discovery.done", backend=url, models=[m.name for m in models])
    return dataclasses.replace(config, models={model.name: model for model in models})


async def wait_for_ollama(config: GatewayConfig, first_s: float = RETRY_FIRST_S,
                          max_s: float = RETRY_MAX_S, timeout_s: float = 3.0) -> list[str]:
    """Ask the config's Ollama for its models until it answers with at least one; their names.

    Backs off from `first_s` to `max_s` between tries. Cancel-safe: it holds nothing between
    awaits, so cancelling it (at shutdown) leaves nothing behind.
    """
    url, delay, said = ollama_url(config), first_s, ""
    async with httpx.AsyncClient(timeout=timeout_s) as client:
        while True:
            try:
                response = await client.get(f"{url}/api/tags")
                names = [m.name for m in _models(response.raise_for_status().json())]
                why = "no model pulled yet: ollama pull NAME"
            except (httpx.HTTPError, ValueError, KeyError, TypeError) as exc:
                names, why = [], f"not reachable: {exc or type(exc).__name__}"
            if names:
                log.info("discovery.done", backend=url, models=names)
                return names
            if why != said:  # each new reason once, not a line per try
                log.warning("discovery.retrying", backend=url, reason=why, every_s=max_s)
                said = why
            await asyncio.sleep(delay)
            delay = min(delay * 2, max_s)


def _models(answer: dict) -> list[ModelConfig]:
    return [_model(entry) for entry in answer["models"]]


def _model(entry: dict) -> ModelConfig:
    name = entry["name"]
    short = name.removesuffix(":latest")
    return ModelConfig(
        name=name, backend="ollama", served_name=name,
        aliases=(short,) if short != name else (),
        size_gb=round(float(entry.get("size", 0)) / 1e9, 2),
    )
