"""The gateway's long-lived parts, built from one config and started/stopped together."""

from __future__ import annotations

from gateway.catalog import Catalog
from gateway.config import GatewayConfig
from gateway.drivers import create_driver
from gateway.drivers.base import Driver
from gateway.proxy import Proxy
from gateway.response_cache import ResponseCache
from gateway.scheduler import Scheduler
from gateway.upstream import Upstreams


class Services:
    def __init__(self, config: GatewayConfig) -> None:
        self.config = config
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

    async def start(self) -> None:
        await self.scheduler.start()

    async def stop(self) -> None:
        await self.scheduler.stop()
        await self.cache.close()
        await self.upstreams.close()
