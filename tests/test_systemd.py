"""systemd integration: sd_notify against real datagram sockets, and the unit files.

The unit files are checked with the real `systemd-analyze verify` (Debian package
`systemd`; `.ci/run` installs it). It is not skipped when missing: a missing verifier
fails the test with the install command.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from dtask import sdnotify
from dtask.sdnotify import Watchdog, notify, ready, status, stopping
from dtask.worker.config import WorkerConfig

ROOT = Path(__file__).resolve().parent.parent
UNIT_DIR = ROOT / "systemd"
UNITS = ["dtask-scheduler@.service", "dtask-worker@.service", "dtask.target"]


# -- helpers ---------------------------------------------------------------------------


def _recv(sock: socket.socket) -> bytes:
    sock.settimeout(5.0)
    return sock.recv(4096)


def _nothing_waiting(sock: socket.socket) -> bool:
    sock.setblocking(False)
    try:
        sock.recv(4096)
    except BlockingIOError:
        return True
    return False


@pytest.fixture
def path_socket(monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    """A bound AF_UNIX datagram socket on the file system, named by NOTIFY_SOCKET."""
    # A short directory of our own: sun_path holds only 108 bytes, pytest's tmp_path
    # can be longer than that.
    with tempfile.TemporaryDirectory(prefix="sdn") as d:
        path = os.path.join(d, "notify")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(path)
        monkeypatch.setenv("NOTIFY_SOCKET", path)
        monkeypatch.delenv("WATCHDOG_USEC", raising=False)
        monkeypatch.delenv("WATCHDOG_PID", raising=False)
        try:
            yield sock
        finally:
            sock.close()


@pytest.fixture
def abstract_socket(monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    """A datagram socket in the Linux abstract namespace; NOTIFY_SOCKET='@name'."""
    name = f"dtask-test-{uuid.uuid4().hex}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
    try:
        yield sock
    finally:
        sock.close()


# -- sd_notify -------------------------------------------------------------------------


def test_helpers_send_exact_datagrams(path_socket: socket.socket) -> None:
    assert ready() is True
    assert _recv(path_socket) == b"READY=1"
    assert status("serving 3 nodes") is True
    assert _recv(path_socket) == b"STATUS=serving 3 nodes"
    assert stopping() is True
    assert _recv(path_socket) == b"STOPPING=1"
    assert notify("READY=1\nSTATUS=up") is True
    assert _recv(path_socket) == b"READY=1\nSTATUS=up"
    assert _nothing_waiting(path_socket)


def test_status_stays_one_line(path_socket: socket.socket) -> None:
    assert status("line one\nline two")
    assert _recv(path_socket) == b"STATUS=line one line two"


def test_abstract_namespace(abstract_socket: socket.socket) -> None:
    assert ready() is True
    assert _recv(abstract_socket) == b"READY=1"
    assert stopping() is True
    assert _recv(abstract_socket) == b"STOPPING=1"


@pytest.mark.parametrize("value", [None, ""])
def test_unset_notify_socket_is_a_noop(monkeypatch: pytest.MonkeyPatch,
                                       value: str | None) -> None:
    if value is None:
        monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    else:
        monkeypatch.setenv("NOTIFY_SOCKET", value)
    assert notify("READY=1") is False
    assert ready() is False
    assert stopping() is False
    assert status("x") is False


def test_send_failure_returns_false_without_raising(monkeypatch: pytest.MonkeyPatch,
                                                    tmp_path: Path) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "nobody-listens"))
    assert ready() is False
    monkeypatch.setenv("NOTIFY_SOCKET", f"@dtask-test-absent-{uuid.uuid4().hex}")
    assert ready() is False


def test_explicit_env_mapping(path_socket: socket.socket) -> None:
    assert notify("READY=1", env={}) is False
    assert _nothing_waiting(path_socket)


def test_watchdog_pings_at_half_the_interval(path_socket: socket.socket,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "10000000")  # WatchdogSec=10
    wd = Watchdog()
    assert wd.enabled and wd.interval == 5.0
    assert wd.due(100.0)  # the first call pings at once
    wd.maybe_ping(100.0)
    assert _recv(path_socket) == b"WATCHDOG=1"
    for now in (100.0, 102.5, 104.999):
        assert not wd.due(now)
        wd.maybe_ping(now)
    assert _nothing_waiting(path_socket)
    assert wd.due(105.0)
    wd.maybe_ping(105.0)
    assert _recv(path_socket) == b"WATCHDOG=1"
    assert not wd.due(109.9)
    # A late turn of the loop: one ping, the next is due half an interval after it.
    wd.maybe_ping(123.0)
    assert _recv(path_socket) == b"WATCHDOG=1"
    assert not wd.due(127.9) and wd.due(128.0)
    assert _nothing_waiting(path_socket)
    # ping() sends unconditionally and reschedules.
    assert wd.ping(200.0) is True
    assert _recv(path_socket) == b"WATCHDOG=1"
    assert not wd.due(204.0) and wd.due(205.0)


def test_watchdog_pid_must_be_ours(path_socket: socket.socket,
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "2000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert Watchdog().interval == 1.0
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))
    wd = Watchdog()
    assert not wd.enabled and not wd.due(1e9)
    wd.maybe_ping(1e9)
    assert wd.ping() is False
    assert _nothing_waiting(path_socket)


@pytest.mark.parametrize("usec", [None, "", "0", "abc", "-5", "1.5"])
def test_watchdog_disabled_without_a_valid_interval(path_socket: socket.socket,
                                                    monkeypatch: pytest.MonkeyPatch,
                                                    usec: str | None) -> None:
    if usec is not None:
        monkeypatch.setenv("WATCHDOG_USEC", usec)
    wd = Watchdog()
    assert not wd.enabled and not wd.due(0.0) and not wd.due(1e12)
    wd.maybe_ping(1e12)
    assert _nothing_waiting(path_socket)


def test_watchdog_without_notify_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    monkeypatch.setenv("WATCHDOG_USEC", "1000000")
    wd = Watchdog()
    assert wd.due(0.0)
    assert wd.ping(0.0) is False  # nowhere to send; still no exception
    wd.maybe_ping(10.0)


def test_ready_from_another_process(path_socket: socket.socket) -> None:
    env = dict(os.environ)  # NOTIFY_SOCKET set by the fixture
    proc = subprocess.run(
        [sys.executable, "-c", "import sys; from dtask.sdnotify import ready; "
                               "sys.exit(0 if ready() else 1)"],
        env=env, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert _recv(path_socket) == b"READY=1"


def test_module_has_no_dependencies() -> None:
    src = Path(sdnotify.__file__).read_text()
    imports = set(re.findall(r"^(?:from|import) (\w+)", src, re.M))
    assert imports <= {"__future__", "os", "socket", "time", "collections"}


# -- unit files ------------------------------------------------------------------------


def _directives(unit: str) -> dict[str, list[str]]:
    """KEY -> values, across sections, with backslash continuations joined."""
    text = (UNIT_DIR / unit).read_text().replace("\\\n", " ")
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line[0] in "#;[":
            continue
        key, _, value = line.partition("=")
        out.setdefault(key.strip(), []).append(" ".join(value.split()))
    return out


def _systemd_analyze() -> str:
    exe = shutil.which("systemd-analyze")
    if exe is None:
        pytest.fail("systemd-analyze not found: install it with "
                    "`apt-get install -y --no-install-recommends systemd`")
    return exe


@pytest.fixture(scope="module")
def verify_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny root for `systemd-analyze verify --root`.

    verify checks that ExecStart's binary exists and is executable, which
    /usr/local/bin/dtask is not on a test machine. Rather than edit the units, we
    verify them unchanged inside a root holding a stand-in /usr/local/bin/dtask, the
    units in /etc/systemd/system, and the host's own systemd units (sysinit.target,
    network-online.target, ...) that ours depend on.
    """
    root = tmp_path_factory.mktemp("sdroot")
    exe = root / "usr/local/bin/dtask"
    exe.parent.mkdir(parents=True)
    exe.write_text("#!/bin/sh\nexit 0\n")
    exe.chmod(0o755)
    (root / "usr/lib/systemd").mkdir(parents=True)
    host_units = Path("/usr/lib/systemd/system")
    if not host_units.is_dir():
        host_units = Path("/lib/systemd/system")
    shutil.copytree(host_units, root / "usr/lib/systemd/system", symlinks=True)
    etc = root / "etc/systemd/system"
    etc.mkdir(parents=True)
    for unit in UNITS:
        shutil.copy(UNIT_DIR / unit, etc / unit)
    return root


