"""Write a tiny random Llama in Hugging Face format, for vLLM: `python tiny_hf_llama.py DIR`.

Run with the vLLM venv's Python (it needs torch, transformers and tokenizers, which the gateway's
own venv does not have). Nothing is downloaded: the config, the weights (seeded, so every run
writes the same model) and a byte-level tokenizer are all made here.

The vocabulary is the special tokens plus the bytes of printable ASCII and newline, so that the
chat prompt tokenizes and every token the model samples decodes to readable text.
"""

from __future__ import annotations

import sys
from pathlib import Path

CHATML = (
    "{% for message in messages %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIALS = ["<unk>", "<s>", "<|im_start|>", "<|im_end|>"]


def byte_level_char(byte: int) -> str:
    """The character GPT-2's byte-level pre-tokenizer maps a byte (newline, or 32-126) to."""
    return chr(byte) if byte > 32 else chr(256 + byte)  # bytes 0-32 come first after 255


def write(directory: Path) -> Path:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    pieces = [*SPECIALS, *(byte_level_char(b) for b in [10, *range(32, 127)])]
    vocab = {piece: i for i, piece in enumerate(pieces)}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>", eos_token="<|im_end|>",
        additional_special_tokens=SPECIALS[2:], chat_template=CHATML,
    ).save_pretrained(directory)
    config = LlamaConfig(  # vLLM's CPU attention wants head_dim >= 32
        vocab_size=len(vocab), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, head_dim=32, max_position_embeddings=512,
        bos_token_id=vocab["<s>"], eos_token_id=vocab["<|im_end|>"], torch_dtype="float32",
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(directory)
    return directory


if __name__ == "__main__":
    write(Path(sys.argv[1]))
