"""The Starlette application: routes, middlewares and the services' lifespan."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import structlog
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.types import ASGIApp

from gateway.access.auth import AuthMiddleware
from gateway.access.request_limits import HeaderLimit
from gateway.config.discovery import discover_ollama_models, discovery_applies, wait_for_ollama
from gateway.config.reader import load_config
from gateway.config.reload import Loader, file_loader
from gateway.config.schema import ConfigError, GatewayConfig
from gateway.fronts import anthropic, ollama
from gateway.fronts.admin import AdminApi
from gateway.fronts.anthropic import AnthropicApi
from gateway.fronts.errors import FrontErrors
from gateway.fronts.ollama import OllamaApi
from gateway.fronts.openai import OpenAIApi
from gateway.fronts.routing import Failures
from gateway.fronts.swapper import SwapperApi
from gateway.fronts.ui import Console, ui_routes
from gateway.logs import AccessLog, Observer, configure_logging
from gateway.progress import EVERY_S, log_loads, watch
from gateway.services import Services

log = structlog.get_logger("gateway")


def _reload_on_sighup(services: Services) -> None:
    """SIGHUP re-reads the config, as daemons do (only where signals can be handled here)."""

    async def reload() -> None:
        try:
            await services.reload()
        except ConfigError as exc:
            log.error("config.reload_refused", error=str(exc))

    with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
        asyncio.get_running_loop().add_signal_handler(
            signal.SIGHUP, lambda: services.spawn(reload()))


async def _discover_later(services: Services) -> None:
    """No models yet and an Ollama to ask: ask until it has some, then take them in (as a
    reload does). Runs as one of the services' tasks, so stopping the gateway cancels it."""
    await wait_for_ollama(services.config)
    try:
        await services.reload()
    except ConfigError as exc:
        log.error("discovery.apply_failed", error=str(exc))


def _observers(*observers: Observer) -> Observer:
    """The access log feeds several readers the same record."""
    def observe(state: dict[str, Any], record: dict[str, Any]) -> None:
        for each in observers:
            each(state, record)

    return observe


class _Gateway(Starlette):
    """Starlette with one layer answering exceptions (`fronts.routing.Failures`) in place of
    its three."""

    def build_middleware_stack(self) -> ASGIApp:
        app: ASGIApp = Failures(self.router)
        for cls, args, kwargs in reversed(self.user_middleware):
            app = cls(app, *args, **kwargs)
        return app


def create_app(config: GatewayConfig, services: Services | None = None,
               loader: Loader | None = None, progress_every_s: float = EVERY_S) -> Starlette:
    """`progress_every_s`: how often the progress task reads the scheduler's snapshot (the
    load-progress log line, the status page's timeline)."""
    if loader is None and discovery_applies(config):
        loader = lambda: discover_ollama_models(config)  # noqa: E731 (a reload re-asks Ollama)
    services = services or Services(config, loader)
    console = Console()

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await services.start()
        _reload_on_sighup(services)
        log.info("gateway.started", config=config.source, models=len(config.models))
        for key, warning in zip(config.unknown_keys, config.warnings, strict=False):
            log.warning("config.unknown_key", config=config.source, key=key, message=warning)
        if discovery_applies(services.config):
            services.spawn(_discover_later(services))
        services.spawn(watch(services.scheduler.status,
                             [log_loads, console.residencies.observe], progress_every_s))
        if config.auth.open:
            log.warning("auth.open", message="no API keys configured: every client is let in")
        try:
            yield
        finally:
            await services.stop()
            log.info("gateway.stopped")

    app = _Gateway(
        # Starlette tries the routes in order: the busiest first (no two fronts share a path)
        routes=[*OpenAIApi(services).routes(), *AnthropicApi(services).routes(),
                *OllamaApi(services).routes(), *SwapperApi(services).routes(),
                *AdminApi(services).routes(), *ui_routes(services, console)],
        middleware=[
            Middleware(AccessLog, observer=_observers(services.metrics.requests.observe,
                                                      console.requests.observe)),
            Middleware(FrontErrors, fronts=[(ollama.owns, ollama.error_body),
                                            (anthropic.owns, anthropic.error_body)]),
            Middleware(HeaderLimit, max_bytes=lambda: services.config.server.max_header_bytes),
            Middleware(AuthMiddleware, keyring=lambda: services.keys),
        ],
        lifespan=lifespan,
    )
    app.state.services = services
    return app


def app_from_env() -> Starlette:
    """The app of one worker among several (`serve --workers N`): its config file is named by
    $SWAPPER_CONFIG_PATH, as the parent process found it."""
    config = discover_ollama_models(load_config())
    configure_logging(config.server.log_level, os.environ.get("SWAPPER_LOG_FORMAT", "auto"))
    return create_app(config, loader=file_loader(config.source))
