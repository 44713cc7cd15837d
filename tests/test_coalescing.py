"""Identical cacheable requests in flight share one upstream call; each client still gets all."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import openai
import pytest

from tests.emulators import openai_server as vllm_emulator
from tests.servers import emulator, wait_until

MESSAGES = [{"role": "user", "content": "One answer for everyone."}]


@pytest.fixture
def slow(start_server: Any) -> Any:
    return start_server(vllm_emulator.create_app(["org/m1"], tokens=30, token_delay=0.01))


@pytest.fixture
def gateway(start_gateway: Any, slow: Any) -> Any:
    return start_gateway({
        "server": {"heartbeat_s": 0.05},
        "backends": {"vllm": {"kind": "openai", "base_url": slow.url}},
        "models": {"m1": {"backend": "vllm", "served_name": "org/m1"}},
    })


def test_identical_requests_share_one_upstream_call(gateway: Any, slow: Any) -> None:
    client = openai.OpenAI(base_url=gateway.url + "/v1", api_key="x", max_retries=0)

    def ask(stream: bool) -> str:
        if not stream:
            answer = client.chat.completions.create(model="m1", messages=MESSAGES, seed=1)
            return answer.choices[0].message.content or ""
        chunks = client.chat.completions.create(model="m1", messages=MESSAGES, seed=1,
                                                stream=True)
        return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)

    with ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(ask, [False, True, False, True, True, False]))
    assert len(set(answers)) == 1 and answers[0]
    assert emulator(slow).requests["org/m1"] == 1


def test_followers_still_answered_when_the_leaders_client_leaves(gateway: Any,
                                                                  slow: Any) -> None:
    body = {"model": "m1", "messages": MESSAGES, "temperature": 0, "stream": True}
    state = emulator(slow)
    leader = httpx.stream("POST", gateway.url + "/v1/chat/completions", json=body)
    response = leader.__enter__()
    chunks = response.iter_raw()  # held: a dropped iterator would close the stream
    next(chunks)  # the leader's stream has started upstream
    results: list[httpx.Response] = []
    follower = threading.Thread(target=lambda: results.append(httpx.post(
        gateway.url + "/v1/chat/completions", json=body | {"stream": False}, timeout=30)))
    follower.start()
    wait_until(lambda: len(gateway.app.state.services.coalescer) == 1, message="in flight")
    leader.__exit__(None, None, None)  # the leader's client leaves midway
    follower.join(30)
    assert results and results[0].status_code == 200
    assert results[0].json()["choices"][0]["finish_reason"] == "stop"
    assert state.cancelled_streams == 1 and state.requests["org/m1"] == 2


def test_a_follower_leaving_does_not_disturb_the_others(gateway: Any, slow: Any) -> None:
    body = {"model": "m1", "messages": MESSAGES, "temperature": 0}
    with ThreadPoolExecutor(3) as pool:
        leader = pool.submit(httpx.post, gateway.url + "/v1/chat/completions", json=body,
                             timeout=30)
        wait_until(lambda: len(gateway.app.state.services.coalescer) == 1, message="leader")
        with httpx.stream("POST", gateway.url + "/v1/chat/completions",
                          json=body | {"stream": True}) as quitter:
            assert next(quitter.iter_lines()).startswith(":")  # waiting for the leader
        stayer = pool.submit(httpx.post, gateway.url + "/v1/chat/completions", json=body,
                             timeout=30)
        assert leader.result().status_code == 200 and stayer.result().status_code == 200
    assert leader.result().json()["choices"] == stayer.result().json()["choices"]
    assert emulator(slow).requests["org/m1"] == 1
