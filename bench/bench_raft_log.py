"""Benchmark the segmented Raft log: group-commit latency and recovery time.

    python bench/bench_raft_log.py [--dir DIR] [--entries 1000000]

Append+sync is compared with a baseline run in the same process: one pwrite of
the same number of bytes into a zero-filled file plus one fdatasync — the floor
the log can approach. Recovery is open + read_all of a log built in batches.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dtask.raft.log import SegmentedLog  # noqa: E402
from dtask.raft.messages import Entry  # noqa: E402

_fdatasync = getattr(os, "fdatasync", os.fsync)
BATCHES = ((1, 2000), (10, 1000), (100, 500), (1000, 200))  # (entries per batch, rounds)


def pct(samples: list[float], q: float) -> float:
    s = sorted(samples)
    return s[min(len(s) - 1, int(q * len(s)))]


def bench_log(root: Path, batch: int, rounds: int, size: int) -> tuple[list[float], float]:
    log = SegmentedLog(root / f"log{batch}")
    data = os.urandom(size)
    times, index, t0 = [], 1, time.perf_counter()
    for _ in range(rounds):
        entries = [Entry(7, i, 0, data) for i in range(index, index + batch)]
        t = time.perf_counter()
        log.append(entries)
        log.sync()
        times.append(time.perf_counter() - t)
        index += batch
    total = time.perf_counter() - t0
    log.close()
    return times, total


def bench_raw(root: Path, nbytes: int, rounds: int) -> list[float]:
    """Floor: the same bytes written over a zero-filled file, one fdatasync each."""
    path = root / f"raw{nbytes}"
    path.write_bytes(bytes(nbytes * rounds))
    fd = os.open(path, os.O_RDWR)
    os.fsync(fd)
    buf, times = os.urandom(nbytes), []
    for i in range(rounds):
        t = time.perf_counter()
        os.pwrite(fd, buf, i * nbytes)
        _fdatasync(fd)
        times.append(time.perf_counter() - t)
    os.close(fd)
    return times


def append_table(root: Path) -> None:
    print("append+sync, entries of 100 bytes (baseline: same bytes, pwrite+fdatasync)")
    print(f"{'batch':>6} {'median ms':>10} {'p99 ms':>8} {'entries/s':>11} "
          f"{'raw median':>11} {'x raw':>6}")
    for batch, rounds in BATCHES:
        times, total = bench_log(root, batch, rounds, 100)
        raw = bench_raw(root, batch * 106 + 24, rounds)  # ~msgpack row + record header
        med, raw_med = statistics.median(times), statistics.median(raw)
        print(f"{batch:>6} {med * 1e3:>10.3f} {pct(times, 0.99) * 1e3:>8.3f} "
              f"{batch * rounds / total:>11,.0f} {raw_med * 1e3:>11.3f} {med / raw_med:>6.2f}")


def recovery(root: Path, n: int) -> None:
    d = root / "recovery"
    log = SegmentedLog(d)
    data = os.urandom(50)
    t = time.perf_counter()
    for lo in range(1, n + 1, 1000):
        log.append([Entry(3, i, 0, data) for i in range(lo, min(lo + 1000, n + 1))])
        log.sync()
    log.close()
    build = time.perf_counter() - t
    disk = sum(p.stat().st_size for p in d.iterdir())
    opens, totals = [], []
    for _ in range(3):
        t = time.perf_counter()
        log = SegmentedLog(d)
        t_open = time.perf_counter() - t
        entries = log.read_all()
        totals.append(time.perf_counter() - t)
        opens.append(t_open)
        assert len(entries) == n and entries[-1].index == n
        log.close()
        del entries
    print(f"\nrecovery of {n:,} entries of 50 bytes ({disk / 2**20:.1f} MiB on disk, "
          f"built in {build:.1f} s in batches of 1000)")
    print(f"  open (validate)   median {statistics.median(opens):.3f} s")
    print(f"  open + read_all   median {statistics.median(totals):.3f} s   "
          f"(runs: {', '.join(f'{x:.3f}' for x in totals)})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", default=None, help="scratch directory (default: a temp dir)")
    ap.add_argument("--entries", type=int, default=1_000_000, help="entries for recovery")
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench_raft_log_", dir=args.dir))
    try:
        append_table(root)
        recovery(root, args.entries)
    finally:
        shutil.rmtree(root)


if __name__ == "__main__":
    main()
