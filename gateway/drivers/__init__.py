"""Backend drivers: how one kind of backend moves a model between unloaded and loaded."""

from __future__ import annotations

from collections.abc import Sequence

from gateway.config import BackendConfig, ModelConfig
from gateway.drivers.base import Driver
from gateway.upstream import Upstreams


def create_driver(backend: BackendConfig, models: Sequence[ModelConfig],
                  upstreams: Upstreams) -> Driver:
    from gateway.drivers.llama_router import LlamaRouterDriver
    from gateway.drivers.ollama import OllamaDriver
    from gateway.drivers.static import StaticDriver
    from gateway.drivers.vllm_sleep import VllmSleepDriver

    if backend.kind == "process":
        from gateway.drivers.process import ProcessDriver

        return ProcessDriver(backend, models)
    kinds = {"ollama": OllamaDriver, "openai": StaticDriver, "vllm-sleep": VllmSleepDriver,
             "llama-router": LlamaRouterDriver}
    return kinds[backend.kind](backend, models, upstreams)
