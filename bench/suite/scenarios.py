"""The scenarios: which Config field runs each one, its title and unit, and which row
is DTask's reference for the ratio column."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from bench.suite.model import Config
from bench.suite.stats import Figure, repeat


@dataclass(frozen=True)
class Scenario:
    key: str
    title: str
    unit: str
    reference: str  # the Config.name of DTask's row
    measure: Callable[[Config, int, int, float], Figure | None]  # cfg, tasks, runs, seconds


def _e2e(cfg: Config, tasks: int, runs: int, seconds: float) -> Figure | None:
    return Figure(tuple(cfg.e2e(tasks, runs))) if cfg.e2e else None


def _timed(field: str) -> Callable[[Config, int, int, float], Figure | None]:
    def measure(cfg: Config, tasks: int, runs: int, seconds: float) -> Figure | None:
        fn = getattr(cfg, field)
        return repeat(runs, lambda: fn(seconds)) if fn else None
    return measure


SCENARIOS = (
    Scenario("e2e", "End-to-end throughput: {tasks:,} no-op Python tasks, submit -> all "
             "completed, 1 worker process", "tasks/s", "dtask", _e2e),
    Scenario("submit", "Submit throughput, one by one from 1 client ({seconds:g} s per run, "
             "no worker)", "tasks/s", "dtask", _timed("submit_one")),
    Scenario("bulk", "Submit throughput, bulk (DTask submit_many / RQ enqueue_many / "
             "procrastinate batch_defer, 1000 per call)", "tasks/s", "dtask",
             _timed("submit_bulk")),
    Scenario("raft", "Raft layer alone: committed writes/s, one at a time, 3 local nodes",
             "writes/s", "dtask raft", _timed("raft")),
)
