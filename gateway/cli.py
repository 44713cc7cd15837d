"""`swapper-gateway serve | check-config | reload | demo`."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from typing import Any

import httpx
import uvicorn

from gateway.app import create_app
from gateway.config.discovery import discover_ollama_models
from gateway.config.reload import file_loader
from gateway.config.schema import DEFAULT_PORT, ConfigError, GatewayConfig, load_config
from gateway.demo import DEMO_DIR, run_demo
from gateway.logs import configure_logging


def _load(path: str | None) -> GatewayConfig:
    try:
        return load_config(path)
    except ConfigError as exc:
        print(f"swapper-gateway: invalid configuration: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def serve(args: argparse.Namespace) -> int:
    config = _load(args.config)
    configure_logging(config.server.log_level)
    options: dict[str, Any] = {
        "host": args.host or config.server.host, "port": args.port or config.server.port,
        "log_level": "warning", "access_log": False, "loop": "auto", "http": "auto",
        "timeout_graceful_shutdown": int(config.server.shutdown_grace_s),
    }
    if args.workers > 1:
        return _serve_workers(config, args.workers, options)
    config = discover_ollama_models(config)
    loader = file_loader(config.source) if config.source != "<defaults>" else None
    uvicorn.run(create_app(config, loader=loader), **options)
    return 0


def _serve_workers(config: GatewayConfig, workers: int, options: dict[str, Any]) -> int:
    """Several worker processes are several replicas: they need Redis to coordinate, and a
    `process` backend's servers would be started once per worker."""
    refusal = workers_refusal(config)
    if refusal:
        print(f"swapper-gateway: --workers {workers}: {refusal}", file=sys.stderr)
        return 2
    if config.source != "<defaults>":
        os.environ["SWAPPER_CONFIG_PATH"] = config.source
    os.environ.setdefault("PROMETHEUS_MULTIPROC_DIR", tempfile.mkdtemp(prefix="swapper-metrics-"))
    uvicorn.run("gateway.app:app_from_env", factory=True, workers=workers, **options)
    return 0


def workers_refusal(config: GatewayConfig) -> str | None:
    if not config.cache.redis_url:
        return "several workers coordinate through Redis: set cache.redis_url"
    process = sorted(b.name for b in config.backends.values() if b.kind == "process")
    if process:
        return f"backends {', '.join(process)} start one server per worker; run one worker"
    return None


def reload(args: argparse.Namespace) -> int:
    """Ask a running gateway to re-read its config (as SIGHUP does)."""
    headers = {"authorization": f"Bearer {args.key}"} if args.key else {}
    try:
        response = httpx.post(f"{args.url.rstrip('/')}/admin/reload", headers=headers, timeout=60)
    except httpx.HTTPError as exc:
        print(f"swapper-gateway: cannot reach {args.url}: {exc}", file=sys.stderr)
        return 1
    if response.status_code != 200:
        message = response.json().get("error", {}).get("message", response.text)
        print(f"swapper-gateway: reload refused ({response.status_code}): {message}",
              file=sys.stderr)
        return 1
    print(f"reloaded {response.json()['source']}: {len(response.json()['models'])} models")
    return 0


def check_config(args: argparse.Namespace) -> int:
    config = _load(args.file)
    print(f"{config.source}: OK — {len(config.models)} models, {len(config.backends)} backends, "
          f"mode {config.swapper.mode}")
    for model in config.models.values():
        aliases = f" (aliases: {', '.join(model.aliases)})" if model.aliases else ""
        print(f"  {model.name}{aliases} -> {model.backend}:{model.served_name}")
    for key in config.unknown_keys:
        print(f"  warning: unknown key {key} (ignored)")
    return 0


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="swapper-gateway", description=__doc__)
    commands = root.add_subparsers(dest="command", required=True)
    run = commands.add_parser("serve", help="run the gateway")
    run.add_argument("--config", help="swapper_config.yaml (default: $SWAPPER_CONFIG_PATH, "
                                      "./swapper_config.yaml, or built-in defaults)")
    run.add_argument("--host", help="bind address (default from config: 0.0.0.0)")
    run.add_argument("--port", type=int, help="port (default from config: 8890)")
    run.add_argument("--workers", type=int, default=1,
                     help="worker processes (default 1; more need cache.redis_url)")
    run.set_defaults(func=serve)
    check = commands.add_parser("check-config", help="validate a config file and exit")
    check.add_argument("file", nargs="?", help="config file (default as for serve)")
    check.set_defaults(func=check_config)
    again = commands.add_parser("reload", help="make a running gateway re-read its config")
    again.add_argument("--url", default=f"http://127.0.0.1:{DEFAULT_PORT}",
                       help="the gateway (default http://127.0.0.1:8890)")
    again.add_argument("--key", default=os.environ.get("SWAPPER_ADMIN_KEY"),
                       help="an admin key (default $SWAPPER_ADMIN_KEY)")
    again.set_defaults(func=reload)
    demo = commands.add_parser("demo", help="serve tiny llama.cpp models to see swaps happen")
    demo.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    demo.add_argument("--port", type=int, default=8890, help="port (default 8890)")
    demo.add_argument("--dir", default=str(DEMO_DIR),
                      help=f"where the models and config are written (default {DEMO_DIR})")
    demo.set_defaults(func=run_demo)
    return root


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
