"""Model servers never outlive the gateway, however it ends.

Three layers, each covering what the one before cannot:

1. `die_with_gateway()`: each server is started with PR_SET_PDEATHSIG, so the kernel SIGKILLs it
   the moment the thread that started it ends (the event loop's thread: it outlives every
   server, since the driver stops them all before the loop closes). Even on SIGKILL.
2. `Watchdog`: a tiny helper process told, over a pipe, which process groups are running. When
   the gateway dies the pipe closes and it stops those whole groups (SIGTERM, SIGKILL after the
   grace): a server's own workers (vLLM's engine, a wrapper script's child) get no death signal.
3. `Registry`: a state directory holding one file per process group started (pid, start time,
   owner). At start, groups whose gateway is gone are stopped: what survived a crash of all of
   the above (an older version, the watchdog killed too) is found by the next run.

Linux only (prctl, /proc); elsewhere servers still stop with the gateway's orderly shutdown.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import structlog

log = structlog.get_logger(__name__)

STATE_DIR_ENV = "SWAPPER_STATE_DIR"
_PR_SET_PDEATHSIG = 1
_POLL_S = 0.05
_KILL_WAIT_S = 5.0  # after SIGKILL, for the kernel to take the processes down


def die_with_gateway() -> Callable[[], None] | None:
    """A `preexec_fn` that ties the child's life to this process's calling thread; None where
    the kernel cannot (not Linux)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up before fork, not after
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL))
        if os.getppid() != parent:  # the gateway died between fork and prctl: follow it now
            os._exit(1)

    return preexec


# -- what /proc says about a process ------------------------------------------------------------


def start_ticks(pid: int) -> int | None:
    """When `pid` started (clock ticks since boot); None if no such process, or a zombie. Two
    processes with one pid never share a start time: this tells a reused pid apart."""
    fields = _stat(pid)
    if fields is None or fields[0] == "Z":
        return None
    return int(fields[19])


def group_members(pgid: int) -> list[int]:
    """Living (not zombie) processes in process group `pgid`."""
    members = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            fields = _stat(int(entry.name))
            if fields is not None and fields[0] != "Z" and int(fields[2]) == pgid:
                members.append(int(entry.name))
    return members


