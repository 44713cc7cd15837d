"""Fuzzing the gateway's front door: JSON-ish bodies, raw bytes, headers and paths.

Whatever arrives, the gateway itself never answers 5xx, and every 4xx carries OpenAI's error
shape. A 5xx (or an error event ending a stream) is accepted only as a relayed backend failure:
the emulated backend is wrapped in a counter of its own 5xx answers and crashes, and such an
answer must coincide with one. One gateway serves the whole module, so damage from one example
would show in the next.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from gateway.app import create_app
from gateway.config.reader import parse_config
from gateway.relay.stream import Receive, Scope, Send
from tests.emulators import openai_server as vllm_emulator
from tests.servers import ServerThread, wait_until

ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings")
GOOD = {"model": "m1", "messages": [{"role": "user", "content": "hi"}]}
REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")
FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


class FailureCounter:
    """ASGI wrapper counting the 5xx answers and the crashes of the app it wraps."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.failures = 0
        self.url = ""  # where it serves, once started

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def counted(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start" and message["status"] >= 500:
                self.failures += 1
            await send(message)

        try:
            await self.app(scope, receive, counted)
        except Exception:
            self.failures += 1
            raise


@dataclass
class Front:
    """The gateway as the fuzzer sees it: every answer is checked on the way back."""

    http: httpx.Client
    backend: FailureCounter

    def request(self, method: str, url: str | httpx.URL, **options: Any) -> httpx.Response:
        failures = self.backend.failures
        response = self.http.request(method, url, **options)
        assert_sound(response, backend_failed=self.backend.failures > failures)
        return response


def assert_sound(response: httpx.Response, *, backend_failed: bool) -> None:
    """No 5xx of the gateway's own making; every error in OpenAI's shape."""
    event(f"status {response.status_code}")
    if response.headers.get("content-type", "").startswith("text/event-stream"):
        last = [line for line in response.text.splitlines() if line.startswith("data: ")][-1]
        if last != "data: [DONE]":
            assert_error(json.loads(last.removeprefix("data: ")), relayed=backend_failed)
    elif response.status_code >= 500:
        assert_error(response.json(), relayed=backend_failed)
    elif response.status_code >= 400:
        assert_error(response.json(), relayed=True)


def assert_error(body: Any, *, relayed: bool) -> None:
    assert list(body) == ["error"], body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    assert isinstance(error["type"], str) and error["type"]
    assert relayed, f"an error of the gateway's own making: {error}"


@pytest.fixture(scope="module")
def backend() -> Iterator[FailureCounter]:
    counter = FailureCounter(vllm_emulator.create_app(["org/m1"], tokens=2))
    server = ServerThread(counter).start()
    counter.url = server.url
    yield counter
    server.stop()


@pytest.fixture(scope="module")
def front(backend: FailureCounter) -> Iterator[Front]:
    config = {
        "server": {"max_body_bytes": 64 * 1024},
        "backends": {"vllm": {"kind": "openai", "base_url": backend.url,
                              "timeouts": {"read": 10}}},
        "models": {"m1": {"backend": "vllm", "served_name": "org/m1", "aliases": ["one"]}},
    }
    app = create_app(parse_config(config, source="fuzz", env={}))
    server = ServerThread(app).start()
    with httpx.Client(base_url=server.url, timeout=15) as http:
        yield Front(http, backend)
        # However the examples went, no lease stays taken and both ends still serve.
        slot = app.state.services.scheduler.slots["m1"]
        wait_until(lambda: slot.in_flight == 0, message="every lease released")
        assert http.get("/health").status_code == 200
        assert http.post("/v1/chat/completions", json=GOOD).status_code == 200
    server.stop()


# -- strategies -------------------------------------------------------------------------------

scalars = (st.none() | st.booleans() | st.integers(-(2**70), 2**70)
           | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=12))
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=4),
    max_leaves=10,
)
models = st.sampled_from(["m1", "one", "ghost", "", "M1", "org/m1"]) | values
messages = st.lists(
    st.fixed_dictionaries(
        {"role": st.sampled_from(["user", "system", "assistant", "tool"]) | values},
        optional={"content": st.text(max_size=40) | values},
    ),
    max_size=3,
) | values
numbers = st.integers(-3, 300) | st.floats(-3, 300) | values
fields = {
    "model": models, "messages": messages, "prompt": st.text(max_size=20) | values,
    "input": st.text(max_size=20) | values, "stream": st.booleans() | values,
    "stream_options": st.fixed_dictionaries({}, optional={"include_usage": values}) | values,
    "n": numbers, "max_tokens": numbers, "max_completion_tokens": numbers,
    "temperature": numbers, "top_p": numbers, "top_logprobs": numbers, "seed": numbers,
    "tools": values, "response_format": values,
}
# A valid request with a few fields changed reaches the backend often; the others rarely do.
near_valid = st.one_of(*(st.tuples(st.just(name), value) for name, value in fields.items())).map(
    lambda change: {**GOOD, "prompt": "hi", "input": "hi", change[0]: change[1]})
