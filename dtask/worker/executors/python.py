"""`python`: {"fn": "module:function" or a @task name, "args": [...], "kwargs": {...}},
run in the warm pool; the msgpack-packed return value is the result."""

from __future__ import annotations

from typing import Any

from .base import Executor, Handle, OnExit, OnOutput, TaskError, require_map


class PythonExecutor(Executor):
    name = "python"

    def parse(self, payload: Any) -> dict:
        spec = require_map(payload, self.name)
        fn = spec.get("fn")
        if not isinstance(fn, str) or not fn or len(fn) > 512:
            raise TaskError('python payload needs "fn": "module:function" or a task name')
        args = spec.get("args", [])
        kwargs = spec.get("kwargs", {})
        if not isinstance(args, list):
            raise TaskError("field args must be a list")
        if not isinstance(kwargs, dict) or not all(isinstance(k, str) for k in kwargs):
            raise TaskError("field kwargs must be an object")
        return {"fn": fn, "args": args, "kwargs": kwargs,
                "max_result": self.ctx.config.max_result_bytes}

    def start(self, spec: dict, task: dict, on_output: OnOutput, on_exit: OnExit) -> Handle:
        return self.ctx.pool.submit(spec, on_output, on_exit)
