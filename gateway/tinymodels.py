"""Tiny random-weight GGUF models that llama.cpp serves for real: for the demo, the end-to-end
tests and the benchmarks, where no weights can be downloaded.

A llama-architecture model with a SentencePiece-style vocabulary (256 byte-fallback tokens, so any
input tokenizes) and a ChatML chat template. Hidden channel `dim - 1` is a constant that no layer
writes to; special and byte tokens weigh strongly against it in `output.weight`, so generation is
printable text that never ends early: every answer runs to `max_tokens`.

Needs the optional `demo` extra (`gguf`, `numpy`).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path

import gguf
import numpy as np

CHATML = (
    "{% for message in messages %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIALS = ("<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>")
_SPACE = "\u2581"  # SentencePiece's visible space
_HEAD_DIM = 32
_CONTEXT = 2048
_BANNED_WEIGHT = -1000.0  # on the constant channel: keeps a token's logit far below any other


def write_tiny_gguf(path: str | Path, *, dim: int = 64, layers: int = 2, vocab: int = 512,
                    seed: int = 0, embedding: bool = False) -> Path:
    """Write a `dim`-wide, `layers`-deep F16 llama model with `vocab` tokens to `path`.

    `embedding` marks it for mean pooling, as served with `llama-server --embedding`.
    """
    pieces, types = _vocabulary(vocab)
    if dim % _HEAD_DIM:
        raise ValueError(f"dim must be a multiple of {_HEAD_DIM}, got {dim}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(path, "llama")
    _add_metadata(writer, dim=dim, layers=layers, vocab=vocab, embedding=embedding)
    _add_tokenizer(writer, pieces, types)
    for name, tensor in _tensors(np.random.default_rng(seed), dim, layers, types):
        writer.add_tensor(name, tensor)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _vocabulary(size: int) -> tuple[list[str], list[int]]:
    """Specials, the 256 byte tokens, single characters, then syllables up to `size`."""
    pieces = list(SPECIALS)
    types = [gguf.TokenType.UNKNOWN] + [gguf.TokenType.CONTROL] * (len(SPECIALS) - 1)
    pieces += [f"<0x{byte:02X}>" for byte in range(256)]
    types += [gguf.TokenType.BYTE] * 256
    words = itertools.chain((chr(c) for c in range(33, 127)), [_SPACE], _syllables())
    minimum = len(pieces) + 95
    if size < minimum:
        raise ValueError(f"vocab must hold at least {minimum} tokens, got {size}")
    pieces += itertools.islice(words, size - len(pieces))
    types += [gguf.TokenType.NORMAL] * (size - len(types))
    return pieces, [int(t) for t in types]


def _syllables() -> Iterator[str]:
    """Endless distinct pronounceable pieces: `▁ka`, `ka`, `▁kaba`, `kaba`, ..."""
    simple = [c + v for c in "bdfghklmnprstvz" for v in "aeiou"]
    for length in itertools.count(1):
        for combo in itertools.product(simple, repeat=length):
            word = "".join(combo)
            yield _SPACE + word
            yield word


def _add_metadata(writer: gguf.GGUFWriter, *, dim: int, layers: int, vocab: int,
                  embedding: bool) -> None:
    writer.add_name(f"tiny-llama-{dim}x{layers}")
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    writer.add_context_length(_CONTEXT)
    writer.add_embedding_length(dim)
    writer.add_block_count(layers)
    writer.add_feed_forward_length(4 * dim)
    writer.add_head_count(dim // _HEAD_DIM)
    writer.add_head_count_kv(dim // _HEAD_DIM)
    writer.add_rope_dimension_count(_HEAD_DIM)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(vocab)
    if embedding:
        writer.add_pooling_type(gguf.PoolingType.MEAN)


def _add_tokenizer(writer: gguf.GGUFWriter, pieces: list[str], types: list[int]) -> None:
    writer.add_tokenizer_model("llama")
    writer.add_token_list(pieces)
    # SentencePiece merges the highest-scoring pair first: prefer longer pieces.
    writer.add_token_scores([float(len(p)) if t == gguf.TokenType.NORMAL else 0.0
                             for p, t in zip(pieces, types, strict=True)])
    writer.add_token_types(types)
    writer.add_unk_token_id(SPECIALS.index("<unk>"))
    writer.add_bos_token_id(SPECIALS.index("<s>"))
    writer.add_eos_token_id(SPECIALS.index("<|im_end|>"))
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    writer.add_chat_template(CHATML)


def _tensors(rng: np.random.Generator, dim: int, layers: int,
             types: list[int]) -> Iterator[tuple[str, np.ndarray]]:
    """Weights in numpy's (rows = outputs, columns = inputs) order; norms stay F32."""
    constant = dim - 1
    ff = 4 * dim

    def matrix(rows: int, cols: int) -> np.ndarray:
        return rng.normal(0.0, cols**-0.5, (rows, cols)).astype(np.float32)

    def silent(weights: np.ndarray) -> np.ndarray:
        weights[constant, :] = 0.0  # this layer never writes to the constant channel
        return weights

    ones = np.ones(dim, dtype=np.float32)
    embeddings = rng.normal(0.0, 1.0, (len(types), dim)).astype(np.float32)
    embeddings[:, constant] = 1.0
    yield "token_embd.weight", embeddings.astype(np.float16)
    for i in range(layers):
        yield f"blk.{i}.attn_norm.weight", ones
        for name in ("attn_q", "attn_k", "attn_v"):
            yield f"blk.{i}.{name}.weight", matrix(dim, dim).astype(np.float16)
        yield f"blk.{i}.attn_output.weight", silent(matrix(dim, dim)).astype(np.float16)
        yield f"blk.{i}.ffn_norm.weight", ones
        yield f"blk.{i}.ffn_gate.weight", matrix(ff, dim).astype(np.float16)
        yield f"blk.{i}.ffn_up.weight", matrix(ff, dim).astype(np.float16)
        yield f"blk.{i}.ffn_down.weight", silent(matrix(dim, ff)).astype(np.float16)
    yield "output_norm.weight", ones
    output = matrix(len(types), dim)
    output[:, constant] = [0.0 if t == gguf.TokenType.NORMAL else _BANNED_WEIGHT for t in types]
    yield "output.weight", output.astype(np.float16)
