"""`python -m bench`: run the scenarios on every requested system, print the tables."""

from __future__ import annotations

import argparse
import json
import sys
import traceback

from bench.suite import redisdb, report, systems
from bench.suite.scenarios import SCENARIOS

SMOKE = {"tasks": 50, "runs": 1, "seconds": 0.3}


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    ap.add_argument("--systems", default=",".join(n for n in systems.PACKAGES
                                                  if systems.usable(n)),
                    help="comma-separated; default: every installed and reachable one")
    ap.add_argument("--scenarios", default=",".join(s.key for s in SCENARIOS),
                    help="comma-separated: " + ", ".join(s.key for s in SCENARIOS))
    ap.add_argument("--tasks", type=int, default=2000, help="tasks per end-to-end run")
    ap.add_argument("--runs", type=int, default=3, help="runs per figure (median, min-max)")
    ap.add_argument("--seconds", type=float, default=2.0, help="per submit / raft run")
    ap.add_argument("--smoke", action="store_true",
                    help="CI mode: 50 tasks, 1 run, 0.3 s per timed run")
    ap.add_argument("--write-results", action="store_true",
                    help="append the tables to bench/RESULTS.md")
    ap.add_argument("--json", metavar="FILE", help="also write the medians as JSON")
    args = ap.parse_args(argv)
    if args.smoke:
        vars(args).update(SMOKE)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    names = [n.strip() for n in args.systems.split(",") if n.strip()]
    unknown = [n for n in names if n not in systems.PACKAGES]
    if unknown:
        sys.exit(f"unknown systems: {', '.join(unknown)}")
    wanted = set(args.scenarios.split(","))
    configs = [cfg for name in names for cfg in systems.configs(name)]
    versions = {n: systems.version(n) for n in names}
    command = "python -m bench " + " ".join(argv if argv is not None else sys.argv[1:])
    out = [report.preamble(command.strip(), versions),
           f"Redis-based peers: {redisdb.persistence()} (db 5, flushed before and after)."]
    print(out[0], "\n" + out[1], flush=True)
    medians: dict[str, dict[str, float]] = {}
    for scenario in SCENARIOS:
        if scenario.key not in wanted:
            continue
        rows = []
        for cfg in configs:
            try:
                fig = scenario.measure(cfg, args.tasks, args.runs, args.seconds)
                err = ""
            except Exception as exc:  # a peer failing must not hide the others' figures
                traceback.print_exc()
                fig, err = None, f"{type(exc).__name__}: {str(exc)[:80]}"
            if fig is None and not err:
                continue  # the system has no such operation
            rows.append((cfg, fig, err))
            medians.setdefault(scenario.key, {})[cfg.name] = fig.median if fig else 0.0
        text = report.table(scenario, rows, {"tasks": args.tasks, "seconds": args.seconds})
        out.append(text)
        print("\n" + text, flush=True)
    if args.write_results:
        report.append_results("\n\n".join(out))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(medians, f, indent=1)
    return 0
