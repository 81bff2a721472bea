"""The actor process: take a batch from the ring, run each task's handler,
report the outcomes back. Task data arrives as bytes and JSON text, never
pickled; the payload is decoded with orjson right before the call."""

from __future__ import annotations

import logging
import signal
import traceback
from collections.abc import Mapping, Sequence
from time import monotonic
from typing import Any, Callable, Optional

import orjson

from . import _core
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

Handler = Callable[[Task], Any]
Failure = tuple[int, int, int, str, str]


def _labels(raw: Optional[bytes]) -> dict[str, str]:
    if raw is None:
        return {}
    labels = orjson.loads(raw)
    if not isinstance(labels, dict):
        raise ValueError("labels are not a JSON object")
    return labels


def run_batch(
    end: _core.ActorEnd,
    handlers: Mapping[str, Handler],
    batch_id: int,
    tasks: Sequence[tuple[Any, ...]],
) -> None:
    """Runs one batch and reports every task's outcome."""
    loads = orjson.loads
    failures: list[Failure] = []
    start = 0
    last_flush = monotonic()
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
        if not end.begin(batch_id, index, timeout):
            # The engine is stopping: hand this task and the rest back unrun.
            failures.extend((rest, NOT_STARTED, 0, "", "") for rest in range(index, len(tasks)))
            break
        try:
            handler(task)
        except Retry as retry:
            delay_ms = 0 if retry.delay is None else max(0, round(retry.delay * 1000))
            failures.append((index, RETRY, delay_ms, f"Retry: {retry.reason}", ""))
        except Reject as reject:
            failures.append((index, REJECT, 0, f"Reject: {reject.reason}", ""))
        except Exception as error:
            log.warning("task %s (%s) failed: %s: %s", task_id, type_, type(error).__name__, error)
            failures.append(
                (index, ERROR, 0, f"{type(error).__name__}: {error}", traceback.format_exc())
            )
        now = monotonic()
        if now - last_flush >= FLUSH_EVERY:
            end.finish(batch_id, start, index + 1 - start, failures)
            start, failures, last_flush = index + 1, [], now
    if start < len(tasks) or not tasks:
        end.finish(batch_id, start, len(tasks) - start, failures)


def actor_main(
    region: _core.Region, slot: int, handlers: Mapping[str, Handler], queues: Sequence[str]
) -> None:
    """Entry point of an actor process (forked by the engine's supervisor)."""
    # Ctrl-C reaches the whole process group; only the supervisor decides.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    _core.die_with_parent()
    end = region.actor(slot, list(queues))
    end.started()
    while True:
        batch = end.recv()
        if batch is None:
            return
        batch_id, tasks = batch
        run_batch(end, handlers, batch_id, tasks)
