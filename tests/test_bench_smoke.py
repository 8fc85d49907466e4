"""`python -m bench --smoke` runs end to end: every scenario gives a figure > 0 for DTask
and for every peer installed here (with its Redis / PostgreSQL reachable); peers that are
not installed are simply not requested. DTask's failover loses no acknowledged task."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench.suite import systems

REPO = Path(__file__).resolve().parents[1]
# scenario -> the systems that have that operation (see bench/suite/peer_*.py).
EXPECTED = {
    "e2e": set(systems.TASK_SYSTEMS),
    "submit": set(systems.TASK_SYSTEMS),
    "bulk": {"dtask", "rq", "procrastinate"},
    "raft": {"dtask", "pysyncobj"},
    "e2e_w2": set(systems.TASK_SYSTEMS),
    "submit_c8": set(systems.TASK_SYSTEMS),
    "latency": set(systems.TASK_SYSTEMS),
}
HEADERS = ["### End-to-end throughput", "2 worker processes", "### Submit throughput, one by one",
           "8 concurrent client processes", "### Submit throughput, bulk",
           "### Raft layer alone", "### Dispatch latency", "### Failover",
           "| system | configuration | guarantees |"]


@pytest.mark.slow
def test_smoke_every_system_every_scenario(tmp_path: Path) -> None:
    names = [n for n in systems.PACKAGES if systems.usable(n)]
    out_json = tmp_path / "smoke.json"
    proc = subprocess.run([sys.executable, "-m", "bench", "--smoke", "--systems",
                           ",".join(names), "--json", str(out_json)],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for header in HEADERS:
        assert header in proc.stdout, proc.stdout
    medians = json.loads(out_json.read_text())
    for scenario, having in EXPECTED.items():
        for name in set(names) & having:
            rows = {k: v for k, v in medians[scenario].items() if k.split()[0] == name}
            assert rows, f"{scenario}: no row for {name}\n{proc.stdout}"
            figures = [x for v in rows.values() for x in (v.values() if isinstance(v, dict)
                                                          else [v])]
            failures = [line for line in proc.stdout.splitlines() if "failed:" in line]
            assert all(x > 0 for x in figures), f"{scenario}/{name}: {rows}\n{failures}"
    failover = medians["failover"]["dtask"]
    assert failover["recovery_s"] > 0 and failover["acked"] > 0, failover
    assert failover["lost"] == 0, failover
    assert "failed:" not in proc.stdout
