"""The registry: which configurations each --systems name stands for, and what is
installed. A peer's module imports its library, so it is loaded only when asked for."""

from __future__ import annotations

import importlib
import importlib.util
import socket
from importlib import metadata

from bench.suite.model import Config

# --systems name -> the distribution it needs (its version goes into the report).
PACKAGES = {
    "dtask": "dtask",
    "celery": "celery",
    "huey": "huey",
    "rq": "rq",
    "dramatiq": "dramatiq",
    "procrastinate": "procrastinate",
    "pysyncobj": "pysyncobj",
}
TASK_SYSTEMS = ("dtask", "celery", "huey", "rq", "dramatiq", "procrastinate")


def installed(name: str) -> bool:
    module = PACKAGES[name]
    return importlib.util.find_spec(module) is not None


def version(name: str) -> str:
    try:
        return metadata.version(PACKAGES[name])
    except metadata.PackageNotFoundError:
        return "?"


def configs(name: str) -> list[Config]:
    """Every configuration of one system (task queue and, for DTask, its Raft layer)."""
    from bench.suite import raft

    if name == "pysyncobj":
        return raft.pysyncobj_configs()
    out = importlib.import_module(f"bench.suite.peer_{name}").configs()
    if name == "dtask":
        out.append(raft.dtask_config())
    return out


# The service a peer needs, as (host, port); DTask and PySyncObj start their own nodes.
# "redis" stands for the Redis the peers use now (redisdb.address()).
SERVICES = {"celery": "redis", "huey": "redis", "rq": "redis", "dramatiq": "redis",
            "procrastinate": ("127.0.0.1", 5432)}


def usable(name: str) -> bool:
    """Installed, and its broker or database accepts connections."""
    if not installed(name):
        return False
    if name not in SERVICES:
        return True
    from bench.suite import redisdb

    service = SERVICES[name]
    try:
        socket.create_connection(redisdb.address() if service == "redis" else service,
                                 timeout=1.0).close()
    except OSError:
        return False
    return True
