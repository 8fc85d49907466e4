"""Tests for dtask.raft.linearizability: classic examples, unknown outcomes, per-key
partitioning, timeouts, generated histories, and a brute-force oracle for small ones."""

from __future__ import annotations

import math
import random
import time
from dataclasses import replace

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from dtask.raft.linearizability import CheckResult, Operation, check_kv

INF = math.inf


def put(client: int, call: float, ret: float, value: object, key: str = "x") -> Operation:
    return Operation(client, call, ret, "put", key, value)


def get(client: int, call: float, ret: float, output: object, key: str = "x") -> Operation:
    return Operation(client, call, ret, "get", key, None, output)


def append(client: int, call: float, ret: float, value: str, key: str = "x") -> Operation:
    return Operation(client, call, ret, "append", key, value)


def cas(
    client: int, call: float, ret: float, expected: object, new: object, ok: object, key: str = "x"
) -> Operation:
    return Operation(client, call, ret, "cas", key, (expected, new), ok)


def assert_ok(history: list[Operation]) -> CheckResult:
    res = check_kv(history)
    assert res.ok and not res.timed_out, res.detail
    return res


def assert_rejected(history: list[Operation], key: str = "x") -> CheckResult:
    res = check_kv(history)
    assert not res.ok and not res.timed_out, res.detail
    assert res.key == key
    return res


# --- classic examples ------------------------------------------------------------------


def test_empty_history_is_linearizable() -> None:
    assert_ok([])


def test_sequential_history_ok() -> None:
    assert_ok(
        [
            get(0, 0, 1, None),
            put(0, 2, 3, "a"),
            get(1, 4, 5, "a"),
            put(1, 6, 7, "b"),
            get(0, 8, 9, "b"),
        ]
    )


def test_stale_read_after_completed_write_rejected() -> None:
    assert_rejected([put(0, 0, 1, "a"), put(0, 2, 3, "b"), get(1, 4, 5, "a")])


def test_read_of_initial_value_after_completed_write_rejected() -> None:
    assert_rejected([put(0, 0, 1, "a"), get(1, 2, 3, None)])


def test_read_concurrent_with_write_may_see_either_value() -> None:
    assert_ok([put(0, 0, 10, "a"), get(1, 1, 2, None), get(1, 3, 4, "a")])
    assert_ok([put(0, 0, 10, "a"), get(1, 1, 2, "a")])
    assert_ok([put(0, 0, 10, "a"), get(1, 1, 2, None)])


def test_porcupine_register_shapes() -> None:
    # porcupine's TestRegisterModel, with 0 as the initial value written first.
    init = put(9, -2, -1, 0)
    assert_ok([init, put(0, 0, 100, 100), get(1, 25, 75, 100), get(2, 30, 60, 0)])
    # Once a read returned 200, a later read cannot return the old value again.
    assert_rejected([init, put(0, 0, 100, 200), get(1, 10, 30, 200), get(2, 40, 90, 0)])


def test_two_readers_disagree_on_order_of_concurrent_writes_rejected() -> None:
    writes = [put(0, 0, 100, "a"), put(1, 0, 100, "b")]
    # Each reader alone is fine...
    assert_ok([*writes, get(2, 10, 20, "a"), get(2, 30, 40, "b")])
    assert_ok([*writes, get(3, 10, 20, "b"), get(3, 30, 40, "a")])
    # ...but a->b for one and b->a for the other (overlapping in time) is not.
    assert_rejected(
        [
            *writes,
            get(2, 10, 20, "a"),
            get(2, 30, 40, "b"),
            get(3, 10, 20, "b"),
            get(3, 30, 40, "a"),
        ]
    )


def test_touching_intervals_count_as_concurrent() -> None:
    # Returns at t=1, the get is called at t=1: porcupine orders calls first, so concurrent.
    assert_ok([put(0, 0, 1, "a"), get(1, 1, 2, None)])


def test_cas_success_and_failure() -> None:
    assert_ok(
        [
            cas(0, 0, 1, None, "a", True),
            cas(1, 2, 3, "b", "c", False),
            cas(0, 4, 5, "a", "b", True),
            get(1, 6, 7, "b"),
        ]
    )
    # Claims success although the current value differs.
    assert_rejected([put(0, 0, 1, "a"), cas(1, 2, 3, "z", "b", True)])
    # Claims failure although the expected value was there.
    assert_rejected([put(0, 0, 1, "a"), cas(1, 2, 3, "a", "b", False)])
    # A failed cas must not change the value.
    assert_rejected([put(0, 0, 1, "a"), cas(1, 2, 3, "z", "b", False), get(0, 4, 5, "b")])


