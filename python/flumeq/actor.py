"""The actor process: take a batch from the ring, run each task's handler,
report the outcomes back. Task data arrives as bytes and JSON text, never
pickled; the payload is decoded with orjson right before the call.

Sync handlers run one after another; their outcomes go back at least every
``FLUSH_EVERY`` seconds, plain successes as ranges (no record each). Async
handlers (``async def``) run concurrently on the actor's event loop, at most
``concurrency`` at once over every batch (an actor with async handlers takes
the next batch while the async tasks of earlier ones still run), each with its own ``timeout``
counted from its own start. Each async task tells the core when it starts
(so that, should a coroutine block the loop past a timeout, the dispatcher
kills the actor and blames only the tasks that were running) and when it
ends (its outcome goes back at once; the dispatcher is woken at most
``ASYNC_WAKE`` seconds later).

Actors ignore SIGINT and SIGTERM: a signal to the whole process group
(systemd, a terminal's Ctrl-C) is for the supervisor to act on; it stops
them gracefully.

Cancels (``Client.cancel``) arrive in the slot's cancel box, with a SIGUSR1:
a task not started yet is skipped (reported ``CANCELLED``), a running sync
handler gets ``flumeq.Cancelled`` raised in it (from the signal handler,
only while the handler itself runs), a running async one has its asyncio
task cancelled. The dispatcher kills the actor should the task still run
``cancel_grace`` later.
"""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import logging
import signal
import traceback
from collections import deque
from collections.abc import Awaitable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from time import perf_counter
from typing import Any, Callable, Optional

import orjson

from . import _core
from ._eventloop import new_event_loop
from .logs import task_extra
from .task import Cancelled, Reject, Retry, Task, _current, _sync

__all__ = ["actor_main"]

log = logging.getLogger("flumeq.actor")

_Outcome = _core.Outcome
SUCCEEDED = int(_Outcome.SUCCEEDED)
FAILED = int(_Outcome.FAILED)
RETRY = int(_Outcome.RETRY)
REJECTED = int(_Outcome.REJECTED)
UNKNOWN_TYPE = int(_Outcome.UNKNOWN_TYPE)
INVALID = int(_Outcome.INVALID)
NOT_STARTED = int(_Outcome.NOT_STARTED)
TIMED_OUT = int(_Outcome.TIMED_OUT)
BAD_RESULT = int(_Outcome.BAD_RESULT)
CANCELLED = int(_Outcome.CANCELLED)
MAX_RESULT_BYTES: int = _core.MAX_RESULT_BYTES

#: Outcomes of a long sync batch are reported at least this often (seconds):
#: a task that finished is acked within about this long, so an engine killed
#: mid-batch runs few tasks twice.
FLUSH_EVERY = 0.01
#: A sync task that ran at least this long (seconds) has its outcome written
#: to the ring at once (the dispatcher is woken at the next flush): should
#: the actor die after it, it is not run again. Cheap next to such a task.
REPORT_SLOW = 0.0005
#: Longest delay between an async task's end and the dispatcher's wake-up:
#: tasks ending close together share one.
ASYNC_WAKE = 0.005

Handler = Callable[[Task], Any]
#: ``asyncio.timeout`` (CPython 3.11+): a deadline on the running task.
_deadline: Optional[Callable[[float], Any]] = getattr(asyncio, "timeout", None)
#: ``(index, outcome, delay_ms, message, traceback, value)``: ``value`` is
#: the return value as JSON, for a task that keeps its result.
Record = tuple[int, int, int, str, str, bytes]


def _labels(raw: Optional[bytes]) -> dict[str, str]:
    if raw is None:
        return {}
    labels = orjson.loads(raw)
    if not isinstance(labels, dict):
        raise ValueError("labels are not a JSON object")
    return labels


#: How a run's return value goes back (the task record's last field).
KEEPS_RESULT = 1
RECORDS_RESULT = 2


def _kept(index: int, task: Task, value: Any, mode: int = KEEPS_RESULT) -> Record:
    """The record of a run that returned ``value``: the value as JSON. When
    it cannot be sent, a task that keeps its result (``KEEPS_RESULT``) ends
    as ``BAD_RESULT`` naming why; one whose value is only recorded in the
    history (``RECORDS_RESULT``) succeeds with a JSON note of why instead."""
    try:
        body = orjson.dumps(value)
    except TypeError as error:
        problem = f"is not JSON-serialisable ({error})"
    else:
        if len(body) <= MAX_RESULT_BYTES:
            return (index, SUCCEEDED, 0, "", "", body)
        problem = f"is {len(body)} bytes of JSON, more than MAX_RESULT_BYTES ({MAX_RESULT_BYTES})"
    message = (
        f"task {task.id} ({task.type}): its return value of type {type(value).__name__} {problem}"
    )
    if mode == RECORDS_RESULT:
        return (index, SUCCEEDED, 0, "", "", orjson.dumps(f"<not recorded: {message}>"))
    log.error("%s; the task goes to the dead letters", message, extra=task_extra(task))
    return (index, BAD_RESULT, 0, message, "", b"")


