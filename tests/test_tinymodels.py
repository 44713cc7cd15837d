"""The tiny GGUF writer: what it writes parses back with gguf's own reader, as llama.cpp expects."""

from __future__ import annotations

from pathlib import Path

import pytest

gguf = pytest.importorskip("gguf", reason="the `demo` extra (gguf, numpy) is not installed")

from gateway.tinymodels import CHATML, SPECIALS, write_tiny_gguf  # noqa: E402


def _field(reader: gguf.GGUFReader, key: str) -> object:
    return reader.fields[key].contents()


def _read(path: Path) -> gguf.GGUFReader:
    return gguf.GGUFReader(path)


def test_metadata_and_vocabulary(tmp_path: Path) -> None:
    reader = _read(write_tiny_gguf(tmp_path / "m.gguf", vocab=400))

    assert _field(reader, "general.architecture") == "llama"
    assert _field(reader, "llama.embedding_length") == 64
    assert _field(reader, "llama.block_count") == 2
    assert _field(reader, "tokenizer.ggml.model") == "llama"
    assert _field(reader, "tokenizer.chat_template") == CHATML
    tokens = _field(reader, "tokenizer.ggml.tokens")
    assert isinstance(tokens, list)
    assert len(tokens) == 400 == len(set(tokens))
    assert tokens[: len(SPECIALS)] == list(SPECIALS)
    assert tokens[len(SPECIALS)] == "<0x00>"
    types = _field(reader, "tokenizer.ggml.token_type")
    assert isinstance(types, list)
    assert types.count(gguf.TokenType.BYTE) == 256
    assert "llama.pooling_type" not in reader.fields


def test_tensor_shapes_and_types(tmp_path: Path) -> None:
    reader = _read(write_tiny_gguf(tmp_path / "m.gguf", dim=96, layers=3, vocab=380))
    tensors = {t.name: t for t in reader.tensors}

    # GGUF lists shapes innermost first: (columns, rows).
    assert list(tensors["token_embd.weight"].shape) == [96, 380]
    assert list(tensors["output.weight"].shape) == [96, 380]
    assert list(tensors["blk.2.ffn_down.weight"].shape) == [384, 96]
    assert "blk.3.attn_q.weight" not in tensors
    assert tensors["blk.0.attn_q.weight"].tensor_type == gguf.GGMLQuantizationType.F16
    assert tensors["output_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32


def test_constant_channel_bans_special_and_byte_tokens(tmp_path: Path) -> None:
    reader = _read(write_tiny_gguf(tmp_path / "m.gguf"))
    tensors = {t.name: t for t in reader.tensors}
    types = _field(reader, "tokenizer.ggml.token_type")

    banned = tensors["output.weight"].data[:, -1]
    assert all((weight < -100) == (kind != gguf.TokenType.NORMAL)
               for weight, kind in zip(banned, types, strict=True))
    assert not tensors["blk.1.attn_output.weight"].data[-1].any()
    assert not tensors["blk.1.ffn_down.weight"].data[-1].any()


def test_embedding_models_pool_by_mean(tmp_path: Path) -> None:
    reader = _read(write_tiny_gguf(tmp_path / "e.gguf", embedding=True))
    assert _field(reader, "llama.pooling_type") == gguf.PoolingType.MEAN


def test_same_seed_same_file_and_bad_sizes_refused(tmp_path: Path) -> None:
    first = write_tiny_gguf(tmp_path / "a.gguf", seed=7).read_bytes()
    assert first == write_tiny_gguf(tmp_path / "b.gguf", seed=7).read_bytes()
    assert first != write_tiny_gguf(tmp_path / "c.gguf", seed=8).read_bytes()
    with pytest.raises(ValueError, match="vocab"):
        write_tiny_gguf(tmp_path / "d.gguf", vocab=300)
    with pytest.raises(ValueError, match="dim"):
        write_tiny_gguf(tmp_path / "d.gguf", dim=48)
