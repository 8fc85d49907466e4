"""`python -m bench`: run the scenarios on every requested system, print the tables."""

from __future__ import annotations

import argparse
import json
import sys
import traceback

from bench.suite import redisdb, report, systems
from bench.suite.scenarios import ALL, KEYS, OPT_IN, build
from bench.suite.stats import Figure

SMOKE = {"tasks": 50, "runs": 1, "seconds": 0.3, "rate": 100.0, "latency_tasks": 20}


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    ap.add_argument("--systems", default=",".join(n for n in systems.PACKAGES
                                                  if systems.usable(n)),
                    help="comma-separated; default: every installed and reachable one")
    ap.add_argument("--scenarios", default=",".join(KEYS),
                    help="comma-separated: " + ", ".join(KEYS) + "; opt-in (DTask only, "
                         "never in the default list nor --smoke): " + ", ".join(OPT_IN))
    # Long enough for steady state: a 2,000-task run lasts ~0.3 s for DTask, and such
    # short runs read up to ~1.5x higher than 10,000-task ones in the same hour.
    ap.add_argument("--tasks", type=int, default=10_000, help="tasks per end-to-end run")
    ap.add_argument("--runs", type=int, default=3, help="runs per figure (median, min-max)")
    ap.add_argument("--seconds", type=float, default=2.0, help="per submit / raft run")
    ap.add_argument("--workers", default="1,2",
                    help="end-to-end worker process counts, comma-separated")
    ap.add_argument("--clients", default="1,8",
                    help="one-by-one submit client process counts, comma-separated")
    ap.add_argument("--rate", type=float, default=200.0,
                    help="tasks/s for the latency and failover scenarios")
    ap.add_argument("--latency-tasks", type=int, default=2000, help="tasks per latency run")
    ap.add_argument("--scale-tasks", type=int, default=1_000_000,
                    help="scale: pending tasks submitted before measuring")
    ap.add_argument("--scale-dispatch", type=int, default=20_000,
                    help="scale: no-op tasks then dispatched on a dedicated queue while the "
                         "others wait (0: skip)")
    ap.add_argument("--scale-slots", type=int, default=4,
                    help="scale: slots of the one worker process for the dispatch part")
    ap.add_argument("--persist-rate", type=float, default=5000.0,
                    help="persist: tasks/s offered")
    ap.add_argument("--persist-seconds", type=float, default=30.0,
                    help="persist: seconds under load")
    ap.add_argument("--smoke", action="store_true",
                    help="CI mode: 50 tasks, 1 run, 0.3 s per timed run, latency 20 tasks "
                         "at 100/s, failover once")
    ap.add_argument("--durable-redis", action="store_true",
                    help="run the Redis-based peers against a throwaway redis-server with "
                         "AOF and appendfsync always (fsync per write), each in its durable "
                         "configuration only (celery acks_late, huey, rq SimpleWorker, "
                         "dramatiq); the server is stopped and its directory deleted after")
    ap.add_argument("--write-results", action="store_true",
                    help="append the tables to bench/RESULTS.md")
    ap.add_argument("--json", metavar="FILE", help="also write the medians as JSON")
    args = ap.parse_args(argv)
    if args.smoke:
        vars(args).update(SMOKE)
    return args


def _medians(kind: str, result: Figure | dict[str, Figure] | None) -> object:
    """For --json: the median (0.0 if it failed); per column for latency, failover."""
    if isinstance(result, Figure):
        return result.median
    if not result:
        return 0.0
    out = {k: fig.median for k, fig in result.items()}
    if kind == "failover":
        out["lost"] = sum(result["lost"].samples)  # every run counts, not the median
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if not args.durable_redis:
        return _run(args, argv)
    with redisdb.durable_server():
        return _run(args, argv)


def _run(args: argparse.Namespace, argv: list[str] | None) -> int:
    names = [n.strip() for n in args.systems.split(",") if n.strip()]
    unknown = [n for n in names if n not in systems.PACKAGES]
    if unknown:
        sys.exit(f"unknown systems: {', '.join(unknown)}")
    wanted = set(args.scenarios.split(","))
    if wanted - set(ALL):
        sys.exit(f"unknown scenarios: {', '.join(sorted(wanted - set(ALL)))}")
    configs = [cfg for name in names for cfg in systems.configs(name)]
    if args.durable_redis:
        redis_peers = {n for n, s in systems.SERVICES.items() if s == "redis"}
        configs = [c for c in configs
                   if c.system not in redis_peers or c.name in redisdb.DURABLE_ROWS]
    versions = {n: systems.version(n) for n in names}
    command = "python -m bench " + " ".join(argv if argv is not None else sys.argv[1:])
    where = (f", a throwaway redis-server on port {redisdb.address()[1]} (its AOF in a "
             "temporary directory, deleted after)" if args.durable_redis else "")
    out = [report.preamble(command.strip(), versions),
           f"Redis-based peers: {redisdb.persistence()}{where} (db 5, flushed before and "
           "after)."]
    print(out[0], "\n" + out[1], flush=True)
    medians: dict[str, dict[str, object]] = {}
    for scenario in build(args):
        if scenario.key not in wanted:
            continue
        rows, without = [], []
        for cfg in configs:
            try:
                fig = scenario.measure(cfg, args)
                err = ""
            except Exception as exc:  # a peer failing must not hide the others' figures
                traceback.print_exc()
                fig, err = None, f"{type(exc).__name__}: {str(exc)[:80]}"
            if fig is None and not err:
                if cfg.system != "pysyncobj" and cfg.system not in without:
                    without.append(cfg.system)  # the task queues without this operation
                continue  # the system has no such operation
            rows.append((cfg, fig, err))
            medians.setdefault(scenario.name, {})[cfg.name] = _medians(scenario.kind, fig)
        have = {cfg.system for cfg, _, _ in rows}
        text = report.render(scenario, rows, {}, [n for n in without if n not in have])
        out.append(text)
        print("\n" + text, flush=True)
    if args.write_results:
        report.append_results("\n\n".join(out))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(medians, f, indent=1)
    return 0
