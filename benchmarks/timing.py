"""What every benchmark needs: wall and CPU time of a piece of work, the machine it ran on, and a table.

The machine is shared and noisy, so a benchmark repeats its measurements in interleaved rounds and keeps the
best of each (the round least disturbed by other processes). CPU seconds (this process and its waited-for
children) show the work done whatever the load; wall seconds are what a user waits.
"""

from __future__ import annotations

import os
import platform
import resource
import time
from collections.abc import Callable
from typing import Any


class Meter:
    """Wall seconds and CPU seconds of this process and its finished children over a `with` block."""

    def __enter__(self) -> Meter:
        self.wall, self.cpu = time.perf_counter(), cpu_seconds()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall, self.cpu = time.perf_counter() - self.wall, cpu_seconds() - self.cpu


def cpu_seconds() -> float:
    return sum(
        u.ru_utime + u.ru_stime
        for u in (resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN))
    )


def best_of_rounds(work: dict[str, Callable[[], Any]], repeats: int) -> dict[str, dict[str, float]]:
    """Run every piece of work once per round, `repeats` rounds; per piece the least wall and least CPU seconds."""
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    rounds = []
    for _ in range(repeats):
        timings = {}
        for name, run in work.items():
            with Meter() as meter:
                run()
            timings[name] = (meter.wall, meter.cpu)
        rounds.append(timings)
    return {
        name: {"wall_s": min(r[name][0] for r in rounds), "cpu_s": min(r[name][1] for r in rounds)} for name in work
    }


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def load_average() -> float:
    return round(os.getloadavg()[0], 2)


def table(header: list[str], rows: list[list[Any]]) -> str:
    """A Markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def verdict(met: bool) -> str:
    return "**met**" if met else "**not met**"
