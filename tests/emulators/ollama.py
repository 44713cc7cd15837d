"""An Ollama emulator for the gateway's tests, written from Ollama's API docs and sources.

It keeps Ollama's residency behaviour, which is what the gateway's Ollama driver has to live
with: requests load models implicitly, `keep_alive` decides when an idle model goes away (checked
lazily on each request, against a monotonic clock), and when memory is short Ollama evicts its
least-recently-used idle models by itself. Names are canonical as in Ollama: "llama3" is served,
listed and counted as "llama3:latest".

Counters live on ``app.state.emulator`` (an `EmulatorState`) as plain attributes, and for an
emulator run as a process (``python -m tests.emulators.ollama --model NAME=GB ...``, on another
network host, say) the memory ones are read at ``GET /_emulator``.
"""

from __future__ import annotations

import asyncio
import random
import re
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from .openai_server import (
    EMBEDDING_DIM,
    SSE_DONE,
    Answer,
    JsonAnswer,
    Reply,
    StreamAnswer,
    count_tokens,
    deliver,
    digest,
    embedding_inputs,
    embedding_vector,
    encode_embedding,
    plan_chat,
    plan_text,
    response_schema,
    sse,
)

GB = 10**9  # sizes are decimal gigabytes, as in the gateway's `size_gb`
DEFAULT_SIZE_GB = 4.0
FOREVER = timedelta(days=365 * 292)  # what Go's maximal time.Duration looks like in expires_at
NDJSON = "application/x-ndjson"
_DURATION_PART = re.compile(r"(\d+\.?\d*|\.\d+)(ns|us|µs|ms|s|m|h)")
_UNIT_SECONDS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def canonical_name(name: str) -> str:
    """Ollama's full model name: the tag defaults to "latest"."""
    return name if ":" in name.rsplit("/", 1)[-1] else f"{name}:latest"


def parse_keep_alive(value: Any, default: float | None) -> float | None:
    """Idle seconds before unloading (None: forever), read as Ollama's api.Duration.

    A JSON number is seconds, a string is a Go duration ("5m", "1h30m", "0"); negative values
    mean forever. Go rejects a bare number in a string ("300"), and so does this.
    """
    if value is None:
        return default
    if isinstance(value, int | float) and not isinstance(value, bool):
        return None if value < 0 else float(value)
    if not isinstance(value, str):
        raise ValueError(f"invalid keep_alive {value!r}")
    sign, text = (-1.0, value[1:]) if value.startswith("-") else (1.0, value.removeprefix("+"))
    if text == "0":
        return 0.0
    parts = _DURATION_PART.findall(text)
    if not parts or "".join(number + unit for number, unit in parts) != text:
        raise ValueError(f'time: invalid duration "{value}"')
    seconds = sign * sum(float(number) * _UNIT_SECONDS[unit] for number, unit in parts)
    return None if seconds < 0 else seconds


def server_keep_alive(value: float | str) -> float | None:
    """OLLAMA_KEEP_ALIVE as Ollama's server reads it: a Go duration ("5m", "1.5s"), or a bare
    integer of seconds ("300"); negative means forever. Numbers are taken as seconds too."""
    if isinstance(value, str) and value.lstrip("+-").isdigit():
        value = int(value)
    return parse_keep_alive(value, None)


class LoadError(Exception):
    """A model that fails to load, as when Ollama's llama runner dies."""


@dataclass
class Resident:
    name: str
    size: int
    loaded_at: float
    keep_alive: float | None  # idle seconds before expiry; None: forever
    last_used: float
    refs: int = 0  # requests holding the model
    deadline: float | None = None  # monotonic expiry once idle; None while busy or forever
    # What /api/ps shows: like Ollama, the expiry set when the model last went idle, even while
    # a request that has changed its keep-alive runs (None: forever); before that, unset.
    shown_expiry: float | None = None
    idled: bool = False


