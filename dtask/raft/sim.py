"""Deterministic simulator for the Raft core: seeded chaos, safety checks, linearizability.

Each run drives a handful of `Raft` cores through one seeded random schedule on a
simulated clock (1 unit = 1 ms): message loss, duplication, delay and reordering,
symmetric and asymmetric partitions, crashes that lose everything not yet fsynced
(including a crash after a leader sent its appends but before its own write),
restarts from durable state, snapshots with log compaction, leadership transfers
and one-server membership changes. Clients run key-value operations against it.

After every step it checks Election Safety, Log Matching, Leader Completeness and
State Machine Safety; at the end it heals the network, expects every live node to
converge, and checks that the clients' history is linearizable.

    python -m dtask.raft.sim --nodes 5 --seeds 1000          # a soak
    python -m dtask.raft.sim --seed 4711 --trace             # replay one seed
"""

from __future__ import annotations

import argparse
import hashlib
import math
import random
import sys
from dataclasses import dataclass, field

import msgpack

from .core import (
    EARLY_SEND_TYPES,
    Config,
    NotLeader,
    ProposalRejected,
    Raft,
    Ready,
    bootstrap_snapshot,
)
from .kv import KVStore
from .linearizability import Operation, check_kv
from .messages import (
    ConfChange,
    ConfChangeType,
    Entry,
    EntryType,
    HardState,
    Message,
    Snapshot,
)
from .progress import Role

TICK_MS = 10


class Violation(Exception):
    pass


@dataclass
class Faults:
    loss: float = 0.03
    dup: float = 0.02
    max_delay: int = 8  # ms; random delays reorder messages
    crash: float = 0.0015  # per node per ms
    restart: float = 0.01  # per crashed node per ms
    partition: float = 0.002  # per ms
    heal: float = 0.004
    crash_in_ready: float = 0.002  # crash between sending and persisting a Ready
    transfer: float = 0.0015
    membership: float = 0.0015
    snapshot_every: tuple[int, int] = (20, 120)  # applied entries between snapshots


@dataclass
class Disk:
    """What survives a crash: exactly what was persisted."""

    hard_state: HardState = field(default_factory=HardState)
    snapshot: Snapshot | None = None
    entries: list[Entry] = field(default_factory=list)

    def append(self, ents: list[Entry]) -> None:
        first = ents[0].index
        self.entries = [e for e in self.entries if e.index < first] + list(ents)

    def install(self, snap: Snapshot) -> None:
        self.snapshot = snap
        self.entries = []

    def compact(self, upto: int) -> None:
        self.entries = [e for e in self.entries if e.index > upto]


@dataclass
class PendingOp:
    client: int
    op: str
    key: str
    value: object
    call: float
    term: int = 0
    index: int = 0
    read_ctx: bytes = b""
    read_index: int = -1


ZERO_HASH = b"\0" * 12


