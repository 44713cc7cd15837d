"""Token usage read off JSON answers and streams split anywhere."""

from __future__ import annotations

import itertools

from hypothesis import given
from hypothesis import strategies as st

from gateway.relay.usage import Usage, UsageChunkFilter, UsageScanner, usage_of

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


def scanned(stream: bytes, cuts: list[int]) -> Usage:
    """The usage a scanner reads off `stream` fed in the pieces `cuts` make."""
    scanner = UsageScanner()
    edges = [0, *sorted(set(cuts)), len(stream)]
    for start, end in itertools.pairwise(edges):
        scanner.feed(stream[start:end])
    return scanner.usage


@given(st.lists(st.integers(1, len(STREAM) - 1), max_size=12))
def test_usage_of_a_stream_split_anywhere(cuts: list[int]) -> None:
    assert scanned(STREAM, cuts) == Usage(12, 7, 19)


def frames_of(stream: bytes, size: int) -> list[int]:
    return list(range(size, len(stream), size))


TOKENS = b"".join(b'data: {"id":"1","choices":[{"index":0,"delta":{"content":"tok%d"}}]}\n\n' % i
                  for i in range(300))


@given(st.integers(1, 200), st.lists(st.integers(1, len(TOKENS) + len(STREAM) - 1), max_size=12))
def test_usage_of_a_long_stream_in_pieces_of_any_size(size: int, cuts: list[int]) -> None:
    """Hundreds of frames before the usage chunk, in pieces from a byte to a few frames."""
    stream = TOKENS + STREAM
    assert scanned(stream, frames_of(stream, size) + cuts) == Usage(12, 7, 19)


ANTHROPIC = (b'event: message_start\ndata: {"type":"message_start","message":{"id":"m",'
             b'"usage":{"input_tokens":25,"output_tokens":1}}}\n\n'
             b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,'
             b'"delta":{"type":"text_delta","text":"usage"}}\n\n'
             b'event: message_delta\ndata: {"type":"message_delta","delta":{"stop_reason":'
             b'"end_turn"},"usage":{"output_tokens":15}}\n\n'
             b'event: message_stop\ndata: {"type":"message_stop"}\n\n')


def test_usage_of_an_anthropic_message() -> None:
    body = b'{"type":"message","usage":{"input_tokens":9,"output_tokens":4}}'
    assert usage_of(body) == Usage(9, 4, 13)


@given(st.lists(st.integers(1, len(ANTHROPIC) - 1), max_size=12))
def test_an_anthropic_stream_says_its_input_first_and_its_output_last(cuts: list[int]) -> None:
    assert scanned(ANTHROPIC, cuts) == Usage(25, 15, 40)


@given(st.integers(1, 200))
def test_a_long_anthropic_stream_keeps_its_opening_input_tokens(size: int) -> None:
    opening, _, rest = ANTHROPIC.partition(b"\n\n")
    stream = opening + b"\n\n" + TOKENS + rest
    assert scanned(stream, frames_of(stream, size)) == Usage(25, 15, 40)


TOKEN = b'data: {"id":"1","choices":[{"index":0,"delta":{"content":"[]"}}],"usage":null}'
USAGE_ONLY = b'data: {"id":"1","choices":[],"usage":{"prompt_tokens":1,"completion_tokens":2}}'
EMPTY_CHOICES = b'data: {"id":"1","choices":[]}'  # no usage: a client's own, kept
EVENTS = [TOKEN, USAGE_ONLY, EMPTY_CHOICES, b": comment", b"data: [DONE]"]


@given(st.lists(st.tuples(st.sampled_from(EVENTS), st.sampled_from([b"\n\n", b"\r\n\r\n"])),
                max_size=8),
       st.lists(st.integers(0, 2000), max_size=6))
def test_the_usage_chunk_is_left_out_wherever_the_stream_is_split(
        events: list[tuple[bytes, bytes]], cuts: list[int]) -> None:
    stream = b"".join(event + end for event, end in events)
    edges = [0, *sorted({cut for cut in cuts if cut < len(stream)}), len(stream)]
    chunks = UsageChunkFilter()
    out = b"".join(chunks.feed(stream[a:b]) for a, b in itertools.pairwise(edges))
    out += chunks.flush()
    assert out == b"".join(event + end for event, end in events if event != USAGE_ONLY)
