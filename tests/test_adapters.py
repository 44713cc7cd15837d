"""LoRA adapters as cheap models: `adapter_of: BASE` served by the base's vLLM.

The base runs as a real `process` backend (the vLLM-like emulator with its runtime LoRA API, one
process per model, as the gateway runs vLLM); clients are the official `openai` SDK and plain
HTTP through the gateway's socket. Config rules first, then what a user notices: an adapter's
first call loads its base and registers the adapter; switching between adapters of a resident
base loads nothing; a base is not evicted while an adapter's call runs; a bad adapter is a clear
error that leaves the base serving.
"""

from __future__ import annotations

import json
import shlex
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from openai import OpenAI

from gateway.config.reader import parse_config
from gateway.config.schema import ConfigError
from tests.servers import wait_until

EMULATOR = [sys.executable, "-m", "tests.emulators.openai_server", "--port", "{port}",
            "--model", "{served_name}", "--lora"]


def adapter_dir(root: Path, name: str) -> str:
    """A folder vLLM accepts as a PEFT adapter (the emulator checks its adapter_config.json)."""
    folder = root / name
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"]}))
    return str(folder)


def lora_config(tmp_path: Path, *, other: bool = False, **extra: Any) -> dict[str, Any]:
    """A single-active node (the old swapper's default) whose vLLM process serves `base` and
    its adapters `sql` and `chat`; with `other`, a second base model that must evict `base`."""
    models: dict[str, Any] = {
        "base": {"backend": "vllm", "served_name": "qwen3-8b", "size_gb": 6},
        "sql": {"adapter_of": "base", "adapter_path": adapter_dir(tmp_path, "sql")},
        "chat": {"adapter_of": "base", "adapter_path": adapter_dir(tmp_path, "chat"),
                 "served_name": "chat-lora"},
    }
    if other:
        models["other"] = {"backend": "vllm", "served_name": "qwen3-4b", "size_gb": 6}
    return {
        "swapper": {"memory_budget_gb": 8, "model_swap_timeout": 30},
        "batching": {"window_ms": 0, "min_residency_ms": 0},
        "backends": {"vllm": {"kind": "process", "cmd": shlex.join(EMULATOR),
                              "start_timeout": 30}},
        "models": models,
    } | extra


def client(gateway: Any) -> OpenAI:
    return OpenAI(base_url=f"{gateway.url}/v1", api_key="unused", max_retries=0, timeout=30)


def hello(gateway: Any, model: str, **options: Any) -> Any:
    return client(gateway).chat.completions.create(
        model=model, messages=[{"role": "user", "content": "hello"}], **options)


def status(gateway: Any) -> dict[str, Any]:
    return httpx.get(f"{gateway.url}/status", timeout=10).json()["models"]


def loads(gateway: Any) -> list[str]:
    """The models loaded, oldest first (the decision log lists the newest first)."""
    decisions = httpx.get(f"{gateway.url}/status", timeout=10).json()["decisions"]
    return [d["model"] for d in reversed(decisions) if d["action"] == "load"]


def vllm_models(gateway: Any) -> dict[str, Any]:
    """What the base's vLLM process itself lists: its model and the adapters registered on it."""
    server = status(gateway)["base"]["server"]
    answer = httpx.get(f"http://127.0.0.1:{server['port']}/v1/models", timeout=10).json()
    return {card["id"]: card for card in answer["data"]}


# -- config ----------------------------------------------------------------------------------


def test_an_adapter_takes_its_backend_from_its_base(tmp_path: Path) -> None:
    config = parse_config(lora_config(tmp_path), source="t", env={})
    sql, chat = config.models["sql"], config.models["chat"]
    assert (sql.backend, sql.adapter_of, sql.served_name) == ("vllm", "base", "sql")
    assert chat.served_name == "chat-lora"
    assert sql.adapter_path == str(tmp_path / "sql")


