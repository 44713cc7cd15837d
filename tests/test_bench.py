"""The benchmarks the README shows still run (their figures are read by people, never gated)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from bench import own_cost

ROOT = Path(__file__).resolve().parent.parent


def test_own_cost_prints_a_figure_per_case_and_piece() -> None:
    done = subprocess.run([sys.executable, "bench/own_cost.py", "--rounds", "1", "--calls", "20",
                           "--without", "log", "watch"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [line for line in done.stdout.splitlines() if line.startswith(("| this", "| without"))]
    assert [row.split(" | ")[0] for row in rows] == ["| this checkout", *(
        f"| without {own_cost.PIECES[piece]}" for piece in ("log", "watch"))]
    for row in rows:
        figures = [float(f) for f in re.findall(r"\| (\d+) ", row + " ")]
        assert len(figures) == 3 and all(f > 0 for f in figures), done.stdout


def test_own_cost_counts_instructions_per_call() -> None:
    """The count a noisy machine cannot move: renaming the model in each frame is more work
    than relaying the frames as they are, and the count says so."""
    done = subprocess.run([sys.executable, "bench/own_cost.py", "--instructions", "--calls", "20"],
                          cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "k instructions per call" in done.stdout
    row = next(line for line in done.stdout.splitlines() if line.startswith("| this"))
    json, sse, renamed = (float(f) for f in re.findall(r"\| (\d+) ", row + " "))
    assert json > 0 and 0 < sse < renamed, done.stdout


def test_relay_count_counts_the_gateway_and_the_floors() -> None:
    done = subprocess.run([sys.executable, "bench/relay_count.py", "--floors", "--requests", "5",
                           "--paced", "1"], cwd=ROOT, capture_output=True, text=True,
                          timeout=1500)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = {line.split(" | ")[0].lstrip("| "): line.strip(" |").split(" | ")[1:]
            for line in done.stdout.splitlines() if line.startswith("| ") and "k/" not in line}
    gateway, uvicorn = rows["gateway, this checkout"], rows["floor: uvicorn + relay/client.py"]
    protocol = rows["floor: asyncio.Protocol + relay/client.py"]
    assert uvicorn[2] == "—" and float(gateway[2]) > 0, done.stdout
    # The gateway does more than uvicorn alone, which does more than no framework at all
    assert float(gateway[0]) > float(uvicorn[0]) > float(protocol[0]) > 0, done.stdout
