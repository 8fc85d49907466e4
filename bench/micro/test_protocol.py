"""Protocol encode / decode of one submit message (dtask/protocol.py pack / unpack)."""

from __future__ import annotations

from dtask import protocol as p

MSG = {"v": p.VERSION, "t": p.SUBMIT, "id": 42, "type": "python",
       "payload": b'{"fn": "builtins:int"}', "content_type": p.JSON, "priority": 0,
       "queue": "default", "labels": [], "max_retries": 3}


def test_pack(benchmark) -> None:  # noqa: ANN001
    assert benchmark(p.pack, MSG)


def test_unpack(benchmark) -> None:  # noqa: ANN001
    frame = p.pack(MSG)
    assert benchmark(p.unpack, frame) == MSG