def _failure(index: int, task: Task, error: BaseException) -> Record:
    """The record of a run that raised ``error``."""
    if isinstance(error, Retry):
        delay_ms = 0 if error.delay is None else max(0, round(error.delay * 1000))
        return (index, RETRY, delay_ms, f"Retry: {error.reason}", "", b"")
    if isinstance(error, Reject):
        return (index, REJECTED, 0, f"Reject: {error.reason}", "", b"")
    log.warning(
        "task %s (%s) failed: %s: %s",
        task.id,
        task.type,
        type(error).__name__,
        error,
        extra=task_extra(task),
    )
    trace = "".join(traceback.format_exception(type(error), error, error.__traceback__))
    return (index, FAILED, 0, f"{type(error).__name__}: {error}", trace, b"")


def _cancelled(index: int, running: bool) -> Record:
    message = "cancelled while running" if running else "cancelled before it started"
    return (index, CANCELLED, 0, message, "", b"")


class _Cancels:
    """The cancels the dispatcher posted to this actor: ``pending`` holds
    the ``(batch, index)`` of tasks to skip or stop."""

    __slots__ = ("end", "pending", "runner")

    def __init__(self) -> None:
        self.end: Optional[_core.ActorEnd] = None
        self.pending: set[tuple[int, int]] = set()
        self.runner: Optional[_AsyncRunner] = None

    def take(self) -> None:
        """Takes what is in the box (one load when it is empty)."""
        if self.end is None:
            return
        posted = self.end.take_cancels()
        if posted:
            self.pending.update(posted)
            runner = self.runner
            if runner is not None:
                runner.loop.call_soon_threadsafe(runner.cancel_running)

    def on_signal(self, _signum: int, _frame: Any) -> None:
        """SIGUSR1: the dispatcher posted cancels. Raises ``Cancelled`` in
        the sync handler running now if it is one of them (``_sync.task`` is
        set only while ``run_batch`` is inside a handler's ``try``)."""
        self.take()
        task = _sync.task
        if task is not None and self.end is not None:
            running = self.end.running()
            if running is not None and running in self.pending:
                self.pending.discard(running)
                raise Cancelled(task.id)


#: The actor's cancels (bound to its ring end by ``actor_main``; never
#: any elsewhere, as in tests that call ``run_batch`` directly).
_cancels = _Cancels()


#: ``(index, handler, task, result mode)`` (``KEEPS_RESULT``, ``RECORDS_RESULT`` or 0).
AsyncItem = tuple[int, Callable[[Task], Awaitable[Any]], Task, bool]


class _Batch:
    """The async tasks of one batch not yet ended."""

    __slots__ = ("id", "left")

    def __init__(self, batch_id: int, left: int) -> None:
        self.id = batch_id
        self.left = left