class EmulatorState:
    """Residency and counters of one emulated Ollama.

    Everything is a plain attribute, readable from the test thread while the server runs in its
    own. The resident set is guarded by a threading lock because tests may `evict()` from theirs.
    Counters are keyed by canonical model name.
    """

    def __init__(
        self,
        models: dict[str, int],
        *,
        load_delay: float,
        memory_gb: float | None,
        max_loaded: int | None,
        token_delay: float,
        tokens: int,
        default_keep_alive: float | None,
        embedding_dim: int,
        version: str,
        refuse_over_memory: bool = False,
    ) -> None:
        self.models = models  # canonical name -> size in bytes
        self.load_delay = load_delay
        self.memory_bytes = None if memory_gb is None else int(memory_gb * GB)
        self.max_loaded = max_loaded  # OLLAMA_MAX_LOADED_MODELS
        # A GPU that cannot make room: a load over `memory_gb` fails (as Ollama's does when
        # what is resident is pinned), instead of Ollama evicting idle models by itself.
        self.refuse_over_memory = refuse_over_memory
        self.refused_loads: Counter[str] = Counter()
        self.load_spans: list[tuple[str, float, float]] = []  # (model, start, end), monotonic
        self.token_delay = token_delay
        self.tokens = tokens
        self.default_keep_alive = default_keep_alive  # OLLAMA_KEEP_ALIVE
        self.embedding_dim = embedding_dim
        self.version = version
        self.created = datetime.now(UTC)
        self.resident: dict[str, Resident] = {}
        self.load_count: Counter[str] = Counter()
        self.unload_count: Counter[str] = Counter()
        self.evictions: list[
            tuple[str, str]
        ] = []  # (model, memory|max_loaded|expired|unload|forced)
        self.max_loaded_bytes = 0
        self.requests: Counter[str] = Counter()  # inference requests (not load/unload calls)
        self.keep_alive_calls: Counter[str] = Counter()  # no-prompt load/pin/unload calls
        self.in_flight = 0
        self.unloads_while_busy = 0  # keep_alive 0 arrived while the model had requests
        self.load_errors: dict[str, str] = {}  # canonical name -> error its loads fail with
        self.last_request: dict[str, Any] | None = None
        self.last_body = b""  # bytes of the last complete inference answer
        self._lock = threading.Lock()
        self._load_lock = asyncio.Lock()
        self._released = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def loaded(self) -> frozenset[str]:
        with self._lock:
            return frozenset(self.resident)

    @property
    def loaded_bytes(self) -> int:
        with self._lock:
            return self._bytes()

    def evict(self, name: str, reason: str = "forced") -> bool:
        """Unload `name` now, as if Ollama had dropped it on its own; safe from any thread."""
        key = canonical_name(name)
        with self._lock:
            found = key in self.resident
            if found:
                self._unload(key, reason)
        if found and self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._released.set)
        return found

    def running(self) -> list[tuple[Resident, datetime]]:
        """Resident models (after lazy expiry) with their wall-clock expiry, for /api/ps."""
        with self._lock:
            now = time.monotonic()
            self._expire(now)
            return [(r, self._expires_at(r, now)) for r in self.resident.values()]

    async def acquire(self, key: str, keep_alive: float | None) -> float:
        """Make `key` resident and hold it; returns the seconds this call spent loading it."""
        loop = asyncio.get_running_loop()
        if loop is not self._loop:  # served again, on a new event loop: asyncio bits are per loop
            self._loop, self._load_lock, self._released = loop, asyncio.Lock(), asyncio.Event()
        if self._hold(key, keep_alive):
            return 0.0
        async with self._load_lock:  # Ollama's scheduler loads one model at a time
            if self._hold(key, keep_alive):
                return 0.0
            if key in self.load_errors:
                raise LoadError(self.load_errors[key])
            if self.refuse_over_memory:
                self._refuse_if_over(key)
            await self._make_room(key)
            started = time.monotonic()
            await asyncio.sleep(self.load_delay)
            with self._lock:
                now = time.monotonic()
                self.resident[key] = Resident(key, self.models[key], now, keep_alive, now, refs=1)
                self.load_count[key] += 1
                self.max_loaded_bytes = max(self.max_loaded_bytes, self._bytes())
                self.load_spans.append((key, started, now))
            return now - started

    def _refuse_if_over(self, key: str) -> None:
        """Fail the load with Ollama's out-of-memory error when `key` does not fit beside what
        is resident."""
        with self._lock:
            self._expire(time.monotonic())
            need, used = self.models[key], self._bytes()
            if self.memory_bytes is None or used + need <= self.memory_bytes:
                return
            self.refused_loads[key] += 1
        free = max(self.memory_bytes - used, 0)
        raise LoadError(f"model requires more system memory ({need / GB:.1f} GiB) than is "
                        f"available ({free / GB:.1f} GiB)")

    def release(self, key: str) -> None:
        """Drop a hold; an idle model starts its keep_alive countdown (0: unload right away)."""
        with self._lock:
            resident = self.resident.get(key)
            if resident is not None:
                resident.refs -= 1
                resident.last_used = time.monotonic()
                if resident.refs == 0:
                    self._start_idling(resident)
        self._released.set()

    def request_unload(self, key: str) -> None:
        """keep_alive 0 without a prompt: unload now, or once the model's requests finish."""
        with self._lock:
            resident = self.resident.get(key)
            if resident is None:
                return
            resident.keep_alive = 0.0
            if resident.refs:
                self.unloads_while_busy += 1
                return
            self._unload(key, "unload")
        self._released.set()

    # The helpers below expect self._lock to be held.

    def _bytes(self) -> int:
        return sum(r.size for r in self.resident.values())

    def _unload(self, key: str, reason: str) -> None:
        del self.resident[key]
        self.unload_count[key] += 1
        self.evictions.append((key, reason))

    def _expire(self, now: float) -> None:
        for resident in list(self.resident.values()):
            if resident.refs == 0 and resident.deadline is not None and resident.deadline <= now:
                self._unload(resident.name, "expired")

    def _start_idling(self, resident: Resident) -> None:
        if resident.keep_alive == 0:
            self._unload(resident.name, "unload")
            return
        if resident.keep_alive is not None:
            resident.deadline = resident.last_used + resident.keep_alive
        resident.idled, resident.shown_expiry = True, resident.deadline

    def _hold(self, key: str, keep_alive: float | None) -> bool:
        with self._lock:
            now = time.monotonic()
            self._expire(now)
            resident = self.resident.get(key)
            if resident is None:
                return False
            resident.refs += 1
            resident.keep_alive, resident.deadline, resident.last_used = keep_alive, None, now
            return True

    def _over_budget(self, need: int) -> str | None:
        if not self.resident:
            return None  # a model larger than memory still loads (Ollama spills it to the CPU)
        if self.max_loaded is not None and len(self.resident) >= self.max_loaded:
            return "max_loaded"
        if self.memory_bytes is not None and self._bytes() + need > self.memory_bytes:
            return "memory"
        return None

    def _expires_at(self, resident: Resident, now: float) -> datetime:
        wall = datetime.now(UTC).astimezone()
        if resident.idled:  # Ollama updates the shown expiry only when the model goes idle
            deadline = resident.shown_expiry
        else:  # never idle yet: Ollama computes it from the current keep-alive
            deadline = None if resident.keep_alive is None else now + resident.keep_alive
        return wall + FOREVER if deadline is None else wall + timedelta(seconds=deadline - now)

    async def _make_room(self, key: str) -> None:
        """Unload least-recently-used idle models until `key` fits; wait while all are busy."""
        while True:
            self._released.clear()
            with self._lock:
                self._expire(time.monotonic())
                reason = self._over_budget(self.models[key])
                if reason is None:
                    return
                idle = [r for r in self.resident.values() if r.refs == 0]
                if idle:
                    self._unload(min(idle, key=lambda r: r.last_used).name, reason)
                    continue
            await self._released.wait()


