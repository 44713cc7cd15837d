"""Several nodes behind one endpoint: each node's own budget, swap lane and batching window.

Config first (what `nodes:`, `node:` and `routes:` mean, and that an old config is one node),
then two emulated Ollama servers as two GPU nodes, through real sockets: each emulator keeps
its own memory and fails a load over it, so a budget the gateway let slip would show.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.config.reader import parse_config
from gateway.config.schema import DEFAULT_NODE, ConfigError
from tests.emulators import ollama as ollama_emulator
from tests.servers import emulator, wait_until

GB = 10**9
LOAD_S = 0.6  # long enough that two loads in a row and two at once cannot be mistaken


def ask(model: str) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}]}


def services(gateway: Any) -> Any:
    return gateway.app.state.services


def two_nodes(url_a: str, url_b: str, **extra: Any) -> dict[str, Any]:
    """Node a (8 GB, two models) and node b (8 GB, single-active), an Ollama on each."""
    return {
        "swapper": {"model_swap_timeout": 30},
        "batching": {"window_ms": 20, "min_residency_ms": 0, "max_wait_ms": 5000},
        "nodes": {"a": {"memory_budget_gb": 8, "max_concurrent_models": 2},
                  "b": {"memory_budget_gb": 8, "mode": "single-active"}},
        "backends": {"ollama-a": {"kind": "ollama", "base_url": url_a, "node": "a"},
                     "ollama-b": {"kind": "ollama", "base_url": url_b, "node": "b"}},
        "models": {
            "only-a": {"backend": "ollama-a", "served_name": "only-a:7b", "size_gb": 4},
            "only-b": {"backend": "ollama-b", "served_name": "only-b:7b", "size_gb": 4},
        },
    } | extra


@pytest.fixture
def node_a(start_server: Any) -> Any:
    return start_server(ollama_emulator.create_app(
        {"only-a:7b": 4, "other-a:7b": 4, "both:7b": 4, "big:7b": 8}, load_delay=LOAD_S,
        memory_gb=8, refuse_over_memory=True))


@pytest.fixture
def node_b(start_server: Any) -> Any:
    return start_server(ollama_emulator.create_app(
        {"only-b:7b": 4, "other-b:7b": 4, "both:7b": 4}, load_delay=LOAD_S, memory_gb=8,
        refuse_over_memory=True))


# -- config ------------------------------------------------------------------------------------


def test_an_old_config_is_one_node_built_from_swapper() -> None:
    config = parse_config({
        "swapper": {"mode": "multi-active", "max_concurrent_models": 2, "memory_budget_gb": 24},
        "models": {"q": {"path": "ollama:q:7b", "size_gb": 4}},
    }, env={})
    fleet = config.fleet()
    assert list(fleet) == [DEFAULT_NODE] and config.node_of("ollama") == DEFAULT_NODE
    assert fleet[DEFAULT_NODE].budget() == config.swapper.budget()


def test_nodes_have_their_own_budgets_and_backends_name_their_node() -> None:
    config = parse_config(two_nodes("http://a:11434", "http://b:11434"), env={})
    fleet = config.fleet()
    assert list(fleet) == ["a", "b"]  # every backend names its node: no default node
    assert (fleet["a"].budget().max_models, fleet["a"].budget().memory_gb) == (2, 8)
    assert (fleet["b"].budget().max_models, fleet["b"].budget().memory_gb) == (1, 8)
    assert config.node_of("ollama-b") == "b"


def test_a_backend_naming_an_unknown_node_is_refused_with_the_nearest() -> None:
    bad = two_nodes("http://a:1", "http://b:1")
    bad["backends"]["ollama-b"]["node"] = "bb"
    with pytest.raises(ConfigError, match=r"backends\.ollama-b\.node: unknown node 'bb'.*"
                                          r"did you mean 'b'"):
        parse_config(bad, env={})


def test_a_model_larger_than_its_nodes_budget_is_refused_naming_the_node() -> None:
    bad = two_nodes("http://a:1", "http://b:1")
    bad["models"]["only-b"]["size_gb"] = 9
    with pytest.raises(ConfigError, match=r"models\.only-b\.size_gb: 9 GB does not fit the "
                                          r"memory budget of 8 GB \(nodes\.b\.memory_budget_gb\)"):
        parse_config(bad, env={})


def test_routes_name_every_backend_of_a_model() -> None:
    config = two_nodes("http://a:1", "http://b:1")
    config["models"]["both"] = {"priority": "high", "routes": [
        {"backend": "ollama-a", "served_name": "both:7b", "size_gb": 4},
        {"backend": "ollama-b", "served_name": "both:7b", "size_gb": 3.5}]}
    both = parse_config(config, env={}).models["both"]
    assert (both.name, both.backend, both.size_gb, both.placed) == ("both", "ollama-a", 4, True)
    (second,) = both.fallbacks
    assert (second.name, second.backend, second.size_gb, second.route_of, second.placed) == (
        "both@ollama-b", "ollama-b", 3.5, "both", True)
    assert second.priority == "high"  # a route is the model on another backend


@pytest.mark.parametrize(("spec", "error"), [
    ({"backend": "ollama-a", "routes": [{"backend": "ollama-b"}]},
     r"models\.m\.routes: names every backend"),
    ({"routes": [{"backend": "ollama-a"}, {"backend": "ollama-a", "served_name": "x"}]},
     r"models\.m\.routes\[1\]\.backend: backend 'ollama-a' is named by two routes"),
    ({"routes": [{"served_name": "x"}]}, r"models\.m\.routes\[0\]\.backend: is required"),
])
def test_bad_routes_are_refused_naming_the_key(spec: dict[str, Any], error: str) -> None:
    config = two_nodes("http://a:1", "http://b:1")
    config["models"]["m"] = spec
    with pytest.raises(ConfigError, match=error):
        parse_config(config, env={})


# -- two nodes, two lanes ----------------------------------------------------------------------


def test_loads_on_two_nodes_run_at_the_same_time(start_gateway: Any, node_a: Any,
                                                 node_b: Any) -> None:
    gateway = start_gateway(two_nodes(node_a.url, node_b.url))
    start = threading.Barrier(2)

    def call(model: str) -> int:
        start.wait()
        return httpx.post(gateway.url + "/v1/chat/completions", json=ask(model),
                          timeout=30).status_code

    with ThreadPoolExecutor(2) as pool:
        assert list(pool.map(call, ["only-a", "only-b"])) == [200, 200]
    ((_, a_start, a_end),) = emulator(node_a).load_spans
    ((_, b_start, b_end),) = emulator(node_b).load_spans
    assert max(a_start, b_start) < min(a_end, b_end), "the two loads did not overlap"


def test_a_swap_on_one_node_never_waits_for_the_other(start_gateway: Any, node_a: Any,
                                                      node_b: Any) -> None:
    config = two_nodes(node_a.url, node_b.url)
    config["models"]["other-b"] = {"backend": "ollama-b", "served_name": "other-b:7b",
                                   "size_gb": 4}
    gateway = start_gateway(config)
    with httpx.Client(base_url=gateway.url, timeout=30) as http:
        assert http.post("/v1/chat/completions", json=ask("only-b")).status_code == 200
        # b swaps (single-active: unload only-b, load other-b) while a loads only-a.
        with ThreadPoolExecutor(2) as pool:
            swap = pool.submit(http.post, "/v1/chat/completions", json=ask("other-b"))
            wait_until(lambda: "other-b:7b" in {s[0] for s in emulator(node_b).load_spans}
                       or services(gateway).scheduler.lanes["b"].swapping,
                       message="node b swapping")
            assert http.post("/v1/chat/completions", json=ask("only-a")).status_code == 200
            assert swap.result().status_code == 200
    a_load = emulator(node_a).load_spans[0]
    b_second = emulator(node_b).load_spans[1]
    assert a_load[1] < b_second[2], "node a waited for node b's swap"
    nodes = httpx.get(gateway.url + "/status").json()["nodes"]
    assert nodes["a"]["resident_models"] == ["only-a"]
    assert nodes["b"]["resident_models"] == ["other-b"]
    assert (nodes["a"]["memory_budget_gb"], nodes["b"]["max_concurrent_models"]) == (8, 1)


def test_each_nodes_budget_holds_and_no_load_is_refused(start_gateway: Any, node_a: Any,
                                                        node_b: Any) -> None:
    config = two_nodes(node_a.url, node_b.url)
    config["models"] |= {
        "other-a": {"backend": "ollama-a", "served_name": "other-a:7b", "size_gb": 4},
        "big": {"backend": "ollama-a", "served_name": "big:7b", "size_gb": 8},
        "other-b": {"backend": "ollama-b", "served_name": "other-b:7b", "size_gb": 4},
    }
    gateway = start_gateway(config)
    trace = ["only-a", "only-b", "other-a", "big", "other-b", "only-a", "only-b", "other-a"] * 2
    with httpx.Client(base_url=gateway.url, timeout=60) as http, \
            ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda m: http.post("/v1/chat/completions", json=ask(m)),
                                trace))
    assert [r.status_code for r in results] == [200] * len(trace)
    for node in (node_a, node_b):
        state = emulator(node)
        assert state.max_loaded_bytes <= 8 * GB
        assert not state.refused_loads, "a load was sent that the node could not hold"
        assert not [e for e in state.evictions if e[1] == "memory"], "the node had to evict"


# -- routes and placement across the two nodes ---------------------------------------------------


def with_both(config: dict[str, Any], **both: Any) -> dict[str, Any]:
    """A model `both` that either node may serve (a's route first), and `big` filling node a."""
    config["models"] |= {
        "both": {"routes": [{"backend": "ollama-a", "served_name": "both:7b", "size_gb": 4},
                            {"backend": "ollama-b", "served_name": "both:7b", "size_gb": 4}],
                 **both},
        "big": {"backend": "ollama-a", "served_name": "big:7b", "size_gb": 8},
    }
    return config


def test_a_model_with_routes_is_placed_where_it_fits_and_served_where_it_is(
        start_gateway: Any, node_a: Any, node_b: Any) -> None:
    gateway = start_gateway(with_both(two_nodes(node_a.url, node_b.url)))
    with httpx.Client(base_url=gateway.url, timeout=30) as http:
        assert http.post("/v1/chat/completions", json=ask("big")).status_code == 200
        # Node a is full (big, 8 GB); node b is empty: `both` goes to b, big stays.
        answer = http.post("/v1/chat/completions", json=ask("both"))
        assert answer.status_code == 200 and answer.json()["model"] == "both"
        assert emulator(node_b).loaded == frozenset({"both:7b"})
        assert emulator(node_a).loaded == frozenset({"big:7b"})
        # Resident on b: served there again, and nothing loads anywhere.
        loads = sum(emulator(node_a).load_count.values()) + sum(
            emulator(node_b).load_count.values())
        assert http.post("/v1/chat/completions", json=ask("both")).status_code == 200
        assert sum(emulator(node_a).load_count.values()) + sum(
            emulator(node_b).load_count.values()) == loads
        assert emulator(node_b).requests["both:7b"] == 2
        shown = http.get("/models/both").json()
        assert (shown["status"], shown["backend"], shown["node"]) == ("loaded", "ollama-b", "b")
        status = http.get("/status").json()
        assert "both" in status["loaded_models"]
        assert status["models"]["both"]["routes"] == {"ollama-a": "unloaded",
                                                      "ollama-b": "loaded"}
        assert status["nodes"]["b"]["resident_models"] == ["both@ollama-b"]


def test_requests_arriving_together_for_a_placed_model_share_one_load(
        start_gateway: Any, node_a: Any, node_b: Any) -> None:
    gateway = start_gateway(with_both(two_nodes(node_a.url, node_b.url)))
    with httpx.Client(base_url=gateway.url, timeout=30) as http, \
            ThreadPoolExecutor(6) as pool:
        results = list(pool.map(lambda _: http.post("/v1/chat/completions", json=ask("both")),
                                range(6)))
    assert [r.status_code for r in results] == [200] * 6
    loads = emulator(node_a).load_count["both:7b"] + emulator(node_b).load_count["both:7b"]
    assert loads == 1, "the model was placed on both nodes"


def test_a_queue_whose_load_has_not_begun_moves_to_a_node_that_loads_it_sooner(
        start_gateway: Any, node_a: Any, node_b: Any) -> None:
    config = with_both(two_nodes(node_a.url, node_b.url))
    config["batching"] = {"window_ms": 20, "min_residency_ms": 12000, "max_wait_ms": 30000}
    gateway = start_gateway(config)
    scheduler = services(gateway).scheduler
    emulator(node_a).token_delay = 0.5  # big's answer streams for 4 s
    emulator(node_b).load_delay = 1.0
    with httpx.Client(base_url=gateway.url, timeout=30) as http, ThreadPoolExecutor(3) as pool:
        big = pool.submit(http.post, "/v1/chat/completions", json=ask("big") | {"stream": True})
        wait_until(lambda: scheduler.slots["big"].in_flight == 1, message="big answering on a")
        only_b = pool.submit(http.post, "/v1/chat/completions", json=ask("only-b"))
        wait_until(lambda: scheduler.lanes["b"].swapping, message="node b loading only-b")
        # b's lane is busy and only-b will be new there: `both` waits on a for big's minimum
        # residency (12 s) rather than behind that load and only-b's stay.
        both = pool.submit(http.post, "/v1/chat/completions", json=ask("both"))
        wait_until(lambda: scheduler.slots["both"].queue or scheduler.slots["both@ollama-b"].queue,
                   message="both queued")
        assert scheduler.slots["both"].queue, "placed on b at once: the test shows nothing"
        # only-b loads, answers and goes idle: b has `both` loaded long before a could begin.
        assert only_b.result().status_code == 200
        answer = both.result()
        assert answer.status_code == 200 and big.result().status_code == 200
    assert emulator(node_b).requests["both:7b"] == 1
    assert emulator(node_a).load_count["both:7b"] == 0, "loaded on a, where it waited"


@pytest.fixture
def doomed_a(start_server: Any) -> Any:
    """Node a, which the test kills."""
    return start_server(ollama_emulator.create_app(
        {"both:7b": 4, "only-a:7b": 4}, load_delay=LOAD_S, memory_gb=8,
        refuse_over_memory=True))


def test_a_node_killed_its_model_is_served_from_the_other(start_gateway: Any, doomed_a: Any,
                                                          node_b: Any) -> None:
    config = two_nodes(doomed_a.url, node_b.url)
    config["models"]["both"] = {"routes": [
        {"backend": "ollama-a", "served_name": "both:7b", "size_gb": 4},
        {"backend": "ollama-b", "served_name": "both:7b", "size_gb": 4}]}
    gateway = start_gateway(config)
    with httpx.Client(base_url=gateway.url, timeout=30) as http:
        assert http.post("/v1/chat/completions", json=ask("both")).status_code == 200
        assert emulator(doomed_a).loaded == frozenset({"both:7b"})  # a's route comes first
        doomed_a.stop()
        answer = http.post("/v1/chat/completions", json=ask("both"))
        assert answer.status_code == 200, answer.text
        assert emulator(node_b).requests["both:7b"] == 1  # loaded on b and served there
        # A model that lives only on the dead node says so, and b goes on serving.
        assert http.post("/v1/chat/completions", json=ask("only-a")).status_code in (502, 503)
        assert http.post("/v1/chat/completions", json=ask("both")).status_code == 200
        shown = http.get("/status").json()["models"]["both"]
        assert (shown["serving_backend"], shown["status"]) == ("ollama-b", "loaded")


def test_a_load_that_fails_on_one_node_is_served_from_the_other(
        start_gateway: Any, node_a: Any, node_b: Any) -> None:
    emulator(node_a).load_errors["both:7b"] = "llama runner process has terminated"
    gateway = start_gateway(with_both(two_nodes(node_a.url, node_b.url)))
    answer = httpx.post(gateway.url + "/v1/chat/completions", json=ask("both"), timeout=30)
    assert answer.status_code == 200, answer.text  # placed on a, failed there, served by b
    assert emulator(node_b).requests["both:7b"] == 1
    routes = httpx.get(gateway.url + "/status").json()["models"]["both"]["routes"]
    assert routes == {"ollama-a": "failed", "ollama-b": "loaded"}


def test_a_node_that_returns_is_reconciled_with_what_it_holds(
        start_gateway: Any, start_server: Any, doomed_a: Any, node_b: Any) -> None:
    config = two_nodes(doomed_a.url, node_b.url)
    config["models"]["both"] = {"routes": [
        {"backend": "ollama-a", "served_name": "both:7b", "size_gb": 4},
        {"backend": "ollama-b", "served_name": "both:7b", "size_gb": 4}]}
    gateway = start_gateway(config)
    scheduler = services(gateway).scheduler
    with httpx.Client(base_url=gateway.url, timeout=30) as http:
        assert http.post("/v1/chat/completions", json=ask("both")).status_code == 200
        doomed_a.stop()
        assert http.post("/v1/chat/completions", json=ask("both")).status_code == 200
        # Node a comes back on its address, restarted: `both` is gone from it, and someone
        # loaded only-a there meanwhile.
        back = start_server(ollama_emulator.create_app(
            {"both:7b": 4, "only-a:7b": 4}, load_delay=LOAD_S, memory_gb=8),
            port=doomed_a.port)
        httpx.post(back.url + "/api/generate", json={"model": "only-a:7b", "keep_alive": -1})
        gateway.call(scheduler.reconcile())
        gateway.call(services(gateway).fallback.check())
        status = http.get("/status").json()
        assert status["models"]["both"]["routes"] == {"ollama-a": "unloaded",
                                                      "ollama-b": "loaded"}
        assert status["nodes"]["a"]["resident_models"] == ["only-a"]
        assert http.post("/v1/chat/completions", json=ask("only-a")).status_code == 200
        assert emulator(back).load_count["only-a:7b"] == 1  # found, not loaded again


# -- measured memory -------------------------------------------------------------------------------

ROOT = Path(__file__).resolve().parent.parent
EMULATOR_CMD = (f"{shlex.quote(sys.executable)} -m tests.emulators.openai_server "
                "--port {port} --model {served_name}")
# A stand-in for nvidia-smi: a GPU of `total_mib`, on which each emulator process (found by
# the served name it was started with) uses what the test says; the rest is free.
FAKE_SMI = """#!{python}
import json, os, sys
gpu = json.load(open(os.environ["FAKE_GPU"]))
used = []
for pid in filter(str.isdigit, os.listdir("/proc")):
    try:
        argv = open(f"/proc/{{pid}}/cmdline", "rb").read().decode().split("\\0")
    except OSError:
        continue
    if "tests.emulators.openai_server" in argv and "--model" in argv:
        mib = gpu["apps"].get(argv[argv.index("--model") + 1])
        if mib is not None:
            used.append((pid, mib))
query = " ".join(sys.argv[1:])
if "--query-compute-apps=pid,used_memory" in query:
    for pid, mib in used:
        print(f"{{pid}}, {{mib}}")
elif "--query-gpu=memory.free" in query:
    print(gpu["total_mib"] - sum(mib for _, mib in used))
else:
    sys.exit(2)
"""


def gpu_node(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, total_mib: int,
             apps: dict[str, int]) -> None:
    """Put the stand-in nvidia-smi first on PATH, reporting this GPU."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    smi = bin_dir / "nvidia-smi"
    smi.write_text(FAKE_SMI.format(python=sys.executable))
    smi.chmod(0o755)
    (tmp_path / "gpu.json").write_text(json.dumps({"total_mib": total_mib, "apps": apps}))
    monkeypatch.setenv("FAKE_GPU", str(tmp_path / "gpu.json"))
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")


def process_node(tmp_path: Path, **models: float) -> dict[str, Any]:
    return {
        "swapper": {"model_swap_timeout": 30},
        "batching": {"window_ms": 0, "min_residency_ms": 0},
        "server": {"stream_hold_s": 0},
        "nodes": {"gpu": {"memory_budget_gb": 24, "max_concurrent_models": 3}},
        "backends": {"local": {"kind": "process", "cmd": EMULATOR_CMD, "node": "gpu",
                               "env": {"PYTHONPATH": str(ROOT)}, "start_timeout": 20,
                               "stop_grace": 2}},
        "models": {name: {"backend": "local", "served_name": f"org/{name}", "size_gb": gb}
                   for name, gb in models.items()},
    }


def model_status(gateway: Any, name: str) -> dict[str, Any]:
    return httpx.get(f"{gateway.url}/models/{name}", timeout=10).json()


def test_ollama_says_what_a_model_holds_and_the_budget_counts_that(
        start_gateway: Any, start_server: Any) -> None:
    ollama = start_server(ollama_emulator.create_app(
        {"a:7b": 6, "b:7b": 4}, load_delay=0.05, memory_gb=9, refuse_over_memory=True))
    gateway = start_gateway({
        "swapper": {"mode": "multi-active", "max_concurrent_models": 3, "memory_budget_gb": 9},
        "batching": {"window_ms": 0, "min_residency_ms": 0},
        "backends": {"ollama": {"kind": "ollama", "base_url": ollama.url}},
        "models": {"a": {"path": "ollama:a:7b", "size_gb": 4},  # really 6
                   "b": {"path": "ollama:b:7b", "size_gb": 3.5}},  # really 4
    })
    with httpx.Client(base_url=gateway.url, timeout=30) as http:
        assert http.post("/v1/chat/completions", json=ask("a")).status_code == 200
        shown = model_status(gateway, "a")
        assert (shown["size_gb"], shown["measured_gb"]) == (4, 6)
        # By the config, a (4) and b (3.5) fit 9 GB together; a really holds 6: a leaves.
        assert http.post("/v1/chat/completions", json=ask("b")).status_code == 200
        assert model_status(gateway, "b")["measured_gb"] == 4
    state = emulator(ollama)
    assert state.loaded == frozenset({"b:7b"}) and not state.refused_loads
    scrape = httpx.get(gateway.url + "/metrics", headers={"accept": "text/plain"}).text
    assert ('swapper_model_memory_gb{model="b",node="default",source="measured"} 4.0'
            in scrape)
    assert 'swapper_node_resident_gb{node="default"} 4.0' in scrape


def test_what_a_model_holds_is_remembered_across_restarts(start_gateway: Any, start_server: Any,
                                                          redis_url: str) -> None:
    ollama = start_server(ollama_emulator.create_app({"a:7b": 6}, load_delay=0.05))
    config = {
        "cache": {"redis_url": redis_url, "namespace": f"test-{uuid.uuid4().hex[:8]}"},
        "swapper": {"mode": "multi-active", "memory_budget_gb": 24},
        "backends": {"ollama": {"kind": "ollama", "base_url": ollama.url}},
        "models": {"a": {"path": "ollama:a:7b", "size_gb": 4}},
    }
    first = start_gateway(config)
    assert httpx.post(first.url + "/v1/chat/completions", json=ask("a"),
                      timeout=30).status_code == 200
    assert model_status(first, "a")["measured_gb"] == 6
    first.stop()
    httpx.post(ollama.url + "/api/generate", json={"model": "a:7b", "keep_alive": 0})
    second = start_gateway(config)
    shown = model_status(second, "a")
    assert (shown["status"], shown["measured_gb"]) == ("unloaded", 6)  # known before a load


def test_a_process_models_gpu_memory_comes_from_nvidia_smi_and_free_memory_makes_room(
        start_gateway: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A 10 GB GPU (10000 MiB): p1 takes 6000 MiB, p2 5000 MiB; the config guesses 2 GB each
    # and allows 24. Both cannot be resident, whatever the config says.
    gpu_node(tmp_path, monkeypatch, total_mib=10000, apps={"org/p1": 6000, "org/p2": 5000})
    gateway = start_gateway(process_node(tmp_path, p1=2, p2=2))
    with httpx.Client(base_url=gateway.url, timeout=30) as http:
        assert http.post("/models/p2/load").status_code == 200  # measured once: 5000 MiB
        assert http.post("/models/p2/unload").status_code == 200
        assert http.post("/v1/chat/completions", json=ask("p1")).status_code == 200
        shown = model_status(gateway, "p1")
        assert shown["measured_gb"] == pytest.approx(6000 * 2**20 / 1e9, abs=0.01)
        node = http.get("/status").json()["nodes"]["gpu"]
        assert node["free_gb"] == pytest.approx(4000 * 2**20 / 1e9, abs=0.01)
        # p2 needs 5.2 GB and 4.2 GB are free: p1 leaves first, though the budget has room.
        assert http.post("/v1/chat/completions", json=ask("p2")).status_code == 200
        status = http.get("/status").json()
    assert status["loaded_models"] == ["p2"]
    actions = [(d["action"], d["model"]) for d in reversed(status["decisions"])]
    assert actions[-2:] == [("unload", "p1"), ("load", "p2")]


def test_without_nvidia_smi_a_process_model_is_measured_by_its_resident_memory(
        start_gateway: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", os.pathsep.join(
        d for d in os.environ["PATH"].split(os.pathsep) if not Path(d, "nvidia-smi").exists()))
    gateway = start_gateway(process_node(tmp_path, p1=0))
    assert httpx.post(gateway.url + "/v1/chat/completions", json=ask("p1"),
                      timeout=30).status_code == 200
    shown = model_status(gateway, "p1")
    assert shown["measured_gb"] is not None and 0.005 < shown["measured_gb"] < 2  # a Python
    status = httpx.get(gateway.url + "/status").json()
    assert status["nodes"]["gpu"]["free_gb"] is None  # no GPU to ask


# -- residency tiers: sleep ------------------------------------------------------------------------


def test_a_node_puts_models_to_sleep_while_its_host_memory_holds_them(
        start_gateway: Any, start_server: Any) -> None:
    from tests.emulators import openai_server as vllm_emulator

    servers = {name: start_server(vllm_emulator.create_app(
        [f"org/{name}"], sleep_mode=True, asleep=True, wake_delay=0.05, sleep_delay=0.01))
        for name in ("s1", "s2", "s3")}
    gateway = start_gateway({
        "batching": {"window_ms": 0, "min_residency_ms": 0},
        # One model on the GPU at a time; host RAM for one asleep (8 GB each).
        "nodes": {"gpu": {"mode": "single-active", "memory_budget_gb": 16,
                          "host_memory_gb": 8}},
        "backends": {name: {"kind": "vllm-sleep", "base_url": server.url, "node": "gpu"}
                     for name, server in servers.items()},
        "models": {name: {"backend": name, "served_name": f"org/{name}", "size_gb": 8}
                   for name in servers},
    })
    states = {name: emulator(server) for name, server in servers.items()}
    with httpx.Client(base_url=gateway.url, timeout=30) as http:
        for name in ("s1", "s2"):
            assert http.post("/v1/chat/completions", json=ask(name)).status_code == 200
        assert (states["s1"].sleeping, states["s1"].sleep_level) == (True, 1)  # asleep, kept
        assert http.post("/v1/chat/completions", json=ask("s3")).status_code == 200
        assert (states["s2"].sleeping, states["s2"].sleep_level) == (True, 2)  # host RAM full
        status = http.get("/status").json()
        node = status["nodes"]["gpu"]
        assert (node["asleep_models"], node["host_gb"], node["resident_models"]) == (
            ["s1"], 8, ["s3"])
        assert status["models"]["s1"]["asleep"] and not status["models"]["s2"]["asleep"]
        actions = [(d["action"], d["model"]) for d in reversed(status["decisions"])]
        assert ("sleep", "s1") in actions and ("unload", "s2") in actions
        # s1 wakes; its wake is timed on its own.
        assert http.post("/v1/chat/completions", json=ask("s1")).status_code == 200
        woke = http.get("/models/s1").json()
        assert woke["last_wake_seconds"] is not None and woke["status"] == "loaded"


# -- reloads -------------------------------------------------------------------------------------


def test_a_reload_changes_a_nodes_budget_while_its_model_stays_resident(
        tmp_path: Path, start_server: Any, node_a: Any, node_b: Any) -> None:
    import yaml

    from gateway.app import create_app
    from gateway.config.reader import load_config
    from gateway.config.reload import file_loader

    path = tmp_path / "gateway.yaml"
    config = two_nodes(node_a.url, node_b.url)
    path.write_text(yaml.safe_dump(config))
    gateway = start_server(create_app(load_config(path, env={}), loader=file_loader(str(path))))
    assert httpx.post(gateway.url + "/v1/chat/completions", json=ask("only-a"),
                      timeout=30).status_code == 200
    config["nodes"]["a"] = {"memory_budget_gb": 6, "max_concurrent_models": 1}
    path.write_text(yaml.safe_dump(config))
    assert httpx.post(gateway.url + "/admin/reload", timeout=30).status_code == 200
    node = httpx.get(gateway.url + "/status").json()["nodes"]["a"]
    assert (node["memory_budget_gb"], node["max_concurrent_models"]) == (6, 1)
    assert node["resident_models"] == ["only-a"]  # a reload never unloads what it keeps
