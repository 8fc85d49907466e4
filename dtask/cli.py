"""`dtask`: run DTask's daemons (and, for now, poke the replicated key-value store)."""

from __future__ import annotations

import json
import logging
import sys
import time

import click
import zmq

from . import devcluster

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


@click.group()
def main() -> None:
    """DTask: a distributed task scheduler."""


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
    from .raft.log import CorruptLogError
    from .raft.node import NodeConfig

    _setup_logging(log_level)
    cfg = NodeConfig(node_id, data_dir, raft_bind, _parse_peers(peers), join=join,
                     snapshot_every=snapshot_every, keep_entries=keep_entries)
    try:
        run(cfg, client_bind)
    except CorruptLogError as exc:
        click.echo(f"dtask: refusing to start: {exc}", err=True)
        sys.exit(2)
    except (OSError, zmq.ZMQError) as exc:
        click.echo(f"dtask: cannot start node {node_id}: {exc}", err=True)
        sys.exit(2)


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
@click.option("--id", "node_id", type=click.IntRange(min=1), required=True)
@click.option("--data-dir", required=True, type=click.Path(file_okay=False))
@click.option("--raft", "raft_bind", required=True, help="Raft address to bind.")
@click.option("--client", "client_bind", required=True,
              help="Client and worker address to bind.")
@click.option("--peers", required=True,
              help="Founding schedulers: ID=tcp://HOST:RAFTPORT@tcp://HOST:CLIENTPORT,...")
@click.option("--join", is_flag=True, help="Start empty and wait to be added.")
@click.option("--worker-timeout", default=5.0, show_default=True,
              help="Seconds without a heartbeat before a worker's tasks are retried.")
@click.option("--log-level", default="info", show_default=True)
def scheduler(node_id: int, data_dir: str, raft_bind: str, client_bind: str, peers: str,
              join: bool, worker_timeout: float, log_level: str) -> None:
    """Run one scheduler daemon (a Raft member that dispatches when it leads)."""
    from .broker.server import SchedulerConfig, run
    from .raft.log import CorruptLogError

    _setup_logging(log_level)
    cfg = SchedulerConfig(node_id, data_dir, raft_bind, client_bind,
                          _parse_scheduler_peers(peers), join=join,
                          worker_timeout=worker_timeout)
    try:
        run(cfg)
    except CorruptLogError as exc:
        click.echo(f"dtask: refusing to start: {exc}", err=True)
        sys.exit(2)
    except (OSError, zmq.ZMQError) as exc:
        click.echo(f"dtask: cannot start scheduler {node_id}: {exc}", err=True)
        sys.exit(2)


@main.command()
@click.option("--endpoints", envvar="DTASK_ENDPOINTS",
              default=",".join(f"tcp://127.0.0.1:{DEFAULT_BASE_PORT + i}" for i in range(3)),
              show_default=True, help="Client endpoints in node-id order.")
@click.option("--timeout", default=2.0, show_default=True)
@click.argument("op", type=click.Choice(["put", "append", "get", "status"]))
@click.argument("key", required=False, default="")
@click.argument("value", required=False)
def kv(endpoints: str, timeout: float, op: str, key: str, value: str | None) -> None:
    """Talk to the replicated key-value store of `dtask dev`."""
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
