"""``Client``: enqueue tasks and inspect queues."""

from __future__ import annotations

import atexit
import contextlib
import logging
import math
import os
import socket
import threading
import time
import weakref
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime, timedelta
from types import TracebackType
from typing import Any, NamedTuple, Optional, Union

import orjson

from . import _core, hooks, reads
from .errors import BufferFull, ConfigError, FlumeqError, InvalidTask, RedisUnavailable
from .history import rows as history_rows
from .results import QueueWaiters, check_wait
from .task import TaskInfo

__all__ = ["DEFAULT_MAX_RETRY", "DEFAULT_URL", "MAX_RESULT_BYTES", "Client", "resolve_url"]

DEFAULT_URL = "redis://127.0.0.1:6379/0"
#: Retries after the first run when ``max_retry`` is not given (as asynq and Sidekiq).
DEFAULT_MAX_RETRY = 25
#: Seconds a handler may run when ``timeout`` is not given.
DEFAULT_TIMEOUT = 30.0
DEFAULT_TIMEOUT_MS = 30_000
#: Seconds a ``unique_key`` is held when ``unique_ttl`` is not given.
DEFAULT_UNIQUE_TTL = 3600.0
DEFAULT_UNIQUE_TTL_MS = 3_600_000
#: What ``Client.stats`` reports (``flumeq.Admin.overview`` has more).
STATS = ("ready", "in_flight", "delayed", "dead", "processed", "failed", "cancelled")
#: Longest task type and task id accepted (bytes), as the core bounds them.
MAX_TYPE_BYTES: int = _core.MAX_TYPE_BYTES
MAX_ID_BYTES: int = _core.MAX_ID_BYTES
#: Longest error text, and traceback, kept of a failed run (bytes): texts
#: keep their start, tracebacks their end.
MAX_TEXT_BYTES: int = _core.MAX_TEXT_BYTES
#: Largest return value kept as a task's result (bytes of JSON); a larger
#: one sends the task to the dead letters with reason ``bad_result``.
MAX_RESULT_BYTES: int = _core.MAX_RESULT_BYTES

Seconds = Union[float, int, timedelta]
Item = tuple[str, bytes, Optional[str], bool]

log = logging.getLogger("flumeq.client")


class _Call(NamedTuple):
    """One enqueue call kept while Redis is unreachable."""

    queue: str
    items: list[Item]
    max_retry: int
    timeout_ms: int
    deadline_ms: Optional[int]
    labels: Optional[bytes]
    due_ms: int
    result_ttl_ms: int = 0
    retention_ms: int = 0


def safe_url(url: str) -> str:
    """``url`` with its password hidden, for messages and logs (also for the
    multi-host ``redis+sentinel://`` and ``redis+cluster://`` forms)."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    end = min((i for i in (rest.find(c) for c in "/?#") if i >= 0), default=len(rest))
    authority, tail = rest[:end], rest[end:]
    user, at, hosts = authority.rpartition("@")
    if not at or ":" not in user:
        return url
    name = user.split(":", 1)[0]
    return f"{scheme}://{name}:***@{hosts}{tail}"


def resolve_url(url: Optional[str]) -> str:
    """The Redis URL: the argument, else ``$FLUMEQ_URL``, else the local default."""
    return url or os.environ.get("FLUMEQ_URL") or DEFAULT_URL


def _seconds(name: str, value: Seconds, type_: str) -> float:
    if isinstance(value, timedelta):
        value = value.total_seconds()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidTask(f"task {type_!r}: {name} must be seconds or a timedelta, got {value!r}")
    if value < 0 or math.isnan(value):
        raise InvalidTask(f"task {type_!r}: {name} must not be negative, got {value!r}")
    return float(value)


def _epoch_ms(name: str, value: datetime, type_: str) -> int:
    if not isinstance(value, datetime):
        raise InvalidTask(f"task {type_!r}: {name} must be a datetime, got {value!r}")
    return int(value.timestamp() * 1000)


def _check_type(type_: Any) -> str:
    if not isinstance(type_, str) or not type_:
        raise InvalidTask(f"task type must be a non-empty string, got {type_!r}")
    if len(type_) * 4 > MAX_TYPE_BYTES and len(type_.encode()) > MAX_TYPE_BYTES:
        raise InvalidTask(f"task type {type_[:40]!r}... is longer than {MAX_TYPE_BYTES} bytes")
    return type_


def _check_id(type_: str, task_id: Any, where: str = "") -> None:
    """Checks a caller's task id (``where`` names the item of a batch)."""
    if not isinstance(task_id, str) or not task_id:
        raise InvalidTask(
            f"{where}task {type_!r}: task_id must be a non-empty string, got {task_id!r}"
        )
    if len(task_id) * 4 > MAX_ID_BYTES and len(task_id.encode()) > MAX_ID_BYTES:
        raise InvalidTask(
            f"{where}task {type_!r}: task_id {task_id[:40]!r}... is longer than "
            f"{MAX_ID_BYTES} bytes"
        )


