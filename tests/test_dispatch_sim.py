"""Dispatch across leader changes, simulated: seeded random schedules of submissions,
commits, leader crashes that lose an uncommitted suffix of the log, and workers
finishing what they were pushed, run against the replicated state machine and the
leader's dispatcher (early dispatch included: a task pushed before its SUBMIT
commits). Workers report results as the real one does: in batches, one in flight
per worker, what finishes meanwhile waiting for its ack; all that no leader
acknowledged again to each new leader.

What must hold whatever the schedule: every idempotency key a client submitted ends
as exactly one task, completed; no task ever has two live attempts; a follower
applying the same log agrees; and every completed task's successful attempt ran on
the worker the state names (at-least-once, fenced by attempt and worker).
"""

from __future__ import annotations

import random
from collections import Counter

import pytest

from dtask import protocol as p
from dtask.broker import state as sm
from dtask.broker.dispatch import Dispatcher, WorkerInfo
from dtask.protocol import RetryPolicy

T0 = 1_700_000_000_000_000
WORKERS = {"w1": 2, "w2": 1}


class Sim:
    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.log: list[tuple[bytes, object]] = []  # (command, on_applied or None)
        self.applied = 0  # entries applied: the commit index
        self.state = sm.TaskState()
        self.follower = sm.TaskState()
        self.term = 0
        self.ids = 0
        self.keys: set[str] = set()  # every key a client submitted
        self.unacked: list[str] = []  # keys whose submission failed: the client resends
        self.runs: set[tuple[str, int, str]] = set()  # (task, attempt, worker) pushed
        self.results: list[list] = []  # finished runs whose result is not acknowledged
        self.unsent: dict[str, list[list]] = {w: [] for w in WORKERS}  # held by the worker
        self.in_flight: dict[str, list | None] = dict.fromkeys(WORKERS)  # its batch out
        self.batch_sizes: Counter[int] = Counter()
        self.ran: Counter[tuple[str, int, str]] = Counter()
        self.early_leases = 0  # over all leaders
        self.pushed: set[str] = set()  # task ids ever pushed to a worker
        self.wasted: list[str] = []  # pushed, then found to duplicate an earlier task
        self.early_resends = 0  # resends of in-flight keys offered to early dispatch
        self.d: Dispatcher | None = None
        self.new_leader()

    # -- the leader ------------------------------------------------------------------

    def new_leader(self) -> None:
        self.term += 1
        self.early_leases += self.d.early_leases if self.d else 0
        self.d = Dispatcher(self.state, worker_timeout=1e9, lease_grace=10.0,
                            clock_us=lambda: T0)
        self.d.rebuild()
        self.inherited = len(self.log)  # entries of earlier terms, some not applied yet
        for wid, slots in WORKERS.items():
            held = {t for t, _, w in self.runs if w == wid}
            self.d.register(WorkerInfo(wid, wid.encode(), concurrency=slots,
                                       queues=frozenset({"default"}),
                                       executors=frozenset({"shell"}), last_seen=1e18), held)
        for wid in WORKERS:  # workers re-send what no leader acknowledged, in batches
            self.in_flight[wid], self.unsent[wid] = None, []
            mine = [r for r in self.results if r[-1] == wid]
            if mine:
                self.send_batch(wid, mine)
        self.dispatch()

    def propose(self, kind: str, body: list, on_applied=None) -> None:
        self.log.append((sm.command(kind, T0, body), on_applied))

    def submit(self, keys: list[str]) -> None:
        wires = []
        for key in keys:
            self.ids += 1
            wires.append([f"{self.term:x}.1.{self.ids:x}", "", "shell", b"{}", p.JSON, 0,
                          "default", [], 0.0, RetryPolicy(max_retries=5).to_wire(), key, 0])
        in_flight = self.submits_in_flight()  # proposed before this one
        self.propose(sm.SUBMIT, [wires], lambda res, w=wires: self._submitted(w, res))
        if self.applied >= self.inherited:  # as the server: once its own entry applied
            taken = {w[sm.WIRE_KEY] for w in in_flight}
            self.early_resends += sum(w[sm.WIRE_KEY] in taken for w in wires)
            self.push(self.d.assign_early(wires, T0, in_flight))

    def submits_in_flight(self) -> list[list]:
        """The wires of this leader's SUBMITs not applied yet, as the server tracks
        them for early dispatch."""
        out = []
        for command, on_applied in self.log[self.applied:]:
            kind, _, body = sm.msgpack.unpackb(command, raw=False)
            if kind == sm.SUBMIT and on_applied is not None:
                out.extend(w for wires in body for w in wires)
        return out

    def _submitted(self, wires: list, results: list) -> None:
        for wire, (_, existed) in zip(wires, results[0], strict=True):
            if existed and wire[sm.WIRE_ID] in self.pushed:  # ran; the state never held it
                self.wasted.append(wire[sm.WIRE_ID])

    def dispatch(self) -> None:
        self.push(self.d.assign(T0))

    def push(self, leases: list) -> None:
        if not leases:
            return
        self.propose(sm.LEASE, [list(x) for x in leases],
                     lambda granted, b=leases: self._leases_applied(b, granted))
        for task_id, number, worker_id, _ in leases:
            self.runs.add((task_id, number, worker_id))
            self.pushed.add(task_id)

    def _leases_applied(self, leases: list, granted: list) -> None:
        for (task_id, number, worker_id, _), ok in zip(leases, granted, strict=True):
            self.d.lease_settled(task_id, worker_id, ok)
            if not ok and (task_id, number, worker_id) in self.runs:
                # kill(not_leased): the worker stops it and reports it lost
                self.runs.discard((task_id, number, worker_id))
                self.report(task_id, number, worker_id, p.LOST)

    def send_batch(self, worker_id: str, batch: list[list], window: bool = False) -> None:
        worker = self.d.workers.get(worker_id)
        for result in batch:  # the leader frees their slots as the batch arrives
            if worker is not None:
                worker.assigned.pop(result[0], None)
        self.batch_sizes[len(batch)] += 1
        if window:
            self.in_flight[worker_id] = batch
        self.propose(sm.RESULT, batch, lambda res, b=batch: self._batch_acked(worker_id, b))

    def flush(self, worker_id: str) -> None:
        """Send what the worker holds, unless its previous batch awaits its ack."""
        if self.unsent[worker_id] and self.in_flight[worker_id] is None:
            batch, self.unsent[worker_id] = self.unsent[worker_id], []
            self.send_batch(worker_id, batch, window=True)

    def _batch_acked(self, worker_id: str, batch: list[list]) -> None:
        for result in batch:
            if result in self.results:
                self.results.remove(result)
        if self.in_flight[worker_id] is batch:
            self.in_flight[worker_id] = None
            self.flush(worker_id)

    # -- the log ------------------------------------------------------------------------

    def commit(self, n: int) -> None:
        for _ in range(min(n, len(self.log) - self.applied)):
            command, on_applied = self.log[self.applied]
            self.applied += 1
            result = self.state.apply(self.applied, command)
            self.follower.apply(self.applied, command)
            if on_applied is not None:
                on_applied(result)
            for task_id in dict.fromkeys(self.state.changed):
                self.d.sync(task_id)
            self.state.changed = []
            self.follower.changed = []
        self.dispatch()

    def crash(self) -> None:
        """The leader dies; the next one holds the log up to some point past the
        commit index, and proposes nothing of its own for what it inherited."""
        cut = self.rng.randint(self.applied, len(self.log))
        for command, _ in self.log[self.applied:]:
            kind, _, body = sm.msgpack.unpackb(command, raw=False)
            if kind == sm.SUBMIT:  # its client got NOT_LEADER: it resends the keys
                self.unacked.extend(w[sm.WIRE_KEY] for wires in body for w in wires)
        self.log = [(c, None) for c, _ in self.log[:cut]]
        self.new_leader()

    # -- clients and workers -------------------------------------------------------------

    def client(self) -> None:
        in_flight = [w[sm.WIRE_KEY] for w in self.submits_in_flight()]
        if self.unacked and self.rng.random() < 0.5:
            keys, self.unacked = self.unacked, []
        elif in_flight and self.rng.random() < 0.2:
            # a client that timed out resends with the same keys, before they commit
            keys = self.rng.sample(in_flight, self.rng.randint(1, len(in_flight)))
        else:
            keys = [f"k{len(self.keys) + i}" for i in range(self.rng.randint(1, 4))]
        self.keys.update(keys)
        self.submit(keys)

    def finish_one(self) -> None:
        if not self.runs:
            return
        task_id, number, worker_id = self.rng.choice(sorted(self.runs))
        self.runs.discard((task_id, number, worker_id))
        self.ran[(task_id, number, worker_id)] += 1
        self.report(task_id, number, worker_id, p.SUCCEEDED)

    def report(self, task_id: str, number: int, worker_id: str, outcome: str) -> None:
        result = [task_id, number, outcome, 0, "", b"", b"", T0, T0, T0, worker_id]
        self.results.append(result)
        self.unsent[worker_id].append(result)
        self.flush(worker_id)

    def check(self) -> None:
        for task in self.state.tasks.values():
            assert all(a.outcome for a in task.attempts[:-1]), f"two live attempts: {task}"
        assert [t.to_wire() for t in self.state.tasks.values()] == \
            [t.to_wire() for t in self.follower.tasks.values()]

    def run(self, steps: int) -> None:
        actions = [self.client] * 3 + [self.finish_one] * 3 + [
            lambda: self.commit(self.rng.randint(1, 3))] * 3 + [self.crash]
        for _ in range(steps):
            self.rng.choice(actions)()
            self.check()
        for _ in range(200):  # calm: resend, run and commit everything
            if self.unacked:
                self.client()
            while self.runs:
                self.finish_one()
            self.commit(len(self.log))
            self.check()
            if not self.unacked and not self.runs and self.applied == len(self.log) \
                    and not self.results:
                break


