"""The scheduler daemon: one Raft node, the task state machine, clients and workers.

One `zmq.Poller` loop (DESIGN.md principle 5) serves the Raft transport and one
ROUTER that clients and workers both talk to. Each loop turn:

1. read every inbound frame; requests that change state are batched per kind;
2. the batches become one log entry each (one SUBMIT for every submission of the
   turn, one RESULT for every result...), proposed together and made durable by
   one fsync (group commit in the node driver);
3. when entries apply, the dispatcher resyncs the tasks they changed, matches ready
   tasks to free worker slots, and those leases go through the log too; a task is
   pushed to its worker once its lease is committed.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import msgpack
import zmq

from .. import protocol as p
from ..gcpolicy import GCPolicy
from ..persist.history import HistoryReader
from ..persist.store import StoreUnavailable
from ..persist.writer import Persister
from ..raft.core import NotLeader, ProposalRejected
from ..raft.daemon import NodeDaemon, run_daemon
from ..raft.messages import ConfChangeType
from ..raft.node import NodeConfig, RaftNode
from ..raft.progress import Role
from . import state as sm
from .cronfire import CronDesk
from .dispatch import Dispatcher
from .persistence import PersistFeed
from .workers import WorkerDesk

log = logging.getLogger("dtask.broker.server")


@dataclass(slots=True)
class SchedulerConfig:
    node_id: int
    data_dir: str
    raft_bind: str
    client_bind: str
    peers: dict[int, tuple[str, str]]  # id -> (raft endpoint, client endpoint), founders
    join: bool = False
    heartbeat_interval: float = 1.0  # what workers are told to use
    worker_timeout: float = 5.0  # silent this long: the worker is dead, its tasks retry
    lease_grace: float = 10.0  # a task's lease is its timeout plus this
    retention: float = 7 * 86400.0  # terminal tasks stay in the live state this long
    max_payload: int = p.MAX_PAYLOAD
    snapshot_every: int = 20_000
    keep_entries: int = 2_000
    # Where the persister mirrors tasks (dtask.persist.store.open_store): PostgreSQL
    # for production, a SQLite file by default (shared by the nodes of `dtask dev`).
    db: str = ""

    def db_dsn(self) -> str:
        return self.db or os.path.join(self.data_dir, "dtask.sqlite3")


@dataclass(slots=True)
class Pending:
    """Requests of one loop turn, waiting to become one log entry per kind."""

    submits: list[tuple[bytes, object, list]] = field(default_factory=list)
    cancels: list[tuple[bytes, object, str]] = field(default_factory=list)


class SchedulerServer(NodeDaemon):
    def __init__(self, cfg: SchedulerConfig, ctx: zmq.Context | None = None) -> None:
        self.cfg = cfg
        self.ctx = ctx or zmq.Context.instance()
        self.state = sm.TaskState()
        self.client_endpoints = {i: c for i, (_, c) in cfg.peers.items()}
        node_cfg = NodeConfig(cfg.node_id, cfg.data_dir, cfg.raft_bind,
                              {i: r for i, (r, _) in cfg.peers.items()}, join=cfg.join,
                              snapshot_every=cfg.snapshot_every, keep_entries=cfg.keep_entries)
        sock = self.ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.ROUTER_HANDOVER, 1)  # a reconnecting worker keeps its id
        sock.setsockopt(zmq.MAXMSGSIZE, p.MAX_FRAME)
        sock.setsockopt(zmq.SNDHWM, 100_000)
        sock.setsockopt(zmq.RCVHWM, 100_000)
        sock.bind(cfg.client_bind)
        super().__init__(RaftNode(node_cfg, self.state, self.ctx,
                                  on_role_change=self._on_role), sock)
        self.pending = Pending()
        # SUBMITs proposed and not applied yet, by proposal number: their task wires,
        # so early dispatch can tell a resubmission from a new task (`_flush_pending`).
        self.submitting: dict[int, list[tuple[bytes, object, list]]] = {}
        self._submit_no = 0
        self.dispatcher: Dispatcher | None = None
        self.desk = WorkerDesk(self)
        self.waiters: dict[str, list[tuple[bytes, object, float]]] = {}
        self.counters = {"bad_requests": 0}
        self._next_housekeeping = 0.0
        self._purging = False
        self._id_seq = 0
        self.gc = GCPolicy()
        dsn = cfg.db_dsn()
        self.persister = Persister(dsn)
        self.history = HistoryReader(dsn)
        self.feed = PersistFeed(self, self.persister)
        self.crondesk = CronDesk(self)
        self.persister.start()
        self.history.start()

    def wake_fds(self) -> list[int]:
        return [self.persister.wake.fd, self.history.wake.fd]

    def on_close(self) -> None:
        self.persister.close()
        self.history.close()

    # ------------------------------------------------------------------ loop

    def turn(self) -> None:
        """Propose this turn's batches, let Raft work, then dispatch what became ready."""
        now_us = time.time_ns() // 1000
        self.gc.maybe_freeze(time.monotonic())  # followers hold the whole state too
        if self.node.is_leader and self.dispatcher is not None:
            if self.dispatcher.rebuilding and self.dispatcher.rebuild_step():
                log.info("event=dispatch_start term=%d %s", self.node.raft.term,
                         " ".join(f"{k}={v}" for k, v in self.dispatcher.stats().items()))
            self._flush_pending(now_us)
            self._housekeeping(now_us)
            self.crondesk.fire_due(now_us)
            # Slots freed by results that just arrived get their next task now, before
            # this turn's fsync rather than after it.
            self.desk.dispatch(now_us)
        for _ in range(4):
            self.node.process()
            self._after_apply(now_us)
            # Applying may have made new proposals (leases for newly submitted tasks,
            # expirations): send them now, not a poll timeout later.
            if not self.node.has_proposals():
                break
            if self.node.is_leader:
                self.desk.flush(now_us)
        self.feed.step(now_us, self.persister.wake.fd in self.readable)
        self.history.poll(self.history.wake.fd in self.readable)

    def poll_timeout_ms(self) -> int:
        timeout = self.node.next_timeout_ms()
        if self.dispatcher is not None and self.dispatcher.rebuilding:
            return 0  # keep indexing between polls
        if self.dispatcher is not None:
            for due in (self.dispatcher.next_due_us(), self.crondesk.next_due_us()):
                if due is not None:
                    timeout = min(timeout, max(0, (due - time.time_ns() // 1000) // 1000 + 1))
        return min(timeout, 100)

    def on_requests(self) -> None:
        for _ in range(10_000):
            try:
                frames = self.sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            if len(frames) != 2:
                self.counters["bad_requests"] += 1
                continue  # not a DEALER speaking our framing; nothing to answer
            ident, frame = frames
            try:
                msg = p.unpack(frame)
                self._dispatch_request(ident, msg)
            except p.ProtocolError as exc:
                self.counters["bad_requests"] += 1
                self.send(ident, p.error(_req_id(frame), exc.code, exc.message))
            except Exception as exc:  # a bug must cost one request, not the daemon
                log.exception("event=request_failed")
                self.send(ident, p.error(_req_id(frame), p.INTERNAL,
                                         f"internal error: {exc.__class__.__name__}"))

    def _dispatch_request(self, ident: bytes, msg: dict) -> None:
        t, rid = msg["t"], msg.get("id")
        if t in p.WORKER_TYPES:
            self.desk.handle(ident, msg)
            return
        handler = self._CLIENT_HANDLERS.get(t)
        if handler is None:
            raise p.ProtocolError(p.BAD_REQUEST, f"unknown message type {t!r}")
        handler(self, ident, rid, msg)

    def send(self, ident: bytes, frame: bytes) -> None:
        try:
            self.sock.send_multipart([ident, frame], zmq.NOBLOCK)
        except zmq.Again:
            log.warning("event=reply_dropped reason=peer_queue_full")

    # ------------------------------------------------------------------ leadership

    def leader_endpoint(self) -> str:
        return self.endpoint_of(self.node.leader)

    def endpoint_of(self, node_id: int) -> str:
        return self.client_endpoints.get(node_id) or self.state.endpoints.get(node_id, "")

    def not_leader(self, ident: bytes, rid: object) -> None:
        self.send(ident, p.error(rid, p.NOT_LEADER, "this scheduler is not the leader",
                                 self.leader_endpoint()))

    def require_leader(self, ident: bytes, rid: object) -> bool:
        if self.node.is_leader and not self.stopping_since:
            return True
        self.not_leader(ident, rid)
        return False

    def _on_role(self, role: Role, term: int, leader: int) -> None:
        if role == Role.LEADER:
            self.dispatcher = Dispatcher(self.state, self.cfg.worker_timeout,
                                         self.cfg.lease_grace)
            self.dispatcher.start_rebuild()  # continued a slice per loop turn
            self.feed.on_leader()
            self.crondesk.on_leader()
        else:
            self.feed.on_follower()
            self.crondesk.on_follower()
            self.dispatcher = None
            self._fail_waiters()

    # ------------------------------------------------------------------ client requests

    def _submit(self, ident: bytes, rid: object, msg: dict) -> None:
        if not self.require_leader(ident, rid):
            return
        specs = p.parse_submit(msg, self.cfg.max_payload)
        now_us = time.time_ns() // 1000
        wires = []
        for spec in specs:
            run_at = spec.at_us or (now_us + int(spec.delay * 1e6) if spec.delay else 0)
            task_id = spec.task_id or self._new_task_id()
            wires.append([task_id, spec.name, spec.type, spec.payload, spec.content_type,
                          spec.priority, spec.queue, list(spec.labels), spec.timeout,
                          spec.retry.to_wire(), spec.idempotency_key, run_at])
        self.pending.submits.append((ident, rid, wires))

    def _new_task_id(self) -> str:
        """Unique without coordination: one leader per term, a counter within it.
        (os.urandom per task cost a syscall each: 7 % of the leader's time.)"""
        self._id_seq += 1
        return f"{self.node.raft.term:x}.{self.cfg.node_id}.{self._id_seq:x}"

    def _status(self, ident: bytes, rid: object, msg: dict) -> None:
        task_id = p.task_id_of(msg)

        def answer() -> None:
            task = self.state.get(task_id)
            if task is not None:
                self.send(ident, p.reply(p.TASK, rid, task=task.to_dict()))
            else:  # purged after the retention window: the database has it
                self._from_history(ident, rid, "get_task", (task_id,), found)

        def found(task: dict | None) -> None:
            if task is None:
                self.send(ident, p.error(rid, p.NOT_FOUND, f"no task {task_id}"))
            else:
                self.send(ident, p.reply(p.TASK, rid, task=task))

        self._read(ident, rid, p.get_bool(msg, "stale"), answer)

    def _from_history(self, ident: bytes, rid: object, kind: str, args: tuple,
                      found) -> None:
        """Ask the database (on the history thread); `found(result)` replies."""
        def done(result: object, err: Exception | None) -> None:
            if err is None:
                found(result)
            elif isinstance(err, StoreUnavailable):
                self.send(ident, p.error(rid, p.UNAVAILABLE, f"not in the live state, and "
                                         f"the history database is unavailable: {err}"))
            else:
                log.error("event=history_failed kind=%s error=%r", kind, err)
                self.send(ident, p.error(rid, p.INTERNAL, f"history query failed: {err}"))

        self._ask_history(kind, args, done)

    def _ask_history(self, kind: str, args: tuple, done) -> None:
        try:
            self.history.request(kind, args, done)
        except Exception as exc:  # e.g. too many reads waiting: answer at once
            done(None, exc)

    def _list(self, ident: bytes, rid: object, msg: dict) -> None:
        statuses = p.get_str_list(msg, "status") or p.STATES
        unknown = [s for s in statuses if s not in p.STATES]
        if unknown:
            raise p.ProtocolError(p.BAD_REQUEST, f"unknown status {unknown[0]!r}")
        ttype = p.get_str(msg, "type", "")
        since_us = p.get_int(msg, "since_us", 0, lo=0)
        limit = p.get_int(msg, "limit", 100, lo=1, hi=10_000)
        after = p.get_str(msg, "after", "", max_len=128)

        old_statuses = [s for s in statuses if s in p.TERMINAL]

        def answer() -> None:
            task = self.state.get(after)
            if task is not None or not after:
                page(task.seq if task is not None else 0)
            elif old_statuses:  # the previous page ended on a task purged since
                self._from_history(ident, rid, "get_task", (after,),
                                   lambda t: page(t["seq"] if t else 0))
            else:
                page(0)

        def page(after_seq: int) -> None:
            live = [t.to_dict(with_payload=False)
                    for t in self._select(statuses, ttype, since_us, limit + 1, after_seq)]
            if not old_statuses:
                reply(live, False)
                return
            # Terminal tasks purged from the live state are in the database.
            args = (old_statuses, ttype, since_us, after_seq, self._live_horizon_us(),
                    limit + 1)

            def merge(result: object, err: Exception | None) -> None:
                if err is not None:
                    log.warning("event=history_unavailable error=%s", err)
                    reply(live, True)
                    return
                old = [t for t in result if t["id"] not in self.state.tasks]
                reply(sorted(live + old, key=lambda t: t["seq"]), False)

            self._ask_history("list_purged", args, merge)

        def reply(tasks: list[dict], partial: bool) -> None:
            more = len(tasks) > limit
            tasks = tasks[:limit]
            fields = {"tasks": tasks, "next": tasks[-1]["id"] if more else ""}
            if partial:
                fields["partial"] = True  # the history database did not answer
            self.send(ident, p.reply(p.TASKS, rid, **fields))

        self._read(ident, rid, p.get_bool(msg, "stale"), answer)

    def _select(self, statuses, ttype: str, since_us: int, limit: int,
                after_seq: int) -> list[sm.Task]:
        """Live tasks ordered by submission, after the given submission number."""
        found = []
        for status in statuses:
            for task_id in self.state.ids_with_status(status):
                t = self.state.tasks[task_id]
                if t.seq > after_seq and t.created_us >= since_us and (not ttype
                                                                       or t.type == ttype):
                    found.append(t)
        found.sort(key=lambda t: t.seq)
        return found[:limit]

    def _live_horizon_us(self) -> int:
        """Terminal tasks that finished before this are no longer all live: purging
        goes in finishing order, so the oldest live one of each status marks it."""
        oldest = [self.state.tasks[next(iter(ids))].finished_us
                  for ids in map(self.state.ids_with_status, p.TERMINAL) if ids]
        return min(oldest) if oldest else (1 << 62)

    def _cancel(self, ident: bytes, rid: object, msg: dict) -> None:
        task_id = p.task_id_of(msg)
        if self.require_leader(ident, rid):
            self.pending.cancels.append((ident, rid, task_id))

    def _wait(self, ident: bytes, rid: object, msg: dict) -> None:
        task_id = p.task_id_of(msg)
        timeout = p.get_num(msg, "timeout", 30.0, hi=3600.0)
        if not self.require_leader(ident, rid):
            return
        task = self.state.get(task_id)
        if task is None:
            self.send(ident, p.error(rid, p.NOT_FOUND, f"no task {task_id}"))
        elif task.status in p.TERMINAL:
            self.send(ident, p.reply(p.TASK, rid, task=task.to_dict(), done=True))
        else:
            deadline = time.monotonic() + timeout
            self.waiters.setdefault(task_id, []).append((ident, rid, deadline))

    def _logs(self, ident: bytes, rid: object, msg: dict) -> None:
        task_id = p.task_id_of(msg)
        number = p.get_int(msg, "attempt", 0, lo=0)
        offset = p.get_int(msg, "offset", 0, lo=0)

        def answer() -> None:
            task = self.state.get(task_id)
            if task is None:  # purged after the retention window: the database has it
                self._from_history(ident, rid, "get_task", (task_id,), old_task)
                return
            if not task.attempts:
                self.send(ident, p.reply(p.LOG_CHUNKS, rid, attempt=0, data=b"", offset=0,
                                         done=task.status in p.TERMINAL))
                return
            number_ = number or task.attempt
            if number_ > task.attempt:
                self.send(ident, p.error(rid, p.NOT_FOUND, f"task {task_id} has no attempt "
                                         f"{number_}"))
                return
            attempt = task.attempts[number_ - 1]
            live = attempt.finished_us == 0
            data = self.desk.live_log(task_id, number_) if live else attempt.log
            chunk = data[offset:offset + (1 << 20)]
            # offset: where this chunk starts (docs/protocol.md); the caller adds len(data).
            self.send(ident, p.reply(p.LOG_CHUNKS, rid, attempt=number_, data=chunk,
                                     offset=offset,
                                     done=not live and offset + len(chunk) >= len(data)))

        def old_task(task: dict | None) -> None:
            if task is None:
                self.send(ident, p.error(rid, p.NOT_FOUND, f"no task {task_id}"))
                return
            number_ = number or len(task["attempts"])
            if number_ > len(task["attempts"]):
                self.send(ident, p.error(rid, p.NOT_FOUND, f"task {task_id} has no attempt "
                                         f"{number_}"))
            elif number_ == 0:
                self.send(ident, p.reply(p.LOG_CHUNKS, rid, attempt=0, data=b"", offset=0,
                                         done=True))
            else:
                self._from_history(ident, rid, "get_log", (task_id, number_),
                                   lambda data: old_log(number_, data or b""))

        def old_log(number_: int, data: bytes) -> None:
            chunk = data[offset:offset + (1 << 20)]
            self.send(ident, p.reply(p.LOG_CHUNKS, rid, attempt=number_, data=chunk,
                                     offset=offset, done=offset + len(chunk) >= len(data)))

        self._read(ident, rid, p.get_bool(msg, "stale"), answer)

    def _cluster(self, ident: bytes, rid: object, msg: dict) -> None:
        st = self.node.status()
        st["endpoint"] = self.endpoint_of(self.cfg.node_id) or self.cfg.client_bind
        st["tasks"] = {s: len(self.state.ids_with_status(s)) for s in p.STATES}
        st["bad_requests"] = self.counters["bad_requests"]
        st["persist"] = self.feed.stats()
        st["cron_jobs"] = len(self.state.cron.jobs)
        fields = {"node": st, "leader": self.leader_endpoint()}
        if self.dispatcher is not None:
            st["dispatch"] = self.dispatcher.stats()
            now = time.monotonic()
            fields["workers"] = [
                {"id": w.id, "host": w.host, "pid": w.pid, "concurrency": w.concurrency,
                 "free_slots": w.free_slots(), "prefetch": w.prefetch,
                 "running": sorted(w.assigned),
                 "queues": sorted(w.queues),
                 "labels": sorted(w.labels), "executors": sorted(w.executors),
                 "registered": w.registered, "last_seen_s": round(now - w.last_seen, 3)}
                for w in self.dispatcher.workers.values()]
        self.send(ident, p.reply(p.CLUSTER_INFO, rid, **fields))

    def _drain_worker(self, ident: bytes, rid: object, msg: dict) -> None:
        worker_id = p.get_str(msg, "worker_id", max_len=128)
        if not self.require_leader(ident, rid) or self.dispatcher is None:
            return
        worker = self.dispatcher.workers.get(worker_id)
        if worker is None or not worker.registered:
            self.send(ident, p.error(rid, p.NOT_FOUND, f"no registered worker {worker_id}"))
            return
        worker.drain_requested = True  # no more tasks for it, from now on
        self.send(worker.ident, p.pack({"v": p.VERSION, "t": p.DRAIN}))
        log.info("event=worker_drain worker=%s running=%d", worker_id, len(worker.assigned))
        self.send(ident, p.reply(p.DRAIN_OK, rid, worker_id=worker_id))

    def _transfer_leader(self, ident: bytes, rid: object, msg: dict) -> None:
        to = p.get_int(msg, "to", 0, lo=0, hi=1 << 62)
        if not self.require_leader(ident, rid):
            return
        try:
            target = self.node.transfer_leadership(to)
        except ProposalRejected as exc:
            raise p.ProtocolError(p.BAD_REQUEST, str(exc)) from None
        if not target:
            raise p.ProtocolError(p.CONFLICT, "no other voter to transfer leadership to")
        log.info("event=transfer_leader to=%d requested=1", target)
        self.send(ident, p.reply(p.TRANSFER_OK, rid, to=target))

    def _member_change(self, ident: bytes, rid: object, msg: dict) -> None:
        """Add a scheduler (as a learner, then promote it once caught up) or remove one.
        One change at a time, each through the log (docs/operations.md)."""
        op = p.get_str(msg, "op")
        if op not in p.MEMBER_OPS:
            raise p.ProtocolError(p.BAD_REQUEST, f"op must be one of {', '.join(p.MEMBER_OPS)}")
        node_id = p.get_int(msg, "node_id", lo=1, hi=1 << 62)
        raft = client = ""
        if op == "add_learner":
            raft, client = p.get_str(msg, "raft"), p.get_str(msg, "client")
            if not (p.is_endpoint(raft) and p.is_endpoint(client)):
                raise p.ProtocolError(p.BAD_REQUEST, "add_learner needs raft and client "
                                      "endpoints, tcp://HOST:PORT")
        if not self.require_leader(ident, rid):
            return
        kind = {"add_learner": ConfChangeType.ADD_LEARNER,
                "promote": ConfChangeType.PROMOTE, "remove": ConfChangeType.REMOVE}[op]

        def changed(_: object, err: Exception | None) -> None:
            if isinstance(err, ProposalRejected):
                self.send(ident, p.error(rid, p.CONFLICT, str(err)))
            elif err is not None:
                self._write_failed(ident, rid, err)
            else:
                conf = self.node.raft.conf
                log.info("event=member_change op=%s node=%d", op, node_id)
                self.send(ident, p.reply(p.MEMBER_OK, rid, voters=sorted(conf.voters),
                                         learners=sorted(conf.learners)))

        if op == "add_learner":
            self.propose(sm.NODE_ENDPOINT, time.time_ns() // 1000, [node_id, client],
                         lambda _, err: changed(None, err) if err else
                         self.node.change_membership(kind, node_id, raft, changed))
        else:
            self.node.change_membership(kind, node_id, "", changed)

    def _read(self, ident: bytes, rid: object, stale: bool, answer) -> None:
        """Linearizable by default (ReadIndex on the leader); stale reads on any node."""
        if stale:
            answer()
            return
        if not self.require_leader(ident, rid):
            return

        def done(_: object, err: Exception | None) -> None:
            if err is None:
                answer()
            else:
                self.not_leader(ident, rid)

        self.node.read(done)

    _CLIENT_HANDLERS = {p.SUBMIT: _submit, p.STATUS: _status, p.LIST: _list,
                        p.CANCEL: _cancel, p.WAIT: _wait, p.LOGS: _logs,
                        p.CLUSTER: _cluster, p.DRAIN_WORKER: _drain_worker,
                        p.TRANSFER_LEADER: _transfer_leader, p.MEMBER_CHANGE: _member_change,
                        p.CRON_DEFINE: lambda self, i, r, m: self.crondesk.define(i, r, m),
                        p.CRON_LIST: lambda self, i, r, m: self.crondesk.list(i, r, m),
                        **dict.fromkeys((p.CRON_PAUSE, p.CRON_RESUME, p.CRON_DELETE,
                                         p.CRON_TRIGGER),
                                        lambda self, i, r, m: self.crondesk.change(i, r, m))}

    # ------------------------------------------------------------------ proposals

    def propose(self, kind: str, now_us: int, body: object, callback) -> None:
        self.node.propose(sm.command(kind, now_us, body), callback)

    def _flush_pending(self, now_us: int) -> None:
        if self.pending.submits:
            batch, self.pending.submits = self.pending.submits, []
            self._submit_no += 1
            no = self._submit_no
            self.submitting[no] = batch
            self.propose(sm.SUBMIT, now_us, [w for _, _, w in batch],
                         lambda res, err, b=batch: self._submitted(b, no, res, err))
            # Not if the proposal was refused at once (it has called back already), nor
            # while the state lags behind SUBMITs of earlier terms it does not show yet.
            if no in self.submitting and self.node.applied_own_term:
                # Generators: the wires are only read while some worker is idle.
                earlier = (w for n, b in self.submitting.items() if n != no
                           for w in _wires(b))
                self.desk.dispatch_early(_wires(batch), now_us, earlier)
        if self.pending.cancels:
            batch, self.pending.cancels = self.pending.cancels, []
            self.propose(sm.CANCEL, now_us, [t for _, _, t in batch],
                         lambda res, err, b=batch: self._cancelled(b, res, err))
        self.desk.flush(now_us)

    def _submitted(self, batch, no: int, results, err: Exception | None) -> None:
        self.submitting.pop(no, None)
        for i, (ident, rid, _) in enumerate(batch):
            if err is not None:
                self._write_failed(ident, rid, err)
            else:
                ids = [r[0] for r in results[i]]
                self.send(ident, p.reply(p.SUBMITTED, rid, task_ids=ids,
                                         existing=[r[1] for r in results[i]]))

    def _cancelled(self, batch, results, err: Exception | None) -> None:
        for i, (ident, rid, task_id) in enumerate(batch):
            if err is not None:
                self._write_failed(ident, rid, err)
                continue
            outcome = results[i]
            task = self.state.get(task_id)
            if outcome == "not_found" or task is None:
                self.send(ident, p.error(rid, p.NOT_FOUND, f"no task {task_id}"))
            elif outcome in (p.COMPLETED, p.FAILED):
                self.send(ident, p.error(rid, p.CONFLICT, f"task {task_id} already {outcome}"))
            else:
                if outcome == p.RUNNING:
                    self.desk.kill(task)
                self.send(ident, p.reply(p.CANCELLED_REPLY, rid, task=task.to_dict()))

    def _write_failed(self, ident: bytes, rid: object, err: Exception) -> None:
        if isinstance(err, NotLeader):
            self.send(ident, p.error(rid, p.NOT_LEADER, f"{err} (outcome unknown: retry "
                                     "with the same idempotency key)", self.leader_endpoint()))
        else:
            self.send(ident, p.error(rid, p.INTERNAL, str(err)))

    # ------------------------------------------------------------------ after apply

    def _after_apply(self, now_us: int) -> None:
        changed, self.state.changed = self.state.changed, []
        kills, self.state.kills = self.state.kills, []
        self.crondesk.after_apply()
        if self.dispatcher is None or not self.node.is_leader:
            return
        for task_id in kills:  # cron `replace`: the previous run is cancelled
            task = self.state.get(task_id)
            if task is not None and task.status == p.RUNNING:
                self.desk.kill(task)
        for task_id in dict.fromkeys(changed):
            self.dispatcher.sync(task_id)
            if task_id in self.waiters:
                self._wake_waiters(task_id)
        self.desk.dispatch(now_us)

    def _wake_waiters(self, task_id: str) -> None:
        task = self.state.get(task_id)
        if task is not None and task.status not in p.TERMINAL:
            return
        for ident, rid, _ in self.waiters.pop(task_id):
            if task is None:
                self.send(ident, p.error(rid, p.NOT_FOUND, f"no task {task_id}"))
            else:
                self.send(ident, p.reply(p.TASK, rid, task=task.to_dict(), done=True))

    def _housekeeping(self, now_us: int) -> None:
        now = time.monotonic()
        if now < self._next_housekeeping:
            return
        self._next_housekeeping = now + 0.05
        self.desk.check_liveness(now, now_us)
        for task_id in list(self.waiters):
            keep = []
            for ident, rid, deadline in self.waiters[task_id]:
                if now >= deadline:
                    task = self.state.get(task_id)
                    self.send(ident, p.reply(p.TASK, rid, task=task.to_dict() if task else {},
                                             done=False))
                else:
                    keep.append((ident, rid, deadline))
            if keep:
                self.waiters[task_id] = keep
            else:
                del self.waiters[task_id]
        self._maybe_purge(now_us)

    def _maybe_purge(self, now_us: int) -> None:
        """Forget terminal tasks past the retention window (history lives in the database)."""
        if self._purging:
            return
        cutoff = now_us - int(self.cfg.retention * 1e6)
        for status in p.TERMINAL:
            ids = self.state.ids_with_status(status)
            if ids and self.state.tasks[next(iter(ids))].finished_us < cutoff:
                self._purging = True
                self.propose(sm.PURGE, now_us, [cutoff, 10_000], self._purged)
                return

    def _purged(self, _: object, __: Exception | None) -> None:
        self._purging = False

    def _fail_waiters(self) -> None:
        for waiting in self.waiters.values():
            for ident, rid, _ in waiting:
                self.send(ident, p.error(rid, p.NOT_LEADER, "leadership changed",
                                         self.leader_endpoint()))
        self.waiters = {}


def _wires(batch: list[tuple[bytes, object, list]]) -> Iterator[list]:
    """The task wires of a batch of pending submits, in order."""
    return (w for _, _, wires in batch for w in wires)


def _req_id(frame: bytes) -> object:
    """Best effort: the id of a request we could not parse, so the error can carry it."""
    try:
        msg = msgpack.unpackb(frame, max_bin_len=1 << 16, max_str_len=1 << 16)
        rid = msg.get("id") if isinstance(msg, dict) else None
        return rid if isinstance(rid, (int, str, bytes)) else None
    except Exception:
        return None


def run(cfg: SchedulerConfig) -> None:
    run_daemon(SchedulerServer(cfg),
               f"node={cfg.node_id} raft={cfg.raft_bind} clients={cfg.client_bind}")
