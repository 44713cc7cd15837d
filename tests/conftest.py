"""Shared fixtures: the real app on a real socket, emulated backends, Redis."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
from starlette.applications import Starlette

from gateway.app import create_app
from gateway.config.reader import parse_config
from tests.redis_server import own_redis, redis_url
from tests.servers import ServerThread

__all__ = ["own_redis", "redis_url"]

StartServer = Callable[..., ServerThread]


@pytest.fixture
def start_server() -> Iterator[StartServer]:
    """Start any ASGI app on a free loopback port; all are stopped after the test."""
    started: list[ServerThread] = []

    def start(app: Any, **options: Any) -> ServerThread:
        server = ServerThread(app, **options).start()
        started.append(server)
        return server

    yield start
    for server in reversed(started):
        server.stop()


@pytest.fixture
def start_gateway(start_server: StartServer) -> Callable[[dict[str, Any]], ServerThread]:
    """Start the gateway from a config dict (as it would be read from YAML)."""

    def start(config: dict[str, Any], **options: Any) -> ServerThread:
        app: Starlette = create_app(parse_config(config, source="test-config", env={}))
        server = start_server(app, **options)
        server.app = app  # type: ignore[attr-defined]
        return server

    return start
