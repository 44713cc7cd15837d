"""The status page at `/ui`: one server-rendered HTML page that refreshes itself.

No build step, no scripts, no external assets: a `<meta http-equiv="refresh">` reloads it, and
every value that came from config or a backend is escaped before it reaches the page.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from html import escape

from starlette.requests import Request
from starlette.responses import HTMLResponse
from starlette.routing import Route

from gateway import __version__
from gateway.residency.scheduler import Decision, Slot
from gateway.services import Services
from policies.types import State

REFRESH_S = 5
_DECISIONS_SHOWN = 15
_NUMERIC = frozenset({"Size GB", "Queue", "In flight", "Last load", "Uptime", "Requests",
                      "Waiting"})  # right-aligned columns
_BLANK = "\u2013"  # an en dash where there is no value yet

_CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;
  background:#f5f6f8;color:#1d2330}
header{background:#1d2330;color:#fff;padding:14px 28px;display:flex;align-items:baseline;gap:16px}
header h1{font-size:19px;margin:0;font-weight:600}
header span{color:#aab3c5;font-size:13px}
main{padding:20px 28px;max-width:1280px}
.cards{display:flex;gap:12px;flex-wrap:wrap;margin-bottom:20px}
.card{background:#fff;border:1px solid #dde1e8;border-radius:8px;padding:10px 16px;min-width:130px}
.card b{display:block;font-size:20px;font-weight:600}
.card small{color:#667085;text-transform:uppercase;letter-spacing:.04em;font-size:11px}
h2{font-size:15px;margin:22px 0 8px}
table{border-collapse:collapse;width:100%;background:#fff;border:1px solid #dde1e8}
th,td{padding:7px 12px;text-align:left;border-bottom:1px solid #eceef2;white-space:nowrap}
th{background:#fafbfc;color:#667085;font-weight:600;font-size:12px}
td.num,th.num{text-align:right;font-variant-numeric:tabular-nums}
td.error{color:#b42318;white-space:normal;max-width:320px}
.alias{color:#667085;font-size:12px}
.state{display:inline-block;padding:1px 9px;border-radius:10px;font-size:12px;font-weight:600}
.loaded{background:#d1fadf;color:#05603a}
.loading,.unloading{background:#fef0c7;color:#93370d}
.unloaded{background:#eaecf0;color:#475467}
.failed{background:#fee4e2;color:#b42318}
.empty{color:#667085;padding:12px}
footer{color:#98a2b3;font-size:12px;padding:8px 28px 20px}
"""


def ui_routes(services: Services) -> list[Route]:
    async def page(request: Request) -> HTMLResponse:
        return HTMLResponse(_render(services, time.time()),
                            headers={"cache-control": "no-store"})

    return [Route("/ui", page, methods=["GET"])]


def _render(services: Services, wall: float) -> str:
    scheduler = services.scheduler
    now = scheduler.clock()
    slots = list(scheduler.slots.values())
    body = "".join((
        _summary(services, slots),
        "<h2>Models</h2>",
        _table(("Model", "State", "Backend", "Size GB", "Queue", "In flight", "Last load",
                "Uptime", "Requests", "Error"),
               (_model_row(slot, now) for slot in slots), "No models configured."),
        "<h2>Recent swap decisions</h2>",
        _table(("Time (UTC)", "Action", "Model", "Waiting", "Reason"),
               (_decision_row(d) for d in list(reversed(scheduler.decisions))[:_DECISIONS_SHOWN]),
               "No swaps yet."),
    ))
    return (
        "<!doctype html><html lang=en><head><meta charset=utf-8>"
        f'<meta http-equiv="refresh" content="{REFRESH_S}">'
        '<meta name="viewport" content="width=device-width,initial-scale=1">'
        f"<title>Swapper Gateway</title><style>{_CSS}</style></head><body>"
        f"<header><h1>Swapper Gateway</h1><span>v{escape(__version__)} · "
        f"{escape(services.config.swapper.mode)}</span></header>"
        f"<main>{body}</main>"
        f"<footer>Updated {_clock(wall)} UTC · refreshes every {REFRESH_S} s</footer>"
        "</body></html>"
    )


def _summary(services: Services, slots: Sequence[Slot]) -> str:
    loaded = [s for s in slots if s.residency.state is State.LOADED]
    resident_gb = sum(s.model.size_gb for s in loaded if s.managed)
    budget = services.config.swapper.memory_budget_gb
    cards = {
        "Loaded": f"{len(loaded)} / {len(slots)}",
        "Resident GB": f"{resident_gb:g}" + (f" / {budget:g}" if budget is not None else ""),
        "Queued": str(sum(len(s.queue) for s in slots)),
        "In flight": str(sum(s.in_flight for s in slots)),
        "Requests": str(sum(s.request_count for s in slots)),
        "Cache hit rate": _hit_rate(services.cache.outcomes),
        "Cache": _cache_kind(services),
    }
    return '<div class="cards">' + "".join(
        f"<div class=card><small>{escape(label)}</small><b>{escape(value)}</b></div>"
        for label, value in cards.items()
    ) + "</div>"


def _hit_rate(outcomes: Counter[str]) -> str:
    lookups = outcomes["HIT"] + outcomes["MISS"]
    return f"{100 * outcomes['HIT'] / lookups:.0f}% of {lookups}" if lookups else _BLANK


def _cache_kind(services: Services) -> str:
    if not services.config.cache.enabled:
        return "off"
    if services.config.cache.redis_url is None:
        return "memory"
    # Only the kind: the URL may carry a password.
    return "redis" if services.cache.store.healthy else "redis (down)"


def _model_row(slot: Slot, now: float) -> list[str]:
    r, model = slot.residency, slot.model
    name = escape(model.name)
    if model.aliases:
        name += f' <span class=alias>({escape(", ".join(model.aliases))})</span>'
    return [
        _td(name),
        _td(f'<span class="state {escape(r.state.value)}">{escape(r.state.value)}</span>'),
        _td(escape(model.backend)),
        _num(f"{model.size_gb:g}"),
        _num(str(len(slot.queue))),
        _num(str(slot.in_flight)),
        _num(_duration(r.last_load_s)),
        _num(_duration(r.uptime_s(now) or None)),
        _num(str(slot.request_count)),
        _td(escape(r.error or ""), "error"),
    ]


def _decision_row(decision: Decision) -> list[str]:
    return [_td(_clock(decision.at)), _td(escape(decision.action)), _td(escape(decision.model)),
            _num(str(decision.waiting)), _td(escape(decision.reason))]


def _table(headers: Sequence[str], rows: Iterable[list[str]], empty: str) -> str:
    """A table of rows of `<td>` cells, or one line saying there is nothing to show."""
    rendered = "".join(f"<tr>{''.join(row)}</tr>" for row in rows)
    if not rendered:
        return f"<table><tr><td class=empty>{escape(empty)}</td></tr></table>"
    head = "".join(f"<th{' class=num' if h in _NUMERIC else ''}>{escape(h)}</th>" for h in headers)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{rendered}</tbody></table>"


def _td(html: str, css_class: str = "") -> str:
    return f"<td class={css_class}>{html}</td>" if css_class else f"<td>{html}</td>"


def _num(text: str) -> str:
    return _td(escape(text), "num")


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return _BLANK
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {secs} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes} min"


def _clock(wall: float) -> str:
    return datetime.fromtimestamp(wall, UTC).strftime("%Y-%m-%d %H:%M:%S")
