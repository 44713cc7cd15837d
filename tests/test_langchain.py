"""LangChain's OpenAI chat model and embeddings, pointed at the gateway by `base_url` alone, as
an agent built on LangChain would be: answers, streams, tool calls and swaps between models."""

from __future__ import annotations

from typing import Any

import pytest
from langchain_core.messages import HumanMessage
from langchain_core.tools import tool
from langchain_openai import ChatOpenAI, OpenAIEmbeddings

from tests.emulators import ollama as ollama_emulator


@tool
def weather(city: str) -> str:
    """The weather in a city."""
    return f"sunny in {city}"


@pytest.fixture
def gateway(start_gateway: Any, start_server: Any) -> Any:
    ollama = start_server(ollama_emulator.create_app(
        {"chat-a:7b": 4.0, "chat-b:7b": 4.0, "embed:1b": 1.0}, load_delay=0.02))
    return start_gateway({
        "swapper": {"mode": "single-active"},
        "batching": {"window_ms": 0, "min_residency_ms": 0},
        "backends": {"ollama": {"kind": "ollama", "base_url": ollama.url}},
        "models": {"chat-a": {"path": "ollama:chat-a:7b"}, "chat-b": {"path": "ollama:chat-b:7b"},
                   "embed": {"path": "ollama:embed:1b", "type": "embedding"}},
    })


def chat(gateway: Any, model: str) -> ChatOpenAI:
    return ChatOpenAI(model=model, base_url=gateway.url + "/v1", api_key="unused",
                      max_retries=0, stream_usage=True)


def test_invoke_and_stream_swap_between_models(gateway: Any) -> None:
    first = chat(gateway, "chat-a").invoke([HumanMessage("hello")])
    assert first.content and first.response_metadata["model_name"] == "chat-a"
    chunks = list(chat(gateway, "chat-b").stream([HumanMessage("hello again")]))
    text = "".join(str(chunk.content) for chunk in chunks)
    assert text
    usage = [c.usage_metadata for c in chunks if c.usage_metadata]
    assert usage and usage[-1]["output_tokens"] > 0  # asked for by stream_usage, relayed
    slots = gateway.app.state.services.scheduler.slots
    assert slots["chat-b"].residency.state.value == "loaded"
    assert slots["chat-a"].residency.state.value == "unloaded"  # single-active: swapped out


def test_a_bound_tool_comes_back_as_a_tool_call(gateway: Any) -> None:
    model = chat(gateway, "chat-a").bind_tools([weather])
    answer = model.invoke([HumanMessage("What is the weather in Paris? Use the tool.")])
    assert answer.tool_calls and answer.tool_calls[0]["name"] == "weather"
    assert "city" in answer.tool_calls[0]["args"]


def test_embeddings(gateway: Any) -> None:
    embeddings = OpenAIEmbeddings(model="embed", base_url=gateway.url + "/v1", api_key="unused",
                                  check_embedding_ctx_length=False, max_retries=0)
    vectors = embeddings.embed_documents(["one", "two"])
    assert len(vectors) == 2 and len(vectors[0]) > 0 and vectors[0] != vectors[1]
