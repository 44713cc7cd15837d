"""Configuration: the old swapper_config.yaml loads unchanged; bad configs name file and key."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from gateway.config.schema import ConfigError, load_config, parse_config

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def test_old_swapper_config_loads_unchanged() -> None:
    config = load_config(EXAMPLES / "swapper_config.yaml", env={})
    assert config.swapper.mode == "single-active"
    assert config.swapper.default_model == "qwen2.5-7b"
    r1 = config.models["deepseek-r1-70b"]
    assert (r1.backend, r1.served_name, r1.size_gb, r1.priority, r1.type) == (
        "ollama", "deepseek-r1:70b", 42.0, "high", "llm")
    assert config.backends["ollama"].kind == "ollama"
    assert config.backends["ollama"].base_url == "http://localhost:11434"


def test_full_example_loads() -> None:
    config = load_config(EXAMPLES / "gateway.yaml", env={})
    assert config.backends["vllm"].base_url == "http://gpu-box:8000"  # trailing /v1 normalised
    assert config.models["qwen2.5-7b"].aliases == ("qwen", "gpt-4o-mini")
    assert config.models["qwen2.5-7b"].ttl_s == 600
    assert config.swapper.budget().memory_gb == 24
    assert config.batching.window_ms == 250


def test_old_environment_variables_override_the_file() -> None:
    env = {"OLLAMA_BASE_URL": "http://ollama:1234", "SWAPPER_MODE": "multi-active",
           "MAX_CONCURRENT_MODELS": "3", "MODEL_SWAP_TIMEOUT": "42"}
    config = load_config(EXAMPLES / "swapper_config.yaml", env=env)
    assert config.backends["ollama"].base_url == "http://ollama:1234"
    assert config.swapper.mode == "multi-active"
    assert config.swapper.max_concurrent_models == 3
    assert config.swapper.model_swap_timeout == 42.0


def test_swapper_config_path_is_used_when_no_file_is_given() -> None:
    config = load_config(None, env={"SWAPPER_CONFIG_PATH": str(EXAMPLES / "swapper_config.yaml")})
    assert "deepseek-r1-70b" in config.models


def test_no_config_at_all_gives_working_defaults(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    config = load_config(None, env={})
    assert config.server.port == 8890
    assert config.backends["ollama"].base_url == "http://localhost:11434"
    assert config.cache.redis_url is None


@pytest.mark.parametrize(
    ("data", "key"),
    [
        ({"models": {"m": {"path": "ollama:x", "size_gb": "big"}}}, "models.m.size_gb"),
        ({"models": {"m": {"backend": "nowhere"}}}, "models.m.backend"),
        ({"models": {"m": {"path": "ollama:x", "priority": "urgent"}}}, "models.m.priority"),
        ({"swapper": {"mode": "both"}}, "swapper.mode"),
        ({"swapper": {"default_model": "ghost"}}, "swapper.default_model"),
        ({"backends": {"b": {"kind": "openai"}}}, "backends.b.base_url"),
        ({"backends": {"b": {"kind": "process"}}}, "backends.b.cmd"),
        ({"backends": {"b": {"kind": "gpu"}}}, "backends.b.kind"),
        ({"backends": {"b": {"base_url": "http://x", "timeouts": {"read": -1}}}},
         "backends.b.timeouts.read"),
        ({"models": {"a": {"path": "ollama:a", "aliases": ["b"]}, "b": {"path": "ollama:b"}}},
         "models."),
        ({"server": {"port": "eighty"}}, "server.port"),
        ({"models": []}, "models"),
    ],
)
def test_bad_config_names_the_key_and_the_file(data: dict, key: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(data, source="conf.yaml", env={})
    message = str(caught.value)
    assert message.startswith("conf.yaml: ")
    assert key in message


def test_bad_environment_value_is_named() -> None:
    with pytest.raises(ConfigError, match="MAX_CONCURRENT_MODELS"):
        parse_config({}, env={"MAX_CONCURRENT_MODELS": "many"})


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gateway", *args], capture_output=True,
                          text=True, timeout=60)


def test_check_config_accepts_a_good_file() -> None:
    result = _cli("check-config", str(EXAMPLES / "gateway.yaml"))
    assert result.returncode == 0, result.stderr
    assert "llama-3.1-8b -> vllm:meta-llama/Llama-3.1-8B-Instruct" in result.stdout


def test_check_config_rejects_a_bad_file_naming_file_and_key(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("models:\n  m:\n    path: 'ollama:m'\n    size_gb: [1]\n")
    result = _cli("check-config", str(bad))
    assert result.returncode == 2
    assert str(bad) in result.stderr and "models.m.size_gb" in result.stderr


def test_check_config_rejects_invalid_yaml(tmp_path: Path) -> None:
    bad = tmp_path / "broken.yaml"
    bad.write_text("models: {m: [\n")
    result = _cli("check-config", str(bad))
    assert result.returncode == 2
    assert "invalid YAML" in result.stderr


def test_examples_have_no_unknown_keys() -> None:
    for name in ("swapper_config.yaml", "gateway.yaml"):
        assert load_config(EXAMPLES / name, env={}).unknown_keys == ()


def test_unknown_keys_are_reported_not_fatal() -> None:
    config = parse_config({
        "swapper": {"mode": "single-active", "max_concurent_models": 2},
        "backends": {"b": {"base_url": "http://x", "timeouts": {"reed": 1},
                           "env": {"ANY_NAME": "ok"}}},
        "models": {"m": {"backend": "b", "sise_gb": 3, "fallback": [{"backend": "b", "x": 1}]}},
        "telemetry": {},
    }, env={})
    assert set(config.unknown_keys) == {
        "swapper.max_concurent_models", "backends.b.timeouts.reed", "models.m.sise_gb",
        "models.m.fallback[0].x", "telemetry"}


def test_check_config_warns_about_unknown_keys(tmp_path: Path) -> None:
    file = tmp_path / "typo.yaml"
    file.write_text("models:\n  m:\n    path: 'ollama:m'\n    size_gbs: 4\n")
    result = _cli("check-config", str(file))
    assert result.returncode == 0 and "unknown key models.m.size_gbs" in result.stdout
