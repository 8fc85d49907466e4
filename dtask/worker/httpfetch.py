"""The `http` executor's request, run inside a Python pool child (stdlib only)."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request

import msgpack


def fetch(spec: dict, max_body: int, timeout: float | None) -> dict:
    """Do the request; returns {"outcome", "error", "result"} for the pool child."""
    body, headers = spec.get("body"), dict(spec.get("headers") or {})
    if isinstance(body, (dict, list)):
        body = json.dumps(body).encode()
        headers.setdefault("Content-Type", "application/json")
    elif isinstance(body, str):
        body = body.encode()
    req = urllib.request.Request(spec["url"], data=body, headers=headers,
                                 method=spec["method"])
    t0 = time.monotonic()
    try:
        resp = urllib.request.urlopen(req, timeout=timeout)
    except urllib.error.HTTPError as exc:
        resp = exc  # a status outside 2xx/3xx still has a status and a body
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        print(f"{spec['method']} {spec['url']} failed: {reason}", flush=True)
        return {"outcome": "failed", "error": f"HTTP request failed: {reason}"}
    with resp:
        status = resp.status if hasattr(resp, "status") else resp.code
        data = resp.read(max_body + 1)
        content_type = (resp.headers.get("Content-Type") or "")[:200]
    truncated = len(data) > max_body
    print(f"{spec['method']} {spec['url']} -> {status} in "
          f"{(time.monotonic() - t0) * 1000:.1f} ms, {len(data)} bytes"
          f"{' (truncated)' if truncated else ''}", flush=True)
    result = msgpack.packb({"status": status, "body": data[:max_body], "truncated": truncated,
                            "content_type": content_type}, use_bin_type=True)
    expect = spec.get("expect")
    ok = status in expect if expect else 200 <= status < 300
    error = "" if ok else f"unexpected HTTP status {status} (expected {expect or '2xx'})"
    return {"outcome": "succeeded" if ok else "failed", "error": error, "result": result}
