"""Relay instructions: what a whole relay process executes per request and per frame, counted.

    .venv/bin/python bench/relay_count.py [--baseline DIR] [--floors] [--requests 200] [--paced 20]

`bench/relay_cpu.py` times the relays' CPU under wrk; on a shared machine its figures move by
15-50 % from one run to the next. This counts instead: each relay runs under valgrind's
callgrind, counting only around the measured requests, and serves sequential requests on one
keep-alive connection from the Node upstream of bench/upstream.js. A count repeats within about
1 %: the figure to compare a change by. Instructions are not time (a cache miss costs more than
an instruction), so relay_cpu's times stay the measure of speed.

Rows: this checkout's gateway; `--baseline DIR`, the gateway of another checkout (say,
`git worktree add DIR <commit>`); `--floors`, the bare relays of bench/relay_floor.py (uvicorn +
the gateway's client, and a bare asyncio.Protocol server with it). Columns, k instructions: per
JSON request; per SSE request of 18 frames the upstream writes at once; the same with the model
renamed in every frame; per paced frame (one every 10 ms, each read and written on its own): the
difference between streams of 64 and of 16 tokens, less what the process does meanwhile when
idle (health checks, the progress watch: its background, also shown, per second), per frame.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import callgrind
from relay_cpu import ROOT, VENV_PYTHON, Proc, free_port, gateway_config, launch

PACE_MS = 10
SHORT, LONG = 16, 64  # tokens of the two paced streams; their difference is per frame
IDLE_S = 10.0
COLUMNS = ("JSON, k/request", "SSE 18 frames, k/request", "SSE renamed, k/request",
           "paced, k/frame", "idle, k/s")


class Counted:
    """A relay under callgrind: `count` runs work with counting on and says what it took."""

    def __init__(self, proc: Proc, out: Path) -> None:
        self.proc, self.out, self.dumps = proc, out, 0
        self.switching = self._total(lambda: None)  # what turning counting on and off costs

    def count(self, work: Callable[[], object]) -> int:
        return self._total(work) - self.switching

    def _total(self, work: Callable[[], object]) -> int:
        pid = self.proc.popen.pid
        callgrind.control(pid, "-i", "on")
        work()
        callgrind.control(pid, "-i", "off")
        callgrind.control(pid, "-d")  # a dump of its own: the counters start again from zero
        self.dumps += 1
        return callgrind.total(f"{self.out}.{self.dumps}")


class Connection:
    """One keep-alive connection sending the same kind of request again and again."""

    def __init__(self, port: int, path: str) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=300)
        self.path = path.encode()

    def ask(self, model: str, stream: bool, tokens: int | None = None) -> None:
        body = (f'{{"model":"{model}","messages":[{{"role":"user","content":"Count."}}],'
                f'"stream":{"true" if stream else "false"}'
                + (f',"max_tokens":{tokens}' if tokens else "") + "}").encode()
        self.sock.sendall(b"POST %s HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json"
                          b"\r\nContent-Length: %d\r\n\r\n%s" % (self.path, len(body), body))
        self._read(stream)

    def _read(self, stream: bool) -> None:
        data = b""
        while True:
            piece = self.sock.recv(65536)
            if not piece:
                raise RuntimeError("the relay closed the connection")
            data += piece
            head, _, body = data.partition(b"\r\n\r\n")
            if not head.startswith(b"HTTP/1.1 200"):
                raise RuntimeError(f"the relay answered {head[:80]!r}")
            if stream and data.endswith(b"0\r\n\r\n"):
                return
            length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                           if line.lower().startswith(b"content-length:")), None)
            if not stream and length is not None and len(body) >= length:
                return


def _relay(kind: str, root: Path, upstream: int, workdir: Path) -> tuple[Proc, Path]:
    out = workdir / f"{kind}-{root.name}.callgrind"
    port = free_port()
    python = str(VENV_PYTHON if VENV_PYTHON.exists() else Path(sys.executable))
    if kind == "gateway":
        config = gateway_config(workdir / "gateway.yaml", upstream, "info", None)
        args, ready = [python, "-m", "gateway", "serve", "--config", str(config), "--host",
                       "127.0.0.1", "--port", str(port)], "/ready"
    else:
        args, ready = [python, str(ROOT / "bench" / "relay_floor.py"), "--mode", kind, "--port",
                       str(port), "--upstream", f"http://127.0.0.1:{upstream}"], None
    return launch(f"{kind} {root}", [*callgrind.command(out), *args], port, workdir, ready,
                  wait_s=600, root=root), out


def measure(kind: str, root: Path, upstream: int, workdir: Path, requests: int,
            paced: int) -> list[float | None]:
    proc, out = _relay(kind, root, upstream, workdir)
    try:
        counted = Counted(proc, out)
        gateway = kind == "gateway"
        fast = Connection(proc.port, "/v1/chat/completions")
        for _ in range(50):  # warm: first-use paths, pools, caches
            fast.ask("bench", False)
            fast.ask("bench", True)
            if gateway:
                fast.ask("renamed", True)

        def per_request(model: str, stream: bool) -> float:
            return counted.count(lambda: [fast.ask(model, stream)
                                          for _ in range(requests)]) / requests / 1000

        def paced_run(tokens: int) -> tuple[int, float]:
            started = time.monotonic()
            total = counted.count(lambda: [slow.ask(paced_model, True, tokens)
                                           for _ in range(paced)])
            return total, time.monotonic() - started

        json, sse = per_request("bench", False), per_request("bench", True)
        renamed = per_request("renamed", True) if gateway else None
        idle_per_s = counted.count(lambda: time.sleep(IDLE_S)) / IDLE_S
        # A connection of its own, opened now: an idle one is closed after a few seconds
        slow = Connection(proc.port, "/v1/chat/completions" if gateway
                          else "/paced/v1/chat/completions")
        paced_model = "paced" if gateway else "bench"
        slow.ask(paced_model, True, SHORT)
        (short, short_s), (long, long_s) = paced_run(SHORT), paced_run(LONG)
        frame = (long - short - idle_per_s * (long_s - short_s)) / ((LONG - SHORT) * paced) / 1000
        return [json, sse, renamed, frame, idle_per_s / 1000]
    finally:
        proc.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", type=Path, help="another checkout's gateway, counted alike")
    parser.add_argument("--floors", action="store_true", help="the bare relays too")
    parser.add_argument("--requests", type=int, default=200, help="requests per figure")
    parser.add_argument("--paced", type=int, default=20, help="paced streams of each length")
    args = parser.parse_args()
    callgrind.ensure_valgrind()
    os.environ["PYTHONHASHSEED"] = "0"  # the relays' children: one hash seed, one count
    rows = [("gateway, this checkout", "gateway", ROOT)]
    if args.baseline:
        rows.append((f"gateway, {args.baseline}", "gateway", args.baseline.resolve()))
    if args.floors:
        rows += [("floor: uvicorn + relay/client.py", "uvicorn-lean", ROOT),
                 ("floor: asyncio.Protocol + relay/client.py", "protocol", ROOT)]
    with tempfile.TemporaryDirectory() as work:
        workdir = Path(work)
        upstream_port = free_port()
        upstream = launch("upstream", ["node", str(ROOT / "bench" / "upstream.js"), "--port",
                                       str(upstream_port), "--pace-ms", str(PACE_MS)],
                          upstream_port, workdir)
        try:
            print("| relay (1 process) | " + " | ".join(COLUMNS) + " |")
            print("|---|" + "---|" * len(COLUMNS))
            for name, kind, root in rows:
                figures = measure(kind, root, upstream_port, workdir, args.requests,
                                  args.paced)
                cells = ["—" if f is None else f"{f:.1f}" if f < 10 else f"{f:.0f}"
                         for f in figures]
                print(f"| {name} | " + " | ".join(cells) + " |", flush=True)
        finally:
            upstream.stop()


if __name__ == "__main__":
    main()
