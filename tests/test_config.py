"""Daemon configuration: TOML file < environment < flags, checked at start."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from dtask import protocol as p
from dtask.broker.localcluster import request
from dtask.raft.localcluster import free_ports

pytestmark = pytest.mark.slow


def dtask(*args: str, env: dict | None = None, wait: bool = True):
    cmd = [sys.executable, "-m", "dtask", *args]
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("DTASK_")}
    full_env.update(env or {})
    if wait:
        return subprocess.run(cmd, capture_output=True, text=True, env=full_env, timeout=60)
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env=full_env)


def serving(endpoint: str, timeout: float = 15.0) -> dict | None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        reply = request(endpoint, {"t": p.CLUSTER}, timeout=0.5)
        if reply and reply.get("t") == p.CLUSTER_INFO:
            return reply["node"]
    return None


def write_config(path, raft: str, client: str, data_dir: str, extra: str = "") -> str:
    path.write_text(f'''
id = 1
data-dir = "{data_dir}"
raft = "{raft}"
client = "{client}"
worker_timeout = 7.5
{extra}
[peers]
1 = "{raft}@{client}"
''')
    return str(path)


def test_file_then_environment_then_flags(tmp_path):
    raft, client, other, third = (f"tcp://127.0.0.1:{port}" for port in free_ports(4))
    cfg = write_config(tmp_path / "s.toml", raft, client, str(tmp_path / "data"))
    # The file alone is a complete configuration.
    proc = dtask("scheduler", "--config", cfg, wait=False)
    try:
        node = serving(client)
        assert node is not None and node["endpoint"] == client
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
    # The environment overrides the file; a flag overrides both.
    env = {"DTASK_SCHEDULER_CLIENT": other}
    proc = dtask("scheduler", "--config", cfg, "--peers", f"1={raft}@{other}", env=env,
                 wait=False)
    try:
        assert serving(other) is not None
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(15)
    proc = dtask("scheduler", "--config", cfg, "--client", third,
                 "--peers", f"1={raft}@{third}", env=env, wait=False)
    try:
        assert serving(third) is not None
        assert request(other, {"t": p.CLUSTER}, timeout=0.3) is None
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(15)


@pytest.mark.parametrize(("extra", "expected"), [
    ('colour = "blue"', "unknown key(s) colour"),
    ('raft = "tcp://nowhere"', "is not tcp://HOST:PORT"),
])
def test_bad_configuration_is_one_line_and_exit_2(tmp_path, extra, expected):
    raft, client = (f"tcp://127.0.0.1:{port}" for port in free_ports(2))
    cfg = tmp_path / "s.toml"
    text = write_config(cfg, raft, client, str(tmp_path / "data"))
    if extra.startswith("raft"):
        cfg.write_text(cfg.read_text().replace(f'raft = "{raft}"', extra))
    else:
        cfg.write_text(extra + "\n" + cfg.read_text())
    r = dtask("scheduler", "--config", text)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dtask: ") and expected in lines[0]


def test_unusable_data_directory_is_refused(tmp_path):
    raft, client = (f"tcp://127.0.0.1:{port}" for port in free_ports(2))
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    cfg = write_config(tmp_path / "s.toml", raft, client, str(blocker / "data"))
    r = dtask("scheduler", "--config", cfg)
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and "cannot create" in r.stderr


def test_malformed_toml_is_refused(tmp_path):
    cfg = tmp_path / "s.toml"
    cfg.write_text("id = = 1\n")
    r = dtask("scheduler", "--config", str(cfg))
    assert r.returncode == 2 and "is not valid TOML" in r.stderr and "Traceback" not in r.stderr