def test_concurrent_cas_only_one_wins() -> None:
    assert_ok([cas(0, 0, 10, None, "a", True), cas(1, 0, 10, None, "b", False)])
    assert_rejected([cas(0, 0, 10, None, "a", True), cas(1, 0, 10, None, "b", True)])


def test_append() -> None:
    assert_ok([append(0, 0, 1, "a"), append(1, 2, 3, "b"), get(0, 4, 5, "ab")])
    assert_rejected([append(0, 0, 1, "a"), append(1, 2, 3, "b"), get(0, 4, 5, "ba")])
    # Concurrent appends: either order, but each applies exactly once.
    both = [append(0, 0, 10, "a"), append(1, 0, 10, "b")]
    assert_ok([*both, get(2, 11, 12, "ab")])
    assert_ok([*both, get(2, 11, 12, "ba")])
    assert_rejected([*both, get(2, 11, 12, "a")])
    assert_rejected([*both, get(2, 11, 12, "aab")])
    # Append to an existing put value.
    assert_ok([put(0, 0, 1, "p"), append(0, 2, 3, "q"), get(1, 4, 5, "pq")])


# --- operations with unknown outcome ---------------------------------------------------


def test_read_of_value_written_only_by_timed_out_put_ok() -> None:
    assert_ok([put(0, 0, INF, "a"), get(1, 5, 6, "a")])


def test_timed_out_put_may_never_take_effect() -> None:
    assert_ok([put(0, 0, INF, "a"), get(1, 5, 6, None), get(1, 7, 8, None)])


def test_timed_out_put_may_take_effect_late() -> None:
    # Takes effect after the completed put of "b", which was invoked later.
    assert_ok([put(0, 0, INF, "a"), put(1, 1, 2, "b"), get(1, 3, 4, "b"), get(1, 5, 6, "a")])


def test_read_of_value_nobody_wrote_rejected() -> None:
    assert_rejected([put(0, 0, INF, "a"), put(1, 1, 2, "b"), get(1, 3, 4, "zzz")])


def test_timed_out_op_cannot_take_effect_before_its_call() -> None:
    assert_rejected([get(1, 0, 1, "a"), put(0, 2, INF, "a")])


def test_timed_out_op_takes_effect_at_most_once() -> None:
    # Once the read saw "a" and "b" overwrote it, "a" cannot come back.
    assert_rejected([put(0, 0, INF, "a"), get(1, 1, 2, "a"), put(1, 3, 4, "b"), get(1, 5, 6, "a")])
    assert_rejected([append(0, 0, INF, "a"), get(1, 1, 2, "aa")])
    assert_ok([append(0, 0, INF, "a"), append(1, 1, 2, "b"), get(1, 3, 4, "ba")])


def test_timed_out_op_may_land_after_a_later_put() -> None:
    # The checker never lets a put directly overwrite a timed-out op's unseen effect; these
    # make sure that pruning still finds orders where the timed-out op comes after the put.
    assert_ok([put(0, 0, INF, "a"), put(1, 1, 2, "b"), get(1, 3, 4, "a")])
    assert_ok([append(0, 0, INF, "x"), put(1, 1, 2, "b"), get(1, 3, 4, "bx")])
    assert_ok([append(0, 0, INF, "x"), get(1, 1, 2, "x"), put(1, 3, 4, "b"), get(1, 5, 6, "b")])
    assert_rejected([append(0, 0, INF, "x"), put(1, 1, 2, "b"), get(1, 3, 4, "xb")])


def test_pruning_keeps_resets_that_can_explain_a_read() -> None:
    # The look-ahead rejects a state the next read cannot see unless a put/cas invoked in
    # time could reset the value to something it can. Valid histories relying on that:
    # - the timed-out append is seen by a long read, then a put resets before the next read;
    assert_ok(
        [
            put(0, 0, 1, "a"),
            append(1, 2, INF, "x"),
            get(2, 3, 10, "ax"),
            put(3, 4, 8, "v"),
            get(4, 5, 7, "v"),
        ]
    )
    # - a timed-out cas (whose precondition the append makes true) explains the read;
    assert_ok(
        [
            put(0, 0, 1, "a"),
            append(1, 2, 3, "b"),
            cas(2, 2.5, INF, "ab", "z", None),
            get(3, 4, 5, "z"),
        ]
    )
    # - a completed cas that succeeded saw its expected value, then reset it.
    assert_ok(
        [
            put(0, 0, 1, "a"),
            append(1, 2, INF, "x"),
            cas(2, 3, 6, "ax", "z", True),
            get(3, 4, 5, "z"),
        ]
    )
    assert_rejected(
        [
            put(0, 0, 1, "a"),
            append(1, 2, INF, "x"),
            cas(2, 3, 6, "ay", "z", True),
            get(3, 4, 5, "z"),
        ]
    )


