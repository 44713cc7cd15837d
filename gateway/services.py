"""The gateway's long-lived parts, built from one config and started/stopped together."""

from __future__ import annotations

from collections.abc import Mapping

from gateway.calls import ApiCall
from gateway.catalog import Catalog
from gateway.coalescing import Coalescer
from gateway.config import GatewayConfig, ModelConfig
from gateway.drivers import create_driver
from gateway.drivers.base import Driver
from gateway.embedding_batch import EmbeddingBatcher
from gateway.proxy import Proxy
from gateway.response_cache import ResponseCache
from gateway.scheduler import Scheduler
from gateway.upstream import Upstreams


class Services:
    def __init__(self, config: GatewayConfig) -> None:
        self.config = config
        self.ready = False  # started and not shutting down (the readiness probe)
        self.catalog = Catalog(config)
        self.upstreams = Upstreams(dict(config.backends))
        self.proxy = Proxy(self.upstreams, rename_models=config.server.rewrite_model_name)
        self.drivers: dict[str, Driver] = {
            name: create_driver(
                backend, [m for m in config.models.values() if m.backend == name], self.upstreams
            )
            for name, backend in config.backends.items()
        }
        self.scheduler = Scheduler(config, self.catalog, self.drivers)
        self.cache = ResponseCache(config.cache)
        self.coalescer = Coalescer()
        self.embeddings = EmbeddingBatcher(
            self.fetch_json, window_s=config.embedding_batching.window_ms / 1000,
            max_inputs=config.embedding_batching.max_inputs,
        )

    async def start(self) -> None:
        await self.scheduler.start()
        self.ready = True

    async def stop(self) -> None:
        self.ready = False
        await self.embeddings.close()
        await self.scheduler.stop()
        await self.cache.close()
        await self.upstreams.close()

    async def fetch_json(self, call: ApiCall, model: ModelConfig,
                         headers: Mapping[str, str] | None = None, request_id: str = "",
                         swap_timeout: float | None = None) -> bytes:
        """One non-streamed upstream call under its own lease (queueing for the model)."""
        lease = await self.scheduler.acquire(model, swap_timeout)
        try:
            response = await self.proxy.open(call, lease.target, headers or {}, request_id)
            return await self.proxy.read_json(response, lease.target,
                                              self.proxy.renamer(call, lease.target))
        finally:
            lease.release()
