"""The Raft node driver: joins the pure core to disk, ZeroMQ and a state machine.

It is a component of its daemon's single `zmq.Poller` loop: the daemon polls
`node.socket` and the file descriptor `node.wake_fd` with `node.next_timeout_ms()`,
and calls `on_readable()` / `on_wake()` when they are readable, `on_timer()`, and
finally `process()` once per loop turn. `process()` hands all the turn's proposals
to the core as one batch. On the leader their write and fsync run on a dedicated
thread (`writer.StorageWriter`) while the loop keeps serving, and everything
proposed in the meantime joins the next write (group commit). When the write is
durable (`on_wake`), the node sends the messages that had to wait for it, applies
committed entries and resolves callbacks.

A follower (or candidate) writes on the loop thread instead: its reply must wait for
the fsync anyway, so a hand-off to the thread and back only adds two wake-ups to
every commit (~0.2-0.6 ms on a 2-vCPU VM, measured in bench/RESULTS.md), and what
arrives meanwhile queues in the socket and joins the next write just the same.

Callbacks are `callback(result, error)`; exactly one of them is meaningful. A
proposal fails with `NotLeader` as soon as this node stops leading: its entry may
still commit later under the new leader, so clients retry with idempotency keys.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import msgpack
import zmq

from .core import (
    EARLY_SEND_TYPES,
    Config,
    NotLeader,
    ProposalRejected,
    Raft,
    Ready,
    bootstrap_snapshot,
)
from .messages import ConfChange, ConfChangeType, Entry, EntryType, SnapshotMeta
from .progress import Role
from .storage import DiskStorage
from .transport import Transport
from .writer import StorageWriter

log = logging.getLogger("dtask.raft.node")

LEADER_SNAPSHOT_SPACING = 4  # the leader snapshots every 4 x snapshot_every entries

Callback = Callable[[object, Exception | None], None]


class StateMachine(Protocol):
    def apply(self, index: int, command: bytes) -> object: ...
    def snapshot(self) -> bytes: ...
    def restore(self, data: bytes) -> None: ...


@dataclass(slots=True)
class NodeConfig:
    node_id: int
    data_dir: str
    bind: str  # this node's Raft address, e.g. tcp://127.0.0.1:7201
    peers: dict[int, str]  # founding members (id -> Raft address), ourselves included
    join: bool = False  # start empty and wait to be added by the leader
    tick_ms: int = 10
    election_ticks: int = 20  # 200-400 ms randomized
    heartbeat_ticks: int = 5
    snapshot_every: int = 50_000  # applied entries between snapshots...
    snapshot_bytes: int = 64 << 20  # ...or this many bytes of applied commands
    keep_entries: int = 5_000  # kept behind a snapshot for slightly slow followers
    segment_bytes: int = 64 << 20


class RaftNode:
    def __init__(self, cfg: NodeConfig, sm: StateMachine, ctx: zmq.Context | None = None,
                 on_role_change: Callable[[Role, int, int], None] | None = None) -> None:
        self.cfg = cfg
        self.sm = sm
        self.on_role_change = on_role_change
        self.storage = DiskStorage(os.path.join(cfg.data_dir, "raft"),
                                   segment_bytes=cfg.segment_bytes)
        hs, snap, entries = self.storage.load()
        if snap is None and not entries and not cfg.join:
            snap = bootstrap_snapshot(sorted(cfg.peers), _wrap(cfg.peers, sm.snapshot()))
            self.storage.install_snapshot(snap)
            log.info("event=bootstrap node=%d voters=%s", cfg.node_id, sorted(cfg.peers))
        self.addresses: dict[int, str] = dict(cfg.peers)
        if snap is not None:
            addresses, app = _unwrap(snap.data)
            self.addresses.update(addresses)
            sm.restore(app)
        self._note_addresses(entries)
        self.raft = Raft(Config(cfg.node_id, election_ticks=cfg.election_ticks,
                                heartbeat_ticks=cfg.heartbeat_ticks),
                         hs, snap.meta if snap else None, entries, snap.data if snap else b"")
        self.snapshot_index = snap.meta.index if snap else 0
        ctx = ctx or zmq.Context.instance()
        self.transport = Transport(ctx, cfg.node_id, cfg.bind, self._peer_addresses())
        self.socket = self.transport.router
        self.writer = StorageWriter(f"raft-writer-{cfg.node_id}")
        self.wake_fd = self.writer.wake.fd
        self._writing: Ready | None = None  # the Ready whose write is in flight
        self._snapshot_child: tuple[int, SnapshotMeta, float, float] | None = None
        self._applied_bytes = 0  # since the last snapshot: bounds the in-memory log
        self._proposals: list[tuple[bytes, Callback]] = []
        self._pending: dict[int, tuple[int, Callback]] = {}  # index -> (term, callback)
        self._reads: list[Callback] = []
        self._read_rounds: dict[bytes, list[Callback]] = {}
        self._reads_waiting_apply: list[tuple[int, list[Callback]]] = []
        self._read_seq = 0
        # Proposal batch -> applied on this leader, for the last entry of each batch.
        self._commit_timer: dict[int, float] = {}
        self.commit_latency: deque[float] = deque(maxlen=1000)
        self._next_tick = time.monotonic() + cfg.tick_ms / 1000
        self._role, self._term, self._members = self.raft.role, self.raft.term, self.raft.conf
        log.info("event=start node=%d term=%d last_index=%d snapshot=%d", cfg.node_id,
                 self.raft.term, self.raft.log.last_index(), self.snapshot_index)

    # ------------------------------------------------------------------ API

    @property
    def is_leader(self) -> bool:
        return self.raft.role == Role.LEADER

    @property
    def leader(self) -> int:
        return self.raft.leader

    @property
    def applied_own_term(self) -> bool:
        """Leader: the state machine has applied an entry of this term, so every entry
        of earlier terms too (the state no longer lags behind what the log promises)."""
        log_ = self.raft.log
        return log_.term(log_.applied) == self.raft.term

    def propose(self, data: bytes, callback: Callback) -> None:
        """Queue a command; it joins this loop turn's batch. Fails fast on a follower."""
        if self.raft.role != Role.LEADER:
            _notify(callback, None, NotLeader(self.raft.leader))
            return
        self._proposals.append((data, callback))

    def has_proposals(self) -> bool:
        """Whether proposals or reads wait for the next `process()`."""
        return bool(self._proposals or self._reads)

    def read(self, callback: Callback) -> None:
        """Call back (None, None) once a linearizable read of the state machine is safe."""
        if self.raft.role != Role.LEADER:
            _notify(callback, None, NotLeader(self.raft.leader))
            return
        self._reads.append(callback)

    def change_membership(self, kind: ConfChangeType, node_id: int, address: str = "",
                          callback: Callback | None = None) -> None:
        conf = self.raft.conf
        already = ((kind == ConfChangeType.REMOVE and node_id not in conf.members())
                   or (kind == ConfChangeType.ADD_LEARNER and node_id in conf.members())
                   or (kind == ConfChangeType.PROMOTE and node_id in conf.voters))
        if already and self.is_leader:
            # Idempotent for callers: a retried request whose first try was applied
            # (its reply lost to a leader change) succeeds instead of failing.
            if callback:
                _notify(callback, None, None)
            return
        cc = ConfChange(kind, node_id, address.encode())
        if address:
            # Known before the change takes effect (on append, possibly within this
            # call), so the leader can reach the new member at once.
            self.addresses[node_id] = address
        try:
            term, index = self.raft.propose_conf_change(cc)
        except (NotLeader, ProposalRejected) as exc:
            if callback:
                _notify(callback, None, exc)
            return
        if callback:
            self._pending[index] = (term, callback)

    def transfer_leadership(self, to: int = 0) -> int:
        """Hand leadership to `to` (0: the most up-to-date voter); returns the target."""
        if not to:
            prs = self.raft.prs
            others = [v for v in self.raft.conf.voters if v != self.raft.id and v in prs]
            if not others:
                return 0
            to = max(others, key=lambda v: prs[v].match)
        self.raft.transfer_leadership(to)
        return to

    def status(self) -> dict:
        st = self.raft.status()
        lat = sorted(self.commit_latency)
        st.update(pid=os.getpid(), snapshot_index=self.snapshot_index,
                  transport=dict(self.transport.counters),
                  commit_latency_ms={"p50": round(lat[len(lat) // 2] * 1e3, 3) if lat else None,
                                     "p99": round(lat[int(len(lat) * 0.99)] * 1e3, 3)
                                     if lat else None, "samples": len(lat)})
        return st

    # ------------------------------------------------------------------ loop hooks

    def next_timeout_ms(self) -> int:
        return max(0, int((self._next_tick - time.monotonic()) * 1000) + 1)

    def on_readable(self) -> None:
        for m in self.transport.recv():
            self.raft.step(m)

    def on_timer(self) -> None:
        now = time.monotonic()
        tick = self.cfg.tick_ms / 1000
        n = 0
        while now >= self._next_tick and n < 3:
            self.raft.tick()
            self._next_tick += tick
            n += 1
        if now >= self._next_tick:  # we were stalled: don't fire a burst of ticks
            self._next_tick = now + tick

    def process(self) -> None:
        self._flush_proposals()
        self._flush_reads()
        if self._snapshot_child is not None and self._writing is None:
            self._poll_snapshot()
        for _ in range(4):  # advance() can make more ready work (a leader's own ack)
            if self._writing is not None:
                # A write is in flight (on_wake() continues from there); the leader's
                # new appends go to the followers now, in parallel with it.
                self.transport.send(self.raft.take_messages(EARLY_SEND_TYPES))
                return
            if not self.raft.has_ready():
                return
            rd = self.raft.ready()
            # The leader's appends go out now, in parallel with its own write (§10.2.1).
            self.transport.send([m for m in rd.messages if m.type in EARLY_SEND_TYPES])
            if rd.hard_state is not None or rd.snapshot is not None or rd.entries:
                if not self.is_leader:  # nothing to overlap: write inline (module doc)
                    self._persist(rd)
                    self._finish(rd)
                    continue
                self._writing = rd
                self.writer.submit(lambda rd=rd: self._persist(rd))
                return
            self._finish(rd)

    def on_wake(self) -> None:
        """The writer thread made the in-flight Ready durable: carry on with it."""
        if self.writer.finished() and self._writing is not None:
            rd, self._writing = self._writing, None
            self._finish(rd)
            self.process()

    def close(self) -> None:
        self._fail_all(NotLeader(0, "node stopped"))
        if self._snapshot_child is not None:
            os.waitpid(self._snapshot_child[0], 0)  # don't leave the child behind
        self.writer.close()
        self.transport.close()
        self.storage.close()

    # ------------------------------------------------------------------ internals

    def _flush_proposals(self) -> None:
        if not self._proposals:
            return
        batch, self._proposals = self._proposals, []
        try:
            term, first, _ = self.raft.propose([d for d, _ in batch])
        except NotLeader as exc:
            for _, cb in batch:
                _notify(cb, None, exc)
            return
        for i, (_, cb) in enumerate(batch):
            self._pending[first + i] = (term, cb)
        self._commit_timer[first + len(batch) - 1] = time.perf_counter()

    def _flush_reads(self) -> None:
        if not self._reads:
            return
        batch, self._reads = self._reads, []
        self._read_seq += 1
        ctx = self._read_seq.to_bytes(8, "big")
        try:
            self.raft.read_index(ctx)
        except NotLeader as exc:
            for cb in batch:
                _notify(cb, None, exc)
            return
        self._read_rounds[ctx] = batch

    def _finish(self, rd: Ready) -> None:
        """Everything in `rd` that had to wait until its writes were durable."""
        self._note_addresses(rd.entries)
        self.transport.send([m for m in rd.messages if m.type not in EARLY_SEND_TYPES])
        if rd.snapshot is not None:
            addresses, app = _unwrap(rd.snapshot.data)
            self.addresses.update(addresses)
            self.sm.restore(app)
            self.snapshot_index = rd.snapshot.meta.index
            log.info("event=snapshot_installed node=%d index=%d", self.cfg.node_id,
                     self.snapshot_index)
        for e in rd.committed_entries:
            self._apply(e)
        for ctx, index in rd.read_states:
            cbs = self._read_rounds.pop(ctx, None)
            if cbs:
                self._reads_waiting_apply.append((index, cbs))
        self.raft.advance(rd)
        self._serve_reads()
        self._after_state_change()
        if self._snapshot_due():
            self._take_snapshot()

    def _persist(self, rd: Ready) -> None:
        """Runs on the writer thread; touches nothing but the storage."""
        if rd.hard_state is not None:
            self.storage.save_hard_state(rd.hard_state)
        if rd.snapshot is not None:
            self.storage.install_snapshot(rd.snapshot)
        if rd.entries:
            self.storage.append(rd.entries)
            self.storage.sync()  # one fsync for everything appended since the last one

    def _apply(self, e: Entry) -> None:
        self._applied_bytes += len(e.data)
        result: object = None
        error: Exception | None = None
        if e.type == EntryType.NORMAL and e.data:
            try:
                result = self.sm.apply(e.index, e.data)
            except Exception as exc:  # a bad command must not kill the replica
                log.exception("event=apply_failed node=%d index=%d", self.cfg.node_id, e.index)
                error = exc
        started = self._commit_timer.pop(e.index, None)
        if started is not None:
            self.commit_latency.append(time.perf_counter() - started)
        pending = self._pending.pop(e.index, None)
        if pending is not None:
            term, cb = pending
            if term == e.term:
                _notify(cb, result, error)
            else:
                _notify(cb, None, NotLeader(self.raft.leader,
                                            "entry was overwritten by a new leader"))

    def _serve_reads(self) -> None:
        applied = self.raft.log.applied
        still = []
        for index, cbs in self._reads_waiting_apply:
            if index <= applied:
                for cb in cbs:
                    _notify(cb, None, None)
            else:
                still.append((index, cbs))
        self._reads_waiting_apply = still

    def _after_state_change(self) -> None:
        role, term = self.raft.role, self.raft.term
        if (role, term) != (self._role, self._term):
            if self._role == Role.LEADER:
                self._fail_all(NotLeader(self.raft.leader, "leadership lost"))
            log.info("event=role node=%d role=%s term=%d leader=%d", self.cfg.node_id,
                     role.name.lower(), term, self.raft.leader)
            self._role, self._term = role, term
            if self.on_role_change:
                self.on_role_change(role, term, self.raft.leader)
        if self.raft.conf != self._members:
            self._members = self.raft.conf
            self.transport.set_peers(self._peer_addresses())  # a new member's address
            log.info("event=membership node=%d voters=%s learners=%s", self.cfg.node_id,
                     list(self._members.voters), list(self._members.learners))

    def _fail_all(self, exc: Exception) -> None:
        self._commit_timer.clear()
        pending = [cb for _, cb in self._pending.values()] + [cb for _, cb in self._proposals]
        pending += [cb for cbs in self._read_rounds.values() for cb in cbs]
        pending += [cb for _, cbs in self._reads_waiting_apply for cb in cbs] + self._reads
        self._pending, self._proposals, self._reads = {}, [], []
        self._read_rounds, self._reads_waiting_apply = {}, []
        for cb in pending:
            _notify(cb, None, exc)

    def _snapshot_due(self) -> bool:
        """Every `snapshot_every` applied entries, each node at its own phase of that
        interval (spread by node id), so the nodes of a cluster do not all fork and
        serialize the whole state at the same moment: on a loaded machine that stalled
        the leader and both followers at once (submit-to-start p99 at 1,000 tasks/s:
        spikes of up to 60 ms, each at a snapshot).

        The leader, whose loop every request waits for, snapshots LEADER_SNAPSHOT_SPACING
        times less often: its fork stops the loop (~5-7 ms with 200,000 tasks) and the
        copy-on-write faults that follow slow it while the child runs, whereas a follower
        that pauses is covered by the other. `snapshot_bytes` still bounds its log."""
        every = self.cfg.snapshot_every
        if self.raft.role == Role.LEADER:
            every *= LEADER_SNAPSHOT_SPACING
        phase = int(every * (self.cfg.node_id * 0.6180339887 % 1.0))  # golden ratio
        applied = self.raft.log.applied
        return ((applied + phase) // every > (self.snapshot_index + phase) // every
                or self._applied_bytes >= self.cfg.snapshot_bytes)

    def _take_snapshot(self) -> None:
        """Serialize the state in a forked child (copy-on-write): a million tasks take
        seconds to pack, far longer than the loop may stop without losing leadership."""
        if self._snapshot_child is not None:
            return
        meta = self.raft.snapshot_meta(self.raft.log.applied)
        path = self.storage.forked_snapshot_path
        started = time.monotonic()
        pid = os.fork()  # the loop stands still while the page tables are copied
        if pid == 0:  # the child: write the state as of now, then vanish without cleanup
            code = 1
            try:
                # Not urgent: the live loops (ours, the other nodes', the workers') first.
                with contextlib.suppress(OSError):
                    os.nice(19)
                data = _wrap(self.addresses, self.sm.snapshot())
                self.storage.write_snapshot_file(path, meta, data)
                code = 0
            finally:
                os._exit(code)
        self._snapshot_child = (pid, meta, started, time.monotonic() - started)
        self._applied_bytes = 0

    def _poll_snapshot(self) -> None:
        """Adopt a finished child's snapshot (only while no write is in flight)."""
        pid, meta, started, fork_s = self._snapshot_child
        done, status = os.waitpid(pid, os.WNOHANG)
        if done == 0:
            return
        self._snapshot_child = None
        if status != 0:
            log.error("event=snapshot_failed node=%d index=%d status=%d", self.cfg.node_id,
                      meta.index, status)
            self.snapshot_index = meta.index  # try again after snapshot_every more entries
            return
        if meta.index <= max(self.raft.log.offset, self.snapshot_index):
            os.unlink(self.storage.forked_snapshot_path)  # a newer one was installed meanwhile
            return
        snap = self.storage.commit_forked_snapshot(meta)
        self.raft.create_snapshot(meta.index, snap.data, keep_entries=self.cfg.keep_entries)
        self.storage.compact(self.raft.log.offset)
        self.snapshot_index = meta.index
        log.info("event=snapshot node=%d index=%d bytes=%d seconds=%.2f fork_ms=%.1f",
                 self.cfg.node_id, meta.index, len(snap.data), time.monotonic() - started,
                 fork_s * 1000)

    def _note_addresses(self, entries: list[Entry]) -> None:
        """A learner's address travels in its ConfChange; learn it as soon as it is logged."""
        for e in entries:
            if e.type == EntryType.CONF_CHANGE:
                cc = ConfChange.decode(e.data)
                if cc.context:
                    self.addresses[cc.node_id] = cc.context.decode()

    def _peer_addresses(self) -> dict[int, str]:
        # Everyone in the address book, not only current members: a joining node must
        # answer the leader before it knows the configuration.
        return dict(self.addresses)


def _wrap(addresses: dict[int, str], app: bytes) -> bytes:
    # Sorted, so every founder writes a byte-identical bootstrap snapshot.
    book = {int(k): addresses[k] for k in sorted(addresses)}
    return msgpack.packb([book, app], use_bin_type=True)


def _unwrap(data: bytes) -> tuple[dict[int, str], bytes]:
    if not data:
        return {}, b""
    addresses, app = msgpack.unpackb(data, strict_map_key=False)
    return dict(addresses), app


def _notify(callback: Callback, result: object, error: Exception | None) -> None:
    """Call a proposer's callback. A bug in one reply must cost that reply, not the
    node: the entry is applied either way, and the loop must keep running."""
    try:
        callback(result, error)
    except Exception:
        log.exception("event=callback_failed")
