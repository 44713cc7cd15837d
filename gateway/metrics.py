"""Prometheus metrics, read from the scheduler's and the cache's live state at scrape time."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder

from gateway.services import Services
from policies.types import State


class GatewayCollector:
    def __init__(self, services: Services) -> None:
        self.scheduler = services.scheduler
        self.cache = services.cache

    def collect(self) -> Iterator[Metric]:
        yield from self._models()
        yield from self._cache()

    def _cache(self) -> Iterator[Metric]:
        outcomes = CounterMetricFamily("swapper_cache_requests", "Cacheable-route answers by "
                                       "cache outcome", labels=["result"])
        for result in ("HIT", "MISS", "BYPASS"):
            outcomes.add_metric([result.lower()], self.cache.outcomes[result])
        stats = self.cache.store.stats
        written = CounterMetricFamily("swapper_cache_written_bytes", "Bytes stored in the cache")
        written.add_metric([], stats.bytes_written)
        errors = CounterMetricFamily("swapper_cache_errors", "Cache store operations that failed")
        errors.add_metric([], stats.errors)
        healthy = GaugeMetricFamily("swapper_cache_up", "1 while the cache store answers")
        healthy.add_metric([], 1.0 if self.cache.store.healthy else 0.0)
        yield from (outcomes, written, errors, healthy)

    def _models(self) -> Iterator[Metric]:
        now = self.scheduler.clock()
        active = GaugeMetricFamily("swapper_active_model", "1 if the model is loaded",
                                   labels=["model"])
        uptime = GaugeMetricFamily("swapper_model_uptime_seconds",
                                   "Total time the model has been resident", labels=["model"])
        requests = CounterMetricFamily("swapper_model_requests", "Requests leased to the model",
                                       labels=["model"])
        loads = CounterMetricFamily("swapper_model_loads", "Completed loads", labels=["model"])
        last_load = GaugeMetricFamily("swapper_model_last_load_seconds",
                                      "Duration of the last load", labels=["model"])
        queue = GaugeMetricFamily("swapper_queue_depth", "Requests waiting for the model",
                                  labels=["model"])
        in_flight = GaugeMetricFamily("swapper_model_in_flight", "Requests being served",
                                      labels=["model"])
        state = GaugeMetricFamily("swapper_model_state", "1 for the model's current state",
                                  labels=["model", "state"])
        for name, slot in self.scheduler.slots.items():
            r = slot.residency
            active.add_metric([name], 1.0 if r.state is State.LOADED else 0.0)
            uptime.add_metric([name], r.uptime_s(now))
            requests.add_metric([name], slot.request_count)
            loads.add_metric([name], r.load_count)
            if r.last_load_s is not None:
                last_load.add_metric([name], r.last_load_s)
            queue.add_metric([name], len(slot.queue))
            in_flight.add_metric([name], slot.in_flight)
            for each in State:
                state.add_metric([name, each.value], 1.0 if r.state is each else 0.0)
        yield from (active, uptime, requests, loads, last_load, queue, in_flight, state)


def registry_for(services: Services) -> CollectorRegistry:
    registry = CollectorRegistry()
    registry.register(GatewayCollector(services))  # type: ignore[arg-type]
    return registry


def wants_prometheus(accept: str) -> bool:
    """Prometheus asks with text/plain or OpenMetrics; everyone else gets the old JSON."""
    return "text/plain" in accept or "application/openmetrics-text" in accept


def render(registry: CollectorRegistry, accept: str) -> tuple[bytes, str]:
    encoder, content_type = choose_encoder(accept)
    return encoder(registry), content_type
