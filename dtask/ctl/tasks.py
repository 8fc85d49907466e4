"""Task commands: submit, status, wait, list, cancel, logs."""

from __future__ import annotations

import sys
import time
import uuid
from typing import IO, Any

import click

from .. import protocol as p
from ..client import Client, Conflict, Unavailable
from . import output as out
from .app import (
    CONFLICT,
    OK,
    TASK_FAILED,
    TIMED_OUT,
    CtlError,
    common,
    describe,
    main,
    settings,
)
from .params import Duration, Moment, read_payload

# -- shared pieces ------------------------------------------------------------------


def summary(task: dict) -> str:
    """One line on where a task stands: 'COMPLETED after 1 attempt, ran 0.8s'."""
    status = task.get("status", "?")
    attempts = task.get("attempts") or []
    last = attempts[-1] if attempts else {}
    n = len(attempts)
    count = f"{n} attempt{'s' if n != 1 else ''}"
    if status == p.COMPLETED:
        return f"{status} after {count}, ran {_ran(last)}"
    if status == p.FAILED:
        return f"{status} after {count}: {_why(last)}"
    if status == p.CANCELLED:
        return f"{status} after {count}" if n else status
    if status == p.RUNNING:
        extra = ", cancel requested" if task.get("cancel_requested") else ""
        return f"{status} (attempt {n} on {last.get('worker', '?')}, started " \
               f"{out.ago(last.get('started_us', 0))}{extra})"
    if status == p.SCHEDULED:
        return f"{status} (due {out.ago(task.get('run_at_us', 0))})"
    if status == p.RETRYING:
        return f"{status} (attempt {n + 1} {out.ago(task.get('run_at_us', 0))}; " \
               f"last: {_why(last)})"
    return status


def _ran(attempt: dict) -> str:
    start, end = attempt.get("started_us", 0), attempt.get("finished_us", 0)
    return out.span((end - start) / 1e6) if start and end else "-"


def _why(attempt: dict) -> str:
    if attempt.get("error"):
        return out.shorten(attempt["error"])
    if attempt.get("exit_code") is not None:
        return f"exit code {attempt['exit_code']}"
    return attempt.get("outcome") or "unknown"


def exit_code_for(task: dict) -> int:
    return OK if task.get("status") == p.COMPLETED else TASK_FAILED


def wait_for(client: Client, task_id: str, timeout: float | None) -> dict:
    """The task once it is terminal; CtlError(TIMED_OUT) after `timeout` seconds.

    On a terminal the wait is cut into 1 s long polls so the spinner can show the
    task's progress; piped, it is one long poll after another (fewer round trips).
    """
    end = None if timeout is None else time.monotonic() + timeout
    with out.Spinner(f"waiting for {task_id}") as spin:
        step = 1.0 if spin.active else 30.0
        while True:
            left = step if end is None else max(0.0, min(step, end - time.monotonic()))
            try:
                return client.wait(task_id, timeout=left)
            except TimeoutError:
                pass
            task = client.status(task_id) if spin.active or end is not None else None
            if task is not None and task.get("status") in p.TERMINAL:
                return task
            if end is not None and time.monotonic() >= end:
                raise CtlError(f"timed out after {timeout:g}s: task {task_id} is "
                               f"{summary(task or {})}", TIMED_OUT)
            if task is not None:
                spin.update(f"waiting for {task_id}: {summary(task)}")


def report_final(task: dict) -> int:
    """Print a finished task (JSON or one line) and return the exit code it means."""
    if settings().json:
        out.dump(out.task_json(task))
    else:
        click.echo(summary(task))
    return exit_code_for(task)


# -- submit ---------------------------------------------------------------------------


def _labels(_: click.Context, __: click.Parameter, values: tuple[str, ...]) -> list[str]:
    return [x.strip() for v in values for x in v.split(",") if x.strip()]


@main.command()
@click.argument("task_type", metavar="TYPE")
@click.argument("payload", required=False)
@click.option("--payload-file", type=click.File("rb"), metavar="FILE",
              help="Read the payload from FILE ('-' = stdin).")
@click.option("--binary", is_flag=True,
              help="Send the payload as raw bytes (application/octet-stream), not JSON.")
@click.option("--content-type", metavar="TYPE", help="Content type of a --binary payload.")
@click.option("--delay", type=Duration(), help="Run no earlier than this from now: 30s, 5m, "
              "1h30m or seconds.")