def test_output_of_timed_out_ops_is_ignored() -> None:
    assert_ok([get(0, 0, INF, "garbage"), put(1, 1, 2, "a"), get(1, 3, 4, "a")])
    # A timed-out cas reporting "success" must not force success (nor failure).
    assert_ok([put(0, 0, 1, "a"), cas(1, 2, INF, "zzz", "b", True), get(0, 3, 4, "a")])
    assert_ok([put(0, 0, 1, "a"), cas(1, 2, INF, "a", "b", False), get(0, 3, 4, "b")])
    assert_rejected([put(0, 0, 1, "a"), cas(1, 2, INF, "zzz", "b", True), get(0, 3, 4, "b")])


def test_many_timed_out_ops_do_not_blow_up() -> None:
    # 24 timed-out puts, all still possible at the end, then an impossible read: the search
    # must not try every subset of the pending ops (2^24 here).
    history = [put(c % 5, c, INF, f"p{c}") for c in range(24)]
    for i in range(24):
        history.append(put(5, 100 + 4 * i, 101 + 4 * i, f"v{i}"))
        history.append(get(6, 102 + 4 * i, 103 + 4 * i, f"v{i}"))
    # A timeout, not a wall-clock assert, so a regression fails fast instead of hanging.
    res = check_kv([*history, get(6, 1000, 1001, "p7")], timeout=5.0)
    assert res.ok and not res.timed_out, res.detail
    res = check_kv([*history, get(6, 1000, 1001, "never-written")], timeout=5.0)
    assert not res.ok and not res.timed_out
    assert "? (outcome unknown)" in res.detail


def test_many_timed_out_appends_do_not_blow_up() -> None:
    # 12 timed-out appends could be applied in 12! orders (times subsets) before each read.
    history = [append(c % 5, c, INF, f"t{c}.") for c in range(12)]
    history += [put(5, 50, 51, "v"), get(6, 52, 53, "v")]
    history += [append(5, 54 + 2 * i, 55 + 2 * i, f"c{i}.") for i in range(10)]
    seen = (
        "v"
        + "".join(f"c{i}." for i in range(5))
        + "t7.t3."
        + "".join(f"c{i}." for i in range(5, 10))
    )
    res = check_kv([*history, get(6, 100, 101, seen)], timeout=5.0)
    assert res.ok and not res.timed_out, res.detail
    wrong = seen.replace("t7.t3.", "t7.t7.")  # one op cannot take effect twice
    res = check_kv([*history, get(6, 100, 101, wrong)], timeout=5.0)
    assert not res.ok and not res.timed_out


# --- partitioning, reporting, timeouts, validation -------------------------------------


def test_failure_on_one_key_is_reported_with_that_key() -> None:
    history = [
        put(0, 0, 1, "a", key="x"),
        get(1, 2, 3, "a", key="x"),
        put(0, 4, 5, "b", key="y"),
        get(1, 6, 7, "stale", key="y"),
        put(2, 8, 9, "c", key="z"),
    ]
    res = assert_rejected(history, key="y")
    lines = res.detail.splitlines()
    assert "'y'" in lines[0]
    # Only y's ops, in call order.
    assert [ln.split()[-3] for ln in lines[1:3]] == ["put('b')", "get()"]
    assert "'stale'" in lines[2]
    assert len(lines) == 4 and lines[3].startswith("longest linearizable prefix")


def test_keys_are_independent() -> None:
    # Each key alone is linearizable; a cross-key "anomaly" is not our business.
    assert_ok(
        [
            put(0, 0, 10, "a", key="x"),
            put(1, 0, 10, "a", key="y"),
            get(2, 1, 2, "a", key="x"),
            get(2, 3, 4, None, key="y"),
        ]
    )


def test_timeout_is_inconclusive_not_a_failure() -> None:
    bad = [put(0, 0, 1, "a"), get(1, 2, 3, None)]
    res = check_kv(bad, timeout=0.0)
    assert res.ok and res.timed_out
    assert "INCONCLUSIVE" in res.detail and res.key == "x"
    # With time to spare the verdict is definite.
    res = check_kv(bad, timeout=10.0)
    assert not res.ok and not res.timed_out
    res = check_kv([put(0, 0, 1, "a")], timeout=10.0)
    assert res.ok and not res.timed_out and res.key is None


