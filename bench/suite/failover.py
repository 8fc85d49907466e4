"""DTask failover: the leader is SIGKILLed under a steady stream of submissions.

One client submits one by one at a steady rate (client timeout 30 s, so its own
retries carry it across the election). After one second of load a thread SIGKILLs the
leader. Recovery is the time from the kill to the first acknowledgement of a submission
that was called after the kill (an upper bound by at most one submission interval);
the load then continues for another second. Lost tasks are the acknowledged ids the new
leader does not know: every acknowledged id is checked with a linearizable `status`.
No worker runs, so every task must still be there, pending.
"""

from __future__ import annotations

import shutil
import signal
import tempfile
import threading
import time

from dtask.broker.localcluster import SchedulerCluster
from dtask.client import Client, TaskNotFound

BEFORE, AFTER = 1.0, 1.0  # seconds of load before the kill and after recovery


def _one_run(rate: float) -> dict:
    root = tempfile.mkdtemp(prefix="dtask-bench-failover-")
    cluster = SchedulerCluster(root, size=3)
    try:
        cluster.start_all()
        leader = cluster.wait_leader()
        acked: list[str] = []
        kill_at: list[float] = []
        recovered_at: list[float] = []

        def killer() -> None:
            time.sleep(BEFORE)
            kill_at.append(time.monotonic())
            cluster.kill(leader, signal.SIGKILL)

        with Client(cluster.endpoints, timeout=30) as c:
            c.submit("shell", {"argv": ["true"]}, queue="bench-failover")  # leader found
            thread = threading.Thread(target=killer)
            interval, nxt = 1.0 / rate, time.monotonic()
            thread.start()
            while not recovered_at or time.monotonic() < recovered_at[0] + AFTER:
                time.sleep(max(0.0, nxt - time.monotonic()))
                nxt = max(nxt + interval, time.monotonic() - interval)  # no catch-up burst
                called = time.monotonic()
                acked.append(c.submit("shell", {"argv": ["true"]}, queue="bench-failover"))
                if kill_at and called > kill_at[0] and not recovered_at:
                    recovered_at.append(time.monotonic())
            thread.join()
            lost = 0
            for task_id in acked:
                try:
                    c.status(task_id)
                except TaskNotFound:
                    lost += 1
        return {"recovery_s": recovered_at[0] - kill_at[0], "lost": lost, "acked": len(acked)}
    finally:
        cluster.stop_all()
        shutil.rmtree(root, ignore_errors=True)


def runs(n: int, rate: float) -> list[dict]:
    return [_one_run(rate) for _ in range(n)]