def _verify(root: Path, *names: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([_systemd_analyze(), "verify", "--man=no", f"--root={root}", *names],
                          capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("name", ["dtask-scheduler@1.service", "dtask-worker@1.service",
                                  "dtask.target"])
def test_systemd_analyze_verify(verify_root: Path, name: str) -> None:
    # verify exits 0 on many problems (unknown keys, bad values are "ignoring" warnings),
    # so any output at all is a failure.
    proc = _verify(verify_root, name)
    assert proc.returncode == 0 and not (proc.stdout + proc.stderr).strip(), \
        proc.stdout + proc.stderr


def test_verify_catches_mistakes(verify_root: Path) -> None:
    """The check above is not vacuous: a typo and a bad value are reported."""
    etc = verify_root / "etc/systemd/system"
    good = (UNIT_DIR / "dtask-worker@.service").read_text()
    bad = good.replace("\nKillMode=mixed", "\nKilMode=mixed").replace(
        "\nType=notify", "\nType=notifyy")
    assert bad != good
    (etc / "dtask-bad@.service").write_text(bad)
    try:
        proc = _verify(verify_root, "dtask-bad@1.service")
    finally:
        (etc / "dtask-bad@.service").unlink()
    out = proc.stdout + proc.stderr
    assert "KilMode" in out and "notifyy" in out, out


def test_unit_settings() -> None:
    s = _directives("dtask-scheduler@.service")
    assert s["Type"] == ["notify"] and s["NotifyAccess"] == ["main"]
    assert s["StateDirectory"] == ["dtask/scheduler-%i"]
    assert s["EnvironmentFile"] == ["/etc/dtask/scheduler-%i.env"]
    cmd = s["ExecStart"][0]
    for part in ("/usr/local/bin/dtask scheduler", "--id %i", "--data-dir ${STATE_DIRECTORY}",
                 "--raft ${DTASK_RAFT}", "--client ${DTASK_CLIENT}", "--peers ${DTASK_PEERS}"):
        assert part in cmd
    for key, value in {"Restart": "on-failure", "RestartSec": "1", "WatchdogSec": "10",
                       "TimeoutStopSec": "15", "KillMode": "mixed", "User": "dtask",
                       "Group": "dtask", "NoNewPrivileges": "yes", "ProtectSystem": "strict",
                       "ProtectHome": "yes", "PrivateTmp": "yes", "PrivateDevices": "yes",
                       "ProtectKernelTunables": "yes", "ProtectControlGroups": "yes",
                       "RestrictSUIDSGID": "yes", "LockPersonality": "yes",
                       "PartOf": "dtask.target", "WantedBy": "dtask.target"}.items():
        assert s[key] == [value], key

    w = _directives("dtask-worker@.service")
    assert w["Type"] == ["notify"] and w["KillMode"] == ["mixed"]
    assert w["Restart"] == ["on-failure"]
    assert w["EnvironmentFile"] == ["/etc/dtask/worker.env"]
    assert "dtask worker --id %H-%i --endpoints ${DTASK_ENDPOINTS}" in w["ExecStart"][0]
    assert w["PartOf"] == ["dtask.target"] and w["WantedBy"] == ["dtask.target"]

    t = _directives("dtask.target")
    assert "Wants" not in t or t["Wants"] == ["network-online.target"]
    assert "Requires" not in t


def test_worker_stop_timeout_covers_its_drain() -> None:
    """TimeoutStopSec must outlast drain + kill grace + ack wait, or systemd SIGKILLs
    a drain that would have finished cleanly."""
    cfg = WorkerConfig(endpoints=["tcp://127.0.0.1:1"])
    (timeout,) = _directives("dtask-worker@.service")["TimeoutStopSec"]
    assert float(timeout) > cfg.drain_timeout + cfg.kill_grace + cfg.ack_timeout


def test_scheduler_daemon_notifies_ready_watchdog_and_stopping(path_socket: socket.socket,
                                                               tmp_path: Path) -> None:
    """The real `dtask scheduler` under a fake systemd: READY=1 once serving, watchdog
    pings while it runs, STOPPING=1 on SIGTERM, then a clean exit."""
    from dtask.broker.localcluster import SchedulerCluster

    env = dict(os.environ, WATCHDOG_USEC="400000")  # NOTIFY_SOCKET set by the fixture
    cluster = SchedulerCluster(str(tmp_path), size=1)
    member = cluster.members[1]
    os.makedirs(member.data_dir)
    peers = f"1={member.raft}@{member.client}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "dtask", "scheduler", "--id", "1", "--data-dir",
         member.data_dir, "--raft", member.raft, "--client", member.client, "--peers", peers],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        path_socket.settimeout(20)
        got = [_recv(path_socket) for _ in range(3)]
        assert got[0] == b"READY=1" and got[1:] == [b"WATCHDOG=1", b"WATCHDOG=1"]
        proc.terminate()
        while (msg := _recv(path_socket)) == b"WATCHDOG=1":
            pass
        assert msg == b"STOPPING=1"
        assert proc.wait(15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