def _payload(type_: str, payload: Any) -> bytes:
    try:
        return orjson.dumps(payload)
    except TypeError as error:
        raise InvalidTask(f"task {type_!r}: payload is not JSON-serialisable: {error}") from None


def _labels(type_: str, labels: Optional[Mapping[str, str]]) -> Optional[bytes]:
    if labels is None:
        return None
    if not isinstance(labels, Mapping) or not all(
        isinstance(key, str) and isinstance(value, str) for key, value in labels.items()
    ):
        raise InvalidTask(f"task {type_!r}: labels must be a mapping of str to str, got {labels!r}")
    return orjson.dumps(dict(labels))


def _retries(type_: str, max_retry: Any) -> int:
    if isinstance(max_retry, bool) or not isinstance(max_retry, int) or max_retry < 0:
        raise InvalidTask(f"task {type_!r}: max_retry must be an integer >= 0, got {max_retry!r}")
    return int(max_retry)


def _result_ttl(type_: str, result_ttl: Optional[Seconds]) -> int:
    """``result_ttl`` in ms (0: the outcome is not kept)."""
    if result_ttl is None:
        return 0
    return max(0, round(_seconds("result_ttl", result_ttl, type_) * 1000))


def _retention(type_: str, retention: Optional[Seconds]) -> int:
    """``retention`` in ms (0: no summary is kept)."""
    if retention is None:
        return 0
    return max(0, round(_seconds("retention", retention, type_) * 1000))


def _queue(queue: Any) -> str:
    if not isinstance(queue, str) or not queue:
        raise InvalidTask(f"queue must be a non-empty string, got {queue!r}")
    return queue


def checked_queue(queue: Any) -> str:
    """``queue`` if it can name a queue (``ConfigError`` saying why not):
    what pause, the admin tools, engines and cron entries accept."""
    if not isinstance(queue, str):
        raise ConfigError(f"queue names must be strings, got {queue!r}")
    problem = _core.queue_problem(queue)
    if problem:
        raise ConfigError(problem)
    return queue


def run_before_enqueue(
    middleware: Sequence[Any],
    type: str,
    payload: Any,
    queue: str,
    task_id: Optional[str],
    labels: Optional[Mapping[str, str]],
) -> tuple[Any, Optional[Mapping[str, str]]]:
    """The ``before_enqueue`` hooks on one task; its payload and labels after."""
    fields = {
        "type": type,
        "queue": queue,
        "payload": payload,
        "task_id": task_id,
        "labels": dict(labels or {}),
    }
    hooks.before_enqueue(hooks.combined(middleware), fields)
    return fields["payload"], (fields["labels"] or labels)


def run_before_enqueue_many(
    middleware: Sequence[Any],
    items: Iterable[Sequence[Any]],
    queue: str,
    labels: Optional[Mapping[str, str]],
) -> tuple[list[Sequence[Any]], Optional[Mapping[str, str]]]:
    """The ``before_enqueue`` hooks once for a batch: its items and labels after."""
    listed = list(items)
    first = listed[0] if listed and isinstance(listed[0], (tuple, list)) else (None, None)
    fields = {
        "type": first[0],
        "queue": queue,
        "payload": first[1] if len(first) > 1 else None,
        "task_id": None,
        "labels": dict(labels or {}),
        "count": len(listed),
    }
    hooks.before_enqueue(hooks.combined(middleware), fields)
    return listed, (fields["labels"] or labels)


