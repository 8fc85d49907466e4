"""`dtaskctl cron ...` and `dtask db migrate` end to end: the real entry points as
subprocesses against a live cluster of 3 scheduler processes and one worker (started
once for the module). Semantics of the jobs themselves: docs/cron.md and
test_cron_cluster.py; this file checks what a user sees."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest

from dtask import protocol as p
from dtask.broker.localcluster import SchedulerCluster

from .test_ctl import CONFLICT, NOT_FOUND, OK, USAGE, assert_one_error_line, ctl, out

pytestmark = pytest.mark.slow

_DTASK_SCRIPT = Path(sys.executable).with_name("dtask")
DTASK = [str(_DTASK_SCRIPT)] if _DTASK_SCRIPT.exists() else [sys.executable, "-m", "dtask"]

TRUE = '{"cmd": "true"}'
TICK_ID = re.compile(r"^(?P<job>[^@]+)@(?P<tick>\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)Z$")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = SchedulerCluster(str(tmp_path_factory.mktemp("ctl-cron")), size=3)
    c.start_all()
    try:
        c.wait_leader()
        c.start_worker("w1", 2)
        yield c
    finally:
        c.stop_all()


def ok_json(r: subprocess.CompletedProcess) -> dict:
    assert r.returncode == OK, r.stderr.decode()
    return json.loads(r.stdout)


def jobs(cluster: SchedulerCluster) -> dict[str, dict]:
    return {j["name"]: j for j in ok_json(ctl(cluster, "cron", "list", "--json"))["jobs"]}


def job_tasks(cluster: SchedulerCluster, name: str) -> set[str]:
    """Ids of the live tasks a cron job created, as `dtaskctl list --json` shows them."""
    listed = ok_json(ctl(cluster, "list", "--limit", "10000", "--json"))["tasks"]
    return {t["id"] for t in listed if t["cron_job"] == name}


def wait_for_tasks(cluster: SchedulerCluster, name: str, more_than: set[str], count: int,
                   timeout: float = 10) -> set[str]:
    """Poll until the job has created `count` tasks beyond `more_than`; returns all."""
    deadline = time.monotonic() + timeout
    while True:
        seen = job_tasks(cluster, name)
        if len(seen - more_than) >= count:
            return seen
        assert time.monotonic() < deadline, (name, seen)
        time.sleep(0.3)


def tick_of(task_id: str) -> float:
    """The UTC instant (epoch seconds) a scheduled tick's task id names."""
    m = TICK_ID.match(task_id)
    assert m, task_id
    return datetime.fromisoformat(m["tick"]).replace(tzinfo=UTC).timestamp()


# -- happy paths ---------------------------------------------------------------------


def test_add_prints_the_job_for_people(cluster):
    r = ctl(cluster, "cron", "add", "ctl-nightly", "30 2 * * *", "shell", TRUE,
            "--tz", "Asia/Kolkata")
    assert r.returncode == OK, r.stderr
    lines = out(r).splitlines()
    assert lines[0] == "created ctl-nightly"
    fields = {line.split("  ")[0]: line for line in lines[1:]}
    assert "30 2 * * *  (Asia/Kolkata)" in fields["schedule"]
    assert fields["state"].split() == ["state", "active"]
    # 02:30 in Kolkata (+05:30) is 21:00 UTC the day before: both are shown.
    assert re.search(r"T02:30:00\+05:30  \(\S+T21:00:00\+00:00\)", fields["next fire"])
    assert "misfire=once overlap=skip" in fields["policies"]  # the defaults
    assert fields["fired / skipped"].split()[-3:] == ["0", "/", "0"]


