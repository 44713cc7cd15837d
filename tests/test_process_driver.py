"""The process driver against real child processes: tests/fixtures/tiny_server.py for the ways a
server misbehaves, the OpenAI emulator for the everyday case."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import select
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import pytest
import structlog
from structlog.testing import LogCapture

from gateway.config.schema import BackendConfig, ModelConfig
from gateway.residency.drivers import process, process_guard
from gateway.residency.drivers.base import DriverError
from gateway.residency.drivers.process import ProcessDriver
from tests.servers import reaped, stop_process, wait_until

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


@pytest.fixture(autouse=True)
def state_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Each test's own state directory (inherited by the processes it starts)."""
    directory = tmp_path / "state"
    monkeypatch.setenv("SWAPPER_STATE_DIR", str(directory))
    return directory


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


async def test_path_is_one_argument_even_with_spaces(tmp_path: Path) -> None:
    weights = tmp_path / "my model.gguf"
    weights.write_bytes(b"GGUF")
    model = ModelConfig(name="m1", backend="local", served_name="s", path=str(weights))
    async with running(tiny_backend(model_arg="{path}")) as (driver, _):
        await driver.load(model)
        assert (await models_at(driver.url_for(model)))["data"][0]["id"] == str(weights)


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


async def test_exit_during_start_reports_code_and_its_error_line() -> None:
    async with running(tiny_backend("--fail", "CUDA error: out of memory")) as (driver, _):
        with pytest.raises(DriverError, match="exited with code 3") as caught:
            await driver.load(M1)
        assert str(caught.value) == "the server exited with code 3: CUDA error: out of memory"
        assert caught.value.retryable
        assert "last output:\nCUDA error: out of memory" in caught.value.detail
        assert await driver.resident() == set()


async def test_missing_executable_is_a_driver_error_not_worth_retrying() -> None:
    backend = BackendConfig(name="local", kind="process", cmd="/nonexistent/llama-server {port}")
    async with running(backend) as (driver, _):
        with pytest.raises(DriverError, match="cannot start 'llama-server'") as caught:
            await driver.load(M1)
        assert not caught.value.retryable
        assert "/nonexistent" not in str(caught.value)  # the server's paths stay in the detail
        assert "/nonexistent/llama-server" in caught.value.detail


async def test_never_healthy_times_out_and_is_killed(logs: list[dict[str, Any]]) -> None:
    backend = tiny_backend("--startup-delay", "3600", start_timeout=0.5)
    async with running(backend) as (driver, _):
        with pytest.raises(DriverError, match=r"not ready within 0\.5s") as caught:
            await driver.load(M1)
        assert "listening on port" not in str(caught.value)
        assert "listening on port" in caught.value.detail
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
        assert reason == "the server exited with code 7: tiny server: simulated crash"
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
    with pytest.raises(DriverError, match=r"unknown placeholder \{prot\}") as caught:
        ProcessDriver(backend, [M1])
    assert not caught.value.retryable


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


# -- servers never outlive the gateway --------------------------------------------------------

HOST = Path(__file__).parent / "fixtures" / "driver_host.py"
GONE_WITHIN_S = 5.0


