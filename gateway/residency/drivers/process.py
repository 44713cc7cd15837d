"""`process`: one OS process per model (llama.cpp `llama-server`, `vllm serve`, SGLang), started
from the backend's command template and ready once its health URL answers; stopped with SIGTERM to
its process group, SIGKILL after the grace."""

from __future__ import annotations

import asyncio
import contextlib
import enum
import os
import re
import shlex
import signal
import socket
from collections import defaultdict, deque
from collections.abc import Callable, Collection, Mapping, Sequence

import aiohttp
import structlog

from gateway.config.schema import BackendConfig, ModelConfig
from gateway.residency.drivers.base import DriverError, LostCallback
from gateway.residency.drivers.http import answers

log = structlog.get_logger(__name__)

HOST = "127.0.0.1"
_PLACEHOLDER = re.compile(r"\{(\w+)\}")
_FIELDS = ("path", "port", "name", "served_name", "host")
_TAIL_LINES = 50  # output lines kept for error messages
_MAX_LINE = 1000  # characters of one output line kept and logged
_POLL_FIRST, _POLL_MAX = 0.005, 0.5  # seconds between health probes: quick at first, then relaxed
_PROBE_TIMEOUT = 5.0  # one health probe; a server busy loading may hold the connection
_DRAIN_TIMEOUT = 1.0  # reading what a dead process left in its pipe before reporting


class _State(enum.Enum):
    STARTING = "starting"
    READY = "ready"
    STOPPING = "stopping"


class _ModelProcess:
    """One model's server process: captures its output, waits for it to be ready, stops it.

    A watcher task reaps the process whatever ends it; `on_crash` hears of exits while READY.
    """

    def __init__(self, model: str, port: int, process: asyncio.subprocess.Process,
                 on_crash: Callable[[_ModelProcess], None]) -> None:
        self.model = model
        self.url = f"http://{HOST}:{port}"
        self.port = port
        self.state = _State.STARTING
        self._process = process
        self._on_crash = on_crash
        self._output: deque[str] = deque(maxlen=_TAIL_LINES)
        self._reader = asyncio.create_task(self._read_output())
        self._watcher = asyncio.create_task(self._watch())

    @property
    def pid(self) -> int:
        return self._process.pid

    @property
    def serving(self) -> bool:
        return self.state is _State.READY and self._process.returncode is None

    def outcome(self) -> str:
        """How the process ended, with its last output lines."""
        code = self._process.returncode
        assert code is not None
        ended = (f"was killed by signal {-code} ({signal.strsignal(-code)})" if code < 0
                 else f"exited with code {code}")
        return f"process {ended}{self.tail()}"

    def tail(self) -> str:
        return "; last output:\n" + "\n".join(self._output) if self._output else "; no output"

    async def wait_ready(self, health_url: str, limit_s: float) -> None:
        """Poll `health_url` until it answers (503 while loading is normal), the process exits
        or `limit_s` passes; the last two raise DriverError and leave the rest to the caller."""
        delay = _POLL_FIRST
        try:
            async with asyncio.timeout(limit_s), aiohttp.ClientSession() as session:
                while not await answers(session, health_url, limit_s=_PROBE_TIMEOUT):
                    await asyncio.wait({self._watcher}, timeout=delay)
                    if self._watcher.done():
                        raise DriverError(f"{self.model}: {self.outcome()}")
                    delay = min(delay * 2, _POLL_MAX)
        except TimeoutError:
            raise DriverError(
                f"{self.model}: {health_url} did not answer within {limit_s:g}s{self.tail()}"
            ) from None
        self.state = _State.READY

    async def stop(self, grace: float) -> None:
        """SIGTERM to the process group, SIGKILL after `grace`; returns once it is reaped."""
        self.state = _State.STOPPING
        if self._process.returncode is None:
            _signal_group(self.pid, signal.SIGTERM)
            _, pending = await asyncio.wait({self._watcher}, timeout=grace)
            if pending:
                log.warning("process.kill", model=self.model, pid=self.pid, grace_s=grace)
                _signal_group(self.pid, signal.SIGKILL)
        await asyncio.wait({self._watcher})

    async def _read_output(self) -> None:
        stream = self._process.stdout
        assert stream is not None
        while (line := await _next_line(stream)) is not None:
            if line:
                self._output.append(line)
                log.info("process.output", model=self.model, line=line)

    async def _watch(self) -> None:
        code = await self._process.wait()
        # Workers the server forked would outlive it, holding memory and our output pipe.
        _signal_group(self.pid, signal.SIGKILL)
        await asyncio.wait({self._reader}, timeout=_DRAIN_TIMEOUT)
        self._reader.cancel()
        await asyncio.wait({self._reader})
        crashed = self.state is _State.READY
        report = log.warning if crashed else log.info
        report("process.exit", model=self.model, pid=self.pid, code=code, expected=not crashed)
        if crashed:
            self._on_crash(self)


