"""`swapper-gateway serve | check-config | reload | status | demo`."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import logging
import os
import signal
import socket
import sys
import tempfile
from collections.abc import Callable
from types import FrameType
from typing import Any

import httpx
import structlog
import uvicorn

from gateway import __version__
from gateway.app import create_app
from gateway.config.discovery import discover_ollama_models, discovery_applies, ollama_url
from gateway.config.reader import load_config
from gateway.config.reload import file_loader
from gateway.config.schema import DEFAULT_PORT, ConfigError, GatewayConfig
from gateway.demo import DEMO_DIR, QUIET_EVENTS, prepare_demo
from gateway.listener import Listener
from gateway.logs import LOG_FORMATS, configure_logging, resolve_format
from gateway.services import Services

log = structlog.get_logger("gateway")
FORCED_EXIT = 130  # what a shell reports for a process ended by Ctrl-C
_FORCED_STOP_S = 5.0  # after a forced exit, how long the gateway's own processes get to stop


def _err(message: str) -> None:
    print(f"swapper-gateway: {message}", file=sys.stderr, flush=True)


def _say_now(message: str) -> None:
    """One line from a signal handler: a raw write, as the interrupted code may be printing."""
    os.write(sys.stderr.fileno(), f"swapper-gateway: {message}\n".encode())


def _load(path: str | None) -> GatewayConfig:
    try:
        return load_config(path)
    except ConfigError as exc:
        problems = exc.errors
        heading = "1 problem" if len(problems) == 1 else f"{len(problems)} problems"
        _err(f"invalid configuration ({heading}):\n" + "\n".join(f"  {p}" for p in problems))
        raise SystemExit(2) from None


# -- serve --------------------------------------------------------------------------------------


def serve(args: argparse.Namespace, quiet_events: frozenset[str] = frozenset(),
          after_banner: str = "") -> int:
    """`after_banner`: printed once the gateway listens (the demo's instructions)."""
    config = _load(args.config)
    log_format = resolve_format(args.log_format)
    configure_logging(config.server.log_level, log_format, quiet_events)
    host, port = args.host or config.server.host, args.port or config.server.port
    listening = _bind(host, port)
    if listening is None:
        return 1
    options: dict[str, Any] = {
        "host": host, "port": port, "log_level": "warning", "access_log": False,
        "loop": "auto", "http": "auto",
        "timeout_graceful_shutdown": int(config.server.shutdown_grace_s),
        # The gateway reads no client address (it logs none), so X-Forwarded-For is not
        # parsed on every request.
        "proxy_headers": False,
    }
    if args.workers > 1:
        listening.close()  # uvicorn's supervisor binds it again for its workers
        return _serve_workers(config, args.workers, options, log_format)
    config = discover_ollama_models(config)
    loader = file_loader(config.source) if config.source != "<defaults>" else None
    app = create_app(config, loader=loader)
    def announce() -> None:
        _banner(config, host, port, log_format)
        if after_banner:
            print(after_banner, flush=True)

    server = GatewayServer(uvicorn.Config(app, **options), app.state.services, announce)
    return server.serve_until_stopped(listening)


def _bind(host: str, port: int) -> socket.socket | None:
    """The listening socket, or None after one clear line when the port is taken."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            _err(f"port {port} on {host} is already in use (another gateway?); "
                 f"choose another with --port")
        else:
            _err(f"cannot listen on {host}:{port}: {exc.strerror or exc} (see --host, --port)")
        return None
    sock.set_inheritable(True)
    return sock


class GatewayServer(uvicorn.Server):
    """uvicorn's server with a gateway's manners at the edges: a banner once it listens, one
    line on Ctrl-C saying what it waits for, and a second Ctrl-C that ends it quietly."""

    def __init__(self, config: uvicorn.Config, services: Services,
                 banner: Callable[[], None]) -> None:
        super().__init__(config)
        self.services = services
        self.banner = banner
        self._loop: asyncio.AbstractEventLoop | None = None

    def serve_until_stopped(self, listening: socket.socket) -> int:
        try:
            self.run(sockets=[listening])
        except KeyboardInterrupt:
            pass  # uvicorn re-raises the Ctrl-C it handled, once it has shut down
        if not self.started:
            return 1
        return FORCED_EXIT if self.force_exit else 0

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        """uvicorn's start-up (the app's lifespan), with the gateway's own `Listener` on each
        socket in place of the loop's server: it takes in every waiting connection at once."""
        self._loop = asyncio.get_running_loop()
        await super().startup([])
        if not self.started:
            return
        config = self.config

        def protocol() -> asyncio.Protocol:
            return config.http_protocol_class(  # type: ignore[call-arg]
                config=config, server_state=self.server_state, app_state=self.lifespan.state)

        self.servers = [Listener(sock, protocol, config.backlog)  # type: ignore[misc]
                        for sock in sockets or ()]
        self.banner()

    def _open_requests(self) -> int:
        return sum(1 for task in self.server_state.tasks if not task.done())

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        forced = self.should_exit and sig == signal.SIGINT and not self.force_exit
        first = not self.should_exit
        super().handle_exit(sig, frame)
        if not (forced or first):
            return
        if self._loop is None:  # not started yet: nothing to drain or cut
            _say_now("shutting down")
            return
        # The rest runs on the loop, between callbacks: never in the middle of a log line.
        self._loop.call_soon_threadsafe(self._cut if forced else self._drain)

    def _drain(self) -> None:
        self.services.ready = False  # the readiness probe turns away new traffic at once
        streams = self._open_requests()
        _err(f"draining {streams} stream{'' if streams == 1 else 's'}, Ctrl-C again to force"
             if streams else "shutting down")

    def _cut(self) -> None:
        """Second Ctrl-C: end what runs, without a traceback per cut stream."""
        streams = self._open_requests()
        _err(f"forced: cutting {streams} stream{'' if streams == 1 else 's'}")
        for name in ("uvicorn.error", "uvicorn.asgi"):
            logging.getLogger(name).disabled = True
        for task in list(self.server_state.tasks):
            task.cancel()

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        await super().shutdown(sockets)
        if self.force_exit:
            # uvicorn skips the app's own shutdown when forced; the model servers the gateway
            # started must still stop, so run it, bounded.
            with contextlib.suppress(Exception, TimeoutError):
                async with asyncio.timeout(_FORCED_STOP_S):
                    await self.lifespan.shutdown()


