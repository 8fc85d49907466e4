"""Tests for dtask._fastqueue: ReadyQueue and TimerQueue against reference models."""

import gc
import heapq
import pickle
import random
import sys
import tracemalloc
import weakref

import pytest
from dtask._fastqueue import ReadyQueue, TimerQueue
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


class Colliding:
    """A key with deliberately few hash values, so probes must call __eq__."""

    __slots__ = ("v", "__weakref__")

    def __init__(self, v):
        self.v = v

    def __hash__(self):
        return self.v % 3  # collides with each other and with ints 0..2

    def __eq__(self, other):
        return isinstance(other, Colliding) and other.v == self.v

    def __repr__(self):
        return f"Colliding({self.v})"


# Fresh Colliding objects are equal-but-not-identical to queued ones, which
# exercises the __eq__ path and "the first-pushed object is kept".
KEYS = st.one_of(
    st.sampled_from([f"k{i}" for i in range(16)]),
    st.integers(0, 15),
    st.builds(Colliding, st.integers(0, 7)),
)
PRIORITIES = st.one_of(st.integers(-3, 3), st.sampled_from([INT64_MIN, INT64_MAX]))
STATEFUL = settings(max_examples=150, stateful_step_count=60, deadline=None)


class ReadyQueueMachine(RuleBasedStateMachine):
    """ReadyQueue vs a dict key -> ((-priority, seq), original key)."""

    def __init__(self):
        super().__init__()
        self.q = ReadyQueue(0)  # start tiny so heap and key table both grow
        self.model = {}
        self.next_seq = 100

    def take(self, got):
        """Check that `got` may pop next, and drop it from the model."""
        best = min(order for order, _ in self.model.values())
        order, original = self.model.pop(got)
        assert order == best  # equal (priority, seq) pairs may pop in any order
        assert got is original

    @rule(key=KEYS, priority=PRIORITIES, tie_seq=st.none() | st.integers(0, 2))
    def push(self, key, priority, tie_seq):
        if tie_seq is None:
            self.next_seq += 1
        seq = self.next_seq if tie_seq is None else tie_seq
        if key in self.model:
            with pytest.raises(KeyError):
                self.q.push(key, priority, seq)
        else:
            self.q.push(key, priority, seq)
            self.model[key] = ((-priority, seq), key)

    @rule()
    def pop(self):
        if not self.model:
            with pytest.raises(IndexError):
                self.q.pop()
        else:
            self.take(self.q.pop())

    @rule()
    def peek_then_pop(self):
        if not self.model:
            with pytest.raises(IndexError):
                self.q.peek()
            return
        head = self.q.peek()
        assert self.q.pop() is head
        self.take(head)

    @rule(n=st.integers(0, 6))
    def pop_many(self, n):
        got = self.q.pop_many(n)
        assert len(got) == min(n, len(self.model))
        for key in got:
            self.take(key)

    @rule(key=KEYS)
    def remove(self, key):
        assert self.q.remove(key) == (key in self.model)
        self.model.pop(key, None)

    @rule(key=KEYS)
    def lookups(self, key):
        assert (key in self.q) == (key in self.model)
        if key in self.model:
            assert self.q.priority_of(key) == -self.model[key][0][0]
        else:
            with pytest.raises(KeyError):
                self.q.priority_of(key)

    @invariant()
    def same_length(self):
        assert len(self.q) == len(self.model)


