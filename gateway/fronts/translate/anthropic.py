"""Anthropic's Messages API and OpenAI's chat completions, both ways.

A Messages request becomes a chat/completions body (system prompt, content blocks, tool_use and
tool_result, stop sequences, tools and tool_choice); the answer becomes a Message, or the
streaming event sequence: message_start, then per content block content_block_start,
content_block_delta..., content_block_stop, then message_delta (stop_reason, usage) and
message_stop. What is left out, and why: docs/fronts.md.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson

from gateway.errors import GatewayError, bad_request
from gateway.fronts.translate.sse import StreamTranslation

SSE = "text/event-stream; charset=utf-8"
_STOP_REASONS = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use",
                 "function_call": "tool_use", "content_filter": "refusal"}
# Anthropic's error types by status (https://docs.anthropic.com/en/api/errors).
_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error",
                403: "permission_error", 404: "not_found_error", 413: "request_too_large",
                429: "rate_limit_error", 503: "overloaded_error", 529: "overloaded_error"}
PING = b'event: ping\ndata: {"type":"ping"}\n\n'


# -- requests ------------------------------------------------------------------------------------

def request_body(raw: bytes) -> dict[str, Any]:
    """A Messages request, checked as Anthropic checks it: model, max_tokens, messages."""
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise bad_request(f"The request body is not valid JSON: {exc}", code="invalid_json") \
            from None
    if not isinstance(body, dict):
        raise bad_request("The request body must be a JSON object.", code="invalid_json")
    if not isinstance(body.get("model"), str) or not body["model"]:
        raise bad_request("model: Field required (a non-empty string)", param="model")
    max_tokens = body.get("max_tokens")
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
        raise bad_request("max_tokens: Field required (an integer of at least 1)",
                          param="max_tokens")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages or not all(
            isinstance(m, dict) and m.get("role") in ("user", "assistant") for m in messages):
        raise bad_request("messages: a non-empty list of user and assistant messages expected",
                          param="messages")
    return body


def chat_request(body: Mapping[str, Any], model: str) -> dict[str, Any]:
    """The chat/completions body that asks what `body` asks."""
    messages: list[dict[str, Any]] = []
    if body.get("system"):
        messages.append({"role": "system", "content": _text(body["system"])})
    for message in body["messages"]:
        messages.extend(chat_messages(message))
    chat: dict[str, Any] = {"model": model, "messages": messages,
                            "max_tokens": body["max_tokens"]}
    for name in ("temperature", "top_p", "top_k"):  # top_k: llama.cpp and vLLM read it
        if body.get(name) is not None:
            chat[name] = body[name]
    if body.get("stop_sequences"):
        chat["stop"] = body["stop_sequences"]
    if body.get("tools"):
        chat["tools"] = [_tool(tool) for tool in body["tools"] if isinstance(tool, dict)]
    chat.update(_tool_choice(body.get("tool_choice")))
    chat.update(_output(body.get("output_config")))
    user = (body.get("metadata") or {}).get("user_id")
    if isinstance(user, str):
        chat["user"] = user
    if body.get("stream"):
        chat.update(stream=True, stream_options={"include_usage": True})
    return chat


def chat_messages(message: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One Anthropic message as OpenAI messages: a user message's tool_result blocks become
    tool messages (first: they answer the calls before them), an assistant's tool_use blocks
    its tool_calls. Thinking blocks are left out: no OpenAI backend takes them back."""
    role, content = message["role"], message.get("content")
    if isinstance(content, str):
        return [{"role": role, "content": content}]
    blocks = [block for block in content or () if isinstance(block, dict)]
    if role == "assistant":
        return [_assistant(blocks)]
    results = [{"role": "tool", "tool_call_id": block.get("tool_use_id", ""),
                "content": _text(block.get("content") or "")}
               for block in blocks if block.get("type") == "tool_result"]
    parts = [part for part in map(_part, blocks) if part is not None]
    if not parts:
        return results
    if all(part["type"] == "text" for part in parts):  # a plain string where it can be one
        return [*results, {"role": "user", "content": "".join(p["text"] for p in parts)}]
    return [*results, {"role": "user", "content": parts}]


