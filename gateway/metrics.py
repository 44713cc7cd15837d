"""Prometheus metrics: the scheduler's and the cache's live state, read at scrape time, and
per-request figures recorded as each answer ends (status, durations, tokens, errors, loads)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.multiprocess import MultiProcessCollector

from gateway.cache.responses import ResponseCache
from gateway.residency.scheduler import Scheduler
from gateway.residency.snapshot import SchedulerStatus
from policies.types import State

_SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class RequestMetrics:
    """Figures recorded when an API request's answer ends (fed by the access log)."""

    def __init__(self, registry: CollectorRegistry | None) -> None:
        self.requests = Counter("swapper_model_requests", "API requests by model and status",
                                ["model", "status"], registry=registry)
        self.duration = Histogram("swapper_request_duration_seconds", "Whole answer",
                                  ["model"], buckets=_SECONDS, registry=registry)
        self.ttfb = Histogram("swapper_time_to_first_byte_seconds", "First byte of the answer",
                              ["model"], buckets=_SECONDS, registry=registry)
        self.tokens = Counter("swapper_tokens", "Tokens from the answers' usage",
                              ["model", "kind"], registry=registry)
        self.errors = Counter("swapper_errors", "Errors answered, by OpenAI error code",
                              ["code"], registry=registry)
        self.model_errors = Counter("swapper_model_errors",
                                    "Errors answered for a known model, by model and code",
                                    ["model", "code"], registry=registry)
        self.loads = Histogram("swapper_model_load_seconds", "Model loads (swap-ins)",
                               ["model"], buckets=_SECONDS, registry=registry)
        self._models: dict[str, _ModelFigures] = {}  # labels() costs more than the sample

    def observe(self, state: dict[str, Any], record: dict[str, Any]) -> None:
        error = state.get("error")
        if error:
            self.errors.labels(error).inc()
        model = state.get("model")
        if model is None:
            return
        figures = self._models.get(model)
        if figures is None:
            figures = self._models[model] = _ModelFigures(self, model)
        if error:
            self.model_errors.labels(model, error).inc()
        figures.answered(record["status"]).inc()
        figures.duration.observe(record["duration_ms"] / 1000)
        if record["ttfb_ms"] is not None:
            figures.ttfb.observe(record["ttfb_ms"] / 1000)
        usage = state.get("usage")
        if usage is not None:
            figures.prompt.inc(usage.prompt)
            figures.completion.inc(usage.completion)

    def loaded(self, model: str, seconds: float) -> None:
        self.loads.labels(model).observe(seconds)


class _ModelFigures:
    """One model's labelled series, looked up once rather than on every answer."""

    def __init__(self, metrics: RequestMetrics, model: str) -> None:
        self._requests, self._model = metrics.requests, model
        self._statuses: dict[int, Any] = {}
        self.duration = metrics.duration.labels(model)
        self.ttfb = metrics.ttfb.labels(model)
        self.prompt = metrics.tokens.labels(model, "prompt")
        self.completion = metrics.tokens.labels(model, "completion")

    def answered(self, status: int) -> Any:
        child = self._statuses.get(status)
        if child is None:
            child = self._statuses[status] = self._requests.labels(self._model, str(status))
        return child


class Metrics:
    """The gateway's registry: live state plus per-request figures."""

    def __init__(self, scheduler: Scheduler, cache: ResponseCache) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(GatewayCollector(scheduler, cache))  # type: ignore[arg-type]
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            # Several workers: per-request figures go to shared files and every scrape, whichever
            # worker answers it, adds them up. The live state is the answering worker's view.
            MultiProcessCollector(self.registry)
            self.requests = RequestMetrics(None)
        else:
            self.requests = RequestMetrics(self.registry)


