"""The one method every benchmark measures with: interleaved rounds, medians and ranges, the load beside them.

Each contender is a function that does its work once and returns how many unique units it did (clips built,
samples loaded, steps trained). `interleave` runs every contender once per round, at least 5 rounds, with the
order reversed every other round (A B C, C B A, ...), so no contender always runs first, last or after the same
one. A contender's rate in a round is units / wall seconds; a ratio between two contenders is taken within each
round, and the report is the median over the rounds with its range (lowest to highest). CPU seconds (this process
and its waited-for children) are kept too: they show the work done whatever else runs on the machine. The 1-minute
load average before and after the rounds goes with every comparison.
"""

from __future__ import annotations

import os
import platform
import resource
import statistics
import string
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

TEMPLATES = Path(__file__).resolve().parent / "templates"
MIN_ROUNDS = 5


def cpu_seconds() -> float:
    """CPU seconds of this process and of its children that were waited for."""
    usages = (resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN))
    return sum(usage.ru_utime + usage.ru_stime for usage in usages)


class Meter:
    """Wall seconds and CPU seconds (this process and its finished children) over a `with` block."""

    def __enter__(self) -> Meter:
        self.wall, self.cpu = time.perf_counter(), cpu_seconds()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall, self.cpu = time.perf_counter() - self.wall, cpu_seconds() - self.cpu


@dataclass(frozen=True)
class Measurement:
    """One contender's run in one round."""

    units: float  # unique units of work done (clips, samples, steps)
    wall_s: float
    cpu_s: float

    @property
    def rate(self) -> float:
        return self.units / self.wall_s

    @property
    def cpu_per_unit(self) -> float:
        return self.cpu_s / self.units


@dataclass(frozen=True)
class Spread:
    """A median over rounds and its range."""

    median: float
    low: float
    high: float

    @classmethod
    def of(cls, values: list[float]) -> Spread:
        return cls(statistics.median(values), min(values), max(values))

    def show(self, digits: int = 2) -> str:
        return f"{self.median:.{digits}f} ({self.low:.{digits}f}-{self.high:.{digits}f})"


def spread_json(values: list[float]) -> dict[str, float]:
    """The median and range of `values` as a result dict holds them."""
    return asdict(Spread.of(values))


def show(spread: dict[str, float], digits: int = 2) -> str:
    """A spread read back from a result dict (other keys beside it ignored), written as Spread.show writes it."""
    return Spread(spread["median"], spread["low"], spread["high"]).show(digits)


@dataclass
class Rounds:
    """Every contender's measurements, round by round, and the load average around them."""

    names: list[str]
    rounds: list[dict[str, Measurement]] = field(default_factory=list)
    load_before: float = 0.0
    load_after: float = 0.0

    def values(self, name: str, metric: str) -> list[float]:
        return [getattr(measured[name], metric) for measured in self.rounds]

    def spread(self, name: str, metric: str = "rate") -> Spread:
        """A contender's `metric` (rate, wall_s, cpu_s, cpu_per_unit, units) over the rounds."""
        return Spread.of(self.values(name, metric))

    def ratio(self, name: str, baseline: str, metric: str = "rate") -> Spread:
        """name's metric over baseline's, taken within each round, over the rounds."""
        ours, theirs = self.values(name, metric), self.values(baseline, metric)
        return Spread.of([a / b for a, b in zip(ours, theirs)])

    def best_baseline(self, baselines: list[str], metric: str = "rate") -> str:
        """The baseline with the highest median `metric`."""
        return max(baselines, key=lambda name: self.spread(name, metric).median)

    def load(self) -> str:
        return f"{self.load_before:.2f} before, {self.load_after:.2f} after"

    def to_json(self) -> dict[str, Any]:
        return {
            "rounds": [{name: vars(m) for name, m in measured.items()} for measured in self.rounds],
            "load_before": self.load_before,
            "load_after": self.load_after,
        }


def interleave(
    contenders: dict[str, Callable[[], float]], rounds: int = MIN_ROUNDS, between: Callable[[], None] | None = None
) -> Rounds:
    """Run every contender once per round, the order reversed every other round; `between` runs (untimed) before
    each contender, e.g. to drop what the previous one left behind."""
    if rounds < 1:
        raise ValueError(f"rounds must be at least 1, got {rounds}")
    names = list(contenders)
    result = Rounds(names, load_before=load_average())
    for index in range(rounds):
        measured = {}
        for name in names if index % 2 == 0 else names[::-1]:
            if between is not None:
                between()
            with Meter() as meter:
                units = contenders[name]()
            measured[name] = Measurement(float(units), meter.wall, meter.cpu)
        result.rounds.append({name: measured[name] for name in names})
    result.load_after = load_average()
    return result


def same_keys(keys: dict[str, list[list[str]]], reference: str) -> list[str]:
    """The one list of sample keys every epoch of every contender read ({contender: [keys of each epoch]}), taken from
    `reference`'s first epoch; RuntimeError naming a contender and epoch that read others: contenders compared on
    throughput must do the same work."""
    expected = keys[reference][0]
    for name, epochs in keys.items():
        for epoch, read in enumerate(epochs):
            if read != expected:
                count = len(expected)
                raise RuntimeError(f"{name} epoch {epoch} read {len(read)} keys, not the {count} of {reference}")
    return expected


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


def render(template: str, **values: Any) -> str:
    """benchmarks/templates/<template>.md with its $names filled in (string.Template); a name left unfilled is an
    error."""
    text = (TEMPLATES / f"{template}.md").read_text()
    return string.Template(text).substitute({name: str(value) for name, value in values.items()}).strip()
