"""Linearizability checker for client histories against the replicated key-value store.

The Raft simulator records every client operation with its invocation and response time;
`check_kv` decides whether some total order of the operations (a) respects real time (an
operation that returned before another was invoked comes first) and (b) is a legal
sequential execution of a key-value map. This is the Wing & Gong search with Lowe's
improvements, as in porcupine's `checker.go`:

* call and return events, sorted by time, form a doubly linked list; the candidates for the
  next linearization point are the calls before the first remaining return event;
* a depth-first search "lifts" a call (and its return) out of the list when the model
  accepts the operation, and puts it back when backtracking (dancing-links style);
* a cache of visited (linearized-set, model state) pairs prunes re-exploring the same
  sub-problem reached through a different interleaving;
* the history is split per key (P-compositionality): a key-value history is linearizable
  iff each key's sub-history is, and small searches are exponentially cheaper.

Operations with an unknown outcome (``ret == math.inf``: timed out, leader lost) may take
effect at any point after their call, or never, and their output is unknown. They only get
a call event (no return), so they never block the search; the search succeeds once every
*completed* operation is linearized, which leaves the rest as "never happened" (or "happened
after everything", indistinguishable). Each can be used or not, anywhere, so k of them could
mean 2^k subsets in k! orders. What keeps that in check:

* subsumption instead of plain caching: per (completed-set, state) the cache keeps the sets
  of pending ops used on visited nodes, and prunes a node whose used set is a superset of one
  of them (same constraints and state, fewer ops left: it cannot succeed where that failed);
  completed ops are tried before pending ones, so the first visit tends to use few;
* canonical orders: a pending get (no effect, nothing observed) is dropped, a pending op is
  only tried where it changes the state, and no put may follow a pending op until a get or
  cas has observed the value: the put would overwrite an effect nobody saw, and dropping
  those pending ops ("never happened") gives an equally valid order;
* a bounded look-ahead (`may_matter` in `_check_key`) rejects a state that the next get (or
  successful cas) to return cannot observe: before it, the value only grows by appends or
  is reset by a put/cas invoked in time.

All of these only skip orders that cannot succeed or have an equivalent that is searched;
the tests compare the checker with a brute-force search on small histories. A history with
very many timed-out ops on one key can still take exponential time: use `timeout`.

Ties: a call and a return at the same timestamp are treated as concurrent (calls sort
before returns), as in porcupine; that errs towards accepting.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

__all__ = ["CheckResult", "Operation", "check_kv"]

_PUT, _GET, _APPEND, _CAS = range(4)
_KINDS = {"put": _PUT, "get": _GET, "append": _APPEND, "cas": _CAS}

# Search steps between looks at the clock: time.monotonic costs ~50 ns and a step 1-20 us,
# so the overhead is negligible and a timeout overshoots by a few ms at most.
_CLOCK_EVERY = 256
# How many completed ops' list nodes the look-ahead walks before giving up; bounds its cost.
_LOOKAHEAD = 48
_ANY = object()  # marks a reset with no precondition (a put)


@dataclass(slots=True, frozen=True)
class Operation:
    """One client operation on one key, as observed by the client."""

    client: int
    call: float  # invocation time
    ret: float  # response time; math.inf if the outcome is unknown (timed out, leader lost)
    kind: str  # "put" | "get" | "append" | "cas"
    key: str
    value: object = None  # put/append: value written; cas: (expected, new)
    output: object = None  # get: value read (None = absent); cas: bool; ignored if ret == inf


@dataclass(slots=True)
class CheckResult:
    ok: bool  # True also when timed_out: "no violation found", not a proof
    key: str | None  # first non-linearizable key; on timeout, the key being checked
    timed_out: bool
    detail: str  # human-readable; for a failure the key's ops in call order


class _TimedOut(Exception):
    pass


def check_kv(history: list[Operation], timeout: float | None = None) -> CheckResult:
    """Check `history` for linearizability against a key-value map (absent keys = None).

    Keys are checked one at a time in order of their first invocation; the first key that
    is not linearizable is reported. With `timeout` (seconds, for the whole call) a search
    that runs out of time returns ``ok=True, timed_out=True``: inconclusive, callers decide.
    """
    by_key: dict[str, list[Operation]] = {}
    for op in history:
        _validate(op)
        by_key.setdefault(op.key, []).append(op)
    deadline = None if timeout is None else time.monotonic() + timeout
    # Stable sort by call time; check keys in order of first invocation, deterministically.
    per_key = {k: sorted(ops, key=lambda o: o.call) for k, ops in by_key.items()}
    order = sorted(per_key, key=lambda k: per_key[k][0].call)
    for done, key in enumerate(order):
        ops = per_key[key]
        try:
            ok, longest = _check_key(ops, deadline)
        except _TimedOut:
            return CheckResult(
                ok=True,
                key=key,
                timed_out=True,
                detail=(
                    f"INCONCLUSIVE: timed out after {timeout}s while checking key {key!r} "
                    f"({done} of {len(order)} keys verified linearizable; no violation found)"
                ),
            )
        if not ok:
            detail = _describe(key, ops, longest)
            return CheckResult(ok=False, key=key, timed_out=False, detail=detail)
    return CheckResult(
        ok=True,
        key=None,
        timed_out=False,
        detail=f"linearizable: {len(history)} ops on {len(order)} keys",
    )


def _validate(op: Operation) -> None:
    if op.kind not in _KINDS:
        raise ValueError(f"unknown operation kind {op.kind!r} in {op}")
    if not op.ret >= op.call:  # also rejects NaN
        raise ValueError(f"operation returns before it is called: {op}")
    if op.kind == "cas" and not (isinstance(op.value, tuple | list) and len(op.value) == 2):
        raise ValueError(f"cas value must be (expected, new): {op}")


def _check_key(ops: list[Operation], deadline: float | None) -> tuple[bool, list[int]]:
    """Search one key's history (sorted by call). Returns (linearizable, longest prefix).

    The prefix is a list of indices into `ops`: the deepest partial linearization found,
    useful to see where a failing history goes wrong.
    """
    inf = math.inf
    # A pending get neither changes the state nor constrains it: drop it. `orig` maps the
    # search's op ids back to indices in `ops`.
    orig = [i for i, o in enumerate(ops) if not (o.ret == inf and o.kind == "get")]
    n = len(orig)
    kind = [_KINDS[ops[i].kind] for i in orig]
    arg = [ops[i].value for i in orig]
    out = [ops[i].output for i in orig]
    pending = [ops[i].ret == inf for i in orig]

    # Events: (time, 0=call/1=return, op); calls sort before returns at equal times.
    events: list[tuple[float, int, int]] = []
    for j, i in enumerate(orig):
        events.append((ops[i].call, 0, j))
        if not pending[j]:
            events.append((ops[i].ret, 1, j))
    events.sort()
    m = len(events)
    head, tail = m, m + 1
    # Doubly linked list over node indices 0..m-1 plus head/tail sentinels.
    nxt = [i + 1 for i in range(m)] + [0 if m else tail, tail]
    prv = [i - 1 for i in range(m)] + [head, m - 1 if m else head]
    if m:
        nxt[m - 1] = tail
        prv[0] = head
    is_ret = [e[1] == 1 for e in events] + [True, True]  # sentinels block like returns
    node_op = [e[2] for e in events] + [-1, -1]
    ret_node = [-1] * n
    for idx, e in enumerate(events):
        if e[1] == 1:
            ret_node[e[2]] = idx
    match = [ret_node[e[2]] if e[1] == 0 else -1 for e in events]

    def may_matter(new: object, dirty: bool, own_call: int, own_ret: int) -> bool:
        """Look ahead (a bounded walk of the list) for a reason the candidate is doomed.

        Until the next observation returns (a get, or a successful cas: it saw its expected
        value), the value changes only by appends, which extend it, and by resets (puts,
        cas) invoked before that return. So a string `new` is doomed if the observed value
        starts neither with it nor with any such reset's value. And if the next thing to
        return is a put, with no get/cas invoked before, an unobserved pending effect
        (`dirty`) will be overwritten unseen: the canonical order drops those pending ops.
        Without these, every order of the pending appends would be tried and found wrong
        only at the next observation (k! states).
        """
        # (op, value it may set, value it needs first: a cas's expected, or _ANY for a put)
        resets: list[tuple[int, object, object]] = []
        observers = 0  # completed gets/cas invoked so far: they could see the value
        w = nxt[head]
        budget = _LOOKAHEAD
        while w != tail and budget:
            if w != own_call and w != own_ret:
                j = node_op[w]
                budget -= not pending[j]  # timed-out ops pile up at the front: don't count
                k = kind[j]
                if is_ret[w]:
                    if k == _PUT:
                        return observers > 0 or not dirty
                    if k == _GET or (k == _CAS and out[j]):
                        seen = out[j] if k == _GET else arg[j][0]  # type: ignore[index]
                        if _may_lead_to(new, seen):
                            return True
                        # While dirty, a put needs another observation before it.
                        puts_ok = not dirty or observers > 1
                        usable = [
                            (v, need)
                            for op, v, need in resets
                            if op != j and (puts_ok or need is not _ANY)
                        ]
                        # A reset explains `seen` if its value can lead there and it can
                        # happen: a put always, a cas if the candidate's value or another
                        # reset's can lead to what it expects (deeper chains: assumed).
                        return any(
                            _may_lead_to(v, seen)
                            and (
                                need is _ANY
                                or _may_lead_to(new, need)
                                or any(_may_lead_to(u, need) for u, _ in usable)
                            )
                            for v, need in usable
                        )
                else:
                    if k == _PUT:
                        resets.append((j, arg[j], _ANY))
                    elif k == _CAS and (pending[j] or out[j]):  # a failing cas sets nothing
                        resets.append((j, arg[j][1], arg[j][0]))  # type: ignore[index]
                    if not pending[j] and k in (_GET, _CAS):
                        observers += 1
            w = nxt[w]
        return True

    state: object = None
    lin_c = 0  # bitset of linearized completed ops
    lin_p = 0  # bitset of linearized pending ops
    # "Dirty": a pending op was linearized after the last observation (completed get/cas).
    # A put is then not allowed: it would overwrite an effect nobody saw, and dropping those
    # pending ops ("never happened") gives an equally valid order. Searching only such
    # canonical orders stops runs of timed-out ops being tried in every subset and order.
    dirty = False
    remaining = n - sum(pending)
    has_pending = remaining < n
    # (lin_c, state) -> visited nodes' pending-used bitsets, plus dirty_bit for dirty ones:
    # those explore fewer continuations, so they may only subsume dirty nodes.
    dirty_bit = 1 << n
    cache: dict[tuple[int, object], list[int]] = {(0, None): [0]}
    # Frames: (call node, state before it, dirty before it, phase). Phase 0 tries completed
    # ops, phase 1 pending ones, both over the same candidate window.
    stack: list[tuple[int, object, bool, int]] = []
    longest: list[int] = []
    steps = 0
    node = nxt[head]
    phase = 0

    while remaining:
        steps += 1
        if deadline is not None and steps % _CLOCK_EVERY == 1 and time.monotonic() > deadline:
            raise _TimedOut
        if is_ret[node]:
            # End of the candidate window (first unlinearized return).
            if phase == 0 and has_pending:
                phase = 1
                node = nxt[head]
                continue
            if len(stack) > len(longest):
                longest = [orig[node_op[f[0]]] for f in stack]
            if not stack:
                return False, longest
            node, state, dirty, phase = stack.pop()
            j = node_op[node]
            if pending[j]:
                lin_p ^= 1 << j
            else:
                lin_c ^= 1 << j
                remaining += 1
            # unlift: restore the return node first, then the call (reverse of lift).
            r = match[node]
            if r >= 0:
                nxt[prv[r]] = r
                prv[nxt[r]] = r
            nxt[prv[node]] = node
            prv[nxt[node]] = node
            node = nxt[node]
            continue

        j = node_op[node]
        pend = pending[j]
        k = kind[j]
        if pend != phase or (k == _PUT and dirty):  # phase is 0/1, pend False/True
            node = nxt[node]
            continue
        if k == _GET:
            ok = state == out[j]
            new = state
        elif k == _PUT:
            ok = True
            new = arg[j]
        elif k == _APPEND:
            ok = True
            new = (state or "") + arg[j]  # type: ignore[operator]
        else:
            expected, new_value = arg[j]  # type: ignore[misc]
            success = state == expected
            new = new_value if success else state
            # Pending cas: outcome unknown, so any model outcome is acceptable.
            ok = pend or success == out[j]
        if not ok or (pend and new == state):
            # Rejected, or a pending op with no effect here (same as not linearizing it).
            node = nxt[node]
            continue
        if pend:
            new_dirty = True
        elif k in (_GET, _CAS):
            new_dirty = False
        else:
            new_dirty = dirty
        if (new_dirty or (k != _GET and type(new) is str)) and not may_matter(
            new, new_dirty, node, match[node]
        ):
            node = nxt[node]
            continue
        bit = 1 << j
        if pend:
            new_c, new_p = lin_c, lin_p | bit
        else:
            new_c, new_p = lin_c | bit, lin_p
        mark = new_p | dirty_bit if new_dirty else new_p
        seen = cache.get((new_c, new))
        if seen is None:
            cache[(new_c, new)] = [mark]
        elif any(s | mark == mark for s in seen):
            node = nxt[node]  # a visited node reached this with fewer pending ops used
            continue
        else:
            seen.append(mark)
        stack.append((node, state, dirty, phase))
        state, dirty, lin_c, lin_p = new, new_dirty, new_c, new_p
        if not pend:
            remaining -= 1
        # lift: unlink the call, then its return (if any).
        p, q = prv[node], nxt[node]
        nxt[p] = q
        prv[q] = p
        r = match[node]
        if r >= 0:
            p, q = prv[r], nxt[r]
            nxt[p] = q
            prv[q] = p
        node = nxt[head]
        phase = 0

    return True, [orig[node_op[f[0]]] for f in stack]


def _may_lead_to(value: object, seen: object) -> bool:
    """Can a state of `value` become `seen` by appends alone? (Unknown types: assume so.)"""
    if type(value) is str:
        return type(seen) is str and seen.startswith(value)
    return True


def _fmt_time(t: float) -> str:
    return "inf" if t == math.inf else f"{t:.6g}"


def _describe(key: str, ops: list[Operation], longest: list[int]) -> str:
    lines = [f"key {key!r} is not linearizable; its {len(ops)} ops in call order:"]
    for i, o in enumerate(ops):
        if o.ret == math.inf:
            result = "? (outcome unknown)"
        elif o.kind in ("get", "cas"):
            result = repr(o.output)
        else:
            result = "ok"
        arg = "" if o.kind == "get" else repr(o.value)
        lines.append(
            f"  #{i:<3} client {o.client:<3} [{_fmt_time(o.call)}, {_fmt_time(o.ret)}] "
            f"{o.kind}({arg}) -> {result}"
        )
    prefix = " ".join(f"#{i}" for i in longest) or "(none)"
    lines.append(f"longest linearizable prefix found: {prefix}")
    return "\n".join(lines)
