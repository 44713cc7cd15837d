"""Counting instructions with valgrind's callgrind, for the benches that count rather than time
(`own_cost.py --instructions`, `relay_count.py`): the command that runs a process under it,
switching its counting on and off, and the totals it writes.
"""

from __future__ import annotations

import subprocess
from pathlib import Path


def command(out: Path | str) -> list[str]:
    """The prefix that runs a process under callgrind, counting nothing until switched on, into
    `out` (and `out.N` for its N-th dump)."""
    return ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}"]


def control(pid: int, *args: str) -> None:
    """`callgrind_control` on a counted process: `-i on`, `-i off`, `-d` (dump, then count
    again from zero)."""
    subprocess.run(["callgrind_control", *args, str(pid)], capture_output=True, check=True,
                   timeout=120)


def total(*outputs: Path | str) -> int:
    """The instructions counted in callgrind's output files."""
    counts = [int(line.split()[1]) for output in outputs
              for line in Path(output).read_text().splitlines() if line.startswith("totals:")]
    if not counts:
        raise RuntimeError(f"no totals in {', '.join(map(str, outputs))}")
    return sum(counts)


def ensure_valgrind() -> None:
    from relay_cpu import ensure_tool  # a sibling script: run as one, bench/ is on the path

    ensure_tool("valgrind", "valgrind", install=True)
