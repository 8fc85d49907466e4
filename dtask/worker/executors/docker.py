"""`docker`: {"image": "...", "command": [...] or "a line", "env": {...}, "workdir": "..."}
run as `docker run --rm` through the docker CLI, like a shell task.

Env values travel in the CLI's environment (`-e NAME`), not on its command line, so
they do not show in `ps`. The container is named after the attempt so that a timeout
or cancel can remove it: killing the CLI alone would leave the container running.
"""

from __future__ import annotations

import logging
import os
import re
import shlex
import signal
import subprocess
import threading
from typing import Any

from .base import Executor, Handle, OnExit, OnOutput, TaskError, require_map, str_map
from .shell import Command, ProcessHandle

log = logging.getLogger("dtask.worker.docker")

_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_UNSAFE = re.compile(r"[^a-zA-Z0-9_.-]")


def container_name(task_id: str, attempt: int) -> str:
    return f"dtask-{_UNSAFE.sub('_', task_id)}-{attempt}"[:200]


def build_argv(spec: dict, name: str) -> tuple[list[str], dict[str, str]]:
    """The docker CLI's argv and the env values it passes on with -e NAME."""
    image = spec.get("image")
    if not isinstance(image, str) or not image or image.startswith("-"):
        raise TaskError("field image must be an image name")
    command = spec.get("command", [])
    if isinstance(command, str):
        command = shlex.split(command)
    if not isinstance(command, list) or not all(isinstance(c, str) for c in command):
        raise TaskError("field command must be a list of strings or a command line")
    env = str_map(spec.get("env"), "env")
    for key in env:
        if not _ENV_NAME.match(key):
            raise TaskError(f"env name {key!r} is not a valid variable name")
    argv = ["docker", "run", "--rm", "--name", name]
    workdir = spec.get("workdir")
    if workdir is not None:
        if not isinstance(workdir, str) or not workdir.startswith("/"):
            raise TaskError("field workdir must be an absolute path")
        argv += ["--workdir", workdir]
    for key in sorted(env):
        argv += ["-e", key]
    return argv + [image, *command], env


class DockerHandle(ProcessHandle):
    def __init__(self, reactor: Any, cmd: Command, name: str, on_output: OnOutput,
                 on_exit: OnExit) -> None:
        super().__init__(reactor, cmd, on_output, on_exit)
        self.name = name
        self.removing = False

    def signal(self, sig: int) -> None:
        super().signal(sig)  # the CLI forwards SIGTERM to the container (sig-proxy)
        if sig == signal.SIGKILL and not self.removing:
            self.removing = True
            threading.Thread(target=remove_container, args=(self.name,), daemon=True).start()


def remove_container(name: str) -> None:
    """Off the loop: `docker rm -f` may take a while, and the CLI is gone by now."""
    try:
        subprocess.run(["docker", "rm", "-f", name], stdin=subprocess.DEVNULL,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=60,
                       start_new_session=True, check=False)
    except (OSError, subprocess.SubprocessError) as exc:
        log.warning("event=docker_rm_failed container=%s error=%r", name, str(exc))


class DockerExecutor(Executor):
    name = "docker"

    def parse(self, payload: Any) -> dict:
        spec = require_map(payload, self.name)
        build_argv(spec, "check")  # validate now, so a bad payload fails before a slot is used
        return spec

    def start(self, spec: dict, task: dict, on_output: OnOutput, on_exit: OnExit) -> Handle:
        name = container_name(task["task_id"], task["attempt"])
        argv, env = build_argv(spec, name)
        cmd = Command(argv, {**os.environ, **env}, None)
        return DockerHandle(self.ctx.reactor, cmd, name, on_output, on_exit)
