"""Entry point for `dtask worker` (the CLI builds the WorkerConfig)."""

from __future__ import annotations

import logging

import zmq

from .config import WorkerConfig
from .runner import Worker

log = logging.getLogger("dtask.worker.main")


def run_worker(config: WorkerConfig) -> int:
    """Run a worker until SIGTERM/SIGINT (then drain); returns the exit code.

    Call it from the main thread so it can install its signal handlers. It does not
    configure logging: that is the caller's job (the CLI's --log-level).
    """
    try:
        worker = Worker(config)
    except (OSError, ValueError, zmq.ZMQError) as exc:
        log.error("event=worker_start_failed error=%r", str(exc))
        return 2
    return worker.run()
