"""What a benchmarked configuration is: a system, its setup, its guarantees, and the
scenarios it can run (None where the system has no such operation)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Config:
    system: str  # the --systems name: dtask, celery, ...
    name: str  # the row's label, e.g. "celery acks_late"
    setup: str  # how it ran: broker, worker pool, processes
    guarantees: str  # replicated or not, fsync or not, ack-late or not
    e2e: Callable[..., list[float]] | None = None  # (tasks, runs, workers=1) -> tasks/s
    submit_one: Callable[[float], float] | None = None  # seconds -> tasks/s
    submit_bulk: Callable[[float], float] | None = None  # seconds -> tasks/s
    raft: Callable[[float], float] | None = None  # seconds -> committed writes/s
    # (rate/s, tasks, runs) -> per run, each task's delay in s from submit call to start
    latency: Callable[[float, int, int], list[list[float]]] | None = None
    # (seconds, clients) -> tasks/s summed over that many client processes
    submit_clients: Callable[[float, int], float] | None = None
    # (runs, rate/s) -> per run {"recovery_s": ..., "lost": ..., "acked": ...}
    failover: Callable[[int, float], list[dict]] | None = None
    # DTask only (opt-in scenarios): (tasks, dispatch tasks, slots) -> bench_scale.run figures
    scale: Callable[[int, int, int], dict] | None = None
    # DTask only: (rate/s, seconds) -> bench_persist_lag.run figures
    persist: Callable[[float, float], dict] | None = None
