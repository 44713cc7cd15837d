"""What may leave the gateway: secrets masked in logged command lines, and one-line error texts
for clients without server paths, backend URLs or secrets."""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

MASK = "***"
# A name whose words say it carries a secret: --api-key, --hf-token, DB_PASSWORD, --apikey
# (but not --max-num-batched-tokens or --tokenizer).
_SECRET_WORD_ENDS = ("key", "token", "secret", "password", "passwd", "credential", "credentials")
_URL = re.compile(r"\b[a-z][a-z0-9+.-]*://[^\s'\"<>)]+", re.I)
_PATH = re.compile(r"(?<![\w.:/-])(?:~|\.{1,2})?(?:/[\w.@+-]+)+/?")
_HOST_PORT = re.compile(r"\b(?:\d{1,3}\.){3}\d{1,3}(?::\d+)?\b|\[[0-9a-f:]+\](?::\d+)?", re.I)
_BEARER = re.compile(r"\b(bearer\s+|sk-)[\w.-]+", re.I)
_EXCEPTION_NAME = re.compile(r"\b(?:[a-z_]\w*\.)*[A-Z]\w*(?:Error|Exception):\s*")
# A log line's own prefix: a timestamp (llama.cpp's "0.00.005.743", "2024-06-01 12:00:00,123")
# and a level letter or word after it.
_LOG_PREFIX = re.compile(
    r"^\s*\[?\d+(?:[.:/-]\d+){2,}(?:[T ,]\d+(?:[.:,]\d+)*)?\]?\s+"
    r"(?:(?:INFO|WARN(?:ING)?|ERROR|DEBUG|[IWEDF])\b)?\s*")
_TRACEBACK = re.compile(r"^\s*(Traceback \(most recent call last\)|File \".*\", line \d+)")
# Lines that say what failed, the plainest first: an "error:" line beats a "failed to" one.
_ERROR_LINE = re.compile(r"\berror\b|\bfatal\b|exception|not found|no such file|"
                         r"out of memory|\bpanic|segmentation fault", re.I)
_TROUBLE_LINE = re.compile(r"\bfail(ed|ure|s)?\b|cannot|can't|could not|unable|invalid|"
                           r"denied|unsupported|refused|abort|crash", re.I)
_USAGE_LINE = re.compile(r"^\s*(usage:|\[-)", re.I)  # argparse's usage text names every flag
LINE_LIMIT = 200


def mask_argv(argv: Sequence[str]) -> list[str]:
    """`argv` for logs: the value of every secret-looking flag masked, whether it is the next
    argument (`--api-key VALUE`) or attached (`--api-key=VALUE`)."""
    masked: list[str] = []
    hide_next = False
    for arg in argv:
        if hide_next and not arg.startswith("-"):
            masked.append(MASK)
            hide_next = False
            continue
        name, equals, _ = arg.partition("=")
        secret = is_secret_name(name)
        masked.append(f"{name}={MASK}" if secret and equals else arg)
        hide_next = secret and not equals and arg.startswith("-")
    return masked


def is_secret_name(name: str) -> bool:
    """Whether a flag or variable name (`--hf-token`, `API_KEY`) names a secret."""
    words = re.split(r"[-_.]+", name.lstrip("-").lower())
    return any(word.endswith(_SECRET_WORD_ENDS) for word in words if word)


def scrub(text: str) -> str:
    """`text` without URLs, addresses, bearer tokens, exception class names and directories (a
    path keeps its last part: a file name says what went wrong, a directory only where the
    server keeps it)."""
    text = _EXCEPTION_NAME.sub("", _URL.sub("<url>", text))
    text = _BEARER.sub(lambda m: m[1] + MASK, text)
    text = _HOST_PORT.sub("<address>", text)
    return _PATH.sub(lambda m: m[0].rstrip("/").rsplit("/", 1)[-1] or m[0], text)


def first_meaningful(lines: Iterable[str]) -> str | None:
    """The first line that says what failed (an error; else a failure, a refusal), scrubbed
    and cut; None if none does."""
    candidates = [line for line in lines
                  if line.strip() and not _TRACEBACK.match(line) and not _USAGE_LINE.match(line)]
    for pattern in (_ERROR_LINE, _TROUBLE_LINE):
        for line in candidates:
            if pattern.search(line):
                return public_line(line)
    return None


def public_line(text: str, limit: int = LINE_LIMIT) -> str:
    """The first non-empty line of `text`, scrubbed and cut to `limit` characters."""
    line = next((line.strip() for line in text.splitlines() if line.strip()), "")
    line = scrub(_LOG_PREFIX.sub("", line) if _LOG_PREFIX.match(line) else line)
    return line if len(line) <= limit else line[:limit - 1].rstrip() + "…"
