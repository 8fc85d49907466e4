"""`@task`: register a Python function under a name that tasks can be submitted by.

The worker's Python pool children import the modules named in `--import`; importing
them runs the decorators, which fill `TASKS`. A payload's `fn` is either such a name
or a "module:function" path.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any, TypeVar, overload

F = TypeVar("F", bound=Callable[..., Any])

TASKS: dict[str, Callable[..., Any]] = {}


@overload
def task(fn: F) -> F: ...
@overload
def task(*, name: str | None = None) -> Callable[[F], F]: ...


def task(fn: Callable[..., Any] | None = None, *, name: str | None = None) -> Any:
    """Register `fn` as a task; its name defaults to "module.qualname".

    Use as `@task` or `@task(name="resize")`. The function itself is returned
    unchanged, so it can still be called directly.
    """

    def register(f: F) -> F:
        key = name or f"{f.__module__}.{f.__qualname__}"
        other = TASKS.get(key)
        if other is not None and other is not f:
            raise ValueError(f"task name {key!r} is already registered to {other!r}")
        TASKS[key] = f
        return f

    return register(fn) if fn is not None else register


_resolved: dict[str, Callable[..., Any]] = {}  # warm children reuse lookups across tasks


def resolve(ref: str) -> Callable[..., Any]:
    """The function for "module:function" (dotted attributes allowed) or a task name."""
    fn = _resolved.get(ref) or TASKS.get(ref)
    if fn is not None:
        return fn
    module_name, sep, attr = ref.partition(":")
    if not sep:
        raise LookupError(f"no task registered as {ref!r} (import its module with --import, "
                          "or give fn as 'module:function')")
    obj: Any = importlib.import_module(module_name)
    for part in attr.split("."):
        obj = getattr(obj, part)
    if not callable(obj):
        raise TypeError(f"{ref} is not callable")
    _resolved[ref] = obj
    return obj
