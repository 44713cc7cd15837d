"""The status page at `/ui`: `/status` for people, server-rendered, with actions for admins.

    header   version, mode, the key field (for actions), reload-config
    cards    resident, queued, in flight, requests/min, cache
    nodes    a memory bar each: resident against budget, measured against configured
    timeline which route was resident when, per node, last 30 min (SVG, `ui_svg`)
    models   state, load progress, last use, ttl, rates, backend health, load times, errors
    swaps    one row per swap: what went out and in, why, waiting, how long, outcome, served

Who sees what is docs/access.md's rule: a key sees its own models, an admin key acts. The data
comes from one place (`ui_view.page_view`), every value from config or a backend is escaped, and
the page makes no external request (`ui_assets`: its style, its script, its CSP).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from html import escape

from starlette.requests import Request
from starlette.responses import HTMLResponse

from gateway import __version__
from gateway.access.auth import access_of
from gateway.fronts.routing import Route
from gateway.fronts.ui_assets import CONTENT_SECURITY_POLICY, CSS, REFRESH_S, SCRIPT
from gateway.fronts.ui_format import (
    BLANK,
    ago,
    clock,
    duration,
    gigabytes,
    load_time,
    within,
    zone,
)
from gateway.fronts.ui_recent import RecentRequests, Residencies
from gateway.fronts.ui_svg import colour_of, timeline_svg
from gateway.fronts.ui_view import NodeRow, PageView, RouteRow, SwapRow, page_view
from gateway.services import Services
from policies.types import State

_NUMERIC = frozenset({"Queue", "In flight", "Req/min", "TTFT p50", "Last load", "Memory",
                      "Waiting", "Took", "Served"})
_HEADERS = {"cache-control": "no-store", "content-security-policy": CONTENT_SECURITY_POLICY,
            "x-frame-options": "DENY", "referrer-policy": "no-referrer",
            "x-content-type-options": "nosniff"}


class Console:
    """What the page remembers between views; one per app."""

    def __init__(self) -> None:
        self.requests = RecentRequests()
        self.residencies = Residencies()


def ui_routes(services: Services, console: Console | None = None) -> list[Route]:
    console = console or Console()

    async def page(request: Request) -> HTMLResponse:
        view = page_view(services, access_of(request.scope), console.requests,
                         console.residencies)
        return HTMLResponse(render(view), headers=_HEADERS)

    return [Route("/ui", page, methods=["GET"])]


def render(view: PageView) -> str:
    colours = {route.status.name: colour_of(i) for i, route in enumerate(view.routes)}
    live = "".join((
        _cards(view),
        "<h2>Nodes</h2>", _nodes(view, colours),
        f"<h2>Swap timeline <small>last {duration(view.timeline_s)} \u00b7 resident: the "
        "model's colour, loading: striped, a failed load: red</small></h2>",
        _timeline(view, colours),
        "<h2>Models</h2>", _models(view, colours),
        "<h2>Swaps <small>newest first</small></h2>", _swaps(view),
    ))
    return (
        "<!doctype html><html lang=en><head><meta charset=utf-8>"
        f'<noscript><meta http-equiv="refresh" content="{REFRESH_S}"></noscript>'
        '<meta name="viewport" content="width=device-width,initial-scale=1">'
        f"<title>Swapper Gateway</title><style>{CSS}</style></head><body>"
        f"{_header(view)}<output id=notice role=status></output>"
        f'<main id=live data-admin="{str(view.admin).lower()}">{live}'
        f"<footer>Updated {clock(view.at)}, times in {escape(zone(view.at))} \u00b7 "
        f"refreshes every {REFRESH_S} s</footer></main>"
        f"<script>{SCRIPT}</script></body></html>"
    )


def _header(view: PageView) -> str:
    hidden = "" if view.admin else " hidden"
    # An open gateway has no key to type: its page acts without one (docs/access.md).
    no_key = " hidden" if view.open else ""
    note = "<span class=keystate>open gateway: no key needed</span>" if view.open else ""
    return (
        f"<header><h1>Swapper Gateway</h1><span class=meta>v{escape(__version__)} \u00b7 "
        f"{escape(view.mode)}</span>"
        f"<form id=keyform class=js-only autocomplete=off>{note}"
        f'<input id=key type=password placeholder="admin key (this tab only)" '
        f'aria-label="admin key, kept for this tab only"{no_key}>'
        f"<button type=submit{no_key}>Use key</button>"
        f"<button type=button id=forget{no_key}>Forget</button>"
        "<span id=keystate class=keystate></span>"
        f'<button type=button class=js-only data-admin-only data-action=reload{hidden}>'
        "Reload config</button></form></header>"
    )


# -- cards and nodes ----------------------------------------------------------------------------


def _cards(view: PageView) -> str:
    models = view.models
    loaded = [r for r in view.routes if r.status.state is State.LOADED]
    down = sorted({r.status.backend for r in view.routes if not r.backend_up})
    cache = view.cache
    cards = {
        "Resident": f"{len(loaded)} of {len(view.routes)}",
        "Queued": str(sum(r.status.queue for r in view.routes)),
        "In flight": str(sum(r.status.in_flight for r in view.routes)),
        "Requests/min": f"{sum(r.per_minute for r in models):.1f}",
        "Cache hit rate": (f"{100 * cache.hits / cache.lookups:.0f}% of {cache.lookups}"
                           if cache.lookups else BLANK),
        "Cache": cache.kind,
        "Backends down": ", ".join(down) if down else "none",
    }
    return '<div class="cards">' + "".join(
        f"<div class=card><small>{escape(label)}</small><b>{escape(value)}</b></div>"
        for label, value in cards.items()) + "</div>"


def _nodes(view: PageView, colours: dict[str, str]) -> str:
    if not view.nodes:
        return "<p class=empty>No node: no model's residency is managed here.</p>"
    return "<div class=nodes>" + "".join(
        _node(node, [r for r in view.routes if r.status.managed and r.status.node == node.name
                     and r.status.view.resident], colours) for node in view.nodes) + "</div>"


def _node(node: NodeRow, holding: list[RouteRow], colours: dict[str, str]) -> str:
    """`holding`: the visible routes that count in the node's budget now (loaded, loading,
    unloading)."""
    limit = f"max {node.max_models} model{'s' * (node.max_models != 1)}" \
        if node.max_models is not None else "no model limit"
    swapping = " \u00b7 swapping\u2026" if node.swapping else ""
    return (f"<div class=node data-node=\"{escape(node.name)}\"><div class=head>"
            f"<b>{escape(node.name)}</b><span>{escape(node.mode)} \u00b7 {limit}{swapping}"
            f"</span></div>{_memory_bar(node, holding, colours)}"
            f"<small>{escape(_memory_text(node))}</small></div>")


def _memory_bar(node: NodeRow, holding: list[RouteRow], colours: dict[str, str]) -> str:
    scale = node.budget_gb or max(node.resident_gb, node.configured_gb) or 1.0
    parts = []
    for route in holding:
        m = route.status
        moving = "" if m.state is State.LOADED else f" ({m.state.value})"
        parts.append(f'<span class="seg {m.state.value}" style="width:'
                     f'{100 * m.resident_gb / scale:.2f}%;background:{colours[m.name]}" '
                     f'title="{escape(m.name)}{moving}: {gigabytes(m.resident_gb)}"></span>')
    rest = node.resident_gb - sum(r.status.resident_gb for r in holding)
    if rest > 0.01:  # routes this caller may not see
        parts.append(f'<span class="seg other" style="width:{100 * rest / scale:.2f}%" '
                     'title="other models"></span>')
    if node.measured_gb is not None and node.budget_gb:
        parts.append(f'<span class=configured style="left:'
                     f'{min(100.0, 100 * node.configured_gb / scale):.2f}%" '
                     f'title="configured: {gigabytes(node.configured_gb)}"></span>')
    over = " over" if node.budget_gb and node.resident_gb > node.budget_gb else ""
    return f'<div class="membar{over}">{"".join(parts)}</div>'


def _memory_text(node: NodeRow) -> str:
    budget = f"of {gigabytes(node.budget_gb)}" if node.budget_gb else "(no memory budget)"
    text = f"{gigabytes(node.resident_gb)} resident {budget}"
    if node.measured_gb is not None:
        text += (f" \u00b7 measured {gigabytes(node.measured_gb)}, configured "
                 f"{gigabytes(node.configured_gb)}")
    if node.free_gb is not None:
        text += f" \u00b7 {gigabytes(node.free_gb)} free on the GPU"
    return text


def _timeline(view: PageView, colours: dict[str, str]) -> str:
    lanes = [(node.name, [r.status.name for r in view.routes
                          if r.status.managed and r.status.node == node.name])
             for node in view.nodes]
    lanes = [(node, routes) for node, routes in lanes if routes]
    if not lanes:
        return "<p class=empty>No model whose residency the gateway manages.</p>"
    svg = timeline_svg(lanes, view.spans, colours, view.at, view.timeline_s)
    return f"<div class=timeline>{svg}</div>"


# -- models -------------------------------------------------------------------------------------


def _models(view: PageView, colours: dict[str, str]) -> str:
    headers = ["Model", "State", "Node", "Backend", "Queue", "In flight", "Req/min", "TTFT p50",
               "Last used", "Idle unload", "Last load", "Memory", "Error", "Actions"]
    rows = [_model_row(route, view, colours) for route in view.routes]
    return _table(_shown(headers, view), rows, "No models configured.", row_classes=[
        "route" if route.fallback else "" for route in view.routes])


def _shown(headers: list[str], view: PageView) -> list[str]:
    """One node needs no node column; a reader without admin rights, no actions."""
    hidden = {"Node"} if len(view.nodes) <= 1 else set()
    return [h for h in headers if h not in hidden and (h != "Actions" or view.admin)]


def _model_row(route: RouteRow, view: PageView, colours: dict[str, str]) -> dict[str, str]:
    m, now = route.status, view.at
    name = (f'<span class=swatch style="background:{colours[m.name]}"></span>'
            f"{escape(m.name)}")
    if route.aliases:
        name += f' <span class=alias>({escape(", ".join(route.aliases))})</span>'
    loads = f" <span class=sub>\u00d7{m.load_count}</span>" if m.load_count else ""
    return {
        "Model": _td(name), "State": _td(_state(route, now)), "Node": _td(escape(m.node)),
        "Backend": _td(_backend(route)), "Queue": _num(str(m.queue)),
        "In flight": _num(str(m.in_flight)),
        "Req/min": _num(f"{route.per_minute:.1f}" if not route.fallback else BLANK),
        "TTFT p50": _num(load_time(route.ttft_p50_ms / 1000)
                         if route.ttft_p50_ms is not None else BLANK),
        "Last used": _td(escape(ago(m.last_used, now))),
        "Idle unload": _td(escape(_idle_unload(route, now))),
        "Last load": _num(load_time(m.last_load_s) + loads),
        "Memory": _num(_memory(route)), "Error": _td(_error(m.name, m.error), "error"),
        "Actions": _td(_actions(route), "actions"),
    }


def _state(route: RouteRow, now: float) -> str:
    m = route.status
    badge = f'<span class="state {m.state.value}">{m.state.value}</span>'
    if m.state is State.LOADING and m.load_elapsed_s is not None and m.load_timeout_s:
        return (f'{badge} <progress max="{m.load_timeout_s:g}" value="{m.load_elapsed_s:.1f}">'
                f"</progress> <span class=sub>{duration(m.load_elapsed_s)} of "
                f"{duration(m.load_timeout_s)}</span>")
    if m.state is State.FAILED:
        if not m.retryable:
            return f"{badge} <span class=sub>not retried: fix it, then reload</span>"
        retry = "retried on the next request" if not m.load_blocked \
            else f"retry {within(m.retry_at, now)}"
        return f"{badge} <span class=sub>{escape(retry)}</span>"
    if m.admission != "open" and m.state is State.LOADED:
        return f"{badge} <span class=sub>{escape(m.admission)}</span>"
    return badge


def _backend(route: RouteRow) -> str:
    m = route.status
    health = "up" if route.backend_up else "down"
    text = (f'<span class="dot {health}" title="backend {health}"></span>{escape(m.backend)}')
    if m.adapter_of is not None:
        text += f" <span class=sub>adapter of {escape(m.adapter_of)}</span>"
    elif not m.managed:
        text += " <span class=sub>always on</span>"
    if route.serving and (route.fallback or not route.backend_up):
        text += " <span class=sub>serving</span>"
    if m.server is not None:
        pid, port = m.server
        text += f" <span class=sub>pid {pid}, port {port}</span>"
    return text


def _idle_unload(route: RouteRow, now: float) -> str:
    m = route.status
    if m.ttl_expires_at is not None:
        return within(m.ttl_expires_at, now)
    if m.view.ttl_s and m.state is State.LOADED:
        return f"after {duration(m.view.ttl_s)} idle"
    return BLANK if not m.view.ttl_s else f"ttl {duration(m.view.ttl_s)}"


def _memory(route: RouteRow) -> str:
    """What it holds: measured where the backend tells (and the config's guess when that was
    more than 5% off), else its configured size_gb."""
    m = route.status
    if m.measured_gb is None:
        return gigabytes(m.size_gb) if m.size_gb else BLANK
    off = m.size_gb and abs(m.measured_gb - m.size_gb) > 0.05 * m.size_gb
    by = f" by {m.measured_source}" if m.measured_source else ""
    note = f"measured{by}" + (f", {gigabytes(m.size_gb)} configured" if off else "")
    return f"{gigabytes(m.measured_gb)} <span class=sub>{escape(note)}</span>"


def _error(name: str, error: str | None) -> str:
    """One line, the rest behind a click: a backend's error can be pages long."""
    if not error:
        return ""
    first = error.strip().splitlines()[0] if error.strip() else error
    return (f'<details class=error id="error-{escape(name)}"><summary>{escape(first[:120])}'
            f"</summary><pre>{escape(error)}</pre></details>")


