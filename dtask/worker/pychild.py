"""A warm Python pool child: `python -m dtask.worker.pychild REQ_FD RESP_FD [MODULE...]`.

It imports the given modules once (running their @task decorators), then runs one
call at a time, read as msgpack maps from REQ_FD; each answer is a msgpack map on
RESP_FD. Its stdout and stderr are the attempt's log (the parent reads that pipe), so
both are flushed before an answer is written: the log is complete when it arrives.
Kept light on imports, because every child pays for them at start.
"""

from __future__ import annotations

import importlib
import os
import sys
import time
import traceback
from typing import Any

import msgpack

from .registry import resolve

FAILED, SUCCEEDED = "failed", "succeeded"  # protocol outcomes (not imported: stay light)
READ_SIZE = 1 << 20


def _write(fd: int, msg: dict) -> None:
    data = memoryview(msgpack.packb(msg, use_bin_type=True))
    while data:
        data = data[os.write(fd, data):]


def _flush() -> None:
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        try:
            if stream is not None:
                stream.flush()
        except Exception:  # a task may have left a broken stream behind
            pass


def _exc_text(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def call(req: dict) -> dict:
    started_us = time.time_ns() // 1000
    try:
        fn = resolve(req["fn"])
        value = fn(*req.get("args", ()), **req.get("kwargs", {}))
    except BaseException as exc:  # the task's failure, never the child's
        traceback.print_exception(exc.__class__, exc, exc.__traceback__.tb_next)  # not ours
        return {"outcome": FAILED, "error": _exc_text(exc), "started_us": started_us}
    if req.get("internal"):  # an executor's helper: it returns the outcome itself
        return {**value, "started_us": started_us}
    try:
        packed = msgpack.packb(value, use_bin_type=True)
    except Exception as exc:
        return {"outcome": FAILED, "started_us": started_us,
                "error": f"the return value cannot be sent (msgpack): {_exc_text(exc)}"}
    limit = req.get("max_result", 1 << 16)
    if len(packed) > limit:
        return {"outcome": FAILED, "started_us": started_us,
                "error": f"the return value is {len(packed)} bytes packed; "
                         f"the limit is {limit}"}
    return {"outcome": SUCCEEDED, "result": packed, "started_us": started_us}


def main(argv: list[str]) -> int:
    req_fd, resp_fd = int(argv[0]), int(argv[1])
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]  # stream logs
    errors = []
    for name in argv[2:]:
        try:
            importlib.import_module(name)
        except BaseException as exc:
            traceback.print_exc()
            errors.append(f"{name}: {_exc_text(exc)}")
    _flush()
    _write(resp_fd, {"ready": True, "errors": errors})
    unpacker = msgpack.Unpacker(raw=False, max_buffer_size=256 << 20)
    # Read into one reused buffer: os.read(fd, 1 MiB) would malloc a fresh 1 MiB
    # (an mmap) and shrink and free it (mremap, munmap) for every small request.
    buf = bytearray(READ_SIZE)
    view = memoryview(buf)
    while True:
        n = os.readv(req_fd, [buf])
        if not n:
            return 0  # the worker closed the pipe: it is stopping
        unpacker.feed(view[:n])
        for req in unpacker:
            answer: dict[str, Any] = call(req)
            _flush()
            _write(resp_fd, answer)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
