"""The text fields of a multipart/form-data upload (RFC 7578), read where they lie.

An audio upload is held once, as it arrived: the parts are found by searching for the boundary,
only the small text fields (`model`, `language`, `stream`, ...) are decoded, and file parts are
never copied. The body goes upstream as it is, but for the `model` field, which `Upload` rewrites
in place when the backend knows the model by another name.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# A text field longer than this is not one the gateway needs to read (it is still forwarded).
MAX_FIELD_BYTES = 64 * 1024
_MAX_HEAD_BYTES = 16 * 1024
_PARAMETER = re.compile(r';\s*([\w*-]+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^;\s]*))')


class MultipartError(ValueError):
    """A body that is not the multipart/form-data its content type says."""


@dataclass(frozen=True)
class Field:
    value: str
    start: int  # where its value lies in the body
    end: int


def boundary_of(content_type: str) -> bytes | None:
    """The boundary of a `multipart/form-data; boundary=...` content type, else None."""
    kind, _, parameters = content_type.partition(";")
    if kind.strip().lower() != "multipart/form-data":
        return None
    boundary = _parameters(";" + parameters).get("boundary")
    return boundary.encode("latin-1") if boundary else None


def form_fields(body: bytes | bytearray, boundary: bytes) -> dict[str, Field]:
    """The text fields of `body` by name (the first of each name); file parts are skipped."""
    delimiter = b"--" + boundary
    position = body.find(delimiter)
    if position < 0:
        raise MultipartError("the body holds no part: its boundary was not found")
    fields: dict[str, Field] = {}
    position += len(delimiter)
    while body[position:position + 2] != b"--":  # the closing delimiter ends the parts
        if body[position:position + 2] != b"\r\n":
            raise MultipartError("a part's boundary line is malformed")
        head_end = body.find(b"\r\n\r\n", position + 2, position + 2 + _MAX_HEAD_BYTES)
        if head_end < 0:
            raise MultipartError("a part's headers do not end")
        start = head_end + 4
        end = body.find(b"\r\n" + delimiter, start)
        if end < 0:
            raise MultipartError("the body ends inside a part (no closing boundary)")
        name, is_file = _disposition(body[position + 2:head_end])
        if name is not None and not is_file and name not in fields \
                and end - start <= MAX_FIELD_BYTES:
            fields[name] = Field(body[start:end].decode("utf-8", "replace"), start, end)
        position = end + 2 + len(delimiter)
    return fields


def _disposition(head: bytes | bytearray) -> tuple[str | None, bool]:
    """A part's field name and whether it is a file, from its Content-Disposition."""
    for line in head.decode("utf-8", "replace").split("\r\n"):
        header, _, value = line.partition(":")
        if header.strip().lower() == "content-disposition":
            parameters = _parameters(";" + value.partition(";")[2])
            return parameters.get("name"), "filename" in parameters or "filename*" in parameters
    return None, False


def _parameters(text: str) -> dict[str, str]:
    return {match[1].lower(): match[2].replace('\\"', '"') if match[2] is not None else match[3]
            for match in _PARAMETER.finditer(text)}


class Upload:
    """A multipart body held once, with its content type (boundary included) and where its
    `model` field lies."""

    def __init__(self, buffer: bytearray, content_type: str, model: Field) -> None:
        self.buffer = buffer
        self.content_type = content_type
        self._start, self._end = model.start, model.end

    def body_for(self, served_name: str) -> bytearray:
        """The body naming the model `served_name`: rewritten in place (the bytes after the
        field move; nothing is copied whole), so the upload is never held twice."""
        value = served_name.encode()
        if self.buffer[self._start:self._end] != value:
            self.buffer[self._start:self._end] = value
            self._end = self._start + len(value)
        return self.buffer
