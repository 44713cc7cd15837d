"""The process driver against real child processes: tests/fixtures/tiny_server.py for the ways a
server misbehaves, the OpenAI emulator for the everyday case."""

from __future__ import annotations

import asyncio
import shlex
import socket
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import structlog
from structlog.testing import LogCapture

from gateway.config.schema import BackendConfig, ModelConfig
from gateway.residency.drivers import process
from gateway.residency.drivers.base import DriverError
from gateway.residency.drivers.process import ProcessDriver
from tests.servers import reaped

ROOT = Path(__file__).resolve().parents[1]
TINY = Path(__file__).parent / "fixtures" / "tiny_server.py"
M1 = ModelConfig(name="m1", backend="local", served_name="tiny-1")
M2 = ModelConfig(name="m2", backend="local", served_name="tiny-2")

Lost = asyncio.Queue[tuple[str, str]]


def tiny_backend(*flags: str, start_timeout: float = 10.0, stop_grace: float = 2.0,
                 model_arg: str = "{served_name}") -> BackendConfig:
    argv = [sys.executable, str(TINY), "--port", "{port}", "--model", model_arg, *flags]
    return BackendConfig(
        name="local", kind="process", cmd=shlex.join(argv), start_timeout=start_timeout,
        stop_grace=stop_grace, env={"PYTHONUNBUFFERED": "1", "TINY_OWNER": "backend-env"},
    )


@asynccontextmanager
async def running(backend: BackendConfig) -> AsyncIterator[tuple[ProcessDriver, Lost]]:
    lost: Lost = asyncio.Queue()
    driver = ProcessDriver(backend, [M1, M2])
    await driver.start(lambda name, reason: lost.put_nowait((name, reason)))
    try:
        yield driver, lost
    finally:
        await driver.close()


async def models_at(url: str) -> dict[str, Any]:
    async with aiohttp.ClientSession() as session, session.get(f"{url}/v1/models") as response:
        assert response.status == 200
        return await response.json()


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


def port_closed(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) != 0


