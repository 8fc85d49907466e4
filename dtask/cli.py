"""`dtask`: run DTask's daemons (and, for now, poke the replicated key-value store)."""

from __future__ import annotations

import json
import logging
import sys
import time

import click
import zmq

from . import devcluster
from .config import ENV_PREFIX, config_option, data_dir, endpoint

DEFAULT_BASE_PORT = 7301


def _setup_logging(level: str) -> None:
    logging.basicConfig(stream=sys.stderr, level=level.upper(),
                        format="ts=%(asctime)s level=%(levelname)s logger=%(name)s %(message)s")


def _parse_peers(text: str) -> dict[int, str]:
    peers: dict[int, str] = {}
    for part in filter(None, text.split(",")):
        node_id, sep, addr = part.partition("=")
        if not sep or not node_id.strip().isdigit() or not addr.startswith("tcp://"):
            raise click.BadParameter(f"{part!r} is not ID=tcp://HOST:PORT", param_hint="--peers")
        peers[int(node_id)] = addr.strip()
    if not peers:
        raise click.BadParameter("at least one peer is needed", param_hint="--peers")
    return peers


def _serve(what: str, serve) -> None:
    """Run a daemon; what an operator can cause ends in one line and exit code 2."""
    from .raft.log import CorruptLogError

    try:
        serve()
    except CorruptLogError as exc:
        click.echo(f"dtask: refusing to start: {exc}", err=True)
        sys.exit(2)
    except (OSError, zmq.ZMQError) as exc:
        click.echo(f"dtask: cannot start {what}: {exc}", err=True)
        sys.exit(2)


def entry() -> None:
    """The `dtask` command: click's usage errors become one line, like every other error."""
    try:
        main(standalone_mode=False)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        click.echo(f"dtask: {exc.format_message()}", err=True)
        sys.exit(exc.exit_code)
    except click.Abort:
        sys.exit(130)


@click.group(context_settings={"auto_envvar_prefix": ENV_PREFIX})
def main() -> None:
    """DTask: a distributed task scheduler.

    Daemon options come from flags, then DTASK_<COMMAND>_<OPTION> environment
    variables, then a TOML file given with --config (see dtask/config.py)."""


@main.command()
@click.option("--data-dir", default="./.dtask", show_default=True, help="Where nodes keep state.")
@click.option("--base-port", default=DEFAULT_BASE_PORT, show_default=True,
              help="First client port; Raft ports start 100 above.")
@click.option("--log-level", default="info", show_default=True)
def dev(data_dir: str, base_port: int, log_level: str) -> None:
    """Run a local 3-node cluster on 127.0.0.1 until Ctrl-C."""
    _setup_logging(log_level)
    sys.exit(devcluster.run(data_dir, base_port))


@main.command("raft-node")
@click.option("--id", "node_id", type=click.IntRange(min=1), required=True,
              help="This node's id (a positive integer).")
@click.option("--data-dir", required=True, type=click.Path(file_okay=False))
@click.option("--raft", "raft_bind", required=True, help="Raft address to bind, tcp://HOST:PORT.")
@click.option("--client", "client_bind", required=True, help="Client address to bind.")
@click.option("--peers", required=True, help="Founding members: ID=tcp://HOST:PORT,...")
@click.option("--join", is_flag=True, help="Start empty and wait to be added by the leader.")
@click.option("--snapshot-every", default=50_000, show_default=True)
@click.option("--keep-entries", default=5_000, show_default=True)
@click.option("--log-level", default="info", show_default=True)
def raft_node(node_id: int, data_dir: str, raft_bind: str, client_bind: str, peers: str,
              join: bool, snapshot_every: int, keep_entries: int, log_level: str) -> None:
    """Run one replicated key-value node (the Raft layer on its own)."""
    from .raft.kvserver import run
    from .raft.node import NodeConfig

    _setup_logging(log_level)
    cfg = NodeConfig(node_id, data_dir, raft_bind, _parse_peers(peers), join=join,
                     snapshot_every=snapshot_every, keep_entries=keep_entries)
    _serve(f"node {node_id}", lambda: run(cfg, client_bind))


def _parse_scheduler_peers(text: str) -> dict[int, tuple[str, str]]:
    peers: dict[int, tuple[str, str]] = {}
    for part in filter(None, text.split(",")):
        node_id, sep, addrs = part.partition("=")
        raft, at, client = addrs.partition("@")
        if not (sep and at and node_id.strip().isdigit() and raft.startswith("tcp://")
                and client.startswith("tcp://")):
            raise click.BadParameter(f"{part!r} is not ID=tcp://HOST:RAFTPORT@tcp://HOST:PORT",
                                     param_hint="--peers")
        peers[int(node_id)] = (raft.strip(), client.strip())
    if not peers:
        raise click.BadParameter("at least one peer is needed", param_hint="--peers")
    return peers


