"""fastqueue against heapq at 10^5 entries (10^6 with BENCH_MICRO_LARGE=1), reusing
bench_fastqueue.py's loops: push (fill), pop (drain in pop order), cancel (10 % of the
keys), pop-due (a timer queue drained in loop-turn sized steps)."""

from __future__ import annotations

import os

import pytest

from bench import bench_fastqueue as fq

SIZES = [100_000] + ([1_000_000] if os.environ.get("BENCH_MICRO_LARGE") == "1" else [])


@pytest.fixture(scope="module", params=SIZES, ids=lambda n: f"n={n}")
def work(request: pytest.FixtureRequest) -> fq.Workload:
    return fq.Workload(request.param)


def _once(benchmark, fn, setup=None) -> None:  # noqa: ANN001
    benchmark.pedantic(fn, setup=setup, rounds=3, iterations=1, warmup_rounds=0)


@pytest.mark.parametrize("impl", ["heapq", "fastqueue"])
def test_push(benchmark, work, impl) -> None:  # noqa: ANN001
    fill = fq.hq_fill if impl == "heapq" else fq.fq_fill
    _once(benchmark, lambda: fill(work, work.n))


@pytest.mark.parametrize("impl", ["heapq", "fastqueue"])
def test_pop(benchmark, work, impl) -> None:  # noqa: ANN001
    fill = fq.hq_fill if impl == "heapq" else fq.fq_fill
    drain = fq.hq_pop_all if impl == "heapq" else fq.fq_pop_all
    _once(benchmark, drain, setup=lambda: ((fill(work, work.n),), {}))


@pytest.mark.parametrize("impl", ["heapq", "fastqueue"])
def test_cancel(benchmark, work, impl) -> None:  # noqa: ANN001
    fill = fq.hq_fill if impl == "heapq" else fq.fq_fill
    cancel = fq.hq_cancel if impl == "heapq" else fq.fq_cancel
    _once(benchmark, cancel, setup=lambda: ((work, fill(work, work.n)), {}))


@pytest.mark.parametrize("impl", ["heapq", "fastqueue"])
def test_pop_due(benchmark, work, impl) -> None:  # noqa: ANN001
    fill = fq.hq_timer_fill if impl == "heapq" else fq.fq_timer_fill
    drain = fq.hq_timer_drain if impl == "heapq" else fq.fq_timer_drain
    _once(benchmark, drain, setup=lambda: ((work, fill(work)), {}))
