"""A tiny random-weight reranker in GGUF that `llama-server --reranking` serves for real.

llama.cpp scores a (query, document) pair with a model whose pooling is `rank` and that has a
classifier head (`cls.output`); of the small architectures, Qwen3 loads one. Its metadata,
vocabulary and tokenizer are the tiny chat models' (`gateway.tinymodels`), so any text tokenizes.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np

# The tiny chat models' metadata (keyed by the writer's architecture) and tokenizer, as they are.
from gateway.tinymodels import _add_metadata, _add_tokenizer, _vocabulary

_HEAD_DIM = 32
_VOCAB = 512


def write_tiny_reranker(path: Path, *, dim: int = 64, layers: int = 2, seed: int = 7) -> Path:
    pieces, types = _vocabulary(_VOCAB)
    writer = gguf.GGUFWriter(path, "qwen3")
    _add_metadata(writer, dim=dim, layers=layers, vocab=_VOCAB, embedding=False)
    writer.add_key_length(_HEAD_DIM)  # Qwen3 names its head size
    writer.add_value_length(_HEAD_DIM)
    writer.add_pooling_type(gguf.PoolingType.RANK)
    _add_tokenizer(writer, pieces, types)
    rng = np.random.default_rng(seed)

    def matrix(rows: int, cols: int) -> np.ndarray:
        return rng.normal(0.0, cols**-0.5, (rows, cols)).astype(np.float32)

    ones = np.ones(dim, dtype=np.float32)
    writer.add_tensor("token_embd.weight", rng.normal(0.0, 1.0, (_VOCAB, dim)).astype(np.float32))
    for i in range(layers):
        writer.add_tensor(f"blk.{i}.attn_norm.weight", ones)
        for name in ("attn_q", "attn_k", "attn_v", "attn_output"):
            writer.add_tensor(f"blk.{i}.{name}.weight", matrix(dim, dim))
        for name in ("attn_q_norm", "attn_k_norm"):
            writer.add_tensor(f"blk.{i}.{name}.weight", np.ones(_HEAD_DIM, dtype=np.float32))
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", ones)
        writer.add_tensor(f"blk.{i}.ffn_gate.weight", matrix(4 * dim, dim))
        writer.add_tensor(f"blk.{i}.ffn_up.weight", matrix(4 * dim, dim))
        writer.add_tensor(f"blk.{i}.ffn_down.weight", matrix(dim, 4 * dim))
    writer.add_tensor("output_norm.weight", ones)
    writer.add_tensor("output.weight", matrix(_VOCAB, dim))
    writer.add_tensor("cls.output.weight", matrix(1, dim))  # the relevance score
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
