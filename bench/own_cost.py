"""The gateway's own Python per call: the app driven in-process, its backend stubbed.

    .venv/bin/python bench/own_cost.py [--baseline DIR] [--rounds 3] [--calls 300] [--instructions]

What `bench/relay_cpu.py` cannot separate: its figures hold the sockets, uvicorn and the upstream
too. Here the ASGI app is called directly (no uvicorn, no socket) and the relay client's `post`
answers from memory with a 16-token answer, so what is timed is the gateway's own work on a call:
middlewares, access log, metrics, parsing, cache decision, lease, relay. Each figure is the
fastest of `--rounds` child processes, each the fastest of 12 batches of `--calls` sequential
calls (wall time per call, on one pinned core where the machine allows), so another job on the
machine raises it less than it would a mean. Each call runs in a task of its own, as uvicorn
runs a request, so what it leaves for the event loop's next turn counts with it.
`--baseline DIR` measures another checkout (say, `git worktree add DIR <commit>`) in the same
run; `--without` adds a row per piece taken out (what that piece costs a call). Not a test:
compare rows of one run.

`--instructions` counts instead of timing: thousands of CPU instructions per call, under
valgrind's callgrind (installed with apt when missing and allowed), switched on only around the
measured calls; a run with no calls gives what the switching itself costs, which is taken off.
On a machine shared with other work, where times move by half from one run to the next, the
count moves by about 1 %: the figure to compare a change by.
"""

from __future__ import annotations

import argparse
import asyncio
import glob
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
_TOKENS = " ".join(f"tok{i}" for i in range(16))
JSON_ANSWER = (b'{"id":"c1","object":"chat.completion","created":1700000000,"model":"bench",'
               b'"choices":[{"index":0,"message":{"role":"assistant","content":"'
               + _TOKENS.encode() + b'"},"finish_reason":"stop"}],'
               b'"usage":{"prompt_tokens":12,"completion_tokens":16,"total_tokens":28}}')
SSE_ANSWER = b"".join(
    b'data: {"id":"c1","object":"chat.completion.chunk","created":1700000000,"model":"bench",'
    b'"choices":[{"index":0,"delta":{"content":"tok%d "},"finish_reason":null}]}\n\n' % i
    for i in range(16)) + (
    b'data: {"id":"c1","object":"chat.completion.chunk","created":1700000000,"model":"bench",'
    b'"choices":[],"usage":{"prompt_tokens":12,"completion_tokens":16,"total_tokens":28}}\n\n'
    b"data: [DONE]\n\n")
CONFIG = """\
server: {log_level: info}
backends:
  fast: {kind: openai, base_url: 'http://127.0.0.1:9'}
models:
  bench: {backend: fast}
  renamed: {backend: fast, served_name: 'served/model'}
cache: {enabled: false}
"""
CASES = (("JSON", "bench", False), ("SSE, 18 frames", "bench", True),
         ("SSE, model renamed", "renamed", True))
# Pieces `--without` can take out, and what doing so leaves
PIECES = {
    "log": "the request.done line (log level warning)",
    "metrics": "the access log's observers (Prometheus, the console's recent requests)",
    "middlewares": "FrontErrors, HeaderLimit and Auth",
    "watch": "the client-disconnect watcher of a JSON call",
}


def _stub_backend() -> None:
    """The relay client answers from memory: no socket, no upstream."""
    from gateway.relay import client

    class Connection:
        paused = False

        def done(self, reusable: bool) -> None:
            pass

    async def post(self: Any, url: str, body: bytes, headers: Any) -> Any:
        origin, target = self._split(url)
        client._request_head("POST", target, origin.host_header, headers, len(body))
        stream = b'"stream":true' in body
        answer = client.UpstreamResponse(Connection())  # type: ignore[arg-type]
        answer.status, answer.complete = 200, True
        answer.headers = {"content-type": "text/event-stream" if stream else "application/json"}
        answer._chunks = [SSE_ANSWER if stream else JSON_ANSWER]
        return answer

    client.Client.post = post  # type: ignore[method-assign]


async def _call(app: Any, body: bytes) -> None:
    headers = [(b"host", b"127.0.0.1:8890"), (b"user-agent", b"bench"),
               (b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
             "method": "POST", "scheme": "http", "path": "/v1/chat/completions",
             "raw_path": b"/v1/chat/completions", "query_string": b"", "root_path": "",
             "headers": headers, "server": ("127.0.0.1", 8890), "client": ("127.0.0.1", 5555)}
    answered = asyncio.Event()
    received = False

    async def receive() -> dict[str, Any]:
        nonlocal received
        if not received:
            received = True
            return {"type": "http.request", "body": body, "more_body": False}
        await answered.wait()
        return {"type": "http.disconnect"}

    status = 0

    async def send(message: dict[str, Any]) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]

    await app(scope, receive, send)
    answered.set()
    if status != 200:
        raise SystemExit(f"the gateway answered {status}")


async def _turn(app: Any, body: bytes) -> None:
    """One call in a task of its own, as uvicorn runs a request: what the call leaves for the
    loop's next turn (a decision round, the access line's write) is counted with it, not
    folded into one at the end of a batch."""
    await asyncio.get_running_loop().create_task(_call(app, body))


def _without(app: Any, piece: str) -> None:
    if piece == "metrics":
        for middleware in app.user_middleware:
            if middleware.cls.__name__ == "AccessLog":
                middleware.kwargs["observer"] = None
    elif piece == "middlewares":
        app.user_middleware = [m for m in app.user_middleware if m.cls.__name__ not in
                               ("FrontErrors", "HeaderLimit", "AuthMiddleware")]
    elif piece == "watch":
        from gateway.calls import pipeline

        async def unwatched(receive: Any, work: Any) -> Any:
            return await work

        pipeline.until_disconnect = unwatched  # type: ignore[assignment]


