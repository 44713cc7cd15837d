"""Backend drivers: how one kind of backend moves a model between unloaded and loaded."""

from __future__ import annotations

from collections.abc import Sequence

from gateway.config.schema import BackendConfig, ModelConfig
from gateway.relay.upstream import Upstreams
from gateway.residency.drivers.base import Driver


def create_driver(backend: BackendConfig, models: Sequence[ModelConfig],
                  upstreams: Upstreams) -> Driver:
    from gateway.residency.drivers.llama_router import LlamaRouterDriver
    from gateway.residency.drivers.ollama import OllamaDriver
    from gateway.residency.drivers.static import StaticDriver
    from gateway.residency.drivers.vllm_sleep import VllmSleepDriver

    if backend.kind == "process":
        from gateway.residency.drivers.process import ProcessDriver

        return ProcessDriver(backend, models)
    kinds = {"ollama": OllamaDriver, "openai": StaticDriver, "vllm-sleep": VllmSleepDriver,
             "llama-router": LlamaRouterDriver}
    return kinds[backend.kind](backend, models, upstreams)
