"""An in-memory harness for the pure Raft core, in the spirit of etcd's raft `network`.

- `MemoryStorage` is a node's fake disk: hard state, snapshot, durable log, plus what
  was applied to its (fake) state machine and the read states it was handed.
- `Network` owns N `Raft` cores. `send()` delivers messages synchronously, in FIFO
  (breadth-first) order, until no node has anything more to say. After every step
  (and every tick) the node's `Ready` is processed the simple, always-legal way:
  persist everything, apply committed entries, then send all messages, then
  `advance(rd)`.
- Faults: `cut(a, b)` drops traffic both ways between two nodes, `isolate(a)` cuts a
  node off from everyone, `ignore(MsgType.X)` drops a message type, `intercept(fn)`
  lets a test drop or rewrite individual messages; `recover()` heals all of it.
- Invariants checked on every Ready: Election Safety (one leader per term) and State
  Machine Safety (no two nodes apply different entries at the same index), and every
  node applies committed entries in order without gaps.

Index convention
----------------
Founding members start from `bootstrap_snapshot(voters)`: a snapshot at index 1, term
1, holding the initial configuration. Logs given "by terms" (`node_with_log`,
`log_terms`) list the terms of the entries AFTER that snapshot, so the paper's index i
is our index i + 1, and `log_terms()` returns a list that reads exactly like the
paper's figures: `[1, 1, 1, 4, 4, 5, 5, 6, 6, 6]` is Figure 7's leader log, occupying
our indexes 2..11.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from dtask.raft.core import Config, Raft, Ready, bootstrap_snapshot
from dtask.raft.messages import (
    ConfChange,
    ConfChangeType,
    Entry,
    EntryType,
    HardState,
    Message,
    MsgType,
    Snapshot,
)
from dtask.raft.progress import Role

ELECTION_TICKS = 10
HEARTBEAT_TICKS = 1
BOOTSTRAP_INDEX = 1  # the founding members' snapshot (term 1)
FIRST_INDEX = BOOTSTRAP_INDEX + 1  # paper index 1


def make_config(node_id: int, **overrides: object) -> Config:
    """Small timeouts and a fixed per-node seed; any Config field can be overridden."""
    kw: dict[str, object] = {"election_ticks": ELECTION_TICKS,
                             "heartbeat_ticks": HEARTBEAT_TICKS, "seed": node_id}
    kw.update(overrides)
    return Config(id=node_id, **kw)  # type: ignore[arg-type]


def entry_data(index: int, term: int) -> bytes:
    """Deterministic payload, so equal (index, term) means an equal entry (Log Matching)."""
    return f"i{index}t{term}".encode()


def entries_from_terms(terms: Iterable[int], first_index: int = FIRST_INDEX) -> list[Entry]:
    return [Entry(t, first_index + i, EntryType.NORMAL, entry_data(first_index + i, t))
            for i, t in enumerate(terms)]


def founding_node(node_id: int, voters: Iterable[int], **cfg: object) -> Raft:
    """A founding member straight from `bootstrap_snapshot` (term 1, no vote, empty log)."""
    snap = bootstrap_snapshot(list(voters))
    return Raft(make_config(node_id, **cfg), HardState(1, 0), snap.meta, [], snap.data)


def node_with_log(node_id: int, voters: Iterable[int], terms: Iterable[int], *,
                  term: int | None = None, vote: int = 0, **cfg: object) -> Raft:
    """A founding member whose durable log holds entries of `terms` after the bootstrap
    snapshot (paper index i = our index i + 1) and whose hard state is (term, vote);
    `term` defaults to the last entry's term."""
    ents = entries_from_terms(terms)
    snap = bootstrap_snapshot(list(voters))
    hs_term = term if term is not None else max([1] + [e.term for e in ents])
    return Raft(make_config(node_id, **cfg), HardState(hs_term, vote), snap.meta, ents,
                snap.data)


def empty_node(node_id: int, **cfg: object) -> Raft:
    """A node with no state at all, waiting to be added and sent a snapshot."""
    return Raft(make_config(node_id, **cfg), HardState(), None, [])


def log_terms(r: Raft) -> list[int | None]:
    """Terms of the entries after the bootstrap snapshot (None where compacted away)."""
    return [r.log.term(i) for i in range(FIRST_INDEX, r.log.last_index() + 1)]


def conf_change(kind: ConfChangeType, node_id: int) -> ConfChange:
    return ConfChange(kind, node_id)