def prepare_one(
    type: str,
    payload: Any,
    *,
    queue: str,
    max_retry: int,
    timeout: Optional[Seconds],
    delay: Optional[Seconds],
    at: Optional[datetime],
    deadline: Optional[datetime],
    unique_key: Optional[str],
    unique_ttl: Seconds,
    task_id: Optional[str],
    labels: Optional[Mapping[str, str]],
    result_ttl: Optional[Seconds],
    unknown: Mapping[str, Any],
    middleware: Sequence[Any] = (),
    run_hooks: bool = True,
    retention: Optional[Seconds] = None,
) -> tuple[_Call, int]:
    """Runs the ``before_enqueue`` hooks (unless ``run_hooks`` is false: a
    check at configuration time), then checks one task's options
    (``InvalidTask`` naming the task and the option); returns its call and
    its unique key's lifetime in ms."""
    if run_hooks and (middleware or hooks.GLOBAL):
        payload, labels = run_before_enqueue(middleware, type, payload, queue, task_id, labels)
    if unknown:
        raise InvalidTask(
            f"task {type!r}: unknown option(s) {', '.join(sorted(unknown))}; "
            "see Client.enqueue for the accepted ones"
        )
    # The common case (a str type, default timeout and unique_ttl, int
    # max_retry) takes the short checks: this runs once per enqueue.
    if type.__class__ is not str or not type or len(type) * 4 > MAX_TYPE_BYTES:
        _check_type(type)
    type_ = type
    body = _payload(type_, payload)
    if task_id is not None:
        _check_id(type_, task_id)
    if timeout is None:
        timeout_ms = 0
    elif timeout.__class__ is float and timeout == DEFAULT_TIMEOUT:
        timeout_ms = DEFAULT_TIMEOUT_MS
    else:
        timeout_ms = round(_seconds("timeout", timeout, type_) * 1000)
    due_ms = 0
    if delay is not None or at is not None:
        if delay is not None and at is not None:
            raise InvalidTask(f"task {type_!r}: give delay or at, not both")
        if delay is not None:
            seconds = _seconds("delay", delay, type_)
            if seconds > 0:
                due_ms = int(time.time() * 1000 + seconds * 1000)
        if at is not None:
            due_ms = _epoch_ms("at", at, type_)
    deadline_ms = None if deadline is None else _epoch_ms("deadline", deadline, type_)
    if unique_key is not None and (not isinstance(unique_key, str) or not unique_key):
        raise InvalidTask(f"task {type_!r}: unique_key must be a non-empty string")
    if unique_ttl.__class__ is float and unique_ttl == DEFAULT_UNIQUE_TTL:
        ttl_ms = DEFAULT_UNIQUE_TTL_MS
    else:
        ttl_ms = round(_seconds("unique_ttl", unique_ttl, type_) * 1000)
    if queue.__class__ is not str or not queue:
        _queue(queue)
    if max_retry.__class__ is not int or max_retry < 0:
        max_retry = _retries(type_, max_retry)
    call = _Call(
        queue,
        [(type_, body, task_id, task_id is not None)],
        max_retry,
        timeout_ms,
        deadline_ms,
        None if labels is None else _labels(type_, labels),
        due_ms,
        0 if result_ttl is None else _result_ttl(type_, result_ttl),
        0 if retention is None else _retention(type_, retention),
    )
    return call, max(ttl_ms, 1)


