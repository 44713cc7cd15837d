"""What the status page shows, as data: built in one place (`page_view`) from one snapshot of the
read model (`Scheduler.status()`), the caller's access, and what the page remembers
(`ui_recent`). The HTML (`ui`) and the timeline (`ui_svg`) only format this.

A caller sees what `/status` shows it (docs/access.md, rule 3): the routes of the models its key
may use, their swaps and spans; nodes show their budgets and totals.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from gateway.access.auth import Access
from gateway.fronts.ui_recent import (
    SAME_EDGE_S,
    TIMELINE_S,
    RecentRequests,
    Residencies,
    Span,
)
from gateway.residency.snapshot import DecisionStatus, ModelStatus, SchedulerStatus
from gateway.services import Services

_SWAPS_SHOWN = 20
_WINDOWS_S = (60.0, 300.0, 600.0, TIMELINE_S)


@dataclass(frozen=True)
class RouteRow:
    """One route of a model (its own, or a fallback `model@backend`), one line of the table."""

    status: ModelStatus
    aliases: tuple[str, ...]
    fallback: bool  # a fallback route, shown under its model
    serving: bool  # the route that serves the model's requests now
    backend_up: bool
    per_minute: float
    ttft_p50_ms: float | None


@dataclass(frozen=True)
class NodeRow:
    name: str
    mode: str
    max_models: int | None
    budget_gb: float | None
    resident_gb: float  # what the budget counts (measured sizes where known)
    configured_gb: float  # the resident routes' size_gb, as configured
    measured_gb: float | None
    free_gb: float | None
    resident: tuple[str, ...]  # the visible resident routes (the rest count in resident_gb)
    swapping: bool


@dataclass(frozen=True)
class SwapRow:
    """One swap: a plan's unloads and its load, decided at once on one node."""

    at: float
    node: str
    unloaded: tuple[str, ...]
    loaded: str | None
    reason: str
    waiting: int
    served: int | None
    outcome: str  # loaded | loading | failed | unloaded | running | not carried out
    took_s: float | None  # from the decision to its end (unloads and load)
    load_s: float | None  # the load alone
    error: str | None


@dataclass(frozen=True)
class CacheFigures:
    kind: str  # off | memory | redis | redis (down)
    hits: int
    lookups: int


@dataclass(frozen=True)
class PageView:
    at: float
    mode: str
    admin: bool  # the page offers its actions
    open: bool  # no keys configured
    routes: tuple[RouteRow, ...]
    nodes: tuple[NodeRow, ...]
    swaps: tuple[SwapRow, ...]
    spans: tuple[Span, ...]
    timeline_s: float  # what the timeline spans: 30 min, or less while the gateway is young
    cache: CacheFigures

    @property
    def models(self) -> list[RouteRow]:
        return [r for r in self.routes if not r.fallback]


def page_view(services: Services, access: Access, recent: RecentRequests,
              residencies: Residencies) -> PageView:
    status = services.scheduler.status()
    residencies.observe(status)  # a view between two samples still sees the latest edges
    visible = _visible_routes(services, access, status, recent)
    shown = {route.status.name for route in visible}
    window = timeline_window(status.at - (residencies.since or status.at))
    spans = [s for s in residencies.spans(status.at - window) if s.route in shown]
    decisions = [d for d in status.decisions if d.model in shown]
    return PageView(
        at=status.at, mode=services.config.swapper.mode, admin=access.admin, open=access.open,
        routes=tuple(visible), nodes=tuple(_nodes(status, shown)),
        swaps=tuple(swap_rows(decisions, status, spans)[:_SWAPS_SHOWN]), spans=tuple(spans),
        timeline_s=window, cache=_cache(services))


def timeline_window(known_s: float) -> float:
    """30 minutes; less while the page has seen less, so a young gateway's swaps are wide
    enough to see: the first of 1, 5, 10, 30 minutes that covers what it has seen."""
    return next((w for w in _WINDOWS_S if known_s <= w), TIMELINE_S)


def _visible_routes(services: Services, access: Access, status: SchedulerStatus,
                    recent: RecentRequests) -> list[RouteRow]:
    catalog, rows = services.catalog, []
    for model in catalog.models():
        if not access.may_see(model) or model.name not in status.models:
            continue
        serving = services.fallback.choose(model, status).name
        figures = recent.figures(model.name)  # requests are counted per public model
        for route in catalog.routes(model):
            if route.name not in status.models:
                continue
            own = route is model
            rows.append(RouteRow(
                status=status.models[route.name], aliases=model.aliases if own else (),
                fallback=not own, serving=route.name == serving,
                backend_up=services.health.up(route.backend),
                per_minute=figures.per_minute if own else 0.0,
                ttft_p50_ms=figures.ttft_p50_ms if own else None))
    return rows


