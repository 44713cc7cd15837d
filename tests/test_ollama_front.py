"""Ollama's own API in front, driven by the official `ollama` client: chat and generate (stream
and not), embed, list, ps, show, errors; against an emulated vLLM (put to sleep and woken) and an
emulated Ollama, single-active, so calls swap as they would on one GPU."""

from __future__ import annotations

import base64
import json
from typing import Any

import httpx
import ollama
import openai
import pytest

from tests.emulators import ollama as ollama_emulator
from tests.emulators import openai_server as vllm_emulator
from tests.servers import emulator

TOKENS = 6
HELLO = [{"role": "user", "content": "Say something about foxes."}]
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}
TEAM, TEAM_KEY, OPS_KEY = "team", "sk-team-1234", "sk-ops-5678"


@pytest.fixture
def vllm(start_server: Any) -> Any:
    return start_server(vllm_emulator.create_app(["org/m1"], tokens=TOKENS, sleep_mode=True,
                                                 asleep=True, wake_delay=0.01))


@pytest.fixture
def embedder(start_server: Any) -> Any:
    return start_server(vllm_emulator.create_app(["org/e1"], embedding=True))


@pytest.fixture
def ollama_backend(start_server: Any) -> Any:
    return start_server(ollama_emulator.create_app({"llama3:8b": 4.0}, load_delay=0.05,
                                                   tokens=TOKENS))


def config(vllm: Any, embedder: Any, ollama_backend: Any, **extra: Any) -> dict[str, Any]:
    return {
        "swapper": {"mode": "single-active", "model_swap_timeout": 30},
        "server": {"heartbeat_s": 0.05},
        "batching": {"window_ms": 0, "min_residency_ms": 0},
        "backends": {"vllm": {"kind": "vllm-sleep", "base_url": vllm.url},
                     "embed": {"kind": "openai", "base_url": embedder.url},
                     "ollama": {"kind": "ollama", "base_url": ollama_backend.url}},
        "models": {"m1": {"backend": "vllm", "served_name": "org/m1", "size_gb": 8,
                          "aliases": ["one"]},
                   "e1": {"backend": "embed", "served_name": "org/e1", "type": "embedding"},
                   "llama": {"path": "ollama:llama3:8b", "size_gb": 4, "num_ctx": 4096}},
        **extra,
    }


@pytest.fixture
def gateway(start_gateway: Any, vllm: Any, embedder: Any, ollama_backend: Any) -> Any:
    return start_gateway(config(vllm, embedder, ollama_backend))


def client(gateway: Any, key: str | None = None) -> ollama.Client:
    headers = {"authorization": f"Bearer {key}"} if key else None
    return ollama.Client(host=gateway.url, timeout=30, headers=headers)


def expected_text(served: str, messages: list[dict[str, Any]], **body: Any) -> str:
    return vllm_emulator.plan_chat(served, {"messages": messages, **body}, TOKENS).text


# -- chat --------------------------------------------------------------------------------------

def test_chat_answers_in_ollamas_shape(gateway: Any, vllm: Any) -> None:
    answer = client(gateway).chat(model="m1", messages=HELLO, stream=False)
    assert answer.model == "m1" and answer.done and answer.done_reason == "stop"
    assert answer.message.role == "assistant"
    assert answer.message.content == expected_text("org/m1", HELLO)
    assert answer.eval_count == TOKENS and answer.prompt_eval_count
    assert answer.total_duration and answer.total_duration > 0
    assert emulator(vllm).last_request["model"] == "org/m1"  # the backend's own name


def test_chat_streams_ndjson_pieces_then_the_counts(gateway: Any) -> None:
    pieces = list(client(gateway).chat(model="one", messages=HELLO, stream=True))
    assert [p.done for p in pieces] == [False] * (len(pieces) - 1) + [True]
    assert "".join(p.message.content or "" for p in pieces) == expected_text("org/m1", HELLO)
    last = pieces[-1]
    assert (last.model, last.done_reason, last.eval_count) == ("one", "stop", TOKENS)
    assert last.eval_duration is not None and last.total_duration >= last.eval_duration


