"""What a model's server process really holds, and what the GPUs have free, as the host says.

GPU memory comes from `nvidia-smi` where it exists (`--query-compute-apps=pid,used_memory`, per
process; `--query-gpu=memory.free`, per GPU); without it (no NVIDIA GPU, a Mac, CI), a process
tree's resident memory (RSS from /proc). A server's tree is its process group: each is started
in a session of its own, so its workers (vLLM's engine core, say) share the leader's group.

Sizes are decimal GB, as `size_gb` in the config is.
"""

from __future__ import annotations

import asyncio
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import structlog

log = structlog.get_logger(__name__)

NVIDIA_SMI = "nvidia-smi"
_TIMEOUT_S = 5.0
_MIB = 1024 * 1024
_GB = 1e9
_PROC = Path("/proc")


@dataclass(frozen=True)
class Footprint:
    gb: float
    source: str  # "nvidia-smi" or "rss"


def footprint(leader: int, used: dict[int, float] | None) -> Footprint | None:
    """The memory of the process group led by `leader`: its GPU memory if nvidia-smi reported
    any for it (`used`, from `gpu_used_mib`), else its RSS; None when the group is gone."""
    group = group_pids(leader)
    if not group:
        return None
    if used is not None:
        mib = sum(used.get(pid, 0.0) for pid in group)
        if mib > 0:
            return Footprint(mib * _MIB / _GB, NVIDIA_SMI)
    return Footprint(rss_bytes(group) / _GB, "rss")


async def free_gb() -> float | None:
    """Free memory summed over the host's GPUs; None where nvidia-smi cannot tell."""
    lines = await _smi("--query-gpu=memory.free", "--format=csv,noheader,nounits")
    if lines is None:
        return None
    try:
        return sum(float(line) for line in lines if line.strip()) * _MIB / _GB
    except ValueError:
        log.warning("gpu.unreadable", query="memory.free", output=lines[:3])
        return None


async def gpu_used_mib() -> dict[int, float] | None:
    """MiB of GPU memory per process id, or None without a readable nvidia-smi."""
    lines = await _smi("--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits")
    if lines is None:
        return None
    used: dict[int, float] = {}
    for line in filter(str.strip, lines):
        try:
            pid, mib = (part.strip() for part in line.split(","))
            used[int(pid)] = used.get(int(pid), 0.0) + float(mib)
        except ValueError:
            continue  # "[N/A]" for a process nvidia-smi cannot see into
    return used


def group_pids(leader: int) -> set[int]:
    """Every live process in `leader`'s process group (the leader included)."""
    pids = set()
    for entry in _PROC.iterdir():
        if entry.name.isdigit() and _group_of(entry) == leader:
            pids.add(int(entry.name))
    return pids


def rss_bytes(pids: set[int]) -> int:
    total = 0
    for pid in pids:
        try:
            status = (_PROC / str(pid) / "status").read_text()
        except OSError:
            continue
        for line in status.splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1]) * 1024
    return total


def _group_of(entry: Path) -> int | None:
    try:
        stat = (entry / "stat").read_text()
    except OSError:
        return None
    # pid (comm) state ppid pgrp ...: comm may hold spaces and parentheses, so split after it.
    fields = stat.rsplit(")", 1)[-1].split()
    return int(fields[2]) if len(fields) > 2 else None


async def _smi(*query: str) -> list[str] | None:
    """nvidia-smi's output lines for a query, or None when it is absent or fails."""
    command = shutil.which(NVIDIA_SMI, path=os.environ.get("PATH"))
    if command is None:
        return None
    try:
        process = await asyncio.create_subprocess_exec(
            command, *query, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
            stdin=asyncio.subprocess.DEVNULL)
    except OSError as exc:
        log.warning("gpu.nvidia_smi_failed", error=str(exc))
        return None
    try:
        async with asyncio.timeout(_TIMEOUT_S):
            out, _ = await process.communicate()
    except TimeoutError:
        process.kill()  # a hung driver: no answer, and no process left behind
        await process.wait()
        log.warning("gpu.nvidia_smi_failed", error=f"no answer within {_TIMEOUT_S:g} s")
        return None
    if process.returncode != 0:
        return None
    return out.decode(errors="replace").splitlines()