class GatewayCollector:
    def __init__(self, scheduler: Scheduler, cache: ResponseCache) -> None:
        self.scheduler = scheduler
        self.cache = cache

    def collect(self) -> Iterator[Metric]:
        yield from self._models()
        yield from self._cache()

    def _cache(self) -> Iterator[Metric]:
        outcomes = CounterMetricFamily("swapper_cache_requests", "Cacheable-route answers by "
                                       "cache outcome", labels=["model", "result"])
        for (model, result), count in sorted(self.cache.outcomes.items()):
            outcomes.add_metric([model, result.lower()], count)
        stats = self.cache.store.stats
        written = CounterMetricFamily("swapper_cache_written_bytes", "Bytes stored in the cache")
        written.add_metric([], stats.bytes_written)
        errors = CounterMetricFamily("swapper_cache_errors", "Cache store operations that failed")
        errors.add_metric([], stats.errors)
        healthy = GaugeMetricFamily("swapper_cache_up", "1 while the cache store answers")
        healthy.add_metric([], 1.0 if self.cache.store.healthy else 0.0)
        yield from (outcomes, written, errors, healthy)

    def _models(self) -> Iterator[Metric]:
        status = self.scheduler.status()
        active = GaugeMetricFamily("swapper_active_model", "1 if the model is loaded",
                                   labels=["model"])
        uptime = GaugeMetricFamily("swapper_model_uptime_seconds",
                                   "Total time the model has been resident", labels=["model"])
        loads = CounterMetricFamily("swapper_model_loads", "Completed loads", labels=["model"])
        last_load = GaugeMetricFamily("swapper_model_last_load_seconds",
                                      "Duration of the last load", labels=["model"])
        queue = GaugeMetricFamily("swapper_queue_depth", "Requests waiting for the model",
                                  labels=["model"])
        in_flight = GaugeMetricFamily("swapper_model_in_flight", "Requests being served",
                                      labels=["model"])
        state = GaugeMetricFamily("swapper_model_state", "1 for the model's current state",
                                  labels=["model", "state"])
        # The old series keep their labels (dashboards match them exactly); where each route
        # lives and what it measures are series of their own, with a `node` label.
        placed = GaugeMetricFamily("swapper_model_node", "1 for the node each route sits on",
                                   labels=["model", "node"])
        memory = GaugeMetricFamily("swapper_model_memory_gb", "Memory a resident route holds: "
                                   "measured, else its configured size_gb",
                                   labels=["model", "node", "source"])
        for name, model in status.models.items():
            active.add_metric([name], 1.0 if model.state is State.LOADED else 0.0)
            uptime.add_metric([name], model.uptime_s)
            loads.add_metric([name], model.load_count)
            if model.last_load_s is not None:
                last_load.add_metric([name], model.last_load_s)
            queue.add_metric([name], model.queue)
            in_flight.add_metric([name], model.in_flight)
            for each in State:
                state.add_metric([name, each.value], 1.0 if model.state is each else 0.0)
            placed.add_metric([name, model.node], 1.0)
            if model.managed and model.state is State.LOADED:
                source = "measured" if model.measured_gb is not None else "config"
                memory.add_metric([name, model.node, source], model.resident_gb)
        yield from (active, uptime, loads, last_load, queue, in_flight, state, placed, memory)
        yield from self._nodes(status)

    @staticmethod
    def _nodes(status: SchedulerStatus) -> Iterator[Metric]:
        budget = GaugeMetricFamily("swapper_node_memory_budget_gb", "The node's memory budget",
                                   labels=["node"])
        max_models = GaugeMetricFamily("swapper_node_max_models",
                                       "Models the node may hold at once", labels=["node"])
        resident = GaugeMetricFamily("swapper_node_resident_models", "Models loaded on the node",
                                     labels=["node"])
        resident_gb = GaugeMetricFamily("swapper_node_resident_gb", "Memory the node's budget "
                                        "counts as used (measured sizes where known)",
                                        labels=["node"])
        measured = GaugeMetricFamily("swapper_node_measured_gb", "Memory measured on the node's "
                                     "resident models", labels=["node"])
        free = GaugeMetricFamily("swapper_node_free_gb", "Free GPU memory the node reported",
                                 labels=["node"])
        swapping = GaugeMetricFamily("swapper_node_swapping", "1 while a load or unload runs "
                                     "on the node", labels=["node"])
        for name, node in status.nodes.items():
            if node.memory_budget_gb is not None:
                budget.add_metric([name], node.memory_budget_gb)
            if node.max_models is not None:
                max_models.add_metric([name], node.max_models)
            resident.add_metric([name], len(node.resident))
            resident_gb.add_metric([name], node.resident_gb)
            if node.measured_gb is not None:
                measured.add_metric([name], node.measured_gb)
            if node.free_gb is not None:
                free.add_metric([name], node.free_gb)
            swapping.add_metric([name], 1.0 if node.swapping else 0.0)
        yield from (budget, max_models, resident, resident_gb, measured, free, swapping)


def wants_prometheus(accept: str) -> bool:
    """Prometheus asks with text/plain or OpenMetrics; everyone else gets the old JSON."""
    return "text/plain" in accept or "application/openmetrics-text" in accept


def render(registry: CollectorRegistry, accept: str) -> tuple[bytes, str]:
    encoder, content_type = choose_encoder(accept)
    return encoder(registry), content_type