def _assistant(blocks: list[dict[str, Any]]) -> dict[str, Any]:
    text = "".join(str(b.get("text", "")) for b in blocks if b.get("type") == "text")
    calls = [{"id": b.get("id", ""), "type": "function",
              "function": {"name": b.get("name", ""),
                           "arguments": orjson.dumps(b.get("input") or {}).decode()}}
             for b in blocks if b.get("type") == "tool_use"]
    message: dict[str, Any] = {"role": "assistant", "content": text or None}
    if calls:
        message["tool_calls"] = calls
    return message


def _part(block: Mapping[str, Any]) -> dict[str, Any] | None:
    kind = block.get("type")
    if kind == "text":
        return {"type": "text", "text": str(block.get("text", ""))}
    if kind == "image":
        source = block.get("source") or {}
        url = source.get("url") if source.get("type") == "url" else \
            f"data:{source.get('media_type', 'image/png')};base64,{source.get('data', '')}"
        return {"type": "image_url", "image_url": {"url": url}}
    return None


def _text(content: Any) -> str:
    """A system prompt or tool result: a string, or text blocks."""
    if isinstance(content, str):
        return content
    return "".join(str(block.get("text", "")) for block in content
                   if isinstance(block, dict) and block.get("type") == "text")


def _tool(tool: Mapping[str, Any]) -> dict[str, Any]:
    function = {"name": tool.get("name", ""),
                "parameters": tool.get("input_schema") or {"type": "object"}}
    if tool.get("description"):
        function["description"] = tool["description"]
    return {"type": "function", "function": function}


def _tool_choice(choice: Any) -> dict[str, Any]:
    if not isinstance(choice, dict):
        return {}
    fields: dict[str, Any] = {}
    kind = choice.get("type")
    if kind in ("auto", "none"):
        fields["tool_choice"] = kind
    elif kind == "any":
        fields["tool_choice"] = "required"
    elif kind == "tool":
        fields["tool_choice"] = {"type": "function", "function": {"name": choice.get("name")}}
    if choice.get("disable_parallel_tool_use"):
        fields["parallel_tool_calls"] = False
    return fields


def _output(config: Any) -> dict[str, Any]:
    """`output_config`: a JSON schema the answer must follow, and the reasoning effort."""
    if not isinstance(config, dict):
        return {}
    fields: dict[str, Any] = {}
    wanted = config.get("format")
    if isinstance(wanted, dict) and wanted.get("type") == "json_schema":
        fields["response_format"] = {"type": "json_schema", "json_schema": {
            "name": "output", "schema": wanted.get("schema") or {"type": "object"}}}
    effort = config.get("effort")
    if isinstance(effort, str):
        fields["reasoning_effort"] = effort if effort in ("low", "medium", "high") else "high"
    return fields


# -- answers -------------------------------------------------------------------------------------

def error_type(status: int) -> str:
    return _ERROR_TYPES.get(status, "api_error")


def error_payload(error: GatewayError) -> dict[str, Any]:
    return {"type": "error", "error": {"type": error_type(error.status),
                                       "message": error.message}}


def error_body(error: GatewayError) -> bytes:
    """Anthropic's error shape: `{"type": "error", "error": {"type", "message"}}`."""
    return orjson.dumps(error_payload(error))


def stop_reason(choice: Mapping[str, Any]) -> tuple[str, str | None]:
    """(stop_reason, stop_sequence). vLLM names the stop string it met in `stop_reason`."""
    matched = choice.get("stop_reason")
    if choice.get("finish_reason") == "stop" and isinstance(matched, str):
        return "stop_sequence", matched
    return _STOP_REASONS.get(choice.get("finish_reason"), "end_turn"), None


def message_id(openai_id: Any) -> str:
    return "msg_" + str(openai_id or "gateway").removeprefix("chatcmpl-")


def usage(openai_usage: Mapping[str, Any] | None) -> dict[str, int]:
    openai_usage = openai_usage or {}
    return {"input_tokens": int(openai_usage.get("prompt_tokens") or 0),
            "output_tokens": int(openai_usage.get("completion_tokens") or 0)}


def message(answer: Mapping[str, Any], name: str) -> dict[str, Any]:
    """A chat.completion as a Message."""
    choice = (answer.get("choices") or [{}])[0]
    said = choice.get("message") or {}
    content: list[dict[str, Any]] = []
    thinking = said.get("reasoning_content") or said.get("reasoning")
    if thinking:
        content.append({"type": "thinking", "thinking": thinking, "signature": ""})
    if said.get("content"):
        content.append({"type": "text", "text": said["content"]})
    content += [tool_use(call) for call in said.get("tool_calls") or ()]
    reason, sequence = stop_reason(choice)
    return {"id": message_id(answer.get("id")), "type": "message", "role": "assistant",
            "model": name, "content": content, "stop_reason": reason,
            "stop_sequence": sequence, "usage": usage(answer.get("usage"))}


