"""The relay's upstream connections, end to end: however a call ends (an answer, a stream read
whole, a client hanging up midway, a backend dying), its connection is given back or closed,
and the backend stops generating for a client that left."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from tests.emulators import openai_server as vllm_emulator
from tests.servers import ServerThread, emulator, wait_until

CHAT = "/v1/chat/completions"
ASK = {"model": "m1", "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture
def vllm(start_server: Any) -> ServerThread:
    return start_server(vllm_emulator.create_app(["org/m1"], tokens=20, token_delay=0.005))


@pytest.fixture
def gateway(start_gateway: Any, vllm: ServerThread) -> ServerThread:
    return start_gateway({
        "backends": {"vllm": {"kind": "openai", "base_url": vllm.url}},
        "models": {"m1": {"backend": "vllm", "served_name": "org/m1"}},
    })


def relay_client(gateway: ServerThread) -> Any:
    return gateway.app.state.services.upstreams.client("vllm")  # type: ignore[attr-defined]


def hang_up_midway(url: str) -> None:
    with httpx.stream("POST", url + CHAT, json={**ASK, "stream": True}, timeout=10) as response:
        lines = response.iter_lines()
        assert next(line for line in lines if line.startswith("data: "))


def test_every_way_a_call_ends_gives_its_connection_back(gateway: ServerThread,
                                                         vllm: ServerThread) -> None:
    for _ in range(3):
        assert httpx.post(gateway.url + CHAT, json=ASK, timeout=10).status_code == 200
        with httpx.stream("POST", gateway.url + CHAT, json={**ASK, "stream": True},
                          timeout=10) as response:
            assert response.read().endswith(b"data: [DONE]\n\n")
        hang_up_midway(gateway.url)
    emulator(vllm).fail("drop", times=1)
    assert httpx.post(gateway.url + CHAT, json=ASK, timeout=10).status_code == 502
    client = relay_client(gateway)
    wait_until(lambda: client.in_use == 0, message="every answer done with")
    wait_until(lambda: emulator(vllm).in_flight == 0, message="the backend idle")
    assert client.idle <= 2  # the sequential calls shared one connection (and a spare)
    assert httpx.post(gateway.url + CHAT, json=ASK, timeout=10).json()["model"] == "m1"