def host_gateway(cmd: str, *models: str) -> tuple[subprocess.Popen[bytes], dict[str, Any]]:
    """A stand-in gateway process that has loaded `models`; what it started."""
    process = subprocess.Popen([sys.executable, str(HOST), cmd, *models], cwd=ROOT,
                               stdout=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert process.stdout is not None
    ready, _, _ = select.select([process.stdout], [], [], 30)
    line = process.stdout.readline() if ready else b""
    if not line:
        stop_process(process)
        raise AssertionError("the driver host did not load its models")
    return process, json.loads(line)


def kill(process: subprocess.Popen[bytes]) -> None:
    process.kill()
    process.wait()


def pids_at(url: str) -> dict[str, int]:
    return httpx.get(f"{url}/v1/models", timeout=5).json()["pids"]


def test_servers_and_their_workers_die_with_a_killed_gateway() -> None:
    cmd = tiny_backend("--spawn-child").cmd
    assert cmd is not None
    gateway, started = host_gateway(cmd, "m1", "m2")
    pids = [pid for url in started["urls"].values() for pid in pids_at(url).values()]
    assert len(pids) == 4 and not any(dead(pid) for pid in pids)

    kill(gateway)  # SIGKILL: no shutdown code runs

    wait_until(lambda: all(dead(pid) for pid in pids), timeout=GONE_WITHIN_S,
               message="servers and workers gone")
    assert all(port_closed(port_of(url)) for url in started["urls"].values())


def test_a_server_the_gateway_did_not_stop_is_stopped_by_the_next_start(state_dir: Path) -> None:
    """A wrapper script's server gets no death signal; with the watchdog gone too (the OOM
    killer, say), it survives the gateway, and the next gateway's start stops it."""
    server = f'{shlex.join([sys.executable, str(TINY)])} --port "$1" --model "$2"'
    cmd = shlex.join(["sh", "-c", f"{server} & wait", "sh", "{port}", "{served_name}"])
    gateway, started = host_gateway(cmd, "m1")
    [url] = started["urls"].values()
    orphan = pids_at(url)["server"]
    kill_pid(started["watchdog"])
    kill(gateway)
    wait_until(lambda: dead(started["servers"]["m1"]), message="the wrapper gone")
    assert not dead(orphan)  # without the next start's sweep it would hold its memory for good
    assert len(list((state_dir / "processes").glob("*.json"))) == 1

    asyncio.run(start_and_load(tiny_backend(), M1))

    assert dead(orphan) and port_closed(port_of(url))
    assert list((state_dir / "processes").glob("*.json")) == []


async def start_and_load(backend: BackendConfig, model: ModelConfig) -> None:
    async with running(backend) as (driver, _):
        await driver.load(model)
        assert (await models_at(driver.url_for(model)))["data"][0]["id"] == model.served_name


def kill_pid(pid: int) -> None:
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: dead(pid), message=f"pid {pid} gone")


async def test_a_live_gateway_keeps_its_servers_when_another_starts() -> None:
    async with running(tiny_backend()) as (first, _):
        await first.load(M1)
        pid = (await models_at(first.url_for(M1)))["pids"]["server"]
        async with running(tiny_backend()) as (second, _):
            await second.load(M2)
            assert (await models_at(first.url_for(M1)))["pids"]["server"] == pid


def test_a_reused_pid_is_never_killed(state_dir: Path) -> None:
    """A record of a dead gateway whose pid now belongs to another process (another start
    time) is dropped, and that process left alone."""
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"],
                                 start_new_session=True)
    try:
        ticks = process_guard.start_ticks(bystander.pid)
        assert ticks is not None
        state = state_dir / "processes"
        state.mkdir(parents=True)
        record = process_guard.Record(
            pid=bystander.pid, start_ticks=ticks - 1, boot_id=process_guard._boot_id(),
            owner_pid=os.getpid(), owner_start_ticks=0,  # no live process started at tick 0
            backend="local", model="m1", argv=["llama-server"])
        (state / f"{bystander.pid}.json").write_text(json.dumps(dataclasses.asdict(record)))
        asyncio.run(start_and_load(tiny_backend(), M1))
        assert bystander.poll() is None
        assert list(state.glob("*.json")) == []
    finally:
        stop_process(bystander)


async def test_secrets_in_the_command_are_masked_in_logs_and_state(
        logs: list[dict[str, Any]], state_dir: Path) -> None:
    backend = tiny_backend("--api-key", "sk-secret-one", "--api-key=sk-secret-two")
    async with running(backend) as (driver, _):
        await driver.load(M1)
        [start] = events(logs, "process.start")
        assert "--api-key" in start["argv"] and "--api-key=***" in start["argv"]
        recorded = "".join(p.read_text() for p in (state_dir / "processes").glob("*.json"))
        shown = json.dumps(logs) + recorded
        assert "sk-secret" not in shown and "***" in recorded


async def test_a_missing_model_file_fails_at_once_and_for_good(
        logs: list[dict[str, Any]]) -> None:
    model = ModelConfig(name="m1", backend="local", served_name="s",
                        path="/srv/models/secret-dir/tiny.gguf")
    async with running(tiny_backend(model_arg="{path}")) as (driver, _):
        with pytest.raises(DriverError) as caught:
            await driver.load(model)
    assert str(caught.value) == "model file not found: tiny.gguf"
    assert not caught.value.retryable
    assert "/srv/models/secret-dir/tiny.gguf" in caught.value.detail
    assert not events(logs, "process.start")
