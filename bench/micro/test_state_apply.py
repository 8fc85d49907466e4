"""The task state machine applying one SUBMIT entry of 1000 tasks (dtask/broker/state.py),
wires shaped as in tests/test_broker_state.py."""

from __future__ import annotations

import itertools

from dtask import protocol as p
from dtask.broker import state as sm
from dtask.protocol import RetryPolicy

T0 = 1_700_000_000_000_000
BATCH = 1000
_ids = itertools.count()


def _wires() -> list[list]:
    retry = RetryPolicy(max_retries=2).to_wire()
    return [[f"t{next(_ids)}", "", "python", b"{}", p.JSON, 0, "default", [], 0.0, retry, "", 0]
            for _ in range(BATCH)]


def test_apply_submit_batch(benchmark) -> None:  # noqa: ANN001
    def setup() -> tuple[tuple, dict]:
        return (sm.TaskState(), sm.command(sm.SUBMIT, T0, [_wires()])), {}

    def apply(state: sm.TaskState, entry: bytes) -> None:
        state.apply(2, entry)
        assert len(state.tasks) == BATCH

    benchmark.pedantic(apply, setup=setup, rounds=20, iterations=1)
