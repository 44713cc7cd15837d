"""Embedding micro-batches: merged upstream, split back exactly, failures kept to their owner."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.calls.embedding_batch import apportion
from tests.emulators import openai_server as vllm_emulator
from tests.servers import emulator, wait_until

INPUTS: list[Any] = ["alpha", ["bravo", "charlie"], "delta echo", ["foxtrot"], "golf", "hotel"]


@pytest.fixture
def embedder(start_server: Any) -> Any:
    return start_server(vllm_emulator.create_app(["org/embed"], embedding=True))


@pytest.fixture
def gateway(start_gateway: Any, embedder: Any) -> Any:
    return start_gateway({
        "batching": {"embeddings_window_ms": 100},
        "cache": {"enabled": False},
        "backends": {"vllm": {"kind": "openai", "base_url": embedder.url}},
        "models": {"emb": {"backend": "vllm", "served_name": "org/embed"}},
    })


def embed_all(gateway: Any, inputs: list[Any]) -> list[httpx.Response]:
    def one(value: Any) -> httpx.Response:
        return httpx.post(gateway.url + "/v1/embeddings", json={"model": "emb", "input": value},
                          timeout=30)

    with ThreadPoolExecutor(len(inputs)) as pool:
        return list(pool.map(one, inputs))


def test_concurrent_requests_are_merged_and_split_back_exactly(gateway: Any,
                                                              embedder: Any) -> None:
    answers = embed_all(gateway, INPUTS)
    assert all(a.status_code == 200 for a in answers)
    assert emulator(embedder).paths["/v1/embeddings"] < len(INPUTS)
    total = 0
    for value, answer in zip(INPUTS, answers, strict=True):
        texts = [value] if isinstance(value, str) else value
        body = answer.json()
        assert [item["index"] for item in body["data"]] == list(range(len(texts)))
        expected = [vllm_emulator.embedding_vector("org/embed", text) for text in texts]
        got = [item["embedding"] for item in body["data"]]
        assert all(g == pytest.approx(e) for g, e in zip(got, expected, strict=True))
        assert body["model"] == "emb"
        total += body["usage"]["prompt_tokens"]
    whole = sum(vllm_emulator.count_tokens(t) for v in INPUTS for t in
                ([v] if isinstance(v, str) else v))
    assert total == whole  # the usage of the merged call, apportioned without loss


def test_a_refused_input_fails_only_its_own_request(gateway: Any, embedder: Any) -> None:
    emulator(embedder).max_input_tokens = 3
    answers = embed_all(gateway, ["short", "one two three four five six", "tiny"])
    assert [a.status_code for a in answers] == [200, 400, 200]
    assert "maximum context length" in answers[1].json()["error"]["message"]


def test_a_lone_request_goes_upstream_untouched(gateway: Any, embedder: Any) -> None:
    answer = httpx.post(gateway.url + "/v1/embeddings", json={"model": "emb", "input": "solo"})
    assert answer.content == emulator(embedder).last_body.replace(b'"org/embed"', b'"emb"')


@given(st.integers(0, 10_000), st.lists(st.integers(0, 500), min_size=1, max_size=20))
def test_apportion_adds_up_and_follows_the_weights(total: int, weights: list[int]) -> None:
    shares = apportion(total, weights)
    assert sum(shares) == total and all(s >= 0 for s in shares)
    whole = sum(weights)
    if whole:
        assert all(abs(s - total * w / whole) < 1 for s, w in zip(shares, weights, strict=True))


def test_a_client_leaving_a_batch_does_not_disturb_the_others(start_gateway: Any,
                                                             embedder: Any) -> None:
    gateway = start_gateway({
        "batching": {"embeddings_window_ms": 300},
        "cache": {"enabled": False},
        "backends": {"vllm": {"kind": "openai", "base_url": embedder.url}},
        "models": {"emb": {"backend": "vllm", "served_name": "org/embed"}},
    })
    services = gateway.app.state.services

    def open_batch() -> bool:
        return bool(services.embeddings._open)

    with ThreadPoolExecutor(2) as pool:
        stays = pool.submit(httpx.post, gateway.url + "/v1/embeddings",
                            json={"model": "emb", "input": ["stay", "here"]}, timeout=30)
        wait_until(open_batch, message="a batch is gathering")
        with pytest.raises(httpx.ReadTimeout):  # this client gives up inside the window
            httpx.post(gateway.url + "/v1/embeddings", json={"model": "emb", "input": "gone"},
                       timeout=0.05)
        answer = stays.result()
    assert answer.status_code == 200
    vectors = [item["embedding"] for item in answer.json()["data"]]
    expected = [vllm_emulator.embedding_vector("org/embed", t) for t in ("stay", "here")]
    assert all(v == pytest.approx(e) for v, e in zip(vectors, expected, strict=True))
    assert emulator(embedder).paths["/v1/embeddings"] == 1
