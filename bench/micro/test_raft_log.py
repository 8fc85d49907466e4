"""Raft log append + fsync per batch size (dtask/raft/log.py), as bench_raft_log.py
measures it: one append of `batch` 100-byte entries, then one sync."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from dtask.raft.log import SegmentedLog
from dtask.raft.messages import Entry


@pytest.mark.parametrize("batch", [1, 10, 100, 1000])
def test_append_sync(benchmark, tmp_path: Path, batch: int) -> None:  # noqa: ANN001
    log = SegmentedLog(tmp_path / "log")
    data = os.urandom(100)
    index = iter(range(1, 10**9, batch))

    def append_sync() -> None:
        first = next(index)
        log.append([Entry(7, i, 0, data) for i in range(first, first + batch)])
        log.sync()

    try:
        benchmark.pedantic(append_sync, rounds=50, iterations=1, warmup_rounds=2)
    finally:
        log.close()
