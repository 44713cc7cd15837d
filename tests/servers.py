"""Run ASGI apps on real loopback sockets for tests: each in its own thread and event loop."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import uvicorn


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerThread:
    """A uvicorn server on 127.0.0.1:<port>, started and stopped from synchronous test code."""

    def __init__(self, app: Any, port: int | None = None, **uvicorn_options: Any) -> None:
        self.port = port or free_port()
        options = {"log_level": "warning", "lifespan": "on", "timeout_graceful_shutdown": 5,
                   **uvicorn_options}
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, **options)
        self.server = uvicorn.Server(config)
        self.loop: asyncio.AbstractEventLoop | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _run(self) -> None:
        self.loop = asyncio.new_event_loop()
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_until_complete(self.server.serve())
        finally:
            self.loop.close()

    def start(self, timeout: float = 15.0) -> ServerThread:
        self._thread.start()
        started = threading.Event()

        def poll() -> None:
            while not self.server.started and self._thread.is_alive():
                threading.Event().wait(0.005)
            started.set()

        threading.Thread(target=poll, daemon=True).start()
        if not started.wait(timeout) or not self.server.started:
            raise RuntimeError(f"server on port {self.port} did not start")
        return self

    def call(self, coro: Any, timeout: float = 30.0) -> Any:
        """Run a coroutine on the server's own loop (to inspect or poke app state)."""
        assert self.loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self, timeout: float = 15.0) -> None:
        self.server.should_exit = True
        self._thread.join(timeout)


@contextmanager
def serve(app: Any, **options: Any) -> Iterator[ServerThread]:
    server = ServerThread(app, **options).start()
    try:
        yield server
    finally:
        server.stop()


def emulator(server: ServerThread) -> Any:
    """The state of an emulated backend served by `server` (its load counts, failure modes)."""
    return server.server.config.app.state.emulator


def wait_until(predicate: Any, timeout: float = 10.0, message: str = "condition") -> None:
    """Poll a condition (cheaply, bounded) until it holds; fail the test if it never does."""
    deadline = threading.Event()
    timer = threading.Timer(timeout, deadline.set)
    timer.start()
    try:
        while not predicate():
            if deadline.wait(0.005):
                raise AssertionError(f"timed out after {timeout} s waiting for {message}")
    finally:
        timer.cancel()


def reaped(pid: int) -> bool:
    """The process is gone entirely: not running and not a zombie waiting for its parent."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def stop_process(process: subprocess.Popen[Any], grace_s: float = 15.0) -> None:
    """SIGTERM, then SIGKILL if it has not exited within `grace_s`; always reaped."""
    process.terminate()
    try:
        process.wait(grace_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