# ---------------------------------------------------------------------------------------------
# Request plumbing
# ---------------------------------------------------------------------------------------------


def api_error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status)


def v1_error(status: int, message: str) -> JSONResponse:
    """Ollama's OpenAI-layer error (openai.NewError): the type follows the status."""
    kind = {400: "invalid_request_error", 404: "not_found_error"}.get(status, "api_error")
    error = {"message": message, "type": kind, "param": None, "code": None}
    return JSONResponse({"error": error}, status)


def not_found(name: str) -> str:
    return f'model "{name}" not found, try pulling it first'


def _now_iso() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


def _ndjson(payload: Any) -> bytes:
    return orjson.dumps(payload) + b"\n"


@dataclass(frozen=True)
class Call:
    body: dict[str, Any]
    name: str  # as the client spelled it; Ollama echoes it back
    key: str  # canonical name
    keep_alive: float | None
    native: bool  # /api (True) or the OpenAI layer /v1 (False): decides the error shape

    def error(self, status: int, message: str) -> JSONResponse:
        return (api_error if self.native else v1_error)(status, message)


async def _parse(request: Request, state: EmulatorState, *, native: bool) -> Call | Response:
    error = api_error if native else v1_error
    try:
        body = orjson.loads(await request.body())
    except orjson.JSONDecodeError:
        return error(400, "invalid request body")
    if not isinstance(body, dict):
        return error(400, "invalid request body")
    state.last_request = body
    name = body.get("model")
    if not isinstance(name, str) or not name:
        return error(400, "model is required")
    key = canonical_name(name)
    if key not in state.models:
        return error(404, not_found(name))
    keep_alive = state.default_keep_alive
    if native:  # the OpenAI layer has no keep_alive: its requests get the server default
        try:
            keep_alive = parse_keep_alive(body.get("keep_alive"), keep_alive)
        except ValueError as exc:
            return error(400, str(exc))
    return Call(body, name, key, keep_alive, native)