@dataclass
class MemoryStorage:
    """One node's durable state and its state machine, as the harness maintains them."""

    hard_state: HardState
    snapshot: Snapshot | None
    entries: list[Entry]
    applied_index: int
    applied: list[Entry] = field(default_factory=list)  # applied committed entries, in order
    installed: list[Snapshot] = field(default_factory=list)  # snapshots from a leader
    read_states: list[tuple[bytes, int]] = field(default_factory=list)

    @classmethod
    def of(cls, r: Raft) -> MemoryStorage:
        return cls(HardState(r.term, r.vote), r.snapshot, list(r.log.entries), r.log.applied)

    def save(self, rd: Ready) -> None:
        if rd.snapshot is not None:
            # The core restored from it and discarded its whole log.
            self.snapshot = rd.snapshot
            self.entries = []
            self.installed.append(rd.snapshot)
            self.applied_index = rd.snapshot.meta.index
        if rd.entries:
            first = rd.entries[0].index
            self.entries = [e for e in self.entries if e.index < first] + list(rd.entries)
        if rd.hard_state is not None:
            self.hard_state = HardState(rd.hard_state.term, rd.hard_state.vote)
        for e in rd.committed_entries:
            if e.index != self.applied_index + 1:
                raise AssertionError(f"applied index {e.index} after {self.applied_index}")
            self.applied.append(e)
            self.applied_index = e.index
        self.read_states.extend(rd.read_states)

    def compact(self, snap: Snapshot, compact_to: int) -> None:
        self.snapshot = snap
        self.entries = [e for e in self.entries if e.index > compact_to]


Intercept = Callable[[Message], "Message | None"]


