"""Token usage read off JSON answers and streams split anywhere."""

from __future__ import annotations

import itertools

from hypothesis import given
from hypothesis import strategies as st

from gateway.relay.usage import Usage, UsageScanner, usage_of

STREAM = (
    b'data: {"id":"1","choices":[{"index":0,"delta":{"content":"hi"}}],"usage":null}\n\n'
    b'data: {"id":"1","choices":[],"usage":{"prompt_tokens":12,"completion_tokens":7,'
    b'"total_tokens":19}}\n\n'
    b"data: [DONE]\n\n"
)


def test_usage_of_a_json_answer() -> None:
    body = b'{"usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}}'
    assert usage_of(body) == Usage(3, 4, 7)
    assert usage_of(b'{"data": []}') == Usage()
    assert usage_of(b'{"usage":{"prompt_tokens":5}}') == Usage(5, 0, 5)  # embeddings


@given(st.lists(st.integers(1, len(STREAM) - 1), max_size=12))
def test_usage_of_a_stream_split_anywhere(cuts: list[int]) -> None:
    scanner = UsageScanner()
    edges = [0, *sorted(set(cuts)), len(STREAM)]
    for start, end in itertools.pairwise(edges):
        scanner.feed(STREAM[start:end])
    assert scanner.usage == Usage(12, 7, 19)
