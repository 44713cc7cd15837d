"""Proxy overhead: the gateway against a direct connection to the same fast upstream, same run.

    python bench/overhead.py [--requests 2000] [--concurrency 32]

Starts a minimal OpenAI-shaped upstream (raw ASGI, uvicorn, 1 worker) and the gateway
(`python -m gateway serve`, 1 worker) as subprocesses, then measures from this process:
sequential latency (p50/p99, the gateway's added latency is the difference) and throughput with
N concurrent clients, for JSON and SSE answers. Prints a table with ratios. Not a test: these
machines are noisy, so read the ratios, not the absolute numbers.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
_JSON = (b'{"id":"chatcmpl-1","object":"chat.completion","created":1,"model":"bench",'
         b'"choices":[{"index":0,"message":{"role":"assistant","content":"hello there"},'
         b'"finish_reason":"stop"}],"usage":{"prompt_tokens":5,"completion_tokens":2,'
         b'"total_tokens":7}}')
_CHUNK = (b'data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,'
          b'"model":"bench","choices":[{"index":0,"delta":{"content":"tok"},'
          b'"finish_reason":null}]}\n\n')
_SSE = _CHUNK * 8 + b"data: [DONE]\n\n"


async def upstream_app(scope: dict, receive, send) -> None:  # type: ignore[no-untyped-def]
    """A raw ASGI OpenAI-shaped upstream: as fast as this machine can answer."""
    if scope["type"] != "http":
        return
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    stream = b'"stream":true' in body
    headers = [(b"content-type", b"text/event-stream" if stream else b"application/json")]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": _SSE if stream else _JSON})


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start(args: list[str], port: int) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen([sys.executable, *args], env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return process
        time.sleep(0.05)
    process.kill()
    raise RuntimeError(f"{args} did not start on port {port}")


def payload(stream: bool) -> bytes:
    flag = b"true" if stream else b"false"
    return (b'{"model":"bench","messages":[{"role":"user","content":"hi"}],"stream":' + flag
            + b"}")


async def one(session: aiohttp.ClientSession, url: str, body: bytes) -> float:
    started = time.perf_counter()
    async with session.post(url, data=body, headers={"content-type": "application/json"}) as r:
        await r.read()
        if r.status != 200:
            raise RuntimeError(f"{url}: HTTP {r.status}")
    return time.perf_counter() - started


async def sequential(url: str, body: bytes, count: int) -> list[float]:
    async with aiohttp.ClientSession() as session:
        for _ in range(50):
            await one(session, url, body)
        return [await one(session, url, body) for _ in range(count)]


async def throughput(url: str, body: bytes, count: int, concurrency: int) -> float:
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:
        remaining = count

        async def worker() -> None:
            nonlocal remaining
            while remaining > 0:
                remaining -= 1
                await one(session, url, body)

        await asyncio.gather(*(worker() for _ in range(concurrency)))  # warm the pools
        remaining = count
        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return count / (time.perf_counter() - started)


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100)[int(q) - 1] if len(values) > 1 else values[0]


async def measure(direct: str, gateway: str, requests: int, concurrency: int) -> list[str]:
    rows = ["| answer | metric | direct | via gateway | gateway - direct | ratio |",
            "|---|---|---|---|---|---|"]
    for stream in (False, True):
        kind, body = ("SSE" if stream else "JSON"), payload(stream)
        seq_direct = await sequential(direct, body, requests // 2)
        seq_gateway = await sequential(gateway, body, requests // 2)
        for q in (50, 99):
            d, g = percentile(seq_direct, q) * 1e3, percentile(seq_gateway, q) * 1e3
            rows.append(f"| {kind} | p{q} latency, ms (sequential) | {d:.3f} | {g:.3f} | "
                        f"+{g - d:.3f} ms | {g / d:.2f}x |")
        rps_direct = await throughput(direct, body, requests, concurrency)
        rps_gateway = await throughput(gateway, body, requests, concurrency)
        rows.append(f"| {kind} | throughput, req/s ({concurrency} clients) | {rps_direct:.0f} | "
                    f"{rps_gateway:.0f} | | {rps_gateway / rps_direct:.0%} of direct |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--upstream", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.upstream:
        import uvicorn

        uvicorn.run(upstream_app, host="127.0.0.1", port=args.upstream, log_level="error",
                    access_log=False, loop="uvloop", http="httptools")
        return
    up_port, gw_port = free_port(), free_port()
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as config:
        config.write(f"backends: {{up: {{kind: openai, base_url: 'http://127.0.0.1:{up_port}'}}}}\n"
                     "models: {bench: {backend: up}}\nserver: {log_level: warning}\n"
                     "cache: {enabled: false}\n")
    upstream = start([__file__, "--upstream", str(up_port)], up_port)
    gateway = start(["-m", "gateway", "serve", "--config", config.name, "--host", "127.0.0.1",
                     "--port", str(gw_port)], gw_port)
    try:
        rows = asyncio.run(measure(f"http://127.0.0.1:{up_port}/v1/chat/completions",
                                   f"http://127.0.0.1:{gw_port}/v1/chat/completions",
                                   args.requests, args.concurrency))
    finally:
        for process in (gateway, upstream):
            process.terminate()
            process.wait(10)
        os.unlink(config.name)
    print("\n".join(rows))


if __name__ == "__main__":
    main()
