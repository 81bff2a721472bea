"""The actor process: take a batch from the ring, run each task's handler,
report the outcomes back. Task data arrives as bytes and JSON text, never
pickled; the payload is decoded with orjson right before the call.

Sync handlers run one after another. Async handlers (``async def``) of a
batch run concurrently on the actor's event loop, at most ``concurrency`` at
once, each cancelled at its ``timeout``; the actor is still killed if the
whole group overruns (a coroutine that blocks the loop).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import signal
import traceback
from collections.abc import Awaitable, Mapping, Sequence
from time import perf_counter
from typing import Any, Callable, Optional

import orjson

from . import _core
from .logs import task_extra
from .task import Reject, Retry, Task

__all__ = ["actor_main"]

log = logging.getLogger("flumeq.actor")

# Failure kinds of the result frame (see rust/src/frame.rs).
ERROR = 1
UNKNOWN_TYPE = 2
REJECT = 3
RETRY = 4
INVALID = 5
NOT_STARTED = 6

#: Results of a long batch are reported at least this often (seconds), so a
#: slow batch does not hold back the acks of its finished tasks.
FLUSH_EVERY = 0.05
#: Extra time an async group gets past its longest timeout before the
#: dispatcher kills the actor (per-task timeouts cancel coroutines first).
ASYNC_GRACE = 1.0

Handler = Callable[[Task], Any]
Failure = tuple[int, int, int, str, str]


def _labels(raw: Optional[bytes]) -> dict[str, str]:
    if raw is None:
        return {}
    labels = orjson.loads(raw)
    if not isinstance(labels, dict):
        raise ValueError("labels are not a JSON object")
    return labels


def _failure(index: int, task: Task, error: BaseException) -> Failure:
    """The result record of a run that raised ``error``."""
    if isinstance(error, Retry):
        delay_ms = 0 if error.delay is None else max(0, round(error.delay * 1000))
        return (index, RETRY, delay_ms, f"Retry: {error.reason}", "")
    if isinstance(error, Reject):
        return (index, REJECT, 0, f"Reject: {error.reason}", "")
    log.warning(
        "task %s (%s) failed: %s: %s",
        task.id,
        task.type,
        type(error).__name__,
        error,
        extra=task_extra(task),
    )
    trace = "".join(traceback.format_exception(type(error), error, error.__traceback__))
    return (index, ERROR, 0, f"{type(error).__name__}: {error}", trace)


class _AsyncRunner:
    """Runs the async tasks of a batch on this actor's event loop."""

    def __init__(self, end: _core.ActorEnd, concurrency: int) -> None:
        self.loop = asyncio.new_event_loop()
        self.concurrency = max(1, concurrency)
        self.end = end

    def run(self, group: list[tuple[int, Callable[[Task], Awaitable[Any]], Task]]) -> list[Failure]:
        return self.loop.run_until_complete(self._run(group))

    async def _run(
        self, group: list[tuple[int, Callable[[Task], Awaitable[Any]], Task]]
    ) -> list[Failure]:
        limit = asyncio.Semaphore(self.concurrency)

        async def one(
            index: int, handler: Callable[[Task], Awaitable[Any]], task: Task
        ) -> Optional[Failure]:
            async with limit:
                started = perf_counter()
                try:
                    if task.timeout > 0:
                        await asyncio.wait_for(handler(task), task.timeout)
                    else:
                        await handler(task)
                except asyncio.TimeoutError:
                    message = f"timeout: the handler ran longer than {task.timeout:g}s"
                    return (index, ERROR, 0, message, "")
                except Exception as error:
                    return _failure(index, task, error)
                finally:
                    self.end.observe(index, perf_counter() - started)
                return None

        outcomes = await asyncio.gather(*(one(*item) for item in group))
        return [outcome for outcome in outcomes if outcome is not None]


def run_batch(
    end: _core.ActorEnd,
    handlers: Mapping[str, Handler],
    batch_id: int,
    tasks: Sequence[tuple[Any, ...]],
    runner: Optional[_AsyncRunner] = None,
    is_async: Optional[Mapping[str, bool]] = None,
) -> None:
    """Runs one batch and reports every task's outcome."""
    loads = orjson.loads
    failures: list[Failure] = []
    group: list[tuple[int, Any, Task]] = []
    start = 0
    last_flush = perf_counter()
    stopping = False
    for index, (
        task_id,
        type_,
        queue,
        payload,
        attempt,
        max_retry,
        enqueued_at,
        timeout,
        labels,
    ) in enumerate(tasks):
        handler = handlers.get(type_)
        if handler is None:
            failures.append(
                (index, UNKNOWN_TYPE, 0, f"no handler registered for task type {type_!r}", "")
            )
            continue
        try:
            task = Task(
                task_id,
                type_,
                queue,
                loads(payload),
                attempt,
                max_retry,
                enqueued_at,
                timeout,
                _labels(labels),
            )
        except (orjson.JSONDecodeError, ValueError) as error:
            field = "payload" if isinstance(error, orjson.JSONDecodeError) else "labels"
            failures.append((index, INVALID, 0, f"task {task_id}: field '{field}': {error}", ""))
            continue
        if is_async is not None and is_async.get(type_):
            group.append((index, handler, task))
            continue
        if not end.begin(batch_id, index, timeout):
            # The engine is stopping: hand this task and the rest back unrun.
            failures.extend((rest, NOT_STARTED, 0, "", "") for rest in range(index, len(tasks)))
            stopping = True
            break
        try:
            handler(task)
        except Exception as error:
            failures.append(_failure(index, task, error))
        now = perf_counter()
        if not group and now - last_flush >= FLUSH_EVERY:
            # Ranges must be whole: no flush while async tasks wait behind.
            end.finish(batch_id, start, index + 1 - start, failures)
            start, failures, last_flush = index + 1, [], now
    if group:
        failures.extend(_run_group(end, batch_id, group, runner, stopping))
        failures.sort()
    if start < len(tasks) or not tasks:
        end.finish(batch_id, start, len(tasks) - start, failures)


def _run_group(
    end: _core.ActorEnd,
    batch_id: int,
    group: list[tuple[int, Any, Task]],
    runner: Optional[_AsyncRunner],
    stopping: bool,
) -> list[Failure]:
    """Runs a batch's async tasks together, or hands them back if stopping."""
    if stopping or runner is None:
        return [(index, NOT_STARTED, 0, "", "") for index, _, _ in group]
    timeouts = [task.timeout for _, _, task in group]
    # The group's hard limit: its longest timeout plus a grace; no limit if any has none.
    limit = 0.0 if min(timeouts) <= 0 else max(timeouts) + ASYNC_GRACE
    if not end.begin(batch_id, group[0][0], limit, timed=False):
        return [(index, NOT_STARTED, 0, "", "") for index, _, _ in group]
    return runner.run(group)


def actor_main(
    region: _core.Region,
    slot: int,
    handlers: Mapping[str, Handler],
    queues: Sequence[str],
    concurrency: int = 100,
) -> None:
    """Entry point of an actor process (forked by the engine's supervisor)."""
    # Ctrl-C reaches the whole process group; only the supervisor decides.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    _core.die_with_parent()
    is_async = {name: inspect.iscoroutinefunction(handler) for name, handler in handlers.items()}
    end = region.actor(slot, list(queues))
    runner = _AsyncRunner(end, concurrency) if any(is_async.values()) else None
    end.started()
    while True:
        batch = end.recv()
        if batch is None:
            return
        batch_id, tasks = batch
        run_batch(end, handlers, batch_id, tasks, runner, is_async if runner else None)
