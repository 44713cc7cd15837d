"""Parsing and validating an OpenAI API request body into an `ApiCall`.

The gateway checks only what it needs to route, cache and meter a request (JSON object,
`model`, the endpoint's required input, `stream`, numeric ranges); everything else
(message contents, tool schemas, sampling details) is the backend's to judge.
See docs/validation.md.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from gateway.calls.multipart import MultipartError, Upload, boundary_of, form_fields
from gateway.errors import GatewayError, bad_request

# endpoint -> (field that carries the input, its accepted types)
_INPUTS: dict[str, tuple[str, tuple[type, ...]]] = {
    "chat/completions": ("messages", (list,)),
    "completions": ("prompt", (str, list)),
    "embeddings": ("input", (str, list)),
    "messages": ("messages", (list,)),
    "rerank": ("documents", (list,)),
    "images/generations": ("prompt", (str,)),
    "audio/speech": ("input", (str,)),
}
_INT_RANGES = {
    "max_tokens": (1, None),
    "max_completion_tokens": (1, None),
    "n": (1, 128),
    "top_logprobs": (0, 20),
}
_NUMBER_RANGES = {"temperature": (0.0, 2.0), "top_p": (0.0, 1.0)}
_USAGE_STREAMS = frozenset({"chat/completions", "completions"})
# Answers relayed as they come, whatever their content type (audio, or a transcript as text,
# SRT or JSON): never checked to be JSON, never renamed, no heartbeat frames in them.
RELAYED_ENDPOINTS = frozenset({"audio/speech", "audio/transcriptions", "audio/translations"})


@dataclass
class ApiCall:
    endpoint: str  # "chat/completions", "completions", "embeddings", "responses", "messages"
    body: dict[str, Any]
    raw: bytes
    model: str  # the name the client asked for
    stream: bool
    include_usage: bool
    upload: Upload | None = None  # a multipart body (audio): `raw` is its buffer, `body` its fields

    @property
    def content_type(self) -> str:
        return "application/json" if self.upload is None else self.upload.content_type

    @property
    def usage_added(self) -> bool:
        """A completion stream whose client did not ask for usage: the gateway asks for it all
        the same (for the cache record and token budgets) and keeps it from the client."""
        return self.stream and not self.include_usage and self.endpoint in _USAGE_STREAMS

    @property
    def relayed(self) -> bool:
        return self.endpoint in RELAYED_ENDPOINTS

    def body_for(self, served_name: str,
                 drop: frozenset[str] = frozenset()) -> bytes | bytearray:
        """The body to send upstream: the client's bytes unless the model name must change,
        fields in `drop` are present or usage must be asked for. An upload goes as it came,
        but for its model field."""
        if self.upload is not None:
            return self.upload.body_for(served_name)
        dropped = drop.intersection(self.body)
        if self.model == served_name and not dropped and not self.usage_added:
            return self.raw
        body = {k: v for k, v in self.body.items() if k not in dropped}
        if self.usage_added:
            body["stream_options"] = {**(body.get("stream_options") or {}), "include_usage": True}
        return orjson.dumps({**body, "model": served_name})


def parse_call(endpoint: str, raw: bytes) -> ApiCall:
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        message = f"The request body is not valid JSON: {exc}"
        raise bad_request(message, code="invalid_json") from None
    if not isinstance(body, dict):
        raise bad_request("The request body must be a JSON object.", code="invalid_json")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad_request("You must provide a model parameter (a non-empty string).", param="model")
    _check_input(endpoint, body)
    stream = _check_stream(body)
    if stream and endpoint == "embeddings":
        raise bad_request("Embeddings cannot be streamed: leave out 'stream' or set it to false.",
                          param="stream")
    _check_ranges(body)
    options = body.get("stream_options")
    return ApiCall(
        endpoint=endpoint,
        body=body,
        raw=raw,
        model=model,
        stream=stream,
        include_usage=bool(stream and isinstance(options, dict) and options.get("include_usage")),
    )


def parse_upload(endpoint: str, raw: bytearray, content_type: str) -> ApiCall:
    """A multipart/form-data call (an audio file and its fields), read without a copy."""
    boundary = boundary_of(content_type)
    if boundary is None:
        raise bad_request("The request body must be multipart/form-data (with a boundary), "
                          "as a file upload is.", code="invalid_multipart")
    try:
        fields = form_fields(raw, boundary)
    except MultipartError as exc:
        raise bad_request(f"The multipart body is malformed: {exc}.",
                          code="invalid_multipart") from None
    model = fields.get("model")
    if model is None or not model.value:
        raise bad_request("You must provide a model parameter (a form field).", param="model")
    values = {name: field.value for name, field in fields.items()}
    return ApiCall(endpoint=endpoint, body=values, raw=raw, model=model.value,  # type: ignore[arg-type]
                   stream=values.get("stream", "").lower() == "true", include_usage=False,
                   upload=Upload(raw, content_type, model))


def _check_input(endpoint: str, body: Mapping[str, Any]) -> None:
    if endpoint not in _INPUTS:
        return
    name, types = _INPUTS[endpoint]
    value = body.get(name)
    if value is None:
        raise bad_request(f"Missing required parameter: '{name}'.", param=name)
    if not isinstance(value, types):
        wanted = " or ".join("array" if t is list else "string" for t in types)
        raise bad_request(f"Invalid type for '{name}': expected {wanted}.", param=name)
    if isinstance(value, list | str) and len(value) == 0 and endpoint != "completions":
        raise bad_request(f"'{name}' must not be empty.", param=name)
    if name == "messages" and not all(
        isinstance(m, dict) and isinstance(m.get("role"), str) for m in value
    ):
        raise bad_request("Each message must be an object with a string 'role'.", param=name)


def _check_stream(body: Mapping[str, Any]) -> bool:
    stream = body.get("stream", False)
    if stream is None:
        return False
    if not isinstance(stream, bool):
        raise bad_request("Invalid type for 'stream': expected a boolean.", param="stream")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise bad_request("Invalid type for 'stream_options': expected an object.",
                          param="stream_options")
    return stream


def _check_ranges(body: Mapping[str, Any]) -> None:
    for name, (low, high) in _INT_RANGES.items():
        value = body.get(name)
        if value is None:
            continue
        if not isinstance(value, int) or isinstance(value, bool):
            raise bad_request(f"Invalid type for '{name}': expected an integer.", param=name)
        _check_bounds(name, value, low, high)
    for name, (low, high) in _NUMBER_RANGES.items():
        value = body.get(name)
        if value is None:
            continue
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise bad_request(f"Invalid type for '{name}': expected a number.", param=name)
        _check_bounds(name, value, low, high)


def _check_bounds(name: str, value: float, low: float, high: float | None) -> None:
    if value < low or (high is not None and value > high):
        bound = f"between {low} and {high}" if high is not None else f"at least {low}"
        raise bad_request(f"Invalid '{name}': {value} (must be {bound}).", param=name)


def too_large(limit: int) -> GatewayError:
    return GatewayError(413, f"The request body exceeds the limit of {limit} bytes.",
                        code="request_too_large")