@main.command()
@config_option
@click.option("--id", "node_id", type=click.IntRange(min=1), required=True,
              envvar="DTASK_SCHEDULER_ID")
@click.option("--data-dir", required=True, type=click.Path(file_okay=False), callback=data_dir)
@click.option("--raft", "raft_bind", required=True, callback=endpoint,
              envvar="DTASK_SCHEDULER_RAFT", help="Raft address to bind, tcp://HOST:PORT.")
@click.option("--client", "client_bind", required=True, callback=endpoint,
              envvar="DTASK_SCHEDULER_CLIENT",
              help="Client and worker address to bind, tcp://HOST:PORT.")
@click.option("--peers", required=True,
              help="Founding schedulers: ID=tcp://HOST:RAFTPORT@tcp://HOST:CLIENTPORT,...")
@click.option("--join", is_flag=True, help="Start empty and wait to be added.")
@click.option("--worker-timeout", default=5.0, show_default=True,
              help="Seconds without a heartbeat before a worker's tasks are retried.")
@click.option("--db", default="", metavar="DSN",
              help="Where task history is persisted: postgresql://... or a SQLite file "
              "(default: DATA_DIR/dtask.sqlite3). Every scheduler of a cluster must name "
              "the same database.")
@click.option("--retention", type=click.FloatRange(min=0), default=7 * 86400.0,
              show_default=True,
              help="Seconds finished tasks stay in the live state (then only in the database).")
@click.option("--log-level", default="info", show_default=True)
def scheduler(node_id: int, data_dir: str, raft_bind: str, client_bind: str, peers: str,
              join: bool, worker_timeout: float, db: str, retention: float,
              log_level: str) -> None:
    """Run one scheduler daemon (a Raft member that dispatches when it leads)."""
    from .broker.server import SchedulerConfig, run

    _setup_logging(log_level)
    cfg = SchedulerConfig(node_id, data_dir, raft_bind, client_bind,
                          _parse_scheduler_peers(peers), join=join,
                          worker_timeout=worker_timeout, db=db, retention=retention)
    _check_db(cfg.db_dsn())
    _serve(f"scheduler {node_id}", lambda: run(cfg))


def _check_db(dsn: str) -> None:
    """Migrate at start, so a bad DSN or an old schema is one clear line, not a log
    of retries. A database that is merely down does not stop the scheduler: the
    persister catches up when it returns."""
    from .persist.store import StoreUnavailable, open_store

    try:
        open_store(dsn).close()
    except ValueError as exc:  # not a database we can use: refuse to start
        raise click.BadParameter(str(exc), param_hint="--db") from None
    except StoreUnavailable as exc:
        logging.getLogger("dtask.cli").warning("event=persist_unavailable_at_start error=%s",
                                               exc)


@main.group()
def db() -> None:
    """The history database (PostgreSQL or SQLite)."""


@db.command()
@click.option("--db", "dsn", required=True, envvar="DTASK_SCHEDULER_DB", metavar="DSN",
              help="postgresql://... or a SQLite file.")
def migrate(dsn: str) -> None:
    """Create or upgrade the schema (schedulers also do this when they start)."""
    from .persist.store import StoreUnavailable, open_store

    try:
        store = open_store(dsn)
    except (StoreUnavailable, ValueError) as exc:
        raise click.ClickException(str(exc)) from None
    try:
        click.echo(f"schema version {store.migrate()}")
    finally:
        store.close()


