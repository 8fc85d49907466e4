"""The DTask worker daemon: `run_worker(WorkerConfig(...))`, and the `@task` decorator.

Attributes are imported lazily so that the Python pool's children, which import
`dtask.worker.registry`, do not pay for ZeroMQ and the runner.
"""

from __future__ import annotations

from typing import Any

__all__ = ["WorkerConfig", "run_worker", "task"]


def __getattr__(name: str) -> Any:
    if name == "WorkerConfig":
        from .config import WorkerConfig
        return WorkerConfig
    if name == "run_worker":
        from .main import run_worker
        return run_worker
    if name == "task":
        from .registry import task
        return task
    raise AttributeError(name)
