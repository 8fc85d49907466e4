"""The `dtaskctl` group: global options, the client, and how errors become exit codes.

Every failure a user can cause ends as one line `dtaskctl: <message>` on stderr and a
documented exit code (docs/cli.md); commands just raise, `CtlGroup.main` translates.
"""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import click

from .. import protocol as p
from ..client import Client, DTaskError, Unavailable
from .params import Duration, PayloadError

# Exit codes (docs/cli.md). 2 is "timed out" as for `wait`, so click's own usage
# errors (normally 2) are moved to USAGE: a script can tell the two apart.
OK = 0
TASK_FAILED = 1  # the task ended FAILED or CANCELLED
TIMED_OUT = 2  # the task was not finished within --timeout
USAGE = 3  # bad option, argument or payload; a request the scheduler refused as invalid
NOT_FOUND = 4  # no such task (or attempt)
CONFLICT = 5  # the request contradicts the task's state
UNAVAILABLE = 6  # no scheduler answered / no leader within the request timeout
ERROR = 7  # anything else: a scheduler error, an unsupported feature, a bug
INTERRUPTED = 130  # Ctrl-C, as shells report SIGINT

DEFAULT_ENDPOINTS = "tcp://127.0.0.1:7301,tcp://127.0.0.1:7302,tcp://127.0.0.1:7303"
DEFAULT_TIMEOUT = 5.0

_CODES = {p.BAD_REQUEST: USAGE, p.TOO_LARGE: USAGE, p.NOT_FOUND: NOT_FOUND,
          p.CONFLICT: CONFLICT, p.UNAVAILABLE: UNAVAILABLE}


class CtlError(Exception):
    """A failure to report as one line with this exit code."""

    def __init__(self, message: str, code: int = ERROR) -> None:
        super().__init__(message)
        self.message = message
        self.code = code


@dataclass(slots=True)
class Settings:
    endpoints: str = DEFAULT_ENDPOINTS
    timeout: float = DEFAULT_TIMEOUT  # per request, across retries and failovers
    json: bool = False
    _client: Client | None = field(default=None, repr=False)

    def endpoint_list(self) -> list[str]:
        from ..client import parse_endpoints

        try:
            return parse_endpoints(self.endpoints)
        except ValueError as exc:
            raise CtlError(f"--endpoints: {exc}", USAGE) from None

    def client(self) -> Client:
        """One client per invocation, closed when the command ends."""
        if self._client is None:
            try:
                self._client = Client(self.endpoint_list(), timeout=self.timeout)
            except ValueError as exc:
                raise CtlError(f"--endpoints: {exc}", USAGE) from None
            click.get_current_context().call_on_close(self._client.close)
        return self._client


def settings() -> Settings:
    return click.get_current_context().ensure_object(Settings)


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def fail(message: str, code: int) -> int:
    click.echo(f"dtaskctl: {_one_line(message)}", err=True)
    return code


def describe(exc: BaseException, endpoints: str) -> tuple[str, int]:
    """The one-line message and exit code for an exception a command let through."""
    if isinstance(exc, CtlError):
        return exc.message, exc.code
    if isinstance(exc, Unavailable):
        # The client's note about retrying with the same key is for API users; the
        # CLI's submit says how to do that with dtaskctl instead.
        text = exc.message.split("; the outcome is unknown")[0]
        return (f"cluster unavailable: {text}; tried {endpoints} (is a cluster running "
                "there? start one with 'dtask dev', or set --endpoints or "
                "DTASK_ENDPOINTS)", UNAVAILABLE)
    if isinstance(exc, DTaskError):
        if exc.code == "CLOSED":
            return "interrupted", INTERRUPTED
        return exc.message or exc.code, _CODES.get(exc.code, ERROR)
    if isinstance(exc, PayloadError):
        return str(exc), USAGE
    if isinstance(exc, TimeoutError):
        return f"timed out: {exc}", TIMED_OUT
    if isinstance(exc, click.UsageError):
        hint = ""
        if exc.ctx is not None:
            hint = f" (see '{exc.ctx.command_path} --help')"
        return exc.format_message().rstrip(".") + hint, USAGE
    if isinstance(exc, click.ClickException):  # e.g. FileError: still the user's input
        return exc.format_message(), USAGE
    return (f"internal error: {exc!r} (set DTASK_DEBUG=1 for the traceback and please "
            "report it)", ERROR)


