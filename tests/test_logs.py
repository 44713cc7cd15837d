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


_CHILD_BUSY = """
import asyncio, sys
from gateway import logs
logs.configure_logging("info", "json")
lines = logs._access_lines
writes = []
real = lines.stream
class Counted:
    def write(self, data):
        writes.append(data)
        return real.write(data)
    def flush(self):
        real.flush()
lines.stream = Counted()
async def main():
    for n in range(3):  # three answers ending in one turn of the loop
        logs.log_request_done({"request_id": str(n)})
    await asyncio.sleep(0)
    logs.log_request_done({"request_id": "3"})  # and one in the next
    await asyncio.sleep(0)
    print(len(writes))
asyncio.run(main())
"""


def test_answers_ending_in_one_turn_of_the_loop_are_logged_in_one_write() -> None:
    child = subprocess.run([sys.executable, "-c", _CHILD_BUSY], capture_output=True,
                           timeout=60, check=True)
    logged = [orjson.loads(line)["request_id"] for line in child.stderr.splitlines()]
    assert logged == ["0", "1", "2", "3"]  # every line, in order
    assert child.stdout.split() == [b"2"]  # the three of one turn in one write, then one


def test_the_access_line_goes_to_a_capture_of_structlog() -> None:
    with capture_logs() as captured:  # how in-process tests read it
        logs.log_request_done(dict(FIELDS))
    assert captured == [{**FIELDS, "event": "request.done", "log_level": "info"}]