def _count(switch: str) -> None:
    """Callgrind counts this process's instructions from `on` to `off`."""
    import callgrind  # a sibling module: run as a script, bench/ is on the path

    callgrind.control(os.getpid(), "-i", switch)


async def _measure(model: str, stream: bool, calls: int, piece: str,
                   counted: bool = False) -> float:
    from gateway.app import create_app
    from gateway.config.reader import load_config
    from gateway.logs import configure_logging

    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as config:
        config.write(CONFIG)
    configure_logging("warning" if piece == "log" else "info", "json")
    app = create_app(load_config(config.name))
    _without(app, piece)
    options = ',"stream_options":{"include_usage":true}' if stream else ""
    body = (f'{{"model":"{model}","messages":[{{"role":"user","content":"Count to sixteen."}}],'
            f'"stream":{"true" if stream else "false"}{options}}}').encode()
    async with app.router.lifespan_context(app):
        for _ in range(300):  # warm: the pools, the caches, the first-use paths
            await _turn(app, body)
        figure = await (_counted_calls if counted else _fastest_batch)(app, body, calls)
    os.unlink(config.name)
    return figure


async def _fastest_batch(app: Any, body: bytes, calls: int) -> float:
    """Microseconds per call, in the fastest of 12 batches."""
    best = float("inf")
    for _ in range(12):
        started = time.perf_counter()
        for _ in range(calls):
            await _turn(app, body)
        best = min(best, (time.perf_counter() - started) / calls)
    return best * 1e6


async def _counted_calls(app: Any, body: bytes, calls: int) -> float:
    """The calls with callgrind counting (its output holds the figure)."""
    await asyncio.to_thread(_count, "on")
    for _ in range(calls):
        await _turn(app, body)
    await asyncio.to_thread(_count, "off")
    return 0.0


def _child(model: str, stream: bool, calls: int, piece: str) -> None:
    import uvloop

    sys.stderr = open(os.devnull, "w")  # the access lines go nowhere, as long as this lives
    _stub_backend()
    counted = bool(os.environ.get("OWN_COST_COUNTED"))
    if counted:  # valgrind runs calls ~50x slower: a quick call's watcher would start
        from gateway.relay import stream

        stream.WATCH_AFTER_S = 3600.0
    print(f"{uvloop.run(_measure(model, stream, calls, piece, counted)):.1f}")


def _child_args(model: str, stream: bool, calls: int, piece: str) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), "--child", model,
            "1" if stream else "0", str(calls), piece]


def _env(source: Path, **extra: str) -> dict[str, str]:
    """A child's environment: `source`'s gateway, one hash seed for every run."""
    return {**os.environ, "PYTHONPATH": str(source), "PYTHONHASHSEED": "0", **extra}


def _run(source: Path, model: str, stream: bool, calls: int, piece: str = "") -> float:
    """Microseconds per call."""
    env = _env(source)
    pin = ["taskset", "-c", str((os.cpu_count() or 1) - 1)] if shutil.which("taskset") else []
    done = subprocess.run([*pin, *_child_args(model, stream, calls, piece)], env=env,
                          cwd=source, capture_output=True, text=True, check=True, timeout=600)
    return float(done.stdout.strip())


def _instructions(source: Path, model: str, stream: bool, calls: int, piece: str) -> int:
    """Instructions `calls` calls take, switching included."""
    import callgrind

    env = _env(source, OWN_COST_COUNTED="1")
    with tempfile.TemporaryDirectory() as work:
        out = f"{work}/callgrind.out"
        subprocess.run([*callgrind.command(out), *_child_args(model, stream, calls, piece)],
                       env=env, cwd=source, capture_output=True, check=True, timeout=1800)
        return callgrind.total(*glob.glob(out + "*"))


def _counted(source: Path, model: str, stream: bool, calls: int, piece: str = "") -> float:
    """Thousands of instructions per call."""
    switching = _instructions(source, model, stream, 0, piece)
    return (_instructions(source, model, stream, calls, piece) - switching) / calls / 1000


def main() -> None:
    if len(sys.argv) == 6 and sys.argv[1] == "--child":
        _child(sys.argv[2], sys.argv[3] == "1", int(sys.argv[4]), sys.argv[5])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", type=Path, help="another checkout, measured alike")
    parser.add_argument("--rounds", type=int, default=3, help="child processes per figure")
    parser.add_argument("--calls", type=int, default=300, help="calls per batch")
    parser.add_argument("--without", nargs="+", choices=sorted(PIECES), default=[],
                        help="also measure this checkout with each piece taken out")
    parser.add_argument("--instructions", action="store_true",
                        help="count k instructions per call (callgrind) instead of timing")
    args = parser.parse_args()
    if args.instructions:
        import callgrind

        callgrind.ensure_valgrind()
    unit = "k instructions" if args.instructions else "µs"
    rows = [("this checkout", ROOT, "")]
    if args.baseline:
        rows.append((f"baseline {args.baseline}", args.baseline.resolve(), ""))
    rows += [(f"without {PIECES[piece]}", ROOT, piece) for piece in args.without]
    print("| gateway | " + " | ".join(f"{name}, {unit} per call" for name, _, _ in CASES) + " |")
    print("|---|" + "---|" * len(CASES))
    for name, source, piece in rows:
        if args.instructions:  # a count: one round says it
            figures = [_counted(source, model, stream, args.calls, piece)
                       for _, model, stream in CASES]
        else:
            figures = [min(_run(source, model, stream, args.calls, piece)
                           for _ in range(args.rounds)) for _, model, stream in CASES]
        print(f"| {name} | " + " | ".join(f"{f:.0f}" for f in figures) + " |", flush=True)


if __name__ == "__main__":
    main()
