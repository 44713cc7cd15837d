"""Ollama's API (/api/chat, /api/generate, /api/embed, /api/embeddings) and OpenAI's, both ways.

Requests become OpenAI request bodies; OpenAI answers become Ollama's: one JSON document, or
NDJSON lines (`done: false` pieces, then a `done: true` line with `done_reason`, the counts and
the durations in nanoseconds). What is mapped, passed on or left out, and why: docs/fronts.md.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson

from gateway.errors import GatewayError, bad_request
from gateway.fronts.translate.sse import StreamTranslation

NDJSON = "application/x-ndjson"
# Sampling options with an OpenAI field of the same name.
_SAME_NAME = ("temperature", "top_p", "seed", "stop", "frequency_penalty", "presence_penalty")
# Sampling options OpenAI lacks, sent under Ollama's names: llama.cpp reads them all, vLLM reads
# top_k and min_p, other servers pass over fields they do not know.
_EXTRA_SAMPLING = ("top_k", "min_p", "typical_p", "repeat_penalty", "repeat_last_n", "mirostat",
                   "mirostat_tau", "mirostat_eta")
_DONE_REASONS = {"stop": "stop", "length": "length", "tool_calls": "stop",
                 "function_call": "stop", "content_filter": "stop"}
# Raw base64 images (Ollama's `images`) by their first bytes, for the data URL OpenAI wants.
_IMAGE_TYPES = {"iVBOR": "image/png", "/9j/": "image/jpeg", "R0lGOD": "image/gif",
                "UklGR": "image/webp"}


# -- requests ------------------------------------------------------------------------------------

def request_body(raw: bytes) -> dict[str, Any]:
    """An Ollama request: a JSON object naming its model."""
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        body = None
    if not isinstance(body, dict):
        raise bad_request("invalid request body: a JSON object expected", code="invalid_json")
    if "model" not in body and isinstance(body.get("name"), str):
        body["model"] = body["name"]  # what older clients send to /api/show
    if not isinstance(body.get("model"), str) or not body["model"]:
        raise bad_request("model is required", param="model")
    return body


def streams(body: Mapping[str, Any]) -> bool:
    """Ollama streams unless told `"stream": false`."""
    return body.get("stream") is not False


def chat_request(body: Mapping[str, Any], model: str) -> dict[str, Any]:
    """/api/chat as a chat/completions body."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        raise bad_request("messages must be a list of objects", param="messages")
    chat: dict[str, Any] = {"model": model, "messages": chat_messages(messages)}
    if body.get("tools"):
        chat["tools"] = body["tools"]  # Ollama's tools are OpenAI's function tools
    return {**chat, **sampling(body), **_stream_fields(body)}


def generate_request(body: Mapping[str, Any], model: str) -> tuple[str, dict[str, Any]]:
    """/api/generate as (endpoint, body). Ollama puts a prompt in the model's chat template,
    so it is a chat; `raw` (no template) and `suffix` (fill in the middle) are completions."""
    prompt = body.get("prompt")
    if not isinstance(prompt, str):
        raise bad_request("prompt must be a string", param="prompt")
    if body.get("raw") or body.get("suffix"):
        completion: dict[str, Any] = {"model": model, "prompt": prompt}
        if body.get("suffix"):
            completion["suffix"] = body["suffix"]
        return "completions", {**completion, **sampling(body), **_stream_fields(body)}
    messages: list[dict[str, Any]] = []
    if isinstance(body.get("system"), str) and body["system"]:
        messages.append({"role": "system", "content": body["system"]})
    messages.append({"role": "user", "content": _content(prompt, body.get("images"))})
    chat = {"model": model, "messages": messages}
    return "chat/completions", {**chat, **sampling(body), **_stream_fields(body)}


def embed_request(body: Mapping[str, Any], model: str, legacy: bool) -> dict[str, Any]:
    """/api/embed (`input`: a text or a list) or the older /api/embeddings (`prompt`)."""
    text = body.get("prompt") if legacy else body.get("input")
    embed: dict[str, Any] = {"model": model, "input": text, "encoding_format": "float"}
    if isinstance(body.get("dimensions"), int):
        embed["dimensions"] = body["dimensions"]
    return embed