def _serve_workers(config: GatewayConfig, workers: int, options: dict[str, Any],
                   log_format: str) -> int:
    """Several worker processes are several replicas: they need Redis to coordinate, and a
    `process` backend's servers would be started once per worker."""
    refusal = workers_refusal(config)
    if refusal:
        _err(f"--workers {workers}: {refusal}")
        return 2
    if config.source != "<defaults>":
        os.environ["SWAPPER_CONFIG_PATH"] = config.source
    os.environ["SWAPPER_LOG_FORMAT"] = log_format
    os.environ.setdefault("PROMETHEUS_MULTIPROC_DIR", tempfile.mkdtemp(prefix="swapper-metrics-"))
    _banner(discover_ollama_models(config), options["host"], options["port"], log_format,
            workers=workers)
    uvicorn.run("gateway.app:app_from_env", factory=True, workers=workers, **options)
    return 0


def workers_refusal(config: GatewayConfig) -> str | None:
    if not config.cache.redis_url:
        return "several workers coordinate through Redis: set cache.redis_url"
    process = sorted(b.name for b in config.backends.values() if b.kind == "process")
    if process:
        return f"backends {', '.join(process)} start one server per worker; run one worker"
    return None


# -- the banner ---------------------------------------------------------------------------------


def banner_lines(config: GatewayConfig, host: str, port: int, workers: int = 1) -> list[str]:
    """What an operator wants to know at start, one line each."""
    url = f"http://{_shown_host(host)}:{port}"
    listening = f" (listening on {host})" if host in ("0.0.0.0", "::") else ""
    worker_note = f", {workers} workers" if workers > 1 else ""
    return [
        f"Swapper Gateway {__version__} on {url}{listening}{worker_note}",
        f"  config    {_config_line(config)}",
        f"  models    {_models_line(config)}",
        f"  backends  {', '.join(f'{b.name} ({b.kind})' for b in config.backends.values())}",
        f"  mode      {config.swapper.mode}",
        f"  cache     {_cache_line(config)}",
        f"  auth      {_auth_line(config)}",
        f"  status    {url}/ui  ·  {url}/status  ·  API {url}/v1",
    ]


