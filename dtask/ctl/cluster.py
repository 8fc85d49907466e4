"""Cluster commands: `cluster status` and `workers`.

These ask every endpoint for its own view (a `cluster` message each, in parallel,
with a short per-node deadline) instead of going through Client, which follows the
leader and would hide the other nodes and treat a dead one as an error.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import click
import msgpack
import zmq

from .. import protocol as p
from . import output as out
from .app import ERROR, OK, UNAVAILABLE, USAGE, CtlError, common, main, settings
from .params import Duration


@dataclass(slots=True)
class NodeView:
    endpoint: str  # as configured (what the user can act on)
    reply: dict | None = None  # the cluster_info reply, None if it did not answer
    error: str = ""
    node: dict = field(default_factory=dict)

    @property
    def role(self) -> str:
        return str(self.node.get("role", "")) if self.reply else "unreachable"

    def as_json(self) -> dict:
        n = self.node
        return {"endpoint": self.endpoint, "reachable": self.reply is not None,
                "id": n.get("id"), "role": n.get("role"), "term": n.get("term"),
                "commit_index": n.get("commit"), "applied_index": n.get("applied"),
                "pid": n.get("pid"),
                "leader": (self.reply or {}).get("leader") or None,
                "advertised_endpoint": n.get("endpoint"),
                "tasks": n.get("tasks"), "persist": n.get("persist"),
                "error": self.error or None}


def query_nodes(endpoints: list[str], timeout: float) -> list[NodeView]:
    """Every endpoint's `cluster` reply, asked in parallel; waits at most `timeout`."""
    views = [NodeView(ep) for ep in endpoints]
    ctx = zmq.Context()
    try:
        poller = zmq.Poller()
        socks: dict[zmq.Socket, int] = {}
        for i, ep in enumerate(endpoints):
            s = ctx.socket(zmq.DEALER)
            s.setsockopt(zmq.LINGER, 0)
            s.setsockopt(zmq.MAXMSGSIZE, p.MAX_FRAME)
            try:
                s.connect(ep)
            except zmq.ZMQError as exc:
                raise CtlError(f"bad endpoint {ep!r}: {exc}", USAGE) from None
            s.send(p.pack({"v": p.VERSION, "t": p.CLUSTER, "id": i + 1}))
            poller.register(s, zmq.POLLIN)
            socks[s] = i
        deadline = time.monotonic() + timeout
        waiting = set(range(len(endpoints)))
        while waiting:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            for s, _ in poller.poll(int(left * 1000) + 1):
                i = socks[s]
                _read_reply(views[i], s.recv())
                waiting.discard(i)
                poller.unregister(s)
        for i in waiting:
            views[i].error = f"no answer within {timeout:g}s"
    finally:
        ctx.destroy(linger=0)
    return views


def _read_reply(view: NodeView, frame: bytes) -> None:
    try:
        msg = msgpack.unpackb(frame, raw=False, strict_map_key=False)
        kind = msg.get("t")
    except Exception:
        view.error = "answered with something that is not a DTask reply"
        return
    if kind == p.CLUSTER_INFO and isinstance(msg.get("node"), dict):
        view.reply, view.node = msg, msg["node"]
    elif kind == p.ERROR:
        view.error = f"{msg.get('code')}: {msg.get('message')}"
    else:
        view.error = f"unexpected reply {kind!r}"


def leader_of(views: list[NodeView]) -> NodeView | None:
    """The answering node that says it leads (the highest term, should two say so)."""
    leaders = [v for v in views if v.role == "leader"]
    return max(leaders, key=lambda v: v.node.get("term", 0)) if leaders else None


def _ask_all(node_timeout: float) -> list[NodeView]:
    st = settings()
    views = query_nodes(st.endpoint_list(), min(node_timeout, st.timeout))
    if not any(v.reply for v in views):
        reasons = "; ".join(f"{v.endpoint}: {v.error}" for v in views)
        raise CtlError(f"cluster unavailable: no scheduler answered ({reasons}); is a "
                       "cluster running there? start one with 'dtask dev', or set "
                       "--endpoints or DTASK_ENDPOINTS", UNAVAILABLE)
    return views


_NODE_TIMEOUT = click.option("--node-timeout", type=Duration(), default=1.0,
                             show_default=True, help="How long to wait for each node.")


@main.group()
def cluster() -> None:
    """Inspect the scheduler cluster."""


@cluster.command("status")
@_NODE_TIMEOUT
@common
def cluster_status(node_timeout: float) -> int:
    """Each scheduler's own view: id, endpoint, role, term, commit/applied index, pid."""
    views = _ask_all(node_timeout)
    leader = leader_of(views)
    # The leader's endpoint: from the leader itself, else the newest view of any node.
    believed = leader.endpoint if leader else next(
        (v.reply.get("leader") for v in sorted(views, key=lambda v: -v.node.get("term", 0))
         if v.reply and v.reply.get("leader")), "")
    if settings().json:
        out.dump({"nodes": [v.as_json() for v in views], "leader": believed})
        return OK
    rows = []
    for v in views:
        n = v.node
        if v.reply is None:
            rows.append(["-", v.endpoint, "unreachable", "-", "-", "-", "-", "-"])
        else:
            rows.append([n.get("id", "-"), v.endpoint, v.role, n.get("term", "-"),
                         n.get("commit", "-"), n.get("applied", "-"), n.get("pid", "-"),
                         _db_lag(n.get("persist"))])
    click.echo(out.table(["ID", "ENDPOINT", "ROLE", "TERM", "COMMIT", "APPLIED", "PID",
                          "DB LAG"], rows))
    for v in views:
        if v.reply is None:
            click.echo(f"unreachable: {v.endpoint} ({v.error})")
    if leader:
        click.echo(f"leader: node {leader.node.get('id')} at {leader.endpoint}")
    elif believed:
        click.echo(f"leader: {believed} (not among the nodes that answered)")
    else:
        click.echo("leader: none (an election may be in progress)")
    return OK