def test_invalid_operations_raise() -> None:
    with pytest.raises(ValueError):
        check_kv([put(0, 2, 1, "a")])
    with pytest.raises(ValueError):
        check_kv([Operation(0, 0, 1, "delete", "x")])
    with pytest.raises(ValueError):
        check_kv([Operation(0, 0, 1, "cas", "x", "a", True)])


# --- generated histories ----------------------------------------------------------------

# (client, kind, key, think time before the call, duration, linearization point as a
# fraction of the interval, outcome: "ok" | "lost" (timed out, never applied) |
# "applied" (timed out, but took effect))
Spec = tuple[int, str, int, float, float, float, str]


def simulate(specs: list[Spec], n_keys: int) -> list[Operation]:
    """Run `specs` against a dict in linearization-point order; record what clients see.

    Each client issues its ops one after another; each op takes effect at one instant
    inside its [call, ret] interval, so the resulting history is linearizable.
    """
    clock: dict[int, float] = {}
    timed: list[tuple[float, int, int, float, float, Spec]] = []
    for idx, spec in enumerate(specs):
        client, _, _, gap, dur, frac, _ = spec
        call = clock.get(client, 0.0) + gap
        ret = call + dur
        clock[client] = ret  # a timed-out client gives up at `ret` and carries on
        timed.append((call + frac * dur, idx, client, call, ret, spec))
    timed.sort()
    state: dict[str, str] = {}
    out: list[Operation] = []
    for _, idx, client, call, ret, (_, kind, k, _, _, _, outcome) in timed:
        key = f"k{k}"
        cur = state.get(key)
        value: object = None
        output: object = None
        if kind == "put":
            value = f"v{idx}"
        elif kind == "append":
            value = f"a{idx}."
        elif kind == "cas":
            # Half the time expect the current value (so it succeeds), else a stale one.
            value = (cur, f"c{idx}") if idx % 2 == 0 else (f"v{idx - 1}", f"c{idx}")
        if outcome != "lost":
            if kind == "get":
                output = cur
            elif kind == "put":
                state[key] = value  # type: ignore[assignment]
            elif kind == "append":
                state[key] = (cur or "") + value  # type: ignore[operator]
            else:
                expected, new = value  # type: ignore[misc]
                output = cur == expected
                if output:
                    state[key] = new
        if outcome != "ok":
            ret = INF
            output = "garbage" if kind == "get" else output
        out.append(Operation(client, call, ret, kind, key, value, output))
    out.sort(key=lambda o: o.call)  # recorded order must not matter, but be realistic
    return out


def spec_strategy(n_clients: int, n_keys: int, ok_weight: int = 8) -> st.SearchStrategy[Spec]:
    return st.tuples(
        st.integers(0, n_clients - 1),
        st.sampled_from(["get", "get", "put", "append", "cas"]),
        st.integers(0, n_keys - 1),
        st.floats(0, 2, allow_nan=False),
        st.floats(0, 5, allow_nan=False),
        st.floats(0, 1, allow_nan=False),
        st.sampled_from(["ok"] * ok_weight + ["lost", "applied"]),
    )


def random_specs(
    rng: random.Random,
    n: int,
    n_clients: int,
    n_keys: int,
    max_dur: float = 5.0,
    p_timeout: float = 0.05,
) -> list[Spec]:
    def outcome() -> str:
        if rng.random() >= p_timeout:
            return "ok"
        return rng.choice(["lost", "applied"])

    return [
        (
            rng.randrange(n_clients),
            rng.choice(["get", "get", "put", "append", "cas"]),
            rng.randrange(n_keys),
            rng.uniform(0, 2),
            rng.uniform(0.1, max_dur),
            rng.random(),
            outcome(),
        )
        for _ in range(n)
    ]


NEVER = "NEVER!"  # no put/append/cas writes this, nor can appends of "aN." spell it


def mutate_a_get(history: list[Operation], pick: int) -> list[Operation] | None:
    gets = [i for i, o in enumerate(history) if o.kind == "get" and o.ret != INF]
    if not gets:
        return None
    i = gets[pick % len(gets)]
    return [*history[:i], replace(history[i], output=NEVER), *history[i + 1 :]]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(spec_strategy(5, 3), max_size=60), st.integers(0, 1000))
def test_executed_histories_accepted_and_mutated_rejected(specs: list[Spec], pick: int) -> None:
    history = simulate(specs, 3)
    assert_ok(history)
    mutated = mutate_a_get(history, pick)
    assume(mutated is not None)
    assert mutated is not None
    res = check_kv(mutated)
    assert not res.ok and not res.timed_out
    assert res.key == next(o.key for o in mutated if o.output == NEVER)


