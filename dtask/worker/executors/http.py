"""`http`: {"url", "method", "headers", "body", "expect": [200, ...]} with urllib.

The request runs in the warm Python pool (see `..httpfetch`), so a timeout or a cancel
can kill it like any Python task. The result is a msgpack map {"status", "body",
"truncated", "content_type"} with the body cut to fit the result bound.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import urlsplit

from .base import Executor, Handle, OnExit, OnOutput, TaskError, require_map, str_map

_METHOD = re.compile(r"^[A-Z]{1,16}$")
RESULT_OVERHEAD = 512  # room in the result for the fields around the body


class HttpExecutor(Executor):
    name = "http"

    def parse(self, payload: Any) -> dict:
        spec = require_map(payload, self.name)
        url = spec.get("url")
        if not isinstance(url, str) or urlsplit(url).scheme not in ("http", "https") \
                or not urlsplit(url).netloc:
            raise TaskError("field url must be an http:// or https:// URL")
        body = spec.get("body")
        if body is not None and not isinstance(body, (str, bytes, dict, list)):
            raise TaskError("field body must be a string, bytes, or JSON object/list")
        method = spec.get("method") or ("POST" if body is not None else "GET")
        if not isinstance(method, str) or not _METHOD.match(method.upper()):
            raise TaskError("field method must be an HTTP method name")
        expect = spec.get("expect")
        if expect is not None and (not isinstance(expect, list) or not expect or not all(
                type(c) is int and 100 <= c <= 599 for c in expect)):
            raise TaskError("field expect must be a non-empty list of HTTP status codes")
        return {"url": url, "method": method.upper(), "body": body,
                "headers": str_map(spec.get("headers"), "headers"), "expect": expect}

    def start(self, spec: dict, task: dict, on_output: OnOutput, on_exit: OnExit) -> Handle:
        timeout = task.get("timeout") or None
        max_body = max(0, self.ctx.config.max_result_bytes - RESULT_OVERHEAD)
        request = {"fn": "dtask.worker.httpfetch:fetch", "args": [spec, max_body, timeout],
                   "internal": True}
        return self.ctx.pool.submit(request, on_output, on_exit)
