"""`python -m dtask.worker --endpoint tcp://... [options]`: the worker without the CLI
(tests and benchmarks start it this way; operators use `dtask worker`)."""

from __future__ import annotations

import argparse
import logging
import sys

from .config import DEFAULT_EXECUTORS, WorkerConfig
from .main import run_worker


def parse_args(argv: list[str]) -> tuple[WorkerConfig, str]:
    ap = argparse.ArgumentParser(prog="python -m dtask.worker")
    ap.add_argument("--endpoint", action="append", required=True, dest="endpoints",
                    help="a scheduler client endpoint (repeat, or comma-separate)")
    ap.add_argument("--id", dest="worker_id")
    ap.add_argument("--concurrency", type=int)
    ap.add_argument("--queue", action="append", dest="queues")
    ap.add_argument("--label", action="append", dest="labels")
    ap.add_argument("--executor", action="append", dest="executors",
                    help=f"default: {','.join(DEFAULT_EXECUTORS)}")
    ap.add_argument("--import", action="append", dest="imports", default=[])
    for name in ("heartbeat_interval", "register_timeout", "result_resend_interval",
                 "drain_timeout", "ack_timeout", "kill_grace", "log_flush_interval"):
        ap.add_argument("--" + name.replace("_", "-"), type=float, dest=name)
    for name in ("max_log_bytes", "max_result_bytes", "max_outbox", "python_pool_size",
                 "log_flush_bytes", "prefetch"):
        ap.add_argument("--" + name.replace("_", "-"), type=int, dest=name)
    ap.add_argument("--log-level", default="info")
    ns = vars(ap.parse_args(argv))
    level = ns.pop("log_level")
    ns["endpoints"] = [e.strip() for arg in ns["endpoints"] for e in arg.split(",") if e.strip()]
    for key in ("queues", "labels", "executors"):
        if ns[key]:
            ns[key] = [v.strip() for arg in ns[key] for v in arg.split(",") if v.strip()]
    return WorkerConfig(**{k: v for k, v in ns.items() if v is not None}), level


def main(argv: list[str] | None = None) -> int:
    try:
        config, level = parse_args(sys.argv[1:] if argv is None else argv)
    except ValueError as exc:
        print(f"dtask worker: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(stream=sys.stderr, level=level.upper(),
                        format="ts=%(asctime)s level=%(levelname)s logger=%(name)s %(message)s")
    return run_worker(config)


if __name__ == "__main__":
    sys.exit(main())