Renderer = Callable[[EmulatorState, Call, float], Answer]


async def _infer(request: Request, state: EmulatorState, call: Call, render: Renderer) -> Response:
    """Hold the model (loading it implicitly, as Ollama does) while the answer is sent."""
    state.requests[call.key] += 1
    state.in_flight += 1
    try:
        load_seconds = await state.acquire(call.key, call.keep_alive)
    except LoadError as exc:
        state.in_flight -= 1
        return call.error(500, str(exc))

    def on_end(outcome: str, sent: bytes) -> None:
        state.release(call.key)
        state.in_flight -= 1
        if outcome == "complete":
            state.last_body = sent

    answer = render(state, call, load_seconds)
    return await deliver(request, answer, token_delay=state.token_delay, on_end=on_end)


async def _load_or_unload(state: EmulatorState, call: Call, empty: dict[str, Any]) -> Response:
    """A request without a prompt loads the model, or unloads it when keep_alive is 0."""
    state.keep_alive_calls[call.key] += 1
    if call.keep_alive == 0:
        state.request_unload(call.key)
        reason = "unload"
    else:
        try:
            await state.acquire(call.key, call.keep_alive)
        except LoadError as exc:
            return api_error(500, str(exc))
        state.release(call.key)
        reason = "load"
    payload = {"model": call.name, "created_at": _now_iso(), **empty}
    return JSONResponse({**payload, "done": True, "done_reason": reason})


# ---------------------------------------------------------------------------------------------
# Native API: /api/generate and /api/chat
# ---------------------------------------------------------------------------------------------


def _response_format(ollama_format: Any) -> dict[str, Any] | None:
    """Ollama's `format` ("json" or a JSON schema) as an OpenAI response_format."""
    if ollama_format == "json":
        return {"type": "json_object"}
    if isinstance(ollama_format, dict):
        return {"type": "json_schema", "json_schema": {"schema": ollama_format}}
    return None


def _stats(reply: Reply, load_seconds: float, token_delay: float) -> dict[str, Any]:
    load_ns = int(load_seconds * 1e9)
    prompt_ns = 1_000_000 * reply.prompt_tokens
    eval_ns = int(token_delay * reply.completion_tokens * 1e9)
    return {
        "total_duration": load_ns + prompt_ns + eval_ns,
        "load_duration": load_ns,
        "prompt_eval_count": reply.prompt_tokens,
        "prompt_eval_duration": prompt_ns,
        "eval_count": reply.completion_tokens,
        "eval_duration": eval_ns,
    }


def _native_answer(
    state: EmulatorState,
    call: Call,
    reply: Reply,
    load_seconds: float,
    carry: Callable[[str], dict[str, Any]],
    extra_final: dict[str, Any],
) -> Answer:
    """NDJSON frames (or one document with stream: false); `carry` wraps a piece of text."""
    head = {"model": call.name, "created_at": _now_iso()}
    stats = _stats(reply, load_seconds, state.token_delay)
    done = {"done": True, "done_reason": reply.finish_reason, **stats}
    if call.body.get("stream") is False:  # Ollama streams unless told not to
        return JsonAnswer({**head, **carry(reply.text), **extra_final, **done}, len(reply.pieces))
    frames = [_ndjson({**head, **carry(p), "done": False}) for p in reply.pieces]
    if extra_final:
        frames.append(_ndjson({**head, **carry(""), **extra_final, "done": False}))
    return StreamAnswer((), tuple(frames), (_ndjson({**head, **carry(""), **done}),), NDJSON)


