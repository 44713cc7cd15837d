"""Redis for tests: the local one on 6379 when it answers, else a private `redis-server`.

`redis_url` (session) is for tests that only need a Redis; `own_redis` (per test) always owns its
server, so a test can stop, pause or restart it to play a Redis outage.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator

import pytest
import redis

from tests.servers import free_port, stop_process

_SHARED_PORT = 6379
_SHARED_DB = 15  # a db of its own, so flushing it spares whatever else uses the local Redis
_START_TIMEOUT_S = 10.0


def _answers(port: int, db: int = 0) -> bool:
    client = redis.Redis(host="127.0.0.1", port=port, db=db, socket_timeout=0.5)
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False
    finally:
        client.close()


class RedisServer:
    """A private `redis-server` on a fixed port: start, stop, pause (SIGSTOP) and resume."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.skip("redis-server is not installed")
        command = [binary, "--port", str(self.port), "--bind", "127.0.0.1"]
        command += ["--save", "", "--appendonly", "no"]
        self._process = subprocess.Popen(
            command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + _START_TIMEOUT_S
        while not _answers(self.port):
            if self._process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"redis-server on port {self.port} did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        os.kill(process.pid, signal.SIGCONT)  # a paused server cannot act on SIGTERM
        stop_process(process, grace_s=5)

    def pause(self) -> None:
        """Freeze the server: connections stay open but nothing answers (a hung Redis)."""
        assert self._process is not None
        os.kill(self._process.pid, signal.SIGSTOP)

    def resume(self) -> None:
        assert self._process is not None
        os.kill(self._process.pid, signal.SIGCONT)


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    if _answers(_SHARED_PORT, _SHARED_DB):
        client = redis.Redis(host="127.0.0.1", port=_SHARED_PORT, db=_SHARED_DB)
        client.flushdb()
        client.close()
        yield f"redis://127.0.0.1:{_SHARED_PORT}/{_SHARED_DB}"
        return
    server = RedisServer().start()
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    server = RedisServer().start()
    try:
        yield server
    finally:
        server.stop()