class TimerQueueMachine(RuleBasedStateMachine):
    """TimerQueue vs a dict key -> ((due, push counter), original key)."""

    def __init__(self):
        super().__init__()
        self.q = TimerQueue(0)
        self.model = {}
        self.pushes = 0

    @rule(key=KEYS, due=st.integers(0, 20) | st.sampled_from([INT64_MIN, INT64_MAX]))
    def push(self, key, due):
        old = self.model.get(key)
        assert self.q.push(key, due) is (old is None)
        self.pushes += 1
        original = key if old is None else old[1]  # rescheduling keeps the first object
        self.model[key] = ((due, self.pushes), original)

    @rule(now=st.integers(-1, 22), limit=st.integers(-1, 4))
    def pop_due(self, now, limit):
        due = sorted((v for v in self.model.values() if v[0][0] <= now), key=lambda v: v[0])
        if limit >= 0:
            due = due[:limit]
        got = self.q.pop_due(now, limit)
        assert len(got) == len(due)
        for key, (_, original) in zip(got, due, strict=True):
            assert key is original
            del self.model[key]

    @rule()
    def pop_everything(self):
        expected = [orig for _, orig in sorted(self.model.values(), key=lambda v: v[0])]
        got = self.q.pop_due(INT64_MAX)
        assert len(got) == len(expected)
        assert all(a is b for a, b in zip(got, expected, strict=True))
        self.model.clear()

    @rule(key=KEYS)
    def remove(self, key):
        assert self.q.remove(key) == (key in self.model)
        self.model.pop(key, None)

    @rule(key=KEYS)
    def lookups(self, key):
        assert (key in self.q) == (key in self.model)
        if key in self.model:
            assert self.q.due_of(key) == self.model[key][0][0]
        else:
            with pytest.raises(KeyError):
                self.q.due_of(key)

    @invariant()
    def same_length_and_head(self):
        assert len(self.q) == len(self.model)
        expected = min((v[0][0] for v in self.model.values()), default=None)
        assert self.q.next_due() == expected


TestReadyQueueMachine = STATEFUL(ReadyQueueMachine).TestCase
TestTimerQueueMachine = STATEFUL(TimerQueueMachine).TestCase


def test_ready_queue_matches_heapq_over_long_random_run():
    """Deep heaps and long probe runs: more entries than the stateful test reaches."""
    rnd = random.Random(7)
    q, ref, live = ReadyQueue(0), [], {}
    # str ids, ints with a stride, and ints differing only above bit 32
    # (their 64-bit hashes are folded into the table's 32-bit ones)
    pool = [f"task-{i}" for i in range(2000)] + list(range(0, 2000 * 1024, 1024))
    pool += [i << 32 for i in range(2000)]
    for seq in range(60_000):
        op, key = rnd.random(), rnd.choice(pool)
        if op < 0.5:
            if key in live:
                continue
            prio = rnd.randrange(8)
            q.push(key, prio, seq)
            live[key] = (-prio, seq)
            heapq.heappush(ref, (-prio, seq, key))
        elif op < 0.8:
            while ref and live.get(ref[0][2]) != ref[0][:2]:
                heapq.heappop(ref)  # lazily deleted
            if ref:
                assert q.pop() == ref[0][2]
                del live[heapq.heappop(ref)[2]]
        else:
            assert q.remove(key) == (live.pop(key, None) is not None)
        assert len(q) == len(live)
    rest = sorted((order, key) for key, order in live.items())
    assert q.pop_many(len(rest) + 5) == [key for _, key in rest]


# -- edge cases ---------------------------------------------------------------


def test_empty_queues():
    q, t = ReadyQueue(), TimerQueue()
    for call in (q.pop, q.peek):
        with pytest.raises(IndexError):
            call()
    assert q.pop_many(3) == [] and q.pop_many(0) == []
    assert t.pop_due(INT64_MAX) == [] and t.next_due() is None
    assert not q.remove("x") and not t.remove("x")
    assert "x" not in q and len(q) == 0 and not q
    with pytest.raises(ValueError):
        q.pop_many(-1)


def test_fifo_within_priority_and_pop_many_order():
    q = ReadyQueue()
    pushes = [("a", 1, 5), ("b", 3, 9), ("c", 1, 2), ("d", 3, 1), ("e", 2, 7), ("f", 3, 4)]
    for key, prio, seq in pushes:
        q.push(key, prio, seq)
    assert q.peek() == "d"
    assert q.pop_many(4) == ["d", "f", "b", "e"]
    assert q.pop_many(10) == ["c", "a"]


def test_duplicate_push_raises_and_leaves_entry_alone():
    q = ReadyQueue()
    q.push("a", 1, 1)
    with pytest.raises(KeyError):
        q.push("a", 9, 0)
    with pytest.raises(KeyError):
        q.push("".join(["a"]), 9, 0)  # equal, not identical
    assert q.priority_of("a") == 1 and len(q) == 1
    q.push(1, 0, 2)
    with pytest.raises(KeyError):
        q.push(1.0, 0, 3)  # dict rules: 1 == 1.0 is the same key


@pytest.mark.parametrize("victim", ["root", "last", "middle", "only"])
def test_remove_positions(victim):
    q = ReadyQueue()
    n = 1 if victim == "only" else 50
    for i in range(n):
        q.push(i, 0, i)  # heap order == push order: 0 is the root, n-1 the last slot
    key = {"root": 0, "last": n - 1, "middle": 17, "only": 0}[victim]
    assert q.remove(key)
    assert key not in q and not q.remove(key)
    assert q.pop_many(n) == [i for i in range(n) if i != key]


