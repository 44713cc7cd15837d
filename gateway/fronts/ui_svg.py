"""The swap timeline: which route was resident when, per node, over the last 30 minutes, as an
SVG drawn on the server (no script, no external request; the page inlines it).

    node default ─────────────────────────────────────────────────────────
      alpha   ▒▒█████████████            ▒███████                     │
      beta                   ▒▒▒█████████        ▒▒x                  │now
              30 min ago     20 min        10 min                    now

`█` resident, `▒` loading, a red end a load that failed. Thrash shows as many short bars, a
starved model as an empty row. Every bar has a `<title>` (a tooltip in a browser).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from html import escape

from gateway.fronts.ui_format import duration
from gateway.fronts.ui_recent import TIMELINE_S, Span

WIDTH = 1200
_LABEL_W = 190
_PLOT_W = WIDTH - _LABEL_W - 20
_ROW_H = 22
_NODE_H = 24
_AXIS_H = 26
PALETTE = ("#2e90fa", "#12b76a", "#9e77ed", "#ee46bc", "#f79009", "#15b79e", "#6172f3",
           "#dd2590", "#0ba5ec", "#66c61c")
_LOADING = "#fdb022"
_FAILED = "#d92d20"


def colour_of(index: int) -> str:
    return PALETTE[index % len(PALETTE)]


def timeline_svg(nodes: Sequence[tuple[str, Sequence[str]]], spans: Sequence[Span],
                 colours: dict[str, str], now: float,
                 window_s: float = TIMELINE_S) -> str:
    """`nodes`: each node with its routes, one row each, in order; the last `window_s`."""
    x = _scale(now - window_s, now)
    by_route: dict[str, list[Span]] = {}
    for span in spans:
        by_route.setdefault(span.route, []).append(span)
    rows, bars, y = [], [], 0
    for node, routes in nodes:
        rows.append(_node_heading(node, y))
        y += _NODE_H
        for route in routes:
            rows.append(_row(route, y))
            bars += [_bar(span, colours.get(route, PALETTE[0]), y, x, now)
                     for span in by_route.get(route, [])]
            y += _ROW_H
    height = y + _AXIS_H
    # Inline in HTML: no xmlns needed, and the page names no URL at all.
    return (f'<svg id=timeline viewBox="0 0 {WIDTH} '
            f'{height}" width="100%" role="img" aria-label="Which model was resident when, '
            f'per node, over the last {duration(window_s)}">{_defs()}{"".join(rows)}'
            f'{_axis(y, height, x, now, window_s)}{"".join(bars)}{_now_line(y, x, now)}'
            "</svg>")


def _scale(start: float, now: float) -> Callable[[float], float]:
    def x(at: float) -> float:
        clamped = min(max(at, start), now)
        return _LABEL_W + (clamped - start) / (now - start) * _PLOT_W

    return x


def _defs() -> str:
    # Loading bars are striped so they read as "not yet usable" without colour too.
    return ('<defs><pattern id=loading width="6" height="6" patternUnits="userSpaceOnUse" '
            'patternTransform="rotate(45)"><rect width="6" height="6" fill="#fef0c7"/>'
            f'<rect width="3" height="6" fill="{_LOADING}"/></pattern></defs>')


def _node_heading(node: str, y: float) -> str:
    return (f'<text x="4" y="{y + 16}" font-size="13" font-weight="600" fill="#1d2330">'
            f'node {escape(node)}</text>')


def _row(route: str, y: float) -> str:
    return (f'<rect x="{_LABEL_W}" y="{y + 2}" width="{_PLOT_W}" height="{_ROW_H - 4}" '
            'fill="#f2f4f7"/>'
            f'<text x="16" y="{y + 15}" font-size="12" fill="#344054">'
            f'{escape(_short(route))}<title>{escape(route)}</title></text>')


def _bar(span: Span, colour: str, y: float, x: Callable[[float], float], now: float) -> str:
    right = x(now if span.end is None else span.end)
    left = min(x(span.start), right - 3.0)  # a 20 ms load is still seen, ending when it did
    width = right - left
    fill = "url(#loading)" if span.kind == "loading" else colour
    bar = (f'<rect class="bar {span.kind}" x="{left:.1f}" y="{y + 3}" width="{width:.1f}" '
           f'height="{_ROW_H - 6}" fill="{fill}" rx="2"><title>{escape(span.route)}: '
           f'{escape(describe_span(span, now))}</title></rect>')
    if span.failed:
        bar += (f'<rect class="bar failed" x="{right - 3:.1f}" y="{y + 1}" width="4" '
                f'height="{_ROW_H - 2}" fill="{_FAILED}"/>')
    return bar


def _axis(y: float, height: float, x: Callable[[float], float], now: float,
          window_s: float) -> str:
    parts = []
    tick_s = window_s / 6
    ticks = 6
    for i in range(ticks + 1):
        at = now - window_s + i * tick_s
        label = "now" if i == ticks else f"{duration((ticks - i) * tick_s)} ago"
        anchor = "end" if i == ticks else "middle" if i else "start"
        parts.append(f'<line x1="{x(at):.1f}" x2="{x(at):.1f}" y1="0" y2="{y}" '
                     'stroke="#d0d5dd" stroke-dasharray="2 3"/>'
                     f'<text x="{x(at):.1f}" y="{height - 8}" font-size="11" fill="#667085" '
                     f'text-anchor="{anchor}">{label}</text>')
    return "".join(parts)


def _now_line(y: float, x: Callable[[float], float], now: float) -> str:
    return (f'<line x1="{x(now):.1f}" x2="{x(now):.1f}" y1="0" y2="{y}" stroke="#1d2330" '
            'stroke-width="1.5"/>')


def describe_span(span: Span, now: float) -> str:
    """A bar's tooltip: what it was and how long it lasted."""
    lasted = (now if span.end is None else span.end) - span.start
    if span.failed:
        failed = "failed" + (f": {span.error}" if span.error else "")
        return failed if span.seen else f"{failed}, after {duration(lasted)}"
    what = {"loading": "loading", "loaded": "resident"}[span.kind]
    ongoing = ", still" if span.end is None else ""
    return f"{what} for {duration(lasted)}{ongoing}"


def _short(route: str, limit: int = 26) -> str:
    return route if len(route) <= limit else route[:limit - 1] + "\u2026"
