"""Nodes as separate network hosts: each emulated Ollama runs in a network namespace of its own,
reached over a veth pair at its own address, as a GPU server and a Mac are reached over a LAN.

The namespaces are made by the test (`ip netns`, root only: skipped elsewhere, with the reason).
Each host's emulator keeps its own memory and fails a load over it; its counters are read over
the network (`GET /_emulator`). A host is cut off by taking its end of the link down: nothing
answers at its address, as when a node drops off the network, rather than refusing connections.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.servers import stop_process, wait_until

ROOT = Path(__file__).resolve().parent.parent
GB = 10**9
PORT = 11434  # each host has its own address, so both use Ollama's own port
MODELS = {"a": ["only-a:7b=4", "both:7b=4", "big:7b=8"], "b": ["only-b:7b=4", "both:7b=4"]}

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("ip") is None,
    reason="network namespaces need root and iproute2's `ip`")


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


class NetworkHost:
    """One host: a namespace, a veth pair to it (a /30 of its own) and an Ollama inside."""

    def __init__(self, name: str, index: int) -> None:
        tag = f"sw{os.getpid() % 10000}{name}"  # interface names are at most 15 characters
        self.namespace, self.link, self.peer = f"{tag}ns", f"{tag}h", f"{tag}n"
        prefix = f"10.213.{os.getpid() % 250}"
        self.gateway_side, self.address = f"{prefix}.{4 * index + 1}", f"{prefix}.{4 * index + 2}"
        self.url = f"http://{self.address}:{PORT}"
        self.process: subprocess.Popen[bytes] | None = None

    def create(self, models: list[str]) -> None:
        ip("netns", "add", self.namespace)
        ip("link", "add", self.link, "type", "veth", "peer", "name", self.peer)
        ip("link", "set", self.peer, "netns", self.namespace)
        ip("addr", "add", f"{self.gateway_side}/30", "dev", self.link)
        ip("link", "set", self.link, "up")
        inside = ("netns", "exec", self.namespace, "ip")
        ip(*inside, "addr", "add", f"{self.address}/30", "dev", self.peer)
        ip(*inside, "link", "set", self.peer, "up")
        ip(*inside, "link", "set", "lo", "up")
        argv = ["ip", "netns", "exec", self.namespace, sys.executable, "-m",
                "tests.emulators.ollama", "--host", self.address, "--port", str(PORT),
                "--load-delay", "0.6", "--memory-gb", "8", "--refuse-over-memory",
                *(arg for model in models for arg in ("--model", model))]
        self.process = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.DEVNULL)
        wait_until(self.answers, timeout=30, message=f"the emulator on {self.address}")

    def answers(self) -> bool:
        try:
            return httpx.get(self.url + "/api/version", timeout=1).status_code == 200
        except httpx.TransportError:
            return False

    def counters(self) -> dict[str, Any]:
        return httpx.get(self.url + "/_emulator", timeout=5).json()

    def cut_off(self) -> None:
        """The host's own end of the cable goes dead: its address stays routed here, and
        nothing answers there (on the gateway's side the link is still up, so no other route
        can take the traffic)."""
        ip("netns", "exec", self.namespace, "ip", "link", "set", self.peer, "down")

    def reconnect(self) -> None:
        ip("netns", "exec", self.namespace, "ip", "link", "set", self.peer, "up")

    def destroy(self) -> None:
        if self.process is not None:
            stop_process(self.process)
        subprocess.run(["ip", "netns", "delete", self.namespace], capture_output=True,
                       timeout=30)  # takes the veth pair with it


@pytest.fixture
def hosts() -> Iterator[dict[str, NetworkHost]]:
    made = {name: NetworkHost(name, index) for index, name in enumerate(MODELS)}
    try:
        for name, host in made.items():
            host.create(MODELS[name])
        yield made
    finally:
        for host in made.values():
            host.destroy()


def fleet(hosts: dict[str, NetworkHost]) -> dict[str, Any]:
    route = {"served_name": "both:7b", "size_gb": 4}
    return {
        "swapper": {"model_swap_timeout": 30},
        "batching": {"window_ms": 20, "min_residency_ms": 0, "max_wait_ms": 5000},
        "nodes": {"a": {"memory_budget_gb": 8, "max_concurrent_models": 2},
                  "b": {"memory_budget_gb": 8, "mode": "single-active"}},
        # A host gone is noticed in 3 s (the default is 30) rather than after the read timeout.
        "backends": {f"ollama-{n}": {"kind": "ollama", "base_url": h.url, "node": n,
                                     "timeouts": {"connect": 2, "dead_host": 3}}
                     for n, h in hosts.items()},
        "models": {
            "only-a": {"backend": "ollama-a", "served_name": "only-a:7b", "size_gb": 4},
            "only-b": {"backend": "ollama-b", "served_name": "only-b:7b", "size_gb": 4},
            "big": {"backend": "ollama-a", "served_name": "big:7b", "size_gb": 8},
            "both": {"routes": [{"backend": "ollama-a", **route},
                                {"backend": "ollama-b", **route}]},
        },
    }


def ask(model: str) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}]}


def chat(gateway: Any, model: str) -> int:
    return httpx.post(gateway.url + "/v1/chat/completions", json=ask(model),
                      timeout=60).status_code


def test_two_hosts_load_at_once_and_each_keeps_its_own_budget(
        start_gateway: Any, hosts: dict[str, NetworkHost]) -> None:
    gateway = start_gateway(fleet(hosts))
    together = threading.Barrier(2)

    def call(model: str) -> int:
        together.wait()
        return chat(gateway, model)

    with ThreadPoolExecutor(2) as pool:
        assert list(pool.map(call, ["only-a", "only-b"])) == [200, 200]
    ((_, a_start, a_end),) = hosts["a"].counters()["load_spans"]
    ((_, b_start, b_end),) = hosts["b"].counters()["load_spans"]
    assert max(a_start, b_start) < min(a_end, b_end), "the two hosts did not load at once"

    trace = ["both", "big", "only-b", "both", "only-a", "big", "both", "only-b"] * 2
    with ThreadPoolExecutor(6) as pool:
        codes = list(pool.map(lambda model: chat(gateway, model), trace))
    assert codes == [200] * len(trace)
    for host in hosts.values():
        counters = host.counters()
        assert counters["max_loaded_bytes"] <= 8 * GB
        assert not counters["refused_loads"], "a load was sent that the host could not hold"


def test_a_host_cut_off_the_network_is_routed_around_and_found_again(
        start_gateway: Any, hosts: dict[str, NetworkHost]) -> None:
    gateway = start_gateway(fleet(hosts))
    services = gateway.app.state.services
    with httpx.Client(base_url=gateway.url, timeout=60) as http:
        assert http.post("/v1/chat/completions", json=ask("both")).status_code == 200
        assert hosts["a"].counters()["loaded"] == ["both:7b"]  # a's route comes first

        hosts["a"].cut_off()
        served = http.post("/v1/chat/completions", json=ask("both"))
        stranded = http.post("/v1/chat/completions", json=ask("only-a"))

        assert served.status_code == 200, served.text
        assert hosts["b"].counters()["requests"] == {"both:7b": 1}
        assert stranded.status_code in (502, 503)
        assert stranded.json()["error"]["code"]  # OpenAI's shape, and no address in it
        assert hosts["a"].address not in stranded.text

        hosts["a"].reconnect()
        gateway.call(services.scheduler.reconcile())
        gateway.call(services.fallback.check())
        status = http.get("/status").json()
        assert status["nodes"]["a"]["resident_models"] == ["both"]  # still held there: found
        # only-a's load failed while a was gone; a back, it is tried at once, not after its
        # back-off
        assert http.post("/v1/chat/completions", json=ask("only-a")).status_code == 200
    assert hosts["a"].counters()["load_count"]["both:7b"] == 1  # found, never loaded twice