class SimNode:
    def __init__(self, sim: Simulation, node_id: int, founder: bool) -> None:
        self.sim = sim
        self.id = node_id
        self.disk = Disk()
        self.founder = founder
        self.joined = False  # a spare whose addition was proposed
        self.removal_proposed = False
        self.alive = False
        self.retired = False
        self.raft: Raft
        self.kv = KVStore()
        self.pending: dict[int, PendingOp] = {}  # log index -> op proposed here
        self.reads: dict[bytes, PendingOp] = {}
        self.hashes: dict[int, bytes] = {}  # index -> chained hash of the log up to it
        self.next_snapshot = 0
        self.last_role = Role.FOLLOWER
        self.last_term = 0

    def start(self) -> None:
        snap = self.disk.snapshot
        cfg = Config(self.id, election_ticks=10, heartbeat_ticks=2, max_inflight=8,
                     max_msg_bytes=256, snapshot_chunk_bytes=64, learner_catchup=20,
                     seed=self.sim.rng.randrange(1 << 30))
        self.raft = Raft(cfg, self.disk.hard_state, snap.meta if snap else None,
                         list(self.disk.entries), snap.data if snap else b"")
        self.kv = KVStore()
        self.kv.restore(snap.data if snap else b"")
        self.hashes = {0: ZERO_HASH}
        if snap:
            self.hashes = {snap.meta.index: self.sim.hash_of(snap.meta.index, snap.meta.term)}
        self._record_hashes(self.disk.entries)
        self.alive = True
        self.pending, self.reads = {}, {}
        self.last_role, self.last_term = Role.FOLLOWER, self.raft.term
        self._schedule_snapshot()

    def crash(self) -> None:
        self.alive = False
        self.fail_all("crashed")
        self.sim.trace(f"crash n{self.id}")

    def fail_all(self, why: str) -> None:
        for op in list(self.pending.values()) + list(self.reads.values()):
            self.sim.finish(op, None, unknown=True)
        self.pending, self.reads = {}, {}

    def _schedule_snapshot(self) -> None:
        lo, hi = self.sim.faults.snapshot_every
        self.next_snapshot = self.raft.log.applied + self.sim.rng.randint(lo, hi)

    # -- the driver's job, done the way dtask.raft.node does it -----------------

    def handle_ready(self) -> None:
        if not self.raft.has_ready():
            return
        rd = self.raft.ready()
        self.sim.check_ready(self, rd)
        for m in rd.messages:
            if m.type in EARLY_SEND_TYPES:
                self.sim.net_send(m)
        if self.sim.rng.random() < self.sim.faults.crash_in_ready:
            self.sim.trace(f"n{self.id} crashes before persisting its ready")
            self.crash()
            return
        if rd.hard_state is not None:
            self.disk.hard_state = HardState(rd.hard_state.term, rd.hard_state.vote)
        if rd.snapshot is not None:
            self.disk.install(rd.snapshot)
            self.kv.restore(rd.snapshot.data)
            self.hashes = {rd.snapshot.meta.index: self.sim.hash_of(rd.snapshot.meta.index,
                                                                     rd.snapshot.meta.term)}
            self.sim.trace(f"n{self.id} installs snapshot at {rd.snapshot.meta.index}")
        if rd.entries:
            self.disk.append(rd.entries)
        for m in rd.messages:
            if m.type not in EARLY_SEND_TYPES:
                self.sim.net_send(m)
        for e in rd.committed_entries:
            self._apply(e)
        for ctx, index in rd.read_states:
            op = self.reads.get(ctx)
            if op is not None:
                op.read_index = index
        self.raft.advance(rd)
        self._serve_reads()
        self._on_role(rd)
        if self.raft.log.applied >= self.next_snapshot:
            self._take_snapshot()

    def _apply(self, e: Entry) -> None:
        self.sim.check_apply(self, e)
        result = None
        if e.type == EntryType.NORMAL and e.data:
            client, seq, cmd = msgpack.unpackb(e.data)
            result = self.kv.apply(e.index, cmd)
        op = self.pending.pop(e.index, None)
        if op is not None:
            if op.term == e.term:
                self.sim.finish(op, result)
            else:
                self.sim.finish(op, None, unknown=True)

    def _serve_reads(self) -> None:
        for ctx, op in list(self.reads.items()):
            if 0 <= op.read_index <= self.raft.log.applied:
                del self.reads[ctx]
                self.sim.finish(op, self.kv.get(op.key))

    def _on_role(self, rd: Ready) -> None:
        role, term = self.raft.role, self.raft.term
        if self.last_role == Role.LEADER and (role != Role.LEADER or term != self.last_term):
            self.fail_all("lost leadership")
        if role == Role.LEADER and (self.last_role != Role.LEADER or term != self.last_term):
            self.sim.on_new_leader(self)
        self.last_role, self.last_term = role, term

    def _take_snapshot(self) -> None:
        applied = self.raft.log.applied
        if applied <= self.raft.log.offset:
            return
        keep = self.sim.rng.randint(0, 8)
        snap = self.raft.create_snapshot(applied, self.kv.snapshot(), keep_entries=keep)
        self.disk.snapshot = snap
        self.disk.compact(snap.meta.index)
        self._schedule_snapshot()

    def ever_joined(self) -> bool:
        return self.founder or self.joined

    def _record_hashes(self, ents: list[Entry]) -> None:
        """Chain-hash the log so Log Matching is checked in O(new entries)."""
        if not ents:
            return
        for stale in [i for i in self.hashes if i >= ents[0].index]:
            del self.hashes[stale]  # the suffix was truncated
        for e in ents:
            prev = self.hashes.get(e.index - 1)
            if prev is None:
                raise Violation(f"n{self.id}: entry {e.index} appended with no predecessor")
            h = hashlib.blake2b(prev + msgpack.packb([e.term, e.type, e.data]),
                                digest_size=12).digest()
            self.hashes[e.index] = h
            self.sim.check_log_matching(self, e, h)


