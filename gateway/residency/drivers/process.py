"""`process`: one OS process per model (llama.cpp `llama-server`, `vllm serve`, SGLang), started
from the backend's command template and ready once its health URL answers; stopped with SIGTERM to
its process group, SIGKILL after the grace. None outlives the gateway (`process_guard`).

Errors a client sees say what failed in one line ("model file not found: x.gguf", "the server
exited with code 1: <its first error line>"); the server's output is in the log and in the
error's `detail`."""

from __future__ import annotations

import asyncio
import contextlib
import enum
import os
import shlex
import signal
import socket
from collections import defaultdict, deque
from collections.abc import Callable, Collection, Mapping, Sequence

import aiohttp
import structlog

from gateway.config.schema import PLACEHOLDER, PROCESS_PLACEHOLDERS, BackendConfig, ModelConfig
from gateway.redaction import first_meaningful, mask_argv
from gateway.residency.drivers import gpu
from gateway.residency.drivers.base import DriverError, LostCallback, Measured
from gateway.residency.drivers.http import answers
from gateway.residency.drivers.process_guard import Registry, Watchdog, die_with_gateway

log = structlog.get_logger(__name__)

HOST = "127.0.0.1"
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
                 on_crash: Callable[[_ModelProcess], None],
                 on_reaped: Callable[[int], None]) -> None:
        self.model = model
        self.url = f"http://{HOST}:{port}"
        self.port = port
        self.state = _State.STARTING
        self._process = process
        self._on_crash = on_crash
        self._on_reaped = on_reaped
        self._output: deque[str] = deque(maxlen=_TAIL_LINES)
        self._reader = asyncio.create_task(self._read_output())
        self._watcher = asyncio.create_task(self._watch())

    @property
    def pid(self) -> int:
        return self._process.pid

    @property
    def serving(self) -> bool:
        return self.state is _State.READY and self._process.returncode is None

    def ended(self) -> str:
        """How the process ended, with the first line of its output that names an error."""
        code = self._process.returncode
        assert code is not None
        how = (f"was killed by signal {-code} ({signal.strsignal(-code)})" if code < 0
               else f"exited with code {code}")
        said = first_meaningful(self._output)
        return f"the server {how}" + (f": {said}" if said else "")

    def outcome(self) -> str:
        """How the process ended, with its last output lines (for logs and admins)."""
        return self.ended() + self.tail()

    def tail(self) -> str:
        return "; last output:\n" + "\n".join(self._output) if self._output else "; no output"

    def failure(self, message: str) -> DriverError:
        """The model is named by whoever reports the error; the output goes to `detail`."""
        return DriverError(message, detail=f"{self.model}: {message}{self.tail()}")

    async def wait_ready(self, health_url: str, limit_s: float) -> None:
        """Poll `health_url` until it answers (503 while loading is normal), the process exits
        or `limit_s` passes; the last two raise DriverError and leave the rest to the caller."""
        delay = _POLL_FIRST
        try:
            async with asyncio.timeout(limit_s), aiohttp.ClientSession() as session:
                while not await answers(session, health_url, limit_s=_PROBE_TIMEOUT):
                    await asyncio.wait({self._watcher}, timeout=delay)
                    if self._watcher.done():
                        raise self.failure(self.ended())
                    delay = min(delay * 2, _POLL_MAX)
        except TimeoutError:
            raise self.failure(f"the server was not ready within {limit_s:g}s") from None
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
        self._on_reaped(self.pid)
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
    sleeps = False

    def __init__(self, backend: BackendConfig, models: Sequence[ModelConfig],
                 registry: Registry | None = None) -> None:
        self.backend = backend
        self.models = list(models)  # processes are started on demand, one per model
        self._argv = parse_template(backend.cmd or "")
        self._uses_path = any("{path}" in arg for arg in self._argv)
        self._processes: dict[str, _ModelProcess] = {}
        self._locks: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)
        self._on_lost: LostCallback | None = None
        self._registry = registry or Registry()
        self._watchdog: Watchdog | None = None

    async def start(self, on_lost: LostCallback) -> None:
        """Stop what an earlier gateway left running before anything is loaded here."""
        self._on_lost = on_lost
        for record in await self._registry.sweep(self.backend.stop_grace):
            log.warning("process.leftover_stopped", pid=record.pid, model=record.model,
                        backend=record.backend)

    async def load(self, model: ModelConfig) -> None:
        async with self._locks[model.name]:
            current = self._processes.get(model.name)
            if current is not None and current.serving:
                return
            if current is not None:  # it exited a moment ago and its watcher is still draining
                await self._discard(current)
            try:
                process = await self._spawn(model)
            except DriverError as exc:  # it never ran: the details are ours to log
                log.warning("process.failed", model=model.name, detail=exc.detail)
                raise
            self._processes[model.name] = process
            try:
                await process.wait_ready(process.url + self.backend.health_path,
                                         self.backend.start_timeout)
            except BaseException as exc:  # failed, timed out or cancelled: nothing may stay
                await self._discard(process)
                if isinstance(exc, DriverError):
                    log.warning("process.failed", model=model.name, detail=exc.detail)
                raise
            log.info("process.ready", model=model.name, pid=process.pid, url=process.url)

    async def unload(self, model: ModelConfig) -> None:
        async with self._locks[model.name]:
            process = self._processes.get(model.name)
            if process is not None:
                await self._discard(process)

    async def unload_fully(self, model: ModelConfig) -> None:
        await self.unload(model)

    async def resident(self) -> set[str] | None:
        return {name for name, process in self._processes.items() if process.serving}

    def url_for(self, model: ModelConfig) -> str:
        process = self._processes.get(model.name)
        if process is None or not process.serving:
            raise DriverError(f"{model.name}: no process is serving it")
        return process.url

    def server_of(self, model: ModelConfig) -> tuple[int, int] | None:
        process = self._processes.get(model.name)
        return (process.pid, process.port) if process is not None else None

    def after_request(self, model: ModelConfig) -> None:
        pass  # a server process keeps its model for as long as it runs

    async def health(self) -> bool:
        return True  # no shared server: each model's process is its own health

    async def measure(self) -> dict[str, Measured]:
        """Each serving model's process group: its GPU memory (nvidia-smi), else its RSS."""
        serving = [(name, p.pid) for name, p in self._processes.items() if p.serving]
        if not serving:
            return {}
        used = await gpu.gpu_used_mib()
        found = {}
        for name, pid in serving:
            if (held := gpu.footprint(pid, used)) is not None:
                found[name] = Measured(held.gb, held.source)
        return found

    async def free_gb(self) -> float | None:
        return await gpu.free_gb()  # the servers run on this host: its GPUs are the node's

    async def close(self) -> None:
        processes = list(self._processes.values())
        self._processes.clear()
        await asyncio.gather(*(p.stop(self.backend.stop_grace) for p in processes))
        if self._watchdog is not None:
            self._watchdog.close()
            self._watchdog = None

    async def _spawn(self, model: ModelConfig) -> _ModelProcess:
        self._check_model_file(model)
        port = _free_port(taken={p.port for p in self._processes.values()})
        values = {"path": model.path or model.served_name, "port": str(port), "name": model.name,
                  "served_name": model.served_name, "host": HOST}
        argv = _fill(self._argv, values)
        if self._watchdog is None:
            self._watchdog = Watchdog(self.backend.stop_grace)
            self._watchdog.start()
        try:
            # Forked from the event loop's thread, which outlives every server (close() stops
            # them before the loop ends): the death signal fires only when the gateway dies.
            process = await asyncio.create_subprocess_exec(
                *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT, env={**os.environ, **self.backend.env},
                start_new_session=True,  # its own process group, so stop reaches its workers
                preexec_fn=die_with_gateway(),
            )
        except OSError as exc:
            raise DriverError(f"{model.name}: cannot start {os.path.basename(argv[0])!r}: "
                              f"{exc.strerror or exc}", detail=f"{argv[0]}: {exc}",
                              retryable=False) from exc
        shown = mask_argv(argv)
        log.info("process.start", model=model.name, pid=process.pid, port=port, argv=shown)
        self._registry.record(process.pid, self.backend.name, model.name, shown)
        self._watchdog.watch(process.pid)
        return _ModelProcess(model.name, port, process, self._crashed, self._reaped)

    def _check_model_file(self, model: ModelConfig) -> None:
        """A `{path}` that names a local file which is not there fails at once, and for good:
        the server would only say so among many lines of output."""
        path = model.path
        if not self._uses_path or not path or not _looks_local(path) or os.path.exists(
                os.path.expanduser(path)):
            return
        raise DriverError(f"model file not found: {os.path.basename(path)}",
                          detail=f"{model.name}: {path} does not exist", retryable=False)

    def _reaped(self, pid: int) -> None:
        self._registry.forget(pid)
        if self._watchdog is not None:
            self._watchdog.release(pid)

    async def _discard(self, process: _ModelProcess) -> None:
        self._forget(process)
        await process.stop(self.backend.stop_grace)

    def _crashed(self, process: _ModelProcess) -> None:
        self._forget(process)
        log.warning("process.crashed", model=process.model, detail=process.outcome())
        if self._on_lost is not None:
            self._on_lost(process.model, process.ended())

    def _forget(self, process: _ModelProcess) -> None:
        if self._processes.get(process.model) is process:
            del self._processes[process.model]


