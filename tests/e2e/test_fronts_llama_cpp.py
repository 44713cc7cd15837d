"""Every front against real llama.cpp servers: the official `ollama` client (chat, generate,
embed, list, ps, show, errors), the `anthropic` client (translated to chat completions, and
passed through to llama-server's own /v1/messages), and rerank by a model served with
`llama-server --reranking`. Tiny random-weight models, swapped single-active."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import anthropic
import httpx
import ollama
import pytest

from gateway.demo import process_cmd
from tests.e2e.conftest import CHAT_A, CHAT_B, EMBED, START_TIMEOUT_S, gateway_config
from tests.e2e.tiny_reranker import write_tiny_reranker
from tests.servers import ServerThread

pytestmark = pytest.mark.e2e

PREDICT = 8
HELLO = [{"role": "user", "content": "hello, who are you?"}]
MESSAGES = ["chat/completions", "completions", "embeddings", "messages",
            "messages/count_tokens"]


@pytest.fixture
def gateway(start_gateway: Any, llama_server: Path, tiny_models: dict[str, Path]) -> ServerThread:
    """chat-a on a llama-server whose own Messages API the gateway uses; chat-b on one it
    translates for; the embedding model on its own."""
    config = gateway_config(llama_server, tiny_models, CHAT_A, CHAT_B, EMBED)
    llama = config["backends"]["llama"]
    config["backends"]["llama-messages"] = {**llama, "endpoints": MESSAGES}
    config["models"][CHAT_A]["backend"] = "llama-messages"
    return start_gateway(config)


def ollama_client(gateway: ServerThread) -> ollama.Client:
    return ollama.Client(host=gateway.url, timeout=60)


def anthropic_client(gateway: ServerThread) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=gateway.url, api_key="unused", max_retries=0,
                               timeout=60)


def resident(gateway: ServerThread) -> set[str]:
    return {model.model or "" for model in ollama_client(gateway).ps().models}


def test_the_ollama_client_chats_generates_and_embeds(gateway: ServerThread) -> None:
    client = ollama_client(gateway)
    answer = client.chat(model=CHAT_B, messages=HELLO, options={"num_predict": PREDICT})
    # The tiny models never stop early: every answer runs to num_predict.
    assert answer.message.content and answer.done_reason == "length"
    assert answer.eval_count == PREDICT and answer.prompt_eval_count
    pieces = list(client.chat(model=CHAT_B, messages=HELLO, stream=True,
                              options={"num_predict": PREDICT}))
    assert "".join(p.message.content or "" for p in pieces).strip()
    assert pieces[-1].done and pieces[-1].eval_count == PREDICT
    assert pieces[-1].eval_duration and pieces[-1].total_duration >= pieces[-1].eval_duration

    generated = list(client.generate(model=CHAT_A, prompt="Once upon a time", stream=True,
                                     options={"num_predict": PREDICT}))
    assert "".join(p.response for p in generated).strip() and generated[-1].done
    assert resident(gateway) == {CHAT_A}  # single-active: chat-b was swapped out

    embedded = client.embed(model=EMBED, input=["hello world", "swap me in"])
    assert [len(vector) for vector in embedded.embeddings] == [64, 64]
    assert embedded.embeddings[0] != embedded.embeddings[1]


def test_the_ollama_client_lists_shows_and_hears_errors(gateway: ServerThread) -> None:
    client = ollama_client(gateway)
    assert {model.model for model in client.list().models} == {CHAT_A, CHAT_B, EMBED}
    assert client.show(EMBED).capabilities == ["embedding"]
    client.chat(model=CHAT_B, messages=HELLO, options={"num_predict": 1})
    running = {model.model: model for model in client.ps().models}
    assert set(running) == {CHAT_B} and (running[CHAT_B].size or 0) > 0
    with pytest.raises(ollama.ResponseError) as missing:
        client.chat(model="llama3.3:70b", messages=HELLO)
    assert missing.value.status_code == 404
    with pytest.raises(ollama.ResponseError) as pull:
        client.pull("llama3.3:70b")
    assert pull.value.status_code == 501 and "/admin/reload" in pull.value.error


@pytest.mark.parametrize("model", [CHAT_A, CHAT_B], ids=["passed-through", "translated"])
def test_the_anthropic_client_stream_and_not(gateway: ServerThread, model: str) -> None:
    client = anthropic_client(gateway)
    message = client.messages.create(model=model, max_tokens=PREDICT, messages=HELLO)
    assert message.model == model and message.stop_reason == "max_tokens"
    assert message.content[0].type == "text" and message.content[0].text
    assert message.usage.output_tokens == PREDICT
    with client.messages.stream(model=model, max_tokens=PREDICT, messages=HELLO) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text.strip() and final.stop_reason == "max_tokens"
    assert final.usage.output_tokens == PREDICT


def test_count_tokens_by_llama_servers_own_messages_api(gateway: ServerThread) -> None:
    counted = anthropic_client(gateway).messages.count_tokens(model=CHAT_A, messages=HELLO)
    assert counted.input_tokens > 0


def reranking_supported(binary: Path) -> bool:
    help_text = subprocess.run([str(binary), "--help"], capture_output=True, text=True,
                               timeout=30).stdout
    return "--reranking" in help_text


def test_rerank_by_llama_server_with_reranking(start_gateway: Any, llama_server: Path,
                                                tiny_models: dict[str, Path],
                                                tmp_path: Path) -> None:
    if not reranking_supported(llama_server):
        pytest.skip("this llama-server build has no --reranking")
    reranker = write_tiny_reranker(tmp_path / "rerank.gguf")
    config = gateway_config(llama_server, tiny_models, CHAT_A)
    config["backends"]["llama-rerank"] = {
        "kind": "process", "start_timeout": START_TIMEOUT_S, "stop_grace": 5,
        "cmd": process_cmd(llama_server, extra_args="--reranking"), "endpoints": ["rerank"]}
    config["models"]["rerank"] = {"backend": "llama-rerank", "path": str(reranker),
                                  "size_gb": 0.001}
    gateway = start_gateway(config)
    ollama_client(gateway).chat(model=CHAT_A, messages=HELLO, options={"num_predict": 1})
    documents = ["the quick brown fox", "a lazy dog", "cats purr"]
    answer = httpx.post(gateway.url + "/v1/rerank", timeout=60, json={
        "model": "rerank", "query": "fox", "documents": documents})
    assert answer.status_code == 200, answer.text
    results = answer.json()["results"]
    assert sorted(r["index"] for r in results) == [0, 1, 2]
    assert all(isinstance(r["relevance_score"], float) for r in results)
    assert resident(gateway) == {"rerank"}  # swapped in for the chat model
