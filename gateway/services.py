"""The gateway's long-lived parts, built from one config and started/stopped together."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Coroutine, Mapping
from typing import Any

import structlog

from gateway.access.auth import KeyRing
from gateway.cache.responses import ResponseCache
from gateway.calls.coalescing import Coalescer
from gateway.calls.embedding_batch import EmbeddingBatcher
from gateway.calls.parse import ApiCall
from gateway.config.catalog import Catalog
from gateway.config.reload import Loader, checked, refuse_if_blocked
from gateway.config.schema import ConfigError, GatewayConfig, ModelConfig
from gateway.metrics import Metrics
from gateway.relay.health import BackendHealth
from gateway.relay.proxy import Proxy
from gateway.relay.upstream import Upstreams
from gateway.residency.coordination import (
    Coordinator,
    LocalCoordinator,
    RedisCoordinator,
    replica_id,
)
from gateway.residency.drivers import create_driver
from gateway.residency.drivers.base import Driver, DriverError
from gateway.residency.fallback import Fallback
from gateway.residency.scheduler import Scheduler

log = structlog.get_logger("gateway")


class Services:
    def __init__(self, config: GatewayConfig, loader: Loader | None = None) -> None:
        self.config = config
        self.loader = loader  # how to read the config again, for a reload
        self.ready = False  # started and not shutting down (the readiness probe)
        self.keys = KeyRing(config.auth)
        self._reloading = asyncio.Lock()
        self._tasks: set[asyncio.Task[object]] = set()
        self.catalog = Catalog(config)
        self.upstreams = Upstreams(dict(config.backends))
        self.health = BackendHealth()
        self.proxy = Proxy(self.upstreams, rename_models=config.server.rewrite_model_name,
                           health=self.health)
        self.drivers: dict[str, Driver] = {
            name: create_driver(backend, self._models_of(name), self.upstreams)
            for name, backend in config.backends.items()
        }
        self.scheduler = Scheduler(config, self.catalog, self.drivers, self.upstreams.session,
                                   coordinator=_coordinator(config))
        self.fallback = Fallback(lambda: self.catalog, self.scheduler, self.drivers, self.health)
        self.cache = ResponseCache(config.cache)
        self.metrics = Metrics(self.scheduler, self.cache)
        self.scheduler.on_loaded = self.metrics.requests.loaded
        self.coalescer = Coalescer()
        self.embeddings = EmbeddingBatcher(
            self.fetch_json, window_s=config.embedding_batching.window_ms / 1000,
            max_inputs=config.embedding_batching.max_inputs,
        )

    def spawn(self, work: Coroutine[Any, Any, object]) -> None:
        """Run `work` in the background, held until it ends."""
        task = asyncio.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def reload(self) -> GatewayConfig:
        """Read the config again and apply it, or raise ConfigError and keep the old one."""
        if self.loader is None:
            raise ConfigError("this gateway was not started from a config file")
        async with self._reloading:
            new = checked(self.config, self.loader, self.scheduler.in_use())
            await self._apply(new)
        log.info("config.reloaded", source=new.source, models=len(new.models))
        return new

    async def _apply(self, new: GatewayConfig) -> None:
        """All or nothing. Every new driver is built and started before anything changes (a
        bad one refuses the reload); the switch itself has no await, so no request sees half
        of it; the drivers it replaced are closed after."""
        catalog = Catalog(new)
        built = self._build_drivers(new, catalog)
        try:
            for driver in built.values():
                await driver.start(self.scheduler.model_lost)
            # Requests went on while the drivers started: what is in use now decides.
            refuse_if_blocked(self.config, new, self.scheduler.in_use())
        except BaseException:
            await asyncio.gather(*(d.close() for d in built.values()), return_exceptions=True)
            raise
        for driver in self._switch(new, catalog, built):
            await driver.close()  # none of its models is in use (checked)

    def _build_drivers(self, new: GatewayConfig, catalog: Catalog) -> dict[str, Driver]:
        """Drivers for the backends `new` adds or changes; ConfigError if one cannot be."""
        built: dict[str, Driver] = {}
        for name, backend in new.backends.items():
            if self.config.backends.get(name) == backend and name in self.drivers:
                continue
            try:
                built[name] = create_driver(backend, _models_of(catalog, name), self.upstreams)
            except DriverError as exc:
                raise ConfigError(f"{new.source}: backends.{name}: {exc}") from None
        return built

    def _switch(self, new: GatewayConfig, catalog: Catalog,
                built: Mapping[str, Driver]) -> list[Driver]:
        """Install `new` at once (no await); the drivers it retires."""
        retired = [self.drivers.pop(name) for name in set(self.drivers) - set(new.backends)]
        retired += [self.drivers[name] for name in built if name in self.drivers]
        self.drivers.update(built)  # in place: the fallback reads this very mapping
        for name, driver in self.drivers.items():
            driver.models = _models_of(catalog, name)
        self.config, self.catalog = new, catalog
        self.upstreams.update(dict(new.backends))
        self.scheduler.apply(new, catalog, self.drivers)
        self.proxy.rename_models = new.server.rewrite_model_name
        self.cache.config = new.cache
        self.keys = KeyRing(new.auth)
        self.embeddings.window_s = new.embedding_batching.window_ms / 1000
        self.embeddings.max_inputs = new.embedding_batching.max_inputs
        return retired

    def _models_of(self, backend: str) -> list[ModelConfig]:
        return _models_of(self.catalog, backend)

    async def start(self) -> None:
        await self.scheduler.start()
        self.spawn(self.fallback.watch())
        _settle_gc()
        self.ready = True

    async def stop(self) -> None:
        self.ready = False
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.embeddings.close()
        await self.scheduler.stop()
        await self.cache.close()
        await self.upstreams.close()

    async def fetch_json(self, call: ApiCall, model: ModelConfig,
                         headers: Mapping[str, str] | None = None, request_id: str = "",
                         swap_timeout: float | None = None) -> bytes:
        """One non-streamed upstream call under its own lease (queueing for the model)."""
        async with self.scheduler.leased(model, swap_timeout) as lease:
            response = await self.proxy.open(call, lease.target, headers or {}, request_id)
            return await self.proxy.read_json(response, lease.target,
                                              self.proxy.renamer(call, lease.target))


def _models_of(catalog: Catalog, backend: str) -> list[ModelConfig]:
    """What the backend's driver loads: its models, not the adapters their servers carry."""
    return [m for m in catalog.all_models() if m.backend == backend and m.adapter_of is None]


GC_THRESHOLD = (35_000, 10, 10)


def _settle_gc() -> None:
    """What start-up built lives as long as the process: freeze it, so collections never walk
    it again, and collect the young generation less often. Requests make few cycles; with the
    defaults the collector took 10-15 % of the CPU and paused 30-80 ms (bench/relay_cpu.py)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLD)


def _coordinator(config: GatewayConfig) -> Coordinator:
    """Replicas coordinate their swaps through the cache's Redis; without it, one is assumed."""
    url = config.cache.redis_url
    if url is None:
        return LocalCoordinator()
    return RedisCoordinator(url, replica_id(), namespace=config.cache.namespace)
