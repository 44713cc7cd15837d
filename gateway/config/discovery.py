"""With no models configured, the gateway serves whatever the default Ollama has pulled."""

from __future__ import annotations

import dataclasses

import httpx
import structlog

from gateway.config.schema import GatewayConfig, ModelConfig

log = structlog.get_logger("gateway.config.discovery")


def discover_ollama_models(config: GatewayConfig, timeout_s: float = 3.0) -> GatewayConfig:
    """The config with Ollama's pulled models added, when it names no model of its own."""
    backend = config.backends.get("ollama")
    if config.models or backend is None or backend.kind != "ollama":
        return config
    try:
        response = httpx.get(f"{backend.base_url}/api/tags", timeout=timeout_s)
        entries = response.raise_for_status().json()["models"]
        models = [_model(entry) for entry in entries]
    except (httpx.HTTPError, ValueError, KeyError, TypeError) as exc:
        log.warning("discovery.failed", backend=backend.base_url, error=str(exc))
        return config
    log.info("discovery.done", backend=backend.base_url, models=[m.name for m in models])
    return dataclasses.replace(config, models={model.name: model for model in models})


def _model(entry: dict) -> ModelConfig:
    name = entry["name"]
    short = name.removesuffix(":latest")
    return ModelConfig(
        name=name, backend="ollama", served_name=name,
        aliases=(short,) if short != name else (),
        size_gb=round(float(entry.get("size", 0)) / 1e9, 2),
    )