def _stat(pid: int) -> list[str] | None:
    """/proc/PID/stat after the command name (which may hold spaces and parentheses):
    state, ppid, pgrp, session, ... starttime at index 19."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text.rsplit(")", 1)[1].split()


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


async def stop_group(pgid: int, grace_s: float) -> bool:
    """SIGTERM to the group, SIGKILL to what is left after `grace_s`; True once it is empty."""
    _signal_group(pgid, signal.SIGTERM)
    if await _emptied(pgid, grace_s):
        return True
    _signal_group(pgid, signal.SIGKILL)
    return await _emptied(pgid, _KILL_WAIT_S)


async def _emptied(pgid: int, limit_s: float) -> bool:
    deadline = time.monotonic() + limit_s
    while group_members(pgid):
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(_POLL_S)
    return True


# -- the state directory ------------------------------------------------------------------------


def default_state_dir() -> Path:
    """$SWAPPER_STATE_DIR, else $XDG_STATE_HOME/swapper-gateway, else
    ~/.local/state/swapper-gateway."""
    explicit = os.environ.get(STATE_DIR_ENV)
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state"
    return Path(base) / "swapper-gateway"


@dataclass(frozen=True)
class Record:
    """One process group a gateway started (its leader's pid is the group's id)."""

    pid: int
    start_ticks: int
    boot_id: str
    owner_pid: int
    owner_start_ticks: int
    backend: str
    model: str
    argv: Sequence[str]  # masked: secrets never reach the disk

    @property
    def owner_alive(self) -> bool:
        return start_ticks(self.owner_pid) == self.owner_start_ticks

    def leftover(self) -> bool:
        """Its gateway is gone and the group may still hold processes: the leader runs still,
        or it exited and left members (a pid is not reused while its group has members)."""
        if self.boot_id != _boot_id() or self.owner_alive:
            return False
        leader = start_ticks(self.pid)
        return leader == self.start_ticks or (leader is None and bool(group_members(self.pid)))


class Registry:
    """`<state dir>/processes/<pid>.json`, one per running process group this gateway started.

    Shared by every gateway of the user on the machine: each sweeps only the groups of
    gateways that are gone. A directory that cannot be written disables it, with a warning.
    """

    def __init__(self, state_dir: Path | None = None) -> None:
        self.directory = (state_dir or default_state_dir()) / "processes"
        self._usable: bool | None = None

    def record(self, pid: int, backend: str, model: str, argv: Sequence[str]) -> None:
        ticks, owner_ticks = start_ticks(pid), start_ticks(os.getpid())
        if ticks is None or owner_ticks is None or not self._ready():
            return
        record = Record(pid, ticks, _boot_id(), os.getpid(), owner_ticks, backend, model,
                        list(argv))
        path = self._path(pid)
        temporary = path.with_suffix(".tmp")
        try:
            temporary.write_text(json.dumps(asdict(record)))
            temporary.replace(path)  # whole or absent, never half-written
        except OSError as exc:
            log.warning("process.state_unwritable", path=str(path), error=str(exc))

    def forget(self, pid: int) -> None:
        with contextlib.suppress(OSError):
            self._path(pid).unlink()

    async def sweep(self, grace_s: float) -> list[Record]:
        """Stop every group left by a gateway that is gone; the records of those stopped."""
        stopped = []
        for path, record in self._records():
            if record is not None and record.leftover():
                log.warning("process.leftover", pid=record.pid, backend=record.backend,
                            model=record.model, argv=record.argv, gateway_pid=record.owner_pid)
                if not await stop_group(record.pid, grace_s):
                    log.error("process.leftover_survived", pid=record.pid)
                    continue
                stopped.append(record)
            if record is None or not record.owner_alive:
                with contextlib.suppress(OSError):
                    path.unlink()
        return stopped

    def _records(self) -> list[tuple[Path, Record | None]]:
        if not self.directory.is_dir():
            return []
        found: list[tuple[Path, Record | None]] = []
        for path in sorted(self.directory.glob("*.json")):
            try:
                found.append((path, Record(**json.loads(path.read_text()))))
            except (OSError, ValueError, TypeError):
                found.append((path, None))  # unreadable: of no use to anyone
        return found

    def _path(self, pid: int) -> Path:
        return self.directory / f"{pid}.json"

    def _ready(self) -> bool:
        if self._usable is None:
            try:
                self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
                self._usable = os.access(self.directory, os.W_OK)
            except OSError:
                self._usable = False
            if not self._usable:
                log.warning("process.state_unwritable", path=str(self.directory),
                            hint=f"set ${STATE_DIR_ENV} to a writable directory")
        return self._usable


# -- the watchdog -------------------------------------------------------------------------------

# Reads "+PGID" / "-PGID" lines; at end of input (the gateway is gone, or done) it stops every
# group still listed. It ignores the terminal's signals: a Ctrl-C is the gateway's to handle.
_WATCHDOG_SOURCE = """\
import os, signal, sys, time
signal.signal(signal.SIGINT, signal.SIG_IGN)
grace = float(sys.argv[1])
groups = set()
for line in sys.stdin:
    sign, pgid = line[0], int(line[1:])
    (groups.add if sign == "+" else groups.discard)(pgid)
def alive(pgid):
    try:
        os.killpg(pgid, 0)
        return True
    except OSError:
        return False
for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 0)):
    for pgid in groups:
        try:
            os.killpg(pgid, sig)
        except OSError:
            pass
    deadline = time.monotonic() + wait
    while any(alive(pgid) for pgid in groups) and time.monotonic() < deadline:
        time.sleep(0.05)
"""


class Watchdog:
    """The helper process that stops our process groups once the gateway is gone."""

    def __init__(self, grace_s: float) -> None:
        self._grace_s = grace_s
        self._process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        try:
            self._process = subprocess.Popen(
                [sys.executable, "-c", _WATCHDOG_SOURCE, str(self._grace_s)],
                stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                start_new_session=True, close_fds=True,
            )
        except OSError as exc:
            log.warning("process.watchdog_unavailable", error=str(exc))

    def watch(self, pgid: int) -> None:
        self._tell(f"+{pgid}\n")

    def release(self, pgid: int) -> None:
        self._tell(f"-{pgid}\n")

    def close(self) -> None:
        """Every group is stopped already: the watchdog ends with nothing to do."""
        process, self._process = self._process, None
        if process is None or process.stdin is None:
            return
        with contextlib.suppress(OSError):
            process.stdin.close()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def _tell(self, line: str) -> None:
        if self._process is None or self._process.stdin is None:
            return
        try:
            self._process.stdin.write(line.encode())
            self._process.stdin.flush()
        except OSError as exc:  # it died: layers 1 and 3 still hold
            log.warning("process.watchdog_lost", error=str(exc))
            self._process = None
