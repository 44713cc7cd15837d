"""The `request.done` line: written by the access log's own JSON writer, it must read exactly as
structlog's JSON renderer writes every other line (log shippers parse them alike).

Logging is configured in a child process: structlog's configuration is global, and a logger
used once keeps it (cache_logger_on_first_use), so doing it here would leak into other tests."""

from __future__ import annotations

import re
import subprocess
import sys
from typing import Any

import orjson
from structlog.testing import capture_logs

from gateway import logs

FIELDS = {"request_id": "ab12", "method": "POST", "path": "/v1/chat/completions",
          "model": "m1", "backend": "b1", "tenant": None, "cache": "MISS", "error": None,
          "status": 200, "bytes": 3707, "ttfb_ms": 3.5, "duration_ms": 4.25, "wait_ms": 0.03}

_CHILD = """
import sys
from gateway import logs
fields = {fields!r}
logs.configure_logging({level!r}, "json", quiet_events=frozenset({quiet!r}))
logs.log_request_done(dict(fields))
logs.log.info("request.done", **fields)  # structlog's own renderer, for comparison
"""


def _logged(level: str = "info", quiet: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    child = subprocess.run(
        [sys.executable, "-c", _CHILD.format(fields=FIELDS, level=level, quiet=quiet)],
        capture_output=True, timeout=60, check=True)  # stderr is a pipe: JSON lines
    return [orjson.loads(line) for line in child.stderr.splitlines()]


def test_the_access_line_reads_as_structlog_writes_it() -> None:
    ours, theirs = _logged()
    assert list(ours) == list(theirs)  # same keys in the same order
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", ours.pop("timestamp"))
    theirs.pop("timestamp")
    assert ours == theirs == {**FIELDS, "event": "request.done", "level": "info"}


def test_the_access_line_honours_the_level_and_quiet_events() -> None:
    assert _logged(level="warning") == []
    assert _logged(quiet=("request.done",)) == []


def test_the_access_line_goes_to_a_capture_of_structlog() -> None:
    with capture_logs() as captured:  # how in-process tests read it
        logs.log_request_done(dict(FIELDS))
    assert captured == [{**FIELDS, "event": "request.done", "log_level": "info"}]
