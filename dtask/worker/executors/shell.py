"""`shell`: {"cmd": "a command line"} via /bin/sh -c, or {"argv": [...]}; optional
"env" (merged over the worker's environment) and "cwd"."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from ... import protocol as p
from ..process import Process, describe_status
from .base import Executor, Finished, Handle, OnExit, OnOutput, TaskError, require_map, str_map


@dataclass(slots=True)
class Command:
    argv: list[str]
    env: dict[str, str] | None  # None: the worker's own environment
    cwd: str | None


class ProcessHandle(Handle):
    """A subprocess-based attempt: exit code 0 succeeds, anything else fails."""

    def __init__(self, ctx_reactor: Any, cmd: Command, on_output: OnOutput,
                 on_exit: OnExit) -> None:
        self._on_exit = on_exit
        try:
            self.proc = Process(ctx_reactor, cmd.argv, env=cmd.env, cwd=cmd.cwd,
                                on_output=on_output, on_exit=self._exited)
        except OSError as exc:
            raise TaskError(f"cannot start {cmd.argv[0]!r}: {exc}") from None

    def signal(self, sig: int) -> None:
        self.proc.signal(sig)

    def _exited(self, returncode: int) -> None:
        code, error = describe_status(returncode)
        self._on_exit(Finished(p.SUCCEEDED if code == 0 else p.ERRORED, code, error))


def merged_env(extra: dict[str, str]) -> dict[str, str] | None:
    return {**os.environ, **extra} if extra else None


def parse_cwd(spec: dict) -> str | None:
    cwd = spec.get("cwd")
    if cwd is not None and (not isinstance(cwd, str) or not cwd):
        raise TaskError("field cwd must be a non-empty string")
    return cwd


class ShellExecutor(Executor):
    name = "shell"

    def parse(self, payload: Any) -> Command:
        spec = require_map(payload, self.name)
        cmd, argv = spec.get("cmd"), spec.get("argv")
        if (cmd is None) == (argv is None):
            raise TaskError('shell payload needs exactly one of "cmd" (a string) or "argv"')
        if cmd is not None:
            if not isinstance(cmd, str) or not cmd.strip():
                raise TaskError("field cmd must be a non-empty string")
            argv = ["/bin/sh", "-c", cmd]
        elif not isinstance(argv, list) or not argv or not all(
                isinstance(a, str) for a in argv):
            raise TaskError("field argv must be a non-empty list of strings")
        return Command(argv, merged_env(str_map(spec.get("env"), "env")), parse_cwd(spec))

    def start(self, spec: Command, task: dict, on_output: OnOutput,
              on_exit: OnExit) -> Handle:
        return ProcessHandle(self.ctx.reactor, spec, on_output, on_exit)
