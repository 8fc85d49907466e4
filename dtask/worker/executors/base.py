"""What every executor is: parse a payload, start it, stop it, report how it ended."""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgpack

from ... import protocol as p
from ..config import WorkerConfig
from ..reactor import Reactor

MSGPACK_TYPES = ("application/msgpack", "application/x-msgpack")


class TaskError(Exception):
    """The task cannot run as given (bad payload, unknown function...): it fails."""


@dataclass(slots=True)
class Finished:
    outcome: str
    exit_code: int | None = None
    error: str = ""
    result: bytes = b""
    started_us: int = 0  # set when the executor knows better than the runner (python)


OnOutput = Callable[[bytes], None]
OnExit = Callable[[Finished], None]


class Handle(ABC):
    """A started attempt. It calls `on_exit` exactly once, from the poll loop."""

    @abstractmethod
    def signal(self, sig: int) -> None:
        """Send `sig` to everything the attempt runs (its process group)."""


@dataclass(slots=True)
class Context:
    """What executors may use from the worker."""

    config: WorkerConfig
    reactor: Reactor
    pool: Any = None  # PythonPool, when a pool-based executor is enabled


class Executor(ABC):
    name: str = ""
    accepts_binary: bool = False  # may take application/octet-stream payloads as bytes

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx

    def decode(self, payload: bytes, content_type: str) -> Any:
        if content_type == p.JSON:
            try:
                return json.loads(payload) if payload else {}
            except ValueError as exc:
                raise TaskError(f"payload is not valid JSON: {exc}") from None
        if content_type in MSGPACK_TYPES:
            try:
                return msgpack.unpackb(payload, raw=False) if payload else {}
            except Exception as exc:
                raise TaskError(f"payload is not valid msgpack: {exc}") from None
        if content_type == p.BINARY and self.accepts_binary:
            return payload
        raise TaskError(f"executor {self.name} does not accept content type {content_type!r}"
                        f" (use {p.JSON})")

    @abstractmethod
    def parse(self, payload: Any) -> Any:
        """Check a decoded payload; raise TaskError with a message for people."""

    @abstractmethod
    def start(self, spec: Any, task: dict, on_output: OnOutput, on_exit: OnExit) -> Handle:
        """Start running `spec`; raise TaskError if it cannot start at all."""


def require_map(payload: Any, executor: str) -> dict:
    if not isinstance(payload, dict):
        raise TaskError(f"{executor} payload must be a JSON object")
    return payload


def str_map(value: Any, field: str) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise TaskError(f"field {field} must be an object of strings")
    return value