class ProcessDriver:
    """Starts one server per model from `backend.cmd`, each on its own free loopback port."""

    manages_residency = True

    def __init__(self, backend: BackendConfig, models: Sequence[ModelConfig]) -> None:
        self.backend = backend
        self.models = list(models)  # processes are started on demand, one per model
        self._argv = _parse_template(backend.cmd or "")
        self._processes: dict[str, _ModelProcess] = {}
        self._locks: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)
        self._on_lost: LostCallback | None = None

    async def start(self, on_lost: LostCallback) -> None:
        self._on_lost = on_lost

    async def load(self, model: ModelConfig) -> None:
        async with self._locks[model.name]:
            current = self._processes.get(model.name)
            if current is not None and current.serving:
                return
            if current is not None:  # it exited a moment ago and its watcher is still draining
                await self._discard(current)
            process = await self._spawn(model)
            self._processes[model.name] = process
            try:
                await process.wait_ready(process.url + self.backend.health_path,
                                         self.backend.start_timeout)
            except BaseException:  # failed, timed out or cancelled: nothing may stay behind
                await self._discard(process)
                raise
            log.info("process.ready", model=model.name, pid=process.pid, url=process.url)

    async def unload(self, model: ModelConfig) -> None:
        async with self._locks[model.name]:
            process = self._processes.get(model.name)
            if process is not None:
                await self._discard(process)

    async def resident(self) -> set[str] | None:
        return {name for name, process in self._processes.items() if process.serving}

    def url_for(self, model: ModelConfig) -> str:
        process = self._processes.get(model.name)
        if process is None or not process.serving:
            raise DriverError(f"{model.name}: no process is serving it")
        return process.url

    async def health(self) -> bool:
        return True  # no shared server: each model's process is its own health

    async def close(self) -> None:
        processes = list(self._processes.values())
        self._processes.clear()
        await asyncio.gather(*(p.stop(self.backend.stop_grace) for p in processes))

    async def _spawn(self, model: ModelConfig) -> _ModelProcess:
        port = _free_port(taken={p.port for p in self._processes.values()})
        values = {"path": model.path or model.served_name, "port": str(port), "name": model.name,
                  "served_name": model.served_name, "host": HOST}
        argv = _fill(self._argv, values)
        try:
            process = await asyncio.create_subprocess_exec(
                *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT, env={**os.environ, **self.backend.env},
                start_new_session=True,  # its own process group, so stop reaches its workers
            )
        except OSError as exc:
            raise DriverError(f"{model.name}: cannot start {argv[0]!r}: {exc}") from exc
        log.info("process.start", model=model.name, pid=process.pid, port=port, argv=argv)
        return _ModelProcess(model.name, port, process, self._crashed)

    async def _discard(self, process: _ModelProcess) -> None:
        self._forget(process)
        await process.stop(self.backend.stop_grace)

    def _crashed(self, process: _ModelProcess) -> None:
        self._forget(process)
        if self._on_lost is not None:
            self._on_lost(process.model, process.outcome())

    def _forget(self, process: _ModelProcess) -> None:
        if self._processes.get(process.model) is process:
            del self._processes[process.model]


def _parse_template(cmd: str) -> list[str]:
    """Split before filling in, so that a path with spaces stays one argument."""
    try:
        argv = shlex.split(cmd)
    except ValueError as exc:
        raise DriverError(f"cmd {cmd!r}: {exc}") from None
    if not argv:
        raise DriverError("cmd is empty")
    unknown = sorted({name for arg in argv for name in _PLACEHOLDER.findall(arg)} - set(_FIELDS))
    if unknown:
        known = ", ".join(f"{{{name}}}" for name in _FIELDS)
        raise DriverError(f"cmd {cmd!r}: unknown placeholder {{{unknown[0]}}} (known: {known})")
    return argv


def _fill(argv: list[str], values: Mapping[str, str]) -> list[str]:
    return [_PLACEHOLDER.sub(lambda match: values[match[1]], arg) for arg in argv]


def _free_port(taken: Collection[int]) -> int:
    """A port nothing listens on; `taken` holds ports our starting servers have not bound yet."""
    while True:
        with socket.socket() as sock:
            sock.bind((HOST, 0))
            port: int = sock.getsockname()[1]
        if port not in taken:
            return port


async def _next_line(stream: asyncio.StreamReader) -> str | None:
    """The next output line, cut to _MAX_LINE characters; None at end of output."""
    try:
        raw = await stream.readline()
    except ValueError:  # longer than the stream's buffer; asyncio has discarded it
        return "[output line too long, dropped]"
    return raw.decode(errors="replace").rstrip()[:_MAX_LINE] if raw else None


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, sig)
