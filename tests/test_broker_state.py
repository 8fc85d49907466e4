"""The task state machine and the leader's dispatcher, as pure objects."""

from __future__ import annotations

import random
import time

import pytest

from dtask import protocol as p
from dtask.broker import state as sm
from dtask.broker.dispatch import Dispatcher, WorkerInfo, backoff_us
from dtask.protocol import RetryPolicy

T0 = 1_700_000_000_000_000


def wire(task_id, *, prio=0, queue="default", labels=(), ttype="shell", key="", run_at=0,
         retries=2, timeout=0.0):
    return [task_id, "", ttype, b"{}", p.JSON, prio, queue, list(labels), timeout,
            RetryPolicy(max_retries=retries).to_wire(), key, run_at]


class Harness:
    """Applies commands with increasing indexes, as the Raft node would."""

    def __init__(self):
        self.s = sm.TaskState()
        self.index = 1

    def do(self, kind, body, now=T0):
        self.index += 1
        return self.s.apply(self.index, sm.command(kind, now, body))

    def submit(self, *wires, now=T0):
        return self.do(sm.SUBMIT, [list(wires)], now)[0]

    def lease(self, task_id, attempt=None, worker="w1", deadline=0, now=T0):
        attempt = attempt or self.s.tasks[task_id].attempt + 1
        return self.do(sm.LEASE, [[task_id, attempt, worker, deadline]], now)[0]

    def result(self, task_id, attempt, outcome, retry_at=0, now=T0, worker="w1"):
        body = [[task_id, attempt, outcome, 0 if outcome == p.SUCCEEDED else 1, "", b"", b"",
                 now, now, retry_at, worker]]
        return self.do(sm.RESULT, body, now)[0]


@pytest.fixture
def h():
    return Harness()


def test_submit_now_and_later(h):
    assert h.submit(wire("a"), wire("b", run_at=T0 + 5_000_000)) == [["a", False],
                                                                     ["b", False]]
    assert h.s.tasks["a"].status == p.PENDING
    assert h.s.tasks["b"].status == p.SCHEDULED
    assert h.s.tasks["a"].seq < h.s.tasks["b"].seq


def test_idempotency_key_returns_the_existing_task(h):
    h.submit(wire("a", key="k1"))
    assert h.submit(wire("b", key="k1")) == [["a", True]]
    assert "b" not in h.s.tasks
    assert h.submit(wire("a")) == [["a", True]]  # a client-chosen id twice


def test_lifecycle_success(h):
    h.submit(wire("a"))
    assert h.lease("a") is True
    t = h.s.tasks["a"]
    assert (t.status, t.attempt) == (p.RUNNING, 1)
    assert h.result("a", 1, p.SUCCEEDED) == p.COMPLETED
    assert t.finished_us == T0


def test_failures_retry_then_fail(h):
    h.submit(wire("a", retries=2))
    for attempt in (1, 2):
        h.lease("a")
        assert h.result("a", attempt, p.ERRORED, retry_at=T0 + 10) == p.RETRYING
        assert h.s.tasks["a"].run_at_us == T0 + 10
    h.lease("a")
    assert h.result("a", 3, p.ERRORED) == p.FAILED
    assert [a.outcome for a in h.s.tasks["a"].attempts] == [p.ERRORED] * 3


def test_stale_results_and_leases_are_ignored(h):
    h.submit(wire("a"))
    h.lease("a")
    assert h.lease("a", attempt=1) is False  # attempt 1 is already leased
    h.do(sm.EXPIRE, [["a", 1, p.LOST, "worker died", T0]])
    assert h.s.tasks["a"].status == p.RETRYING
    assert h.result("a", 1, p.SUCCEEDED) == "stale"  # the old attempt reports late
    h.lease("a")
    assert h.result("a", 1, p.SUCCEEDED) == "stale"
    assert h.result("a", 2, p.SUCCEEDED) == p.COMPLETED
    assert h.result("a", 2, p.SUCCEEDED) == "stale"  # a duplicate report


