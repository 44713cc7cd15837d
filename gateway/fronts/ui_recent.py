"""What the status page remembers of the last half hour, which no single snapshot holds.

`Residencies`: each route's residencies and loads, for the swap timeline. They are read from the
read model (`Scheduler.status()`), every few seconds by the progress task (`gateway/progress.py`)
and on every page view. One snapshot gives the edges of a route's current or last residency and
of its last load exactly (`loaded_at`, `unloaded_at`, `last_load_s`, `load_elapsed_s`), so
sampling finds the edges, it does not round them. Missed: a residency that began and ended
between two samples with another one of the same route after it (a swap every second or so).
A failed load's end is the sample that saw it fail (the snapshot has no failure time), and a
load that failed between two samples is a mark where it was seen (`Span.seen`).

`RecentRequests`: each model's answers of the last minutes, fed by the access log's observer
(one record per answer), for requests per minute and time to first token.

Both live in one process: with `serve --workers N` each worker remembers its own.
"""

from __future__ import annotations

import statistics
import time
from collections import defaultdict, deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from gateway.residency.snapshot import ModelStatus, SchedulerStatus
from policies.types import State

TIMELINE_S = 30 * 60.0
REQUESTS_S = 5 * 60.0
# Two readings of one edge differ by the drift between the wall and the monotonic clock over
# one load (microseconds); two real edges of one route are a load apart at least.
SAME_EDGE_S = 0.05
_MAX_PER_MODEL = 20_000  # answers kept per model: bounds memory under any load


@dataclass
class Span:
    """A stretch of one route's life on its node: a load, or a residency."""

    route: str
    node: str
    kind: str  # "loading" | "loaded"
    start: float  # wall clock
    end: float | None = None  # None: still going
    failed: bool = False  # a load that ended without the model (or a crash)
    error: str | None = None
    seen: bool = False  # its times are when a sample saw it: the snapshot had none


class Residencies:
    def __init__(self, keep_s: float = TIMELINE_S) -> None:
        self.keep_s = keep_s
        self.since: float | None = None  # the first snapshot seen: nothing is known before
        self._spans: dict[str, list[Span]] = defaultdict(list)
        self._failures: dict[str, float | None] = {}  # route -> the retry time of its failure

    def observe(self, status: SchedulerStatus) -> None:
        at = status.at
        if self.since is None:
            self.since = min([at, *(m.loaded_at for m in status.models.values()
                                    if m.loaded_at is not None)])
        for model in status.models.values():
            if model.managed:
                self._observe_route(model, at)
        for route in set(self._spans) - set(status.models):
            self._close_open(route, "loaded", at)  # removed by a reload
            self._close_open(route, "loading", at)
        self._forget_before(at - self.keep_s)

    def spans(self, since: float) -> list[Span]:
        """Every span that reaches past `since`, oldest first."""
        found = [s for spans in self._spans.values() for s in spans
                 if s.end is None or s.end >= since]
        return sorted(found, key=lambda s: s.start)

    def _observe_route(self, m: ModelStatus, at: float) -> None:
        if m.loaded_at is not None:
            if m.last_load_s is not None:
                self._edge(m, "loading", m.loaded_at - m.last_load_s, m.loaded_at)
            ended = m.unloaded_at is not None and m.unloaded_at >= m.loaded_at
            self._edge(m, "loaded", m.loaded_at, m.unloaded_at if ended else None)
        if m.state is State.LOADING and m.load_elapsed_s is not None:
            started = at - m.load_elapsed_s
            self._close_open(m.name, "loading", started, before=started)  # an earlier attempt
            self._edge(m, "loading", started, None)
        elif m.state is State.FAILED:
            self._failed(m, at)
        if m.state not in (State.LOADED, State.UNLOADING):
            self._close_open(m.name, "loaded", m.unloaded_at or at)

    def _failed(self, m: ModelStatus, at: float) -> None:
        """Each failure sets a new retry time: that tells one failure from the next."""
        if m.name in self._failures and _same(self._failures[m.name], m.retry_at):
            return
        self._failures[m.name] = m.retry_at
        running = [s for s in self._spans.get(m.name, ()) if s.kind == "loading" and s.end is None]
        if running:
            self._close_open(m.name, "loading", at, failed=True, error=m.error)
        else:
            self._spans[m.name].append(Span(m.name, m.node, "loading", at, at, failed=True,
                                            error=m.error, seen=True))

    def _edge(self, m: ModelStatus, kind: str, start: float, end: float | None) -> None:
        """Record a span's edges; a span already known (same start) only learns its end."""
        spans = self._spans[m.name]
        for span in spans:
            if span.kind == kind and abs(span.start - start) < SAME_EDGE_S:
                if end is not None:
                    span.end = end
                return
        spans.append(Span(m.name, m.node, kind, start, end))
        spans.sort(key=lambda s: s.start)

    def _close_open(self, route: str, kind: str, at: float, *, before: float | None = None,
                    failed: bool = False, error: str | None = None) -> None:
        for span in self._spans.get(route, ()):
            if span.kind != kind or span.end is not None:
                continue
            if before is not None and span.start >= before - SAME_EDGE_S:
                continue
            span.end, span.failed, span.error = max(at, span.start), failed, error

    def _forget_before(self, cutoff: float) -> None:
        for route in list(self._spans):
            kept = [s for s in self._spans[route] if s.end is None or s.end >= cutoff]
            if kept:
                self._spans[route] = kept
            else:
                del self._spans[route]


def _same(a: float | None, b: float | None) -> bool:
    """Two readings of one wall time (or both none)."""
    return a == b if a is None or b is None else abs(a - b) < SAME_EDGE_S


@dataclass(frozen=True)
class RequestFigures:
    per_minute: float
    ttft_p50_ms: float | None  # None: no answer from a backend in the window


class RecentRequests:
    """Answers per model over the last `window_s`: when, and their time to first byte from the
    backend (cache hits and errors are counted as requests but say nothing of the model's
    speed, so they have no time)."""

    def __init__(self, window_s: float = REQUESTS_S,
                 clock: Callable[[], float] = time.time) -> None:
        self.window_s = window_s
        self.clock = clock
        self.since = clock()  # rates over less than the window until it has run that long
        self._answers: dict[str, deque[tuple[float, float | None]]] = {}

    def observe(self, state: dict[str, Any], record: dict[str, Any]) -> None:
        """The access log's observer: (request state, log record)."""
        model = state.get("model")
        if model is None:
            return
        served = record["status"] < 400 and state.get("cache") != "HIT"
        ttfb = record.get("ttfb_ms") if served else None
        answers = self._answers.setdefault(model, deque(maxlen=_MAX_PER_MODEL))
        answers.append((self.clock(), ttfb))

    def figures(self, model: str) -> RequestFigures:
        now = self.clock()
        answers = self._recent(model, now)
        minutes = max(60.0, min(self.window_s, now - self.since)) / 60
        times = [ttfb for _, ttfb in answers if ttfb is not None]
        return RequestFigures(len(answers) / minutes,
                              statistics.median(times) if times else None)

    def _recent(self, model: str, now: float) -> deque[tuple[float, float | None]]:
        answers = self._answers.get(model, deque())
        while answers and answers[0][0] < now - self.window_s:
            answers.popleft()
        return answers