@click.option("--at", "at_", type=Moment(), help="Run no earlier than this time: ISO 8601 "
              "(naive = local time) or epoch seconds.")
@click.option("--priority", type=click.IntRange(-1_000_000, 1_000_000),
              help="Higher runs first (default 0).")
@click.option("--timeout", "task_timeout", type=Duration(7 * 86400.0),
              help="Per-attempt run time limit (default none).")
@click.option("--retries", type=click.IntRange(0, 1000),
              help="Retries after a failed attempt (default 3).")
@click.option("--backoff-initial", type=Duration(7 * 86400.0),
              help="Delay before the first retry (default 1s).")
@click.option("--backoff-multiplier", type=click.FloatRange(1, 100),
              help="Each further retry waits this much longer (default 2).")
@click.option("--backoff-max", type=Duration(30 * 86400.0),
              help="Longest delay between retries (default 5m).")
@click.option("--backoff-jitter", type=click.FloatRange(0, 1),
              help="Vary each delay by +- this fraction (default 0.1).")
@click.option("--queue", help="Only workers serving this queue run it (default 'default').")
@click.option("--label", "labels", multiple=True, callback=_labels, metavar="LABEL",
              help="A label the worker must have (repeatable, or comma-separated).")
@click.option("--name", help="A name for people.")
@click.option("--idempotency-key", metavar="KEY",
              help="Submitting again with the same key returns the same task.")
@click.option("--id", "task_id", metavar="ID", help="Choose the task id yourself.")
@click.option("--wait", "wait_", is_flag=True,
              help="Wait until the task finishes; exit 1 if it FAILED or was CANCELLED.")
@click.option("--wait-timeout", type=Duration(), help="With --wait: give up after this "
              "long (exit 2).")
@common
def submit(task_type: str, payload: str | None, payload_file: IO[bytes] | None, binary: bool,
           content_type: str | None, delay: float | None, at_: float | None,
           priority: int | None, task_timeout: float | None, retries: int | None,
           backoff_initial: float | None, backoff_multiplier: float | None,
           backoff_max: float | None, backoff_jitter: float | None, queue: str | None,
           labels: list[str], name: str | None, idempotency_key: str | None,
           task_id: str | None, wait_: bool, wait_timeout: float | None) -> int:
    """Submit a task of TYPE with a JSON PAYLOAD; print its id.

    \b
    dtaskctl submit shell '{"cmd": "echo hi"}' --wait
    dtaskctl submit shell --payload-file job.json --delay 5m --retries 5
    """
    if delay is not None and at_ is not None:
        raise click.UsageError("give --delay or --at, not both")
    if content_type and not binary:
        raise click.UsageError("--content-type needs --binary (JSON payloads are "
                               "application/json)")
    if wait_timeout is not None and not wait_:
        raise click.UsageError("--wait-timeout needs --wait")
    body = read_payload(payload, payload_file, binary)
    backoff = {k: v for k, v in (("initial", backoff_initial),
                                 ("multiplier", backoff_multiplier),
                                 ("max_delay", backoff_max), ("jitter", backoff_jitter))
               if v is not None}
    options: dict[str, Any] = {
        "name": name, "priority": priority, "delay": delay, "at": at_,
        "timeout": task_timeout, "max_retries": retries, "backoff": backoff or None,
        "queue": queue, "labels": labels or None, "idempotency_key": idempotency_key,
        "task_id": task_id, "content_type": content_type}
    # Our own key rather than the client's hidden one, so that when the outcome is
    # unknown (Unavailable) we can tell the user how to retry without a duplicate.
    options["idempotency_key"] = key = idempotency_key or f"dtaskctl-{uuid.uuid4().hex}"
    client = settings().client()
    try:
        new_id = client.submit(task_type, body, **{k: v for k, v in options.items()
                                                   if v is not None})
    except Unavailable as exc:
        message, code = describe(exc, settings().endpoints)
        raise CtlError(f"{message}; the task may exist: to retry without a duplicate, "
                       f"run the same command with --idempotency-key {key}", code) from None
    if not wait_:
        if settings().json:
            out.dump({"id": new_id})
        else:
            click.echo(new_id)
        return OK
    if not settings().json:
        click.echo(new_id)
        sys.stdout.flush()  # a script reading our output gets the id before the wait
    try:
        task = wait_for(client, new_id, wait_timeout)
    except CtlError:
        if settings().json:  # a script must still learn the id of the task it created
            out.dump({"id": new_id, "task": None})
        raise
    if settings().json:
        out.dump({"id": new_id, "task": out.task_json(task)})
        return exit_code_for(task)
    click.echo(summary(task))
    return exit_code_for(task)


