"""A vLLM-like OpenAI-compatible server for the gateway's tests.

Answers are synthesised, not generated: the text is a pure function of (model, prompt, seed), so
a test can predict it and check that the gateway relayed it byte-for-byte. Beside completions
and embeddings it serves rerank, image generation, speech (a binary stream) and transcription
(multipart uploads), as vLLM, llama.cpp and OpenAI document them, and with ``lora=True``
vLLM's runtime LoRA API (adapters registered on its first model). Every observable
(requests, in-flight streams, client cancellations, sleeps) is counted on ``app.state.emulator``,
and failure modes can be switched on at runtime with ``state.fail(mode)``.

This module also holds the OpenAI-protocol pieces (reply synthesis, SSE framing, embeddings,
stream tracking) that the Ollama emulator's ``/v1`` layer reuses. It imports nothing from the
``tests`` package so that it also runs as a plain script, which is how a process driver starts
it::

    python -m tests.emulators.openai_server --port 8001 --model m1 [--model m2]
        [--startup-delay S] [--token-delay S] [--embedding] [--sleep-mode] [--lora]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import logging
import signal
import socket
import struct
import time
import uuid
import zlib
from collections import Counter
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

# ---------------------------------------------------------------------------------------------
# Deterministic answers
# ---------------------------------------------------------------------------------------------

# Multi-byte characters, quotes, escapes and newlines, so a relay that re-encodes shows up.
VOCAB = (
    "The", " quick", " brown", " fox", " jumps", " over", " the", " lazy", " dog", ",", ".",
    "\n", " naïve", " café", " “quoted”", ' "escaped"', " 🙂", " 42", " tab\t", " back\\slash",
)  # fmt: skip

DROP_AFTER = 2  # content frames a "drop" stream sends before the connection dies
EMBEDDING_DIM = 16


def digest(*parts: object) -> bytes:
    return hashlib.sha256("\x1f".join(map(str, parts)).encode()).digest()


def synth_tokens(seed: bytes, count: int) -> list[str]:
    """`count` tokens drawn from VOCAB by a hash chain: the same seed always gives the same text."""
    tokens: list[str] = []
    block = seed
    while len(tokens) < count:
        block = hashlib.sha256(block).digest()
        tokens.extend(VOCAB[b % len(VOCAB)] for b in block[: count - len(tokens)])
    return tokens


def count_tokens(text: str) -> int:
    return max(1, len(text.split()))


def message_text(content: Any) -> str:
    """Text of an OpenAI message content: a string or a list of parts (text / input_text)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
    return ""


def chat_prompt(messages: list[Any]) -> str:
    return "\n".join(
        f"{m.get('role')}: {message_text(m.get('content'))}"
        for m in messages
        if isinstance(m, dict)
    )


def sample_json(schema: Any, words: list[str]) -> Any:
    """A value that satisfies a (simple) JSON schema, derived from the synthesised words."""
    if not isinstance(schema, dict):
        return "".join(words).strip()
    if schema.get("enum"):
        return schema["enum"][0]
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "string")
    if kind == "object" or "properties" in schema:
        properties = schema.get("properties") or {}
        return {name: sample_json(sub, words) for name, sub in properties.items()}
    if kind == "array":
        return [sample_json(schema.get("items"), words)]
    if kind == "integer":
        return len(words)
    if kind == "number":
        return len(words) / 2
    if kind == "boolean":
        return len(words) % 2 == 0
    return "".join(words).strip()


def response_schema(response_format: Any) -> dict[str, Any] | None:
    """The schema a `response_format` asks for; json_object gets a one-field object."""
    if not isinstance(response_format, dict):
        return None
    if response_format.get("type") == "json_object":
        return {"type": "object", "properties": {"response": {"type": "string"}}}
    if response_format.get("type") == "json_schema":
        spec = response_format.get("json_schema") or {}
        return spec.get("schema") or {"type": "object"}
    return None


@dataclass(frozen=True)
class Reply:
    """One synthesised completion: content pieces (one per token) or tool calls."""

    pieces: tuple[str, ...]
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    tool_calls: tuple[dict[str, Any], ...] = ()

    @property
    def text(self) -> str:
        return "".join(self.pieces)

    def usage(self) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
        }


def plan_text(
    model: str,
    prompt: str,
    *,
    tokens: int,
    max_tokens: int | None = None,
    seed: Any = None,
    schema: dict[str, Any] | None = None,
) -> Reply:
    """A text (or JSON, when a schema is given) reply of `tokens` tokens, cut at `max_tokens`."""
    words = synth_tokens(digest(model, prompt, seed), tokens)
    if schema is None:
        pieces = words
    else:
        encoded = orjson.dumps(sample_json(schema, words)).decode()
        pieces = [encoded[i : i + 8] for i in range(0, len(encoded), 8)]
    finish = "stop"
    if isinstance(max_tokens, int) and 0 < max_tokens < len(pieces):  # <= 0 means "no limit"
        pieces, finish = pieces[:max_tokens], "length"
    return Reply(tuple(pieces), finish, count_tokens(prompt), len(pieces))


def pick_tool(body: dict[str, Any]) -> dict[str, Any] | None:
    """The tool the emulated model calls, if any: `tool_choice` wins, else the first tool."""
    tools = [t for t in body.get("tools") or [] if isinstance(t, dict)]
    choice = body.get("tool_choice", "auto")
    messages = body.get("messages") or []
    if not tools or choice == "none":
        return None
    # Once it has a tool's result the model answers in text, so agent loops terminate.
    if messages and isinstance(messages[-1], dict) and messages[-1].get("role") == "tool":
        return None
    if isinstance(choice, dict):
        wanted = (choice.get("function") or {}).get("name")
        return next((t for t in tools if (t.get("function") or {}).get("name") == wanted), tools[0])
    return tools[0]


