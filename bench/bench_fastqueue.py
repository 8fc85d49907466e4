"""Benchmark dtask._fastqueue against heapq, side by side in one process.

    python bench/bench_fastqueue.py [--sizes 100000,1000000] [--runs 3] [--gc] [--wall]

The baseline is what the leader would otherwise write: heapq with tuple entries
(-priority, seq, key) plus a dict key -> entry, so cancel is a lazy delete and
pop skips entries that are no longer in the dict.  Each figure is the median of
--runs runs; within a run heapq and fastqueue take turns going first.  The GC
is off while timing (as in timeit) unless --gc is given.  Time is this
process's CPU time, so time slices lost to other processes on a shared box
don't count (--wall for wall-clock time).  Figures only: nothing is asserted.
"""

import argparse
import gc
import heapq
import random
import statistics
import sys
import time
from pathlib import Path

# The checkout this script is in, not whatever `pip install -e` points at: a side-by-side
# run from another worktree must measure that worktree's code.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dtask._fastqueue import ReadyQueue, TimerQueue  # noqa: E402

STEADY_PAIRS = 200_000  # push+pop pairs timed at steady size (fewer if n is smaller)
BATCH = 64  # pop_many size, and mean keys per pop_due call (one loop turn's worth)


class Workload:
    """Inputs shared by both implementations, generated once per size."""

    def __init__(self, n, seed=1):
        rnd = random.Random(seed)
        self.n = n
        self.pairs = min(n, STEADY_PAIRS)
        total = n + self.pairs
        self.keys = [f"task-{i:010d}" for i in range(total)]
        self.prios = [rnd.randrange(10) for _ in range(total)]
        self.cancel = rnd.sample(self.keys[:n], n // 10)
        span = n * 10  # timer dues spread over 10 us per timer
        self.dues = [rnd.randrange(span) for _ in range(n)]
        self.step = span * BATCH // n  # advance "now" so each pop_due gets ~BATCH keys
        self.span = span


# -- heapq baseline ---------------------------------------------------------------


def hq_fill(w, n):
    h, live = [], {}
    push, keys, prios = heapq.heappush, w.keys, w.prios
    for i in range(n):
        e = (-prios[i], i, keys[i])
        live[keys[i]] = e
        push(h, e)
    return h, live


def hq_pop_all(state):
    h, live = state
    pop, get = heapq.heappop, live.get
    while h:
        e = pop(h)
        k = e[2]
        if get(k) is e:
            del live[k]


def hq_pop_batches(state):
    # Inlined like the other loops: a helper call per pop would charge heapq
    # for Python call overhead that fastqueue doesn't pay.
    h, live = state
    pop, get = heapq.heappop, live.get
    while live:
        batch = []
        while h and len(batch) < BATCH:
            e = pop(h)
            if get(e[2]) is e:  # else lazily cancelled
                del live[e[2]]
                batch.append(e[2])


def hq_steady(w, state):
    h, live = state
    push, pop, get, keys, prios = heapq.heappush, heapq.heappop, live.get, w.keys, w.prios
    for i in range(w.n, w.n + w.pairs):
        e = (-prios[i], i, keys[i])
        live[keys[i]] = e
        push(h, e)
        e = pop(h)
        while get(e[2]) is not e:  # lazily cancelled
            e = pop(h)
        del live[e[2]]


def hq_cancel(w, state):
    live = state[1]
    for k in w.cancel:
        del live[k]


def hq_timer_fill(w):
    h, live = [], {}
    push, keys = heapq.heappush, w.keys
    for i, due in enumerate(w.dues):
        e = (due, i, keys[i])
        live[keys[i]] = e
        push(h, e)
    return h, live


def hq_timer_drain(w, state):
    h, live = state
    pop, get = heapq.heappop, live.get
    for now in range(w.step, w.span + w.step, w.step):
        out = []
        while h and h[0][0] <= now:
            e = pop(h)
            if get(e[2]) is e:
                del live[e[2]]
                out.append(e[2])


# -- fastqueue ----------------------------------------------------------------------


def fq_fill(w, n):
    q = ReadyQueue()
    push, keys, prios = q.push, w.keys, w.prios
    for i in range(n):
        push(keys[i], prios[i], i)
    return q


def fq_pop_all(q):
    pop = q.pop
    for _ in range(len(q)):
        pop()


def fq_pop_batches(q):
    pop_many = q.pop_many
    while pop_many(BATCH):
        pass


def fq_steady(w, q):
    push, pop, keys, prios = q.push, q.pop, w.keys, w.prios
    for i in range(w.n, w.n + w.pairs):
        push(keys[i], prios[i], i)
        pop()


def fq_cancel(w, q):
    remove = q.remove
    for k in w.cancel:
        remove(k)


def fq_timer_fill(w):
    t = TimerQueue()
    push, keys = t.push, w.keys
    for i, due in enumerate(w.dues):
        push(keys[i], due)
    return t


def fq_timer_drain(w, t):
    pop_due = t.pop_due
    for now in range(w.step, w.span + w.step, w.step):
        pop_due(now)


# -- cases: (name, setup(w) -> state, timed(w, state), ops(w)) ------------------------


def cases():
    n_ = lambda w: w.n  # noqa: E731
    after_cancel = lambda w: w.n - len(w.cancel)  # noqa: E731

    def cancelled(fill, cancel):
        def setup(w):
            state = fill(w, w.n)
            cancel(w, state)
            return state

        return setup

    hq = {
        "push": (lambda w: None, lambda w, s: hq_fill(w, w.n), n_),
        "pop": (lambda w: hq_fill(w, w.n), lambda w, s: hq_pop_all(s), n_),
        f"pop in batches of {BATCH}": (
            lambda w: hq_fill(w, w.n), lambda w, s: hq_pop_batches(s), n_),
        "push+pop at steady size": (
            lambda w: hq_fill(w, w.n), hq_steady, lambda w: w.pairs),
        "cancel 10% (remove)": (
            lambda w: hq_fill(w, w.n), hq_cancel, lambda w: len(w.cancel)),
        "pop all after cancel": (
            cancelled(hq_fill, hq_cancel), lambda w, s: hq_pop_all(s), after_cancel),
        f"timer pop_due (~{BATCH}/call)": (hq_timer_fill, hq_timer_drain, n_),
    }
    fq = {
        "push": (lambda w: None, lambda w, s: fq_fill(w, w.n), n_),
        "pop": (lambda w: fq_fill(w, w.n), lambda w, s: fq_pop_all(s), n_),
        f"pop in batches of {BATCH}": (
            lambda w: fq_fill(w, w.n), lambda w, s: fq_pop_batches(s), n_),
        "push+pop at steady size": (
            lambda w: fq_fill(w, w.n), fq_steady, lambda w: w.pairs),
        "cancel 10% (remove)": (
            lambda w: fq_fill(w, w.n), fq_cancel, lambda w: len(w.cancel)),
        "pop all after cancel": (
            cancelled(fq_fill, fq_cancel), lambda w, s: fq_pop_all(s), after_cancel),
        f"timer pop_due (~{BATCH}/call)": (fq_timer_fill, fq_timer_drain, n_),
    }
    return [(name, hq[name], fq[name]) for name in hq]


def time_one(case, w, keep_gc, clock):
    setup, timed, ops = case
    state = setup(w)
    gc.collect()
    if not keep_gc:
        gc.disable()
    try:
        t0 = clock()
        timed(w, state)
        elapsed = clock() - t0
    finally:
        gc.enable()
    del state
    return elapsed / ops(w) * 1e9


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="100000,1000000",
                    help="comma-separated queue sizes (default: %(default)s)")
    ap.add_argument("--runs", type=int, default=3, help="runs per figure; median is shown")
    ap.add_argument("--gc", action="store_true", help="leave the GC enabled while timing")
    ap.add_argument("--wall", action="store_true", help="wall-clock time instead of CPU time")
    args = ap.parse_args(argv)
    clock = time.perf_counter if args.wall else time.process_time
    sizes = [int(s.replace("_", "")) for s in args.sizes.split(",")]

    print(f"Python {sys.version.split()[0]}; median of {args.runs} runs; "
          f"{'wall-clock' if args.wall else 'CPU'} time; GC {'on' if args.gc else 'off'}")
    header = f"{'size':>10}  {'operation':<26} {'heapq ns/op':>12} {'fastqueue':>10} {'ratio':>7}"
    print(header)
    print("-" * len(header))
    for n in sizes:
        w = Workload(n)
        for name, hq_case, fq_case in cases():
            hq_ns, fq_ns = [], []
            for run in range(args.runs):
                pair = [(hq_case, hq_ns), (fq_case, fq_ns)]
                for case, out in pair if run % 2 == 0 else reversed(pair):
                    out.append(time_one(case, w, args.gc, clock))
            hq_med, fq_med = statistics.median(hq_ns), statistics.median(fq_ns)
            print(f"{n:>10,}  {name:<26} {hq_med:>12.0f} {fq_med:>10.0f} "
                  f"{hq_med / fq_med:>6.1f}x", flush=True)
        del w
    print("ratio = heapq / fastqueue (higher is better for fastqueue)")


if __name__ == "__main__":
    main()