class Network:
    def __init__(self, rafts: Iterable[Raft]) -> None:
        self.nodes: dict[int, Raft] = {}
        self.storage: dict[int, MemoryStorage] = {}
        self.queue: deque[Message] = deque()
        self.sent: list[Message] = []  # everything any node emitted, delivered or not
        self.trace: list[Message] = []  # everything delivered, in order
        self._cut: set[tuple[int, int]] = set()
        self._isolated: set[int] = set()
        self._ignored: set[int] = set()
        self._intercepts: list[Intercept] = []
        self._leaders: dict[int, int] = {}  # term -> leader seen in that term
        self._applied: dict[int, tuple[int, int, bytes]] = {}  # index -> (term, type, data)
        for r in rafts:
            self.add(r)

    @classmethod
    def of_size(cls, n: int, **cfg: object) -> Network:
        """n founding members, ids 1..n, all from the bootstrap snapshot."""
        ids = list(range(1, n + 1))
        return cls(founding_node(i, ids, **cfg) for i in ids)

    def add(self, r: Raft) -> Raft:
        self.nodes[r.id] = r
        self.storage[r.id] = MemoryStorage.of(r)
        return r

    def __getitem__(self, node_id: int) -> Raft:
        return self.nodes[node_id]

    # -- faults ----------------------------------------------------------------

    def cut(self, a: int, b: int) -> None:
        self._cut |= {(a, b), (b, a)}

    def isolate(self, a: int) -> None:
        self._isolated.add(a)

    def ignore(self, mtype: MsgType) -> None:
        self._ignored.add(mtype)

    def intercept(self, fn: Intercept) -> None:
        """`fn(m)` returns the message to deliver (possibly rewritten) or None to drop it."""
        self._intercepts.append(fn)

    def recover(self) -> None:
        self._cut.clear()
        self._isolated.clear()
        self._ignored.clear()
        self._intercepts.clear()

    def _filter(self, m: Message) -> Message | None:
        if m.to not in self.nodes or m.type in self._ignored:
            return None
        if (m.frm, m.to) in self._cut or m.frm in self._isolated or m.to in self._isolated:
            return None
        for fn in self._intercepts:
            out = fn(m)
            if out is None:
                return None
            m = out
        return m

    # -- driving ---------------------------------------------------------------

    def flush(self, node_id: int) -> list[Message]:
        """Process the node's Ready until it has none: persist, apply, collect messages."""
        r = self.nodes[node_id]
        out: list[Message] = []
        while r.has_ready():
            rd = r.ready()
            self.storage[node_id].save(rd)
            self._check_invariants(r, rd)
            r.advance(rd)
            self.sent.extend(rd.messages)
            out.extend(rd.messages)
        return out

    def _check_invariants(self, r: Raft, rd: Ready) -> None:
        if r.role == Role.LEADER:
            other = self._leaders.setdefault(r.term, r.id)
            if other != r.id:
                raise AssertionError(f"two leaders in term {r.term}: {other} and {r.id}")
        for e in rd.committed_entries:
            seen = self._applied.setdefault(e.index, (e.term, e.type, e.data))
            if seen != (e.term, e.type, e.data):
                raise AssertionError(f"node {r.id} applied {e} at {e.index}, another node "
                                     f"applied {seen}")

    def collect(self) -> None:
        """Queue every node's pending output without delivering anything."""
        for node_id in list(self.nodes):
            self.queue.extend(self.flush(node_id))

    def deliver_round(self) -> list[Message]:
        """Deliver exactly the messages queued now; their replies stay queued."""
        batch = list(self.queue)
        self.queue.clear()
        delivered = []
        for m in batch:
            m2 = self._filter(m)
            if m2 is None:
                continue
            delivered.append(m2)
            self.trace.append(m2)
            self.nodes[m2.to].step(m2)
            self.queue.extend(self.flush(m2.to))
        return delivered

    def send(self, msgs: Iterable[Message] = ()) -> None:
        """Deliver `msgs` and everything pending, and all replies, until quiescent."""
        self.queue.extend(msgs)
        self.collect()
        rounds = 0
        while self.queue:
            self.deliver_round()
            rounds += 1
            if rounds > 10_000:
                raise AssertionError("network did not quiesce")

    def tick(self, ids: Iterable[int] | None = None, n: int = 1, deliver: bool = True) -> None:
        """Tick the given nodes (default: all) n times, delivering after each tick."""
        targets = list(self.nodes) if ids is None else list(ids)
        for _ in range(n):
            for node_id in targets:
                self.nodes[node_id].tick()
            if deliver:
                self.send()
            else:
                self.collect()

    # -- conveniences ----------------------------------------------------------

    def campaign(self, node_id: int, pre: bool | None = None) -> Raft:
        r = self.nodes[node_id]
        r.campaign(pre=r.cfg.pre_vote if pre is None else pre)
        self.send()
        return r

    def elect(self, node_id: int) -> Raft:
        """Campaign and require the node to win."""
        r = self.campaign(node_id)
        if r.role != Role.LEADER:
            raise AssertionError(f"node {node_id} did not win: {r.status()}")
        return r

    def propose(self, node_id: int, *datas: bytes) -> tuple[int, int, int]:
        res = self.nodes[node_id].propose(list(datas))
        self.send()
        return res

    def propose_conf(self, node_id: int, kind: ConfChangeType, target: int) -> tuple[int, int]:
        res = self.nodes[node_id].propose_conf_change(conf_change(kind, target))
        self.send()
        return res

    def create_snapshot(self, node_id: int, data: bytes, keep_entries: int = 0) -> Snapshot:
        """Snapshot the node's state machine at its applied index and compact its log."""
        r = self.nodes[node_id]
        snap = r.create_snapshot(r.log.applied, data, keep_entries)
        self.storage[node_id].compact(snap, r.log.offset)
        return snap

    def restart(self, node_id: int) -> Raft:
        """Rebuild the node from its durable state (what a crash leaves behind)."""
        old = self.nodes[node_id]
        st = self.storage[node_id]
        snap = st.snapshot
        r = Raft(old.cfg, HardState(st.hard_state.term, st.hard_state.vote),
                 snap.meta if snap else None, list(st.entries), snap.data if snap else b"")
        self.nodes[node_id] = r
        # The state machine is volatile: it restarts from the snapshot and re-applies.
        st.applied_index = r.log.applied
        st.applied = [e for e in st.applied if e.index <= st.applied_index]
        return r

    def leaders(self) -> list[int]:
        return [i for i, r in self.nodes.items() if r.role == Role.LEADER]

    def leader(self) -> int:
        """The leader of the highest term among current leaders (0 if none)."""
        ls = self.leaders()
        return max(ls, key=lambda i: self.nodes[i].term) if ls else 0

    def log_terms(self, node_id: int) -> list[int | None]:
        return log_terms(self.nodes[node_id])

    def committed(self, node_id: int) -> int:
        return self.nodes[node_id].log.committed

    def delivered(self, mtype: MsgType | None = None, frm: int | None = None,
                  to: int | None = None) -> list[Message]:
        return [m for m in self.trace if (mtype is None or m.type == mtype)
                and (frm is None or m.frm == frm) and (to is None or m.to == to)]

    def emitted(self, mtype: MsgType | None = None, frm: int | None = None,
                to: int | None = None) -> list[Message]:
        return [m for m in self.sent if (mtype is None or m.type == mtype)
                and (frm is None or m.frm == frm) and (to is None or m.to == to)]

    def applied_data(self, node_id: int) -> list[bytes]:
        """Payloads of the non-empty normal entries the node applied, in order."""
        return [e.data for e in self.storage[node_id].applied
                if e.type == EntryType.NORMAL and e.data]
