"""The scenarios: which Config field runs each one, its title and unit, and which row
is DTask's reference for the ratio column. `build` expands them for the options given
(one end-to-end table per worker count, one submit table per client count)."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass

from bench.suite.model import Config
from bench.suite.stats import Figure, percentile, repeat

Result = Figure | dict[str, Figure]


@dataclass(frozen=True)
class Scenario:
    key: str  # the --scenarios name
    name: str  # its key in the --json output (one per table)
    title: str
    unit: str
    reference: str  # the Config.name of DTask's row
    measure: Callable[[Config, argparse.Namespace], Result | None]
    kind: str = "rate"  # how report renders it: rate, latency or failover


KEYS = ("e2e", "submit", "bulk", "raft", "latency", "failover")  # the default list
OPT_IN = ("scale", "persist")  # DTask only, long: run only when named in --scenarios
ALL = KEYS + OPT_IN
QUANTILES = {"p50": 0.5, "p99": 0.99, "p99.9": 0.999}


def _e2e(workers: int) -> Callable[[Config, argparse.Namespace], Result | None]:
    def measure(cfg: Config, args: argparse.Namespace) -> Result | None:
        return Figure(tuple(cfg.e2e(args.tasks, args.runs, workers))) if cfg.e2e else None
    return measure


def _timed(field: str) -> Callable[[Config, argparse.Namespace], Result | None]:
    def measure(cfg: Config, args: argparse.Namespace) -> Result | None:
        fn = getattr(cfg, field)
        return repeat(args.runs, lambda: fn(args.seconds)) if fn else None
    return measure


def _clients(n: int) -> Callable[[Config, argparse.Namespace], Result | None]:
    if n == 1:
        return _timed("submit_one")

    def measure(cfg: Config, args: argparse.Namespace) -> Result | None:
        fn = cfg.submit_clients
        return repeat(args.runs, lambda: fn(args.seconds, n)) if fn else None
    return measure


def _latency(cfg: Config, args: argparse.Namespace) -> Result | None:
    if not cfg.latency:
        return None
    runs = cfg.latency(args.rate, args.latency_tasks, args.runs)
    return {k: Figure(tuple(percentile(r, q) * 1e3 for r in runs)) for k, q in QUANTILES.items()}


def _failover(cfg: Config, args: argparse.Namespace) -> Result | None:
    if not cfg.failover:
        return None
    runs = cfg.failover(args.runs, args.rate)
    return {k: Figure(tuple(float(r[k]) for r in runs)) for k in ("recovery_s", "acked", "lost")}


def _scale(cfg: Config, args: argparse.Namespace) -> Result | None:
    if not cfg.scale:
        return None
    r = cfg.scale(args.scale_tasks, args.scale_dispatch, args.scale_slots)
    leader = r["rss"][r["leader"]]
    out = {"overall": r["overall"], "first10": r["first10"], "last10": r["last10"],
           "rss_mib": leader[0], "rss_start_mib": leader[1], "bytes_per_task": leader[2]}
    if "dispatch" in r:
        out["dispatch"] = r["dispatch"]
    return {k: Figure((float(v),)) for k, v in out.items()}


def _persist(cfg: Config, args: argparse.Namespace) -> Result | None:
    if not cfg.persist:
        return None
    r = cfg.persist(args.persist_rate, args.persist_seconds)
    keys = ("lag_p50", "lag_p99", "lag_max", "rows_per_s", "submitted_per_s", "drain_s")
    return {k: Figure((float(r[k]),)) for k in keys}


def _ints(text: str) -> list[int]:
    return [int(x) for x in str(text).split(",") if x.strip()]


def build(args: argparse.Namespace) -> list[Scenario]:
    out = []
    for w in _ints(args.workers):
        procs = "1 worker process" if w == 1 else f"{w} worker processes"
        out.append(Scenario("e2e", "e2e" if w == 1 else f"e2e_w{w}",
                            f"End-to-end throughput: {args.tasks:,} no-op Python tasks, submit "
                            f"-> all completed, {procs}", "tasks/s", "dtask", _e2e(w)))
    for n in _ints(args.clients):
        who = "1 client" if n == 1 else f"{n} concurrent client processes (summed)"
        out.append(Scenario("submit", "submit" if n == 1 else f"submit_c{n}",
                            f"Submit throughput, one by one from {who} ({args.seconds:g} s "
                            "per run, no worker)", "tasks/s", "dtask", _clients(n)))
    out += [
        Scenario("bulk", "bulk", "Submit throughput, bulk (DTask submit_many / RQ enqueue_many "
                 "/ procrastinate batch_defer, 1000 per call)", "tasks/s", "dtask",
                 _timed("submit_bulk")),
        Scenario("raft", "raft", "Raft layer alone: committed writes/s, one at a time, 3 local "
                 "nodes", "writes/s", "dtask raft", _timed("raft")),
        Scenario("latency", "latency", f"Dispatch latency at a steady {args.rate:g} tasks/s: "
                 "submit call -> the task's first line, 1 worker process x 1 slot, "
                 f"{args.latency_tasks:,} tasks per run", "ms", "dtask", _latency,
                 "latency"),
        Scenario("failover", "failover", f"Failover: leader SIGKILLed under {args.rate:g} "
                 "submissions/s from 1 client (one by one, the client's own retries)", "s",
                 "dtask", _failover, "failover"),
        Scenario("scale", "scale", f"Scale: {args.scale_tasks:,} pending tasks (submit_many, "
                 "5,000 per call, to a queue no worker serves), 3 schedulers" + (
                     f"; then {args.scale_dispatch:,} no-op tasks dispatched to 1 worker "
                     f"process x {args.scale_slots} slots on a dedicated queue while they "
                     "wait" if args.scale_dispatch else ""), "tasks/s", "dtask", _scale,
                 "scale"),
        Scenario("persist", "persist", f"Write-behind persister into PostgreSQL: "
                 f"{args.persist_rate:g} tasks/s offered for {args.persist_seconds:g} s "
                 "(submit_many, 50 per 10 ms, no worker), 3 schedulers", "s", "dtask",
                 _persist, "persist"),
    ]
    return out