@pytest.mark.parametrize(("change", "says"), [
    ({"adapter_of": "nope"}, "unknown base model 'nope'"),
    ({"adapter_of": "base", "size_gb": 1}, "takes its size_gb from its base model 'base'"),
    ({"adapter_of": "base", "backend": "vllm"}, "takes its backend from its base"),
])
def test_a_wrong_adapter_is_refused_naming_its_key(tmp_path: Path, change: dict[str, Any],
                                                   says: str) -> None:
    config = lora_config(tmp_path)
    config["models"]["bad"] = change
    with pytest.raises(ConfigError, match=r"models\.bad") as refused:
        parse_config(config, source="t", env={})
    assert says in str(refused.value)


def test_an_adapter_of_an_ollama_model_is_refused() -> None:
    config = {"backends": {"ollama": {"kind": "ollama", "base_url": "http://127.0.0.1:9"}},
              "models": {"qwen": {"backend": "ollama", "served_name": "qwen3:8b"},
                         "sql": {"adapter_of": "qwen", "adapter_path": "/adapters/sql"}}}
    with pytest.raises(ConfigError, match="LoRA adapters need vLLM"):
        parse_config(config, source="t", env={})


# -- serving ---------------------------------------------------------------------------------


def test_an_adapter_loads_its_base_then_registers_itself(start_gateway: Any,
                                                         tmp_path: Path) -> None:
    gateway = start_gateway(lora_config(tmp_path))

    reply = hello(gateway, "chat", max_tokens=4)

    assert reply.model == "chat"  # the client's name, not vLLM's `chat-lora`
    cards = vllm_models(gateway)
    assert cards["chat-lora"]["parent"] == "qwen3-8b"
    assert cards["chat-lora"]["root"] == str(tmp_path / "chat")
    shown = status(gateway)
    assert shown["base"]["state"] == "loaded" and shown["chat"]["state"] == "loaded"
    assert shown["chat"]["adapter_of"] == "base"
    assert shown["sql"]["state"] == "unloaded"  # registered on its first call only
    base_reply = hello(gateway, "base", max_tokens=4)
    assert base_reply.choices[0].message.content != reply.choices[0].message.content


def test_switching_between_adapters_of_a_resident_base_loads_nothing(
        start_gateway: Any, tmp_path: Path) -> None:
    gateway = start_gateway(lora_config(tmp_path))
    hello(gateway, "base", max_tokens=2)
    pid = status(gateway)["base"]["server"]["pid"]

    names = ["sql", "chat", "base"] * 6
    with ThreadPoolExecutor(6) as pool:
        replies = list(pool.map(lambda name: hello(gateway, name, max_tokens=2), names))

    assert [reply.model for reply in replies] == names
    assert loads(gateway) == ["base"]  # one base load for all of them, no swap
    assert status(gateway)["base"]["server"]["pid"] == pid
    assert set(vllm_models(gateway)) == {"qwen3-8b", "sql", "chat-lora"}
    counts = {name: httpx.get(f"{gateway.url}/models/{name}", timeout=10).json()["request_count"]
              for name in ("sql", "chat")}
    assert counts == {"sql": 6, "chat": 6}  # each adapter's own calls, on its own row


def test_a_base_is_not_evicted_while_an_adapter_streams(start_gateway: Any,
                                                        tmp_path: Path) -> None:
    # A 3 s stream; evicting the base would stop its process and cut the stream short.
    config = lora_config(tmp_path, other=True)
    config["backends"]["vllm"]["cmd"] = shlex.join(
        [*EMULATOR, "--tokens", "60", "--token-delay", "0.05"])
    gateway = start_gateway(config)
    stream = iter(hello(gateway, "sql", stream=True))
    first = next(stream)  # the adapter's stream is running on the base
    other = ThreadPoolExecutor(1).submit(hello, gateway, "other", max_tokens=2)
    wait_until(lambda: status(gateway)["other"]["queue_depth"] == 1, message="other queued")

    chunks = [first, *stream]

    assert sum(1 for chunk in chunks if chunk.choices and chunk.choices[0].delta.content) == 60
    assert chunks[-1].choices[0].finish_reason == "stop"  # whole: the base stayed for it
    assert other.result(timeout=30).model == "other"
    assert loads(gateway) == ["base", "other"]
    assert status(gateway)["sql"]["state"] == "unloaded"  # gone with its base


