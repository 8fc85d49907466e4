"""A worker's configuration: one record, filled by the CLI or by a test."""

from __future__ import annotations

import os
import re
import socket
from dataclasses import dataclass, field

from .. import protocol

DEFAULT_EXECUTORS = ("shell", "python", "http")  # docker is opt-in: it needs an engine
_NAME = re.compile(r"^[A-Za-z0-9_.:@/+-]{1,128}$")  # what the protocol accepts for names


def _default_worker_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


def _cpus() -> int:
    return os.cpu_count() or 1


@dataclass(slots=True)
class WorkerConfig:
    endpoints: list[str]  # schedulers' client endpoints, tcp://HOST:PORT
    worker_id: str = field(default_factory=_default_worker_id)
    concurrency: int = field(default_factory=_cpus)
    queues: list[str] = field(default_factory=lambda: ["default"])
    labels: list[str] = field(default_factory=list)
    executors: list[str] = field(default_factory=lambda: list(DEFAULT_EXECUTORS))
    imports: list[str] = field(default_factory=list)  # modules with @task functions
    heartbeat_interval: float = 1.0  # the scheduler's `registered` reply may override it
    register_timeout: float = 2.0  # no reply to `register` within this: try the next endpoint
    result_resend_interval: float = 2.0  # resend unacknowledged results this often
    drain_timeout: float = 30.0  # SIGTERM: how long running tasks may finish
    ack_timeout: float = 5.0  # SIGTERM: how long to wait for acks of the last results
    kill_grace: float = 5.0  # SIGTERM -> SIGKILL delay on timeout or cancel
    max_log_bytes: int = protocol.MAX_LOG
    max_result_bytes: int = protocol.MAX_RESULT
    max_outbox: int = 1000  # unacknowledged results before the worker stops taking tasks
    python_pool_size: int = 0  # 0: same as concurrency
    # Tasks taken beyond the slots, started as slots free up: the next task is already
    # here when one ends, instead of a round trip to the leader away. Only asked for
    # while the running tasks are short (see runner.PREFETCH_WHILE_UNDER).
    prefetch: int = 64  # at most this many (the worker asks for fewer: see runner); 0: off
    log_flush_interval: float = 0.1  # stream a running task's output this often...
    log_flush_bytes: int = 64 << 10  # ...or as soon as this much is waiting

    def __post_init__(self) -> None:
        if not self.endpoints:
            raise ValueError("at least one scheduler endpoint is needed")
        for ep in self.endpoints:
            if not ep.startswith(("tcp://", "ipc://", "inproc://")):
                raise ValueError(f"endpoint {ep!r} is not tcp://HOST:PORT")
        for name in [self.worker_id, *self.queues, *self.labels, *self.executors]:
            if not _NAME.match(name):
                raise ValueError(f"{name!r} is not a valid name ([A-Za-z0-9_.:@/+-], 1-128)")
        from .executors import EXECUTORS  # here: executors import this module

        unknown = [e for e in self.executors if e not in EXECUTORS]
        if unknown or not self.executors:
            raise ValueError(f"unknown executor(s) {', '.join(unknown) or '(none given)'}; "
                             f"known: {', '.join(EXECUTORS)}")
        if self.concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        if self.prefetch < 0:
            raise ValueError("prefetch must not be negative")
        if self.python_pool_size <= 0:
            self.python_pool_size = self.concurrency
        if self.heartbeat_interval <= 0:
            raise ValueError("heartbeat_interval must be positive")
        if self.max_log_bytes < 0 or self.max_result_bytes < 0:
            raise ValueError("size limits must not be negative")