def test_add_json_carries_every_option(cluster):
    args = ["cron", "add", "ctl-opts", "0 12 * * * 30", "shell", "--payload-file", "-",
            "--tz", "Europe/Berlin", "--misfire", "all", "--overlap", "queue_one",
            "--grace", "30s", "--catchup-window", "1h", "--max-catchup", "5", "--paused",
            "--priority", "7", "--timeout", "1m30s", "--retries", "2", "--queue", "q1",
            "--label", "gpu", "--json"]
    job = ok_json(ctl(cluster, *args, stdin=TRUE.encode()))
    assert job["outcome"] == "created"
    assert (job["name"], job["expr"], job["tz"]) == ("ctl-opts", "0 12 * * * 30",
                                                     "Europe/Berlin")
    assert (job["misfire"], job["overlap"]) == ("all", "queue_one")
    assert (job["grace_s"], job["catchup_window_s"], job["max_catchup"]) == (30, 3600, 5)
    assert job["paused"] is True and job["state"] == "paused"
    assert not job["next_fire_us"] and "next_fire_utc" not in job  # paused: never fires
    assert (job["fired"], job["skipped"]) == (0, 0)
    task = job["task"]
    assert (task["type"], task["priority"], task["timeout"]) == ("shell", 7, 90)
    assert (task["queue"], task["labels"], task["retry"]["max_retries"]) == ("q1", ["gpu"], 2)
    assert task["payload"] == json.loads(TRUE)  # decoded, as in `status --json`

    # The same definition again is not a conflict: a retry must be safe.
    again = ok_json(ctl(cluster, *args, stdin=TRUE.encode()))
    assert again["outcome"] == "unchanged" and again["version"] == job["version"]
    # --replace redefines it.
    r = ctl(cluster, "cron", "add", "ctl-opts", "@hourly", "shell", TRUE, "--replace")
    assert r.returncode == OK and out(r).startswith("updated ctl-opts\n"), r.stderr
    replaced = jobs(cluster)["ctl-opts"]
    assert (replaced["expr"], replaced["tz"], replaced["state"]) == ("@hourly", "UTC", "active")
    assert replaced["version"] == job["version"] + 1


def test_list_shows_next_fire_local_and_utc(cluster):
    r = ctl(cluster, "cron", "add", "ctl-list", "0 9 * * *", "shell", TRUE,
            "--tz", "Asia/Kolkata")
    assert r.returncode == OK, r.stderr
    human = out(ctl(cluster, "cron", "list"))
    header, *rows = human.splitlines()
    for column in ("NAME", "SCHEDULE", "ZONE", "STATE", "NEXT (LOCAL)", "NEXT (UTC)", "LAST",
                   "FIRED/SKIPPED"):
        assert column in header
    row = next(line for line in rows if line.startswith("ctl-list "))
    assert "Asia/Kolkata" in row and "active" in row
    assert re.search(r"T09:00:00\+05:30 +\S+T03:30:00\+00:00 +- +0/0$", row), row

    job = jobs(cluster)["ctl-list"]
    assert job["state"] == "active" and (job["fired"], job["skipped"]) == (0, 0)
    assert job["next_fire_local"].endswith("T09:00:00+05:30")
    assert job["next_fire_utc"].endswith("T03:30:00+00:00")
    utc = datetime.fromisoformat(job["next_fire_utc"])
    assert utc == datetime.fromisoformat(job["next_fire_local"])  # the same instant
    assert utc.timestamp() * 1e6 == job["next_fire_us"]
    assert 0 < utc.timestamp() - time.time() <= 86400


def test_seconds_job_fires_pauses_and_resumes(cluster):
    name = "ctl-every-second"
    r = ctl(cluster, "cron", "add", name, "* * * * * *", "shell", TRUE)
    assert r.returncode == OK, r.stderr
    fired = wait_for_tasks(cluster, name, set(), 2)
    for task_id in fired:  # one task per tick, named after the job and the tick (UTC)
        assert time.time() - 30 < tick_of(task_id) <= time.time()
        assert TICK_ID.match(task_id)["job"] == name
    assert jobs(cluster)[name]["fired"] >= 2

    paused = ok_json(ctl(cluster, "cron", "pause", name, "--json"))
    assert paused["state"] == "paused" and paused["paused"] is True
    assert jobs(cluster)[name]["state"] == "paused"
    before = job_tasks(cluster, name)  # after the pause applied: nothing more may come
    time.sleep(2.5)
    assert job_tasks(cluster, name) == before

    start_resume = time.time()
    r = ctl(cluster, "cron", "resume", name)
    assert r.returncode == OK and out(r) == f"resumed {name}\n", r.stderr
    assert jobs(cluster)[name]["state"] == "active"
    after = wait_for_tasks(cluster, name, before, 1)
    # Without --catch-up the ticks of the paused interval never run.
    assert all(tick_of(t) > start_resume - 0.001 for t in after - before), after - before
    assert ctl(cluster, "cron", "delete", name).returncode == OK