def _generate_answer(state: EmulatorState, call: Call, load_seconds: float) -> Answer:
    options = call.body.get("options") or {}
    reply = plan_text(
        call.key,
        str(call.body["prompt"]),
        tokens=state.tokens,
        max_tokens=options.get("num_predict"),
        seed=options.get("seed"),
        schema=response_schema(_response_format(call.body.get("format"))),
    )
    return _native_answer(state, call, reply, load_seconds, lambda t: {"response": t}, {})


def _chat_answer(state: EmulatorState, call: Call, load_seconds: float) -> Answer:
    options = call.body.get("options") or {}
    reply = plan_chat(
        call.key,
        {
            "messages": call.body.get("messages"),
            "tools": call.body.get("tools"),
            "seed": options.get("seed"),
            "max_tokens": options.get("num_predict"),
            "response_format": _response_format(call.body.get("format")),
        },
        state.tokens,
    )
    calls = [
        {
            "function": {
                "name": c["function"]["name"],
                "arguments": orjson.loads(c["function"]["arguments"]),
            }
        }
        for c in reply.tool_calls
    ]
    extra = {"message": {"role": "assistant", "content": "", "tool_calls": calls}} if calls else {}

    def carry(text: str) -> dict[str, Any]:
        return {"message": {"role": "assistant", "content": text}}

    return _native_answer(state, call, reply, load_seconds, carry, extra)


async def _generate(request: Request) -> Response:
    state: EmulatorState = request.app.state.emulator
    call = await _parse(request, state, native=True)
    if isinstance(call, Response):
        return call
    if not call.body.get("prompt"):
        return await _load_or_unload(state, call, {"response": ""})
    return await _infer(request, state, call, _generate_answer)


async def _chat(request: Request) -> Response:
    state: EmulatorState = request.app.state.emulator
    call = await _parse(request, state, native=True)
    if isinstance(call, Response):
        return call
    if not call.body.get("messages"):
        return await _load_or_unload(state, call, {"message": {"role": "assistant", "content": ""}})
    return await _infer(request, state, call, _chat_answer)


# ---------------------------------------------------------------------------------------------
# The OpenAI layer: /v1
# ---------------------------------------------------------------------------------------------


def _openai_base(call: Call, prefix: str, kind: str) -> dict[str, Any]:
    return {
        "id": f"{prefix}-{random.randrange(1000)}",  # Ollama's ids are this short
        "object": kind,
        "created": int(time.time()),
        "model": call.name,
        "system_fingerprint": "fp_ollama",
    }


def _include_usage(body: dict[str, Any]) -> bool:
    return bool((body.get("stream_options") or {}).get("include_usage"))


def _v1_chat_answer(state: EmulatorState, call: Call, _load_seconds: float) -> Answer:
    reply = plan_chat(call.key, call.body, state.tokens)
    calls = [{"index": i, **c} for i, c in enumerate(reply.tool_calls)]
    base = _openai_base(call, "chatcmpl", "chat.completion")
    if not call.body.get("stream"):
        message: dict[str, Any] = {"role": "assistant", "content": reply.text}
        if calls:
            message["tool_calls"] = calls
        choice = {"index": 0, "message": message, "finish_reason": reply.finish_reason}
        return JsonAnswer({**base, "choices": [choice], "usage": reply.usage()}, len(reply.pieces))

    base["object"] = "chat.completion.chunk"

    def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        # Ollama repeats the role in every delta.
        choice = {"index": 0, "delta": {"role": "assistant", **delta}, "finish_reason": finish}
        return {**base, "choices": [choice]}

    frames = [sse(chunk({"content": p})) for p in reply.pieces]
    if calls:
        frames.append(sse(chunk({"content": "", "tool_calls": calls})))
    last = chunk({"content": ""}, reply.finish_reason)
    tail = [sse(last)]
    if _include_usage(call.body):
        tail.append(sse({**last, "choices": [], "usage": reply.usage()}))
    return StreamAnswer((), tuple(frames), (*tail, SSE_DONE))