def dead(pid: int) -> bool:
    """Not running; an orphan may stay a zombie until init gets round to reaping it."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] == "Z"


async def eventually(condition: Callable[[], bool], limit_s: float = 5.0) -> None:
    deadline = time.monotonic() + limit_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


def events(logs: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [entry for entry in logs if entry["event"] == name]


def started_pids(logs: list[dict[str, Any]]) -> list[int]:
    return [entry["pid"] for entry in events(logs, "process.start")]


@pytest.fixture
def logs(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """The driver's log events at every level (the suite's logging config filters below warning)."""
    capture = LogCapture()
    logger = structlog.wrap_logger(None, wrapper_class=structlog.BoundLogger, processors=[capture])
    monkeypatch.setattr(process, "log", logger)
    return capture.entries


async def test_load_waits_for_health_then_serves() -> None:
    async with running(tiny_backend("--startup-delay", "0.3")) as (driver, _):
        started = time.monotonic()
        await driver.load(M1)
        assert time.monotonic() - started >= 0.3  # the 503s while loading were waited out
        answer = await models_at(driver.url_for(M1))
        assert answer["data"][0] == {"id": "tiny-1", "object": "model", "owned_by": "backend-env"}
        assert await driver.resident() == {"m1"}
        assert await driver.health()


async def test_load_twice_runs_one_process(logs: list[dict[str, Any]]) -> None:
    async with running(tiny_backend()) as (driver, _):
        await asyncio.gather(driver.load(M1), driver.load(M1))
        await driver.load(M1)
        assert len(started_pids(logs)) == 1
        assert (await models_at(driver.url_for(M1)))["pids"]["server"] == started_pids(logs)[0]


async def test_models_get_their_own_processes_and_ports() -> None:
    async with running(tiny_backend()) as (driver, _):
        await asyncio.gather(driver.load(M1), driver.load(M2))
        assert driver.url_for(M1) != driver.url_for(M2)
        assert (await models_at(driver.url_for(M2)))["data"][0]["id"] == "tiny-2"
        assert await driver.resident() == {"m1", "m2"}


async def test_path_is_one_argument_even_with_spaces() -> None:
    model = ModelConfig(name="m1", backend="local", served_name="s", path="/models/my model.gguf")
    async with running(tiny_backend(model_arg="{path}")) as (driver, _):
        await driver.load(model)
        assert (await models_at(driver.url_for(model)))["data"][0]["id"] == "/models/my model.gguf"


async def test_output_lines_become_log_events(logs: list[dict[str, Any]]) -> None:
    async with running(tiny_backend()) as (driver, _):
        await driver.load(M1)
        port = port_of(driver.url_for(M1))
        line = f"tiny server tiny-1 listening on port {port}"
        await eventually(lambda: {"event": "process.output", "model": "m1", "line": line,
                                  "log_level": "info"} in logs)


async def test_unload_stops_and_reaps_the_process() -> None:
    async with running(tiny_backend()) as (driver, _):
        await driver.load(M1)
        url = driver.url_for(M1)
        pid = (await models_at(url))["pids"]["server"]
        await driver.unload(M1)
        assert reaped(pid)
        assert port_closed(port_of(url))
        assert await driver.resident() == set()
        with pytest.raises(DriverError, match="m1"):
            driver.url_for(M1)
        await driver.unload(M1)  # unloading what is not loaded is a no-op


async def test_child_ignoring_sigterm_is_killed_after_the_grace(logs: list[dict[str, Any]]) -> None:
    async with running(tiny_backend("--ignore-term", stop_grace=0.3)) as (driver, _):
        await driver.load(M1)
        pid = (await models_at(driver.url_for(M1)))["pids"]["server"]
        started = time.monotonic()
        await driver.unload(M1)
        assert time.monotonic() - started >= 0.3
        assert reaped(pid)
        assert [entry["pid"] for entry in events(logs, "process.kill")] == [pid]


async def test_workers_in_the_process_group_are_stopped_too() -> None:
    async with running(tiny_backend("--spawn-child")) as (driver, _):
        await driver.load(M1)
        worker = (await models_at(driver.url_for(M1)))["pids"]["child"]
        await driver.unload(M1)
        await eventually(lambda: dead(worker))


async def test_exit_during_start_reports_code_and_output() -> None:
    async with running(tiny_backend("--fail", "CUDA error: out of memory")) as (driver, _):
        with pytest.raises(DriverError, match="exited with code 3") as caught:
            await driver.load(M1)
        assert "CUDA error: out of memory" in str(caught.value)
        assert await driver.resident() == set()


async def test_missing_executable_is_a_driver_error() -> None:
    backend = BackendConfig(name="local", kind="process", cmd="/nonexistent/llama-server {port}")
    async with running(backend) as (driver, _):
        with pytest.raises(DriverError, match="cannot start '/nonexistent/llama-server'"):
            await driver.load(M1)


async def test_never_healthy_times_out_and_is_killed(logs: list[dict[str, Any]]) -> None:
    backend = tiny_backend("--startup-delay", "3600", start_timeout=0.5)
    async with running(backend) as (driver, _):
        with pytest.raises(DriverError, match=r"within 0\.5s") as caught:
            await driver.load(M1)
        assert "listening on port" in str(caught.value)
        [pid] = started_pids(logs)
        assert reaped(pid)
        assert await driver.resident() == set()


async def test_cancelled_load_leaves_no_process(logs: list[dict[str, Any]]) -> None:
    async with running(tiny_backend("--startup-delay", "3600")) as (driver, _):
        loading = asyncio.create_task(driver.load(M1))
        await eventually(lambda: bool(started_pids(logs)))
        loading.cancel()
        with pytest.raises(asyncio.CancelledError):
            await loading
        assert reaped(started_pids(logs)[0])
        assert await driver.resident() == set()


async def test_crash_while_loaded_is_reported_as_lost() -> None:
    async with running(tiny_backend("--crash-after", "1")) as (driver, lost):
        await driver.load(M1)
        name, reason = await asyncio.wait_for(lost.get(), 5)
        assert name == "m1"
        assert "exited with code 7" in reason
        assert "simulated crash" in reason
        assert await driver.resident() == set()
        with pytest.raises(DriverError):
            driver.url_for(M1)


async def test_close_stops_everything_and_leaves_no_tasks() -> None:
    async with running(tiny_backend("--spawn-child")) as (driver, lost):
        await asyncio.gather(driver.load(M1), driver.load(M2))
        pids = [(await models_at(driver.url_for(m)))["pids"] for m in (M1, M2)]
        await driver.close()
        assert all(reaped(p["server"]) for p in pids)
        await eventually(lambda: all(dead(p["child"]) for p in pids))
        assert await driver.resident() == set()
        assert asyncio.all_tasks() == {asyncio.current_task()}
        assert lost.empty()  # stopping on purpose is not a loss


def test_unknown_placeholder_is_rejected_up_front() -> None:
    backend = BackendConfig(name="local", kind="process", cmd="llama-server --port {prot}")
    with pytest.raises(DriverError, match=r"unknown placeholder \{prot\}"):
        ProcessDriver(backend, [M1])


async def test_openai_emulator_as_a_model_server(logs: list[dict[str, Any]]) -> None:
    argv = [sys.executable, "-m", "tests.emulators.openai_server", "--port", "{port}",
            "--model", "{served_name}", "--startup-delay", "0.2"]
    backend = BackendConfig(name="local", kind="process", cmd=shlex.join(argv),
                            start_timeout=15, stop_grace=5, env={"PYTHONPATH": str(ROOT)})
    async with running(backend) as (driver, lost):
        await driver.load(M1)
        url = driver.url_for(M1)
        assert [m["id"] for m in (await models_at(url))["data"]] == ["tiny-1"]
        await driver.unload(M1)
        assert port_closed(port_of(url))
        assert not events(logs, "process.kill")
        assert lost.empty()