def _db_lag(persist: object) -> str:
    """How far the history database is behind: rows not yet written, and their age."""
    if not isinstance(persist, dict):
        return "-"
    rows, lag = persist.get("pending_rows", 0), persist.get("lag_s", 0.0)
    text = "0" if not rows else f"{rows} rows, {out.span(lag)}"
    state = persist.get("state")
    return text if state in (None, "ok") else f"{text} (db {state})"


@main.command()
@_NODE_TIMEOUT
@common
def workers(node_timeout: float) -> int:
    """List the workers registered with the leader: host, pid, slots, running tasks."""
    views = _ask_all(node_timeout)
    leader = leader_of(views)
    if leader is None:
        raise CtlError("cluster unavailable: none of the schedulers that answered is the "
                       "leader, and only the leader knows the workers; try again shortly",
                       UNAVAILABLE)
    listed = leader.reply.get("workers") if leader.reply else None
    if not isinstance(listed, list):
        raise CtlError("listing workers is not supported by this scheduler yet (its "
                       "cluster reply has no workers field)", ERROR)
    if settings().json:
        out.dump({"workers": listed, "leader": leader.endpoint})
        return OK
    if not listed:
        click.echo("no workers registered", err=True)
        return OK
    rows = []
    for w in listed:
        running = list(w.get("running") or [])
        seen = w.get("last_seen_s")
        rows.append([
            w.get("id"), w.get("host") or "-", w.get("pid") or "-", w.get("concurrency", "-"),
            w.get("free_slots", w.get("credits", "-")),  # renamed in the scheduler
            f"{len(running)}" + (f" ({out.shorten(', '.join(map(str, running)), 40)})"
                                 if running else ""),
            ",".join(w.get("queues") or []) or "-",
            f"{out.span(seen)} ago" if isinstance(seen, (int, float)) else "-",
            "" if w.get("registered", True) else "not registered"])
    click.echo(out.table(["ID", "HOST", "PID", "SLOTS", "FREE", "RUNNING", "QUEUES",
                          "SEEN", ""], rows))
    return OK


@main.command()
@click.argument("worker_id", metavar="WORKER_ID")
@common
def drain(worker_id: str) -> int:
    """Drain a worker: it takes no new tasks, finishes (or, at its drain timeout, hands
    back) the running ones, reports them, deregisters and exits."""
    settings().client().drain_worker(worker_id)
    if settings().json:
        out.dump({"worker_id": worker_id, "draining": True})
    else:
        click.echo(f"draining {worker_id}")
    return OK


@cluster.command("transfer-leader")
@click.argument("node_id", type=int, required=False, default=0)
@common
def transfer_leader(node_id: int) -> int:
    """Hand leadership to NODE_ID (default: the most caught-up scheduler), e.g. before
    maintenance on the leader's machine."""
    target = settings().client().transfer_leader(node_id)
    if settings().json:
        out.dump({"to": target})
    else:
        click.echo(f"leadership is moving to node {target}")
    return OK


@cluster.command("add-node")
@click.argument("node_id", type=click.IntRange(min=1))
@click.option("--raft", required=True, metavar="ENDPOINT", help="Its Raft endpoint.")
@click.option("--client", "client_ep", required=True, metavar="ENDPOINT",
              help="Its client endpoint.")
@click.option("--learner", is_flag=True, help="Leave it a learner (no vote).")
@click.option("--catch-up-timeout", type=Duration(), default=120.0, show_default=True,
              help="How long to wait for it to catch up before promoting it.")
@common
def add_node(node_id: int, raft: str, client_ep: str, learner: bool,
             catch_up_timeout: float) -> int:
    """Add scheduler NODE_ID (started with `dtask scheduler --join`): first as a learner
    that receives the log, then, once it has caught up, as a voter."""
    client = settings().client()
    conf = client.member_change("add_learner", node_id, raft, client_ep)
    if not learner:
        deadline = time.monotonic() + catch_up_timeout
        with out.Spinner(f"node {node_id} is catching up"):
            while not _caught_up(node_id):
                if time.monotonic() > deadline:
                    raise CtlError(f"node {node_id} did not catch up within "
                                   f"{catch_up_timeout:g}s; it stays a learner (promote it "
                                   "later by running this command again)", ERROR)
                time.sleep(0.2)
        conf = client.member_change("promote", node_id)
    if settings().json:
        out.dump(conf)
    else:
        click.echo(f"node {node_id} is a {'learner' if learner else 'voter'}; voters "
                   f"{conf['voters']}, learners {conf['learners'] or '-'}")
    return OK


def _caught_up(node_id: int) -> bool:
    """The leader says the node's log matches up to its commit index."""
    leader = leader_of(query_nodes(settings().endpoint_list(), 1.0))
    if leader is None:
        return False
    progress = leader.node.get("progress", {}).get(str(node_id))
    return bool(progress) and progress.get("match", 0) >= leader.node.get("commit", 1)


@cluster.command("remove-node")
@click.argument("node_id", type=click.IntRange(min=1))
@common
def remove_node(node_id: int) -> int:
    """Remove scheduler NODE_ID from the cluster (stop its process afterwards). Never
    reuse its id; a replacement gets a new one."""
    conf = settings().client().member_change("remove", node_id)
    if settings().json:
        out.dump(conf)
    else:
        click.echo(f"node {node_id} removed; voters {conf['voters']}")
    return OK