def chat_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Ollama messages as OpenAI's: images as image parts, tool calls with string arguments,
    and each tool result tied to the call it answers (Ollama's by order or `tool_name`)."""
    out: list[dict[str, Any]] = []
    calls: list[dict[str, Any]] = []  # the latest assistant's calls, in order
    answered = 0
    for message in messages:
        role = message.get("role")
        if role == "tool":
            out.append(_tool_result(message, calls, answered))
            answered += 1
            continue
        converted: dict[str, Any] = {"role": role,
                                     "content": _content(message.get("content") or "",
                                                         message.get("images"))}
        if role == "assistant" and message.get("tool_calls"):
            calls = [_tool_call(call, len(out), i) for i, call in enumerate(message["tool_calls"])]
            answered = 0
            converted["tool_calls"] = calls
        out.append(converted)
    return out


def _tool_call(call: Mapping[str, Any], position: int, index: int) -> dict[str, Any]:
    function = call.get("function") or {}
    arguments = function.get("arguments", {})
    return {
        "id": call.get("id") or f"call_{position}_{index}",  # Ollama's calls may have none
        "type": "function",
        "function": {"name": function.get("name", ""),
                     "arguments": arguments if isinstance(arguments, str)
                     else orjson.dumps(arguments).decode()},
    }


def _tool_result(message: Mapping[str, Any], calls: list[dict[str, Any]],
                 answered: int) -> dict[str, Any]:
    name = message.get("tool_name") or message.get("name")
    named = [call for call in calls if call["function"]["name"] == name]
    call = named[0] if len(named) == 1 else calls[answered] if answered < len(calls) else None
    call_id = message.get("tool_call_id") or (call["id"] if call else f"call_{answered}")
    return {"role": "tool", "tool_call_id": call_id, "content": str(message.get("content", ""))}


def _content(text: Any, images: Any) -> Any:
    if not images:
        return text
    parts: list[dict[str, Any]] = [{"type": "text", "text": str(text)}]
    for image in images:
        parts.append({"type": "image_url", "image_url": {"url": _data_url(str(image))}})
    return parts


def _data_url(image: str) -> str:
    if image.startswith(("data:", "http://", "https://")):
        return image
    kind = next((t for prefix, t in _IMAGE_TYPES.items() if image.startswith(prefix)),
                "image/png")
    return f"data:{kind};base64,{image}"


def sampling(body: Mapping[str, Any]) -> dict[str, Any]:
    """`options` and `format` as OpenAI fields. Load-time options (num_ctx, num_gpu, ...) are
    left out: they would make Ollama reload the model, and the gateway pins them per model."""
    options = body.get("options") or {}
    if not isinstance(options, dict):
        raise bad_request("options must be an object", param="options")
    fields = {name: options[name] for name in (*_SAME_NAME, *_EXTRA_SAMPLING)
              if options.get(name) is not None}
    predict = options.get("num_predict")
    if isinstance(predict, int) and predict > 0:  # -1 (no limit) and -2 (fill the context)
        fields["max_tokens"] = predict
    response_format = _response_format(body.get("format"))
    if response_format is not None:
        fields["response_format"] = response_format
    return fields


def _response_format(ollama_format: Any) -> dict[str, Any] | None:
    """`format`: "json" or a JSON schema."""
    if ollama_format == "json":
        return {"type": "json_object"}
    if isinstance(ollama_format, dict):
        return {"type": "json_schema", "json_schema": {"name": "format", "schema": ollama_format}}
    if ollama_format in (None, ""):
        return None
    raise bad_request("format must be \"json\" or a JSON schema", param="format")


def _stream_fields(body: Mapping[str, Any]) -> dict[str, Any]:
    # Usage always: the last line's eval_count and prompt_eval_count come from it.
    return {"stream": True, "stream_options": {"include_usage": True}} if streams(body) else {}


# -- answers -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Timing:
    """The durations Ollama reports, in nanoseconds, from the gateway's own clock readings."""

    started: float  # when the call came (perf_counter seconds)
    waited_s: float = 0.0  # for the model (its load)
    first_byte: float | None = None  # the backend's first byte, for streams

    def stats(self, now: float, usage: Mapping[str, Any] | None) -> dict[str, int]:
        total = max(0.0, now - self.started)
        first = self.first_byte if self.first_byte is not None else self.started + self.waited_s
        usage = usage or {}
        return {
            "total_duration": _ns(total),
            "load_duration": _ns(self.waited_s),
            "prompt_eval_count": int(usage.get("prompt_tokens") or 0),
            "prompt_eval_duration": _ns(first - self.started - self.waited_s),
            "eval_count": int(usage.get("completion_tokens") or 0),
            "eval_duration": _ns(now - first),
        }


def _ns(seconds: float) -> int:
    return max(0, int(seconds * 1e9))


def created_at(now: datetime | None = None) -> str:
    return (now or datetime.now(UTC)).isoformat().replace("+00:00", "Z")


def done_reason(finish_reason: Any) -> str:
    return _DONE_REASONS.get(finish_reason, str(finish_reason or "stop"))


def error_body(error: GatewayError) -> bytes:
    """Ollama's error shape: `{"error": "message"}`."""
    return orjson.dumps({"error": error.message})


def chat_answer(answer: Mapping[str, Any], name: str, timing: Timing, now: float,
                generate: bool) -> dict[str, Any]:
    """A chat/completions (or completions) answer as /api/chat's (or /api/generate's)."""
    choice = (answer.get("choices") or [{}])[0]
    message = choice.get("message") or {}
    text = message.get("content") if "message" in choice else choice.get("text")
    thinking = message.get("reasoning_content") or message.get("reasoning")
    calls = [ollama_tool_call(call) for call in message.get("tool_calls") or ()]
    body: dict[str, Any] = {"model": name, "created_at": created_at()}
    body.update(_carry(text or "", thinking, calls, generate))
    return {**body, "done": True, "done_reason": done_reason(choice.get("finish_reason")),
            **timing.stats(now, answer.get("usage"))}


def _carry(text: str, thinking: str | None, calls: list[dict[str, Any]],
           generate: bool) -> dict[str, Any]:
    """A piece of an answer in the field Ollama puts it: `response` or `message`."""
    if generate:
        return {"response": text, **({"thinking": thinking} if thinking else {})}
    message: dict[str, Any] = {"role": "assistant", "content": text}
    if thinking:
        message["thinking"] = thinking
    if calls:
        message["tool_calls"] = calls
    return {"message": message}


def ollama_tool_call(call: Mapping[str, Any]) -> dict[str, Any]:
    """An OpenAI tool call as Ollama's: the arguments an object, not a string."""
    function = call.get("function") or {}
    raw = function.get("arguments") or "{}"
    try:
        arguments = orjson.loads(raw) if isinstance(raw, str) else raw
    except orjson.JSONDecodeError:
        arguments = {"arguments": raw}  # kept whole rather than lost
    return {"function": {"name": function.get("name", ""), "arguments": arguments}}


def embed_answer(answer: Mapping[str, Any], name: str, timing: Timing, now: float,
                 legacy: bool) -> dict[str, Any]:
    items = sorted(answer.get("data") or (), key=lambda item: item.get("index", 0))
    vectors = [item.get("embedding") for item in items]
    if legacy:
        return {"embedding": vectors[0] if vectors else []}
    stats = timing.stats(now, answer.get("usage"))
    return {"model": name, "embeddings": vectors, "total_duration": stats["total_duration"],
            "load_duration": stats["load_duration"],
            "prompt_eval_count": stats["prompt_eval_count"]}


def loaded_answer(name: str, generate: bool) -> dict[str, Any]:
    """What Ollama answers a request without a prompt: the model is loaded."""
    return {"model": name, "created_at": created_at(), **_carry("", None, [], generate),
            "done_reason": "load", "done": True}


def heartbeat_line(name: str, generate: bool) -> bytes:
    """An empty piece: what an Ollama client reads as nothing yet, while the model loads."""
    return _line({"model": name, "created_at": created_at(), **_carry("", None, [], generate),
                  "done": False})


def _line(payload: Mapping[str, Any]) -> bytes:
    return orjson.dumps(payload) + b"\n"


def digest(name: str) -> str:
    """A stable stand-in for a model's digest (the gateway has no blob to hash)."""
    return hashlib.sha256(name.encode()).hexdigest()


class NdjsonFrames(StreamTranslation):
    """An OpenAI chat (or completion) stream as Ollama's NDJSON lines. Tool calls come whole,
    in one line before the last (their arguments arrive in pieces); the last line waits for
    the usage event, which the gateway always asks for."""

    def __init__(self, name: str, timing: Timing, clock: Any, generate: bool) -> None:
        super().__init__()
        self.name = name
        self.timing = timing
        self.clock = clock  # perf_counter, or a test's
        self.generate = generate
        self._calls: dict[int, dict[str, Any]] = {}
        self._reason: Any = None
        self._usage: Mapping[str, Any] | None = None
        self._first: float | None = None

    def chunk(self, event: dict[str, Any]) -> bytes:
        if event.get("usage"):
            self._usage = event["usage"]
        return b"".join(self._piece(choice) for choice in event.get("choices") or ()
                        if choice.get("index", 0) == 0)  # Ollama answers one choice

    def error(self, message: str) -> bytes:
        return _line({"error": message})

    def _piece(self, choice: Mapping[str, Any]) -> bytes:
        if choice.get("finish_reason"):
            self._reason = choice["finish_reason"]
        delta = choice.get("delta") or {}
        for call in delta.get("tool_calls") or ():
            self._add_call(call)
        text = delta.get("content") if "delta" in choice else choice.get("text")
        thinking = delta.get("reasoning_content") or delta.get("reasoning")
        if not text and not thinking:
            return b""
        if self._first is None:
            self._first = self.clock()
        return _line({"model": self.name, "created_at": created_at(),
                      **_carry(text or "", thinking, [], self.generate), "done": False})

    def _add_call(self, delta: Mapping[str, Any]) -> None:
        call = self._calls.setdefault(delta.get("index", len(self._calls)),
                                      {"function": {"name": "", "arguments": ""}})
        function = delta.get("function") or {}
        if function.get("name"):  # set, not appended: some backends repeat it in every piece
            call["function"]["name"] = function["name"]
        call["function"]["arguments"] += function.get("arguments") or ""

    def done(self) -> bytes:
        lines = b""
        if self._calls:
            calls = [ollama_tool_call(self._calls[i]) for i in sorted(self._calls)]
            lines = _line({"model": self.name, "created_at": created_at(),
                           **_carry("", None, calls, self.generate), "done": False})
        timing = Timing(self.timing.started, self.timing.waited_s, self._first)
        last = {"model": self.name, "created_at": created_at(),
                **_carry("", None, [], self.generate), "done": True,
                "done_reason": done_reason(self._reason),
                **timing.stats(self.clock(), self._usage)}
        return lines + _line(last)