def _nodes(status: SchedulerStatus, shown: set[str]) -> Iterable[NodeRow]:
    for node in status.nodes.values():
        resident = [status.models[name] for name in node.resident if name in status.models]
        yield NodeRow(
            name=node.name, mode=node.mode, max_models=node.max_models,
            budget_gb=node.memory_budget_gb, resident_gb=node.resident_gb,
            configured_gb=sum(m.size_gb for m in resident), measured_gb=node.measured_gb,
            free_gb=node.free_gb, resident=tuple(m.name for m in resident if m.name in shown),
            swapping=node.swapping)


def _cache(services: Services) -> CacheFigures:
    outcomes, config = services.cache.totals(), services.config.cache
    if not config.enabled:
        kind = "off"
    elif config.redis_url is None:
        kind = "memory"
    else:  # only the kind: the URL may carry a password
        kind = "redis" if services.cache.store.healthy else "redis (down)"
    return CacheFigures(kind, outcomes["HIT"], outcomes["HIT"] + outcomes["MISS"])


# -- swaps ------------------------------------------------------------------------------------


def swap_rows(decisions: Sequence[DecisionStatus], status: SchedulerStatus,
              spans: Sequence[Span]) -> list[SwapRow]:
    """The decision log (newest first) grouped into swaps, each with how it ended, matched
    from the spans: the decision log says what was chosen, not what became of it."""
    groups: dict[tuple[float, str], list[DecisionStatus]] = {}
    for decision in decisions:
        groups.setdefault((decision.at, decision.node), []).append(decision)
    rows = []
    for (at, node), group in groups.items():
        load = next((d for d in group if d.action == "load"), None)
        unloads = tuple(d.model for d in group if d.action == "unload")
        later = _next_decision_at(decisions, load.model, at) if load else None
        rows.append(_swap_row(at, node, unloads, load, group[0].reason, status, spans, later))
    return rows


def _next_decision_at(decisions: Sequence[DecisionStatus], model: str,
                      at: float) -> float | None:
    later = [d.at for d in decisions if d.model == model and d.action == "load" and d.at > at]
    return min(later, default=None)


def _swap_row(at: float, node: str, unloads: tuple[str, ...], load: DecisionStatus | None,
              reason: str, status: SchedulerStatus, spans: Sequence[Span],
              before: float | None) -> SwapRow:
    unloaded_at = [s.end for s in spans if s.kind == "loaded" and s.route in unloads
                   and s.end is not None and s.end >= at - SAME_EDGE_S]
    unloads_done = len(unloaded_at) >= len(unloads)
    if load is None:
        ended = max(unloaded_at, default=None) if unloads_done else None
        outcome = "unloaded" if unloads_done else _still_running(status, node, at)
        return SwapRow(at, node, unloads, None, reason, 0, None, outcome, _took(at, ended),
                       None, None)
    loading = _load_span(spans, load.model, at, before)
    if loading is None:
        outcome = _still_running(status, node, at)
        return SwapRow(at, node, unloads, load.model, reason, load.waiting, load.served,
                       outcome, None, None, None)
    ended = None if loading.end is None or loading.seen else loading.end
    load_s = None if ended is None else ended - loading.start
    outcome = "loading" if loading.end is None else "failed" if loading.failed else "loaded"
    return SwapRow(at, node, unloads, load.model, reason, load.waiting, load.served, outcome,
                   _took(at, ended), load_s, loading.error)


def _still_running(status: SchedulerStatus, node: str, at: float) -> str:
    """A swap with no end seen: running if it is its node's latest and the node swaps now."""
    latest = max((d.at for d in status.decisions if d.node == node), default=None)
    swapping = node in status.nodes and status.nodes[node].swapping
    return "running" if swapping and latest == at else "not carried out"


def _load_span(spans: Sequence[Span], route: str, at: float,
               before: float | None) -> Span | None:
    """The load this decision began: the route's first load from the decision on, before the
    next decision to load it (a deferred swap is decided again)."""
    for span in spans:
        if span.route == route and span.kind == "loading" and span.start >= at - SAME_EDGE_S and (
                before is None or span.start < before):
            return span
    return None


def _took(at: float, ended: float | None) -> float | None:
    return None if ended is None else max(0.0, ended - at)