@pytest.mark.parametrize("seed", range(60))
def test_every_submitted_key_completes_once_across_leader_crashes(seed):
    sim = Sim(seed)
    sim.run(150)
    tasks = sim.state.tasks
    assert sorted(t.idempotency_key for t in tasks.values()) == sorted(sim.keys)
    assert {t.status for t in tasks.values()} <= {p.COMPLETED}
    for task in tasks.values():
        last = task.attempts[-1]
        assert last.outcome == p.SUCCEEDED
        assert sim.ran[(task.id, last.number, last.worker)] >= 1  # it really ran there
    assert sim.d.early == {} and not sim.d.leasing
    assert sim.results == [] and not any(sim.unsent.values())  # every result acknowledged
    # Early dispatch never pushes a resubmission of a task still being submitted.
    assert sim.wasted == []


def test_the_simulation_exercises_early_leases_and_crashes():
    early = crashes = resends = 0
    sizes: Counter[int] = Counter()
    for seed in range(20):
        sim = Sim(seed)
        sim.run(150)
        early += sim.early_leases + sim.d.early_leases
        crashes += sim.term - 1
        resends += sim.early_resends
        sizes += sim.batch_sizes
    assert early > 0 and crashes > 0 and resends > 0
    assert max(sizes) > 1  # results did wait behind a batch in flight