def _v1_completion_answer(state: EmulatorState, call: Call, _load_seconds: float) -> Answer:
    body = call.body
    reply = plan_text(
        call.key,
        body["prompt"],
        tokens=state.tokens,
        max_tokens=body.get("max_tokens"),
        seed=body.get("seed"),
    )
    base = _openai_base(call, "cmpl", "text_completion")

    def choice(text: str, finish: str | None) -> dict[str, Any]:
        return {"text": text, "index": 0, "finish_reason": finish}

    if not body.get("stream"):
        payload = {**base, "choices": [choice(reply.text, reply.finish_reason)]}
        return JsonAnswer({**payload, "usage": reply.usage()}, len(reply.pieces))
    frames = [sse({**base, "choices": [choice(p, None)]}) for p in reply.pieces]
    tail = [sse({**base, "choices": [choice("", reply.finish_reason)]})]
    if _include_usage(body):
        tail.append(sse({**base, "choices": [], "usage": reply.usage()}))
    return StreamAnswer((), tuple(frames), (*tail, SSE_DONE))


def _v1_embedding_answer(state: EmulatorState, call: Call, _load_seconds: float) -> Answer:
    texts = embedding_inputs(call.body["input"]) or []
    dims = call.body.get("dimensions") or state.embedding_dim
    encoding = call.body.get("encoding_format")
    data = [
        {
            "object": "embedding",
            "embedding": encode_embedding(embedding_vector(call.key, text, dims), encoding),
            "index": i,
        }
        for i, text in enumerate(texts)
    ]
    tokens = sum(count_tokens(t) for t in texts)
    usage = {"prompt_tokens": tokens, "total_tokens": tokens}
    return JsonAnswer({"object": "list", "data": data, "model": call.name, "usage": usage}, 1)


async def _v1_chat(request: Request) -> Response:
    state: EmulatorState = request.app.state.emulator
    call = await _parse(request, state, native=False)
    if isinstance(call, Response):
        return call
    if not call.body.get("messages"):
        return v1_error(400, "[] is too short - 'messages'")
    return await _infer(request, state, call, _v1_chat_answer)


async def _v1_completions(request: Request) -> Response:
    state: EmulatorState = request.app.state.emulator
    call = await _parse(request, state, native=False)
    if isinstance(call, Response):
        return call
    if not isinstance(call.body.get("prompt"), str):  # Ollama takes a single string prompt
        return v1_error(400, "prompt must be a string")
    return await _infer(request, state, call, _v1_completion_answer)


async def _v1_embeddings(request: Request) -> Response:
    state: EmulatorState = request.app.state.emulator
    call = await _parse(request, state, native=False)
    if isinstance(call, Response):
        return call
    if call.body.get("encoding_format") not in (None, "float", "base64"):
        return v1_error(400, "Invalid value for 'encoding_format'")
    if embedding_inputs(call.body.get("input")) is None:
        return v1_error(400, "invalid input")
    return await _infer(request, state, call, _v1_embedding_answer)


def _model_card(state: EmulatorState, name: str) -> dict[str, Any]:
    namespace = name.split("/", 1)[0] if "/" in name else "library"
    created = int(state.created.timestamp())
    return {"id": name, "object": "model", "created": created, "owned_by": namespace}


async def _v1_models(request: Request) -> Response:
    state: EmulatorState = request.app.state.emulator
    return JSONResponse({"object": "list", "data": [_model_card(state, n) for n in state.models]})


async def _v1_model(request: Request) -> Response:
    state: EmulatorState = request.app.state.emulator
    name = request.path_params["model"]
    if canonical_name(name) not in state.models:
        return v1_error(404, not_found(name))
    return JSONResponse(_model_card(state, name))


# ---------------------------------------------------------------------------------------------
# Listing and health
# ---------------------------------------------------------------------------------------------


def _details(name: str, size: int) -> dict[str, Any]:
    family = name.rsplit("/", 1)[-1].split(":")[0]
    return {
        "parent_model": "",
        "format": "gguf",
        "family": family,
        "families": [family],
        "parameter_size": f"{size / GB * 1.7:.1f}B",  # roughly what Q4 weights hold
        "quantization_level": "Q4_K_M",
    }


async def _tags(request: Request) -> Response:
    state: EmulatorState = request.app.state.emulator
    models = [
        {
            "name": name,
            "model": name,
            "modified_at": state.created.isoformat(),
            "size": size,
            "digest": digest(name).hex(),
            "details": _details(name, size),
        }
        for name, size in state.models.items()
    ]
    return JSONResponse({"models": models})


