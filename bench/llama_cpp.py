"""llama.cpp through the gateway against llama.cpp alone: same run, same tiny GGUF models.

    python bench/llama_cpp.py [--dim 256] [--layers 4] [--swaps 6] [--streams 5] [--tokens 128]

Swaps: the gateway (`python -m gateway serve`, `process` driver, single-active, no batching
window) is asked for the other of two models with a 1-token request, so one `llama-server` stops
and another starts; set against the backend's own start-to-healthy time plus a 1-token request to
a warm server.
Streaming: time to first token and tokens/s of a streamed answer, through the gateway and straight
to a `llama-server` with the same flags. Prints a markdown table with ratios. Not a test: read the
ratios, these machines are noisy. Needs llama.cpp (scripts/install-llama-cpp) and the `demo` extra.
"""

from __future__ import annotations

import argparse
import json
import shlex
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import yaml

from gateway.demo import (
    INSTALL_COMMAND,
    TinyModel,
    find_llama_server,
    llama_config,
    process_cmd,
    write_models,
)

HOST = "127.0.0.1"
PROMPT = [{"role": "user", "content": "Tell me a long story about swapping models."}]
_POLL_S = 0.002  # health polling: fine-grained, since start-up is what is measured


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def wait_for(url: str, process: subprocess.Popen[bytes], limit_s: float = 120) -> float:
    """Seconds until `url` answers 200; fails if the process exits or `limit_s` passes."""
    started = time.perf_counter()
    with httpx.Client(timeout=5) as client:
        while time.perf_counter() - started < limit_s:
            if process.poll() is not None:
                raise RuntimeError(f"{process.args!r} exited with {process.returncode}")
            try:
                if client.get(url).status_code == 200:
                    return time.perf_counter() - started
            except httpx.TransportError:
                pass
            time.sleep(_POLL_S)
    raise RuntimeError(f"{url} did not answer within {limit_s} s")