def test_trigger_prints_a_task_of_the_job(cluster):
    name = "ctl-trigger"
    ok_json(ctl(cluster, "cron", "add", name, "@yearly", "shell", '{"cmd": "echo manual"}',
                "--paused", "--json"))
    r = ctl(cluster, "cron", "trigger", name)  # paused or not: an operator asked for it
    assert r.returncode == OK, r.stderr
    task_id = out(r).strip()
    assert re.fullmatch(rf"{name}@manual\.\w+", task_id), task_id
    task = ok_json(ctl(cluster, "status", task_id, "--json"))
    assert task["id"] == task_id and task["cron_job"] == name and task["type"] == "shell"
    done = ok_json(ctl(cluster, "wait", task_id, "--timeout", "20", "--json"))
    assert done["status"] == p.COMPLETED
    assert ctl(cluster, "logs", task_id).stdout == b"manual\n"

    doc = ok_json(ctl(cluster, "cron", "trigger", name, "--json"))
    assert doc["name"] == name and doc["task_id"] != task_id  # every trigger is a new run
    assert jobs(cluster)[name]["state"] == "paused"  # its schedule is untouched


def test_delete_removes_the_job_but_not_its_tasks(cluster):
    name = "ctl-delete"
    assert ctl(cluster, "cron", "add", name, "@daily", "shell", TRUE).returncode == OK
    task_id = out(ctl(cluster, "cron", "trigger", name)).strip()
    r = ctl(cluster, "cron", "delete", name)
    assert r.returncode == OK and out(r) == f"deleted {name}\n", r.stderr
    assert name not in jobs(cluster)
    assert ok_json(ctl(cluster, "status", task_id, "--json"))["cron_job"] == name
    line = assert_one_error_line(ctl(cluster, "cron", "delete", name), NOT_FOUND)
    assert name in line
    # --json of delete, on a job defined again under the same name.
    assert ctl(cluster, "cron", "add", name, "@daily", "shell", TRUE).returncode == OK
    assert ok_json(ctl(cluster, "cron", "delete", name, "--json")) == {"name": name,
                                                                      "deleted": True}


# -- errors: one line, a documented exit code, never a traceback --------------------------


@pytest.mark.parametrize(("args", "says"), [
    (["61 * * * *", "shell"], "minute must be 0-59, not '61'"),
    (["* * * * * * *", "shell"], "expected 5 fields"),
    (["0 0 30 2 *", "shell"], "it never fires"),
    (["@reboot", "shell"], "'@reboot' is not supported"),
    (["* * * * *", "shell", "--tz", "Mars/Olympus"], "unknown time zone 'Mars/Olympus'"),
    (["* * * * *", "shell", "--misfire", "sometimes"], "'sometimes' is not one of"),
    (["* * * * *", "shell", "--overlap", "never"], "'never' is not one of"),
    (["* * * * *", "shell", "{cmd: nope"], "not valid JSON"),
])
def test_bad_definitions_are_usage_errors(cluster, args, says):
    line = assert_one_error_line(ctl(cluster, "cron", "add", "ctl-bad", *args), USAGE)
    assert says in line
    assert "ctl-bad" not in jobs(cluster)


def test_bad_job_name_is_a_usage_error(cluster):
    r = ctl(cluster, "cron", "add", "bad name!", "@daily", "shell", TRUE)
    assert "invalid characters" in assert_one_error_line(r, USAGE)


def test_duplicate_name_without_replace_is_a_conflict(cluster):
    name = "ctl-dup"
    assert ctl(cluster, "cron", "add", name, "@daily", "shell", TRUE).returncode == OK
    r = ctl(cluster, "cron", "add", name, "@hourly", "shell", TRUE)
    assert f"a cron job named '{name}' already exists" in assert_one_error_line(r, CONFLICT)
    assert jobs(cluster)[name]["expr"] == "@daily"  # untouched


@pytest.mark.parametrize("command", ["pause", "resume", "delete", "trigger"])
def test_unknown_job_is_not_found(cluster, command):
    line = assert_one_error_line(ctl(cluster, "cron", command, "no-such-job"), NOT_FOUND)
    assert "no cron job 'no-such-job'" in line


# -- dtask db migrate ---------------------------------------------------------------------


def dtask(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*DTASK, *args], capture_output=True, timeout=60)


def test_db_migrate_is_idempotent(tmp_path):
    dsn = str(tmp_path / "history.sqlite3")
    first = dtask("db", "migrate", "--db", dsn)
    assert first.returncode == OK, first.stderr
    assert re.fullmatch(r"schema version \d+\n", out(first))
    again = dtask("db", "migrate", "--db", dsn)
    assert again.returncode == OK and out(again) == out(first), again.stderr
    assert Path(dsn).stat().st_size > 0


def test_db_migrate_with_an_unreachable_database_is_one_line():
    r = dtask("db", "migrate", "--db", "postgresql://nobody@127.0.0.1:1/x")
    err = r.stderr.decode()
    assert r.returncode != OK and out(r) == ""
    assert "Traceback" not in err
    assert len(err.splitlines()) == 1 and err.startswith("dtask: "), err