def tool_use(call: Mapping[str, Any]) -> dict[str, Any]:
    function = call.get("function") or {}
    try:
        arguments = orjson.loads(function.get("arguments") or "{}")
    except orjson.JSONDecodeError:
        arguments = None
    return {"type": "tool_use", "id": call.get("id", ""), "name": function.get("name", ""),
            "input": arguments if isinstance(arguments, dict) else {}}


def event(payload: Mapping[str, Any]) -> bytes:
    return b"event: " + str(payload["type"]).encode() + b"\ndata: " + orjson.dumps(payload) \
        + b"\n\n"


class MessageEvents(StreamTranslation):
    """An OpenAI chat stream as Anthropic's event sequence. One content block is open at a
    time: text, thinking, or a tool_use whose arguments arrive as input_json_delta pieces."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name
        self._started = False
        self._index = -1  # of the open block; -1: none yet
        self._open: tuple[str, Any] | None = None  # (kind, the OpenAI tool call index)
        self._stop: tuple[str, str | None] = ("end_turn", None)
        self._usage: Mapping[str, Any] | None = None

    def chunk(self, event: dict[str, Any]) -> bytes:
        out = b"" if self._started else self._start(event)
        if event.get("usage"):
            self._usage = event["usage"]
        for choice in event.get("choices") or ():
            if choice.get("index", 0) == 0:
                out += self._delta(choice)
        return out

    def error(self, message: str) -> bytes:
        return event({"type": "error", "error": {"type": "api_error", "message": message}})

    def _start(self, chunk: Mapping[str, Any]) -> bytes:
        self._started = True
        return event({"type": "message_start", "message": {
            "id": message_id(chunk.get("id")), "type": "message", "role": "assistant",
            "model": self.name, "content": [], "stop_reason": None, "stop_sequence": None,
            "usage": {"input_tokens": 0, "output_tokens": 0}}})

    def _delta(self, choice: Mapping[str, Any]) -> bytes:
        delta = choice.get("delta") or {}
        out = b""
        thinking = delta.get("reasoning_content") or delta.get("reasoning")
        if thinking:
            out += self._block("thinking", None, {"type": "thinking", "thinking": "",
                                                  "signature": ""})
            out += self._piece({"type": "thinking_delta", "thinking": thinking})
        if delta.get("content"):
            out += self._block("text", None, {"type": "text", "text": ""})
            out += self._piece({"type": "text_delta", "text": delta["content"]})
        for call in delta.get("tool_calls") or ():
            out += self._tool_piece(call)
        if choice.get("finish_reason"):
            self._stop = stop_reason(choice)
        return out

    def _tool_piece(self, call: Mapping[str, Any]) -> bytes:
        function = call.get("function") or {}
        start = {"type": "tool_use", "id": call.get("id", ""), "name": function.get("name", ""),
                 "input": {}}
        out = self._block("tool_use", call.get("index", 0), start)
        if function.get("arguments"):
            out += self._piece({"type": "input_json_delta", "partial_json": function["arguments"]})
        return out

    def _block(self, kind: str, key: Any, start: Mapping[str, Any]) -> bytes:
        """Open a block of `kind` unless it is the one open; close the one that was."""
        if self._open == (kind, key):
            return b""
        out = self._close()
        self._index += 1
        self._open = (kind, key)
        return out + event({"type": "content_block_start", "index": self._index,
                            "content_block": start})

    def _piece(self, delta: Mapping[str, Any]) -> bytes:
        return event({"type": "content_block_delta", "index": self._index, "delta": delta})

    def _close(self) -> bytes:
        if self._open is None:
            return b""
        self._open = None
        return event({"type": "content_block_stop", "index": self._index})

    def done(self) -> bytes:
        out = b"" if self._started else self._start({})
        reason, sequence = self._stop
        return out + self._close() + event({
            "type": "message_delta", "delta": {"stop_reason": reason, "stop_sequence": sequence},
            "usage": usage(self._usage)}) + event({"type": "message_stop"})