def test_an_adapter_vllm_cannot_read_is_a_clear_error_and_the_base_serves_on(
        start_gateway: Any, tmp_path: Path) -> None:
    config = lora_config(tmp_path)
    config["models"]["broken"] = {"adapter_of": "base", "adapter_path": str(tmp_path / "none")}
    gateway = start_gateway(config)

    answer = httpx.post(f"{gateway.url}/v1/chat/completions", timeout=30, json={
        "model": "broken", "messages": [{"role": "user", "content": "hi"}]})

    assert answer.status_code == 503
    error = answer.json()["error"]
    assert error["code"] == "model_load_failed" and "No adapter found" in error["message"]
    assert answer.headers["x-should-retry"] == "false"  # a missing folder stays missing
    assert "127.0.0.1" not in answer.text and "Traceback" not in answer.text
    again = httpx.post(f"{gateway.url}/v1/chat/completions", timeout=30, json={
        "model": "broken", "messages": [{"role": "user", "content": "hi"}]})
    assert again.status_code == 503  # refused at once while it backs off
    assert hello(gateway, "base", max_tokens=2).model == "base"
    shown = status(gateway)
    assert shown["base"]["in_flight"] == 0 and shown["broken"]["state"] == "failed"


def test_an_admin_unload_drops_the_adapter_and_keeps_its_base(start_gateway: Any,
                                                              tmp_path: Path) -> None:
    gateway = start_gateway(lora_config(tmp_path))
    hello(gateway, "sql", max_tokens=2)
    assert "sql" in vllm_models(gateway)

    httpx.post(f"{gateway.url}/models/sql/unload", timeout=30).raise_for_status()

    assert "sql" not in vllm_models(gateway)
    shown = status(gateway)
    assert shown["sql"]["state"] == "unloaded" and shown["base"]["state"] == "loaded"
    assert hello(gateway, "sql", max_tokens=2).model == "sql"  # registered again on demand
    assert loads(gateway) == ["base"]


def test_a_client_gone_while_its_adapter_registers_leaves_nothing_held(
        start_gateway: Any, tmp_path: Path) -> None:
    gateway = start_gateway(lora_config(tmp_path))
    hello(gateway, "base", max_tokens=2)
    gone = threading.Event()

    def hang_up() -> None:
        with httpx.Client(timeout=0.001) as quick:
            try:
                quick.post(f"{gateway.url}/v1/chat/completions", json={
                    "model": "sql", "messages": [{"role": "user", "content": "hi"}]})
            except httpx.TimeoutException:
                gone.set()

    hang_up()
    assert gone.is_set()
    wait_until(lambda: status(gateway)["base"]["in_flight"] == 0, message="the lease back")
    assert hello(gateway, "sql", max_tokens=2).model == "sql"
    wait_until(lambda: status(gateway)["sql"]["in_flight"] == 0, message="adapter idle")


def test_an_admin_load_of_an_adapter_loads_its_base_and_registers_it(
        start_gateway: Any, tmp_path: Path) -> None:
    gateway = start_gateway(lora_config(tmp_path))

    httpx.post(f"{gateway.url}/models/chat/load", timeout=30).raise_for_status()

    shown = status(gateway)
    assert shown["base"]["state"] == "loaded" and shown["chat"]["state"] == "loaded"
    assert "chat-lora" in vllm_models(gateway)
    assert httpx.get(f"{gateway.url}/models/chat", timeout=10).json()["request_count"] == 0


def test_a_vllm_without_the_runtime_lora_api_is_named_as_the_cause(
        start_gateway: Any, tmp_path: Path) -> None:
    config = lora_config(tmp_path)
    config["backends"]["vllm"]["cmd"] = shlex.join(EMULATOR[:-1])  # started without --lora

    gateway = start_gateway(config)

    answer = httpx.post(f"{gateway.url}/v1/chat/completions", timeout=30,
                        json={"model": "sql", "messages": [{"role": "user", "content": "hi"}]})

    assert answer.status_code == 503 and answer.headers["x-should-retry"] == "false"
    message = answer.json()["error"]["message"]
    assert "--enable-lora" in message and "VLLM_ALLOW_RUNTIME_LORA_UPDATING" in message
