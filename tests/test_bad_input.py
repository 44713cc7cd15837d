"""Bad input, end to end: every malformed request gets a clear OpenAI-shaped 4xx, never a 5xx,
and the gateway stays healthy afterwards.

What the gateway validates itself (gateway/calls.py) and what it leaves to the backend:
- the body must be one JSON object in UTF-8 (no NaN/Infinity literals, no BOM, nesting within
  orjson's depth limit), whatever the Content-Type says: the body decides, so `curl -d` (which
  sends application/x-www-form-urlencoded) works, and a form or multipart body is a 400;
- `model` a non-empty string naming a known model (404 `model_not_found` otherwise); duplicate
  keys resolve as in every mainstream JSON parser: the last one wins;
- the endpoint's input (`messages`, `prompt`, `input`) present with the right type;
- `stream` a boolean, `stream_options` an object, `n`, `max_tokens`, `max_completion_tokens`,
  `top_logprobs`, `temperature` and `top_p` typed and in range;
- the body within `server.max_body_bytes` (413), whether announced by Content-Length or not,
  and received within `server.body_timeout_s` (408);
- the headers within `server.max_header_bytes` (431);
- `X-Swap-Timeout` a number of seconds in (0, 86400); a malformed `X-Request-ID` is replaced.
Message contents, tools and every other sampling field are the backend's to judge, and its own
4xx reaches the client in OpenAI's vocabulary. docs/validation.md has the reasons.

Requests broken below HTTP (bad framing, bad header syntax) are refused by uvicorn with its own
plain-text 400 before the app sees them; those cases only check the status and that the gateway
keeps serving.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import httpx
import orjson
import pytest
from _pytest.mark.structures import ParameterSet
from structlog.testing import capture_logs

from gateway.app import create_app
from gateway.config.reader import parse_config
from tests.emulators import openai_server as vllm_emulator
from tests.servers import ServerThread, wait_until

CHAT = "/v1/chat/completions"
LIMIT = 256 * 1024
MESSAGES = [{"role": "user", "content": "hi"}]
GOOD = {"model": "m1", "messages": MESSAGES}
DROP = object()  # a field value meaning "leave the field out"
UNCHECKED = object()  # an expectation not checked
INVALID = "invalid_request_error"


def gateway_config(backend_url: str, **server: Any) -> dict[str, Any]:
    return {
        "server": {"max_body_bytes": LIMIT, **server},
        "backends": {"vllm": {"kind": "openai", "base_url": backend_url,
                              "timeouts": {"read": 5}}},
        "models": {"m1": {"backend": "vllm", "served_name": "org/m1", "aliases": ["one"]}},
    }


@pytest.fixture(scope="module")
def backend() -> Iterator[ServerThread]:
    server = ServerThread(vllm_emulator.create_app(["org/m1"], tokens=3)).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def gateway(backend: ServerThread) -> Iterator[ServerThread]:
    config = parse_config(gateway_config(backend.url), source="bad-input", env={})
    server = ServerThread(create_app(config)).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def http(gateway: ServerThread) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=gateway.url, timeout=10) as client:
        yield client


# -- helpers ----------------------------------------------------------------------------------


def chat(**fields: Any) -> bytes:
    """A good chat body with `fields` changed; a field set to DROP is left out."""
    body = {**GOOD, **fields}
    return orjson.dumps({key: value for key, value in body.items() if value is not DROP})


def chat_with(raw_field: str) -> bytes:
    """A good chat body plus one field written as raw JSON text (for what orjson won't write)."""
    return b'{"model": "m1", "messages": [{"role": "user", "content": "hi"}], ' + \
        raw_field.encode() + b"}"


def assert_openai_error(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text[:500]
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert list(body) == ["error"]
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    assert error["type"] == INVALID
    return error


def assert_healthy(http: httpx.Client) -> None:
    assert http.get("/health").status_code == 200
    answer = http.post(CHAT, json=GOOD)
    assert answer.status_code == 200, answer.text[:500]
    assert answer.json()["choices"][0]["message"]["content"]


# -- the table --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Bad:
    body: bytes
    status: int = 400
    code: object = UNCHECKED
    param: object = UNCHECKED
    path: str = CHAT
    method: str = "POST"
    headers: Mapping[str, str] = field(default_factory=dict)
    chunked: bool = False  # send without Content-Length, in chunks


def bad(case_id: str, body: bytes = b"", status: int = 400, **options: Any) -> ParameterSet:
    return pytest.param(Bad(body, status, **options), id=case_id)


def json_error(case_id: str, body: bytes, **options: Any) -> ParameterSet:
    return bad(case_id, body, 400, code="invalid_json", param=None, **options)


def field_error(case_id: str, param: str, body: bytes, **options: Any) -> ParameterSet:
    return bad(case_id, body, 400, param=param, **options)


def not_found(case_id: str, body: bytes = b"", **options: Any) -> ParameterSet:
    return bad(case_id, body, 404, code="model_not_found", param="model", **options)


HUGE_MESSAGES = [{"role": "user", "content": "x"}] * 20_000  # ~0.6 MB: over the limit
DEEP = "[" * 100_000 + "]" * 100_000

CASES = [
    # Not JSON, or not one JSON object.
    json_error("malformed", b"{not json"),
    json_error("truncated", chat()[:-7]),
    json_error("empty-body", b""),
    json_error("whitespace-only", b" \n\t "),
    json_error("json-null", b"null"),
    json_error("json-array", b'[{"model": "m1"}]'),
    json_error("json-string", b'"m1"'),
    json_error("json-number", b"42"),
    json_error("trailing-garbage", chat() + b"xyz"),
    json_error("two-documents", chat() + chat()),
    json_error("single-quotes", b"{'model': 'm1', 'messages': []}"),
    json_error("trailing-comma", b'{"model": "m1", "messages": [],}'),
    json_error("comment", b'{"model": "m1", // pick a model\n "messages": []}'),
    json_error("nan-literal", chat_with('"temperature": NaN')),
    json_error("infinity-literal", chat_with('"temperature": Infinity')),
    json_error("minus-infinity-literal", chat_with('"top_p": -Infinity')),
    json_error("float-overflow", chat_with('"temperature": 1e400')),
    json_error("deeply-nested", chat_with(f'"metadata": {DEEP}')),
    json_error("utf8-bom", b"\xef\xbb\xbf" + chat()),
    json_error("invalid-utf8", chat(messages=[{"role": "user", "content": "@"}]).replace(
        b"@", b"\xff\xfe")),
    json_error("latin1-body", chat(messages=[{"role": "user", "content": "@"}]).replace(
        b"@", "café".encode("latin-1"))),
    json_error("utf16-body", chat().decode().encode("utf-16")),
    json_error("lone-surrogate", chat_with('"user": "\\ud800"')),
    json_error("raw-nul-byte", chat()[:-1] + b"\x00}"),
    # Content-Type does not matter, the body does: these bodies are not JSON.
    json_error("form-urlencoded", b"model=m1&messages=hi",
               headers={"content-type": "application/x-www-form-urlencoded"}),
    json_error("multipart", b'--b\r\nContent-Disposition: form-data; name="model"\r\n\r\nm1\r\n'
               b"--b--\r\n", headers={"content-type": "multipart/form-data; boundary=b"}),
    # model
    field_error("model-missing", "model", chat(model=DROP)),
    field_error("model-null", "model", chat(model=None)),
    field_error("model-number", "model", chat(model=42)),
    field_error("model-empty", "model", chat(model="")),
    field_error("model-list", "model", chat(model=["m1"])),
    field_error("model-object", "model", chat(model={"id": "m1"})),
    field_error("model-bool", "model", chat(model=True)),
    not_found("model-unknown", chat(model="gpt-17")),
    not_found("model-with-nul", chat(model="m1\x00")),
    not_found("model-case-differs", chat(model="M1")),
    not_found("model-very-long", chat(model="m" * 10_000)),
    not_found("duplicate-key-last-wins", chat()[:-1] + b', "model": "ghost"}'),
    # messages
    field_error("messages-missing", "messages", chat(messages=DROP)),
    field_error("messages-null", "messages", chat(messages=None)),
    field_error("messages-string", "messages", chat(messages="hi")),
    field_error("messages-object", "messages", chat(messages={"role": "user"})),
    field_error("messages-empty", "messages", chat(messages=[])),
    field_error("messages-of-numbers", "messages", chat(messages=[1, 2])),
    field_error("message-without-role", "messages", chat(messages=[{"content": "hi"}])),
    field_error("message-role-number", "messages", chat(messages=[{"role": 5}])),
    bad("messages-huge", chat(messages=HUGE_MESSAGES), 413, code="request_too_large"),
    # stream, stream_options
    field_error("stream-string", "stream", chat(stream="yes")),
    field_error("stream-number", "stream", chat(stream=1)),
    field_error("stream-object", "stream", chat(stream={})),
    field_error("stream-options-string", "stream_options", chat(stream=True, stream_options="x")),
    field_error("stream-options-list", "stream_options", chat(stream=True, stream_options=[])),
    # numbers out of range or of the wrong type
    field_error("n-zero", "n", chat(n=0)),
    field_error("n-negative", "n", chat(n=-1)),
    field_error("n-too-many", "n", chat(n=129)),
    field_error("n-string", "n", chat(n="2")),
    field_error("n-float", "n", chat(n=1.5)),
    field_error("n-bool", "n", chat(n=True)),
    field_error("max-tokens-zero", "max_tokens", chat(max_tokens=0)),
    field_error("max-tokens-negative", "max_tokens", chat(max_tokens=-5)),
    field_error("max-tokens-string", "max_tokens", chat(max_tokens="100")),
    field_error("max-tokens-float", "max_tokens", chat(max_tokens=1e30)),
    field_error("max-tokens-beyond-64-bits", "max_tokens",
                chat_with('"max_tokens": 100000000000000000000000000')),
    field_error("max-completion-tokens-zero", "max_completion_tokens",
                chat(max_completion_tokens=0)),
    field_error("temperature-negative", "temperature", chat(temperature=-0.1)),
    field_error("temperature-too-high", "temperature", chat(temperature=2.5)),
    field_error("temperature-string", "temperature", chat(temperature="hot")),
    field_error("temperature-bool", "temperature", chat(temperature=True)),
    field_error("top-p-too-high", "top_p", chat(top_p=1.5)),
    field_error("top-logprobs-too-many", "top_logprobs", chat(top_logprobs=21)),
    # the other endpoints' inputs
    field_error("prompt-missing", "prompt", b'{"model": "m1"}', path="/v1/completions"),
    field_error("prompt-number", "prompt", b'{"model": "m1", "prompt": 5}',
                path="/v1/completions"),
    field_error("input-missing", "input", b'{"model": "m1"}', path="/v1/embeddings"),
    field_error("input-empty", "input", b'{"model": "m1", "input": ""}', path="/v1/embeddings"),
    field_error("input-object", "input", b'{"model": "m1", "input": {}}', path="/v1/embeddings"),
    # unknown endpoints and methods
    bad("unknown-endpoint", b"{}", 404, code="unknown_endpoint", path="/v1/fine_tuning/jobs"),
    bad("unknown-version", chat(), 404, code="unknown_endpoint", path="/v2/chat/completions"),
    bad("unknown-root-path", method="GET", status=404, path="/wp-admin"),
    bad("get-on-post-route", method="GET", status=405),
    bad("delete-on-post-route", method="DELETE", status=405),
    bad("options-on-post-route", method="OPTIONS", status=405),
    bad("put-on-get-route", b"{}", 405, method="PUT", path="/v1/models"),
    bad("patch-health", b"{}", 405, method="PATCH", path="/health"),
    bad("endpoint-not-served", b'{"model": "m1", "input": "hi"}', 404,
        code="unsupported_endpoint", path="/v1/responses"),
    not_found("model-card-unknown", method="GET", path="/v1/models/ghost"),
    not_found("model-card-empty-id", method="GET", path="/v1/models/"),
    not_found("model-card-percent-ff", method="GET", path="/v1/models/%ff"),
    not_found("swapper-model-unknown", method="GET", path="/models/ghost"),
    not_found("swapper-load-unknown", method="POST", path="/models/ghost/load"),
    # oversize bodies
    bad("oversize", chat(messages=[{"role": "user", "content": "x" * LIMIT}]), 413,
        code="request_too_large"),
    bad("oversize-chunked", chat(messages=[{"role": "user", "content": "x" * LIMIT}]), 413,
        code="request_too_large", chunked=True),
    # headers
    field_error("swap-timeout-text", "X-Swap-Timeout", chat(),
                headers={"x-swap-timeout": "soon"}),
    field_error("swap-timeout-negative", "X-Swap-Timeout", chat(),
                headers={"x-swap-timeout": "-1"}),
    field_error("swap-timeout-zero", "X-Swap-Timeout", chat(), headers={"x-swap-timeout": "0"}),
    field_error("swap-timeout-nan", "X-Swap-Timeout", chat(), headers={"x-swap-timeout": "nan"}),
    field_error("swap-timeout-inf", "X-Swap-Timeout", chat(), headers={"x-swap-timeout": "inf"}),
    field_error("swap-timeout-a-century", "X-Swap-Timeout", chat(),
                headers={"x-swap-timeout": "3e9"}),
    bad("header-of-one-mebibyte", chat(), 431, headers={"x-padding": "a" * 1024 * 1024}),
]


def send(http: httpx.Client, case: Bad) -> httpx.Response:
    content: bytes | Iterator[bytes] = case.body
    if case.chunked:
        content = (case.body[i:i + 16_384] for i in range(0, len(case.body), 16_384))
    return http.request(case.method, case.path, content=content or None,
                        headers={"content-type": "application/json", **case.headers})


def test_the_table_is_big_enough() -> None:
    assert len(CASES) >= 50


@pytest.mark.parametrize("case", CASES)
def test_bad_input_gets_a_clear_openai_error(http: httpx.Client, case: Bad) -> None:
    response = send(http, case)
    error = assert_openai_error(response, case.status)
    for name, expected in (("code", case.code), ("param", case.param)):
        assert expected is UNCHECKED or error[name] == expected, name
    assert len(response.headers["x-request-id"]) == 32
    assert_healthy(http)


# -- the same rules, from the valid side --------------------------------------------------------


@pytest.mark.parametrize("content_type", [
    None, "application/json", "application/json; charset=utf-8", "text/plain",
    "application/x-www-form-urlencoded", "application/octet-stream",
])
def test_a_json_body_is_served_whatever_the_content_type(http: httpx.Client,
                                                        content_type: str | None) -> None:
    headers = {"content-type": content_type} if content_type else {}
    response = http.post(CHAT, content=chat(), headers=headers)
    assert response.status_code == 200
    assert response.json()["model"] == "m1"


def test_with_duplicate_keys_the_last_one_wins(http: httpx.Client) -> None:
    body = b'{"model": "ghost", "model": "one", "messages": [{"role": "user", "content": "x"}]}'
    response = http.post(CHAT, content=body)
    assert response.status_code == 200
    assert response.json()["model"] == "one"


def test_a_long_but_allowed_conversation_is_relayed(http: httpx.Client) -> None:
    messages = [{"role": "user" if i % 2 else "assistant", "content": f"turn {i}"}
                for i in range(5_000)]
    body = chat(messages=messages)
    assert len(body) < LIMIT
    response = http.post(CHAT, content=body)
    assert response.status_code == 200 and response.json()["choices"]


def test_message_contents_are_the_backends_to_judge(http: httpx.Client,
                                                    backend: ServerThread) -> None:
    odd = [{"role": "user", "content": 5}, {"role": "robot", "content": {"nested": [1]}}]
    response = http.post(CHAT, content=chat(messages=odd))
    assert response.status_code == 200
    assert backend.server.config.app.state.emulator.last_request["messages"] == odd


def test_a_backends_own_4xx_keeps_openais_error_vocabulary(http: httpx.Client) -> None:
    # An empty prompt list passes the gateway (completions allow it) and the backend refuses it.
    response = http.post("/v1/completions", json={"model": "m1", "prompt": []})
    error = assert_openai_error(response, 400)
    assert error["code"] is None or isinstance(error["code"], str)


@pytest.mark.parametrize("request_id", [
    "has spaces", "a" * 129, "<script>alert(1)</script>", "semi;colon", "ünïcode", "",
    "quote\"d", "slash/ed",
])
def test_a_malformed_request_id_is_replaced_not_echoed(http: httpx.Client,
                                                       request_id: str) -> None:
    response = http.post(CHAT, json=GOOD, headers={"x-request-id": request_id.encode()})
    assert response.status_code == 200
    returned = response.headers["x-request-id"]
    assert returned != request_id and len(returned) == 32 and returned.isalnum()


def test_a_sane_request_id_is_echoed_on_errors_too(http: httpx.Client) -> None:
    response = http.post(CHAT, content=b"{", headers={"x-request-id": "trace-42.a:b"})
    assert response.status_code == 400
    assert response.headers["x-request-id"] == "trace-42.a:b"


# -- raw HTTP: what httpx would refuse to send ------------------------------------------------


@dataclass(frozen=True)
class RawAnswer:
    status: int
    headers: dict[str, str]
    body: bytes


def read_answer(sock: socket.socket) -> RawAnswer:
    """One HTTP/1.1 response off the socket (uvicorn always sends Content-Length here)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed before a response: {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {name.lower(): value.strip()
               for name, _, value in (line.partition(":") for line in lines)}
    while len(body) < int(headers.get("content-length", "0")):
        chunk = sock.recv(65536)
        assert chunk, "connection closed in the middle of the body"
        body += chunk
    return RawAnswer(int(status_line.split()[1]), headers, body)


def connect(server: ServerThread, timeout: float = 5.0) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=timeout)
    sock.settimeout(timeout)
    return sock


def head(content_length: int | None = None, *, extra: bytes = b"") -> bytes:
    length = b"" if content_length is None else b"Content-Length: %d\r\n" % content_length
    return (b"POST /v1/chat/completions HTTP/1.1\r\nHost: gateway\r\n"
            b"Content-Type: application/json\r\n" + length + extra + b"\r\n")


def test_a_lying_content_length_over_the_limit_is_413_at_once(gateway: ServerThread,
                                                             http: httpx.Client) -> None:
    with connect(gateway) as sock:
        sock.sendall(head(10**11) + chat())  # announces 100 GB, sends a few bytes
        answer = read_answer(sock)
    assert answer.status == 413
    assert orjson.loads(answer.body)["error"]["code"] == "request_too_large"
    assert_healthy(http)


def test_a_content_length_shorter_than_the_body_is_refused(gateway: ServerThread,
                                                          http: httpx.Client) -> None:
    with connect(gateway) as sock:
        sock.sendall(head(5) + chat())  # the rest of the body is not a request
        answer = read_answer(sock)
    assert answer.status == 400
    assert_healthy(http)


PROTOCOL_ERRORS = {
    "garbage-request-line": b"GARBAGE\r\n\r\n",
    "content-length-not-a-number": head(extra=b"Content-Length: abc\r\n") + b"{}",
    "content-length-negative": head(extra=b"Content-Length: -1\r\n") + b"{}",
    "two-content-lengths": head(2, extra=b"Content-Length: 3\r\n") + b"{}",
    "content-length-and-chunked": head(2, extra=b"Transfer-Encoding: chunked\r\n")
    + b"2\r\n{}\r\n0\r\n\r\n",
    "bad-chunk-size": head(extra=b"Transfer-Encoding: chunked\r\n") + b"zz\r\n",
    "header-without-colon": head(2, extra=b"NoColonHere\r\n") + b"{}",
    "nul-in-header-value": head(2, extra=b"X-Trace: a\x00b\r\n") + b"{}",
    "space-in-header-name": head(2, extra=b"X Trace: b\r\n") + b"{}",
    "unknown-http-version": b"GET /health HTTP/3.0\r\nHost: gateway\r\n\r\n",
    "bare-lf-line-endings": b"GET /health HTTP/1.1\nHost: gateway\n\n",
    "raw-8-bit-path": b"GET /v1/models/\xff HTTP/1.1\r\nHost: gateway\r\n\r\n",
}


@pytest.mark.parametrize("data", PROTOCOL_ERRORS.values(), ids=PROTOCOL_ERRORS.keys())
def test_broken_http_is_refused_and_the_connection_closed(gateway: ServerThread,
                                                         http: httpx.Client,
                                                         data: bytes) -> None:
    with connect(gateway) as sock:
        sock.sendall(data)
        answer = read_answer(sock)
        assert answer.status == 400
        assert answer.headers.get("connection") == "close"
    assert_healthy(http)


# -- slow and vanishing clients ---------------------------------------------------------------


def loop_tasks(server: ServerThread) -> int:
    async def count() -> int:
        return len(asyncio.all_tasks())

    return int(server.call(count()))


def test_slow_clients_do_not_wedge_the_gateway(gateway: ServerThread,
                                               http: httpx.Client) -> None:
    baseline = loop_tasks(gateway)
    stalled = [connect(gateway) for _ in range(40)]
    for i, sock in enumerate(stalled):
        if i % 4 == 1:
            sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: gat")  # half a header
        elif i % 4 == 2:
            sock.sendall(head(len(chat())))  # headers, then no body
        elif i % 4 == 3:
            sock.sendall(head(len(chat())) + chat()[:10])  # a body that stops
        # i % 4 == 0: connected, silent
    try:
        with httpx.stream("POST", gateway.url + CHAT, json={**GOOD, "stream": True},
                          timeout=5) as streamed:
            assert streamed.status_code == 200
            assert b"data: [DONE]" in b"".join(streamed.iter_raw())
        assert_healthy(http)
    finally:
        for sock in stalled:
            sock.close()
    # The requests the stalled clients had begun end when they go: nothing stays behind.
    wait_until(lambda: loop_tasks(gateway) <= baseline, message="stalled requests cleaned up")
    assert_healthy(http)


def test_a_stalled_body_is_answered_408_after_the_body_timeout(start_gateway: Any,
                                                               backend: ServerThread) -> None:
    gateway = start_gateway(gateway_config(backend.url, body_timeout_s=0.5))
    with connect(gateway, timeout=3) as sock:
        sock.sendall(head(len(chat())) + chat()[:10])
        answer = read_answer(sock)
    assert answer.status == 408
    assert orjson.loads(answer.body)["error"]["type"] == INVALID


def test_a_client_gone_mid_body_is_not_logged_as_a_crash(gateway: ServerThread) -> None:
    with capture_logs() as logs:
        with connect(gateway) as sock:
            sock.sendall(head(len(chat()), extra=b"X-Request-ID: gone-mid-body\r\n")
                         + chat()[:10])
        wait_until(lambda: any(e.get("request_id") == "gone-mid-body" for e in logs),
                   message="the request's access log line")
    done = next(e for e in logs if e.get("request_id") == "gone-mid-body")
    assert not [e for e in logs if e["event"] == "request.crashed"]
    assert done["status"] != 500
