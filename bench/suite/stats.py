"""A figure measured over several runs: median with min and max."""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Figure:
    samples: tuple[float, ...]

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def low(self) -> float:
        return min(self.samples)

    @property
    def high(self) -> float:
        return max(self.samples)

    def text(self, fmt: str = ",.0f") -> str:
        if len(self.samples) == 1:
            return f"{self.median:{fmt}}"
        return f"{self.median:{fmt}} ({self.low:{fmt}}–{self.high:{fmt}})"


def repeat(runs: int, measure: Callable[[], float]) -> Figure:
    """Call `measure` `runs` times; each call returns one figure (e.g. tasks/s)."""
    return Figure(tuple(measure() for _ in range(runs)))


def percentile(xs: list[float], q: float) -> float:
    """The q-quantile (0 < q < 1) of xs, nearest rank (as bench_scheduler.pct)."""
    s = sorted(xs)
    return s[min(len(s) - 1, int(len(s) * q))]
