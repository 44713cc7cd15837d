"""Real llama.cpp servers behind the gateway, driven by the official `openai` client: swaps,
streaming with usage, a killed model process, embeddings, and the llama-router driver."""

from __future__ import annotations

import os
import signal
from collections import Counter
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from openai import OpenAI
from openai.types import CompletionUsage

from gateway.config.schema import BackendConfig, ModelConfig
from gateway.relay.upstream import Upstreams
from gateway.residency.drivers.base import DriverError
from gateway.residency.drivers.llama_router import LlamaRouterDriver
from tests.e2e.conftest import CHAT_A, CHAT_B, EMBED, NO_WINDOW, Router, gateway_config
from tests.servers import ServerThread, wait_until

pytestmark = pytest.mark.e2e

StartGateway = Callable[[dict[str, Any]], ServerThread]
MAX_TOKENS = 16
HELLO = [{"role": "user", "content": "hello, who are you?"}]


@pytest.fixture
def gateway_over(start_gateway: StartGateway, llama_server: Path,
                 tiny_models: dict[str, Path]) -> Callable[..., ServerThread]:
    """A gateway serving the named tiny models, each in its own `llama-server` process."""

    def start(*names: str) -> ServerThread:
        return start_gateway(gateway_config(llama_server, tiny_models, *names))

    return start


def client_for(gateway: ServerThread) -> OpenAI:
    return OpenAI(base_url=f"{gateway.url}/v1", api_key="unused", max_retries=0, timeout=60)


def stream_chat(client: OpenAI, model: str) -> tuple[str, CompletionUsage | None]:
    stream = client.chat.completions.create(
        model=model, messages=HELLO, max_tokens=MAX_TOKENS, stream=True,
        stream_options={"include_usage": True},
    )
    text, usage = [], None
    for chunk in stream:
        assert chunk.model == model
        if chunk.choices:
            text.append(chunk.choices[0].delta.content or "")  # the first delta has None
        usage = chunk.usage or usage
    return "".join(text), usage


def gateway_models(gateway: ServerThread) -> dict[str, dict[str, Any]]:
    answer = httpx.get(f"{gateway.url}/models", timeout=10).json()
    return {model["name"]: model for model in answer["models"]}


def pids_running(path: Path) -> list[int]:
    """Processes whose command line names `path`: the model's `llama-server`."""
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:  # not a process, or it ended meanwhile
            continue
        if os.fsencode(path) in argv:
            pids.append(int(entry.name))
    return pids


def test_two_models_streamed_alternately_swap_every_time(
        gateway_over: Callable[..., ServerThread]) -> None:
    gateway = gateway_over(CHAT_A, CHAT_B)
    client = client_for(gateway)

    for model in [CHAT_A, CHAT_B] * 2:
        text, usage = stream_chat(client, model)
        # Special tokens are never sampled: printable text, and always max_tokens of it.
        assert text.strip() and text.isprintable()
        assert usage is not None
        assert usage.completion_tokens == MAX_TOKENS and usage.prompt_tokens > 0

    models = gateway_models(gateway)
    assert models[CHAT_A]["load_count"] == models[CHAT_B]["load_count"] == 2
    assert (models[CHAT_A]["status"], models[CHAT_B]["status"]) == ("unloaded", "loaded")
    decisions = httpx.get(f"{gateway.url}/status", timeout=10).json()["decisions"]
    actions = Counter((d["action"], d["model"]) for d in decisions)
    assert actions == {("load", CHAT_A): 2, ("load", CHAT_B): 2,
                       ("unload", CHAT_A): 2, ("unload", CHAT_B): 1}


def test_killed_model_process_is_restarted_by_the_next_request(
        gateway_over: Callable[..., ServerThread], tiny_models: dict[str, Path]) -> None:
    gateway = gateway_over(CHAT_A)
    client = client_for(gateway)
    client.chat.completions.create(model=CHAT_A, messages=HELLO, max_tokens=4)
    [pid] = pids_running(tiny_models[CHAT_A])

    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: gateway_models(gateway)[CHAT_A]["state"] == "failed",
               message="the gateway to notice the crash")
    reply = client.chat.completions.create(model=CHAT_A, messages=HELLO, max_tokens=MAX_TOKENS)

    assert reply.choices[0].message.content
    assert reply.usage is not None and reply.usage.completion_tokens == MAX_TOKENS
    assert gateway_models(gateway)[CHAT_A]["load_count"] == 2
    [restarted] = pids_running(tiny_models[CHAT_A])
    assert restarted != pid


def test_embeddings_from_a_model_started_with_embedding(
        gateway_over: Callable[..., ServerThread]) -> None:
    client = client_for(gateway_over(EMBED))

    result = client.embeddings.create(model=EMBED, input=["hello world", "swap me in"])

    assert [len(item.embedding) for item in result.data] == [64, 64]
    assert result.data[0].embedding != result.data[1].embedding
    assert result.usage.prompt_tokens > 0


def model(name: str) -> ModelConfig:
    return ModelConfig(name=name, backend="router", served_name=name)


@pytest.fixture
async def router_driver(llama_router: Router) -> AsyncIterator[LlamaRouterDriver]:
    backend = BackendConfig(name="router", kind="llama-router", base_url=llama_router.url,
                            start_timeout=30, stop_grace=5)
    models = [model(name) for name in (CHAT_A, CHAT_B, "broken")]
    upstreams = Upstreams({"router": backend})
    driver = LlamaRouterDriver(backend, models, upstreams)
    yield driver
    await driver.close()
    await upstreams.close()


async def test_llama_router_driver_loads_and_unloads_through_models_endpoints(
        router_driver: LlamaRouterDriver) -> None:
    driver = router_driver
    assert await driver.health()
    assert await driver.resident() == set()

    await driver.load(model(CHAT_A))
    await driver.load(model(CHAT_A))  # already loaded: nothing to do
    await driver.load(model(CHAT_B))
    assert await driver.resident() == {CHAT_A, CHAT_B}
    await driver.unload(model(CHAT_A))
    await driver.unload(model(CHAT_A))  # already unloaded: nothing to do
    assert await driver.resident() == {CHAT_B}

    with pytest.raises(DriverError, match="could not load broken"):
        await driver.load(model("broken"))
    with pytest.raises(DriverError, match="has no model 'missing'"):
        await driver.load(model("missing"))


def test_gateway_swaps_models_through_the_llama_router(
        start_gateway: StartGateway, llama_router: Router) -> None:
    gateway = start_gateway({
        "swapper": {"mode": "single-active"}, "batching": NO_WINDOW,
        "backends": {"router": {"kind": "llama-router", "base_url": llama_router.url}},
        "models": {name: {"backend": "router"} for name in (CHAT_A, CHAT_B)},
    })
    client = client_for(gateway)

    for active, other in [(CHAT_A, CHAT_B), (CHAT_B, CHAT_A), (CHAT_A, CHAT_B)]:
        _, usage = stream_chat(client, active)
        assert usage is not None and usage.completion_tokens == MAX_TOKENS
        assert llama_router.statuses()[active] == "loaded"
        assert llama_router.statuses()[other] == "unloaded"
    assert gateway_models(gateway)[CHAT_A]["load_count"] == 2