def test_cancel_pending_running_and_finished(h):
    h.submit(wire("a"), wire("b"), wire("c"))
    h.lease("b")
    assert h.do(sm.CANCEL, ["a", "b", "nope"]) == [p.CANCELLED, p.RUNNING, "not_found"]
    assert h.lease("a") is False  # a cancelled task never runs
    assert h.s.tasks["b"].cancel_requested
    assert h.result("b", 1, p.KILLED) == p.CANCELLED
    h.lease("c")
    h.result("c", 1, p.SUCCEEDED)
    assert h.do(sm.CANCEL, ["c"]) == [p.COMPLETED]


def test_cancel_requested_wins_over_retry(h):
    h.submit(wire("a", retries=5))
    h.lease("a")
    h.do(sm.CANCEL, ["a"])
    assert h.result("a", 1, p.ERRORED) == p.CANCELLED


def test_purge_forgets_old_terminal_tasks_only(h):
    h.submit(wire("old", key="k"), wire("new"), wire("live"))
    for tid, when in (("old", T0), ("new", T0 + 100)):
        h.lease(tid, now=when)
        h.result(tid, 1, p.SUCCEEDED, now=when)
    # Not in the database yet: purging must keep every task.
    assert h.do(sm.PURGE, [T0 + 50, 100]) == 0
    h.do(sm.PERSISTED, [h.index])
    assert h.do(sm.PURGE, [T0 + 50, 100]) == 1
    assert set(h.s.tasks) == {"new", "live"}
    assert "k" not in h.s.by_key


def test_dirty_lists_changes_in_index_order_until_persisted(h):
    h.submit(wire("a"), wire("b"))
    first = h.index
    h.lease("a")
    leased = h.index
    # a moved to the end: its last change is the lease
    assert list(h.s.dirty.items()) == [("b", (first, T0)), ("a", (leased, T0))]
    h.do(sm.PERSISTED, [first])  # the database got the submission entry only
    assert list(h.s.dirty) == ["a"]
    assert h.s.persisted_index == first
    h.do(sm.PERSISTED, [first - 1])  # an older watermark never moves it back
    assert h.s.persisted_index == first and list(h.s.dirty) == ["a"]
    lag = h.s.persist_lag(T0 + 2_500_000)
    assert lag == {"pending_rows": 1, "persisted_index": first, "lag_s": 2.5}
    h.do(sm.PERSISTED, [h.index])
    assert not h.s.dirty and h.s.persist_lag(T0)["pending_rows"] == 0


def test_resync_marks_every_live_task_dirty(h):
    h.submit(wire("a"), wire("b"))
    h.do(sm.PERSISTED, [h.index])
    assert not h.s.dirty
    assert h.do(sm.RESYNC, [["a", "b", "gone"], True]) == 3
    assert set(h.s.dirty) == {"a", "b"}  # a purged id has no row to write


def test_snapshot_keeps_dirty_and_watermark(h):
    h.submit(wire("a"), wire("b"))
    h.do(sm.PERSISTED, [h.index])
    h.lease("a")
    s2 = sm.TaskState()
    s2.restore(h.s.snapshot())
    assert s2.dirty == h.s.dirty and s2.persisted_index == h.s.persisted_index


def test_restore_of_a_version_1_snapshot_marks_everything_dirty():
    old = sm.TaskState()
    old.apply(1, sm.command(sm.SUBMIT, T0, [[wire("a")]]))
    import msgpack
    v1 = msgpack.packb([old.seq, [t.to_wire()[:18] for t in old.tasks.values()]],
                       use_bin_type=True)
    s = sm.TaskState()
    s.restore(v1)
    assert set(s.tasks) == {"a"} and list(s.dirty) == ["a"] and s.persisted_index == 0