def _csv(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


@main.command()
@config_option
@click.option("--endpoints", envvar="DTASK_ENDPOINTS",
              default=",".join(f"tcp://127.0.0.1:{DEFAULT_BASE_PORT + i}" for i in range(3)),
              show_default=True, help="Scheduler client endpoints, comma-separated.")
@click.option("--id", "worker_id", envvar="DTASK_WORKER_ID", default=None,
              help="Worker id.  [default: HOSTNAME-PID]")
@click.option("-c", "--concurrency", type=click.IntRange(min=1), default=None,
              help="Task slots.  [default: number of CPUs]")
@click.option("--queues", default="default", show_default=True,
              help="Queues to take tasks from, comma-separated.")
@click.option("--labels", default="", help="Labels for routing, comma-separated.")
@click.option("--executors", default="shell,python,http", show_default=True,
              help="Executors to offer: shell, python, http, docker.")
@click.option("--import", "imports", multiple=True, metavar="MODULE",
              help="Import MODULE in the Python pool (its @dtask.task functions); repeatable.")
@click.option("--heartbeat-interval", type=click.FloatRange(min=0.01), default=1.0,
              show_default=True, help="Seconds; the leader's `registered` reply may override.")
@click.option("--drain-timeout", type=click.FloatRange(min=0), default=30.0,
              show_default=True, help="On SIGTERM, seconds running tasks get to finish.")
@click.option("--kill-grace", type=click.FloatRange(min=0), default=5.0, show_default=True,
              help="Seconds between SIGTERM and SIGKILL on timeout or cancel.")
@click.option("--ack-timeout", type=click.FloatRange(min=0), default=5.0, show_default=True,
              help="On SIGTERM, seconds to wait for the leader to acknowledge results.")
@click.option("--max-log-bytes", type=click.IntRange(min=0), default=1 << 20,
              show_default=True, help="Output kept per attempt.")
@click.option("--max-result-bytes", type=click.IntRange(min=0), default=64 << 10,
              show_default=True, help="Largest packed return value.")
@click.option("--python-pool-size", type=click.IntRange(min=0), default=0,
              help="Warm Python processes.  [default: concurrency]")
@click.option("--prefetch", type=click.IntRange(min=0), default=None,
              help="At most this many tasks taken beyond the slots, started as slots "
              "free up (the worker asks for what its slots finish in 20 ms, none while a "
              "task runs longer than 50 ms); 0 turns prefetch off.  [default: 64]")
@click.option("--log-level", default="info", show_default=True)
def worker(endpoints: str, worker_id: str | None, concurrency: int | None, queues: str,
           labels: str, executors: str, imports: tuple[str, ...], heartbeat_interval: float,
           drain_timeout: float, kill_grace: float, ack_timeout: float, max_log_bytes: int,
           max_result_bytes: int, python_pool_size: int, prefetch: int | None,
           log_level: str) -> None:
    """Run a worker: execute the tasks the scheduler leader pushes to it."""
    from .worker import WorkerConfig, run_worker

    _setup_logging(log_level)
    optional = {"worker_id": worker_id, "concurrency": concurrency, "prefetch": prefetch}
    try:
        cfg = WorkerConfig(
            endpoints=_csv(endpoints), queues=_csv(queues), labels=_csv(labels),
            executors=_csv(executors), imports=list(imports),
            heartbeat_interval=heartbeat_interval, drain_timeout=drain_timeout,
            kill_grace=kill_grace, ack_timeout=ack_timeout, max_log_bytes=max_log_bytes,
            max_result_bytes=max_result_bytes, python_pool_size=python_pool_size,
            **{k: v for k, v in optional.items() if v is not None})
    except ValueError as exc:
        click.echo(f"dtask: {exc}", err=True)
        sys.exit(2)
    sys.exit(run_worker(cfg))


@main.command()
@click.option("--endpoints", envvar="DTASK_KV_ENDPOINTS",
              default=",".join(f"tcp://127.0.0.1:{DEFAULT_BASE_PORT + i}" for i in range(3)),
              show_default=True, help="Client endpoints in node-id order.")
@click.option("--timeout", default=2.0, show_default=True)
@click.argument("op", type=click.Choice(["put", "append", "get", "status"]))
@click.argument("key", required=False, default="")
@click.argument("value", required=False)
def kv(endpoints: str, timeout: float, op: str, key: str, value: str | None) -> None:
    """Talk to a replicated key-value cluster of `dtask raft-node`s (the Raft layer alone)."""
    from .raft.kvclient import KVClient, KVError

    client = KVClient([e.strip() for e in endpoints.split(",") if e.strip()], timeout)
    try:
        if op == "status":
            out = []
            for i in range(len(client.endpoints)):
                try:
                    out.append(client.call("status", node=i + 1, deadline=time.monotonic()))
                except (KVError, TimeoutError) as exc:
                    out.append({"endpoint": client.endpoints[i], "error": str(exc)})
            click.echo(json.dumps(out, indent=2, default=str))
        elif op in ("put", "append") and value is None:
            raise click.UsageError(f"{op} needs KEY and VALUE")
        else:
            result = client.call(op, key, value)
            click.echo("OK" if result is None and op != "get" else json.dumps(result))
    except (KVError, TimeoutError) as exc:
        click.echo(f"dtask: {exc}", err=True)
        sys.exit(1)
    finally:
        client.close()
