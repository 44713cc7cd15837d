"""Cache hit latency end to end, against a direct call to a fast upstream, same run.

    python bench/cache_hit.py [--requests 2000] [--redis-url redis://127.0.0.1:6379/14]

Starts the bench upstream and two gateways (in-process LRU; Redis) as subprocesses, warms one
cached answer per gateway, then measures sequential latency (p50/p99) of repeats: each is a hit
that never reaches the upstream. Skips the Redis row when no Redis answers.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
from pathlib import Path

import redis

sys.path.insert(0, str(Path(__file__).resolve().parent))

from overhead import free_port, percentile, sequential, start

BODY = (b'{"model":"bench","messages":[{"role":"user","content":"hi"}],"temperature":0,'
        b'"stream":false}')


def gateway_config(upstream_port: int, redis_url: str | None) -> str:
    cache = f"{{redis_url: '{redis_url}', namespace: bench}}" if redis_url else "{}"
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as config:
        config.write(f"backends: {{up: {{kind: openai, base_url: 'http://127.0.0.1:{upstream_port}'}}}}\n"
                     f"models: {{bench: {{backend: up}}}}\nserver: {{log_level: warning}}\n"
                     f"cache: {cache}\n")
    return config.name


def redis_answers(url: str) -> bool:
    try:
        return bool(redis.Redis.from_url(url, socket_timeout=0.5).ping())
    except redis.RedisError:
        return False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/14")
    args = parser.parse_args()
    up_port = free_port()
    upstream = start([str(Path(__file__).parent / "overhead.py"), "--upstream", str(up_port)],
                     up_port)
    rows = ["| path | p50 ms | p99 ms | p50 vs direct |", "|---|---|---|---|"]
    processes, configs = [upstream], []
    try:
        direct = asyncio.run(sequential(f"http://127.0.0.1:{up_port}/v1/chat/completions", BODY,
                                        args.requests))
        d50 = percentile(direct, 50) * 1e3
        rows.append(f"| direct upstream (no cache) | {d50:.3f} | "
                    f"{percentile(direct, 99) * 1e3:.3f} | 1.00x |")
        stores = [("gateway hit, in-process LRU", None)]
        if redis_answers(args.redis_url):
            stores.append(("gateway hit, Redis on loopback", args.redis_url))
        for label, url in stores:
            port = free_port()
            configs.append(gateway_config(up_port, url))
            processes.append(start(["-m", "gateway", "serve", "--config", configs[-1],
                                    "--host", "127.0.0.1", "--port", str(port)], port))
            hits = asyncio.run(sequential(f"http://127.0.0.1:{port}/v1/chat/completions", BODY,
                                          args.requests))
            p50 = percentile(hits, 50) * 1e3
            rows.append(f"| {label} | {p50:.3f} | {percentile(hits, 99) * 1e3:.3f} | "
                        f"{p50 / d50:.2f}x |")
    finally:
        for process in processes:
            process.terminate()
            process.wait(10)
        for config in configs:
            os.unlink(config)
    print("\n".join(rows))


if __name__ == "__main__":
    main()
