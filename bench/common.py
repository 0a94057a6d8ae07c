"""What every benchmark script shares: where processes run, and how figures are read.

Cores: the machine under test has few cores shared by everything, so each side gets its own.
The server under test (or its baseline) runs on SERVER_CPUS; Valkey and the load generators on
LOAD_CPUS. With one core only, everything shares it (and ratios are all the figures say).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
_ALL = sorted(os.sched_getaffinity(0))
SERVER_CPUS = {_ALL[0]}
LOAD_CPUS = set(_ALL[1:]) or {_ALL[0]}


def placement() -> str:
    return (
        f"server (or its baseline) on cpu {sorted(SERVER_CPUS)}; Valkey and load on cpu {sorted(LOAD_CPUS)}"
    )


def children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def pin(pid: int, cpus: set[int]) -> None:
    """Pins `pid` and its children (a supervisor and its workers)."""
    for each in [pid, *children(pid)]:
        with contextlib.suppress(OSError):  # a worker may be restarting
            os.sched_setaffinity(each, cpus)


def cpu_seconds(pid: int, *, with_children: bool = True) -> float:
    """User + system CPU of `pid` (and of its children), from /proc."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return 0.0
    total = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime
    if with_children:
        total += sum(cpu_seconds(c) for c in children(pid))
    return total


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]