def test_timer_pop_due_limit_and_ties():
    t = TimerQueue()
    for key, due in [("a", 30), ("b", 10), ("c", 20), ("d", 10), ("e", 20)]:
        assert t.push(key, due)
    assert t.next_due() == 10
    assert t.pop_due(5) == []
    assert t.pop_due(20, limit=0) == []
    assert t.pop_due(20, limit=3) == ["b", "d", "c"]  # ties in push order
    assert t.pop_due(20, limit=3) == ["e"]
    assert t.pop_due(29) == [] and t.next_due() == 30
    assert t.pop_due(30, limit=-1) == ["a"] and t.next_due() is None


def test_timer_push_existing_key_reschedules():
    t = TimerQueue()
    for key, due in [("a", 10), ("b", 20), ("c", 30)]:
        t.push(key, due)
    assert t.push("c", 5) is False  # earlier: moves up to the root
    assert t.push("a", 20) is False  # later, and behind b at the same due
    assert len(t) == 3 and t.due_of("a") == 20
    assert t.pop_due(100) == ["c", "b", "a"]


def test_remove_root_and_last_of_timer_queue():
    t = TimerQueue()
    for i in range(20):
        t.push(f"t{i}", i)
    assert t.remove("t0") and t.remove("t19")
    assert t.next_due() == 1
    assert t.pop_due(100) == [f"t{i}" for i in range(1, 19)]


def test_int64_range_and_integer_only():
    q, t = ReadyQueue(), TimerQueue()
    q.push("lo", INT64_MIN, INT64_MAX)
    q.push("hi", INT64_MAX, INT64_MIN)
    assert q.priority_of("lo") == INT64_MIN and q.pop_many(2) == ["hi", "lo"]
    t.push("x", INT64_MIN)
    assert t.next_due() == INT64_MIN
    for bad in (lambda: q.push("f", 1.0, 1), lambda: q.push("f", 1, 2.5),
                lambda: t.push("f", 1.5), lambda: t.pop_due(1e6)):
        with pytest.raises(TypeError):  # float seconds mistaken for int microseconds
            bad()
    with pytest.raises(OverflowError):
        q.push("big", INT64_MAX + 1, 0)
    with pytest.raises(OverflowError):
        t.push("big", INT64_MIN - 1)

    class Index:
        def __index__(self):
            return 7

    t.push("idx", Index())
    assert t.due_of("idx") == 7 and "f" not in q and "big" not in t


def test_unhashable_key_changes_nothing():
    q = ReadyQueue()
    with pytest.raises(TypeError):
        q.push([], 1, 1)
    with pytest.raises(TypeError):
        [] in q  # noqa: B015 - like dict, membership needs a hashable key
    assert len(q) == 0


def test_construction_and_pickling():
    with pytest.raises(ValueError):
        ReadyQueue(-1)
    bare = TimerQueue.__new__(TimerQueue)  # __init__ skipped: still usable
    bare.push("a", 1)
    assert bare.pop_due(1) == ["a"]
    assert repr(ReadyQueue(capacity_hint=10)) == "ReadyQueue(len=0)"
    with pytest.raises(TypeError):
        pickle.dumps(ReadyQueue())


# -- keys that run Python code --------------------------------------------------


class Hooked:
    """Hashes to 42 and runs `hook` from __eq__ (when probed against)."""

    def __init__(self, name, hook=None):
        self.name, self.hook = name, hook

    def __hash__(self):
        return 42

    def __eq__(self, other):
        if self.hook:
            self.hook()
        return self is other


@pytest.mark.parametrize("mutate", ["push", "pop", "remove", "pop_many"])
def test_mutation_from_key_eq_is_refused(mutate):
    q = ReadyQueue()
    q.push("x", 0, 0)
    actions = {"push": lambda: q.push("y", 0, 1), "pop": q.pop,
               "remove": lambda: q.remove("x"), "pop_many": lambda: q.pop_many(1)}
    q.push(Hooked("first", actions[mutate]), 1, 2)
    with pytest.raises(RuntimeError, match="modified from a key's"):
        q.push(Hooked("second"), 1, 3)  # probing compares against "first"
    assert len(q) == 2 and q.pop_many(5)[1] == "x"