def test_snapshot_restore_round_trip(h):
    h.submit(wire("a", key="k"), wire("b", run_at=T0 + 1), wire("c", labels=("gpu",)))
    h.lease("a")
    h.result("a", 1, p.ERRORED, retry_at=T0 + 9)
    other = sm.TaskState()
    other.restore(h.s.snapshot())
    assert other.snapshot() == h.s.snapshot()
    assert other.by_key == {"k": "a"}
    assert {s: list(ids) for s, ids in other.by_status.items()} == \
        {s: list(ids) for s, ids in h.s.by_status.items()}
    assert other.seq == h.s.seq


def test_replicas_applying_the_same_log_agree():
    """Determinism: two state machines fed the same random command log end equal."""
    rng = random.Random(7)
    a, b = Harness(), Harness()
    for step in range(400):
        ids = [f"t{i}" for i in range(30)]
        choice = rng.random()
        tid = rng.choice(ids)
        if choice < 0.3:
            cmd = (sm.SUBMIT, [[wire(tid, prio=rng.randint(0, 3), key=rng.choice(["", tid]))]])
        elif choice < 0.55:
            cmd = (sm.LEASE, [[tid, rng.randint(1, 3), "w", 0]])
        elif choice < 0.8:
            cmd = (sm.RESULT, [[tid, rng.randint(1, 3), rng.choice(sorted(p.OUTCOMES)), 1, "",
                                b"", b"", 0, 0, T0 + step, "w"]])
        elif choice < 0.9:
            cmd = (sm.CANCEL, [tid])
        else:
            cmd = (sm.EXPIRE, [[tid, rng.randint(1, 3), p.LOST, "x", T0]])
        assert a.do(*cmd, now=T0 + step) == b.do(*cmd, now=T0 + step)
    assert a.s.snapshot() == b.s.snapshot()


def test_unknown_command_is_an_error(h):
    with pytest.raises(ValueError, match="unknown command"):
        h.s.apply(2, sm.command("explode", T0, []))


# ---------------------------------------------------------------- dispatcher

def make_dispatcher(h):
    d = Dispatcher(h.s, worker_timeout=5.0, lease_grace=10.0, clock_us=lambda: T0)
    d.rebuild()
    return d


def worker(wid, credits=1, queues=("default",), labels=(), executors=("shell",)):
    return WorkerInfo(wid, wid.encode(), concurrency=credits, queues=frozenset(queues),
                      labels=frozenset(labels), executors=frozenset(executors), last_seen=1e18)


def test_dispatch_highest_priority_first_then_fifo(h):
    h.submit(wire("low1"), wire("high", prio=9), wire("low2"), wire("mid", prio=3))
    d = make_dispatcher(h)
    d.register(worker("w", credits=4))
    assert [lease[0] for lease in d.assign(T0)] == ["high", "mid", "low1", "low2"]


def test_dispatch_respects_queue_labels_and_executor(h):
    h.submit(wire("gpu", labels=("gpu",)), wire("mail", queue="mail"),
             wire("web", ttype="http"), wire("plain"))
    d = make_dispatcher(h)
    d.register(worker("cpu", credits=10))
    assert [x[0] for x in d.assign(T0)] == ["plain"]
    d.register(worker("big", credits=10, queues=("default", "mail"), labels=("gpu", "ssd"),
                      executors=("shell", "http")))
    assert sorted(x[0] for x in d.assign(T0)) == ["gpu", "mail", "web"]


def test_dispatch_spreads_load_to_most_free_slots(h):
    h.submit(*[wire(f"t{i}") for i in range(6)])
    d = make_dispatcher(h)
    d.register(worker("a", credits=4))
    d.register(worker("b", credits=2))
    leases = d.assign(T0)
    per_worker = {w: sum(1 for x in leases if x[2] == w) for w in "ab"}
    assert per_worker == {"a": 4, "b": 2}
    assert [x[2] for x in leases[:2]] == ["a", "a"]  # a had more free slots at first


