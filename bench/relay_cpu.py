"""Relay CPU: what the gateway costs per request and per SSE frame, against nginx, same run.

    .venv/bin/python bench/relay_cpu.py [--quick] [--duration 3] [--repeat 4]
                                        [--connections 32] [--streams 1000 2000] [--profile]
                                        [--floors] [--baseline DIR]

Starts, as subprocesses: an OpenAI-shaped Node upstream (bench/upstream.js), nginx with 1 worker
as the reference relay (bench/nginx.conf), the gateway with 1 uvicorn worker (`python -m gateway
serve`), a second one logging at `warning` only (what the per-request log line costs) and the
gateway with `--workers 2` (which needs Redis: 127.0.0.1:6379 by default). wrk (bench/chat.lua)
drives each one in turn, direct to the upstream included; a relay's CPU is the utime + stime of
its whole process tree (/proc/PID/stat, children included) over the run, divided by the work
the upstream really did (its own counters): CPU per JSON request, per SSE request and per SSE
frame. The model-rename case asks for `renamed`, which the backend serves as another name, so
the gateway rewrites every chunk. Many slow streams (64 tokens at 50/s each) are opened all at
once by a small asyncio client: time until all have finished, CPU per frame, peak RSS.

Every table shows the CPU% of the upstream and of the load generator beside the relay's, and how
busy the whole machine was, so a bottleneck outside the relay shows. Installs wrk and nginx with
apt-get when missing and allowed (root), otherwise says how. `--profile` samples the 1-worker
gateway with py-spy (native frames too) under JSON, SSE, renamed-SSE, usage-hidden SSE and
many-paced-streams load and prints the top functions. `--floors` adds the bare relays of
bench/relay_floor.py (uvicorn + aiohttp, uvicorn + the gateway's client, a bare asyncio.Protocol
server) as rows of every table but the sequential one: the least such a relay costs here.
`--baseline DIR` runs a second 1-worker gateway from another checkout beside this one, every
load alike, so a change is measured before and after under the same noise.
Not a test: read the ratios and the CPU per unit of work, not the absolute requests/s.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import http.client
import json
import os
import re
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
VENV_PYTHON = ROOT / ".venv" / "bin" / "python"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PAGE_MB = os.sysconf("SC_PAGE_SIZE") / 2**20
FAST_FRAMES = 16 + 2  # token chunks, the usage chunk, [DONE]
PACED_TOKENS, PACE_MS = 64, 20
PACED_FRAMES = PACED_TOKENS + 2
IDEAL_PACED_S = (PACED_TOKENS - 1) * PACE_MS / 1000
SERVED_NAME = "org/upstream-model-7b"
BASELINE = "gateway 1w, baseline"  # with --baseline DIR: the gateway from DIR, same run
FLOORS = {"uvicorn-aiohttp": "floor: uvicorn + aiohttp", "uvicorn-lean": "floor: uvicorn + lean",
          "protocol": "floor: Protocol + lean"}  # bench/relay_floor.py's modes, with --floors
BURST_TIMEOUT_S = 60.0


# -- processes and what they cost ------------------------------------------------------------


def _stat(pid: int) -> list[str]:
    with open(f"/proc/{pid}/stat") as file:
        text = file.read()
    return text[text.rindex(")") + 2:].split()  # fields from `state` on; comm may hold spaces


def _descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError, ValueError, IndexError):
                children.setdefault(int(_stat(int(entry))[1]), []).append(int(entry))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, ()))
    return found


def tree_cpu_s(root: int) -> float:
    """utime + stime of `root` and every descendant, reaped ones included (cutime, cstime)."""
    ticks = 0
    for pid in _descendants(root):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = _stat(pid)
            ticks += sum(int(fields[i]) for i in (11, 12, 13, 14))
    return ticks / CLOCK_TICKS


def tree_rss_mb(root: int) -> float:
    pages = 0
    for pid in _descendants(root):
        with contextlib.suppress(OSError, ValueError, IndexError), \
                open(f"/proc/{pid}/statm") as file:
            pages += int(file.read().split()[1])
    return pages * PAGE_MB


def tree_writes(root: int) -> int:
    """write-type syscalls (write, writev) of `root` and its descendants, from /proc/PID/io."""
    count = 0
    for pid in _descendants(root):
        with contextlib.suppress(OSError, ValueError), open(f"/proc/{pid}/io") as file:
            count += next(int(line.split()[1]) for line in file if line.startswith("syscw"))
    return count


def machine_busy_ticks() -> tuple[int, int]:
    """(busy, total) jiffies of all cores since boot, from /proc/stat."""
    with open("/proc/stat") as file:
        values = [int(v) for v in file.readline().split()[1:]]
    idle = values[3] + values[4]
    return sum(values) - idle, sum(values)


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path
    port: int

    def cpu_s(self) -> float:
        return tree_cpu_s(self.popen.pid)

    def rss_mb(self) -> float:
        return tree_rss_mb(self.popen.pid)

    def writes(self) -> int:
        return tree_writes(self.popen.pid)

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(15)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def get(port: int, path: str, timeout: float = 2.0) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def launch(name: str, args: list[str], port: int, workdir: Path, ready_path: str | None = None,
           wait_s: float = 30.0, root: Path = ROOT) -> Proc:
    """Start `args` in `root`, wait until `port` answers (`ready_path` with 200, if given)."""
    log = workdir / f"{_slug(name)}.log"
    with open(log, "wb") as out:
        popen = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, cwd=root,
                                 env={**os.environ, "PYTHONPATH": str(root)})
    proc = Proc(name, popen, log, port)
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        if popen.poll() is not None:
            break
        with contextlib.suppress(OSError, http.client.HTTPException):
            if ready_path is None:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                return proc
            if get(port, ready_path)[0] == 200:
                return proc
        time.sleep(0.1)
    proc.stop()
    tail = log.read_text(errors="replace")[-1500:]
    raise RuntimeError(f"{name} did not start on port {port} (exit {popen.returncode}):\n{tail}")


# -- tools -----------------------------------------------------------------------------------


def ensure_tool(binary: str, package: str, install: bool) -> str:
    """The path of `binary`; apt-get installs `package` when missing and allowed."""
    search = f"{os.environ.get('PATH', '')}:/usr/sbin:/sbin"
    found = shutil.which(binary, path=search)
    if found:
        return found
    if install and os.geteuid() == 0 and shutil.which("apt-get"):
        print(f"# {binary} missing: apt-get install -y {package}", file=sys.stderr)
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        if subprocess.run(["apt-get", "install", "-y", package], env=env,
                          stdout=subprocess.DEVNULL).returncode != 0:
            subprocess.run(["apt-get", "update"], env=env, stdout=subprocess.DEVNULL)
            subprocess.run(["apt-get", "install", "-y", package], env=env,
                           stdout=subprocess.DEVNULL)
        found = shutil.which(binary, path=search)
        if found:
            return found
    raise SystemExit(f"{Path(sys.argv[0]).stem}: {binary} is needed: "
                     f"`sudo apt-get install -y {package}` (Debian/Ubuntu), then run again")


def raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 65536)), hard))


# -- the relays ------------------------------------------------------------------------------


@dataclass
class Target:
    """One way to reach the upstream: direct, or through one relay (`proc`)."""

    name: str
    port: int
    proc: Proc | None
    gateway: bool = False

    def route(self, kind: str) -> tuple[str, str]:
        """(path, model) for a kind of load: json, sse, renamed-json, renamed (SSE),
        sse-nousage (SSE, the client does not ask for usage), paced, paced-wide."""
        if self.gateway:
            model = {"json": "bench", "sse": "bench", "renamed-json": "renamed",
                     "sse-nousage": "bench"}.get(kind, kind)
            return "/v1/chat/completions", model
        prefix = "/paced" if kind.startswith("paced") else ""
        return f"{prefix}/v1/chat/completions", "bench"


def is_stream(kind: str) -> bool:
    return kind not in ("json", "renamed-json")


def asks_usage(kind: str) -> bool:
    return is_stream(kind) and kind != "sse-nousage"


def gateway_config(path: Path, upstream: int, log_level: str, redis_url: str | None) -> Path:
    base = f"http://127.0.0.1:{upstream}"
    cache = "{enabled: false}"
    if redis_url:
        cache = (f"{{enabled: false, redis_url: '{redis_url}', "
                 f"namespace: 'relay-cpu-{uuid.uuid4().hex[:8]}'}}")
    path.write_text(
        f"server: {{log_level: {log_level}}}\n"
        "swapper: {mode: multi-active, max_concurrent_models: 4}\n"
        "backends:\n"
        f"  fast: {{kind: openai, base_url: '{base}'}}\n"
        f"  paced: {{kind: openai, base_url: '{base}/paced'}}\n"
        f"  paced-wide: {{kind: openai, base_url: '{base}/paced', max_connections: 8192}}\n"
        "models:\n"
        "  bench: {backend: fast}\n"
        f"  renamed: {{backend: fast, served_name: '{SERVED_NAME}'}}\n"
        "  paced: {backend: paced}\n"
        "  paced-wide: {backend: paced-wide}\n"
        f"cache: {cache}\n"
    )
    return path


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", name)


def start_gateway(name: str, config: Path, workers: int, workdir: Path,
                  root: Path = ROOT) -> Proc:
    """The gateway whose source is in `root` (another checkout for --baseline)."""
    python = str(VENV_PYTHON if VENV_PYTHON.exists() else Path(sys.executable))
    port = free_port()
    args = [python, "-m", "gateway", "serve", "--config", str(config), "--host", "127.0.0.1",
            "--port", str(port), "--workers", str(workers)]
    for attempt in range(3):  # the venv may be rebuilding under us: wait and retry
        try:
            proc = launch(name, args, port, workdir, ready_path="/ready", wait_s=60,
                          root=root)
            if workers > 1:
                time.sleep(2.0)  # every worker has started serving, not only the first
            return proc
        except RuntimeError as exc:
            if attempt == 2 or "--workers" in str(exc):
                raise
            print(f"# {name} failed to start, retrying in 30 s: {str(exc)[-300:]}",
                  file=sys.stderr)
            time.sleep(30)
    raise AssertionError("unreachable")


def nginx_config(workdir: Path, port: int, upstream: int) -> Path:
    for sub in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (workdir / sub).mkdir(exist_ok=True)
    text = (BENCH / "nginx.conf").read_text()
    text = text.replace("@DIR@", str(workdir)).replace("@PORT@", str(port))
    path = workdir / "nginx.conf"
    path.write_text(text.replace("@UPSTREAM_PORT@", str(upstream)))
    return path


def check(target: Target, kind: str) -> str | None:
    """One request by hand: 200, the frames expected, the model name the client asked for."""
    path, model = target.route(kind)
    stream = is_stream(kind)
    request = {"model": model, "messages": [{"role": "user", "content": "hi"}], "stream": stream}
    if asks_usage(kind):
        request["stream_options"] = {"include_usage": True}
    body = json.dumps(request)
    conn = http.client.HTTPConnection("127.0.0.1", target.port, timeout=10)
    try:
        conn.request("POST", path, body, {"content-type": "application/json"})
        response = conn.getresponse()
        data = response.read()
        cache = response.getheader("x-cache")
    finally:
        conn.close()
    if response.status != 200:
        return f"{target.name} {kind}: HTTP {response.status}: {data[:200]!r}"
    names = set(re.findall(rb'"model":"([^"]*)"', data))
    if names != {model.encode()}:
        return f"{target.name} {kind}: answer names models {names}, expected {model!r}"
    frames = data.count(b"data: ")
    expected = FAST_FRAMES if asks_usage(kind) else FAST_FRAMES - 1  # the usage chunk hidden
    if stream and frames != expected:
        return f"{target.name} {kind}: {frames} SSE frames, expected {expected}"
    if cache == "HIT":
        return f"{target.name} {kind}: answered from the cache"
    return None


# -- one measured load -----------------------------------------------------------------------


@dataclass
class Snapshot:
    at: float
    relay: float
    relay_writes: int
    upstream: float
    counters: dict[str, int]
    busy: tuple[int, int]


@dataclass
class Measure:
    """One load on one target: the load generator's figures and everyone's CPU over the run."""

    target: str
    kind: str
    wall_s: float
    requests: int  # completed, as the client counts them
    upstream_requests: int
    upstream_frames: int
    errors: int
    p50_ms: float
    p99_ms: float
    max_ms: float
    relay_cpu_s: float | None
    upstream_cpu_s: float
    client_cpu_s: float
    others_cores: float  # cores busy with processes outside this bench over the run
    relay_writes: int = 0  # write syscalls of the relay over the run
    rss_peak_mb: float | None = None
    extra: dict[str, float] = field(default_factory=dict)

    @property
    def rps(self) -> float:
        return self.requests / self.wall_s

    def per_request_us(self) -> float | None:
        if self.relay_cpu_s is None or not self.upstream_requests:
            return None
        return self.relay_cpu_s / self.upstream_requests * 1e6

    def writes_per_request(self) -> float | None:
        if self.relay_cpu_s is None or not self.upstream_requests:
            return None
        return self.relay_writes / self.upstream_requests

    def per_frame_us(self) -> float | None:
        if self.relay_cpu_s is None or not self.upstream_frames:
            return None
        return self.relay_cpu_s / self.upstream_frames * 1e6


class Bench:
    def __init__(self, upstream: Proc, upstream_port: int, wrk: str) -> None:
        self.upstream = upstream
        self.upstream_port = upstream_port
        self.wrk = wrk

    def counters(self) -> dict[str, int]:
        return json.loads(get(self.upstream_port, "/stats")[1])

    def snapshot(self, target: Target) -> Snapshot:
        relay = target.proc.cpu_s() if target.proc else 0.0
        writes = target.proc.writes() if target.proc else 0
        return Snapshot(time.perf_counter(), relay, writes, self.upstream.cpu_s(),
                        self.counters(), machine_busy_ticks())

    def measure(self, target: Target, kind: str, before: Snapshot, after: Snapshot,
                client_cpu_s: float, **figures: float) -> Measure:
        wall = after.at - before.at
        busy = after.busy[0] - before.busy[0]
        total = after.busy[1] - before.busy[1]
        machine_s = busy / total * (os.cpu_count() or 1) * wall if total else 0.0
        relay_s = after.relay - before.relay
        upstream_s = after.upstream - before.upstream
        return Measure(
            target=target.name, kind=kind, wall_s=figures.pop("wall_s", wall),
            requests=int(figures.pop("requests")),
            upstream_requests=after.counters["requests"] - before.counters["requests"],
            upstream_frames=after.counters["frames"] - before.counters["frames"],
            errors=int(figures.pop("errors")), p50_ms=figures.pop("p50_ms"),
            p99_ms=figures.pop("p99_ms"), max_ms=figures.pop("max_ms"),
            relay_cpu_s=relay_s if target.proc else None,
            upstream_cpu_s=upstream_s, client_cpu_s=client_cpu_s,
            others_cores=max(0.0, machine_s - relay_s - upstream_s - client_cpu_s) / wall,
            relay_writes=after.relay_writes - before.relay_writes,
            rss_peak_mb=figures.pop("rss_peak_mb", None), extra=figures,
        )

    def wrk_run(self, target: Target, kind: str, connections: int, threads: int,
                duration_s: int, timeout_s: int = 30) -> Measure:
        path, model = target.route(kind)
        env = {**os.environ, "BENCH_MODEL": model, "BENCH_STREAM": "1" if is_stream(kind) else "0",
               "BENCH_USAGE": "1" if asks_usage(kind) else "0"}
        args = [self.wrk, "-t", str(min(threads, connections)), "-c", str(connections),
                "-d", f"{duration_s}s", "--timeout", f"{timeout_s}s", "--latency",
                "-s", str(BENCH / "chat.lua"), f"http://127.0.0.1:{target.port}{path}"]
        before = self.snapshot(target)
        popen = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        assert popen.stdout is not None
        output = popen.stdout.read().decode(errors="replace")
        _, status, usage = os.wait4(popen.pid, 0)
        popen.returncode = os.waitstatus_to_exitcode(status)
        after = self.snapshot(target)
        found = re.search(r"^RELAY_CPU (\{.*\})$", output, re.M)
        if popen.returncode != 0 or not found:
            raise RuntimeError(f"wrk failed on {target.name} {kind}:\n{output[-1500:]}")
        figures = json.loads(found.group(1))
        errors = sum(figures[k] for k in ("connect", "read", "write", "status", "timeout"))
        return self.measure(
            target, kind, before, after, usage.ru_utime + usage.ru_stime,
            wall_s=figures["duration_us"] / 1e6, requests=figures["requests"], errors=errors,
            p50_ms=figures["p50"] / 1e3, p99_ms=figures["p99"] / 1e3, max_ms=figures["max"] / 1e3,
        )

    def burst(self, target: Target, kind: str, streams: int) -> Measure:
        """`streams` paced streams opened at once; the run ends when the last one has."""
        path, model = target.route(kind)
        request = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                   "Content-Type: application/json\r\nContent-Length: {length}\r\n\r\n{body}")
        body = json.dumps({"model": model, "stream": True,
                           "stream_options": {"include_usage": True},
                           "messages": [{"role": "user", "content": "Count to 64."}]})
        raw = request.format(length=len(body), body=body).encode()
        peak = [0.0]
        stop = threading.Event()

        def sample_rss() -> None:
            while not stop.is_set():
                if target.proc:
                    peak[0] = max(peak[0], target.proc.rss_mb())
                stop.wait(0.05)

        idle_mb = target.proc.rss_mb() if target.proc else None
        sampler = threading.Thread(target=sample_rss, daemon=True)
        own_before = resource.getrusage(resource.RUSAGE_SELF)
        before = self.snapshot(target)
        sampler.start()
        try:
            results = _run_loop(_open_streams(target.port, raw, streams))
        finally:
            stop.set()
            sampler.join()
        after = self.snapshot(target)
        own_after = resource.getrusage(resource.RUSAGE_SELF)
        own = (own_after.ru_utime - own_before.ru_utime) + (own_after.ru_stime
                                                              - own_before.ru_stime)
        done = [r for r in results if r.ok]
        durations = sorted(r.seconds for r in done) or [0.0]
        return self.measure(
            target, kind, before, after, own, requests=len(done),
            errors=len(results) - len(done), p50_ms=_quantile(durations, 50) * 1e3,
            p99_ms=_quantile(durations, 99) * 1e3, max_ms=durations[-1] * 1e3,
            rss_peak_mb=peak[0] if target.proc else None, rss_idle_mb=idle_mb or 0.0,
            frames=sum(r.frames for r in results), expected=streams * PACED_FRAMES,
            connect_max_s=max(r.connect_s for r in results),
        )


def _median(runs: list[Measure]) -> Measure:
    """The run with the median CPU per request (requests/s for direct), with the spread."""
    ordered = sorted(runs, key=lambda m: m.per_request_us() or -m.rps)
    chosen = ordered[len(ordered) // 2]
    costs = [m.per_request_us() for m in runs if m.per_request_us() is not None]
    if len(costs) > 1:
        chosen.extra.update(cpu_min=min(costs), cpu_max=max(costs))  # type: ignore[type-var]
    return chosen


def _quantile(ordered: list[float], q: int) -> float:
    if len(ordered) < 2:
        return ordered[0]
    return statistics.quantiles(ordered, n=100, method="inclusive")[q - 1]


# -- many slow streams at once: a minimal client, so the client is not the bottleneck --------


@dataclass
class StreamResult:
    ok: bool
    frames: int
    seconds: float  # from asking to connect to the last chunk
    connect_s: float = 0.0


class _Stream(asyncio.Protocol):
    """One SSE request on its own connection; counts `data: ` frames until the last chunk."""

    def __init__(self, request: bytes, finished: asyncio.Future[StreamResult],
                 started: float) -> None:
        self.request = request
        self.finished = finished
        self.started = started  # when the client asked to connect
        self.connected = 0.0
        self.frames = 0
        self.status_ok: bool | None = None
        self.tail = b""
        self.transport: Any = None  # uvloop's transports are not asyncio.Transport subclasses

    def connection_made(self, transport: Any) -> None:
        self.connected = time.perf_counter() - self.started
        self.transport = transport
        transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        if self.status_ok is None:
            self.status_ok = data.startswith(b"HTTP/1.1 200")
        window = self.tail + data
        self.frames += window.count(b"data: ")  # a frame split between reads counts once
        self.tail = window[-7:]
        if window.endswith(b"\r\n0\r\n\r\n"):  # the chunked body's last chunk
            self._finish(True)
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self._finish(False)

    def _finish(self, complete: bool) -> None:
        if not self.finished.done():
            ok = complete and bool(self.status_ok) and self.frames == PACED_FRAMES
            self.finished.set_result(StreamResult(
                ok, self.frames, time.perf_counter() - self.started, self.connected))


async def _open_streams(port: int, request: bytes, count: int) -> list[StreamResult]:
    loop = asyncio.get_running_loop()

    async def one() -> StreamResult:
        finished: asyncio.Future[StreamResult] = loop.create_future()
        started = time.perf_counter()
        try:
            await loop.create_connection(lambda: _Stream(request, finished, started),
                                         "127.0.0.1", port)
        except OSError:
            return StreamResult(False, 0, 0.0)
        try:
            return await asyncio.wait_for(finished, BURST_TIMEOUT_S)
        except TimeoutError:
            return StreamResult(False, 0, BURST_TIMEOUT_S)

    return await asyncio.gather(*(one() for _ in range(count)))


def _run_loop(work: object) -> list[StreamResult]:
    try:
        import uvloop

        return uvloop.run(work)  # type: ignore[arg-type]
    except ImportError:
        return asyncio.run(work)  # type: ignore[arg-type]


# -- tables ----------------------------------------------------------------------------------


def _f(value: float | None, digits: int = 0) -> str:
    return "—" if value is None else f"{value:,.{digits}f}"


def _pct(cpu_s: float | None, wall_s: float) -> str:
    return "—" if cpu_s is None else f"{cpu_s / wall_s:.0%}"


def throughput_table(rows: list[Measure], reference: dict[str, Measure]) -> list[str]:
    lines = ["| relay | answer | req/s | p50 ms | p99 ms | errors | relay CPU | "
             "µs CPU / request | µs CPU / frame | vs nginx (CPU/req) | writes / request | "
             "upstream CPU | wrk CPU | others (cores) |", "|" + "---|" * 14]
    for m in rows:
        nginx = reference.get(m.kind)
        ratio = None
        if nginx and nginx.per_request_us() and m.per_request_us() and m.target != nginx.target:
            ratio = m.per_request_us() / nginx.per_request_us()  # type: ignore[operator]
        frame = m.per_frame_us() if is_stream(m.kind) else None
        lines.append(
            f"| {m.target} | {_answer(m.kind)} | {m.rps:,.0f} | {m.p50_ms:.2f} | {m.p99_ms:.2f} "
            f"| {m.errors} | {_pct(m.relay_cpu_s, m.wall_s)} | {_cost(m)} | "
            f"{_f(frame, 1)} | {'—' if ratio is None else f'{ratio:.1f}x'} | "
            f"{_f(m.writes_per_request(), 1)} | "
            f"{_pct(m.upstream_cpu_s, m.wall_s)} | {_pct(m.client_cpu_s, m.wall_s)} | "
            f"{m.others_cores:.2f} |")
    return lines


def _writes_per_frame(m: Measure) -> str:
    if m.relay_cpu_s is None or not m.upstream_frames:
        return "—"
    return f"{m.relay_writes / m.upstream_frames:.2f}"


def _rss(m: Measure) -> str:
    if m.rss_peak_mb is None:
        return "—"
    return f"{m.extra['rss_idle_mb']:.0f} → {m.rss_peak_mb:.0f}"


def _cost(m: Measure) -> str:
    if "cpu_min" not in m.extra:
        return _f(m.per_request_us())
    return f"{_f(m.per_request_us())} ({m.extra['cpu_min']:,.0f}..{m.extra['cpu_max']:,.0f})"


def _answer(kind: str) -> str:
    return {"json": "JSON", "sse": f"SSE ({FAST_FRAMES} frames)",
            "renamed": "SSE, renamed", "renamed-json": "JSON, renamed",
            "sse-nousage": "SSE, usage not asked (hidden)"}.get(kind, kind)


def feature_table(results: Results) -> list[str]:
    lines = ["| what | answer | without, µs CPU/req | with, µs CPU/req | cost, µs/req | "
             "cost, µs/frame | share of the gateway's CPU |", "|" + "---|" * 7]
    gw, quiet = "gateway 1w", "gateway 1w, log warning"
    cases = [
        ("model rename (rewrite every chunk)", "json", (gw, "json"), (gw, "renamed-json")),
        ("model rename (rewrite every chunk)", "sse", (gw, "sse"), (gw, "renamed")),
        ("usage chunk hidden from a client that did not ask", "sse", (gw, "sse"),
         (gw, "sse-nousage")),
        ("`request.done` log line (info vs warning)", "json", (quiet, "json"), (gw, "json")),
        ("`request.done` log line (info vs warning)", "sse", (quiet, "sse"), (gw, "sse")),
        (f"SSE instead of JSON ({FAST_FRAMES} frames, same content)", "sse", (gw, "json"),
         (gw, "sse")),
        (f"SSE instead of JSON, nginx ({FAST_FRAMES} frames)", "sse", ("nginx 1w", "json"),
         ("nginx 1w", "sse")),
    ]
    for what, answer, without_key, with_key in cases:
        without, with_ = results.find(*without_key), results.find(*with_key)
        if not without or not with_:
            continue
        a, b = without.per_request_us() or 0.0, with_.per_request_us() or 0.0
        per_frame = f"{(b - a) / FAST_FRAMES:+.1f}" if answer == "sse" else "—"
        lines.append(f"| {what} | {_answer(answer)} | {a:,.0f} | {b:,.0f} | {b - a:+,.0f} | "
                     f"{per_frame} | {(b - a) / b:.0%} |")
    return lines


def sequential_table(rows: list[Measure]) -> list[str]:
    lines = ["| answer | relay | p50 ms | p99 ms | added p50 vs direct, µs | "
             "µs CPU / request |", "|" + "---|" * 6]
    direct = {m.kind: m for m in rows if m.relay_cpu_s is None}
    for m in rows:
        added = (m.p50_ms - direct[m.kind].p50_ms) * 1e3 if m.kind in direct else None
        lines.append(f"| {_answer(m.kind)} | {m.target} | {m.p50_ms:.3f} | {m.p99_ms:.3f} | "
                     f"{'—' if m.relay_cpu_s is None else _f(added)} | {_cost(m)} |")
    return lines


def burst_table(rows: list[Measure]) -> list[str]:
    lines = [f"| streams | relay | complete | frames | all finished, s (ideal "
             f"{IDEAL_PACED_S:.2f}) | stream p50 s | stream p99 s | frames/s | relay CPU | "
             "µs CPU / frame | writes / frame | RSS MB before → peak | slowest connect, s | "
             "upstream CPU | client CPU | "
             "others (cores) |", "|" + "---|" * 16]
    for m in rows:
        streams = int(m.extra["expected"]) // PACED_FRAMES
        lines.append(
            f"| {streams} | {m.target} | {m.requests}/{streams} | "
            f"{int(m.extra['frames']):,}/{int(m.extra['expected']):,} | {m.wall_s:.2f} | "
            f"{m.p50_ms / 1e3:.2f} | {m.p99_ms / 1e3:.2f} | {m.extra['frames'] / m.wall_s:,.0f} | "
            f"{_pct(m.relay_cpu_s, m.wall_s)} | {_f(m.per_frame_us(), 1)} | "
            f"{_writes_per_frame(m)} | {_rss(m)} | {m.extra['connect_max_s']:.2f} | "
            f"{_pct(m.upstream_cpu_s, m.wall_s)} | {_pct(m.client_cpu_s, m.wall_s)} | "
            f"{m.others_cores:.2f} |")
    return lines


# -- py-spy ----------------------------------------------------------------------------------


def py_spy() -> str | None:
    local = ROOT / ".venv" / "bin" / "py-spy"
    return str(local) if local.exists() else shutil.which("py-spy")


def profile(bench: Bench, target: Target, kind: str, seconds: int, load: Any,
            workdir: Path, title: str) -> list[str]:
    """py-spy samples the gateway, native frames included, while `load()` runs."""
    spy = py_spy()
    assert spy and target.proc
    out = workdir / f"profile-{_slug(target.name)}-{kind}.txt"
    # --native needs the blocking mode: each sample pauses the gateway for a moment.
    spying = subprocess.Popen(
        [spy, "record", "--pid", str(target.proc.popen.pid), "--duration", str(seconds),
         "--rate", "200", "--format", "raw", "--nolineno", "--native", "-o", str(out)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.5)
    load()
    if spying.wait(seconds + 30) != 0 or not out.exists():
        return [f"py-spy failed on {kind} (exit {spying.returncode})"]
    return summarise_profile(out, title)


_TRUNK_END = "Runner.run (asyncio/runners.py)"  # the event loop's entry: below it, callbacks


def _short(frame: str) -> str:
    frame = re.sub(r"^0x[0-9a-f]+ ", "", frame)  # an unresolved native address
    frame = re.sub(r"\(.*?site-packages/", "(", frame)
    frame = frame.replace(f"({ROOT}/", "(")
    return re.sub(r"\(/.*?/python3\.\d+/", "(", frame)


def _is_python(frame: str) -> bool:
    return frame.endswith(".py)") or "(<frozen" in frame


def _package(frame: str) -> str:
    found = re.search(r"\(([^)]*)\)$", frame)
    path = found.group(1) if found else frame
    parts = path.split("/")
    if parts[0] == "gateway" and len(parts) > 1:
        return "/".join(parts[:2]).removesuffix(".py")
    return parts[0].removesuffix(".py")


@dataclass
class _Profile:
    total: int = 0
    own: Counter[str] = field(default_factory=Counter)  # innermost Python frame
    cumulative: Counter[str] = field(default_factory=Counter)
    packages: Counter[str] = field(default_factory=Counter)
    native: Counter[str] = field(default_factory=Counter)  # innermost frame when it is C
    callers: dict[str, Counter[str]] = field(default_factory=dict)  # native leaf -> Python

    def add(self, frames: list[str], samples: int) -> None:
        if _TRUNK_END in frames:
            frames = frames[len(frames) - frames[::-1].index(_TRUNK_END):]
        python = [f for f in frames if _is_python(f)]
        inner = python[-1] if python else "(event loop, C: uvloop/libuv)"
        self.total += samples
        self.own[inner] += samples
        self.packages[_package(inner) if python else "event loop (C)"] += samples
        for frame in set(python):
            self.cumulative[frame] += samples
        if frames and not _is_python(frames[-1]):
            self.native[frames[-1]] += samples
            self.callers.setdefault(frames[-1], Counter())[inner] += samples


def summarise_profile(path: Path, title: str) -> list[str]:
    found = _Profile()
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            found.add([_short(f) for f in stack.split(";")], int(count))
    total = found.total
    if not total:
        return [f"py-spy recorded no samples for {title}"]
    lines = [f"#### {title}: {total} samples of the busy gateway", "",
             "| # | own | innermost Python function (with the C it calls) | cumulative | "
             "Python function (callbacks' frames; the loop's trunk left out) |",
             "|---|---|---|---|---|"]
    top_own, top_cum = found.own.most_common(15), found.cumulative.most_common(15)
    for i in range(15):
        a = top_own[i] if i < len(top_own) else ("", 0)
        b = top_cum[i] if i < len(top_cum) else ("", 0)
        lines.append(f"| {i + 1} | {a[1] / total:.1%} | `{a[0]}` | {b[1] / total:.1%} | "
                     f"`{b[0]}` |")
    lines += ["", "own time by package: " + ", ".join(
        f"{name} {n / total:.0%}" for name, n in found.packages.most_common(14)), "",
        "native leaves (C functions and syscalls) and who calls them:", ""]
    for leaf, n in found.native.most_common(8):
        callers = ", ".join(f"`{c.split(' (')[0]}` {m / total:.1%}"
                            for c, m in found.callers[leaf].most_common(4))
        lines.append(f"- `{leaf}` {n / total:.1%}: {callers}")
    return [*lines, ""]


# -- the run ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    duration_s: int
    warmup_s: int
    sequential_s: int
    connections: int
    threads: int
    streams: tuple[int, ...]
    profile_s: int
    repeat: int
    quick: bool


def plan_from(args: argparse.Namespace) -> Plan:
    if args.quick:
        return Plan(args.duration or 1, 1, 1, args.connections, args.threads,
                    tuple(args.streams or (1000,)), args.profile_seconds or 4, args.repeat or 1,
                    True)
    return Plan(args.duration or 3, 2, 5, args.connections, args.threads,
                tuple(args.streams or (1000, 2000)), args.profile_seconds or 8, args.repeat or 4,
                False)


def _versions(wrk: str, nginx: str) -> str:
    def first(cmd: list[str]) -> str:
        done = subprocess.run(cmd, capture_output=True, text=True)
        return (done.stdout or done.stderr).strip().splitlines()[0]

    python = str(VENV_PYTHON if VENV_PYTHON.exists() else sys.executable)
    return "; ".join([first(["node", "--version"]), first([nginx, "-v"]),
                      first([wrk, "--version"]).split(" Copyright")[0],
                      first([python, "--version"])])


def gateway_revision(root: Path = ROOT) -> str:
    """The commit the gateway ran from, and whether gateway/ had uncommitted changes."""
    def git(*args: str) -> str:
        done = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True)
        return done.stdout.strip()

    head = git("rev-parse", "--short", "HEAD") or "unknown"
    return head + (" + uncommitted changes in gateway/" if git("status", "--porcelain", "gateway")
                   else "")


def event_loop_of(proc: Proc) -> str:
    """Whether uvloop and httptools are loaded in the gateway's processes (uvicorn's `auto`
    takes each when it imports)."""
    found = set()
    for pid in _descendants(proc.popen.pid):
        maps = ""
        with contextlib.suppress(OSError), open(f"/proc/{pid}/maps") as file:
            maps = file.read()
        found.update(name for name in ("uvloop", "httptools") if name in maps)
    return "loaded: " + (", ".join(sorted(found)) or "neither uvloop nor httptools")


def log_problems(proc: Proc) -> str:
    """Warnings and errors the gateway logged (`request.done` lines are info)."""
    seen: Counter[str] = Counter()
    with open(proc.log, errors="replace") as file:
        for line in file:
            if not line.strip() or re.search(r'"level":\s*"info"', line) or "auth.open" in line:
                continue
            found = re.search(r'"event":\s*"([^"]+)"', line)
            seen[found.group(1) if found else line.strip()[:80]] += 1
    return ", ".join(f"{event} x{n}" for event, n in seen.most_common(6)) or "nothing"


@dataclass
class Results:
    throughput: list[Measure] = field(default_factory=list)
    sequential: list[Measure] = field(default_factory=list)
    bursts: list[Measure] = field(default_factory=list)
    profiles: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def find(self, target: str, kind: str) -> Measure | None:
        return next((m for m in self.throughput if (m.target, m.kind) == (target, kind)), None)


class Session:
    """The processes of one run, and the measurements taken on them."""

    def __init__(self, args: argparse.Namespace, plan: Plan, workdir: Path) -> None:
        self.args = args
        self.plan = plan
        self.workdir = workdir
        self.procs: list[Proc] = []
        self.targets: dict[str, Target] = {}
        self.results = Results()
        self.wrk = ensure_tool("wrk", "wrk", not args.no_install)
        self.nginx = ensure_tool("nginx", "nginx", not args.no_install)
        if not shutil.which("node"):
            raise SystemExit("relay_cpu: node (>= 18) is needed for bench/upstream.js")
        self.bench: Bench | None = None

    def start(self) -> None:
        up_port = free_port()
        upstream = launch("upstream", ["node", str(BENCH / "upstream.js"), "--port", str(up_port),
                                       "--paced-tokens", str(PACED_TOKENS), "--pace-ms",
                                       str(PACE_MS)], up_port, self.workdir)
        self.procs.append(upstream)
        self.bench = Bench(upstream, up_port, self.wrk)
        self.targets["direct"] = Target("direct", up_port, None)
        ng_port = free_port()
        conf = nginx_config(self.workdir, ng_port, up_port)
        ng = launch("nginx", [self.nginx, "-c", str(conf), "-p", str(self.workdir), "-e",
                              str(self.workdir / "nginx-error.log")], ng_port, self.workdir)
        self.procs.append(ng)
        self.targets["nginx 1w"] = Target("nginx 1w", ng_port, ng)
        if self.args.floors:
            self.start_floors(up_port)
        gateways = [("gateway 1w", "info", 1, ROOT),
                    ("gateway 1w, log warning", "warning", 1, ROOT),
                    ("gateway 2w", "info", 2, ROOT)]
        if self.args.baseline:
            gateways.insert(1, (BASELINE, "info", 1, Path(self.args.baseline).resolve()))
        for name, log_level, workers, root in gateways:
            redis_url = self.args.redis_url if workers > 1 else None
            config = gateway_config(self.workdir / f"gateway-{len(self.procs)}.yaml", up_port,
                                    log_level, redis_url)
            try:
                proc = start_gateway(name, config, workers, self.workdir, root)
            except RuntimeError as exc:
                self.results.notes.append(f"{name}: not measured: {str(exc).strip()[-300:]}")
                continue
            self.procs.append(proc)
            self.targets[name] = Target(name, proc.port, proc, gateway=True)
        for target in self.targets.values():
            extra = ["renamed-json", "renamed", "sse-nousage"] if target.gateway else []
            for kind in ["json", "sse", *extra]:
                problem = check(target, kind)
                if problem:
                    raise SystemExit(f"relay_cpu: sanity check failed: {problem}")

    def start_floors(self, upstream: int) -> None:
        """The relays under the gateway (bench/relay_floor.py), each on 1 uvloop process."""
        python = str(VENV_PYTHON if VENV_PYTHON.exists() else Path(sys.executable))
        for mode, name in FLOORS.items():
            port = free_port()
            proc = launch(name, [python, str(BENCH / "relay_floor.py"), "--mode", mode, "--port",
                                 str(port), "--upstream", f"http://127.0.0.1:{upstream}"],
                          port, self.workdir)
            self.procs.append(proc)
            self.targets[name] = Target(name, port, proc)

    def stop(self) -> None:
        for proc in self.procs:
            if proc.name.startswith("gateway"):
                self.results.notes.append(f"{proc.name} logged: {log_problems(proc)}; "
                                          f"{event_loop_of(proc)}")
        for proc in reversed(self.procs):
            proc.stop()

    def loaded(self, target: Target, kind: str, connections: int, seconds: int,
               warm: bool = True) -> Measure:
        assert self.bench
        if warm:
            self.bench.wrk_run(target, kind, connections, self.plan.threads, self.plan.warmup_s)
        time.sleep(0.5)  # what the last run left in flight is done before this one counts
        measure = self.bench.wrk_run(target, kind, connections, self.plan.threads, seconds)
        print(f"#   {target.name:24} {kind:13} c={connections:<4} {measure.rps:9,.0f} req/s "
              f"{_f(measure.per_request_us())} us CPU/req", file=sys.stderr)
        return measure

    def in_rounds(self, cases: list[tuple[Target, str]], connections: int, seconds: int,
                  warm: bool = True) -> list[Measure]:
        """Every case once per round, rounds in turn, so a noisy spell hits all cases alike;
        for each case the round with the median CPU per request."""
        rounds: list[list[Measure]] = [[] for _ in cases]
        for round_ in range(self.plan.repeat):
            for runs, (target, kind) in zip(rounds, cases, strict=True):
                runs.append(self.loaded(target, kind, connections, seconds,
                                        warm=warm and round_ == 0))
        return [_median(runs) for runs in rounds]

    def measure_throughput(self) -> None:
        cases: list[tuple[Target, str]] = []
        for kind in ("json", "sse"):
            cases += [(target, kind) for target in self.targets.values()]
            for gateway in self.compared():
                cases.append((gateway, "renamed" if kind == "sse" else "renamed-json"))
                if kind == "sse":
                    cases.append((gateway, "sse-nousage"))
        self.results.throughput = self.in_rounds(cases, self.plan.connections,
                                                 self.plan.duration_s)

    def compared(self) -> list[Target]:
        """The 1-worker gateway, and the baseline beside it when there is one."""
        return [self.targets[name] for name in ("gateway 1w", BASELINE) if name in self.targets]

    def measure_sequential(self) -> None:
        cases = [(self.targets[name], kind) for kind in ("json", "sse")
                 for name in ("direct", "nginx 1w", "gateway 1w", BASELINE)
                 if name in self.targets]
        self.results.sequential = self.in_rounds(cases, 1, self.plan.sequential_s,
                                                 warm=not self.plan.quick)

    def measure_bursts(self) -> None:
        assert self.bench
        cases = [("direct", "paced", "direct"), ("nginx 1w", "paced", "nginx 1w"),
                 ("gateway 1w", "paced", "gateway 1w, pool 4096 (default)"),
                 ("gateway 1w", "paced-wide", "gateway 1w, pool 8192"),
                 ("gateway 2w", "paced-wide", "gateway 2w, pool 8192"),
                 (BASELINE, "paced-wide", f"{BASELINE}, pool 8192"),
                 *((name, "paced", name) for name in FLOORS.values())]
        for streams in self.plan.streams:
            for name, kind, label in cases:
                if name not in self.targets:
                    continue
                measure = self.bench.burst(self.targets[name], kind, streams)
                measure.target = label
                print(f"#   {label:32} {streams} streams: {measure.wall_s:.2f} s",
                      file=sys.stderr)
                self.results.bursts.append(measure)
                time.sleep(0.5 if self.plan.quick else 1.0)

    def profile(self) -> None:
        if self.bench is None or not self.compared():
            return
        if py_spy() is None:
            self.results.notes.append("--profile: py-spy not found "
                                      "(`.venv/bin/pip install py-spy`)")
            return
        for target in self.compared():
            self.profile_one(self.bench, target)

    def profile_one(self, bench: Bench, target: Target) -> None:
        plan = self.plan
        for kind in ("json", "sse", "renamed", "sse-nousage"):
            title = f"{target.name}: {_answer(kind)}, wrk -c{plan.connections}"
            self.results.profiles += profile(bench, target, kind, plan.profile_s, lambda k=kind: (
                bench.wrk_run(target, k, plan.connections, plan.threads, plan.profile_s + 1)),
                self.workdir, title)
        streams = plan.streams[0]
        self.results.profiles += profile(bench, target, "paced-wide", 3, lambda: (
            bench.burst(target, "paced-wide", streams)), self.workdir,
            f"{target.name}: {streams} paced streams at once (pool 8192)")


def report(session: Session, header: str) -> None:
    results, plan = session.results, session.plan
    reference = {m.kind: m for m in results.throughput if m.target == "nginx 1w"}
    for kind, like in (("renamed", "sse"), ("renamed-json", "json"), ("sse-nousage", "sse")):
        if like in reference:
            reference[kind] = reference[like]
    print(header + "\n")
    print(f"### Throughput: {plan.connections} connections, wrk -t{plan.threads}, "
          f"{plan.repeat} rounds of {plan.duration_s} s (after {plan.warmup_s} s warm-up); "
          "each row the round with the median CPU per request (range in brackets)\n")
    print("\n".join(throughput_table(results.throughput, reference)))
    print("\nrelay CPU: the relay's whole process tree (nginx master + worker; uvicorn "
          "supervisor + workers), 100% = one core; per request and per frame: divided by what "
          f"the upstream served in the same window (per frame: all of it over {FAST_FRAMES} "
          "frames; the marginal cost of a frame is in the next table). writes: write/writev "
          "syscalls of the relay (/proc/PID/io). others: cores busy with processes outside "
          "this bench.\n")
    print("### What a feature costs (gateway 1 worker, same load)\n")
    print("\n".join(feature_table(results)))
    print(f"\n### Sequential: 1 connection, {plan.repeat} rounds of {plan.sequential_s} s; "
          "each row the round with the median CPU per request\n")
    print("\n".join(sequential_table(results.sequential)))
    print(f"\n### Many slow streams: all opened at once, {PACED_TOKENS} tokens at "
          f"{1000 // PACE_MS}/s each ({PACED_FRAMES} frames)\n")
    print("\n".join(burst_table(results.bursts)))
    if results.profiles:
        print("\n### Where the gateway's CPU goes (py-spy, Python frames)\n")
        print("\n".join(results.profiles))
    slack = 2 * plan.connections  # in flight at the start and at the end of a run
    mismatch = [f"{m.target} {m.kind}: upstream {m.upstream_requests} for {m.requests}"
                for m in results.throughput
                if abs(m.upstream_requests - m.requests) > max(slack, 0.01 * m.requests)]
    if mismatch:
        results.notes.append("the upstream's request count differs from the client's: "
                             + "; ".join(mismatch))
    print("\n" + "\n".join(f"- {note}" for note in results.notes))


def run(args: argparse.Namespace) -> None:
    plan = plan_from(args)
    raise_fd_limit()
    workdir = Path(tempfile.mkdtemp(prefix="relay-cpu-"))
    os.chmod(workdir, 0o755)
    session = Session(args, plan, workdir)
    started, load_before, revision = time.monotonic(), os.getloadavg(), gateway_revision()
    try:
        session.start()
        print(f"# Relay CPU: {plan}", file=sys.stderr)
        session.measure_throughput()
        session.measure_sequential()
        session.measure_bursts()
        if args.profile:
            session.profile()
    finally:
        session.stop()
        if args.keep:
            print(f"# logs and configs kept in {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    if args.baseline:
        revision += f", baseline at {gateway_revision(Path(args.baseline).resolve())}"
    header = (f"## Relay CPU (gateway at {revision}; {os.cpu_count()} cores; "
              f"{_versions(session.wrk, session.nginx)}; load average {load_before[0]:.2f} "
              f"before, {os.getloadavg()[0]:.2f} after; {time.monotonic() - started:.0f} s)")
    report(session, header)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="about a minute: short runs")
    parser.add_argument("--duration", type=int, help="seconds per throughput run (3; quick 1)")
    parser.add_argument("--repeat", type=int, help="rounds of throughput runs (4; quick 1)")
    parser.add_argument("--connections", type=int, default=32, help="wrk connections (32)")
    parser.add_argument("--threads", type=int, default=1, help="wrk threads (1)")
    parser.add_argument("--streams", type=int, nargs="+",
                        help="concurrent paced streams per burst (1000 2000; quick 1000)")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0",
                        help="for the `--workers 2` gateway")
    parser.add_argument("--profile", action="store_true", help="py-spy the 1-worker gateway")
    parser.add_argument("--floors", action="store_true",
                        help="also measure bench/relay_floor.py's bare relays")
    parser.add_argument("--baseline", metavar="DIR",
                        help="also measure the gateway from DIR (say, `git worktree add DIR "
                             "<commit>`), same run: before and after under the same noise")
    parser.add_argument("--profile-seconds", type=int, help="seconds per profile (8; quick 4)")
    parser.add_argument("--no-install", action="store_true", help="never apt-get wrk/nginx")
    parser.add_argument("--keep", action="store_true", help="keep logs and configs")
    run(parser.parse_args())


if __name__ == "__main__":
    main()