class CtlGroup(click.Group):
    """A click group whose errors are one line and whose exit codes are ours."""

    def main(self, args: Any = None, prog_name: str | None = None,
             complete_var: str | None = None, standalone_mode: bool = True,
             **extra: Any) -> Any:
        if not standalone_mode:  # embedded use (tests with CliRunner): plain click
            return super().main(args, prog_name, complete_var, False, **extra)
        code = OK
        try:
            rv = super().main(args, prog_name or "dtaskctl", complete_var, False, **extra)
            code = rv if isinstance(rv, int) else OK
        except (KeyboardInterrupt, click.Abort):
            code = INTERRUPTED
        except click.exceptions.NoArgsIsHelpError as exc:
            exc.show()  # `dtaskctl` alone: the help text, not an error line
            code = USAGE
        except BrokenPipeError:
            # `dtaskctl list | head`: the reader left; that is not an error. Point
            # stdout at /dev/null so the interpreter's final flush does not complain.
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            code = OK
        except Exception as exc:
            if os.environ.get("DTASK_DEBUG"):
                traceback.print_exc()
            # The command's context is gone by now; its settings were kept for this.
            endpoints = (_last_settings or Settings()).endpoints
            message, code = describe(exc, endpoints)
            fail(message, code)
        sys.exit(code)


_last_settings: Settings | None = None  # errors are reported after the context is gone

F = TypeVar("F", bound=Callable[..., Any])


def _set_json(ctx: click.Context, _: click.Parameter, value: bool) -> None:
    if value:
        ctx.ensure_object(Settings).json = True


def _set_endpoints(ctx: click.Context, _: click.Parameter, value: str | None) -> None:
    if value:
        ctx.ensure_object(Settings).endpoints = value


def common(f: F) -> F:
    """--json and --endpoints on a subcommand too: `dtaskctl status ID --json`."""
    f = click.option("--json", "json_out", is_flag=True, expose_value=False,
                     callback=_set_json, help="Print JSON for scripts.")(f)
    f = click.option("-e", "--endpoints", metavar="LIST", expose_value=False,
                     callback=_set_endpoints,
                     help="Scheduler client endpoints (overrides the global option).")(f)
    return f


@click.group(cls=CtlGroup, context_settings={"help_option_names": ["-h", "--help"],
                                             "max_content_width": 100})
@click.option("-e", "--endpoints", envvar="DTASK_ENDPOINTS", default=DEFAULT_ENDPOINTS,
              metavar="LIST", show_default=True, show_envvar=True,
              help="Comma-separated scheduler client endpoints.")
@click.option("--timeout", "request_timeout", envvar="DTASK_TIMEOUT", type=Duration(),
              default="5s", show_default=True, show_envvar=True,
              help="How long one request may keep trying to reach a leader.")
@click.option("--json", "json_out", is_flag=True, help="Print JSON for scripts.")
@click.version_option(package_name="dtask", prog_name="dtaskctl")
@click.pass_context
def main(ctx: click.Context, endpoints: str, request_timeout: float, json_out: bool) -> None:
    """Control a DTask cluster: submit and follow tasks, inspect the cluster.

    Works with `dtask dev` out of the box. Exit codes: 0 ok, 1 task failed or
    cancelled, 2 timed out, 3 bad usage or input, 4 not found, 5 conflict,
    6 cluster unavailable, 7 other error, 130 interrupted.
    """
    global _last_settings
    if request_timeout <= 0:
        raise click.BadParameter("must be more than 0", param_hint="'--timeout'")
    obj = ctx.ensure_object(Settings)
    obj.endpoints, obj.timeout, obj.json = endpoints, request_timeout, json_out
    _last_settings = obj
