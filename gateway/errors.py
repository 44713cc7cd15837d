"""The one error type of the gateway; it renders OpenAI's error JSON."""

from __future__ import annotations

from collections.abc import Mapping

import orjson
from starlette.responses import Response

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    408: "invalid_request_error",
    409: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
}


OPENAI_ERROR_TYPES = frozenset({*_TYPES.values(), "server_error", "api_error", "not_found_error",
                                "invalid_request_error", "insufficient_quota"})


def error_type_for(status: int) -> str:
    return _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")


class GatewayError(Exception):
    """A failure the client sees, with OpenAI's `{"error": {message, type, param, code}}` body."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: str | None = None,
        param: str | None = None,
        type: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param
        self.type = type or error_type_for(status)
        self.headers = dict(headers or {})

    def payload(self) -> dict:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def body(self) -> bytes:
        return orjson.dumps(self.payload())

    def sse_event(self) -> bytes:
        """The error as one SSE event, for failures after a stream has started."""
        return b"data: " + self.body() + b"\n\n"

    def response(self) -> Response:
        return Response(
            self.body(), status_code=self.status, headers=self.headers,
            media_type="application/json",
        )


def bad_request(message: str, *, param: str | None = None, code: str | None = None) -> GatewayError:
    return GatewayError(400, message, param=param, code=code)


def model_not_found(name: str) -> GatewayError:
    return GatewayError(
        404, f"The model '{name}' does not exist or you do not have access to it.",
        code="model_not_found", param="model",
    )