def test_a_worker_asking_for_prefetch_gets_tasks_beyond_its_slots_until_it_stops(h):
    for i in range(10):
        h.submit(wire(f"t{i}"))
    d = make_dispatcher(h)
    w = d.register(worker("w", credits=2))
    w.report_credits(5, prefetch=3)  # 2 free slots + 3 prefetched
    assert w.free_slots() == 2  # what operators see: slots, not prefetch room
    assert [x[0] for x in d.assign(T0)] == ["t0", "t1", "t2", "t3", "t4"]
    assert w.free() == 0 and w.free_slots() == 0 and d.assign(T0) == []
    # a task turned long: it asks for no prefetch; its 5 held tasks cover its 2 slots
    w.report_credits(0, prefetch=0)
    for t in ("t0", "t1", "t2"):  # three results arrived
        del w.assigned[t]
    assert w.free() == 0 and not w.draining and d.assign(T0) == []
    del w.assigned["t3"]
    assert [x[0] for x in d.assign(T0)] == ["t5"]
    w.report_credits(1)  # an older worker says nothing of prefetch: the last word stands
    assert w.prefetch == 0 and w.capacity() == 2


def test_early_lease_runs_a_new_task_on_an_idle_worker_before_its_submit_applies(h):
    d = make_dispatcher(h)
    w = d.register(worker("w", credits=2))
    submitted = [wire("a", key="ka"), wire("b", key="kb"), wire("c", key="kc")]
    leases = d.assign_early(submitted, T0)
    assert [x[:3] for x in leases] == [("a", 1, "w"), ("b", 1, "w")]  # 2 slots: c waits
    assert "a" not in h.s.tasks and d.task("a").id == "a"  # leader-only, until it applies
    assert w.free() == 0
    # The log holds SUBMIT, then the LEASE, as the leader proposed them.
    assert h.submit(*submitted) == [["a", False], ["b", False], ["c", False]]
    for tid in ("a", "b", "c"):
        d.sync(tid)
    assert d.early == {}  # no early task (nor its key) left behind
    assert h.do(sm.LEASE, [list(x) for x in leases]) == [True, True]
    for tid, _, wid, _ in leases:
        d.lease_settled(tid, wid, True)
    assert h.s.tasks["a"].status == p.RUNNING and h.s.tasks["c"].status == p.PENDING
    assert d.assign(T0) == []  # no slot left for c
    assert d.stats()["early_leases"] == 2


def test_early_lease_takes_higher_priorities_first_and_overtakes_no_queued_task(h):
    d = make_dispatcher(h)
    w = d.register(worker("w", credits=1))
    leases = d.assign_early([wire("low"), wire("high", prio=5)], T0)
    assert [x[0] for x in leases] == ["high"]
    # A queued task this worker could run: nothing new is leased early ahead of it.
    h.submit(wire("queued"))
    d.sync("queued")
    del w.assigned["high"]  # its result arrived
    assert d.assign_early([wire("new", prio=9)], T0) == []
    assert [x[0] for x in d.assign(T0)] == ["queued"]


def test_early_lease_skips_duplicates_later_tasks_and_unserved_routes(h):
    h.submit(wire("old", key="k1"))
    d = make_dispatcher(h)
    d.register(worker("w", credits=10))
    d.assign(T0)  # "old" leased normally
    assert d.assign_early([
        wire("dup-key", key="k1"), wire("old"), wire("later", run_at=T0 + 1_000_000),
        wire("mail", queue="mail"), wire("x", key="k2"), wire("x-again", key="k2"),
        wire("mine"), wire("mine"),  # a client-chosen id twice
    ], T0) == [("x", 1, "w", 0), ("mine", 1, "w", 0)]