def _shown_host(host: str) -> str:
    return "localhost" if host in ("0.0.0.0", "::", "") else host


def _config_line(config: GatewayConfig) -> str:
    if config.source == "<defaults>":
        return "none (built-in defaults; --config FILE or $SWAPPER_CONFIG_PATH to name one)"
    return config.source


def _models_line(config: GatewayConfig) -> str:
    if not config.models:
        if discovery_applies(config):
            return (f"0 models: start Ollama or set OLLAMA_BASE_URL ({ollama_url(config)} does "
                    "not answer or has no model pulled; asking again in the background)")
        return "0 models"
    names = ", ".join(f"{m.name} ({m.backend})" for m in config.models.values())
    return f"{len(config.models)}: {names}"


def _cache_line(config: GatewayConfig) -> str:
    if not config.cache.enabled:
        return "off"
    if config.cache.redis_url is None:
        return "in-process LRU (set cache.redis_url for Redis)"
    url = httpx.URL(config.cache.redis_url)
    return f"redis {url.host}:{url.port or 6379}"  # never the password


def _auth_line(config: GatewayConfig) -> str:
    keys = config.auth.keys
    if not keys:
        return "OPEN: no API keys configured, every client is let in"
    admins = sum(1 for key in keys if key.admin)
    return f"{len(keys)} key{'' if len(keys) == 1 else 's'} ({admins} admin)"


def _banner(config: GatewayConfig, host: str, port: int, log_format: str,
            workers: int = 1) -> None:
    lines = banner_lines(config, host, port, workers)
    if log_format == "console":
        print("\n".join(lines), file=sys.stderr, flush=True)
        return
    log.info("gateway.listening", url=f"http://{_shown_host(host)}:{port}", workers=workers,
             config=config.source, models=[m.name for m in config.models.values()],
             backends={b.name: b.kind for b in config.backends.values()},
             cache=_cache_line(config), auth=_auth_line(config),
             ui=f"http://{_shown_host(host)}:{port}/ui", summary=lines[2].strip())


# -- reload, check-config -------------------------------------------------------------------------


def reload(args: argparse.Namespace) -> int:
    """Ask a running gateway to re-read its config (as SIGHUP does)."""
    headers = {"authorization": f"Bearer {args.key}"} if args.key else {}
    try:
        response = httpx.post(f"{args.url.rstrip('/')}/admin/reload", headers=headers, timeout=60)
    except httpx.HTTPError as exc:
        _err(f"cannot reach {args.url}: {exc} (is the gateway running? see --url)")
        return 1
    if response.status_code != 200:
        message = response.json().get("error", {}).get("message", response.text)
        _err(f"reload refused ({response.status_code}): {message}")
        return 1
    print(f"reloaded {response.json()['source']}: {len(response.json()['models'])} models")
    return 0


# -- status ---------------------------------------------------------------------------------------


def status(args: argparse.Namespace) -> int:
    """A running gateway's /status as terminal tables: nodes, then models (for SSH, no browser)."""
    headers = {"authorization": f"Bearer {args.key}"} if args.key else {}
    base = args.url.rstrip("/")
    try:
        with httpx.Client(base_url=base, headers=headers, timeout=30) as client:
            answers = [client.get("/status"), client.get("/models")]
    except httpx.HTTPError as exc:
        _err(f"cannot reach {args.url}: {exc} (is the gateway running? see --url)")
        return 1
    for answer in answers:
        if answer.status_code != 200:
            message = _error_message(answer)
            _err(f"status refused ({answer.status_code}): {message} (see --key)")
            return 1
    print("\n".join(status_lines(base, answers[0].json(), answers[1].json()["models"])))
    return 0


