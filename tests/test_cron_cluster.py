"""Cron with real processes: exactly once per tick across leader SIGKILLs, misfire
policies across a full-cluster stop, and the overlap policy that needs a worker."""

from __future__ import annotations

import calendar
import time

import pytest

from dtask import protocol as p
from dtask.broker.localcluster import SchedulerCluster
from dtask.client import Client, Conflict

pytestmark = pytest.mark.slow

EVERY_SECOND = "* * * * * *"  # six fields: seconds last


@pytest.fixture
def cluster(tmp_path):
    c = SchedulerCluster(str(tmp_path), size=3, worker_timeout=1.5)
    c.start_all()
    c.wait_leader()
    yield c
    c.stop_all()


def fired_ticks(client: Client, job: str) -> list[int]:
    """The tick (epoch second) of every task the job created, in order."""
    ticks = []
    for t in client.list(limit=None):
        if t.get("cron_job") == job and "@manual." not in t["id"]:
            stamp = t["id"].split("@", 1)[1]
            ticks.append(calendar.timegm(time.strptime(stamp, "%Y-%m-%dT%H:%M:%SZ")))
    return sorted(ticks)


def define(client: Client, name: str, expr: str = EVERY_SECOND, **options) -> dict:
    return client.cron_define(name, expr, "shell", {"cmd": "true"}, **options)


def test_every_tick_fires_exactly_once_across_leader_kills(cluster):
    with Client(cluster.endpoints, timeout=20) as client:
        define(client, "tick", overlap="allow")
        time.sleep(1.5)
        for _ in range(3):
            leader = cluster.wait_leader()
            cluster.kill(leader)  # SIGKILL, right before, during or after some firing
            cluster.wait_leader(exclude=leader)
            cluster.start(leader)
            time.sleep(1.2)
        time.sleep(1.5)
        ticks = fired_ticks(client, "tick")
        assert len(ticks) == len(set(ticks))  # no tick twice
        assert ticks == list(range(ticks[0], ticks[-1] + 1))  # and no gap
        assert len(ticks) >= 6
        job = next(j for j in client.cron_list() if j["name"] == "tick")
        assert job["fired"] == len(ticks) and job["skipped"] == 0


def test_misfire_policies_after_a_full_cluster_stop(cluster):
    with Client(cluster.endpoints, timeout=20) as client:
        for policy in ("skip", "once", "all"):
            define(client, policy, misfire=policy, grace=1, overlap="allow")
        time.sleep(2.5)
        for m in cluster.members.values():
            m.proc.kill()  # everything down at once
        for m in cluster.members.values():
            m.proc.wait()
        time.sleep(4)
        cluster.start_all()
        cluster.wait_leader()
        time.sleep(2.5)
        gaps, jobs = {}, {j["name"]: j for j in client.cron_list()}
        for policy in ("skip", "once", "all"):
            ticks = fired_ticks(client, policy)
            assert len(ticks) == len(set(ticks))
            gaps[policy] = (ticks[-1] - ticks[0] + 1) - len(ticks)
            assert jobs[policy]["skipped"] == gaps[policy], policy
        assert gaps["all"] == 0  # every missed tick ran
        assert gaps["once"] >= 2  # one run stood for the missed ticks...
        assert gaps["skip"] == gaps["once"] + 1  # ...which `skip` did not run


def test_overlap_replace_cancels_the_running_run(cluster):
    cluster.start_worker("w1", 4)
    with Client(cluster.endpoints, timeout=20) as client:
        client.cron_define("slow", "* * * * * */2", "shell", {"cmd": "sleep 30"},
                           overlap="replace")
        deadline = time.monotonic() + 30
        while len(fired_ticks(client, "slow")) < 3:
            assert time.monotonic() < deadline
            time.sleep(0.2)
        client.cron_pause("slow")
        tasks = sorted((t for t in client.list(limit=None) if t.get("cron_job") == "slow"),
                       key=lambda t: t["seq"])
        deadline = time.monotonic() + 15
        for t in tasks[:-1]:  # each run was cancelled (killed) when the next one fired
            while (status := client.status(t["id"]))["status"] != p.CANCELLED:
                assert time.monotonic() < deadline, status
                time.sleep(0.1)
            assert status["attempts"][-1]["outcome"] == p.KILLED
        assert client.status(tasks[-1]["id"])["status"] in (p.PENDING, p.RUNNING)


def test_definition_errors_and_commands(cluster):
    with Client(cluster.endpoints, timeout=20) as client:
        with pytest.raises(ValueError, match="minute must be 0-59"):
            define(client, "bad", "61 * * * *")
        with pytest.raises(ValueError, match="unknown time zone"):
            define(client, "bad", "@daily", tz="Mars/Olympus")
        assert client.cron_list() == []  # nothing created
        job = define(client, "daily", "30 2 * * *", tz="Europe/Berlin")
        assert job["outcome"] == "created" and job["state"] == "active"
        assert job["next_fire_local"].endswith("+01:00") and "T02:30:00" in job["next_fire_local"]
        with pytest.raises(Conflict, match="already exists"):
            define(client, "daily", "0 3 * * *")
        assert define(client, "daily", "0 3 * * *", replace=True)["outcome"] == "updated"
        assert client.cron_pause("daily")["state"] == "paused"
        assert client.cron_resume("daily")["state"] == "active"
        task_id = client.cron_trigger("daily")
        assert client.status(task_id)["cron_job"] == "daily"
        client.cron_delete("daily")
        assert client.cron_list() == []
        assert client.status(task_id)["cron_job"] == "daily"  # its task stays
