"""The executors, by the name tasks give in their `type`: the one place they are listed.

A new executor is a module with an `Executor` subclass, added to `EXECUTORS`.
"""

from __future__ import annotations

from .base import Context, Executor, Finished, Handle, TaskError
from .docker import DockerExecutor
from .http import HttpExecutor
from .python import PythonExecutor
from .shell import ShellExecutor

EXECUTORS: dict[str, type[Executor]] = {
    "shell": ShellExecutor,
    "python": PythonExecutor,
    "http": HttpExecutor,
    "docker": DockerExecutor,
}
NEEDS_POOL = frozenset({"python", "http"})  # these run inside the warm Python pool


def build(names: list[str], ctx: Context) -> dict[str, Executor]:
    unknown = [n for n in names if n not in EXECUTORS]
    if unknown:
        raise ValueError(f"unknown executor(s) {', '.join(unknown)}; "
                         f"known: {', '.join(EXECUTORS)}")
    return {name: EXECUTORS[name](ctx) for name in names}


__all__ = ["EXECUTORS", "NEEDS_POOL", "Context", "Executor", "Finished", "Handle",
           "TaskError", "build"]
