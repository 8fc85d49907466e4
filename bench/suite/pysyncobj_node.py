"""One PySyncObj node holding a replicated counter, its journal on disk.

    python -m bench.suite.pysyncobj_node SELF JOURNAL PARTNER... [--write S] [--tick T]

With --write the node waits for a leader, then increments the counter one write at a
time (each call waits for the commit; a follower forwards it to the leader) for SECONDS
and prints the committed writes per second. PySyncObj keeps its journal in an mmap'd
file that it never fsyncs while running, and has no option to: its writes are not
durable against a power loss, only against a process crash. Its loop handles commands
queued by other threads once per tick (autoTickPeriod, 0.05 s) and followers learn the
commit index with the next AppendEntries (appendEntriesPeriod, 0.1 s), which bounds
one-at-a-time writes to ~5/s by default; --tick shortens both.
"""

from __future__ import annotations

import argparse
import time

from pysyncobj import SyncObj, SyncObjConf, SyncObjException, replicated


class Counter(SyncObj):
    def __init__(self, me: str, partners: list[str], conf: SyncObjConf) -> None:
        super().__init__(me, partners, conf)
        self.value = 0

    @replicated
    def inc(self) -> int:
        self.value += 1
        return self.value


def write_rate(node: Counter, seconds: float) -> float:
    deadline = time.monotonic() + 30
    while node._getLeader() is None or not node.isReady():
        if time.monotonic() > deadline:
            raise TimeoutError("no PySyncObj leader within 30 s")
        time.sleep(0.01)
    n, t0 = 0, time.perf_counter()
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        try:
            node.inc(sync=True, timeout=10)
            n += 1
        except SyncObjException:  # e.g. a leader change: not committed, not counted
            continue
    return n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("me")
    ap.add_argument("journal")
    ap.add_argument("partners", nargs="+")
    ap.add_argument("--write", type=float, default=0.0)
    ap.add_argument("--tick", type=float, default=0.0,
                    help="autoTickPeriod and appendEntriesPeriod (default 0.05 / 0.1 s)")
    args = ap.parse_args()
    tuned = {"autoTickPeriod": args.tick, "appendEntriesPeriod": args.tick} if args.tick else {}
    conf = SyncObjConf(journalFile=args.journal, fullDumpFile=args.journal + ".dump", **tuned)
    node = Counter(args.me, args.partners, conf)
    if args.write:
        print(f"{write_rate(node, args.write):.1f}", flush=True)
        node.destroy()
        return
    while True:
        time.sleep(1)


if __name__ == "__main__":
    main()