def stop(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    process.wait(15)


def spawn(argv: list[str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def llama_argv(binary: Path, model: str, path: Path, port: int, extra_args: str) -> list[str]:
    """The very command the gateway's `process` backend runs for this model."""
    template = process_cmd(binary, extra_args=extra_args)
    return shlex.split(template.format(path=path, host=HOST, port=port, served_name=model))


def one_token(client: httpx.Client, url: str, model: str) -> float:
    started = time.perf_counter()
    response = client.post(f"{url}/v1/chat/completions",
                           json={"model": model, "messages": PROMPT, "max_tokens": 1})
    response.raise_for_status()
    return time.perf_counter() - started


def stream(url: str, model: str, tokens: int) -> tuple[float, float]:
    """Time to the first content token, and tokens/s over the whole answer after it."""
    body = {"model": model, "messages": PROMPT, "max_tokens": tokens, "stream": True,
            "stream_options": {"include_usage": True}}
    # A client per stream: llama-server closes the connection after streaming an answer.
    with httpx.Client(timeout=120) as client:
        started = time.perf_counter()
        first, count = None, 0
        with client.stream("POST", f"{url}/v1/chat/completions", json=body) as response:
            response.raise_for_status()
            for line in response.iter_lines():
                if not line.startswith("data: {"):
                    continue
                chunk = json.loads(line.removeprefix("data: "))
                if first is None and any(c["delta"].get("content") for c in chunk["choices"]):
                    first = time.perf_counter()
                count = (chunk.get("usage") or {}).get("completion_tokens", count)
    assert first is not None and count == tokens, f"{model}: {count} tokens, first at {first}"
    return first - started, (count - 1) / (time.perf_counter() - first)


def streams(url: str, model: str, tokens: int, repeat: int) -> tuple[list[float], list[float]]:
    stream(url, model, tokens)  # warm-up
    ttft, rates = zip(*(stream(url, model, tokens) for _ in range(repeat)), strict=True)
    return list(ttft), list(rates)


def measure_direct(binary: Path, paths: dict[str, Path], args: argparse.Namespace) -> dict:
    model = next(iter(paths))
    starts, requests = [], []
    with httpx.Client(timeout=120) as client:
        for _ in range(args.swaps):
            port = free_port()
            process = spawn(llama_argv(binary, model, paths[model], port, args.server_args))
            try:
                starts.append(wait_for(f"http://{HOST}:{port}/health", process))
                requests.append(one_token(client, f"http://{HOST}:{port}", model))
            finally:
                stop(process)
    port = free_port()
    process = spawn(llama_argv(binary, model, paths[model], port, args.server_args))
    try:
        wait_for(f"http://{HOST}:{port}/health", process)
        ttft, rates = streams(f"http://{HOST}:{port}", model, args.tokens, args.streams)
    finally:
        stop(process)
    swaps = [s + r for s, r in zip(starts, requests, strict=True)]
    return {"start": starts, "swap": swaps, "ttft": ttft, "rate": rates}


def measure_gateway(binary: Path, models: list[TinyModel], paths: dict[str, Path],
                    args: argparse.Namespace) -> dict:
    port = free_port()
    url = f"http://{HOST}:{port}"
    # No batching window: measured is the swap itself, not the wait for competing demand.
    config = {"swapper": {"mode": "single-active"}, "batching": {"window_ms": 0},
              "server": {"log_level": "warning"}, "cache": {"enabled": False},
              **llama_config(binary, models, paths, args.server_args, start_timeout=120,
                            stop_grace=5)}
    with tempfile.NamedTemporaryFile("w", suffix=".yaml") as file:
        yaml.safe_dump(config, file)
        file.flush()
        process = spawn([sys.executable, "-m", "gateway", "serve", "--config", file.name,
                         "--host", HOST, "--port", str(port)])
        try:
            wait_for(f"{url}/health", process)
            return _gateway_figures(url, [m.name for m in models], args)
        finally:
            stop(process)


def _gateway_figures(url: str, names: list[str], args: argparse.Namespace) -> dict:
    swaps, loads = [], []
    with httpx.Client(timeout=120) as client:
        one_token(client, url, names[0])  # the first load is no swap
        for i in range(args.swaps):
            model = names[(i + 1) % 2]
            swaps.append(one_token(client, url, model))
            loads.append(client.get(f"{url}/models/{model}").json()["last_load_seconds"])
    ttft, rates = streams(url, names[args.swaps % 2], args.tokens, args.streams)
    return {"start": loads, "swap": swaps, "ttft": ttft, "rate": rates}


def table(direct: dict, gateway: dict) -> str:
    rows = [
        ("model start to healthy, ms (gateway: its driver's load)", "start", 1e3),
        ("swap: 1-token request, ms (direct: start + 1 token)", "swap", 1e3),
        ("time to first token, ms", "ttft", 1e3),
        ("tokens/s", "rate", 1.0),
    ]
    lines = ["| median of runs | direct llama.cpp | through gateway | ratio |", "|---|---|---|---|"]
    for label, key, scale in rows:
        d, g = (statistics.median(figures[key]) * scale for figures in (direct, gateway))
        lines.append(f"| {label} | {d:.1f} | {g:.1f} | {g / d:.2f}x |")
    return "\n".join(lines)


def timed(label: str, step: Callable[[], dict]) -> dict:
    started = time.perf_counter()
    result = step()
    print(f"{label}: {time.perf_counter() - started:.1f} s", file=sys.stderr)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dim", type=int, default=256, help="model width (multiple of 32)")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--swaps", type=int, default=6)
    parser.add_argument("--streams", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=128, help="tokens per streamed answer")
    parser.add_argument("--server-args", default="",
                        help="more llama-server flags, e.g. '-t 1' to leave a core to the gateway")
    args = parser.parse_args(argv)
    binary = find_llama_server()
    if binary is None:
        print(f"llama.cpp's server is not installed: {INSTALL_COMMAND}", file=sys.stderr)
        return 1
    models = [TinyModel(name, dim=args.dim, layers=args.layers) for name in ("bench-a", "bench-b")]
    with tempfile.TemporaryDirectory() as directory:
        paths = write_models(Path(directory), models)
        size_mb = paths["bench-a"].stat().st_size / 1e6
        direct = timed("direct", lambda: measure_direct(binary, paths, args))
        gateway = timed("gateway", lambda: measure_gateway(binary, models, paths, args))
    print(f"llama.cpp {binary} {args.server_args}; two models of {args.dim} dims x "
          f"{args.layers} layers, F16, {size_mb:.1f} MB each; {args.tokens} tokens per stream\n")
    print(table(direct, gateway))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
