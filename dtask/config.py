"""Daemon configuration: a TOML file, environment variables and flags.

Precedence, highest first: a command-line flag, an environment variable
(`DTASK_<COMMAND>_<OPTION>`, e.g. `DTASK_SCHEDULER_DATA_DIR`; a few options also have a
short name such as `DTASK_ENDPOINTS`), the file given with `--config`, the default.
The file's keys are the long option names (`data-dir` or `data_dir`); an unknown key
is an error at start, not silently ignored. Example for `dtask scheduler`:

    id = 1
    data-dir = "/var/lib/dtask/scheduler-1"
    raft = "tcp://10.0.0.1:7401"
    client = "tcp://10.0.0.1:7301"
    worker-timeout = 5.0
    [peers]
    1 = "tcp://10.0.0.1:7401@tcp://10.0.0.1:7301"
    2 = "tcp://10.0.0.2:7401@tcp://10.0.0.2:7301"
    3 = "tcp://10.0.0.3:7401@tcp://10.0.0.3:7301"
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Callable

import click

from .protocol import is_endpoint

ENV_PREFIX = "DTASK"


def config_option(fn: Callable) -> Callable:
    """`--config FILE` for a daemon command: the file becomes click's default map."""
    return click.option(
        "--config", "config_path", type=click.Path(dir_okay=False), is_eager=True,
        expose_value=False, callback=_load, help="A TOML file with any of these options.")(fn)


def _load(ctx: click.Context, param: click.Parameter, path: str | None) -> None:
    if not path:
        return
    try:
        with open(path, "rb") as f:
            raw = tomllib.load(f)
    except OSError as exc:
        raise click.BadParameter(f"cannot read {path}: {exc.strerror}", ctx, param) from None
    except tomllib.TOMLDecodeError as exc:
        raise click.BadParameter(f"{path} is not valid TOML: {exc}", ctx, param) from None
    by_option = {}
    for p in ctx.command.params:
        for opt in p.opts:
            if opt.startswith("--") and p.name != "config_path":
                by_option[opt[2:]] = p.name
    defaults, unknown = {}, []
    for key, value in raw.items():
        name = by_option.get(key.replace("_", "-"))
        if name is None:
            unknown.append(key)
        elif name == "peers" and isinstance(value, dict):
            defaults[name] = ",".join(f"{k}={v}" for k, v in value.items())
        elif isinstance(value, list):
            defaults[name] = ",".join(str(v) for v in value)
        else:
            defaults[name] = value
    if unknown:
        known = ", ".join(sorted(by_option))
        raise click.BadParameter(f"{path}: unknown key(s) {', '.join(sorted(unknown))} "
                                 f"(known: {known})", ctx, param)
    ctx.default_map = {**(ctx.default_map or {}), **defaults}


def endpoint(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """Check a tcp://HOST:PORT address at start instead of failing inside ZeroMQ."""
    if value is None:
        return value
    if not is_endpoint(value.strip()):
        raise click.BadParameter(f"{value!r} is not tcp://HOST:PORT", ctx, param)
    return value.strip()


def data_dir(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """The data directory must exist (or be creatable) and be writable by this user."""
    if value is None:
        return value
    try:
        os.makedirs(value, exist_ok=True)
    except OSError as exc:
        raise click.BadParameter(f"cannot create {value}: {exc.strerror}", ctx, param) \
            from None
    if not os.access(value, os.W_OK | os.X_OK):
        raise click.BadParameter(f"{value} is not writable by this user", ctx, param)
    return value