def _actions(route: RouteRow) -> str:
    if route.fallback:
        return ""  # a fallback route is loaded and unloaded as its model's route
    m, model = route.status, escape(route.status.name)
    buttons = []
    if m.managed:
        busy = m.state in (State.LOADING, State.UNLOADING)
        buttons.append(_button("load", model, "Load", busy or m.state is State.LOADED))
        buttons.append(_button("unload", model, "Unload", m.state is not State.LOADED))
    buttons.append(_button("purge", model, "Purge cache", False))
    return "".join(buttons)


def _button(action: str, model: str, label: str, disabled: bool) -> str:
    off = " disabled" if disabled else ""
    return (f'<button type=button class=js-only data-action={action} data-model="{model}"'
            f"{off}>{label}</button>")


# -- swaps --------------------------------------------------------------------------------------


def _swaps(view: PageView) -> str:
    headers = ["Time", "Node", "Unloaded", "Loaded", "Why", "Waiting", "Took", "Outcome",
               "Served"]
    return _table(_shown(headers, view), [_swap_row(swap, view.at) for swap in view.swaps],
                  "No swaps yet.")


def _swap_row(swap: SwapRow, now: float) -> dict[str, str]:
    took = load_time(swap.took_s)
    if swap.load_s is not None and swap.unloaded:
        took += f" <span class=sub>(load {load_time(swap.load_s)})</span>"
    outcome = (f'<span class="state {swap.outcome.replace(" ", "-")}">'
               f"{escape(swap.outcome)}</span>")
    if swap.error:
        outcome += _error(f"swap-{swap.at}-{swap.loaded}", swap.error)
    return {
        "Time": _td(f"{clock(swap.at)} <span class=sub>{escape(ago(swap.at, now))}</span>"),
        "Node": _td(escape(swap.node)),
        "Unloaded": _td(escape(", ".join(swap.unloaded)) or BLANK),
        "Loaded": _td(escape(swap.loaded or BLANK)), "Why": _td(escape(swap.reason)),
        "Waiting": _num(str(swap.waiting)), "Took": _num(took), "Outcome": _td(outcome),
        "Served": _num(str(swap.served) if swap.served is not None else BLANK),
    }


# -- tables -------------------------------------------------------------------------------------


def _table(headers: Sequence[str], rows: Iterable[dict[str, str]], empty: str,
           row_classes: Sequence[str] = ()) -> str:
    """A table of the `headers` columns of rows of `<td>` cells keyed by header, or one line
    saying there is nothing to show."""
    rendered = []
    for i, row in enumerate(rows):
        css = row_classes[i] if i < len(row_classes) else ""
        cells = "".join(row[h] for h in headers)
        rendered.append(f"<tr{f' class={css}' if css else ''}>{cells}</tr>")
    if not rendered:
        return f"<table><tr><td class=empty>{escape(empty)}</td></tr></table>"
    head = "".join(f"<th{' class=num' if h in _NUMERIC else ''}>{escape(h)}</th>" for h in headers)
    return (f"<div class=scroll><table><thead><tr>{head}</tr></thead>"
            f"<tbody>{''.join(rendered)}</tbody></table></div>")


def _td(html: str, css_class: str = "") -> str:
    return f"<td class={css_class}>{html}</td>" if css_class else f"<td>{html}</td>"


def _num(html: str) -> str:
    return _td(html, "num")
