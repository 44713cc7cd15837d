"""What a swap costs a client beyond the backend's own load time.

    python bench/swap_latency.py [--load-s 1.0] [--swaps 10]

An emulated Ollama (load delay --load-s, memory for one model) behind the gateway in
single-active mode; requests alternate between two models so each one needs a swap (unload the
other, load this one). Per swap: the client-observed latency, minus a warm request's latency,
minus the backend's own unload + load time as measured at the backend's API directly. With the
batching window off this is the mechanics' cost; with the defaults the window may add its wait.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gateway.app import create_app
from gateway.config.reader import parse_config
from tests.emulators import ollama as ollama_emulator
from tests.servers import serve

ASK = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


def timed(client: httpx.Client, url: str, body: dict) -> float:
    started = time.perf_counter()
    client.post(url, json=body).raise_for_status()
    return time.perf_counter() - started


def backend_swap_s(client: httpx.Client, ollama: str, names: list[str], swaps: int) -> float:
    """Unload one model and load the other, straight at Ollama's API."""
    samples = []
    for i in range(swaps):
        old, new = names[i % 2], names[(i + 1) % 2]
        started = time.perf_counter()
        client.post(f"{ollama}/api/generate", json={"model": old, "keep_alive": 0})
        client.post(f"{ollama}/api/generate", json={"model": new, "keep_alive": -1})
        samples.append(time.perf_counter() - started)
    client.post(f"{ollama}/api/generate", json={"model": names[1], "keep_alive": 0})
    return statistics.median(samples)


def gateway_swap_s(client: httpx.Client, ollama: str, batching: dict, swaps: int) -> list[float]:
    config = parse_config({
        "swapper": {"mode": "single-active"}, "batching": batching,
        "server": {"log_level": "warning"}, "cache": {"enabled": False},
        "backends": {"ollama": {"kind": "ollama", "base_url": ollama}},
        "models": {"a": {"path": "ollama:a:7b", "size_gb": 4},
                   "b": {"path": "ollama:b:7b", "size_gb": 4}},
    }, env={})
    with serve(create_app(config)) as gateway:
        url = gateway.url + "/v1/chat/completions"
        timed(client, url, {"model": "a", **ASK})
        warm = statistics.median(timed(client, url, {"model": "a", **ASK}) for _ in range(5))
        return [timed(client, url, {"model": "ab"[(i + 1) % 2], **ASK}) - warm
                for i in range(swaps)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--load-s", type=float, default=1.0)
    parser.add_argument("--swaps", type=int, default=10)
    args = parser.parse_args()
    app = ollama_emulator.create_app({"a:7b": 4.0, "b:7b": 4.0}, load_delay=args.load_s,
                                     memory_gb=4.5, tokens=4)
    with serve(app) as ollama, httpx.Client(timeout=120) as client:
        backend = backend_swap_s(client, ollama.url, ["a:7b", "b:7b"], args.swaps)
        rows = ["| batching | backend unload+load (direct) | client-observed swap, p50 | "
                "added by the gateway, p50 | max |", "|---|---|---|---|---|"]
        for label, batching in (("window off", {"window_ms": 0, "min_residency_ms": 0}),
                                ("defaults", {})):
            observed = gateway_swap_s(client, ollama.url, batching, args.swaps)
            added = [sample - backend for sample in observed]
            rows.append(f"| {label} | {backend * 1e3:.1f} ms | "
                        f"{statistics.median(observed) * 1e3:.1f} ms | "
                        f"{statistics.median(added) * 1e3:+.1f} ms | {max(added) * 1e3:+.1f} ms |")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