bodies = near_valid | st.fixed_dictionaries({}, optional=fields) | values


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    """A valid body with a few bytes flipped, inserted, deleted, or cut off."""
    data = bytearray(json.dumps({**GOOD, "stream": draw(st.booleans())}).encode())
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, len(data)))
        action = draw(st.sampled_from(["flip", "insert", "delete", "truncate"]))
        if action == "flip" and at < len(data):
            data[at] ^= draw(st.integers(1, 255))
        elif action == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif action == "delete":
            del data[at:at + draw(st.integers(1, 8))]
        elif action == "truncate":
            del data[at:]
    return bytes(data)


header_names = st.sampled_from([
    "x-swap-timeout", "x-request-id", "content-type", "content-encoding", "accept",
    "accept-encoding", "authorization", "x-api-key", "cache-control", "x-cache", "user-agent",
    "openai-organization", "x-stainless-retry-count", "cookie", "forwarded", "x-forwarded-for",
]) | st.from_regex(r"\Ax-[a-z0-9-]{1,20}\Z")
# Field values as RFC 9110 allows them: visible ASCII and obs-text, inner spaces and tabs.
header_values = st.binary(max_size=60).map(
    lambda raw: bytes(b if 0x21 <= b <= 0x7E or b >= 0x80 or b in b" \t" else 0x2E for b in raw)
    .strip(b" \t")
)
headers = st.dictionaries(header_names, header_values, max_size=5)


# -- properties -------------------------------------------------------------------------------


@FUZZ
@given(endpoint=st.sampled_from(ENDPOINTS), body=bodies)
# The emulator crashes on a non-list `tools` (real vLLM answers 400): a relayed backend 5xx.
@example(endpoint="/v1/chat/completions", body={**GOOD, "tools": True})
@example(endpoint="/v1/chat/completions", body={**GOOD, "tools": True, "stream": True})
def test_json_bodies(front: Front, endpoint: str, body: Any) -> None:
    content = json.dumps(body, allow_nan=True)  # NaN and Infinity literals included
    front.request("POST", endpoint, content=content, headers={"content-type": "application/json"})


@FUZZ
@given(endpoint=st.sampled_from(ENDPOINTS), content=st.binary(max_size=512) | mutated())
def test_raw_bytes(front: Front, endpoint: str, content: bytes) -> None:
    front.request("POST", endpoint, content=content)


@FUZZ
@given(extra=headers, stream=st.booleans())
def test_headers(front: Front, extra: dict[str, bytes], stream: bool) -> None:
    response = front.request("POST", "/v1/chat/completions", json={**GOOD, "stream": stream},
                             headers=extra)
    returned = response.headers["x-request-id"]
    assert REQUEST_ID.match(returned)
    sent = extra.get("x-request-id")
    if sent is not None and REQUEST_ID.match(sent.decode("latin-1")):
        assert returned == sent.decode("latin-1")


@FUZZ
@given(method=st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"]),
       path=st.sampled_from(["chat/completions", "models", "models/m1", "embeddings"])
       | st.text(st.characters(codec="utf-8", exclude_categories=["Cc"],
                               exclude_characters="?#"), max_size=30))
def test_paths_under_v1(front: Front, method: str, path: str) -> None:
    front.request(method, httpx.URL("/v1/" + path), json=GOOD)
