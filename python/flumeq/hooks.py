"""Middleware: objects with any of these methods, given to ``Client``,
``AsyncClient``, ``App`` and ``Engine`` (``middleware=[...]``):

- ``before_enqueue(fields)``: the producer side, before anything is written.
  ``fields`` is a dict with ``type``, ``queue``, ``payload``, ``task_id``
  (``None`` when generated) and ``labels`` (a dict the hook may change; it
  is written with the task). ``enqueue_many`` calls it once per call, with
  the first item's ``type`` and ``payload`` and ``count`` (the labels are
  the batch's).
- ``before_run(task)``, ``after_run(task, result, error)``: around each run,
  in the actor process, in the task's thread or coroutine (``error`` is the
  exception, or ``None``).
- ``on_retry(task, error, delay)``: the run failed and the task will run
  again (``delay``: seconds the handler asked for with ``Retry(delay=...)``,
  ``None`` for the engine's backoff).
- ``on_dead(task, reason, error)``: the run failed for good: the task goes
  to the dead letters (``reason`` as there: ``error``, ``rejected``...).

A hook that raises is logged (``flumeq.hooks``) and changes nothing: the task
is enqueued, run and ended as without it. A handler killed for its hard
timeout, or with its actor, gets no ``after_run``.

Without middleware nothing of this runs: the handlers are not wrapped, and
enqueue checks one empty list.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Callable, Optional

from .task import Reject, Retry, Task

__all__ = ["GLOBAL", "Middleware", "before_enqueue", "combined", "wrap_handlers"]

log = logging.getLogger("flumeq.hooks")

#: Middleware every client and engine of this process uses too (what
#: ``flumeq.tracing.instrument()`` adds to).
GLOBAL: list[Any] = []

HOOKS = ("before_enqueue", "before_run", "after_run", "on_retry", "on_dead")

Middleware = Any
Handler = Callable[[Task], Any]


def checked(middleware: Iterable[Middleware]) -> list[Middleware]:
    """``middleware`` as a list, each with at least one hook."""
    found = list(middleware)
    for item in found:
        if not any(callable(getattr(item, name, None)) for name in HOOKS):
            raise TypeError(f"middleware {item!r} has none of the hooks {', '.join(HOOKS)}")
    return found


def combined(own: Sequence[Middleware]) -> list[Middleware]:
    """The process's global middleware, then ``own``."""
    return [*GLOBAL, *own] if GLOBAL else list(own)


def _call(item: Middleware, name: str, *args: Any) -> None:
    hook = getattr(item, name, None)
    if hook is None:
        return
    try:
        hook(*args)
    except Exception:
        log.exception("middleware %r: %s raised; ignored", item, name)


def before_enqueue(middleware: Sequence[Middleware], fields: dict[str, Any]) -> None:
    """Runs the ``before_enqueue`` hooks on ``fields`` (labels kept a dict)."""
    for item in middleware:
        _call(item, "before_enqueue", fields)


def _failed(middleware: Sequence[Middleware], task: Task, error: BaseException) -> None:
    """``on_retry`` or ``on_dead``, as the engine's policy will decide."""
    if isinstance(error, Reject):
        for item in middleware:
            _call(item, "on_dead", task, "rejected", error)
        return
    if task.attempt < task.max_retry:
        delay = error.delay if isinstance(error, Retry) else None
        for item in middleware:
            _call(item, "on_retry", task, error, delay)
        return
    reason = (
        "timeout" if isinstance(error, (asyncio.TimeoutError, asyncio.CancelledError)) else "error"
    )
    for item in middleware:
        _call(item, "on_dead", task, reason, error)


def _before(middleware: Sequence[Middleware], task: Task) -> None:
    for item in middleware:
        _call(item, "before_run", task)


def _after(
    middleware: Sequence[Middleware], task: Task, value: Any, error: Optional[BaseException]
) -> None:
    for item in middleware:
        _call(item, "after_run", task, value, error)
    if error is not None:
        _failed(middleware, task, error)


def _wrap(handler: Handler, middleware: Sequence[Middleware]) -> Handler:
    if inspect.iscoroutinefunction(handler):

        async def run_async(task: Task) -> Any:
            _before(middleware, task)
            try:
                value = await handler(task)
            except BaseException as error:
                _after(middleware, task, None, error)
                raise
            _after(middleware, task, value, None)
            return value

        return run_async

    def run(task: Task) -> Any:
        _before(middleware, task)
        try:
            value = handler(task)
        except Exception as error:
            _after(middleware, task, None, error)
            raise
        _after(middleware, task, value, None)
        return value

    return run


def wrap_handlers(
    handlers: Mapping[str, Handler], middleware: Sequence[Middleware]
) -> dict[str, Handler]:
    """The handlers with the run hooks around them (unchanged without any)."""
    if not middleware:
        return dict(handlers)
    return {name: _wrap(handler, middleware) for name, handler in handlers.items()}