# -- status, wait, cancel -----------------------------------------------------------------


def _payload_text(task: dict) -> str:
    raw = task.get("payload") or b""
    ctype = task.get("content_type", "")
    if ctype == p.JSON or ctype.endswith("+json"):
        try:
            return out.shorten(raw.decode(), 200)
        except UnicodeDecodeError:
            pass
    return f"<{len(raw)} bytes, {ctype}>"


def _show_task(task: dict) -> None:
    retries = task.get("max_retries")
    rows: list[tuple[str, object]] = [
        ("id", task.get("id")), ("name", task.get("name") or "-"),
        ("type", task.get("type")), ("status", summary(task)),
        ("priority", task.get("priority", 0)), ("queue", task.get("queue")),
        ("labels", ", ".join(task.get("labels") or []) or "-"),
        ("created", out.when(task.get("created_us", 0))),
    ]
    if task.get("run_at_us"):
        rows.append(("run at", out.when(task["run_at_us"])))
    if task.get("finished_us"):
        rows.append(("finished", out.when(task["finished_us"])))
    rows += [("timeout", out.span(task["timeout"]) if task.get("timeout") else "none"),
             ("max retries", retries if retries is not None else "-"),
             ("payload", _payload_text(task))]
    if task.get("idempotency_key"):
        rows.append(("idempotency key", task["idempotency_key"]))
    if task.get("cron_job"):
        rows.append(("cron job", task["cron_job"]))
    click.echo(out.fields(rows))
    attempts = task.get("attempts") or []
    if attempts:
        click.echo()
        click.echo(out.table(
            ["ATTEMPT", "WORKER", "STARTED", "RAN", "OUTCOME", "EXIT", "LOG", "ERROR"],
            [[a.get("attempt"), a.get("worker") or "-", out.ago(a.get("started_us", 0)),
              _ran(a), a.get("outcome") or "running",
              "-" if a.get("exit_code") is None else a["exit_code"],
              f"{a.get('log_bytes', 0)}B", out.shorten(a.get("error") or "", 50)]
             for a in attempts]))


@main.command()
@click.argument("task_id", metavar="ID")
@click.option("--stale", is_flag=True, help="Let any scheduler answer from its own replica "
              "(works without a leader, may be behind).")
@common
def status(task_id: str, stale: bool) -> int:
    """Show a task: its status, options and attempts."""
    task = settings().client().status(task_id, stale=stale)
    if settings().json:
        out.dump(out.task_json(task))
    else:
        _show_task(task)
    return OK


@main.command()
@click.argument("task_id", metavar="ID")
@click.option("--timeout", "wait_timeout", type=Duration(),
              help="Give up after this long (exit 2). Default: wait forever.")
@common
def wait(task_id: str, wait_timeout: float | None) -> int:
    """Wait until a task finishes: exit 0 COMPLETED, 1 FAILED/CANCELLED, 2 timed out."""
    return report_final(wait_for(settings().client(), task_id, wait_timeout))


@main.command()
@click.argument("task_id", metavar="ID")
@common
def cancel(task_id: str) -> int:
    """Cancel a task that has not finished (a running one is killed)."""
    try:
        task = settings().client().cancel(task_id)
    except Conflict as exc:
        raise CtlError(f"cannot cancel: {exc.message} (only unfinished tasks can be "
                       "cancelled)", CONFLICT) from None
    if settings().json:
        out.dump(out.task_json(task))
    elif task.get("status") == p.CANCELLED:
        click.echo(f"cancelled {task_id}")
    else:
        click.echo(f"cancel requested: {task_id} is {task.get('status')}; its worker is "
                   "stopping it")
    return OK


# -- list -----------------------------------------------------------------------------------


def _states(_: click.Context, param: click.Parameter, values: tuple[str, ...]) -> list[str]:
    states = [x.strip().upper() for v in values for x in v.split(",") if x.strip()]
    for s in states:
        if s not in p.STATES:
            raise click.BadParameter(f"{s!r} is not a task status; one of "
                                     f"{', '.join(p.STATES)}", param=param)
    return states


