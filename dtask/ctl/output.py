"""What dtaskctl prints: tables and times for people, JSON for scripts, a spinner."""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import json
import os
import sys
import threading
import time
from collections.abc import Sequence
from typing import IO, Any

import msgpack

from .. import protocol as p

# -- times ------------------------------------------------------------------------


def span(seconds: float) -> str:
    """A duration for people: 350ms, 3.2s, 42s, 5m12s, 2h05m, 3d4h."""
    seconds = abs(seconds)
    if seconds < 1:
        return f"{seconds * 1000:.0f}ms"
    if seconds < 60:
        return f"{seconds:.1f}s" if seconds < 10 else f"{seconds:.0f}s"
    minutes, sec = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{sec:02d}s"
    hours, minutes = divmod(minutes, 60)
    if hours < 24:
        return f"{hours}h{minutes:02d}m"
    days, hours = divmod(hours, 24)
    return f"{days}d{hours}h"


def ago(us: int, now: float | None = None) -> str:
    """'3.2s ago' / 'in 25s' for an epoch-microseconds timestamp, '-' for 0."""
    if not us:
        return "-"
    delta = (time.time() if now is None else now) - us / 1e6
    return f"{span(delta)} ago" if delta >= 0 else f"in {span(delta)}"


def local_time(us: int) -> str:
    return dt.datetime.fromtimestamp(us / 1e6).strftime("%Y-%m-%d %H:%M:%S")


def when(us: int) -> str:
    """Local time plus relative: '2024-05-01 12:00:01 (3.2s ago)'."""
    return "-" if not us else f"{local_time(us)} ({ago(us)})"


# -- tables -----------------------------------------------------------------------


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """Left-aligned columns two spaces apart; the last column is not padded."""
    cells = [[str(h) for h in headers]] + [["" if c is None else str(c) for c in r]
                                           for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = []
    for r in cells:
        parts = [c.ljust(w) for c, w in zip(r[:-1], widths[:-1], strict=True)] + [r[-1]]
        lines.append("  ".join(parts).rstrip())
    return "\n".join(lines)


def fields(pairs: Sequence[tuple[str, object]]) -> str:
    """A key/value block: 'status    COMPLETED'."""
    width = max(len(k) for k, _ in pairs)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in pairs)


def shorten(text: str, limit: int = 60) -> str:
    text = " ".join(text.split())  # one line, whatever the error message held
    return text if len(text) <= limit else text[: limit - 1] + "…"


# -- JSON -------------------------------------------------------------------------


def _plain(value: Any) -> Any:
    """bytes anywhere -> base64 text, so every reply can be printed as JSON."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return base64.b64encode(bytes(value)).decode()
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _is_json(content_type: str) -> bool:
    return content_type == p.JSON or content_type.endswith("+json")


def task_json(task: dict) -> dict:
    """The task object of docs/protocol.md §5, made printable.

    A JSON payload is included as its value; any other payload as `payload_base64`.
    An attempt's `result` (msgpack on the wire) is decoded to its value.
    """
    out = {}
    for key, value in task.items():
        if key != "payload":
            out[key] = value
            continue
        raw = value or b""
        try:
            if not _is_json(str(task.get("content_type", p.JSON))):
                raise ValueError
            out["payload"] = json.loads(raw) if raw else None
        except ValueError:  # not JSON after all (or not meant to be): keep the bytes
            out["payload_base64"] = base64.b64encode(raw).decode()
    attempts = []
    for a in out.get("attempts") or []:
        a = dict(a)
        if a.get("result"):
            # An executor that sent something odd: show the bytes rather than fail.
            with contextlib.suppress(Exception):
                a["result"] = msgpack.unpackb(a["result"], raw=False, strict_map_key=False)
        else:
            a["result"] = None
        attempts.append(a)
    out["attempts"] = attempts
    return _plain(out)


def dump(value: Any, stream: IO[str] | None = None) -> None:
    stream = stream or sys.stdout
    json.dump(_plain(value), stream, ensure_ascii=False, indent=2, default=str)
    stream.write("\n")


def dump_line(value: Any, stream: IO[str] | None = None) -> None:
    """One JSON document per line (for streams such as `logs -f --json`)."""
    stream = stream or sys.stdout
    stream.write(json.dumps(_plain(value), ensure_ascii=False, default=str) + "\n")
    stream.flush()


# -- progress -----------------------------------------------------------------------


class Spinner:
    """A one-line progress indicator on stderr, only when stderr is a terminal.

    Redrawn by a background thread so it keeps moving while the main thread blocks
    in a long poll. `pause()` wipes it before stdout output that shares the terminal.
    """

    FRAMES_UTF8 = "⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏"
    FRAMES_ASCII = "|/-\\"

    def __init__(self, text: str = "", stream: IO[str] | None = None,
                 enabled: bool = True) -> None:
        self.stream = stream or sys.stderr
        self.active = enabled and _isatty(self.stream)
        encoding = (getattr(self.stream, "encoding", "") or "").lower()
        self.frames = self.FRAMES_UTF8 if encoding.startswith("utf") else self.FRAMES_ASCII
        self.text = text
        self.hidden = False  # True while stdout has a partial line on the same terminal
        self.started = time.monotonic()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._shown = False
        self._thread: threading.Thread | None = None

    def __enter__(self) -> Spinner:
        if self.active:
            self._thread = threading.Thread(target=self._run, name="dtaskctl-spinner",
                                            daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.pause()

    def update(self, text: str) -> None:
        self.text = text

    def pause(self) -> None:
        """Erase the line now; the next tick draws it again unless `hidden`."""
        with self._lock:
            if self._shown:
                self.stream.write("\r\x1b[K")
                self.stream.flush()
                self._shown = False

    def _run(self) -> None:
        i = 0
        while not self._stop.wait(0.1):
            if self.hidden:
                continue
            frame = self.frames[i % len(self.frames)]
            i += 1
            line = f"{frame} {self.text} ({span(time.monotonic() - self.started)})"
            # A line longer than the terminal wraps, and \r would no longer erase it.
            width = _columns(self.stream) - 1
            line = line if len(line) <= width else line[: width - 1] + "…"
            with self._lock:
                if self._stop.is_set():
                    return
                self.stream.write(f"\r{line}\x1b[K")
                self.stream.flush()
                self._shown = True


def _columns(stream: IO[str]) -> int:
    try:
        return os.get_terminal_size(stream.fileno()).columns
    except (AttributeError, ValueError, OSError):
        return 80


def _isatty(stream: IO[str]) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
