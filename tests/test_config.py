"""Configuration: the old swapper_config.yaml loads unchanged; bad configs name file and key."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from gateway.app import create_app
from gateway.config.reader import load_config, parse_config
from gateway.config.reload import file_loader
from gateway.config.schema import ConfigError
from tests.emulators import openai_server as vllm_emulator

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
EXAMPLE_ENV = {"OPS_KEY": "sk-ops-example"}  # the full example's admin key comes from the env


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
    config = load_config(EXAMPLES / "gateway.yaml", env=EXAMPLE_ENV)
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


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(Path(sys.executable).parent / "swapper-gateway"), *args],
                          capture_output=True, text=True, timeout=60,
                          env={**os.environ, **(env or {})})


def test_check_config_accepts_a_good_file() -> None:
    result = _cli("check-config", "--strict", str(EXAMPLES / "gateway.yaml"), env=EXAMPLE_ENV)
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
        assert load_config(EXAMPLES / name, env=EXAMPLE_ENV).unknown_keys == ()


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
    assert result.returncode == 0
    assert ("warning: unknown key models.m.size_gbs (ignored); did you mean 'size_gb'?"
            in result.stdout)


def write(tmp_path: Path, data: dict) -> Path:
    file = tmp_path / "conf.yaml"
    file.write_text(yaml.safe_dump(data))
    return file


def test_unknown_keys_get_the_nearest_known_key(tmp_path: Path) -> None:
    config = parse_config({"swapper": {"mdoe": "single-active"}, "cahce": {},
                           "models": {"m": {"path": "ollama:m", "aliasses": ["x"]}},
                           "telemetry": {}}, env={})
    assert set(config.warnings) == {
        "unknown key swapper.mdoe (ignored); did you mean 'mode'?",
        "unknown key cahce (ignored); did you mean 'cache'?",
        "unknown key models.m.aliasses (ignored); did you mean 'aliases'?",
        "unknown key telemetry (ignored)",  # nothing close: no guess
    }


def test_strict_turns_warnings_into_a_refusal(tmp_path: Path) -> None:
    file = write(tmp_path, {"swapper": {"mdoe": "multi-active"},
                            "models": {"m": {"path": "ollama:m"}}})
    lenient = _cli("check-config", str(file))
    assert lenient.returncode == 0 and "did you mean 'mode'?" in lenient.stdout
    strict = _cli("check-config", "--strict", str(file))
    assert strict.returncode == 2
    assert "did you mean 'mode'?" in strict.stdout
    assert f"{file}: refused with --strict: 1 warning" in strict.stderr
    clean = write(tmp_path, {"models": {"m": {"path": "ollama:m"}}})
    assert _cli("check-config", "--strict", str(clean)).returncode == 0


def test_every_error_is_reported_not_just_the_first(tmp_path: Path) -> None:
    file = write(tmp_path, {
        "swapper": {"mode": "both"},
        "backends": {"vllm": {"kind": "opnai", "base_url": "http://x"}},
        "models": {"a": {"backend": "vllm", "ttl": "10m"},
                   "b": {"path": "ollama:b", "size_gb": "big", "priority": "urgent"}},
        "server": {"port": "eighty"},
    })
    result = _cli("check-config", str(file))
    assert result.returncode == 2
    lines = [line.strip() for line in result.stderr.splitlines()[1:]]
    assert result.stderr.startswith("swapper-gateway: invalid configuration (6 problems):")
    assert lines == [
        f"{file}: backends.vllm.kind: must be one of ollama, openai, process, vllm-sleep, "
        "llama-router, got 'opnai'; did you mean 'openai'?",
        f"{file}: models.a.ttl: seconds expected (a number), got str '10m'",
        f"{file}: models.b.size_gb: GB expected (a number), got str 'big'",
        f"{file}: models.b.priority: must be high, normal or low, got 'urgent'",
        f"{file}: swapper.mode: must be one of single-active, multi-active, got 'both'",
        f"{file}: server.port: a whole number expected, got str 'eighty'",
    ]


@pytest.mark.parametrize(("key", "value", "unit"), [
    ("ttl", "10m", "seconds expected (a number)"),
    ("size_gb", "4.7GB", "GB expected (a number)"),
    ("max_concurrent", 1.5, "a whole number expected"),
])
def test_type_errors_name_the_unit(key: str, value: object, unit: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config({"models": {"m": {"path": "ollama:m", key: value}}}, source="c.yaml",
                     env={})
    assert str(caught.value) == f"c.yaml: models.m.{key}: {unit}, got {type(value).__name__} " \
                               f"{value!r}"


def test_a_config_serving_no_model_is_refused_with_a_hint(tmp_path: Path) -> None:
    file = write(tmp_path, {"backends": {"vllm": {"kind": "openai", "base_url": "http://x"}}})
    result = _cli("check-config", str(file))
    assert result.returncode == 2
    assert f"{file}: models: no models configured, so nothing can be served" in result.stderr
    assert "models: {my-model: {backend: vllm, served_name: NAME}}" in result.stderr


def test_no_models_is_fine_while_ollama_can_be_asked(tmp_path: Path) -> None:
    empty = tmp_path / "empty.yaml"
    empty.write_text("swapper: {mode: single-active}\n")
    result = _cli("check-config", str(empty))
    assert result.returncode == 0, result.stderr
    assert "at start the gateway serves what the Ollama at http://localhost:11434 has pulled" \
        in result.stdout
    assert parse_config({}, env={}).models == {}  # no file at all: discovery too


PROCESS = {"kind": "process", "cmd": "llama-server -m {path} --port {port}"}


@pytest.mark.parametrize(("cmd", "message"), [
    ("llama-server -m {path} --port {prot}",
     "unknown placeholder {prot} (known: {path}, {port}, {name}, {served_name}, {host}); "
     "did you mean {port}?"),
    ("llama-server -m {path}", "has no {port}"),
    ("llama-server -m '{path} --port {port}", "cannot be split into arguments"),
])
def test_process_templates_are_checked_when_read(cmd: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config({"backends": {"llama": {"kind": "process", "cmd": cmd}},
                      "models": {"m": {"backend": "llama", "path": "m.gguf"}}},
                     source="c.yaml", env={})
    assert f"c.yaml: backends.llama.cmd: {message}" in str(caught.value)


def test_a_process_models_file_must_exist(tmp_path: Path) -> None:
    present = tmp_path / "there.gguf"
    present.write_bytes(b"GGUF")
    missing = tmp_path / "gone.gguf"
    models = {"ok": {"backend": "llama", "path": str(present)},
              "hub": {"backend": "llama", "path": "Qwen/Qwen2.5-0.5B-Instruct"},  # a name
              "folder": {"backend": "llama", "path": str(tmp_path)},  # a HF model for vLLM
              "lost": {"backend": "llama", "path": str(missing)},
              "home": {"backend": "llama", "path": "~/models/x.gguf"}}
    with pytest.raises(ConfigError) as caught:
        parse_config({"backends": {"llama": PROCESS}, "models": models}, source="c.yaml",
                     env={})
    assert caught.value.errors == (
        f"c.yaml: models.lost.path: not found: {missing}",
        "c.yaml: models.home.path: '~/models/x.gguf': '~' is not expanded (the command runs "
        "without a shell); write the full path",
    )


def test_serve_refuses_a_bad_config_before_it_starts(tmp_path: Path) -> None:
    file = write(tmp_path, {"backends": {"llama": {"kind": "process",
                                                    "cmd": "llama-server --port {prot}"}},
                            "models": {"m": {"backend": "llama"}}})
    result = _cli("serve", "--config", str(file), "--port", "1")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"{file}: backends.llama.cmd: unknown placeholder {{prot}}" in result.stderr


def test_reload_refuses_a_bad_template_and_keeps_serving(tmp_path: Path,
                                                         start_server: Any) -> None:
    backend = start_server(vllm_emulator.create_app(["org/m1"]))
    file = write(tmp_path, {"backends": {"vllm": {"kind": "openai", "base_url": backend.url}},
                            "models": {"m1": {"backend": "vllm", "served_name": "org/m1"}}})
    gateway = start_server(create_app(load_config(file, env={}), loader=file_loader(str(file))))
    write(tmp_path, {"backends": {"vllm": {"kind": "openai", "base_url": backend.url},
                                  "llama": {"kind": "process", "cmd": "llama-server {prot}"}},
                     "models": {"m1": {"backend": "vllm", "served_name": "org/m1"},
                                "tiny": {"backend": "llama"}}})
    refused = httpx.post(gateway.url + "/admin/reload", timeout=30)
    assert refused.status_code == 400
    error = refused.json()["error"]
    assert error["code"] == "config_refused" and "backends.llama.cmd" in error["message"]
    models = httpx.get(gateway.url + "/v1/models").json()["data"]
    assert [m["id"] for m in models] == ["m1"]  # the old config stays in force
    assert httpx.post(gateway.url + "/v1/chat/completions", timeout=30, json={
        "model": "m1", "messages": [{"role": "user", "content": "hi"}]}).status_code == 200
