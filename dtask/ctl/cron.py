"""Cron commands: `dtaskctl cron add | list | pause | resume | delete | trigger`."""

from __future__ import annotations

from typing import IO, Any

import click

from . import output as out
from .app import OK, common, main, settings
from .params import Duration, read_payload


@main.group()
def cron() -> None:
    """Recurring jobs: each tick of a schedule submits one task (docs/cron.md)."""


def _show(job: dict) -> None:
    pairs = [("name", job.get("name")), ("schedule", f"{job.get('expr')}  ({job.get('tz')})"),
             ("state", job.get("state"))]
    if job.get("next_fire_us"):
        pairs.append(("next fire", f"{job.get('next_fire_local')}  "
                      f"({job.get('next_fire_utc')})"))
    if job.get("last_fire_us"):
        pairs.append(("last fire", f"{out.when(job['last_fire_us'])}  "
                      f"{job.get('last_task_id')}  {job.get('last_outcome') or 'running'}"))
    pairs += [("policies", f"misfire={job.get('misfire')} overlap={job.get('overlap')}"),
              ("fired / skipped", f"{job.get('fired')} / {job.get('skipped')}")]
    click.echo(out.fields(pairs))


def _job_json(job: dict) -> dict:
    """A job as JSON: its task's payload shown as in `status --json` (decoded JSON,
    or payload_base64)."""
    job = dict(job)
    if isinstance(job.get("task"), dict):
        job["task"] = {k: v for k, v in out.task_json({**job["task"], "attempts": []}).items()
                       if k != "attempts"}
    return job


def _done(job: dict, verb: str) -> int:
    if settings().json:
        out.dump(_job_json(job))
    else:
        click.echo(f"{verb} {job.get('name')}")
    return OK


@cron.command("add")
@click.argument("name")
@click.argument("expr")
@click.argument("task_type", metavar="TYPE")
@click.argument("payload", required=False)
@click.option("--payload-file", type=click.File("rb"), metavar="FILE",
              help="Read the payload from FILE ('-' for stdin).")
@click.option("--tz", default="UTC", show_default=True, help="IANA time zone of EXPR.")
@click.option("--misfire", type=click.Choice(["skip", "once", "all"]), default="once",
              show_default=True, help="Ticks missed while no leader could fire them.")
@click.option("--overlap", type=click.Choice(["allow", "skip", "queue_one", "replace"]),
              default="skip", show_default=True, help="When the previous run is still going.")
@click.option("--grace", type=Duration(86400.0), default=10.0, show_default=True,
              help="How late a tick may fire and still count as on time.")
@click.option("--catchup-window", type=Duration(366 * 86400.0), default=0.0,
              help="Missed ticks older than this never run (default: no limit).")
@click.option("--max-catchup", type=click.IntRange(1, 100_000), default=100,
              show_default=True, help="With --misfire all: at most this many missed ticks.")
@click.option("--paused", is_flag=True, help="Define it paused.")
@click.option("--replace", is_flag=True, help="Redefine the job if it exists.")
@click.option("--priority", type=click.IntRange(-1_000_000, 1_000_000))
@click.option("--timeout", "task_timeout", type=Duration(7 * 86400.0),
              help="Each run's timeout.")
@click.option("--retries", type=click.IntRange(0, 1000), help="Retries of each run.")
@click.option("--queue", help="Only workers serving this queue run it.")
@click.option("--label", "labels", multiple=True, metavar="LABEL",
              help="A label workers must have (repeatable).")
@common
def cron_add(name: str, expr: str, task_type: str, payload: str | None,
             payload_file: IO[bytes] | None, tz: str, misfire: str, overlap: str,
             grace: float, catchup_window: float, max_catchup: int, paused: bool,
             replace: bool, priority: int | None, task_timeout: float | None,
             retries: int | None, queue: str | None, labels: tuple[str, ...]) -> int:
    """Define cron job NAME: on every tick of EXPR, submit a TYPE task with PAYLOAD.

    \b
    dtaskctl cron add nightly '0 2 * * *' shell '{"cmd": "backup.sh"}' --tz Europe/Berlin
    dtaskctl cron add heartbeat '*/10 * * * * *' shell '{"cmd": "true"}'   # seconds last
    """
    body = read_payload(payload, payload_file, False)
    task: dict[str, Any] = {k: v for k, v in (
        ("priority", priority), ("timeout", task_timeout), ("max_retries", retries),
        ("queue", queue), ("labels", list(labels) or None)) if v is not None}
    job = settings().client().cron_define(
        name, expr, task_type, body, replace=replace, task=task, tz=tz, misfire=misfire,
        overlap=overlap, grace=grace, catchup_window=catchup_window,
        max_catchup=max_catchup, paused=paused)
    if settings().json:
        out.dump(_job_json(job))
        return OK
    click.echo(f"{job.get('outcome')} {name}")
    _show(job)
    return OK


@cron.command("list")
@click.option("--stale", is_flag=True, help="Let any scheduler answer from its replica.")
@common
def cron_list(stale: bool) -> int:
    """Every job: schedule, next fire (local and UTC), last fire and outcome, state."""
    jobs = settings().client().cron_list(stale=stale)
    if settings().json:
        out.dump({"jobs": [_job_json(j) for j in jobs]})
        return OK
    if not jobs:
        click.echo("no cron jobs", err=True)
        return OK
    rows = []
    for j in jobs:
        last = (f"{out.ago(j['last_fire_us'])} {j.get('last_outcome') or 'running'}"
                if j.get("last_fire_us") else "-")
        rows.append([j["name"], j["expr"], j["tz"], j["state"],
                     j.get("next_fire_local", "-"), j.get("next_fire_utc", "-"), last,
                     f"{j['fired']}/{j['skipped']}"])
    click.echo(out.table(["NAME", "SCHEDULE", "ZONE", "STATE", "NEXT (LOCAL)", "NEXT (UTC)",
                          "LAST", "FIRED/SKIPPED"], rows))
    return OK


@cron.command("pause")
@click.argument("name")
@common
def cron_pause(name: str) -> int:
    """Stop firing NAME until it is resumed."""
    return _done(settings().client().cron_pause(name), "paused")


@cron.command("resume")
@click.argument("name")
@click.option("--catch-up", is_flag=True,
              help="Treat the paused interval's ticks as missed (the misfire policy "
              "decides); without it they never run.")
@common
def cron_resume(name: str, catch_up: bool) -> int:
    """Fire NAME again."""
    return _done(settings().client().cron_resume(name, catch_up=catch_up), "resumed")


@cron.command("delete")
@click.argument("name")
@common
def cron_delete(name: str) -> int:
    """Delete NAME (tasks it created stay)."""
    settings().client().cron_delete(name)
    return _done({"name": name, "deleted": True}, "deleted")


@cron.command("trigger")
@click.argument("name")
@common
def cron_trigger(name: str) -> int:
    """Run NAME once now, outside its schedule; prints the task id."""
    task_id = settings().client().cron_trigger(name)
    if settings().json:
        out.dump({"name": name, "task_id": task_id})
    else:
        click.echo(task_id)
    return OK