class _AsyncRunner:
    """Runs the async tasks of the batches on this actor's event loop.

    Tasks wait in a queue and get an asyncio task of their own only when one
    of the ``concurrency`` places frees (no semaphore, no waiting asyncio
    task per prefetched task). Each runs in a fresh copy of the actor's
    context, so a context variable a handler sets never leaks into the
    next task.
    """

    def __init__(self, end: _core.ActorEnd, concurrency: int) -> None:
        self.loop = new_event_loop()
        self.concurrency = max(1, concurrency)
        self.end = end
        self._wake_due = False
        self._waiting: deque[tuple[_Batch, AsyncItem]] = deque()
        self._active = 0
        self._idle: Optional[asyncio.Future[None]] = None
        self._context = contextvars.copy_context()
        #: Running async tasks by ``(batch, index)``, and those we cancelled.
        self._running: dict[tuple[int, int], asyncio.Task[None]] = {}
        self._cancelled: set[tuple[int, int]] = set()

    def cancel_running(self) -> None:
        """Loop thread: cancels the running tasks the dispatcher cancelled
        (the others are skipped when their turn comes)."""
        pending = _cancels.pending
        for key in [key for key in pending if key in self._running]:
            pending.discard(key)
            self._cancelled.add(key)
            self._running[key].cancel()

    def run(self, batch_id: int, group: list[AsyncItem]) -> None:
        """Runs one batch's async tasks to their end (outside ``serve``)."""
        self.start(batch_id, group)
        self.loop.run_until_complete(self._drained())

    def start(self, batch_id: int, group: list[AsyncItem]) -> None:
        """Queues a batch's async tasks and starts as many as places are
        free; they share the actor's ``concurrency`` with earlier batches'."""
        batch = _Batch(batch_id, len(group))
        self._waiting.extend((batch, item) for item in group)
        self._fill()

    def _fill(self) -> None:
        waiting = self._waiting
        enter = self._context.run
        create = self.loop.create_task
        running = self._running
        while waiting and self._active < self.concurrency:
            batch, item = waiting.popleft()
            self._active += 1
            # create_task copies the current context: here the actor's own.
            running[(batch.id, item[0])] = enter(create, self._one(batch, *item))

    async def _drained(self) -> None:
        """Returns once every queued and running async task has ended."""
        if self._active or self._waiting:
            self._idle = self.loop.create_future()
            await self._idle

    def serve(self, handlers: Mapping[str, Handler], is_async: Mapping[str, bool]) -> None:
        """The actor's life with async handlers: batches are taken while
        earlier ones' async tasks still run, so one slow task never holds
        back the next batch. A thread waits for batches (GIL released);
        they are taken and run on the loop."""
        self.loop.run_until_complete(self._serve(handlers, is_async))

    async def _serve(self, handlers: Mapping[str, Handler], is_async: Mapping[str, bool]) -> None:
        end = self.end
        waiter = ThreadPoolExecutor(1, thread_name_prefix="flumeq-actor-wait")
        try:
            while True:
                batch = end.try_recv()
                if batch is None:
                    ready = await self.loop.run_in_executor(waiter, end.wait, 1.0)
                    if ready is None:
                        break
                    continue
                batch_id, tasks = batch
                run_batch(end, handlers, batch_id, tasks, self, is_async)
                # Let the tasks just started begin before the next batch.
                await asyncio.sleep(0)
            await self._drained()
        finally:
            waiter.shutdown(wait=False)

    def _wake(self) -> None:
        self._wake_due = False
        self.end.wake()

    async def _one(
        self,
        batch: _Batch,
        index: int,
        handler: Callable[[Task], Awaitable[Any]],
        task: Task,
        keeps: int,
    ) -> None:
        end = self.end
        seconds = 0.0
        record: Optional[Record] = None
        paused = end.paused()
        key = (batch.id, index)
        pending = _cancels.pending
        if pending and key in pending:
            pending.discard(key)
            record = _cancelled(index, False)
        elif (paused is not None and task.queue in paused) or not end.start_async(
            batch.id, index, task.timeout
        ):
            record = (index, NOT_STARTED, 0, "", "", b"")
        else:
            _current.set(task)
            started = perf_counter()
            try:
                if task.timeout > 0 and _deadline is not None:
                    # No extra task per run, unlike wait_for.
                    async with _deadline(task.timeout):
                        value = await handler(task)
                elif task.timeout > 0:
                    value = await asyncio.wait_for(handler(task), task.timeout)
                else:
                    value = await handler(task)
                if keeps and (keeps == KEEPS_RESULT or value is not None):
                    # A None only recorded (history) needs no record.
                    record = _kept(index, task, value, keeps)
            except asyncio.TimeoutError:
                message = f"timeout: the handler ran longer than {task.timeout:g}s"
                record = (index, TIMED_OUT, 0, message, "", b"")
            except asyncio.CancelledError as error:
                if key in self._cancelled:
                    self._cancelled.discard(key)
                    record = _cancelled(index, True)
                else:
                    record = _failure(index, task, error)
            except Exception as error:
                record = _failure(index, task, error)
            seconds = perf_counter() - started
        self._running.pop(key, None)
        batch.left -= 1
        last = batch.left == 0
        _, outcome, delay_ms, message, trace, body = record or (
            index,
            SUCCEEDED,
            0,
            "",
            "",
            b"",
        )
        end.done_async(batch.id, index, outcome, delay_ms, message, trace, seconds, last, body)
        self._active -= 1
        self._fill()
        if last:
            end.wake()
        elif not self._wake_due:
            self._wake_due = True
            self.loop.call_later(ASYNC_WAKE, self._wake)
        idle = self._idle
        if idle is not None and not self._active and not self._waiting:
            self._idle = None
            if not idle.done():
                idle.set_result(None)


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
    running = _sync
    records: list[Record] = []
    group: list[AsyncItem] = []
    # Plain successes go back as the range start..: until an async task is
    # set aside for later, after which ranges would cover it, so successes
    # get records of their own.
    start = 0
    ranged = True
    last_flush = last = perf_counter()
    unwoken = False  # a report went out without waking the dispatcher
    stopped_at: Optional[int] = None
    # Queues paused meanwhile: their tasks go back unrun (checked again at
    # each flush of a long batch).
    paused = end.paused()
    # Tasks cancelled meanwhile: skipped (the box is looked at per batch;
    # the signal adds what comes later).
    _cancels.take()
    pending = _cancels.pending
    if pending and runner is None:
        # A sync actor runs batches in order: older ones are over.
        pending.difference_update([key for key in pending if key[0] < batch_id])
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
        keeps,
    ) in enumerate(tasks):
        if paused is not None and queue in paused:
            records.append((index, NOT_STARTED, 0, "", "", b""))
            continue
        if pending and (batch_id, index) in pending:
            pending.discard((batch_id, index))
            records.append(_cancelled(index, False))
            continue
        handler = handlers.get(type_)
        if handler is None:
            records.append(
                (index, UNKNOWN_TYPE, 0, f"no handler registered for task type {type_!r}", "", b"")
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
            message = f"task {task_id}: field '{field}': {error}"
            records.append((index, INVALID, 0, message, "", b""))
            continue
        if is_async is not None and is_async.get(type_):
            if ranged:
                if index > start:
                    end.finish(batch_id, start, index - start, records)
                    records = []
                ranged = False
            group.append((index, handler, task, keeps))
            continue
        if not end.begin(batch_id, index, timeout):
            # The engine is stopping: hand this task and the rest back unrun.
            stopped_at = index
            break
        try:
            # Set and cleared inside the try: a cancel's signal raises
            # only while it is set, so always into this try.
            running.task = task
            value = handler(task)
            running.task = None
            if keeps and (keeps == KEEPS_RESULT or value is not None):
                # A None only recorded (history) is a plain success.
                records.append(_kept(index, task, value, keeps))
            elif not ranged:
                records.append((index, SUCCEEDED, 0, "", "", b""))
        except Cancelled:
            running.task = None
            records.append(_cancelled(index, True))
        except Exception as error:
            running.task = None
            records.append(_failure(index, task, error))
        now = perf_counter()
        wake = now - last_flush >= FLUSH_EVERY
        if wake or now - last >= REPORT_SLOW:
            if ranged:
                end.finish(batch_id, start, index + 1 - start, records, wake, False)
                start = index + 1
            else:
                end.finish(batch_id, 0, 0, records, wake, False)
            records = []
            unwoken = not wake
            if wake:
                last_flush = now
                paused = end.paused()
        last = now
    running.task = None
    if stopped_at is not None:
        records.extend(
            (rest, NOT_STARTED, 0, "", "", b"") for rest in range(stopped_at, len(tasks))
        )
        done = stopped_at
    else:
        done = len(tasks)
    # The sync part ends before the async group runs (its last task must not
    # look running meanwhile), and the dispatcher hears of it now.
    # The batch's last report always goes out, even when its tasks were all
    # reported already (a slow last task): it carries the run times, which
    # would otherwise wait for the next batch, or be lost at a stop.
    last_report = not group
    if ranged:
        if done > start or records or not tasks or last_report:
            end.finish(batch_id, start, done - start, records, True, last_report)
        elif unwoken:
            end.wake()
    elif records or group or last_report:
        end.finish(batch_id, 0, 0, records, True, last_report)
    elif unwoken:
        end.wake()
    if group:
        if stopped_at is not None or runner is None:
            unrun = [(item[0], NOT_STARTED, 0, "", "", b"") for item in group]
            end.finish(batch_id, 0, 0, unrun)
        elif runner.loop.is_running():
            runner.start(batch_id, group)
        else:
            runner.run(batch_id, group)


def actor_main(
    region: _core.Region,
    slot: int,
    handlers: Mapping[str, Handler],
    queues: Sequence[str],
    concurrency: int = _core.DEFAULT_CONCURRENCY,
) -> None:
    """Entry point of an actor process (forked by the engine's supervisor)."""
    # A signal to the whole process group is the supervisor's to act on.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _core.die_with_parent()
    is_async = {name: inspect.iscoroutinefunction(handler) for name, handler in handlers.items()}
    end = region.actor(slot, list(queues))
    runner = _AsyncRunner(end, concurrency) if any(is_async.values()) else None
    _cancels.end = end
    _cancels.runner = runner
    # Before the slot says it runs: the dispatcher signals only then.
    signal.signal(signal.SIGUSR1, _cancels.on_signal)
    end.started(runner.concurrency if runner else 1)
    if runner is not None:
        runner.serve(handlers, is_async)
        return
    while True:
        batch = end.recv()
        if batch is None:
            return
        batch_id, tasks = batch
        run_batch(end, handlers, batch_id, tasks)