def test_early_lease_skips_resubmissions_of_tasks_still_being_submitted(h):
    d = make_dispatcher(h)
    d.register(worker("w", credits=10))
    # Proposed earlier, not applied yet, and not leased early (no worker was idle then).
    in_flight = [wire("first", key="k1"), wire("chosen-id")]
    leases = d.assign_early([wire("retry", key="k1"), wire("chosen-id"), wire("new")], T0,
                            in_flight)
    assert [x[0] for x in leases] == ["new"]
    assert d.assign_early([wire("retry2", key="k1")], T0) == [("retry2", 1, "w", 0)]


def test_an_early_lease_whose_submit_made_no_task_is_refused_and_frees_the_slot(h):
    h.submit(wire("first", key="k"))
    d = make_dispatcher(h)
    w = d.register(worker("w", credits=1))
    h.lease("first", worker="other")
    d.sync("first")
    # A wire that turns out a duplicate once applied (its key reached the log by
    # another leader's hand since): the lease for the id it would have had is refused.
    [lease] = d.assign_early([wire("second", key="k2")], T0)
    h.s.by_key["k2"] = "first"  # as if an earlier SUBMIT with k2 applied meanwhile
    assert h.submit(wire("second", key="k2")) == [["first", True]]
    assert h.do(sm.LEASE, [list(lease)]) == [False]
    d.lease_settled("second", "w", False)
    assert "second" not in h.s.tasks and d.early == {} and w.free() == 1


def test_scheduled_tasks_wait_for_their_timer(h):
    h.submit(wire("later", run_at=T0 + 2_000_000))
    d = make_dispatcher(h)
    d.register(worker("w", credits=1))
    assert d.assign(T0) == []
    d.fire_timers(T0 + 1_999_999)
    assert d.assign(T0) == []
    d.fire_timers(T0 + 2_000_000)
    assert [x[0] for x in d.assign(T0)] == ["later"]


def test_refused_lease_requeues_and_returns_the_credit(h):
    h.submit(wire("a"))
    d = make_dispatcher(h)
    w = d.register(worker("w", credits=1))
    [(tid, attempt, wid, _)] = d.assign(T0)
    h.do(sm.CANCEL, [tid])  # cancelled before the lease applied
    assert w.free() == 0
    granted = h.do(sm.LEASE, [[tid, attempt, wid, 0]])
    d.lease_settled(tid, wid, granted[0])
    assert granted == [False] and w.free() == 1 and d.assign(T0) == []


def test_lease_deadline_expires_a_running_task(h):
    h.submit(wire("a", timeout=1.0))
    d = make_dispatcher(h)
    d.register(worker("w", credits=1))
    [(tid, attempt, wid, deadline)] = d.assign(T0)
    assert deadline == T0 + 11_000_000  # timeout + grace
    h.do(sm.LEASE, [[tid, attempt, wid, deadline]])
    d.lease_settled(tid, wid, True)
    for changed in h.s.changed:  # as the server does after every apply
        d.sync(changed)
    assert d.fire_timers(deadline - 1) == []
    assert d.fire_timers(deadline) == [("a", 1, p.TIMED_OUT,
                                        "lease deadline passed (timeout + grace)")]


def test_new_leader_expects_workers_of_running_tasks(h):
    h.submit(wire("a"))
    h.lease("a", worker="w9")
    d = make_dispatcher(h)
    assert not d.workers["w9"].registered and d.workers["w9"].running == {"a"}
    assert [w.id for w in d.dead_workers(now=1e12)] == ["w9"]