# --- brute-force oracle on small single-key histories ---------------------------------


def brute_force(history: list[Operation]) -> bool:
    """Is there an order of all completed ops plus any subset of the timed-out ones that
    respects real time and is legal? Plain exhaustive search, no caching."""

    def step(state: object, o: Operation) -> tuple[bool, object]:
        unknown = o.ret == INF
        if o.kind == "get":
            return unknown or state == o.output, state
        if o.kind == "put":
            return True, o.value
        if o.kind == "append":
            return True, (state or "") + o.value  # type: ignore[operator]
        expected, new = o.value  # type: ignore[misc]
        success = state == expected
        return unknown or success == o.output, new if success else state

    n = len(history)

    def search(placed: frozenset[int], state: object) -> bool:
        if all(i in placed or history[i].ret == INF for i in range(n)):
            return True
        for i in range(n):
            if i in placed:
                continue
            # i may go next iff every unplaced op j that returned before i's call is placed.
            if any(j not in placed and history[j].ret < history[i].call for j in range(n)):
                continue
            ok, new = step(state, history[i])
            if ok and search(placed | {i}, new):
                return True
        return False

    return search(frozenset(), None)


small_op = st.builds(
    lambda client, call, dur, timed_out, kind, value, exp, new, read, flag: Operation(
        client,
        float(call),
        INF if timed_out else float(call + dur),
        kind,
        "x",
        {"put": value, "append": value, "cas": (exp, new), "get": None}[kind],
        {"get": read, "cas": flag, "put": None, "append": None}[kind],
    ),
    st.integers(0, 3),
    st.integers(0, 6),
    st.integers(0, 4),
    st.sampled_from([False, False, False, True, True]),
    st.sampled_from(["put", "get", "append", "cas"]),
    st.sampled_from(["a", "b"]),
    st.sampled_from([None, "a", "b"]),
    st.sampled_from(["a", "b"]),
    st.sampled_from([None, "a", "b", "ab", "ba"]),
    st.booleans(),
)


@settings(max_examples=400, deadline=None)
@given(st.lists(small_op, max_size=6))
def test_agrees_with_brute_force_oracle(history: list[Operation]) -> None:
    assert check_kv(history).ok == brute_force(history), history


def perturb(history: list[Operation], which: int, pick: int) -> list[Operation]:
    """Change one completed get/cas output to a plausible wrong (or right) one."""
    targets = [i for i, o in enumerate(history) if o.ret != INF and o.kind in ("get", "cas")]
    if not targets:
        return history
    i = targets[which % len(targets)]
    o = history[i]
    if o.kind == "cas":
        return [*history[:i], replace(o, output=not o.output), *history[i + 1 :]]
    pool: list[object] = [None]
    pool += [x.output for x in history if x.kind == "get"]
    pool += [x.value for x in history if x.kind == "put"]
    pool += [(o.output or "") + x.value for x in history if x.kind == "append"]  # type: ignore[operator]
    return [*history[:i], replace(o, output=pool[pick % len(pool)]), *history[i + 1 :]]


@settings(max_examples=300, deadline=None)
@given(
    st.lists(spec_strategy(3, 1, ok_weight=2), min_size=1, max_size=8),
    st.booleans(),
    st.integers(0, 1000),
    st.integers(0, 1000),
)
def test_agrees_with_brute_force_on_perturbed_executions(
    specs: list[Spec], mutate: bool, which: int, pick: int
) -> None:
    # Real executions, half of them with a near-miss output: exercises the pruning of
    # timed-out ops (half of the ops here) right at the linearizable/not boundary.
    history = simulate(specs, 1)
    if mutate:
        history = perturb(history, which, pick)
    assert check_kv(history).ok == brute_force(history), history


# --- speed --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("seed", "max_dur", "p_timeout"),
    [(seed, 5.0, 0.05) for seed in range(5)] + [(seed, 10.0, 0.2) for seed in range(5)],
)
def test_sim_sized_history_is_fast(seed: int, max_dur: float, p_timeout: float) -> None:
    rng = random.Random(seed)
    specs = random_specs(rng, 300, n_clients=5, n_keys=4, max_dur=max_dur, p_timeout=p_timeout)
    history = simulate(specs, 4)
    start = time.perf_counter()
    res = check_kv(history, timeout=5.0)
    assert res.ok and not res.timed_out, res.detail
    mutated = mutate_a_get(history, seed)
    assert mutated is not None
    res = check_kv(mutated, timeout=5.0)
    assert not res.ok and not res.timed_out
    # Typically a few ms each; the bound only catches a search that went exponential.
    assert time.perf_counter() - start < 1.0
