"""Start-up costs operators feel: `dtask dev` until it accepts a task, and one
`dtaskctl status` round trip including Python's start-up.

    python bench/bench_startup.py [--runs 5] [--base-port 7601]
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time

BIN = os.path.dirname(sys.executable)


def endpoints(base: int) -> str:
    return ",".join(f"tcp://127.0.0.1:{base + i}" for i in range(3))


def ctl(base: int, *args: str, timeout: str = "0.5") -> subprocess.CompletedProcess:
    return subprocess.run([os.path.join(BIN, "dtaskctl"), "--endpoints", endpoints(base),
                           "--timeout", timeout, *args], capture_output=True, text=True)


def one_run(base: int) -> tuple[float, list[float]]:
    data = tempfile.mkdtemp(prefix="dtask-bench-startup-")
    t0 = time.perf_counter()
    dev = subprocess.Popen([os.path.join(BIN, "dtask"), "dev", "--data-dir", data,
                            "--base-port", str(base)], stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
    try:
        while True:
            r = ctl(base, "submit", "shell", '{"cmd": "true"}')
            if r.returncode == 0:
                break
        ready = time.perf_counter() - t0
        task_id = r.stdout.strip()
        status = []
        for _ in range(5):
            t = time.perf_counter()
            ctl(base, "status", task_id, timeout="5")
            status.append(time.perf_counter() - t)
        return ready, status
    finally:
        dev.send_signal(signal.SIGTERM)
        dev.wait(30)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--base-port", type=int, default=7601)
    args = ap.parse_args()
    ready, status = [], []
    for _ in range(args.runs):
        r, s = one_run(args.base_port)
        ready.append(r)
        status.extend(s)
    print(f"{os.cpu_count()} CPUs, {time.strftime('%Y-%m-%d %H:%M')}, {args.runs} runs")
    print(f"dtask dev cold start -> first accepted submit: median {statistics.median(ready):.2f} s"
          f" (max {max(ready):.2f} s)")
    print(f"dtaskctl status round trip incl. Python start-up: median "
          f"{statistics.median(status) * 1e3:.0f} ms (max {max(status) * 1e3:.0f} ms)")


if __name__ == "__main__":
    main()