def prepare_many(
    items: Iterable[Sequence[Any]],
    *,
    queue: str,
    max_retry: int,
    timeout: Optional[Seconds],
    labels: Optional[Mapping[str, str]],
    result_ttl: Optional[Seconds],
    middleware: Sequence[Any] = (),
    retention: Optional[Seconds] = None,
) -> Optional[_Call]:
    """Runs the ``before_enqueue`` hooks once, then checks a batch of
    ``(type, payload[, task_id])`` items and their shared options; ``None``
    for no items."""
    if middleware or hooks.GLOBAL:
        items, labels = run_before_enqueue_many(middleware, items, queue, labels)
    prepared: list[Item] = []
    dumps = orjson.dumps
    for number, item in enumerate(items):
        if not isinstance(item, (tuple, list)) or len(item) not in (2, 3):
            raise InvalidTask(
                f"item {number}: expected (type, payload) or (type, payload, task_id), got {item!r}"
            )
        type_ = item[0]
        if type_.__class__ is not str or not type_ or len(type_) * 4 > MAX_TYPE_BYTES:
            _check_type(type_)
        try:
            body = dumps(item[1])
        except TypeError as error:
            raise InvalidTask(
                f"item {number} (task {type_!r}): payload is not JSON-serialisable: {error}"
            ) from None
        task_id = item[2] if len(item) == 3 else None
        if task_id is not None:
            _check_id(type_, task_id, f"item {number}: ")
        prepared.append((type_, body, task_id, task_id is not None))
    if not prepared:
        return None
    first = prepared[0][0]
    timeout_ms = 0 if timeout is None else round(_seconds("timeout", timeout, first) * 1000)
    call = _Call(
        _queue(queue),
        prepared,
        _retries(first, max_retry),
        timeout_ms,
        None,
        _labels(first, labels),
        0,
        _result_ttl(first, result_ttl),
        _retention(first, retention),
    )
    return call