def _error_message(answer: httpx.Response) -> str:
    try:
        return str(answer.json()["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return answer.text[:200]


def status_lines(url: str, state: dict[str, Any], described: list[dict[str, Any]]) -> list[str]:
    """`state`: the /status answer; `described`: /models' list (sizes, counts, load times)."""
    models = state["models"]
    heading = (f"Swapper Gateway at {url}: {state['mode']}, {len(state['loaded_models'])} of "
               f"{state['total_models']} models loaded, "
               f"{sum(m['queue_depth'] for m in models.values())} queued")
    nodes = [[name, node["mode"], ", ".join(node["resident_models"]) or "-", _memory(node),
              "yes" if node["swapping"] else "no"] for name, node in state["nodes"].items()]
    rows = []
    for model in described:
        live = models[model["name"]]
        rows.append([model["name"], live["state"], live["node"], _serving(live),
                     str(live["queue_depth"]), str(live["in_flight"]),
                     str(model["request_count"]), _load_ms(model["last_load_seconds"]),
                     _size(model["size_gb"], live["measured_gb"]), _one_line(live["error"])])
    return [heading, "",
            *_columns(["NODE", "MODE", "RESIDENT", "MEMORY", "SWAPPING"], nodes), "",
            *_columns(["MODEL", "STATE", "NODE", "BACKEND", "QUEUE", "IN FLIGHT", "REQUESTS",
                       "LAST LOAD", "SIZE", "ERROR"], rows)]


def _gb(value: float) -> str:
    """GB as people read them: three significant digits (a measured figure has seven)."""
    return f"{value:.3g} GB"


def _memory(node: dict[str, Any]) -> str:
    used = _gb(node["resident_gb"])
    if node["memory_budget_gb"] is not None:
        used += f" of {_gb(node['memory_budget_gb'])}"
    if node["measured_gb"] is not None:
        used += f" (measured {_gb(node['measured_gb'])})"
    return used


def _serving(live: dict[str, Any]) -> str:
    serving = live["serving_backend"]
    return serving if serving == live["backend"] else f"{serving} (fallback)"


def _load_ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:,.0f} ms"


def _size(size_gb: float, measured_gb: float | None) -> str:
    size = _gb(size_gb) if size_gb else "-"
    return size if measured_gb is None else f"{_gb(measured_gb)} measured ({size})"


def _one_line(error: str | None, limit: int = 60) -> str:
    if not error:
        return ""
    line = error.strip().splitlines()[0] if error.strip() else ""
    return line if len(line) <= limit else line[:limit - 1] + "\u2026"


def _columns(headers: list[str], rows: list[list[str]]) -> list[str]:
    """Left-aligned columns two spaces apart; numbers line up on the right."""
    widths = [max(len(cell) for cell in column) for column in zip(headers, *rows, strict=True)]
    numeric = [bool(rows) and all(_numeric(row[i]) for row in rows) for i in range(len(headers))]

    def line(cells: list[str]) -> str:
        return "  ".join(cell.rjust(w) if right else cell.ljust(w)
                         for cell, w, right in zip(cells, widths, numeric, strict=True)).rstrip()

    return [line(headers), *(line(row) for row in rows)]


def _numeric(cell: str) -> bool:
    return cell.replace(",", "").replace(" ms", "").replace(".", "").isdigit() or cell == "-"


def check_config(args: argparse.Namespace) -> int:
    config = _load(args.file)
    print(f"{config.source}: OK — {len(config.models)} models, {len(config.backends)} backends, "
          f"mode {config.swapper.mode}")
    for model in config.models.values():
        aliases = f" (aliases: {', '.join(model.aliases)})" if model.aliases else ""
        print(f"  {model.name}{aliases} -> {model.backend}:{model.served_name}")
    if discovery_applies(config):
        print(f"  no models named: at start the gateway serves what the Ollama at "
              f"{ollama_url(config)} has pulled")
    for warning in config.warnings:
        print(f"  warning: {warning}")
    if args.strict and config.warnings:
        count = len(config.warnings)
        _err(f"{config.source}: refused with --strict: {count} warning{'s' * (count != 1)}")
        return 2
    return 0


# -- the parser ---------------------------------------------------------------------------------


def _log_format_option(command: argparse.ArgumentParser) -> None:
    command.add_argument("--log-format", choices=LOG_FORMATS, default="auto",
                         help="console (for people), json (one object per line), or auto: "
                              "console on a terminal, json otherwise (default)")


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="swapper-gateway", description=__doc__)
    root.add_argument("--version", action="version", version=f"swapper-gateway {__version__}")
    commands = root.add_subparsers(dest="command", required=True)
    run = commands.add_parser("serve", help="run the gateway")
    run.add_argument("--config", help="swapper_config.yaml (default: $SWAPPER_CONFIG_PATH, "
                                      "./swapper_config.yaml, or built-in defaults)")
    run.add_argument("--host", help="bind address (default from config: 0.0.0.0)")
    run.add_argument("--port", type=int, help="port (default from config: 8890)")
    run.add_argument("--workers", type=int, default=1,
                     help="worker processes (default 1; more need cache.redis_url)")
    _log_format_option(run)
    run.set_defaults(func=serve)
    check = commands.add_parser("check-config", help="validate a config file and exit")
    check.add_argument("file", nargs="?", help="config file (default as for serve)")
    check.add_argument("--strict", action="store_true",
                       help="fail on warnings too (unknown keys)")
    check.set_defaults(func=check_config)
    again = commands.add_parser("reload", help="make a running gateway re-read its config")
    again.add_argument("--url", default=f"http://127.0.0.1:{DEFAULT_PORT}",
                       help="the gateway (default http://127.0.0.1:8890)")
    again.add_argument("--key", default=os.environ.get("SWAPPER_ADMIN_KEY"),
                       help="an admin key (default $SWAPPER_ADMIN_KEY)")
    again.set_defaults(func=reload)
    show = commands.add_parser("status", help="print a running gateway's nodes and models")
    show.add_argument("--url", default=f"http://127.0.0.1:{DEFAULT_PORT}",
                      help="the gateway (default http://127.0.0.1:8890)")
    show.add_argument("--key", default=os.environ.get("SWAPPER_ADMIN_KEY"),
                      help="a key: it shows that key's models; an admin key shows all "
                           "(default $SWAPPER_ADMIN_KEY)")
    show.set_defaults(func=status)
    demo = commands.add_parser("demo", help="serve tiny llama.cpp models to see swaps happen")
    demo.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    demo.add_argument("--port", type=int, default=DEFAULT_PORT, help="port (default 8890)")
    demo.add_argument("--dir", default=str(DEMO_DIR),
                      help=f"where the models and config are written (default {DEMO_DIR})")
    _log_format_option(demo)
    demo.set_defaults(func=run_demo)
    return root


def run_demo(args: argparse.Namespace) -> int:
    """Tiny llama.cpp models behind the gateway, with the swaps shown as they happen."""
    demo = prepare_demo(args)
    if demo is None:
        return 1
    # Through the CLI's own parser, so that every option of `serve` has its default.
    serve_args = parser().parse_args(["serve", "--config", str(demo.config_file),
                                      "--log-format", args.log_format])
    return serve(serve_args, quiet_events=QUIET_EVENTS, after_banner=demo.instructions)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        code = int(args.func(args))
        sys.stdout.flush()
    except BrokenPipeError:  # `status | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so exit's flush is quiet
        return 1
    return code


if __name__ == "__main__":
    raise SystemExit(main())
