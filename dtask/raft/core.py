"""The Raft consensus core: a pure state machine with no sockets, clock or disk.

Inputs: `tick()`, `step(message)`, `propose(datas)`, `propose_conf_change(cc)`,
`read_index(ctx)`, `transfer_leadership(to)`, `create_snapshot(index, data)`.
Outputs come out of `ready()` as one `Ready`: hard state and entries to persist, a
snapshot to install, committed entries to apply, messages to send and confirmed
read indexes. The driver persists, sends and applies, then calls `advance(ready)`.

Implemented (following the Raft dissertation and etcd's raft):
- elections with randomized timeouts, pre-vote (§9.6) and check-quorum leases, so
  a partitioned node that comes back cannot depose a healthy leader;
- pipelined replication with a bounded number of in-flight appends per follower and
  fast backtracking on conflicts (follower hints with term-skipping);
- the commit rule of Figure 8 (only entries of the current term commit by counting);
- snapshots sent in chunks, one chunk in flight, heartbeats flowing in between;
- leadership transfer (TimeoutNow);
- single-server membership changes, effective when appended (dissertation §4.1),
  at most one uncommitted at a time and only after the leader committed an entry of
  its term (Ongaro's fix for the single-server change bug); learners;
- linearizable reads with ReadIndex (§6.4).

Ordering rule for the driver: messages of type APPEND, HEARTBEAT, SNAPSHOT and
TIMEOUT_NOW may be sent before the Ready's entries are durable (the leader's own
write runs in parallel, §10.2.1); every other message only after.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from .messages import (
    CAMPAIGN_TRANSFER,
    ConfChange,
    ConfChangeType,
    ConfState,
    Entry,
    EntryType,
    HardState,
    Message,
    MsgType,
    Snapshot,
    SnapshotMeta,
)
from .progress import PROBE, REPLICATE, SNAPSHOT, Progress, Role, committed_index, quorum
from .raftlog import RaftLog

EARLY_SEND_TYPES = frozenset({MsgType.APPEND, MsgType.HEARTBEAT, MsgType.SNAPSHOT,
                              MsgType.TIMEOUT_NOW})


class NotLeader(Exception):
    """A write or read reached a node that is not the leader."""

    def __init__(self, leader: int, reason: str = "not the leader") -> None:
        super().__init__(f"{reason} (leader hint: {leader or 'unknown'})")
        self.leader = leader


class ProposalRejected(Exception):
    """The leader refused a proposal (transfer in progress, bad conf change...)."""


@dataclass(slots=True)
class Config:
    id: int
    election_ticks: int = 20  # a follower campaigns after [election, 2*election) ticks
    heartbeat_ticks: int = 5
    max_msg_bytes: int = 1 << 20  # payload bytes per AppendEntries
    max_inflight: int = 256  # unacknowledged appends per follower
    snapshot_chunk_bytes: int = 1 << 20
    pre_vote: bool = True
    check_quorum: bool = True
    learner_catchup: int = 1000  # a learner this close to the leader's log may be promoted
    seed: int | None = None  # for the randomized election timeout (the simulator seeds it)


@dataclass(slots=True)
class Ready:
    hard_state: HardState | None = None  # persist when not None
    entries: list[Entry] = field(default_factory=list)  # persist; may truncate a suffix
    snapshot: Snapshot | None = None  # install (persist + restore the state machine)
    committed_entries: list[Entry] = field(default_factory=list)  # apply, in order
    messages: list[Message] = field(default_factory=list)
    read_states: list[tuple[bytes, int]] = field(default_factory=list)  # (ctx, read index)
    leader: int = 0
    role: Role = Role.FOLLOWER
    term: int = 0



def bootstrap_snapshot(voters: list[int] | tuple[int, ...], data: bytes = b"") -> Snapshot:
    """The founding members' common starting point: index 1, term 1, empty state.

    Putting the initial membership in a snapshot (not in log entries) means a node
    added later always starts from a snapshot that tells it the configuration.
    """
    return Snapshot(SnapshotMeta(1, 1, ConfState(tuple(sorted(voters)))), data)


class Raft:
    def __init__(self, cfg: Config, hard_state: HardState, snapshot_meta: SnapshotMeta | None,
                 entries: list[Entry], snapshot_data: bytes = b"") -> None:
        """Start from durable state.

        A brand-new cluster's founding members start from `bootstrap_snapshot`; a node
        with no state at all waits to be added and receives a snapshot from the leader.
        """
        self.id = cfg.id
        self.cfg = cfg
        self.rng = random.Random(cfg.seed if cfg.seed is not None else cfg.id)
        snap_index = snapshot_meta.index if snapshot_meta else 0
        snap_term = snapshot_meta.term if snapshot_meta else 0
        self.log = RaftLog(snap_index, snap_term, [e for e in entries if e.index > snap_index])
        base_conf = snapshot_meta.conf if snapshot_meta else ConfState(())
        self.snapshot: Snapshot | None = (
            Snapshot(snapshot_meta, snapshot_data) if snapshot_meta else None)
        # (index, conf) for every conf-change entry still in the log, oldest first.
        self.conf_history: list[tuple[int, ConfState]] = [(snap_index, base_conf)]
        self.conf = base_conf
        self._replay_conf_entries(self.log.conf_entries_after(snap_index))
        self.term = hard_state.term
        self.vote = hard_state.vote
        self._persisted_hs = HardState(hard_state.term, hard_state.vote)
        self.role = Role.FOLLOWER
        self.leader = 0
        self.prs: dict[int, Progress] = {}
        self.votes: dict[int, bool] = {}
        self.msgs: list[Message] = []
        self.election_elapsed = 0
        self.heartbeat_elapsed = 0
        self.randomized_timeout = cfg.election_ticks
        self.lead_transferee = 0
        self.pending_reads: list[tuple[bytes, int, set[int]]] = []  # (ctx, index, acks)
        self.reads_before_commit: list[bytes] = []  # until this term's first commit
        self.read_states: list[tuple[bytes, int]] = []
        self.pending_snapshot: Snapshot | None = None  # received, to hand to the driver
        # (index, term, sender, sender's term, bytes so far) of a snapshot being received
        self.incoming_snap: tuple[int, int, int, int, bytearray] | None = None
        self.become_follower(self.term, 0)

    # ------------------------------------------------------------------ inputs

    def tick(self) -> None:
        self.election_elapsed += 1
        if self.role == Role.LEADER:
            self._tick_leader()
        elif self.election_elapsed >= self.randomized_timeout and self.promotable():
            self.election_elapsed = 0
            self.campaign(pre=self.cfg.pre_vote)

    def propose(self, datas: list[bytes]) -> tuple[int, int, int]:
        """Append commands; returns (term, first index, last index). Raises NotLeader."""
        self._check_can_propose()
        first = self.log.last_index() + 1
        ents = [Entry(self.term, first + i, EntryType.NORMAL, d) for i, d in enumerate(datas)]
        self._append_as_leader(ents)
        return self.term, first, first + len(ents) - 1

    def propose_conf_change(self, cc: ConfChange) -> tuple[int, int]:
        """Propose one membership change; returns (term, index)."""
        self._check_can_propose()
        if not self._committed_in_term():
            raise ProposalRejected("leader has not committed an entry of its term yet")
        if self.conf_history[-1][0] > self.log.committed:
            raise ProposalRejected("another membership change is not committed yet")
        self._validate_conf_change(cc)
        index = self.log.last_index() + 1
        self._append_as_leader([Entry(self.term, index, EntryType.CONF_CHANGE, cc.encode())])
        return self.term, index

    def read_index(self, ctx: bytes) -> None:
        """Ask to confirm leadership; `(ctx, index)` later appears in Ready.read_states.

        Reading the state machine once it has applied `index` is linearizable.
        """
        if self.role != Role.LEADER:
            raise NotLeader(self.leader)
        if not self._committed_in_term():
            self.reads_before_commit.append(ctx)
            return
        self._start_read(ctx)

    def transfer_leadership(self, to: int) -> None:
        if self.role != Role.LEADER:
            raise NotLeader(self.leader)
        if to == self.id or to not in self.conf.voters:
            raise ProposalRejected(f"node {to} is not another voter")
        self.lead_transferee = to
        self.election_elapsed = 0  # the transfer is abandoned after one election timeout
        if self.prs[to].match == self.log.last_index():
            self._send(Message(MsgType.TIMEOUT_NOW, to, self.id, self.term))
        else:
            self._send_append(to)

    def snapshot_meta(self, index: int) -> SnapshotMeta:
        """What a snapshot of the state at applied `index` must record."""
        term = self.log.term(index)
        if term is None or index > self.log.applied:
            raise ValueError(f"no applied entry at {index}")
        return SnapshotMeta(index, term, self._conf_at(index))

    def create_snapshot(self, index: int, data: bytes, keep_entries: int = 0) -> Snapshot:
        """Record the state machine's snapshot at applied `index`; compact the log behind it.

        `keep_entries` entries before `index` stay in memory, so slightly slow
        followers can still be caught up with appends instead of a snapshot.
        """
        if index > self.log.applied or index <= self.log.offset:
            raise ValueError(f"snapshot index {index} not in ({self.log.offset}, "
                             f"{self.log.applied}]")
        term = self.log.term(index)
        assert term is not None
        snap = Snapshot(SnapshotMeta(index, term, self._conf_at(index)), data)
        self.snapshot = snap
        compact_to = index - keep_entries
        if compact_to > self.log.offset:
            self.log.compact(compact_to, self.log.term(compact_to) or 0)
            self._trim_conf_history(compact_to)
        return snap

    # ------------------------------------------------------------------ outputs

    def has_ready(self) -> bool:
        return bool(self.msgs or self.log.unstable_entries() or self.pending_snapshot
                    or self.log.committed > self.log.applied or self.read_states
                    or self._hard_state_changed())

    def take_messages(self, types: frozenset) -> list[Message]:
        """Remove and return the queued messages of these types, ahead of `ready()`.

        The driver uses it for the leader's appends while a write is still in flight:
        they do not depend on anything being durable (§10.2.1), and holding them back
        until the write finishes would serialize replication behind the leader's fsync.
        """
        if not self.msgs:
            return []
        out = [m for m in self.msgs if m.type in types]
        if out:
            self.msgs = [m for m in self.msgs if m.type not in types]
        return out

    def ready(self) -> Ready:
        rd = Ready(leader=self.leader, role=self.role, term=self.term)
        if self._hard_state_changed():
            rd.hard_state = HardState(self.term, self.vote)
        rd.entries = self.log.unstable_entries()
        rd.snapshot = self.pending_snapshot
        rd.committed_entries = self.log.next_committed()
        rd.messages, self.msgs = self.msgs, []
        rd.read_states, self.read_states = self.read_states, []
        return rd

    def advance(self, rd: Ready) -> None:
        """The driver persisted, sent and applied everything in `rd`."""
        if rd.hard_state is not None:
            self._persisted_hs = rd.hard_state
        if rd.snapshot is not None and rd.snapshot is self.pending_snapshot:
            self.pending_snapshot = None
        if rd.entries:
            last = rd.entries[-1]
            self.log.stable_to(last.index, last.term)
        if rd.committed_entries:
            self.log.applied_to(rd.committed_entries[-1].index)
        leader_persisted = (self.role == Role.LEADER
                            and self.prs[self.id].maybe_update(self.log.stable))
        if leader_persisted and self._maybe_commit():
            self._bcast_append()

    # ------------------------------------------------------------------ roles

    def promotable(self) -> bool:
        return self.id in self.conf.voters

    def become_follower(self, term: int, leader: int) -> None:
        self._reset(term)
        self.role = Role.FOLLOWER
        self.leader = leader

    def campaign(self, pre: bool, transfer: bool = False) -> None:
        if pre:
            self._reset(self.term)  # keep term and vote: a pre-vote changes nothing
            self.role = Role.PRE_CANDIDATE
            term, mtype = self.term + 1, MsgType.PRE_VOTE
        else:
            self._reset(self.term + 1)
            self.role = Role.CANDIDATE
            self.vote = self.id
            term, mtype = self.term, MsgType.VOTE
        self.votes = {self.id: True}
        if self._tally() >= quorum(len(self.conf.voters)):
            self._won_election(pre)  # a single-voter cluster
            return
        ctx = CAMPAIGN_TRANSFER if transfer else b""
        for peer in self.conf.voters:
            if peer != self.id:
                self._send(Message(mtype, peer, self.id, term, log_term=self.log.last_term(),
                                   index=self.log.last_index(), context=ctx))

    def become_leader(self) -> None:
        self._reset(self.term)
        self.role = Role.LEADER
        self.leader = self.id
        last = self.log.last_index()
        for node in self.conf.members():
            self.prs[node] = Progress(last + 1, self.cfg.max_inflight,
                                      node in self.conf.learners)
        me = self.prs.setdefault(self.id, Progress(last + 1, self.cfg.max_inflight))
        me.become_replicate()
        me.match = self.log.stable
        me.recent_active = True
        # A no-op of our term lets earlier terms' entries commit (Figure 8).
        self._append_as_leader([Entry(self.term, last + 1, EntryType.NORMAL, b"")])

    def _won_election(self, pre: bool) -> None:
        if pre:
            self.campaign(pre=False)
        else:
            self.become_leader()

    def _reset(self, term: int) -> None:
        if term != self.term:
            self.term = term
            self.vote = 0
        self.leader = 0
        self.election_elapsed = 0
        self.heartbeat_elapsed = 0
        self.randomized_timeout = self.cfg.election_ticks + self.rng.randrange(
            self.cfg.election_ticks)
        self.votes = {}
        self.lead_transferee = 0
        self.prs = {}
        self.pending_reads = []
        self.reads_before_commit = []

    # ------------------------------------------------------------------ step

    def step(self, m: Message) -> None:
        if m.term > self.term:
            if not self._handle_higher_term(m):
                return
        elif m.term < self.term:
            self._handle_lower_term(m)
            return
        if m.type in (MsgType.VOTE, MsgType.PRE_VOTE):
            self._handle_vote_request(m)
        elif self.role == Role.LEADER:
            self._step_leader(m)
        elif self.role in (Role.CANDIDATE, Role.PRE_CANDIDATE):
            self._step_candidate(m)
        else:
            self._step_follower(m)

    def _handle_higher_term(self, m: Message) -> bool:
        """Returns whether to go on processing `m` after adjusting our term."""
        if m.type in (MsgType.VOTE, MsgType.PRE_VOTE):
            forced = m.context == CAMPAIGN_TRANSFER
            in_lease = (self.cfg.check_quorum and self.leader != 0
                        and self.election_elapsed < self.cfg.election_ticks)
            if in_lease and not forced:
                return False  # we heard from a live leader recently: ignore the disruption
        if m.type == MsgType.PRE_VOTE:
            return True  # a pre-vote never changes our term
        if m.type == MsgType.PRE_VOTE_RESP and not m.reject:
            return True  # a grant is at our own future term
        if m.type in (MsgType.APPEND, MsgType.HEARTBEAT, MsgType.SNAPSHOT):
            self.become_follower(m.term, m.frm)
        else:
            self.become_follower(m.term, 0)
        return True

    def _handle_lower_term(self, m: Message) -> None:
        if m.type in (MsgType.APPEND, MsgType.HEARTBEAT) and (
                self.cfg.check_quorum or self.cfg.pre_vote):
            # A deposed leader cut off from us: tell it our term so it steps down.
            self._send(Message(MsgType.APPEND_RESP, m.frm, self.id, self.term))
        elif m.type == MsgType.PRE_VOTE:
            # Without this a node stuck pre-campaigning at a stale term never learns.
            self._send(Message(MsgType.PRE_VOTE_RESP, m.frm, self.id, self.term, reject=True))

    def _handle_vote_request(self, m: Message) -> None:
        pre = m.type == MsgType.PRE_VOTE
        can_vote = (self.vote == m.frm or (self.vote == 0 and self.leader == 0)
                    or (pre and m.term > self.term))
        resp = MsgType.PRE_VOTE_RESP if pre else MsgType.VOTE_RESP
        if can_vote and self.log.is_up_to_date(m.index, m.log_term):
            # A pre-vote grant answers at the asked term, so the sender can count it.
            self._send(Message(resp, m.frm, self.id, m.term))
            if not pre:
                self.election_elapsed = 0
                self.vote = m.frm
        else:
            self._send(Message(resp, m.frm, self.id, self.term, reject=True))

    def _step_follower(self, m: Message) -> None:
        if m.type == MsgType.APPEND:
            self._follow(m.frm)
            self._handle_append(m)
        elif m.type == MsgType.HEARTBEAT:
            self._follow(m.frm)
            self.log.commit_to(m.commit)
            self._send(Message(MsgType.HEARTBEAT_RESP, m.frm, self.id, self.term,
                               context=m.context))
        elif m.type == MsgType.SNAPSHOT:
            self._follow(m.frm)
            self._handle_snapshot_chunk(m)
        elif m.type == MsgType.TIMEOUT_NOW and self.promotable():
            self.campaign(pre=False, transfer=True)

    def _follow(self, leader: int) -> None:
        self.election_elapsed = 0
        self.leader = leader

    def _step_candidate(self, m: Message) -> None:
        want = MsgType.PRE_VOTE_RESP if self.role == Role.PRE_CANDIDATE else MsgType.VOTE_RESP
        if m.type in (MsgType.APPEND, MsgType.HEARTBEAT, MsgType.SNAPSHOT):
            self.become_follower(m.term, m.frm)  # someone won this term
            self._step_follower(m)
        elif m.type == want:
            self.votes.setdefault(m.frm, not m.reject)
            granted = self._tally()
            need = quorum(len(self.conf.voters))
            if granted >= need:
                self._won_election(self.role == Role.PRE_CANDIDATE)
            elif len(self.votes) - granted >= need:
                self.become_follower(self.term, 0)

    def _tally(self) -> int:
        return sum(1 for node, yes in self.votes.items() if yes and node in self.conf.voters)

    # ------------------------------------------------------------------ follower side

    def _handle_append(self, m: Message) -> None:
        if m.index < self.log.committed:
            # Everything up to our commit index matches the leader's log already.
            self._send(Message(MsgType.APPEND_RESP, m.frm, self.id, self.term,
                               index=self.log.committed))
            return
        old_last = self.log.last_index()
        last_new = self.log.maybe_append(m.index, m.log_term, m.entries)
        if last_new is not None:
            if self.log.last_index() != old_last or m.entries:
                self._on_log_changed(m.entries[0].index if m.entries else old_last + 1)
            self.log.commit_to(min(m.commit, last_new))
            self._send(Message(MsgType.APPEND_RESP, m.frm, self.id, self.term, index=last_new))
            return
        hint = self.log.find_conflict_by_term(min(m.index, self.log.last_index()), m.log_term)
        self._send(Message(MsgType.APPEND_RESP, m.frm, self.id, self.term, index=m.index,
                           reject=True, reject_hint=hint, log_term=self.log.term(hint) or 0))

    def _handle_snapshot_chunk(self, m: Message) -> None:
        # Snapshots are opaque bytes: two leaders' snapshots at the same index may differ,
        # so a transfer resumes only with the same sender in the same term.
        key = (m.index, m.log_term, m.frm, m.term)
        if m.index <= self.log.committed:
            # We already have everything it covers: tell the leader where we are.
            self.incoming_snap = None
            self._send(Message(MsgType.APPEND_RESP, m.frm, self.id, self.term,
                               index=self.log.committed))
            return
        if self.incoming_snap is None or self.incoming_snap[:4] != key:
            if m.offset != 0:
                self._snap_resp(m, 0)  # we lost the start: ask for it again
                return
            self.incoming_snap = (*key, bytearray())
        buf = self.incoming_snap[4]
        if m.offset == len(buf):
            buf += m.chunk
            if m.last_chunk:
                self._install_snapshot(Snapshot(SnapshotMeta(m.index, m.log_term, m.snap_conf
                                                             or self.conf), bytes(buf)))
                self.incoming_snap = None
                self._send(Message(MsgType.APPEND_RESP, m.frm, self.id, self.term,
                                   index=m.index))
                return
        self._snap_resp(m, len(buf))

    def _snap_resp(self, m: Message, received: int) -> None:
        self._send(Message(MsgType.SNAPSHOT_RESP, m.frm, self.id, self.term, index=m.index,
                           log_term=m.log_term, offset=received))

    def _install_snapshot(self, snap: Snapshot) -> None:
        meta = snap.meta
        if self.log.match_term(meta.index, meta.term):
            # Our log already has the snapshot's last entry: keep the suffix, fast-forward.
            self.log.commit_to(meta.index)
            return
        self.log.restore(meta.index, meta.term)
        self.snapshot = snap
        self.pending_snapshot = snap
        self.conf_history = [(meta.index, meta.conf)]
        self.conf = meta.conf

    # ------------------------------------------------------------------ leader side

    def _tick_leader(self) -> None:
        self.heartbeat_elapsed += 1
        if self.election_elapsed >= self.cfg.election_ticks:
            self.election_elapsed = 0
            if self.cfg.check_quorum and not self._quorum_active():
                self.become_follower(self.term, 0)  # we may be partitioned: stop serving
                return
            self.lead_transferee = 0  # a transfer that took this long has failed
        if self.heartbeat_elapsed >= self.cfg.heartbeat_ticks:
            self.heartbeat_elapsed = 0
            # Carrying the newest pending read's context retries a read round whose
            # heartbeats were lost; acknowledging it confirms all earlier rounds too.
            self._bcast_heartbeat(self.pending_reads[-1][0] if self.pending_reads else b"")
            self._resend_stalled_snapshots()

    def _quorum_active(self) -> bool:
        active = 0
        for node, pr in self.prs.items():
            if node in self.conf.voters and (node == self.id or pr.recent_active):
                active += 1
            pr.recent_active = False
        return active >= quorum(len(self.conf.voters))

    def _step_leader(self, m: Message) -> None:
        pr = self.prs.get(m.frm)
        if pr is None:
            return  # not (or no longer) a member
        pr.recent_active = True
        if m.type == MsgType.APPEND_RESP:
            self._handle_append_resp(m, pr)
        elif m.type == MsgType.HEARTBEAT_RESP:
            pr.probe_sent = False
            if pr.state == REPLICATE and len(pr.inflights) >= pr.max_inflight:
                pr.inflights.popleft()  # unblock a pipeline whose acks were lost
            if pr.match < self.log.last_index() or pr.state == PROBE:
                self._send_append(m.frm)
            if m.context:
                self._ack_read(m.context, m.frm)
        elif m.type == MsgType.SNAPSHOT_RESP and self._is_current_snapshot(pr, m):
            pr.snap_offset = m.offset
            pr.snap_idle_ticks = 0
            self._send_snapshot_chunk(m.frm, pr)

    @staticmethod
    def _is_current_snapshot(pr: Progress, m: Message) -> bool:
        snap = pr.snapshot
        return (pr.state == SNAPSHOT and snap is not None and m.index == snap.meta.index
                and m.log_term == snap.meta.term)

    def _handle_append_resp(self, m: Message, pr: Progress) -> None:
        if m.reject:
            hint = m.reject_hint
            if m.log_term > 0:
                hint = self.log.find_conflict_by_term(hint, m.log_term)
            if pr.maybe_decr_to(m.index, hint):
                if pr.state == REPLICATE:
                    pr.become_probe()
                self._send_append(m.frm)
            return
        old_paused = pr.paused()
        # A probe answered at exactly the known match is news too: the logs agree there.
        updated = pr.maybe_update(m.index) or (pr.state == PROBE and m.index == pr.match)
        if pr.state == SNAPSHOT and pr.snapshot and pr.match >= pr.snapshot.meta.index:
            pr.become_probe()  # installed (possibly acknowledged before): resume appends
            updated = True
        if not updated:
            return
        if pr.state == PROBE:
            pr.become_replicate()
        if self._maybe_commit():
            self._bcast_append()
        elif old_paused or pr.next <= self.log.last_index():
            self._send_append(m.frm)
        if m.frm == self.lead_transferee and pr.match == self.log.last_index():
            self._send(Message(MsgType.TIMEOUT_NOW, m.frm, self.id, self.term))

    def _maybe_commit(self) -> bool:
        matches = [self.prs[v].match for v in self.conf.voters if v in self.prs]
        if not matches:
            return False
        index = committed_index(matches)
        # Figure 8: never commit an older term's entry by counting replicas.
        if index > self.log.committed and self.log.term(index) == self.term:
            self.log.commit_to(index)
            self._on_commit()
            return True
        return False

    def _on_commit(self) -> None:
        if self.reads_before_commit and self._committed_in_term():
            for ctx in self.reads_before_commit:
                self._start_read(ctx)
            self.reads_before_commit = []
        if self.id not in self.conf.members() and self.conf_history[-1][0] <= self.log.committed:
            # Our own removal is committed: hand over to the most up-to-date voter at
            # once instead of making the cluster wait for an election timeout.
            best = max(self.conf.voters, key=lambda n: self.prs[n].match if n in self.prs else -1)
            self._send(Message(MsgType.TIMEOUT_NOW, best, self.id, self.term))
            self.become_follower(self.term, 0)

    def _committed_in_term(self) -> bool:
        return self.log.term(self.log.committed) == self.term

    def _check_can_propose(self) -> None:
        if self.role != Role.LEADER:
            raise NotLeader(self.leader)
        if self.lead_transferee:
            raise NotLeader(self.lead_transferee, "leadership transfer in progress")

    def _append_as_leader(self, ents: list[Entry]) -> None:
        self.log.append(ents)
        self._on_log_changed(ents[0].index)
        self._bcast_append()  # our own copy commits in advance(), once persisted

    def _bcast_append(self) -> None:
        for node in self.prs:
            if node != self.id:
                self._send_append(node)

    def _bcast_heartbeat(self, ctx: bytes) -> None:
        for node, pr in self.prs.items():
            if node != self.id:
                self._send(Message(MsgType.HEARTBEAT, node, self.id, self.term,
                                   commit=min(pr.match, self.log.committed), context=ctx))

    def _send_append(self, to: int) -> None:
        """Send as much as flow control allows: several messages when pipelining."""
        pr = self.prs[to]
        last = self.log.last_index()
        sent_any = False
        while not pr.paused():
            prev = pr.next - 1
            prev_term = self.log.term(prev)
            if prev_term is None:  # compacted away: only a snapshot can catch it up
                self._start_snapshot(to, pr)
                return
            ents = self.log.slice(pr.next, last + 1, self.cfg.max_msg_bytes)
            if not ents and sent_any:
                return
            sent_any = True
            self._send(Message(MsgType.APPEND, to, self.id, self.term, log_term=prev_term,
                               index=prev, entries=ents, commit=self.log.committed))
            pr.sent(ents[-1].index if ents else prev)
            if pr.state != REPLICATE or pr.next > last:
                return

    def _start_snapshot(self, to: int, pr: Progress) -> None:
        if self.snapshot is None:
            raise AssertionError("log compacted without a snapshot")
        pr.become_snapshot(self.snapshot)
        self._send_snapshot_chunk(to, pr)

    def _send_snapshot_chunk(self, to: int, pr: Progress) -> None:
        snap = pr.snapshot
        assert snap is not None
        end = min(pr.snap_offset + self.cfg.snapshot_chunk_bytes, len(snap.data))
        self._send(Message(MsgType.SNAPSHOT, to, self.id, self.term, log_term=snap.meta.term,
                           index=snap.meta.index, snap_conf=snap.meta.conf,
                           offset=pr.snap_offset, chunk=snap.data[pr.snap_offset:end],
                           last_chunk=end == len(snap.data)))

    def _resend_stalled_snapshots(self) -> None:
        for node, pr in self.prs.items():
            if node != self.id and pr.state == SNAPSHOT:
                pr.snap_idle_ticks += self.cfg.heartbeat_ticks
                if pr.snap_idle_ticks >= self.cfg.election_ticks:
                    pr.snap_idle_ticks = 0  # a chunk or its ack was lost: send it again
                    self._send_snapshot_chunk(node, pr)

    # ------------------------------------------------------------------ reads

    def _start_read(self, ctx: bytes) -> None:
        if self.conf.voters == (self.id,):  # not len() == 1: we may be removing ourselves
            self.read_states.append((ctx, self.log.committed))
            return
        self.pending_reads.append((ctx, self.log.committed, {self.id}))
        self._bcast_heartbeat(ctx)

    def _ack_read(self, ctx: bytes, frm: int) -> None:
        if frm not in self.conf.voters:
            return
        need = quorum(len(self.conf.voters))
        for i, (rctx, _, acks) in enumerate(self.pending_reads):
            if rctx == ctx:
                acks.add(frm)
                if len(acks & set(self.conf.voters)) >= need:
                    # Confirming this round confirms every earlier one too.
                    done = self.pending_reads[:i + 1]
                    del self.pending_reads[:i + 1]
                    self.read_states.extend((c, idx) for c, idx, _ in done)
                return

    # ------------------------------------------------------------------ membership

    def _validate_conf_change(self, cc: ConfChange) -> None:
        members = self.conf.members()
        if cc.type == ConfChangeType.ADD_LEARNER and cc.node_id in members:
            raise ProposalRejected(f"node {cc.node_id} is already a member")
        if cc.type == ConfChangeType.PROMOTE:
            if cc.node_id not in self.conf.learners:
                raise ProposalRejected(f"node {cc.node_id} is not a learner")
            lag = self.log.last_index() - self.prs[cc.node_id].match
            if lag > self.cfg.learner_catchup:
                raise ProposalRejected(f"learner {cc.node_id} is {lag} entries behind")
        if cc.type == ConfChangeType.REMOVE:
            if cc.node_id not in members:
                raise ProposalRejected(f"node {cc.node_id} is not a member")
            if self.conf.voters == (cc.node_id,):
                raise ProposalRejected("cannot remove the last voter")

    def _on_log_changed(self, first_index: int) -> None:
        """Entries from `first_index` were (re)written: membership follows the log."""
        before = self.conf
        while len(self.conf_history) > 1 and self.conf_history[-1][0] >= first_index:
            self.conf_history.pop()  # that configuration entry was truncated away
        self._replay_conf_entries(self.log.conf_entries_after(first_index - 1))
        if self.conf != before:
            self._set_conf(self.conf)

    def _replay_conf_entries(self, ents: list[Entry]) -> None:
        conf = self.conf_history[-1][1]
        for e in ents:
            conf = conf.apply(ConfChange.decode(e.data))
            self.conf_history.append((e.index, conf))
        self.conf = conf

    def _set_conf(self, conf: ConfState) -> None:
        self.conf = conf
        if self.role != Role.LEADER:
            return
        for node in conf.members():
            pr = self.prs.get(node)
            if pr is None:
                self.prs[node] = Progress(self.log.last_index() + 1, self.cfg.max_inflight,
                                          node in conf.learners)
            else:
                pr.is_learner = node in conf.learners
        for node in list(self.prs):
            if node not in conf.members() and node != self.id:
                del self.prs[node]
        if self.lead_transferee and self.lead_transferee not in conf.voters:
            self.lead_transferee = 0
        if self._maybe_commit():  # a smaller quorum may commit more now
            self._bcast_append()

    def _conf_at(self, index: int) -> ConfState:
        conf = self.conf_history[0][1]
        for idx, c in self.conf_history:
            if idx <= index:
                conf = c
        return conf

    def _trim_conf_history(self, compact_to: int) -> None:
        base = self._conf_at(compact_to)
        self.conf_history = [(compact_to, base)] + [
            (i, c) for i, c in self.conf_history if i > compact_to]

    # ------------------------------------------------------------------ helpers

    def _send(self, m: Message) -> None:
        self.msgs.append(m)

    def _hard_state_changed(self) -> bool:
        hs = self._persisted_hs
        return hs.term != self.term or hs.vote != self.vote

    def status(self) -> dict:
        """A snapshot of the node's state, for operators and tests."""
        return {
            "id": self.id, "role": self.role.name.lower(), "term": self.term,
            "leader": self.leader, "commit": self.log.committed, "applied": self.log.applied,
            "last_index": self.log.last_index(), "first_index": self.log.first_index(),
            "voters": list(self.conf.voters), "learners": list(self.conf.learners),
            "progress": {str(n): {"match": p.match, "next": p.next, "state": p.state}
                         for n, p in self.prs.items()},
        }
