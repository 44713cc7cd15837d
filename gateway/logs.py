"""structlog logs and the access-log middleware: one `request.done` line per request.

On a terminal the lines are for people (aligned, coloured, local time); anywhere else (a pipe,
a file, a container's log) they are JSON, one object per line (`--log-format` chooses). Every
request's line carries the request id (taken from `X-Request-ID` when the client sends a sane
one, returned in the answer either way). Prompts and keys are never logged.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import sys
import time
from collections.abc import Callable
from typing import IO, Any

import orjson
import structlog
from starlette.types import Receive, Scope, Send

Observer = Callable[[dict[str, Any], dict[str, Any]], None]  # (request state, log record)
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")


LOG_FORMATS = ("auto", "console", "json")


def resolve_format(log_format: str = "auto", stream: IO[str] | None = None) -> str:
    """`auto`: console on a terminal, JSON otherwise."""
    if log_format != "auto":
        return log_format
    stream = stream or sys.stderr
    return "console" if stream.isatty() else "json"


def configure_logging(level: str = "info", log_format: str = "auto",
                      quiet_events: frozenset[str] = frozenset()) -> None:
    """`quiet_events`: event names left out (the demo hides its model servers' chatter)."""
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        numeric = logging.INFO
    console = resolve_format(log_format) == "console"
    binary = getattr(sys.stderr, "buffer", None)  # JSON lines go out as bytes, one write each
    renderer: Any = (structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty()) if console
                     else structlog.processors.JSONRenderer(
                         serializer=orjson.dumps if binary else json.dumps))
    processors = [
        *([_drop(quiet_events)] if quiet_events else []),
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="%H:%M:%S" if console else "iso", utc=not console),
        structlog.processors.format_exc_info,
        renderer,
    ]
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=(structlog.BytesLoggerFactory(file=binary) if binary and not console
                        else structlog.PrintLoggerFactory(file=sys.stderr)),
        cache_logger_on_first_use=True,
    )
    global _access_lines
    _access_lines = None
    if binary is not None and not console and numeric <= logging.INFO \
            and "request.done" not in quiet_events:  # otherwise structlog drops the line
        _access_lines = _JsonLines(binary, processors)


def _drop(events: frozenset[str]) -> Callable[[Any, str, dict[str, Any]], dict[str, Any]]:
    def drop(logger: Any, method: str, event: dict[str, Any]) -> dict[str, Any]:
        if event.get("event") in events:
            raise structlog.DropEvent
        return event

    return drop


log = structlog.get_logger("gateway")


class _JsonLines:
    """`request.done` as structlog's JSON renderer writes it (same keys, order, timestamp), in
    a third of its time: it is the one line logged per request. Used only while structlog
    still runs the processors it was given with it (a test's `capture_logs` replaces them).
    The lines of answers that end in the same turn of the event loop go out in one write at
    its end, rather than a write each (a busy gateway ends several per turn)."""

    def __init__(self, stream: IO[bytes], processors: list[Any]) -> None:
        self.stream = stream
        self.processors = processors
        self._pending: list[bytes] = []
        self._second, self._stamp = -1, ""  # the timestamp's whole seconds, formatted once

    def _timestamp(self) -> str:
        """As structlog's TimeStamper(fmt="iso", utc=True) writes it, without a tz-aware
        datetime per line (its time-zone calls were a quarter of the line's cost)."""
        now = time.time()
        second = int(now)
        if second != self._second:
            self._second = second
            self._stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        return f"{self._stamp}.{int((now - second) * 1_000_000):06d}Z"

    def applies(self) -> bool:
        return structlog.get_config()["processors"] is self.processors

    def write(self, fields: dict[str, Any]) -> None:
        fields["event"] = "request.done"
        fields["level"] = "info"
        fields["timestamp"] = self._timestamp()
        line = orjson.dumps(fields) + b"\n"
        if self._pending:
            self._pending.append(line)
            return
        try:
            asyncio.get_running_loop().call_soon(self._flush)
        except RuntimeError:  # no event loop: at once
            self.stream.write(line)
            self.stream.flush()
            return
        self._pending.append(line)

    def _flush(self) -> None:
        lines, self._pending = self._pending, []
        self.stream.write(b"".join(lines))
        self.stream.flush()


_access_lines: _JsonLines | None = None  # set by configure_logging for JSON on stderr


def log_request_done(fields: dict[str, Any]) -> None:
    lines = _access_lines
    if lines is not None and lines.applies():
        lines.write(fields)
    else:
        log.info("request.done", **fields)


def request_id_from(scope: Scope) -> str:
    for name, value in scope.get("headers", ()):
        if name == b"x-request-id":
            candidate = value.decode("latin-1")
            if _REQUEST_ID.match(candidate):
                return candidate
    return os.urandom(16).hex()  # as unique as a uuid4, at a fraction of its cost


class AccessLog:
    """ASGI middleware: assigns the request id and logs `request.done` when the answer ends."""

    def __init__(self, app: Any, observer: Observer | None = None) -> None:
        self.app = app
        self.observer = observer  # metrics, fed with the same record as the log line

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = request_id_from(scope)
        state = scope.setdefault("state", {})
        state["request_id"] = request_id
        started = time.perf_counter()
        status, sent, first_at = 500, 0, None
        header = (b"x-request-id", request_id.encode("latin-1"))

        async def send_logged(message: dict[str, Any]) -> None:
            nonlocal status, sent, first_at
            if message["type"] == "http.response.body":  # most messages: checked first
                body = message.get("body", b"")
                if body:
                    if first_at is None:
                        first_at = time.perf_counter()
                    sent += len(body)
            elif message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", ()), header]
            await send(message)

        try:
            await self.app(scope, receive, send_logged)
        finally:
            ended = time.perf_counter()
            first_at = state.get("first_byte_at", first_at)  # a stream that waited: upstream's
            record: dict[str, Any] = {
                "status": status, "bytes": sent,
                "ttfb_ms": None if first_at is None else round((first_at - started) * 1000, 2),
                "duration_ms": round((ended - started) * 1000, 2),
            }
            record["wait_ms"] = state.get("wait_ms")
            if self.observer is not None:
                self.observer(state, record)
            log_request_done({
                "request_id": request_id, "method": scope["method"], "path": scope["path"],
                "model": state.get("model"), "backend": state.get("backend"),
                "tenant": state.get("tenant"), "cache": state.get("cache"),
                "error": state.get("error"), **record,
            })