def test_read_inside_key_eq_is_allowed_and_keeps_the_guard():
    q = ReadyQueue()
    seen, nested = [], []

    def hook():
        if nested:
            return  # the nested lookup below calls us again
        nested.append(True)
        # Reads are fine; the second one runs __eq__ itself, nested in ours.
        seen.append(("x" in q, Hooked("other") in q, len(q), q.peek().name))
        q.push("y", 0, 9)  # still inside the outer push: must be refused

    q.push(Hooked("first", hook), 1, 1)
    with pytest.raises(RuntimeError, match="modified from a key's") as err:
        q.push(Hooked("second"), 1, 2)
    assert type(err.value) is RuntimeError
    assert seen == [(False, False, 1, "first")] and len(q) == 1


def test_key_eq_exception_propagates_without_change():
    def boom():
        raise ValueError("eq failed")

    q = TimerQueue()
    q.push(Hooked("first", boom), 1)
    second = Hooked("second")
    before = sys.getrefcount(second)
    with pytest.raises(ValueError):
        q.push(second, 2)
    assert len(q) == 1 and sys.getrefcount(second) == before


# -- references and memory ----------------------------------------------------------


def fresh_key(i):
    return "".join(["key-", str(i)])  # built at run time: no interning, no constants


def test_refcounts_through_every_exit():
    q, t = ReadyQueue(), TimerQueue()
    keys = [fresh_key(i) for i in range(6)]
    base = [sys.getrefcount(k) for k in keys]

    def held():  # references taken since `base`, counted the same way
        return [sys.getrefcount(k) - b for k, b in zip(keys, base, strict=True)]

    base = [b + 1 for b in base]  # zip's tuple in held() holds one more
    for i in range(3):
        q.push(keys[i], 0, i)
        t.push(keys[i + 3], i)
    assert held() == [1] * 6  # exactly one reference per queued key
    with pytest.raises(KeyError):
        q.push(keys[0], 0, 9)
    t.push(fresh_key(5), 99)  # reschedule with an equal object: nothing new kept
    assert held() == [1] * 6
    got = q.pop()
    assert got is keys[0] and held()[0] == 2
    del got
    assert q.pop_many(1) == [keys[1]] and q.remove(keys[2])
    assert t.pop_due(0) == [keys[3]] and t.remove(keys[4])
    assert held() == [0, 0, 0, 0, 0, 1]
    del t  # dealloc releases what is still queued
    assert held() == [0] * 6


def test_dealloc_releases_keys_and_memory():
    class Key:
        pass

    keys = [Key() for _ in range(100_000)]
    refs = [weakref.ref(k) for k in keys[:100]]
    gc.collect()
    tracemalloc.start()
    try:
        start = tracemalloc.get_traced_memory()[0]
        q = ReadyQueue(0)
        for i, k in enumerate(keys):
            q.push(k, i % 7, i)
        assert tracemalloc.get_traced_memory()[0] - start > 100_000 * 24
        del q
        assert tracemalloc.get_traced_memory()[0] - start < 4096
    finally:
        tracemalloc.stop()
    del keys
    assert all(r() is None for r in refs)


# -- scale ----------------------------------------------------------------------------


def test_million_entries_pop_in_order():
    n, prios = 1_000_000, 100
    rnd = random.Random(1)
    prio = [rnd.randrange(prios) for _ in range(n)]
    q = ReadyQueue(0)
    push = q.push
    for i in range(n):
        push(i, prio[i], i)  # key == seq
    buckets = [[] for _ in range(prios)]
    for i in range(n):
        buckets[prio[i]].append(i)  # already in seq order
    expected = [i for p in reversed(range(prios)) for i in buckets[p]]
    assert q.pop_many(n) == expected
    assert len(q) == 0


def test_million_timers_pop_due_in_chunks():
    n, span = 1_000_000, 10_000
    rnd = random.Random(2)
    due = [rnd.randrange(span) for _ in range(n)]
    t = TimerQueue(n)
    push = t.push
    for i in range(n):
        push(i, due[i])
    buckets = [[] for _ in range(span)]
    for i in range(n):
        buckets[due[i]].append(i)  # push order within a due time
    got = []
    for now in range(0, span, 100):
        got += t.pop_due(now + 99)
    assert got == [i for b in buckets for i in b]
    assert t.next_due() is None