async def _ps(request: Request) -> Response:
    state: EmulatorState = request.app.state.emulator
    models = [
        {
            "name": resident.name,
            "model": resident.name,
            "size": resident.size,
            "digest": digest(resident.name).hex(),
            "details": _details(resident.name, resident.size),
            "expires_at": expires_at.isoformat(),
            "size_vram": resident.size,
            "context_length": 4096,
        }
        for resident, expires_at in state.running()
    ]
    return JSONResponse({"models": models})


async def _version(request: Request) -> Response:
    return JSONResponse({"version": request.app.state.emulator.version})


async def _root(_request: Request) -> Response:
    return PlainTextResponse("Ollama is running")


def create_app(
    models: Mapping[str, float] | Sequence[str],
    *,
    load_delay: float = 0.2,
    memory_gb: float | None = None,
    max_loaded: int | None = None,
    token_delay: float = 0.0,
    tokens: int = 8,
    default_keep_alive: float | str = "5m",
    embedding_dim: int = EMBEDDING_DIM,
    version: str = "0.6.5",
    refuse_over_memory: bool = False,
) -> Starlette:
    """An Ollama with `models` pulled: name -> size in GB (a plain list gets 4 GB each).

    `memory_gb` is the memory Ollama may fill before it evicts idle models by itself, and
    `max_loaded` mirrors OLLAMA_MAX_LOADED_MODELS; both unlimited by default.
    `refuse_over_memory`: a load that does not fit `memory_gb` fails (an out-of-memory error)
    rather than evicting: a GPU node whose budget the gateway alone must keep.
    `default_keep_alive` mirrors OLLAMA_KEEP_ALIVE ("5m", "300", 0.5 for half a second, "-1"):
    what every request naming no keep_alive sets, and every /v1 request is one of those.
    """
    sizes = (
        models.items() if isinstance(models, Mapping) else ((m, DEFAULT_SIZE_GB) for m in models)
    )
    state = EmulatorState(
        {canonical_name(name): int(size_gb * GB) for name, size_gb in sizes},
        load_delay=load_delay,
        memory_gb=memory_gb,
        max_loaded=max_loaded,
        token_delay=token_delay,
        tokens=tokens,
        default_keep_alive=server_keep_alive(default_keep_alive),
        embedding_dim=embedding_dim,
        version=version,
        refuse_over_memory=refuse_over_memory,
    )
    app = Starlette(
        routes=[
            Route("/", _root),
            Route("/api/version", _version),
            Route("/api/tags", _tags),
            Route("/api/ps", _ps),
            Route("/api/generate", _generate, methods=["POST"]),
            Route("/api/chat", _chat, methods=["POST"]),
            Route("/v1/models", _v1_models),
            Route("/v1/models/{model:path}", _v1_model),
            Route("/v1/chat/completions", _v1_chat, methods=["POST"]),
            Route("/v1/completions", _v1_completions, methods=["POST"]),
            Route("/v1/embeddings", _v1_embeddings, methods=["POST"]),
            Route("/_emulator", _counters),
        ]
    )
    app.state.emulator = state
    return app


async def _counters(request: Request) -> Response:
    """The memory accounting, for a test that runs the emulator out of its own process."""
    state: EmulatorState = request.app.state.emulator
    return JSONResponse({
        "loaded": sorted(state.loaded), "max_loaded_bytes": state.max_loaded_bytes,
        "refused_loads": dict(state.refused_loads), "load_count": dict(state.load_count),
        "load_spans": state.load_spans, "requests": dict(state.requests),
    })


def main(argv: list[str] | None = None) -> None:
    import argparse

    import uvicorn

    parser = argparse.ArgumentParser(description="Ollama emulator")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=11434)
    parser.add_argument("--model", action="append", required=True, help="NAME=GB, repeatable")
    parser.add_argument("--load-delay", type=float, default=0.2)
    parser.add_argument("--memory-gb", type=float)
    parser.add_argument("--refuse-over-memory", action="store_true")
    args = parser.parse_args(argv)
    models = {name: float(size) for name, _, size in (m.partition("=") for m in args.model)}
    app = create_app(models, load_delay=args.load_delay, memory_gb=args.memory_gb,
                     refuse_over_memory=args.refuse_over_memory)
    print(f"ollama emulator: serving on http://{args.host}:{args.port}", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