@main.command("list")
@click.option("--status", "states", multiple=True, callback=_states, metavar="STATUS",
              help="Only tasks in this status (repeatable, or comma-separated).")
@click.option("--type", "task_type", metavar="TYPE", help="Only tasks of this type.")
@click.option("--since", type=Moment(relative=True), help="Only tasks created since: 10m "
              "(ago), an ISO 8601 time or epoch seconds.")
@click.option("--limit", type=click.IntRange(min=1), default=100, show_default=True,
              help="At most this many tasks.")
@common
def list_(states: list[str], task_type: str | None, since: float | None, limit: int) -> int:
    """List live tasks, oldest first (finished ones until their retention ends)."""
    tasks = settings().client().list(status=states or None, type=task_type,
                                     since=max(since, 0.0) if since is not None else None,
                                     limit=limit)
    if settings().json:
        out.dump({"tasks": [out.task_json(t) for t in tasks]})
        return OK
    if not tasks:
        click.echo("no matching tasks", err=True)
        return OK
    click.echo(out.table(
        ["ID", "TYPE", "NAME", "STATUS", "PRI", "ATTEMPTS", "CREATED", "FINISHED"],
        [[t.get("id"), t.get("type"), out.shorten(t.get("name") or "-", 30), t.get("status"),
          t.get("priority", 0), len(t.get("attempts") or []), out.ago(t.get("created_us", 0)),
          out.ago(t.get("finished_us", 0))] for t in tasks]))
    if len(tasks) == limit:
        click.echo(f"(the first {limit}; raise --limit for more)", err=True)
    return OK


# -- logs -------------------------------------------------------------------------------------

POLL = 0.2  # seconds between polls of a running attempt's output (worker flushes every 0.1)


def log_chunk(client: Client, task_id: str, attempt: int, offset: int) -> dict:
    """One `logs` reply: {attempt, data, offset, done}.

    Client.logs() reads to the end and hides the attempt and the offset, which
    following needs, so this speaks the message itself through the client (same
    leader-following and retries). Move to a public Client method once there is one.
    """
    return client._call(p.LOGS, {"task_id": task_id, "attempt": attempt, "offset": offset},
                        p.LOG_CHUNKS, dict)


def _follow(client: Client, task_id: str, attempt: int, follow: bool, as_json: bool) -> int:
    """Write an attempt's output from the start; with `follow`, until the attempt ends.

    Our offset is advanced by what we received, not taken from the reply: we asked
    for bytes from `offset`, so that is where they start.
    """
    offset = 0
    done = last_line_done = None  # JSON: the stream must end with the final `done`
    stdout = sys.stdout.buffer
    tty_out = out._isatty(sys.stdout)
    label = f"following {task_id}"
    with out.Spinner(label if not attempt else f"{label} attempt {attempt}",
                     enabled=follow) as spin:
        while True:
            reply = log_chunk(client, task_id, attempt, offset)
            data = bytes(reply.get("data") or b"")
            done = bool(reply.get("done", True))
            if not attempt and reply.get("attempt"):
                attempt = reply["attempt"]  # pin it: a retry must not splice two outputs
                spin.update(f"{label} attempt {attempt}")
            if data:
                spin.pause()
                if as_json:
                    out.dump_line({"task_id": task_id, "attempt": attempt, "offset": offset,
                                   "data": data.decode(errors="replace"), "done": done})
                    last_line_done = done
                else:
                    stdout.write(data)
                    stdout.flush()
                # Don't draw the spinner over a half-written line on the same terminal.
                spin.hidden = tty_out and not data.endswith(b"\n")
                offset += len(data)
            if done:
                break
            if not data:
                if not follow:
                    break  # caught up with a running attempt; that is all there is yet
                time.sleep(POLL)
    if as_json and last_line_done != done:
        out.dump_line({"task_id": task_id, "attempt": attempt, "offset": offset, "data": "",
                       "done": done})
    return OK


@main.command()
@click.argument("task_id", metavar="ID")
@click.option("--attempt", type=click.IntRange(min=0), default=0,
              help="Attempt number (1, 2, ...); default the latest.")
@click.option("-f", "--follow", is_flag=True,
              help="Keep printing a running attempt's output until it ends.")
@common
def logs(task_id: str, attempt: int, follow: bool) -> int:
    """Print a task attempt's captured output (stdout and stderr) as raw bytes."""
    return _follow(settings().client(), task_id, attempt, follow, settings().json)