def test_chat_with_an_ollama_backend_goes_by_its_openai_layer(gateway: Any,
                                                               ollama_backend: Any) -> None:
    answer = client(gateway).chat(model="llama", messages=HELLO, stream=False)
    assert answer.message.content and answer.done
    upstream = emulator(ollama_backend)
    assert upstream.last_request["model"] == "llama3:8b"
    assert "keep_alive" not in upstream.last_request  # the gateway's pin stays


def test_chat_with_tools_returns_the_call_with_its_arguments(gateway: Any, vllm: Any) -> None:
    answer = client(gateway).chat(model="m1", messages=HELLO, tools=[WEATHER], stream=False)
    (call,) = answer.message.tool_calls or []
    assert call.function.name == "get_weather" and set(call.function.arguments) == {"city"}
    streamed = list(client(gateway).chat(model="m1", messages=HELLO, tools=[WEATHER],
                                         stream=True))
    calls = [c for p in streamed for c in p.message.tool_calls or []]
    assert [c.function.arguments for c in calls] == [call.function.arguments]
    assert emulator(vllm).last_request["tools"] == [WEATHER]


def test_a_tool_result_goes_back_tied_to_its_call(gateway: Any, vllm: Any) -> None:
    first = client(gateway).chat(model="m1", messages=HELLO, tools=[WEATHER], stream=False)
    history = [*HELLO, first.message, {"role": "tool", "content": "sunny",
                                       "tool_name": "get_weather"}]
    answer = client(gateway).chat(model="m1", messages=history, tools=[WEATHER], stream=False)
    assert answer.message.content  # the model answers in text once it has the result
    sent = emulator(vllm).last_request["messages"]
    call_id = sent[1]["tool_calls"][0]["id"]
    assert sent[2] == {"role": "tool", "tool_call_id": call_id, "content": "sunny"}
    assert json.loads(sent[1]["tool_calls"][0]["function"]["arguments"]) == \
        first.message.tool_calls[0].function.arguments


def test_format_and_options_become_openai_fields(gateway: Any, vllm: Any) -> None:
    schema = {"type": "object", "properties": {"age": {"type": "integer"}}, "required": ["age"]}
    answer = client(gateway).chat(model="m1", messages=HELLO, format=schema, stream=False,
                                  options={"temperature": 0.2, "top_k": 5, "seed": 3,
                                           "num_ctx": 99999})
    assert isinstance(json.loads(answer.message.content or "")["age"], int)
    sent = emulator(vllm).last_request
    assert sent["response_format"] == {"type": "json_schema",
                                       "json_schema": {"name": "format", "schema": schema}}
    assert (sent["temperature"], sent["top_k"], sent["seed"]) == (0.2, 5, 3)
    assert "num_ctx" not in sent and "options" not in sent  # would reload the model


def test_num_predict_cuts_the_answer_short(gateway: Any) -> None:
    answer = client(gateway).chat(model="m1", messages=HELLO, stream=False,
                                  options={"num_predict": 2})
    assert answer.done_reason == "length" and answer.eval_count == 2