class Client:
    """Enqueues tasks and reads queue state.

    ``url`` defaults to ``$FLUMEQ_URL``, then ``redis://127.0.0.1:6379/0``.
    The client keeps one connection, made on first use; it starts no thread,
    so a process may enqueue and then run an ``Engine`` (which forks).

    While Redis is unreachable, ``enqueue`` and ``enqueue_many`` keep up to
    ``buffer_size`` tasks in memory (their ``TaskInfo.entry_id`` is ``None``)
    and write them, in order, before anything else on the next call that
    reaches Redis, or on ``flush()`` / ``close()``. A call that would overflow
    the buffer raises ``BufferFull`` and enqueues nothing; ``close()`` raises
    ``RedisUnavailable`` while tasks remain buffered. Tasks with a
    ``unique_key`` are never buffered (their check needs Redis).
    ``buffer_size=0`` turns buffering off.

    After ``os.fork()`` the client may be used on both sides: the first call
    in the child notices the new pid and opens the child's own connection (the
    inherited one is left to the parent, neither closed nor shared, so replies
    cannot interleave). The child starts with an empty buffer: tasks the
    parent had buffered are the parent's to write, and writing them from the
    child too would enqueue them twice.
    """

    def __init__(
        self,
        url: Optional[str] = None,
        *,
        prefix: str = "flumeq",
        timeout: float = 5.0,
        buffer_size: int = 1000,
        middleware: Iterable[Any] = (),
        history: Union[str, bool, None] = None,
    ) -> None:
        self.url = resolve_url(url)
        if history is not None and not isinstance(history, (str, bool)):
            raise InvalidTask(f"history must be a PostgreSQL DSN or True, got {history!r}")
        #: Record an ``enqueued`` event of each task for the task history
        #: (an engine with ``history`` writes it into PostgreSQL).
        self.history = bool(history)
        self._history_warned = False
        #: Producer hooks (``before_enqueue``; see ``flumeq.hooks``).
        self.middleware = hooks.checked(middleware)
        self.prefix = prefix
        if isinstance(buffer_size, bool) or not isinstance(buffer_size, int) or buffer_size < 0:
            raise InvalidTask(f"buffer_size must be an integer >= 0, got {buffer_size!r}")
        self.buffer_size = buffer_size
        self._timeout = timeout
        self._store = _core.Store(self.url, prefix, timeout)
        #: The process that owns ``_store``: another pid means we were forked.
        self._pid = os.getpid()
        self._buffer: deque[_Call] = deque()
        self._buffered = 0
        self._waiting: Optional[_core.Store] = None
        self._waiters: dict[str, QueueWaiters] = {}
        self._waiters_lock = threading.Lock()
        atexit.register(_flush_at_exit, weakref.ref(self))

    def _forked(self) -> None:
        """The first call in a forked child: its own connection and an empty
        buffer (the parent writes what it buffered). The inherited store is
        dropped, not closed: its socket is the parent's too."""
        self._store = _core.Store(self.url, self.prefix, self._timeout)
        self._buffer = deque()
        self._buffered = 0
        self._waiting = None
        self._waiters = {}
        self._waiters_lock = threading.Lock()
        self._pid = os.getpid()

    def _connection(self) -> _core.Store:
        """The store of the calling process (a fresh one after a fork)."""
        if self._pid != os.getpid():
            self._forked()
        return self._store

    @property
    def buffered(self) -> int:
        """Tasks this process holds in memory because Redis was unreachable."""
        if self._pid != os.getpid():
            self._forked()
        return self._buffered

    def flush(self) -> int:
        """Writes the buffered tasks; returns how many. Raises
        ``RedisUnavailable`` (keeping the rest) if Redis is still away."""
        if self._pid != os.getpid():
            self._forked()
        return self._flush()

    def _flush(self) -> int:
        written = 0
        while self._buffer:
            call = self._buffer[0]
            self._write(call)
            self._buffer.popleft()
            self._buffered -= len(call.items)
            written += len(call.items)
        if written:
            log.warning(
                "redis at %s is back: wrote %d buffered task(s)", safe_url(self.url), written
            )
        return written

    def _write(
        self, call: _Call, unique_key: Optional[str] = None, unique_ttl_ms: int = 1
    ) -> list[tuple[str, str]]:
        pairs = self._store.enqueue(
            call.queue,
            call.items,
            call.max_retry,
            call.timeout_ms,
            call.deadline_ms,
            call.labels,
            unique_key,
            unique_ttl_ms,
            call.due_ms,
            call.result_ttl_ms,
            retention_ms=call.retention_ms,
        )
        if self.history:
            self._record_enqueued(call, pairs)
        return pairs

    def _record_enqueued(self, call: _Call, pairs: list[tuple[str, str]]) -> None:
        """Appends the ``enqueued`` events of a written call to its queue's
        events stream. A failure is logged (once) and never fails the enqueue:
        the task's ``started`` event carries its fields too."""
        now_ms = round(time.time() * 1000)
        events = []
        for (task_id, entry_id), (type_, payload, _, _) in zip(pairs, call.items):
            if not entry_id and not call.due_ms:
                continue  # refused (a duplicate unique key)
            event = history_rows.enqueued_event(
                task_id,
                type_,
                payload,
                now_ms,
                call.max_retry,
                call.labels,
                f"{socket.gethostname()}-{os.getpid()}",
                _core.MAX_HISTORY_FIELD_BYTES,
            )
            if call.due_ms:
                event["u"] = call.due_ms
            events.append(event)
        if not events:
            return
        try:
            self._store.record_events(
                call.queue, len(events), orjson.dumps(events), _core.DEFAULT_HISTORY_BUFFER
            )
        except FlumeqError as error:
            if not self._history_warned:
                self._history_warned = True
                log.warning(
                    "history: the enqueued events of %d task(s) were not recorded: %s",
                    len(events),
                    error,
                )

    def _send(
        self, call: _Call, unique_key: Optional[str] = None, unique_ttl_ms: int = 1
    ) -> list[tuple[str, Optional[str]]]:
        if self._pid != os.getpid():
            self._forked()
        try:
            if self._buffer:
                self._flush()
            pairs = self._write(call, unique_key, unique_ttl_ms)
            return [(id_, entry_id or None) for id_, entry_id in pairs]
        except RedisUnavailable as error:
            if unique_key is not None or self.buffer_size == 0:
                raise
            return self._keep(call, error)

    def _keep(self, call: _Call, error: RedisUnavailable) -> list[tuple[str, Optional[str]]]:
        if self._buffered + len(call.items) > self.buffer_size:
            raise BufferFull(
                f"redis at {safe_url(self.url)} is unreachable ({error}) and the client buffer "
                f"holds {self._buffered} of {self.buffer_size} task(s): these {len(call.items)} "
                "task(s) were not enqueued"
            ) from error
        items: list[Item] = [
            (t, p, id_ or _core.new_task_id(), idem) for t, p, id_, idem in call.items
        ]
        if not self._buffer:
            log.warning(
                "redis at %s is unreachable (%s): buffering up to %d task(s) in memory",
                safe_url(self.url),
                error,
                self.buffer_size,
            )
        self._buffer.append(call._replace(items=items))
        self._buffered += len(items)
        return [(item[2] or "", None) for item in items]

    def enqueue(
        self,
        type: str,
        payload: Any = None,
        *,
        queue: str = "default",
        max_retry: int = DEFAULT_MAX_RETRY,
        timeout: Optional[Seconds] = DEFAULT_TIMEOUT,
        delay: Optional[Seconds] = None,
        at: Optional[datetime] = None,
        deadline: Optional[datetime] = None,
        unique_key: Optional[str] = None,
        unique_ttl: Seconds = 3600.0,
        task_id: Optional[str] = None,
        labels: Optional[Mapping[str, str]] = None,
        result_ttl: Optional[Seconds] = None,
        retention: Optional[Seconds] = None,
        **unknown: Any,
    ) -> TaskInfo[Any]:
        """Enqueues one task; returns its ``TaskInfo``.

        ``payload`` must be JSON-serialisable (by orjson). ``timeout`` is the
        hard limit of one run in seconds (``None`` = no limit). ``delay`` /
        ``at`` schedule it; past ``deadline`` it is not run. ``task_id`` sets
        the id (e.g. a business id). ``result_ttl`` keeps the task's outcome
        (return value, or final failure) that long once it ended, for
        ``result()``. ``retention`` keeps a summary of it (type, payload,
        result or error, times, engine) that long once it ended, for task
        lookups (``Admin.find_task``, the dashboard, ``flumeq task``), at most
        the engine's ``retention_max`` per queue. Raises ``InvalidTask``
        before writing anything when an option is wrong.
        """
        call, unique_ttl_ms = prepare_one(
            type,
            payload,
            queue=queue,
            max_retry=max_retry,
            timeout=timeout,
            delay=delay,
            at=at,
            deadline=deadline,
            unique_key=unique_key,
            unique_ttl=unique_ttl,
            task_id=task_id,
            labels=labels,
            result_ttl=result_ttl,
            unknown=unknown,
            middleware=self.middleware,
            retention=retention,
        )
        [(id_, entry_id)] = self._send(call, unique_key, unique_ttl_ms)
        return TaskInfo(id_, call.items[0][0], queue, entry_id, self, _kept(call))

    def enqueue_many(
        self,
        items: Iterable[Sequence[Any]],
        *,
        queue: str = "default",
        max_retry: int = DEFAULT_MAX_RETRY,
        timeout: Optional[Seconds] = DEFAULT_TIMEOUT,
        labels: Optional[Mapping[str, str]] = None,
        result_ttl: Optional[Seconds] = None,
        retention: Optional[Seconds] = None,
    ) -> list[TaskInfo[Any]]:
        """Enqueues many tasks in pipelines (one round trip per ~2000 tasks).

        ``items`` are ``(type, payload)`` or ``(type, payload, task_id)``; the
        keyword options apply to all of them. Every item is checked before
        anything is written. A given ``task_id`` makes that task idempotent:
        once it completed, deliveries of the same id within the engine's
        ``processed_ttl`` are acknowledged without running.
        """
        call = prepare_many(
            items,
            queue=queue,
            max_retry=max_retry,
            timeout=timeout,
            labels=labels,
            result_ttl=result_ttl,
            middleware=self.middleware,
            retention=retention,
        )
        if call is None:
            return []
        prepared = call.items
        pairs = self._send(call)
        kept = _kept(call)
        return [
            TaskInfo(id_, item[0], queue, entry_id, self, kept)
            for (id_, entry_id), item in zip(pairs, prepared)
        ]

    def result(
        self,
        info_or_id: Union[TaskInfo[Any], str],
        *,
        queue: str = "default",
        timeout: Optional[float] = None,
    ) -> Any:
        """Waits for a task to end; returns its handler's return value.

        ``info_or_id`` is a ``TaskInfo`` (its queue is used) or a task id in
        ``queue``. The task must have been enqueued with ``result_ttl`` (by
        any process): its outcome is kept that long, so a task that ended
        before the wait began is found too. Retries are waited out. Raises
        ``TaskFailed`` (it ended in the dead letters), ``TaskCancelled``, or
        ``ResultTimeout`` after ``timeout`` seconds (``None``: no limit).

        The wait blocks in Redis; the threads of a process waiting on one
        queue share one connection and one blocking read.
        """
        if isinstance(info_or_id, TaskInfo):
            task_id, queue = info_or_id.id, info_or_id.queue
        else:
            task_id = info_or_id
        deadline = check_wait(task_id, queue, timeout)
        return self._queue_waiters(queue).wait(task_id, deadline)

    def _queue_waiters(self, queue: str) -> QueueWaiters:
        store = self._connection()
        with self._waiters_lock:
            waiters = self._waiters.get(queue)
            if waiters is None:
                if self._waiting is None:
                    self._waiting = _core.Store(self.url, self.prefix, self._timeout)
                waiters = QueueWaiters(store, self._waiting, self.prefix, queue)
                self._waiters[queue] = waiters
            return waiters

    def dead_letters(self, queue: str = "default", limit: int = 100) -> list[dict[str, Any]]:
        """The newest dead letters of ``queue``, newest first.

        Each is a dict with the task's fields (``id``, ``type``, ``payload``
        decoded from JSON when it is valid, ``labels``...) and why it died:
        ``reason`` (error, rejected, timeout, crashed, poison, unknown_type,
        invalid, expired, too_large), ``error``, ``traceback``, ``attempts``
        (runs made), ``failed_at`` and ``enqueued_at`` (seconds since the
        epoch) and ``dead_id`` (its entry in the dead-letter stream).
        """
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise InvalidTask(f"limit must be an integer >= 1, got {limit!r}")
        letters = []
        store = self._connection()
        for dead_id, letter in reads.dead_letters(store, self.prefix, _queue(queue), limit):
            letter["dead_id"] = dead_id
            for name in ("payload", "labels"):
                if name in letter:
                    # A text that is not JSON stays as it is: it is why the task died.
                    with contextlib.suppress(orjson.JSONDecodeError):
                        letter[name] = orjson.loads(letter[name])
            letters.append(letter)
        return letters

    def requeue_dead(self, queue: str = "default", ids: Optional[Iterable[str]] = None) -> int:
        """Moves dead letters back to ``queue`` as fresh tasks (attempt 0).

        ``ids`` are task ids; ``None`` requeues them all. Returns the count moved.
        """
        if ids is None:
            return self._connection().requeue_dead(_queue(queue), None)
        wanted = [ids] if isinstance(ids, str) else list(ids)
        if not wanted:
            return 0
        return self._connection().requeue_dead(_queue(queue), wanted)

    def purge_dead(self, queue: str = "default") -> int:
        """Deletes every dead letter of ``queue``; returns how many there were."""
        return self._connection().purge_dead(_queue(queue))

    def stats(self, queue: str = "default", *, group: str = "flumeq") -> dict[str, int]:
        """Counts for ``queue``: ready, in_flight, delayed, dead, processed, failed, cancelled."""
        store = self._connection()
        (row,) = reads.queue_rows(store, self.prefix, group, [_queue(queue)], oldest=False)
        return {name: row[name] for name in STATS}

    def cancel(
        self, task_id: Union[str, TaskInfo[Any]], queue: str = "default", *, group: str = "flumeq"
    ) -> bool:
        """Cancels task ``task_id`` (or a ``TaskInfo``) of ``queue``. Returns
        ``True`` when it was found delayed, ready or held by an engine
        (running, or taken and not started), ``False`` when it is unknown or
        has ended.

        A delayed or ready task is removed at once and never runs. One an
        engine holds gets a cancel record that every engine of ``group``
        reads within about a second (also after a reconnect): if it has not
        started it never does; if it runs, a sync handler gets
        ``flumeq.Cancelled`` raised in it and an async one
        ``asyncio.CancelledError``, and its actor is killed should it still
        run ``cancel_grace`` later. Cancelled is final: no retry, no dead
        letter, counted as ``cancelled``; ``result()`` raises
        ``TaskCancelled``; its unique key is released. The record lasts a
        day (``CANCEL_TTL``): a task given the same id meanwhile is
        cancelled too, as Celery's revoke does.

        Finding a ready task reads the queue's stream in pages inside Redis
        (about half a millisecond per thousand entries).
        """
        if isinstance(task_id, TaskInfo):
            info = task_id
            task_id, queue = info.id, info.queue
        check_wait(task_id, queue, None)
        store = self._connection()
        delayed, ready, held = store.cancel(checked_queue(queue), task_id, group)
        if delayed + ready:
            self._record_cancelled(store, queue, task_id)
        return delayed + ready + held > 0

    def _record_cancelled(self, store: _core.Store, queue: str, task_id: str) -> None:
        """Records the ``cancelled`` event of a task removed before any
        engine took it (an engine records those it held), when the queue's
        history is on: its events stream exists (an engine with ``history``
        made it) or this client records history."""
        events_key = _core.key_names(self.prefix, queue)["events"]
        try:
            if not self.history and not reads.one(store, "EXISTS", events_key):
                return
            event = {
                "e": "cancelled",
                "id": task_id,
                "a": 0,
                "t": round(time.time() * 1000),
                "w": f"{socket.gethostname()}-{os.getpid()}",
            }
            store.record_events(queue, 1, orjson.dumps([event]), _core.DEFAULT_HISTORY_BUFFER)
        except FlumeqError as error:
            log.warning("history: the cancel of task %s was not recorded: %s", task_id, error)

    def pause(self, queue: str) -> bool:
        """Pauses ``queue`` on every engine: within about a second none
        starts a task of it. Running tasks finish; tasks an engine had taken
        but not started go back to the stream (behind those enqueued since).
        Enqueues and delayed moves go on. It lasts until ``resume``: a
        record in Redis, which engines started later read too. Returns
        ``False`` when the queue was paused already."""
        return bool(reads.one(self._connection(), "SADD", self._paused_key, checked_queue(queue)))

    def resume(self, queue: str) -> bool:
        """Lets engines start ``queue``'s tasks again (within about a
        second). Returns ``False`` when it was not paused."""
        return bool(reads.one(self._connection(), "SREM", self._paused_key, checked_queue(queue)))

    def paused(self) -> list[str]:
        """The paused queues, sorted."""
        names = reads.one(self._connection(), "SMEMBERS", self._paused_key)
        return sorted(reads.text(name) for name in names)

    @property
    def _paused_key(self) -> str:
        return _core.key_names(self.prefix)["paused"]

    def ping(self) -> None:
        """Checks that Redis answers; raises ``RedisUnavailable`` if not."""
        self._connection().ping()

    def close(self) -> None:
        """Writes buffered tasks, then closes the connection (the client may
        still be used; it reconnects). Raises ``RedisUnavailable`` if buffered
        tasks cannot be written; they stay buffered."""
        store = self._connection()
        if self._buffer:
            try:
                self._flush()
            except RedisUnavailable as error:
                raise RedisUnavailable(
                    f"{self._buffered} buffered task(s) could not be written: {error}; "
                    "call flush() or close() again once redis is back"
                ) from error
        store.close()
        if self._waiting is not None:
            self._waiting.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        exc_type: Optional[type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> None:
        self.close()


def _kept(call: _Call) -> Optional[float]:
    return call.result_ttl_ms / 1000 if call.result_ttl_ms else None


def _flush_at_exit(reference: weakref.ref[Client]) -> None:
    client = reference()
    if client is None or not client.buffered:
        return
    try:
        client.flush()
    except RedisUnavailable:
        log.error(
            "exiting with %d task(s) buffered for unreachable redis at %s: they are lost",
            client.buffered,
            safe_url(client.url),
        )