class Simulation:
    def __init__(self, seed: int, n_voters: int = 3, n_spares: int = 2, n_clients: int = 3,
                 faults: Faults | None = None, duration: int = 3000, keep_trace: bool = False):
        self.seed = seed
        self.rng = random.Random(seed)
        self.faults = faults or Faults()
        self.duration = duration
        self.now = 0
        self.keep_trace = keep_trace
        self.events: list[str] = []
        boot = bootstrap_snapshot(list(range(1, n_voters + 1)))
        self.nodes = {i: SimNode(self, i, founder=i <= n_voters)
                      for i in range(1, n_voters + n_spares + 1)}
        self.net: list[tuple[int, int, Message]] = []  # (deliver_at, seq, message)
        self.net_seq = 0
        self.blocked: set[tuple[int, int]] = set()
        self.leaders: dict[int, int] = {}  # term -> leader id
        self.applied: dict[int, tuple[int, bytes]] = {}  # index -> (term, data)
        self.log_hashes: dict[tuple[int, int], bytes] = {}  # (index, term) -> chained hash
        self.history: list[Operation] = []
        self.clients = {c: {"busy": False, "next_at": 0, "target": 1} for c in range(n_clients)}
        self.op_seq = 0
        self.keys = ["a", "b", "c"]
        self.log_hashes[(0, 0)] = ZERO_HASH
        self.log_hashes[(1, 1)] = b"bootstrap\0\0\0"
        self.applied[1] = (1, b"")
        for node in self.nodes.values():
            if node.founder:
                node.disk.snapshot = boot
                node.start()

    # -- bookkeeping -----------------------------------------------------------

    def trace(self, text: str) -> None:
        if self.keep_trace or len(self.events) < 100_000:
            self.events.append(f"{self.now:6d} {text}")

    def hash_of(self, index: int, term: int) -> bytes:
        h = self.log_hashes.get((index, term))
        if h is None:
            raise Violation(f"snapshot at ({index}, {term}) names an entry never logged")
        return h

    def check_log_matching(self, node: SimNode, e: Entry, h: bytes) -> None:
        known = self.log_hashes.setdefault((e.index, e.term), h)
        if known != h:
            raise Violation(f"Log Matching: n{node.id} has entry ({e.index}, term {e.term}) "
                            "with a different history than another node")

    def check_ready(self, node: SimNode, rd: Ready) -> None:
        if rd.role == Role.LEADER:
            prev = self.leaders.setdefault(rd.term, node.id)
            if prev != node.id:
                raise Violation(f"Election Safety: n{prev} and n{node.id} lead term {rd.term}")
        if rd.entries:
            node._record_hashes(rd.entries)

    def check_apply(self, node: SimNode, e: Entry) -> None:
        mine = (e.term, e.data)
        known = self.applied.setdefault(e.index, mine)
        if known != mine:
            raise Violation(f"State Machine Safety: n{node.id} applied {e.index} as term "
                            f"{e.term}, another node applied term {known[0]}")

    def on_new_leader(self, node: SimNode) -> None:
        self.trace(f"n{node.id} leads term {node.raft.term}")
        log = node.raft.log
        for index, (term, _) in self.applied.items():
            if index > log.offset and log.term(index) != term:
                raise Violation(f"Leader Completeness: n{node.id} leads term {node.raft.term} "
                                f"without committed entry {index} (term {term})")

    # -- network ---------------------------------------------------------------

    def net_send(self, m: Message) -> None:
        f = self.faults
        if (m.frm, m.to) in self.blocked or self.rng.random() < f.loss:
            return
        copies = 2 if self.rng.random() < f.dup else 1
        for _ in range(copies):
            self.net_seq += 1
            self.net.append((self.now + self.rng.randint(1, f.max_delay), self.net_seq, m))

    def deliver_due(self) -> None:
        due = sorted(x for x in self.net if x[0] <= self.now)
        if not due:
            return
        self.net = [x for x in self.net if x[0] > self.now]
        for _, _, m in due:
            node = self.nodes.get(m.to)
            if node is None or not node.alive or (m.frm, m.to) in self.blocked:
                continue
            node.raft.step(m)

    # -- clients -----------------------------------------------------------------

    def finish(self, op: PendingOp, output: object, unknown: bool = False) -> None:
        client = self.clients[op.client]
        client["busy"] = False
        client["next_at"] = self.now + self.rng.randint(0, 20)
        if unknown and op.op == "get":
            return  # a failed read changed nothing: leave it out of the history
        self.history.append(Operation(
            op.client, op.call, math.inf if unknown else self.now, op.op, op.key, op.value,
            None if unknown else output))
        self.trace(f"client {op.client} {op.op} {op.key} {op.value!r} -> "
                   f"{'?' if unknown else repr(output)}")

    def run_clients(self) -> None:
        for cid, client in self.clients.items():
            if client["busy"] or client["next_at"] > self.now:
                continue
            node = self.nodes[client["target"]]
            if not node.alive or node.raft.role != Role.LEADER:
                leader = node.raft.leader if node.alive else 0
                live = [n for n in self.nodes.values() if n.alive and not n.retired]
                if leader and leader in self.nodes and self.nodes[leader].alive:
                    client["target"] = leader
                elif live:
                    client["target"] = self.rng.choice(live).id
                client["next_at"] = self.now + 5
                continue
            self._issue(cid, node)

    def _issue(self, cid: int, node: SimNode) -> None:
        self.op_seq += 1
        kind = self.rng.choice(["put", "append", "cas", "get", "get"])
        key = self.rng.choice(self.keys)
        value: object = f"{cid}.{self.op_seq}"
        if kind == "cas":
            value = (node.kv.get(key), f"{cid}.{self.op_seq}")  # a plausible expectation
        elif kind == "get":
            value = None
        op = PendingOp(cid, kind, key, value, self.now)
        try:
            if kind == "get" and self.rng.random() < 0.7:
                op.read_ctx = b"r%d" % self.op_seq
                node.raft.read_index(op.read_ctx)
                node.reads[op.read_ctx] = op
            else:
                wire = list(value) if isinstance(value, tuple) else value
                data = msgpack.packb([cid, self.op_seq, msgpack.packb([kind, key, wire])])
                op.term, op.index, _ = node.raft.propose([data])
                node.pending[op.index] = op
        except NotLeader:
            return
        self.clients[cid]["busy"] = True

    # -- faults --------------------------------------------------------------

    def inject_faults(self) -> None:
        f, rng = self.faults, self.rng
        for node in self.nodes.values():
            if node.retired:
                continue
            if node.alive and rng.random() < f.crash:
                node.crash()
            elif not node.alive and node.ever_joined() and rng.random() < f.restart:
                node.start()
                self.trace(f"restart n{node.id} (term {node.raft.term}, "
                           f"last {node.raft.log.last_index()})")
        if rng.random() < f.partition:
            self._partition()
        if self.blocked and rng.random() < f.heal:
            self.blocked.clear()
            self.trace("heal")
        if rng.random() < f.transfer:
            leader = self.current_leader()
            if leader is not None and len(leader.raft.conf.voters) > 1:
                to = rng.choice([v for v in leader.raft.conf.voters if v != leader.id])
                self.trace(f"transfer n{leader.id} -> n{to}")
                leader.raft.transfer_leadership(to)
        if rng.random() < f.membership:
            self._change_membership()

    def _partition(self) -> None:
        ids = [n for n in self.nodes]
        if self.rng.random() < 0.5:
            side = set(self.rng.sample(ids, self.rng.randint(1, len(ids) // 2)))
            self.blocked = {(a, b) for a in ids for b in ids if (a in side) != (b in side)}
            self.trace(f"partition {sorted(side)} | rest")
        else:
            a, b = self.rng.sample(ids, 2)
            self.blocked.add((a, b))  # asymmetric: a's messages to b are lost
            self.trace(f"drop n{a} -> n{b}")

    def _change_membership(self) -> None:
        leader = self.current_leader()
        if leader is None:
            return
        conf = leader.raft.conf
        spares = [n for n in self.nodes.values() if not n.ever_joined()]
        choices = []
        if spares:
            choices.append(("add", spares[0].id))
        choices += [("promote", n) for n in conf.learners]
        if len(conf.voters) > 3:
            choices += [("remove", v) for v in conf.voters]
        if not choices:
            return
        what, node_id = self.rng.choice(choices)
        kind = {"add": ConfChangeType.ADD_LEARNER, "promote": ConfChangeType.PROMOTE,
                "remove": ConfChangeType.REMOVE}[what]
        try:
            leader.raft.propose_conf_change(ConfChange(kind, node_id))
        except (NotLeader, ProposalRejected) as exc:
            self.trace(f"{what} n{node_id} refused: {exc}")
            return
        self.trace(f"{what} n{node_id} proposed by n{leader.id}")
        if what == "remove":
            self.nodes[node_id].removal_proposed = True
        if what == "add":
            spare = self.nodes[node_id]
            spare.joined = True
            spare.start()

    def current_leader(self) -> SimNode | None:
        best = None
        for n in self.nodes.values():
            if n.alive and n.raft.role == Role.LEADER and (best is None
                                                          or n.raft.term > best.raft.term):
                best = n
        return best

    def retire_removed(self) -> None:
        """A node whose removal committed is switched off for good (ids are never reused)."""
        leader = self.current_leader()
        if leader is None:
            return
        members = leader.raft.conf.members()
        committed_conf = leader.raft.log.committed >= leader.raft.conf_history[-1][0]
        for n in self.nodes.values():
            # Only a removal retires a node: a spare whose addition was lost with a
            # leader may still be added when another leader commits that entry.
            if (committed_conf and not n.retired and n.removal_proposed
                    and n.id not in members):
                n.retired = True
                n.alive = False
                n.fail_all("removed")
                self.trace(f"retire n{n.id}")

    # -- the run ---------------------------------------------------------------

    def step(self, faults: bool) -> None:
        self.now += 1
        self.deliver_due()
        if self.now % TICK_MS == 0:
            for n in self.nodes.values():
                if n.alive:
                    n.raft.tick()
        self.run_clients()
        if faults:
            self.inject_faults()
        for n in list(self.nodes.values()):
            if n.alive:
                n.handle_ready()
        self.retire_removed()

    def run(self) -> None:
        while self.now < self.duration:
            self.step(faults=True)
        self.blocked.clear()
        self.trace("heal all; restart every crashed member")
        for n in self.nodes.values():
            if not n.alive and not n.retired and n.ever_joined():
                n.start()
        self.faults = Faults(loss=0, dup=0, crash=0, restart=0, partition=0, transfer=0,
                             membership=0, crash_in_ready=0, max_delay=self.faults.max_delay,
                             snapshot_every=self.faults.snapshot_every)
        deadline = self.now + 5000
        while self.now < deadline:
            self.step(faults=False)
            if self.converged():
                break
        else:
            raise Violation("liveness: the healed cluster did not converge in 5 s "
                            + self.describe_nodes())
        result = check_kv(self.history, timeout=30)
        if not result.ok:
            raise Violation(f"linearizability: {result.detail}")

    def converged(self) -> bool:
        leader = self.current_leader()
        if leader is None or any(c["busy"] for c in self.clients.values()):
            return False
        if leader.raft.log.committed != leader.raft.log.last_index():
            return False
        target = leader.raft.log.committed
        members = [self.nodes[i] for i in leader.raft.conf.members()]
        return all(n.alive and n.raft.log.applied == target for n in members)

    def describe_nodes(self) -> str:
        return "; ".join(
            f"n{n.id}: {'up' if n.alive else 'down'} {n.raft.role.name} t{n.raft.term} "
            f"commit {n.raft.log.committed} last {n.raft.log.last_index()} "
            f"conf {n.raft.conf.voters}/{n.raft.conf.learners}"
            for n in self.nodes.values() if hasattr(n, "raft"))


@dataclass
class SeedResult:
    seed: int
    ok: bool
    error: str = ""
    trace: list[str] = field(default_factory=list)
    ops: int = 0
    elections: int = 0


def run_seed(seed: int, nodes: int = 3, duration: int = 3000, keep_trace: bool = False,
             faults: Faults | None = None) -> SeedResult:
    spares = 2 if nodes <= 3 else 1
    sim = Simulation(seed, n_voters=nodes, n_spares=spares, faults=faults, duration=duration,
                     keep_trace=keep_trace)
    try:
        sim.run()
    except Violation as exc:
        return SeedResult(seed, False, str(exc), sim.events, len(sim.history), len(sim.leaders))
    except Exception as exc:  # a crash inside the core is a failure too
        import traceback
        return SeedResult(seed, False, f"{exc.__class__.__name__}: {exc}\n"
                          + traceback.format_exc(), sim.events, len(sim.history),
                          len(sim.leaders))
    return SeedResult(seed, True, "", sim.events if keep_trace else [], len(sim.history),
                      len(sim.leaders))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dtask.raft.sim", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nodes", type=int, default=3, help="initial voters (3 or 5)")
    p.add_argument("--seeds", type=int, default=100, help="how many seeds to run")
    p.add_argument("--start", type=int, default=1, help="first seed")
    p.add_argument("--seed", type=int, help="run this one seed")
    p.add_argument("--duration", type=int, default=3000, help="faulty phase, simulated ms")
    p.add_argument("--trace", action="store_true", help="print the seed's whole trace")
    args = p.parse_args(argv)
    seeds = [args.seed] if args.seed is not None else range(args.start, args.start + args.seeds)
    ops = elections = 0
    for seed in seeds:
        r = run_seed(seed, args.nodes, args.duration, keep_trace=args.trace)
        ops += r.ops
        elections += r.elections
        if args.trace:
            print("\n".join(r.trace))
        if not r.ok:
            print("\n".join(r.trace[-200:]))
            print(f"seed {seed} FAILED: {r.error}")
            print(f"replay: python -m dtask.raft.sim --nodes {args.nodes} --seed {seed} "
                  f"--duration {args.duration} --trace")
            return 1
    print(f"{len(seeds)} seeds passed ({args.nodes} voters, {ops} client operations, "
          f"{elections} elections)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