def test_images_go_as_image_parts(gateway: Any, vllm: Any) -> None:
    png = base64.b64encode(vllm_emulator.tiny_png(b"\x01\x02\x03", 2, 2)).decode()
    client(gateway).chat(model="m1", stream=False, messages=[
        {"role": "user", "content": "What is this?", "images": [png]}])
    (message,) = emulator(vllm).last_request["messages"]
    assert message["content"] == [
        {"type": "text", "text": "What is this?"},
        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{png}"}}]


def test_a_stream_that_waits_for_a_load_gets_empty_pieces_meanwhile(
        start_gateway: Any, vllm: Any, embedder: Any, start_server: Any) -> None:
    slow = start_server(ollama_emulator.create_app({"llama3:8b": 4.0}, load_delay=0.6))
    gateway = start_gateway(config(vllm, embedder, slow, server={
        "heartbeat_s": 0.05, "stream_hold_s": 0.05}))
    pieces = list(client(gateway).chat(model="llama", messages=HELLO, stream=True))
    waiting = [p for p in pieces if not p.done and not p.message.content]
    assert len(waiting) >= 3  # the client heard from the gateway while the model loaded
    assert "".join(p.message.content or "" for p in pieces) and pieces[-1].done


# -- generate ----------------------------------------------------------------------------------

def test_generate_is_a_chat_in_the_models_template(gateway: Any, vllm: Any) -> None:
    answer = client(gateway).generate(model="m1", prompt="Why is the sky blue?",
                                      system="Be brief.", stream=False)
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Why is the sky blue?"}]
    assert answer.response == expected_text("org/m1", messages)
    assert emulator(vllm).last_request["messages"] == messages
    streamed = list(client(gateway).generate(model="m1", prompt="Why is the sky blue?",
                                             system="Be brief.", stream=True))
    assert "".join(p.response for p in streamed) == answer.response
    assert streamed[-1].done and streamed[-1].eval_count == TOKENS


def test_raw_generate_is_a_completion(gateway: Any, vllm: Any) -> None:
    answer = client(gateway).generate(model="m1", prompt="[INST] hi [/INST]", raw=True,
                                      stream=False)
    assert answer.response == vllm_emulator.plan_text("org/m1", "[INST] hi [/INST]",
                                                      tokens=TOKENS).text
    assert emulator(vllm).paths["/v1/completions"] == 1


def test_generate_without_a_prompt_loads_the_model(gateway: Any, vllm: Any) -> None:
    answer = client(gateway).generate(model="m1")
    assert answer.done and answer.done_reason == "load"
    assert not emulator(vllm).sleeping
    running = [m.model for m in client(gateway).ps().models]
    assert "m1" in running and "llama" not in running  # (e1's server is always on)


def test_unloading_by_keep_alive_names_the_route_to_use(gateway: Any) -> None:
    with pytest.raises(ollama.ResponseError) as refused:
        client(gateway).generate(model="m1", keep_alive=0)
    assert refused.value.status_code == 501
    assert "POST /models/m1/unload" in refused.value.error


# -- embeddings --------------------------------------------------------------------------------

def test_embed_returns_one_vector_per_input(gateway: Any) -> None:
    answer = client(gateway).embed(model="e1", input=["a fox", "a dog"])
    assert answer.model == "e1"
    assert [list(v) for v in answer.embeddings] == [
        vllm_emulator.embedding_vector("org/e1", text) for text in ("a fox", "a dog")]
    legacy = client(gateway).embeddings(model="e1", prompt="a fox")
    assert list(legacy.embedding) == vllm_emulator.embedding_vector("org/e1", "a fox")


# -- models ------------------------------------------------------------------------------------

def test_list_shows_every_model(gateway: Any) -> None:
    models = {m.model: m for m in client(gateway).list().models}
    assert set(models) == {"m1", "e1", "llama"}
    assert models["llama"].size == 4_000_000_000


def test_ps_shows_the_resident_models_with_their_sizes(gateway: Any) -> None:
    client(gateway).chat(model="llama", messages=HELLO, stream=False)
    running = {m.model: m for m in client(gateway).ps().models}
    assert "llama" in running and "m1" not in running  # single-active
    assert running["llama"].size == running["llama"].size_vram == 4_000_000_000
    assert running["llama"].context_length == 4096
    client(gateway).chat(model="m1", messages=HELLO, stream=False)
    running = {m.model for m in client(gateway).ps().models}
    assert "m1" in running and "llama" not in running  # swapped


def test_show_describes_a_model(gateway: Any) -> None:
    shown = client(gateway).show("llama")
    assert shown.capabilities == ["completion"]
    assert shown.modelinfo is not None and shown.modelinfo["swapper.backend_kind"] == "ollama"
    assert shown.parameters == "num_ctx 4096"
    assert client(gateway).show("e1").capabilities == ["embedding"]


def test_version(gateway: Any) -> None:
    version = httpx.get(gateway.url + "/api/version").json()["version"]
    assert tuple(int(part) for part in version.split(".")) >= (0, 5, 0)


def test_a_key_sees_only_its_models(start_gateway: Any, vllm: Any, embedder: Any,
                                    ollama_backend: Any) -> None:
    gateway = start_gateway(config(vllm, embedder, ollama_backend, auth={"keys": [
        {"name": TEAM, "key": TEAM_KEY, "models": ["llama"]},
        {"name": "ops", "key": OPS_KEY, "admin": True}]}))
    team = client(gateway, TEAM_KEY)
    assert [m.model for m in team.list().models] == ["llama"]
    with pytest.raises(ollama.ResponseError) as hidden:
        team.chat(model="m1", messages=HELLO, stream=False)
    assert hidden.value.status_code == 404
    with pytest.raises(ollama.ResponseError) as anonymous:
        client(gateway).list()
    assert anonymous.value.status_code == 401
    assert "API key" in anonymous.value.error  # a message, in Ollama's shape


# -- errors ------------------------------------------------------------------------------------

def test_an_unknown_model_is_404_in_ollamas_shape(gateway: Any) -> None:
    with pytest.raises(ollama.ResponseError) as missing:
        client(gateway).chat(model="ghost", messages=HELLO, stream=False)
    assert missing.value.status_code == 404
    assert missing.value.error == "The model 'ghost' does not exist or you do not have " \
                                  "access to it."
    with pytest.raises(ollama.ResponseError) as streamed:
        list(client(gateway).chat(model="ghost", messages=HELLO, stream=True))
    assert streamed.value.status_code == 404


def test_bad_input_is_400_in_ollamas_shape(gateway: Any) -> None:
    with pytest.raises(ollama.ResponseError) as bad:
        client(gateway).chat(model="m1", messages=HELLO, stream=False,
                             options={"temperature": 7})
    assert bad.value.status_code == 400 and "temperature" in bad.value.error
    answer = httpx.post(gateway.url + "/api/chat", content=b"{not json")
    assert answer.status_code == 400 and isinstance(answer.json()["error"], str)


@pytest.mark.parametrize("call", ["pull", "push", "create", "delete", "copy"])
def test_model_management_names_the_gateways_way(gateway: Any, call: str) -> None:
    ollama_client = client(gateway)
    calls = {"pull": lambda: ollama_client.pull("m1", stream=False),
             "push": lambda: ollama_client.push("m1", stream=False),
             "create": lambda: ollama_client.create("x", from_="m1", stream=False),
             "delete": lambda: ollama_client.delete("m1"),
             "copy": lambda: ollama_client.copy("m1", "m2")}
    with pytest.raises(ollama.ResponseError) as refused:
        calls[call]()
    assert refused.value.status_code == 501
    assert "gateway" in refused.value.error and "/" in refused.value.error


def test_an_unknown_api_route_is_404_in_ollamas_shape(gateway: Any) -> None:
    answer = httpx.post(gateway.url + "/api/nothing", json={})
    assert answer.status_code == 404 and "Unknown endpoint" in answer.json()["error"]


# -- the same gateway for every front ----------------------------------------------------------

def test_one_cache_for_every_front(gateway: Any, vllm: Any) -> None:
    openai_client = openai.OpenAI(base_url=gateway.url + "/v1", api_key="x", max_retries=0)
    first = openai_client.chat.completions.create(model="m1", messages=HELLO, temperature=0)
    answer = httpx.post(gateway.url + "/api/chat", timeout=30, json={
        "model": "m1", "messages": HELLO, "stream": False, "options": {"temperature": 0}})
    assert answer.headers["x-cache"] == "HIT"  # the OpenAI call's answer, in Ollama's shape
    assert answer.json()["message"]["content"] == first.choices[0].message.content
    streamed = httpx.post(gateway.url + "/api/chat", timeout=30, json={
        "model": "m1", "messages": HELLO, "options": {"temperature": 0}})
    assert streamed.headers["x-cache"] == "HIT"
    lines = [json.loads(line) for line in streamed.text.splitlines()]
    assert "".join(line["message"]["content"] for line in lines) == \
        first.choices[0].message.content
    assert emulator(vllm).requests["org/m1"] == 1