def plan_chat(model: str, body: dict[str, Any], tokens: int) -> Reply:
    """The reply to an OpenAI chat request: a tool call when tools are offered, else text/JSON."""
    prompt = chat_prompt(body.get("messages") or [])
    tool = pick_tool(body)
    if tool is None:
        limit = body.get("max_completion_tokens") or body.get("max_tokens")
        schema = response_schema(body.get("response_format"))
        return plan_text(
            model, prompt, tokens=tokens, max_tokens=limit, seed=body.get("seed"), schema=schema
        )
    function = tool.get("function") or {}
    name = str(function.get("name", ""))
    words = synth_tokens(digest(model, prompt, body.get("seed"), name), tokens)
    call = {
        "id": "call_" + digest(model, prompt, name).hex()[:24],
        "type": "function",
        "function": {
            "name": name,
            "arguments": orjson.dumps(sample_json(function.get("parameters"), words)).decode(),
        },
    }
    return Reply((), "tool_calls", count_tokens(prompt), tokens, (call,))


def embedding_vector(model: str, text: str, dims: int = EMBEDDING_DIM) -> list[float]:
    """A unit vector derived from a hash of (model, text), exactly representable as float32."""
    raw = b"".join(
        hashlib.sha256(digest(model, text, i)).digest() for i in range(-(-dims * 2 // 32))
    )
    values = [int.from_bytes(raw[2 * i : 2 * i + 2], "big") / 32767.5 - 1.0 for i in range(dims)]
    norm = sum(v * v for v in values) ** 0.5 or 1.0
    # A float32 round trip makes the float and base64 encodings carry identical numbers.
    return list(struct.unpack(f"<{dims}f", struct.pack(f"<{dims}f", *(v / norm for v in values))))


def encode_embedding(vector: list[float], encoding_format: Any) -> list[float] | str:
    if encoding_format == "base64":
        return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
    return vector


def embedding_inputs(value: Any) -> list[str] | None:
    """Texts of an embeddings `input`: a string, a list of strings or token-id lists."""
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list) or not value:
        return None
    if all(isinstance(v, int) for v in value):
        return [" ".join(map(str, value))]
    if all(isinstance(v, str | list) for v in value):
        return [v if isinstance(v, str) else " ".join(map(str, v)) for v in value]
    return None


# ---------------------------------------------------------------------------------------------
# Delivery: JSON after the generation time, or paced streams that report how they ended
# ---------------------------------------------------------------------------------------------


def sse(payload: Any) -> bytes:
    return b"data: " + orjson.dumps(payload) + b"\n\n"


SSE_DONE = b"data: [DONE]\n\n"


@dataclass(frozen=True)
class JsonAnswer:
    payload: Any
    tokens: int  # generation time, in token delays, before the document is sent


@dataclass(frozen=True)
class StreamAnswer:
    head: tuple[bytes, ...]  # sent at once
    body: tuple[bytes, ...]  # one frame per token, each after a token delay
    tail: tuple[bytes, ...]  # finish reason, usage, terminator
    media_type: str = "text/event-stream"


Answer = JsonAnswer | StreamAnswer
OnEnd = Callable[[str, bytes], None]  # (outcome: complete|cancelled|error, bytes sent)


class StreamDropped(Exception):
    """Raised inside a body iterator so the server aborts the connection mid-response."""


class _HideDroppedStreams(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and isinstance(record.exc_info[1], StreamDropped))


def hide_dropped_stream_logs() -> None:
    """Deliberate drops are not errors worth a traceback in the test output."""
    logger = logging.getLogger("uvicorn.error")
    if not any(isinstance(f, _HideDroppedStreams) for f in logger.filters):
        logger.addFilter(_HideDroppedStreams())


class TrackedStream(StreamingResponse):
    """A streaming response that reports exactly once how it ended, and what it sent.

    A complete stream reports before the response's terminating chunk goes out, so a client that
    has read the whole body always finds the counters settled. Other endings (client disconnect,
    deliberate abort) are seen by wrapping ``__call__``: Starlette cancels the body iterator
    when the client goes away, possibly while it is parked at a ``yield`` where no ``finally``
    of its own would run.
    """

    def __init__(self, frames: AsyncGenerator[bytes], media_type: str, on_end: OnEnd) -> None:
        self._frames = frames
        self._sent: list[bytes] = []
        self._on_end = on_end
        self._ended = False
        self._relay_gen = self._relay()
        super().__init__(self._relay_gen, media_type=media_type)

    def _end(self, outcome: str) -> None:
        if not self._ended:
            self._ended = True
            self._on_end(outcome, b"".join(self._sent))

    async def _relay(self) -> AsyncGenerator[bytes]:
        async for frame in self._frames:
            self._sent.append(frame)
            yield frame
        self._end("complete")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        outcome = "cancelled"
        try:
            await super().__call__(scope, receive, send)
        except Exception:  # a drop (or a bug); a task cancellation stays "cancelled"
            outcome = "error"
            raise
        finally:
            await self._relay_gen.aclose()
            await self._frames.aclose()
            self._end(outcome)


async def paced(
    answer: StreamAnswer, token_delay: float, *, drop: float | None = None
) -> AsyncGenerator[bytes]:
    """The answer's frames at generation pace; with `drop`, the connection dies `drop` seconds
    after the first few body frames."""
    for frame in answer.head:
        yield frame
    for frame in answer.body[:DROP_AFTER] if drop is not None else answer.body:
        if token_delay:
            await asyncio.sleep(token_delay)
        yield frame
    if drop is not None:
        await _die(drop)
    for frame in answer.tail:
        yield frame


async def _die(after: float) -> None:
    # A crashing backend rarely dies in the instant it sent its last bytes; 0 makes it so.
    await asyncio.sleep(after)
    raise StreamDropped("emulated connection drop")


async def _truncated(data: bytes, drop: float) -> AsyncGenerator[bytes]:
    yield data[: len(data) // 2]
    await _die(drop)


async def wait_disconnect(request: Request) -> None:
    # Once the body is read, the server's receive() blocks until the client goes away.
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def finished_before_disconnect(request: Request, work: Awaitable[Any]) -> bool:
    """Await `work` unless the client disconnects first (then cancel it), as vLLM aborts."""
    work_task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(wait_disconnect(request))
    await asyncio.wait({work_task, gone}, return_when=asyncio.FIRST_COMPLETED)
    finished = work_task.done() and not work_task.cancelled()
    for task in (work_task, gone):
        task.cancel()
    await asyncio.gather(work_task, gone, return_exceptions=True)
    return finished


CLIENT_GONE = 499  # nginx's "client closed request": never seen by anyone, but honest in logs


async def deliver(
    request: Request,
    answer: Answer,
    *,
    token_delay: float,
    on_end: OnEnd,
    drop: float | None = None,
) -> Response:
    """Send `answer`, paced like generation; `on_end` is called exactly once, however it ends.

    `drop` (seconds) cuts the connection mid-answer, after a few frames or half the document.
    """
    if isinstance(answer, StreamAnswer):
        return TrackedStream(paced(answer, token_delay, drop=drop), answer.media_type, on_end)
    if not await finished_before_disconnect(request, asyncio.sleep(token_delay * answer.tokens)):
        on_end("cancelled", b"")
        return Response(status_code=CLIENT_GONE)
    data = orjson.dumps(answer.payload)
    if drop is not None:
        return TrackedStream(_truncated(data, drop), "application/json", on_end)
    on_end("complete", data)
    return Response(data, media_type="application/json")


# ---------------------------------------------------------------------------------------------
# The vLLM-like server
# ---------------------------------------------------------------------------------------------

# "ignore_stream": answers JSON to a stream request, as some OpenAI-compatible servers do;
# "malformed": JSON that starts well and breaks off; "odd_embeddings": a well-formed embeddings
# answer whose items are not objects and whose usage numbers are null.
FAILURES = frozenset({"500", "text500", "hang", "drop", "slow_first_byte", "garbage",
                      "ignore_stream", "malformed", "odd_embeddings"})


@dataclass
class EmulatorState:
    """Configuration and counters; plain attributes, safe to read from the test thread."""

    served_models: list[str]
    token_delay: float = 0.0
    tokens: int = 8
    startup_delay: float = 0.0
    sleep_mode: bool = False
    embedding: bool = False
    wake_delay: float = 0.5
    sleep_delay: float = 0.1
    first_byte_delay: float = 1.0
    drop_delay: float = 0.05  # "drop": seconds between the last frame sent and the abort
    embedding_dim: int = EMBEDDING_DIM
    max_input_tokens: int | None = None  # vLLM's max_model_len: a longer input is refused (400)
    failure: str | None = None
    failures_left: int | None = None  # None: the failure mode stays on until cleared
    healthy: bool = True  # False makes /health answer 503
    sleeping: bool = False
    sleep_level: int = 0
    sleep_count: int = 0
    wake_count: int = 0
    sleeps_while_busy: int = 0  # /sleep called while requests were in flight
    # LoRA adapters registered at run time (vLLM's --enable-lora with
    # VLLM_ALLOW_RUNTIME_LORA_UPDATING): name -> path; each rides on served_models[0].
    adapters: dict[str, str] = field(default_factory=dict)
    adapter_delay: float = 0.02  # reading an adapter's few MB from disk
    adapter_loads: int = 0
    requests: Counter[str] = field(default_factory=Counter)  # admitted, per model
    paths: Counter[str] = field(default_factory=Counter)  # every inference call, per path
    in_flight: int = 0
    streams_in_flight: int = 0
    completed: int = 0
    cancelled: int = 0  # the client went away before the answer was complete
    cancelled_streams: int = 0
    dropped: int = 0  # aborted by the "drop" failure mode
    last_request: dict[str, Any] | None = None
    last_body: bytes = b""  # bytes of the last complete answer, to compare with what a client got
    started_at: float = field(default_factory=time.monotonic)
    created: int = field(default_factory=lambda: int(time.time()))
    _transition: asyncio.Lock = field(default_factory=asyncio.Lock, init=False, repr=False)

    @property
    def ready(self) -> bool:
        return time.monotonic() - self.started_at >= self.startup_delay

    def fail(self, mode: str | None, times: int | None = None) -> None:
        """Switch a failure mode on (for `times` requests, or until cleared) or off (None)."""
        if mode is not None and mode not in FAILURES:
            raise ValueError(f"unknown failure mode {mode!r}; expected one of {sorted(FAILURES)}")
        self.failure, self.failures_left = mode, times

    def take_failure(self) -> str | None:
        mode = self.failure
        if mode is not None and self.failures_left is not None:
            self.failures_left -= 1
            if self.failures_left <= 0:
                self.failure, self.failures_left = None, None
        return mode

    def finish(self, outcome: str, sent: bytes, *, streamed: bool) -> None:
        """Account for a request that ended: complete, cancelled by the client, or dropped."""
        self.in_flight -= 1
        if streamed:
            self.streams_in_flight -= 1
        if outcome == "complete":
            self.completed += 1
            self.last_body = sent
        elif outcome == "cancelled":
            self.cancelled += 1
            if streamed:
                self.cancelled_streams += 1
        else:
            self.dropped += 1


def vllm_error(status: int, message: str, kind: str, param: str | None = None) -> JSONResponse:
    return JSONResponse(
        {"error": {"message": message, "type": kind, "param": param, "code": status}}, status
    )


def _random_id(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex}"


def _usage(reply_usage: dict[str, int]) -> dict[str, Any]:
    return {**reply_usage, "prompt_tokens_details": None}


def _chat_answer(state: EmulatorState, model: str, body: dict[str, Any]) -> Answer:
    reply = plan_chat(model, body, state.tokens)
    base = {
        "id": _random_id("chatcmpl-"),
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
    }
    if not body.get("stream"):
        message = {
            "role": "assistant",
            "content": None if reply.tool_calls else reply.text,
            "tool_calls": list(reply.tool_calls),
        }
        choice = {
            "index": 0,
            "message": message,
            "logprobs": None,
            "finish_reason": reply.finish_reason,
            "stop_reason": None,
        }
        payload = {**base, "choices": [choice], "usage": _usage(reply.usage())}
        return JsonAnswer(payload, reply.completion_tokens)

    include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
    base["object"] = "chat.completion.chunk"
    usage_field = {"usage": None} if include_usage else {}

    def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        return sse({**base, "choices": [choice], **usage_field})

    calls = [{"tool_calls": [{"index": i, **call}]} for i, call in enumerate(reply.tool_calls)]
    tail = [chunk({}, reply.finish_reason)]
    if include_usage:
        tail.append(sse({**base, "choices": [], "usage": _usage(reply.usage())}))
    return StreamAnswer(
        head=(chunk({"role": "assistant", "content": ""}),),
        body=tuple(chunk(delta) for delta in calls + [{"content": p} for p in reply.pieces]),
        tail=(*tail, SSE_DONE),
    )


def _completion_answer(state: EmulatorState, model: str, body: dict[str, Any]) -> Answer:
    given = body.get("prompt")
    prompts = [given] if isinstance(given, str) else [str(p) for p in given or []]
    limit = body.get("max_tokens")
    replies = [
        plan_text(model, p, tokens=state.tokens, max_tokens=limit, seed=body.get("seed"))
        for p in prompts
    ]
    usage = {
        "prompt_tokens": sum(r.prompt_tokens for r in replies),
        "completion_tokens": sum(r.completion_tokens for r in replies),
    }
    usage = _usage({**usage, "total_tokens": usage["prompt_tokens"] + usage["completion_tokens"]})
    base = {
        "id": _random_id("cmpl-"),
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
    }

    def choice(index: int, text: str, finish: str | None) -> dict[str, Any]:
        return {
            "index": index,
            "text": text,
            "logprobs": None,
            "finish_reason": finish,
            "stop_reason": None,
        }

    if not body.get("stream"):
        choices = [choice(i, r.text, r.finish_reason) for i, r in enumerate(replies)]
        return JsonAnswer(
            {**base, "choices": choices, "usage": usage},
            max((r.completion_tokens for r in replies), default=0),
        )

    include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
    usage_field = {"usage": None} if include_usage else {}
    frames = [
        sse({**base, "choices": [choice(i, piece, None)], **usage_field})
        for i, r in enumerate(replies)
        for piece in r.pieces
    ]
    tail = [
        sse({**base, "choices": [choice(i, "", r.finish_reason)], **usage_field})
        for i, r in enumerate(replies)
    ]
    if include_usage:
        tail.append(sse({**base, "choices": [], "usage": usage}))
    return StreamAnswer(head=(), body=tuple(frames), tail=(*tail, SSE_DONE))


def _embedding_answer(state: EmulatorState, model: str, body: dict[str, Any]) -> Answer:
    texts = embedding_inputs(body.get("input")) or []
    dims = body.get("dimensions") or state.embedding_dim
    data = [
        {
            "index": i,
            "object": "embedding",
            "embedding": encode_embedding(
                embedding_vector(model, text, dims), body.get("encoding_format")
            ),
        }
        for i, text in enumerate(texts)
    ]
    tokens = sum(count_tokens(t) for t in texts)
    usage = _usage({"prompt_tokens": tokens, "total_tokens": tokens, "completion_tokens": 0})
    payload = {
        "id": _random_id("embd-"),
        "object": "list",
        "created": int(time.time()),
        "model": model,
        "data": data,
        "usage": usage,
    }
    return JsonAnswer(payload, 1)


def _responses_answer(state: EmulatorState, model: str, body: dict[str, Any]) -> Answer:
    given = body.get("input")
    prompt = given if isinstance(given, str) else chat_prompt(given or [])
    limit = body.get("max_output_tokens")
    reply = plan_text(model, prompt, tokens=state.tokens, max_tokens=limit)
    complete = reply.finish_reason == "stop"
    text = {"type": "output_text", "text": reply.text, "annotations": []}
    message = {
        "id": _random_id("msg_"),
        "type": "message",
        "status": "completed",
        "role": "assistant",
        "content": [text],
    }
    payload = {
        "id": _random_id("resp_"),
        "object": "response",
        "created_at": int(time.time()),
        "status": "completed" if complete else "incomplete",
        "incomplete_details": None if complete else {"reason": "max_output_tokens"},
        "error": None,
        "model": model,
        "instructions": body.get("instructions"),
        "max_output_tokens": limit,
        "output": [message],
        "parallel_tool_calls": True,
        "temperature": body.get("temperature", 1.0),
        "tool_choice": "auto",
        "tools": [],
        "top_p": body.get("top_p", 1.0),
        "usage": {
            "input_tokens": reply.prompt_tokens,
            "output_tokens": reply.completion_tokens,
            "total_tokens": reply.prompt_tokens + reply.completion_tokens,
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens_details": {"reasoning_tokens": 0},
        },
    }
    return JsonAnswer(payload, reply.completion_tokens)


# ---------------------------------------------------------------------------------------------
# Rerank, images and audio, as vLLM, llama.cpp and OpenAI document them
# ---------------------------------------------------------------------------------------------


def relevance(model: str, query: str, document: str) -> float:
    """A score in (0, 1): shared words count most, a hash breaks ties (so order is stable)."""
    words = set(query.lower().split())
    shared = len(words & set(document.lower().split())) / max(1, len(words))
    return round(0.9 * shared + 0.1 * digest(model, query, document)[0] / 256, 6)


def document_text(document: Any) -> str:
    """A rerank document: a string, or an object with `text` (Jina, Cohere v2)."""
    return str(document.get("text", "")) if isinstance(document, dict) else str(document)


def _rerank_answer(state: EmulatorState, model: str, body: dict[str, Any]) -> Answer:
    query = str(body.get("query", ""))
    documents = body.get("documents") or []
    scored = sorted(
        ((i, relevance(model, query, document_text(d))) for i, d in enumerate(documents)),
        key=lambda item: -item[1],
    )
    top_n = body.get("top_n")
    if isinstance(top_n, int) and top_n > 0:
        scored = scored[:top_n]
    results = [
        {"index": i, "document": {"text": document_text(documents[i])}, "relevance_score": score}
        for i, score in scored
    ]
    tokens = count_tokens(query) + sum(count_tokens(document_text(d)) for d in documents)
    payload = {
        "id": _random_id("rerank-"),
        "model": model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        "results": results,
    }
    return JsonAnswer(payload, 1)


def tiny_png(seed: bytes, width: int, height: int) -> bytes:
    """A valid PNG of one colour taken from `seed`."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        checksum = struct.pack(">I", zlib.crc32(kind + data))
        return struct.pack(">I", len(data)) + kind + data + checksum

    row = b"\x00" + bytes(seed[:3]) * width
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
            + chunk(b"IDAT", zlib.compress(row * height)) + chunk(b"IEND", b""))


def image_size(size: Any) -> tuple[int, int]:
    """`WIDTHxHEIGHT` ("auto" and the rest: 256x256), each side at most 1024."""
    width, _, height = str(size).partition("x")
    if not (width.isdigit() and height.isdigit()):
        return 256, 256
    return min(int(width), 1024), min(int(height), 1024)


def _image_answer(state: EmulatorState, model: str, body: dict[str, Any]) -> Answer:
    prompt = str(body.get("prompt", ""))
    width, height = image_size(body.get("size"))
    count = body.get("n") if isinstance(body.get("n"), int) else 1
    images = [tiny_png(digest(model, prompt, i), width, height) for i in range(max(1, count))]
    as_url = body.get("response_format") == "url"
    data = [
        {"url": "data:image/png;base64," + base64.b64encode(png).decode()} if as_url
        else {"b64_json": base64.b64encode(png).decode()}
        for png in images
    ]
    return JsonAnswer({"created": int(time.time()), "data": data}, len(images))


SAMPLE_RATE = 16000
SPEECH_MEDIA_TYPES = {"mp3": "audio/mpeg", "opus": "audio/opus", "aac": "audio/aac",
                      "flac": "audio/flac", "wav": "audio/wav", "pcm": "audio/pcm"}


def speech_frames(model: str, text: str, voice: Any, audio_format: str) -> list[bytes]:
    """The emulated voice: one 50 ms frame of 16-bit PCM per word, a WAV header first when
    `wav` is asked for (other formats carry the same samples: only the framing is emulated)."""
    words = text.split() or [""]
    frames = []
    for word in words:
        noise = hashlib.sha256(digest(model, voice, word)).digest() * 50
        frames.append(noise[: SAMPLE_RATE // 20 * 2])
    if audio_format == "wav":
        size = sum(len(f) for f in frames)
        header = (b"RIFF" + struct.pack("<I", 36 + size) + b"WAVEfmt "
                  + struct.pack("<IHHIIHH", 16, 1, 1, SAMPLE_RATE, SAMPLE_RATE * 2, 2, 16)
                  + b"data" + struct.pack("<I", size))
        frames.insert(0, header)
    return frames


async def _speech(request: Request) -> Response:
    """POST /v1/audio/speech: the audio as it is produced, one frame per token delay."""
    state: EmulatorState = request.app.state.emulator
    state.paths[request.url.path] += 1
    try:
        body = orjson.loads(await request.body())
    except orjson.JSONDecodeError as exc:
        return vllm_error(400, f"JSON decode error: {exc}", "BadRequestError")
    model = body.get("model") if isinstance(body, dict) else None
    if model not in state.served_models:
        return vllm_error(404, f"The model `{model}` does not exist.", "NotFoundError", "model")
    if not isinstance(body.get("input"), str) or not body["input"]:
        return vllm_error(400, "Field required: input", "BadRequestError", "input")
    audio_format = body.get("response_format") or "mp3"
    if audio_format not in SPEECH_MEDIA_TYPES:
        return vllm_error(400, f"Unsupported response_format {audio_format!r}",
                          "BadRequestError", "response_format")
    state.last_request = body
    state.requests[model] += 1
    state.in_flight += 1
    state.streams_in_flight += 1
    frames = speech_frames(model, body["input"], body.get("voice"), audio_format)
    answer = StreamAnswer(head=(frames[0],), body=tuple(frames[1:]), tail=(),
                          media_type=SPEECH_MEDIA_TYPES[audio_format])

    def on_end(outcome: str, sent: bytes) -> None:
        state.finish(outcome, sent, streamed=True)

    return await deliver(request, answer, token_delay=state.token_delay, on_end=on_end)


def transcript(model: str, audio: bytes, tokens: int) -> str:
    return "".join(synth_tokens(digest(model, hashlib.sha256(audio).hexdigest()), tokens)).strip()


def _subtitles(text: str, vtt: bool) -> str:
    stamp = "00:00:00.000 --> 00:00:02.000" if vtt else "00:00:00,000 --> 00:00:02,000"
    return ("WEBVTT\n\n" if vtt else "1\n") + f"{stamp}\n{text}\n"


async def _transcribe(request: Request) -> Response:
    """POST /v1/audio/transcriptions and /translations: a multipart upload (`file`, `model`,
    `response_format`, ...); the transcript is a pure function of the model and the file."""
    state: EmulatorState = request.app.state.emulator
    state.paths[request.url.path] += 1
    try:
        form = await request.form()
    except Exception as exc:  # python-multipart's parse errors have no common base
        return vllm_error(400, f"Invalid form data: {exc}", "BadRequestError")
    upload, model = form.get("file"), form.get("model")
    if model not in state.served_models:
        return vllm_error(404, f"The model `{model}` does not exist.", "NotFoundError", "model")
    if upload is None or isinstance(upload, str):
        return vllm_error(400, "Field required: file", "BadRequestError", "file")
    audio = await upload.read()
    fields = {name: value for name, value in form.items() if isinstance(value, str)}
    state.last_request = {**fields, "file": {"filename": upload.filename, "size": len(audio),
                                             "sha256": hashlib.sha256(audio).hexdigest()}}
    state.requests[str(model)] += 1
    text = transcript(str(model), audio, state.tokens)
    kind = fields.get("response_format", "json")
    if kind == "text":
        return PlainTextResponse(text)
    if kind in ("srt", "vtt"):
        return PlainTextResponse(_subtitles(text, vtt=kind == "vtt"))
    if kind == "verbose_json":
        task = "translate" if request.url.path.endswith("translations") else "transcribe"
        segment = {"id": 0, "start": 0.0, "end": 2.0, "text": text}
        return JSONResponse({"task": task, "language": fields.get("language", "english"),
                             "duration": 2.0, "text": text, "segments": [segment]})
    return JSONResponse({"text": text})


def anthropic_prompt(body: dict[str, Any]) -> str:
    """The text of a Messages request: its system prompt and each message's text blocks."""
    system = body.get("system")
    lines = [f"system: {message_text(system)}"] if system else []
    for message in body.get("messages") or []:
        if isinstance(message, dict):
            lines.append(f"{message.get('role')}: {message_text(message.get('content'))}")
    return "\n".join(lines)


def anthropic_event(payload: dict[str, Any]) -> bytes:
    return b"event: " + payload["type"].encode() + b"\ndata: " + orjson.dumps(payload) + b"\n\n"


def _messages_answer(state: EmulatorState, model: str, body: dict[str, Any]) -> Answer:
    """Anthropic's Messages API, as vLLM and llama.cpp serve it at /v1/messages (text only)."""
    reply = plan_text(model, anthropic_prompt(body), tokens=state.tokens,
                      max_tokens=body.get("max_tokens"))
    stop = "end_turn" if reply.finish_reason == "stop" else "max_tokens"
    usage = {"input_tokens": reply.prompt_tokens, "output_tokens": reply.completion_tokens}
    message = {"id": _random_id("msg_"), "type": "message", "role": "assistant", "model": model,
               "content": [{"type": "text", "text": reply.text}], "stop_reason": stop,
               "stop_sequence": None, "usage": usage}
    if not body.get("stream"):
        return JsonAnswer(message, reply.completion_tokens)
    start = {**message, "content": [], "stop_reason": None,
             "usage": {**usage, "output_tokens": 0}}
    head = (anthropic_event({"type": "message_start", "message": start}),
            anthropic_event({"type": "content_block_start", "index": 0,
                             "content_block": {"type": "text", "text": ""}}))
    pieces = tuple(anthropic_event({"type": "content_block_delta", "index": 0,
                                    "delta": {"type": "text_delta", "text": piece}})
                   for piece in reply.pieces)
    tail = (anthropic_event({"type": "content_block_stop", "index": 0}),
            anthropic_event({"type": "message_delta",
                             "delta": {"stop_reason": stop, "stop_sequence": None},
                             "usage": {"output_tokens": reply.completion_tokens}}),
            anthropic_event({"type": "message_stop"}))
    return StreamAnswer(head, pieces, tail)


def _count_tokens_answer(state: EmulatorState, model: str, body: dict[str, Any]) -> Answer:
    return JsonAnswer({"input_tokens": count_tokens(anthropic_prompt(body))}, 0)


Renderer = Callable[[EmulatorState, str, dict[str, Any]], Answer]
# path -> (renderer, required field, API name in vLLM's "does not support" errors, embedding
# API? True: only `--runner pooling` models (embedding=True) serve it; None: any model does)
ENDPOINTS: dict[str, tuple[Renderer, str, str, bool | None]] = {
    "/v1/chat/completions": (_chat_answer, "messages", "Chat Completions API", False),
    "/v1/completions": (_completion_answer, "prompt", "Completions API", False),
    "/v1/embeddings": (_embedding_answer, "input", "Embeddings API", True),
    "/v1/responses": (_responses_answer, "input", "Responses API", False),
    # vLLM serves rerank for pooling (cross-encoder) models under all three paths
    "/v1/rerank": (_rerank_answer, "documents", "Rerank API", True),
    "/rerank": (_rerank_answer, "documents", "Rerank API", True),
    "/v2/rerank": (_rerank_answer, "documents", "Rerank API", True),
    "/v1/images/generations": (_image_answer, "prompt", "Images API", None),
    "/v1/messages": (_messages_answer, "messages", "Messages API", False),
    "/v1/messages/count_tokens": (_count_tokens_answer, "messages", "Messages API", False),
}


async def _admit(request: Request, state: EmulatorState) -> tuple[dict[str, Any], str] | Response:
    """Validate a request as vLLM would: the body, then the model, then what it can serve."""
    if not state.ready:
        return vllm_error(503, "The server is still starting up", "ServiceUnavailableError")
    try:
        body = orjson.loads(await request.body())
    except orjson.JSONDecodeError as exc:
        return vllm_error(400, f"JSON decode error: {exc}", "BadRequestError")
    if not isinstance(body, dict):
        return vllm_error(400, "The request body must be a JSON object", "BadRequestError")
    state.last_request = body
    _, required, api_name, embedding_api = ENDPOINTS[request.url.path]
    model = body.get("model") or state.served_models[0]  # vLLM defaults to its served model
    if model not in state.served_models and model not in state.adapters:
        return vllm_error(404, f"The model `{model}` does not exist.", "NotFoundError", "model")
    if body.get(required) in (None, "", []):
        return vllm_error(400, f"Field required: {required}", "BadRequestError", required)
    if embedding_api is not None and embedding_api != state.embedding:
        return vllm_error(400, f"The model does not support {api_name}", "BadRequestError")
    if request.url.path == "/v1/responses" and body.get("stream"):
        return vllm_error(400, "Streaming responses are not emulated", "BadRequestError", "stream")
    if required == "input" and embedding_api and embedding_inputs(body["input"]) is None:
        return vllm_error(400, "Invalid input", "BadRequestError", "input")
    if state.sleeping:
        return vllm_error(
            503, "The model is sleeping; call /wake_up first", "ServiceUnavailableError"
        )
    return body, model


def _failure_response(mode: str) -> Response:
    if mode == "500":
        return vllm_error(500, "Emulated internal server error", "InternalServerError")
    if mode == "text500":
        return PlainTextResponse("Internal Server Error", 500)
    if mode == "malformed":
        return Response(b'{"object": "list", "data": [{"embedding": [0.1, ', 200,
                        media_type="application/json")
    if mode == "odd_embeddings":
        odd = {"object": "list", "data": [1, "two", None], "model": "x",
               "usage": {"prompt_tokens": None, "total_tokens": None}}
        return Response(orjson.dumps(odd), 200, media_type="application/json")
    return Response(b"<html><body>Bad Gateway</body>", 200, media_type="application/json")


def _client_gone(state: EmulatorState) -> Response:
    state.finish("cancelled", b"", streamed=False)
    return Response(status_code=CLIENT_GONE)


def _too_long(state: EmulatorState, body: dict[str, Any]) -> Response | None:
    """vLLM refuses the whole request when one input exceeds the model's context."""
    limit = state.max_input_tokens
    texts = embedding_inputs(body.get("input")) or []
    if limit is None or all(count_tokens(text) <= limit for text in texts):
        return None
    message = f"This model's maximum context length is {limit} tokens."
    return vllm_error(400, message, "BadRequestError", "input")


async def _inference(request: Request) -> Response:
    state: EmulatorState = request.app.state.emulator
    state.paths[request.url.path] += 1
    admitted = await _admit(request, state)
    if isinstance(admitted, Response):
        return admitted
    body, model = admitted
    state.requests[model] += 1
    state.in_flight += 1
    too_long = _too_long(state, body)
    if too_long is not None:
        state.in_flight -= 1
        return too_long
    mode = state.take_failure()
    if mode in {"500", "text500", "garbage", "malformed", "odd_embeddings"}:
        state.in_flight -= 1
        return _failure_response(mode)
    if mode == "ignore_stream":
        body = {**body, "stream": False}
    if mode == "hang":
        await wait_disconnect(request)
        return _client_gone(state)
    slow = mode == "slow_first_byte"
    if slow and not await finished_before_disconnect(
        request, asyncio.sleep(state.first_byte_delay)
    ):
        return _client_gone(state)
    answer = ENDPOINTS[request.url.path][0](state, model, body)
    streamed = isinstance(answer, StreamAnswer)
    if streamed:
        state.streams_in_flight += 1

    def on_end(outcome: str, sent: bytes) -> None:
        state.finish(outcome, sent, streamed=streamed)

    drop = state.drop_delay if mode == "drop" else None
    return await deliver(request, answer, token_delay=state.token_delay, on_end=on_end, drop=drop)


async def _health(request: Request) -> Response:
    state: EmulatorState = request.app.state.emulator
    return Response(status_code=200 if state.ready and state.healthy else 503)


async def _models(request: Request) -> Response:
    state: EmulatorState = request.app.state.emulator
    if not state.ready:
        return vllm_error(503, "The server is still starting up", "ServiceUnavailableError")
    cards = [
        {
            "id": name,
            "object": "model",
            "created": state.created,
            "owned_by": "vllm",
            "root": name,
            "parent": None,
            "max_model_len": 4096,
            "permission": [],
        }
        for name in state.served_models
    ]
    cards += [{"id": name, "object": "model", "created": state.created, "owned_by": "vllm",
               "root": path, "parent": state.served_models[0], "max_model_len": None,
               "permission": []} for name, path in state.adapters.items()]
    return JSONResponse({"object": "list", "data": cards})


async def _lora_request(request: Request) -> tuple[EmulatorState, dict[str, Any]] | Response:
    state: EmulatorState = request.app.state.emulator
    try:
        body = orjson.loads(await request.body())
    except orjson.JSONDecodeError as exc:
        return vllm_error(400, f"JSON decode error: {exc}", "BadRequestError")
    if not isinstance(body, dict) or not body.get("lora_name"):
        return vllm_error(400, "Field required: lora_name", "BadRequestError", "lora_name")
    return state, body


async def _load_lora_adapter(request: Request) -> Response:
    """As vLLM: the adapter's folder must hold a PEFT adapter (its adapter_config.json)."""
    checked = await _lora_request(request)
    if isinstance(checked, Response):
        return checked
    state, body = checked
    name, path = body["lora_name"], body.get("lora_path")
    if not path:
        return vllm_error(400, "Both 'lora_name' and 'lora_path' must be provided.",
                          "BadRequestError")
    if name in state.adapters:
        return vllm_error(400, f"The lora adapter '{name}' has already been loaded.",
                          "InvalidUserInput")
    await asyncio.sleep(state.adapter_delay)
    if not (Path(path) / "adapter_config.json").is_file():  # vLLM leaves the path out
        return vllm_error(404, f"Loading lora {name} failed: No adapter found for <path>",
                          "NotFoundError")
    state.adapters[name] = path
    state.adapter_loads += 1
    return PlainTextResponse(f"Success: LoRA adapter '{name}' added successfully.")


async def _unload_lora_adapter(request: Request) -> Response:
    checked = await _lora_request(request)
    if isinstance(checked, Response):
        return checked
    state, body = checked
    if state.adapters.pop(body["lora_name"], None) is None:
        return vllm_error(404, f"The lora adapter '{body['lora_name']}' cannot be found.",
                          "NotFoundError")
    return PlainTextResponse(f"Success: LoRA adapter '{body['lora_name']}' removed successfully.")


async def _sleep(request: Request) -> Response:
    state: EmulatorState = request.app.state.emulator
    level = request.query_params.get("level", "1")
    if level not in {"0", "1", "2"}:
        return vllm_error(400, f"Invalid sleep level {level!r}", "BadRequestError", "level")
    async with state._transition:
        if not state.sleeping:
            state.sleeps_while_busy += state.in_flight > 0
            await asyncio.sleep(state.sleep_delay)  # offloading weights takes a moment
            state.sleeping, state.sleep_level = True, int(level)
            state.sleep_count += 1
    return Response(status_code=200)


async def _wake_up(request: Request) -> Response:
    state: EmulatorState = request.app.state.emulator
    async with state._transition:
        if state.sleeping:
            await asyncio.sleep(state.wake_delay)  # is_sleeping stays true until weights are back
            state.sleeping, state.sleep_level = False, 0
            state.wake_count += 1
    return Response(status_code=200)


async def _is_sleeping(request: Request) -> Response:
    return JSONResponse({"is_sleeping": request.app.state.emulator.sleeping})


def create_app(
    served_models: list[str] | str,
    *,
    token_delay: float = 0.0,
    tokens: int = 8,
    startup_delay: float = 0.0,
    sleep_mode: bool = False,
    failure: str | None = None,
    embedding: bool = False,
    wake_delay: float = 0.5,
    sleep_delay: float = 0.1,
    first_byte_delay: float = 1.0,
    embedding_dim: int = EMBEDDING_DIM,
    asleep: bool = False,
    lora: bool = False,
) -> Starlette:
    """A vLLM-like server for `served_models`.

    `embedding=True` makes it an embedding model (like `vllm serve --runner pooling`): it serves
    /v1/embeddings and refuses generation, and the other way round when False. `sleep_mode`
    adds vLLM's dev endpoints /sleep, /wake_up and /is_sleeping; `asleep` starts it asleep, as
    an operator leaves a server for the gateway to wake. `lora` adds vLLM's runtime LoRA API
    (/v1/load_lora_adapter, /v1/unload_lora_adapter), as `--enable-lora` with
    VLLM_ALLOW_RUNTIME_LORA_UPDATING=True does.
    """
    models = [served_models] if isinstance(served_models, str) else list(served_models)
    if not models:
        raise ValueError("at least one served model is needed")
    state = EmulatorState(
        models,
        token_delay=token_delay,
        tokens=tokens,
        startup_delay=startup_delay,
        sleep_mode=sleep_mode,
        embedding=embedding,
        wake_delay=wake_delay,
        sleep_delay=sleep_delay,
        first_byte_delay=first_byte_delay,
        embedding_dim=embedding_dim,
    )
    state.fail(failure)
    state.sleeping, state.sleep_level = asleep, int(asleep)
    routes = [
        Route("/health", _health),
        Route("/v1/models", _models),
        *(Route(path, _inference, methods=["POST"]) for path in ENDPOINTS),
        Route("/v1/audio/speech", _speech, methods=["POST"]),
        Route("/v1/audio/transcriptions", _transcribe, methods=["POST"]),
        Route("/v1/audio/translations", _transcribe, methods=["POST"]),
    ]
    if lora:
        routes += [
            Route("/v1/load_lora_adapter", _load_lora_adapter, methods=["POST"]),
            Route("/v1/unload_lora_adapter", _unload_lora_adapter, methods=["POST"]),
        ]
    if sleep_mode:
        routes += [
            Route("/sleep", _sleep, methods=["POST"]),
            Route("/wake_up", _wake_up, methods=["POST"]),
            Route("/is_sleeping", _is_sleeping),
        ]
    hide_dropped_stream_logs()
    app = Starlette(routes=routes)
    app.state.emulator = state
    return app


# ---------------------------------------------------------------------------------------------
# Running as a process
# ---------------------------------------------------------------------------------------------


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="vLLM-like OpenAI-compatible test server")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    parser.add_argument("--model", action="append", required=True, help="repeatable")
    parser.add_argument("--startup-delay", type=float, default=0.0)
    parser.add_argument("--token-delay", type=float, default=0.0)
    parser.add_argument("--tokens", type=int, default=8)
    parser.add_argument("--embedding", action="store_true", help="serve embeddings only")
    parser.add_argument("--sleep-mode", action="store_true", help="enable /sleep and /wake_up")
    parser.add_argument("--wake-delay", type=float, default=0.5)
    parser.add_argument("--lora", action="store_true", help="enable the runtime LoRA API")
    parser.add_argument("--failure", choices=sorted(FAILURES))
    parser.add_argument("--graceful-timeout", type=float, default=5.0)
    return parser.parse_args(argv)


def _exit_cleanly(_signum: int, _frame: object) -> None:
    raise SystemExit(0)


def main(argv: list[str] | None = None) -> None:
    args = _parse_args(argv)
    app = create_app(
        args.model,
        token_delay=args.token_delay,
        tokens=args.tokens,
        startup_delay=args.startup_delay,
        sleep_mode=args.sleep_mode,
        failure=args.failure,
        embedding=args.embedding,
        wake_delay=args.wake_delay,
        lora=args.lora,
    )
    # Bind before announcing, so the printed URL (with the real port when --port 0) is live.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((args.host, args.port))
    sock.listen(128)
    host, port = sock.getsockname()[:2]
    print(f"openai_server: serving {', '.join(args.model)} on http://{host}:{port}", flush=True)
    config = uvicorn.Config(
        app, log_level="warning", timeout_graceful_shutdown=args.graceful_timeout
    )
    # uvicorn shuts down gracefully on SIGTERM, then re-raises the signal to the handler it
    # found; this one makes that a clean exit 0 rather than a death by signal (-15).
    signal.signal(signal.SIGTERM, _exit_cleanly)
    uvicorn.Server(config).run(sockets=[sock])


if __name__ == "__main__":
    main()
