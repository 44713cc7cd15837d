"""What may leave the gateway: masked command lines, one-line error texts."""

from __future__ import annotations

import pytest

from gateway.redaction import first_meaningful, mask_argv, public_line


def test_secret_flags_are_masked_in_either_form() -> None:
    argv = ["llama-server", "-m", "/m/x.gguf", "--api-key", "sk-1", "--api-key=sk-2",
            "--hf-token", "hf_x", "--db-password=pw", "HF_TOKEN=hf_y", "--port", "8080"]
    assert mask_argv(argv) == ["llama-server", "-m", "/m/x.gguf", "--api-key", "***",
                               "--api-key=***", "--hf-token", "***", "--db-password=***",
                               "HF_TOKEN=***", "--port", "8080"]


def test_flags_that_only_look_like_secrets_keep_their_values() -> None:
    argv = ["vllm", "serve", "--max-num-batched-tokens", "8192", "--tokenizer", "org/tok"]
    assert mask_argv(argv) == argv


def test_a_secret_flag_with_no_value_hides_nothing_after_it() -> None:
    assert mask_argv(["server", "--api-key", "--port", "1"]) == ["server", "--api-key",
                                                                  "--port", "1"]


@pytest.mark.parametrize(("text", "shown"), [
    ("0.00.005.743 E llama_model_load: error loading model: failed to load model from "
     "/srv/models/secret/x.gguf", "llama_model_load: error loading model: failed to load model "
     "from x.gguf"),
    ("Cannot connect to host 127.0.0.1:9399 ssl:default", "Cannot connect to host <address> "
     "ssl:default"),
    ("POST http://10.1.2.3:11434/api/generate failed", "POST <url> failed"),
    ("aiohttp.client_exceptions.ClientConnectorError: refused", "refused"),
    ("auth failed for Bearer sk-abcdef", "auth failed for Bearer ***"),
    ("3 errors found", "3 errors found"),
])
def test_public_lines_keep_the_words_and_drop_the_internals(text: str, shown: str) -> None:
    assert public_line(text) == shown


def test_public_lines_are_one_line_and_short() -> None:
    line = public_line("\n\n" + "x" * 500 + "\nsecond line")
    assert "\n" not in line and len(line) == 200 and line.endswith("…")


def test_the_first_error_line_wins_over_usage_and_noise() -> None:
    output = ["usage: server [--fail MESSAGE]", "  [--crash-after S]", "loading model",
              "gguf_init: failed to read header",
              "0.01.002.003 E main: error: bad magic in /x/y.gguf"]
    assert first_meaningful(output) == "main: error: bad magic in y.gguf"
    assert first_meaningful(["all good", "listening"]) is None