def test_backoff_grows_caps_and_jitters():
    retry = RetryPolicy(max_retries=10, initial=1.0, multiplier=2.0, max_delay=5.0, jitter=0)
    assert [backoff_us(retry, n, random.Random(1)) // 1_000_000 for n in (1, 2, 3, 4)] == \
        [1, 2, 4, 5]
    jittery = RetryPolicy(initial=10.0, jitter=0.2)
    samples = {backoff_us(jittery, 1, random.Random(s)) for s in range(50)}
    assert len(samples) > 10 and all(8_000_000 <= x <= 12_000_000 for x in samples)


def test_results_are_fenced_by_worker_as_well_as_attempt(h):
    """A leader that died before a lease committed may have pushed attempt 1 to w1;
    the next leader leases attempt 1 to w2. Only w2's result may count."""
    h.submit(wire("a"))
    h.lease("a", worker="w2")
    assert h.result("a", 1, p.SUCCEEDED, worker="w1") == "stale"
    assert h.s.tasks["a"].status == p.RUNNING
    assert h.result("a", 1, p.SUCCEEDED, worker="w2") == p.COMPLETED


def test_rebuild_in_steps_indexes_every_task_and_holds_dispatch_until_done(h):
    h.submit(*[wire(f"t{i:04d}", prio=i % 7) for i in range(2500)])
    d = Dispatcher(h.s, worker_timeout=5.0, lease_grace=10.0, clock_us=lambda: T0)
    d.register(worker("w", credits=3000))
    d.start_rebuild()
    steps = 0
    while not d.rebuild_step(1000):
        assert d.assign(T0) == []  # a partial index must not dispatch out of order
        steps += 1
    assert steps == 2
    leases = d.assign(T0)
    assert len(leases) == 2500
    assert [x[0] for x in leases[:2]] == ["t0006", "t0013"]  # priority 6 first, FIFO


def test_a_lease_the_worker_no_longer_runs_is_expired_after_two_heartbeats(h):
    """The state says w1 runs 'a', but w1 does not list it and no result is on its way
    (its result went to a leader that lost office): it must not stay RUNNING forever."""
    from types import SimpleNamespace

    from dtask.broker.workers import WorkerDesk

    h.submit(wire("a"), wire("b"))
    h.lease("a", worker="w1")
    h.lease("b", worker="w1")
    d = make_dispatcher(h)
    w = d.register(worker("w1", credits=4), running={"b"})
    d.sync("a")
    d.sync("b")
    desk = WorkerDesk(SimpleNamespace(state=h.s, dispatcher=d,
                                      cfg=SimpleNamespace(heartbeat_interval=1.0)))
    desk._check_running(w, [["b", 1]])
    assert desk.expired == []  # once could be a race with a result in flight
    desk._check_running(w, [["b", 1]])
    assert [e[:3] for e in desk.expired] == [["a", 1, p.LOST]]
    w.assigned["a"] = time.monotonic()  # pushed again and not reported yet: not a suspect
    desk.expired.clear()
    desk._check_running(w, [["b", 1]])
    desk._check_running(w, [["b", 1]])
    assert desk.expired == [] and "a" in w.assigned
    # ...unless the push is older than PUSH_GRACE_HEARTBEATS intervals and the worker
    # still does not list it: that `run` never reached it (or it ignored it)
    w.assigned["a"] = time.monotonic() - 5.5
    desk._check_running(w, [["b", 1]])
    desk._check_running(w, [["b", 1]])
    assert [e[:3] for e in desk.expired] == [["a", 1, p.LOST]]
    assert "a" not in w.assigned  # its slot is free again


def test_rejected_attempts_do_not_use_up_retries(h):
    h.submit(wire("a", retries=0))
    h.lease("a")
    # A draining worker refused it without running it: it goes back, no retry used.
    assert h.result("a", 1, p.REJECTED, retry_at=T0) == p.RETRYING
    h.lease("a")
    assert h.result("a", 2, p.ERRORED) == p.FAILED  # the one real failure it may have


def test_a_task_every_worker_rejects_fails_eventually(h):
    h.submit(wire("a", retries=0))
    for n in range(1, sm.MAX_REJECTIONS + 1):
        h.lease("a")
        assert h.result("a", n, p.REJECTED, retry_at=T0) == p.RETRYING
    h.lease("a")
    assert h.result("a", sm.MAX_REJECTIONS + 1, p.REJECTED) == p.FAILED
