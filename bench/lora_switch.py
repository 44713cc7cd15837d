"""LoRA adapters through the gateway on a real vLLM (CPU): what switching between adapters of a
resident base costs, against what swapping the base costs.

    python bench/lora_switch.py [--rounds 20] [--vllm-python .venv-vllm/bin/python]

One `process` backend runs vLLM (`--enable-lora`) for a tiny random Llama (tests/e2e/
tiny_hf_llama.py) with two random rank-8 adapters (tests/e2e/tiny_lora.py). The gateway
(`python -m gateway serve`) loads the base (a cold vLLM start: what every base swap pays), then
each adapter's first call registers it, then calls alternate base, adapter 1, adapter 2 with
1-token answers, through the gateway and straight to vLLM. Prints a markdown table. Not a test:
the figures are one machine's; read the orders of magnitude.
"""

from __future__ import annotations

import argparse
import os
import shlex
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import yaml

ROOT = Path(__file__).resolve().parents[1]
E2E = ROOT / "tests" / "e2e"
ADAPTERS = ("sql", "poet")
ENV = {"HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1",
       "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"}
ONE_TOKEN = {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 1,
             "temperature": 0}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def write_models(vllm_python: str, folder: Path) -> None:
    env = {**os.environ, **ENV}
    subprocess.run([vllm_python, str(E2E / "tiny_hf_llama.py"), str(folder / "base")],
                   check=True, env=env)
    for seed, name in enumerate(ADAPTERS, start=1):
        subprocess.run([vllm_python, str(E2E / "tiny_lora.py"), str(folder / name), str(seed)],
                       check=True, env=env)


def gateway_config(vllm_python: str, folder: Path) -> dict[str, object]:
    cmd = [vllm_python, "-m", "vllm.entrypoints.openai.api_server", "--model", "{path}",
           "--served-model-name", "{served_name}", "--host", "{host}", "--port", "{port}",
           "--kv-cache-memory-bytes", "268435456", "--max-model-len", "512", "--enforce-eager",
           "--enable-lora", "--max-lora-rank", "8", "--max-loras", "2"]
    models: dict[str, object] = {"base": {"backend": "vllm", "path": str(folder / "base"),
                                          "cache": {"enabled": False}}}
    for name in ADAPTERS:
        models[name] = {"adapter_of": "base", "adapter_path": str(folder / name),
                        "cache": {"enabled": False}}
    return {"batching": {"window_ms": 0},
            "backends": {"vllm": {"kind": "process", "cmd": shlex.join(cmd), "env": ENV,
                                  "start_timeout": 600}},
            "models": models}


def timed_ms(client: httpx.Client, url: str, model: str) -> float:
    started = time.perf_counter()
    answer = client.post(url, json={"model": model, **ONE_TOKEN})
    answer.raise_for_status()
    return (time.perf_counter() - started) * 1000


def run(vllm_python: str, rounds: int) -> list[tuple[str, str, str]]:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        write_models(vllm_python, folder)
        config = folder / "gateway.yaml"
        config.write_text(yaml.safe_dump(gateway_config(vllm_python, folder)))
        port = free_port()
        gateway = subprocess.Popen(
            [sys.executable, "-m", "gateway", "serve", "--config", str(config), "--port",
             str(port), "--log-format", "json"], cwd=ROOT, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL)
        try:
            return measure(f"http://127.0.0.1:{port}", rounds)
        finally:
            gateway.terminate()
            gateway.wait(60)


def measure(url: str, rounds: int) -> list[tuple[str, str, str]]:
    with httpx.Client(timeout=600) as client:
        while True:
            try:
                client.get(url + "/health").raise_for_status()
                break
            except httpx.TransportError:
                time.sleep(0.1)
        started = time.perf_counter()
        client.post(url + "/models/base/load").raise_for_status()
        cold_ms = (time.perf_counter() - started) * 1000
        chat = url + "/v1/chat/completions"
        first = [timed_ms(client, chat, name) for name in ADAPTERS]
        status = client.get(url + "/status").json()
        direct = f"http://127.0.0.1:{status['models']['base']['server']['port']}"
        through: dict[str, list[float]] = {name: [] for name in ("base", *ADAPTERS)}
        straight: dict[str, list[float]] = {name: [] for name in ("base", *ADAPTERS)}
        for _ in range(rounds):
            for name in through:
                through[name].append(timed_ms(client, chat, name))
                # vLLM knows each by the gateway's name: no served_name is set
                straight[name].append(timed_ms(client, direct + "/v1/chat/completions", name))
        loads = [d for d in client.get(url + "/status").json()["decisions"]
                 if d["action"] == "load"]
    p50 = statistics.median
    adapters = [x for name in ADAPTERS for x in through[name]]
    adapters_direct = [x for name in ADAPTERS for x in straight[name]]
    return [
        ("base cold start (what a base swap costs to load)", f"{cold_ms:,.0f}", ""),
        ("an adapter's first call: registration + 1 token", f"{max(first):,.1f}", ""),
        ("adapter call, alternating adapters, p50", f"{p50(adapters):.1f}",
         f"{p50(adapters_direct):.1f}"),
        ("base call between adapter calls, p50", f"{p50(through['base']):.1f}",
         f"{p50(straight['base']):.1f}"),
        ("base loads during the whole run", str(len(loads)), ""),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--vllm-python", default=str(ROOT / ".venv-vllm/bin/python"))
    args = parser.parse_args()
    rows = run(args.vllm_python, args.rounds)
    print("| 1-token calls on a real vLLM (CPU) | through gateway, ms | direct, ms |")
    print("|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