def parse_template(cmd: str) -> list[str]:
    """The command template as argv, or DriverError (not retryable) naming what is wrong.

    Split before filling in, so that a path with spaces stays one argument. The config reader
    may call this to refuse a bad template before anything starts.
    """
    try:
        argv = shlex.split(cmd)
    except ValueError as exc:
        raise DriverError(f"cmd {cmd!r}: {exc}", retryable=False) from None
    if not argv:
        raise DriverError("cmd is empty", retryable=False)
    named = {name for arg in argv for name in PLACEHOLDER.findall(arg)}
    unknown = sorted(named - set(PROCESS_PLACEHOLDERS))
    if unknown:
        known = ", ".join(f"{{{name}}}" for name in PROCESS_PLACEHOLDERS)
        raise DriverError(f"cmd {cmd!r}: unknown placeholder {{{unknown[0]}}} (known: {known})",
                          retryable=False)
    return argv


def _looks_local(path: str) -> bool:
    """A file path rather than a name the server resolves itself (a Hugging Face repo id)."""
    return path.startswith(("/", "./", "../", "~")) or path.endswith((".gguf", ".bin"))


def _fill(argv: list[str], values: Mapping[str, str]) -> list[str]:
    return [PLACEHOLDER.sub(lambda match: values[match[1]], arg) for arg in argv]


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
