"""Peer worker processes: started in their own process group, always killed."""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def env(**extra: str) -> dict[str, str]:
    out = dict(os.environ)
    out["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), out.get("PYTHONPATH")]))
    out.update(extra)
    return out


@contextlib.contextmanager
def running(argv: list[str], **extra_env: str) -> Iterator[subprocess.Popen]:
    """Run a worker command (argv[0] looked up beside this Python) until the block ends."""
    exe = BIN / argv[0]
    cmd = [str(exe) if exe.exists() else argv[0], *argv[1:]]
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env(**extra_env), start_new_session=True,
                                stdout=err, stderr=subprocess.STDOUT)
        proc.log = err  # type: ignore[attr-defined]
        try:
            yield proc
        finally:
            stop(proc)


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM the worker's whole process group, SIGKILL it if it lingers."""
    for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(wait)
            break
        except subprocess.TimeoutExpired:
            continue
    # Children that outlived their parent (a prefork pool) share its group.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)


def output(proc: subprocess.Popen) -> str:
    """The tail of what the worker printed (its log goes to a temporary file)."""
    log = proc.log  # type: ignore[attr-defined]
    log.seek(0)
    return log.read().decode(errors="replace")[-2000:]


def copies(argv: list[str], n: int) -> list[str]:
    """A command running n copies of a worker command (for peers whose worker has no
    process-count option); stop() ends all of them, they share the process group."""
    if n == 1:
        return argv
    exe = BIN / argv[0]
    cmd = shlex.join([str(exe) if exe.exists() else argv[0], *argv[1:]])
    return ["sh", "-c", " & ".join([cmd] * n) + " & wait"]
