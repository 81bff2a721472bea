"""Waiting for tasks' outcomes: the result records and the wake-up stream.

A task enqueued with ``result_ttl`` gets, in the same transaction as its
final ack, a hash ``<prefix>:{<queue>}:result:<id>`` (kept ``result_ttl``
seconds) and an entry with its id on the queue's ``ended`` stream (capped at
``ENDED_MAX_LENGTH`` entries). A waiter:

1. takes the stream's last id as its cursor (before anything else);
2. looks for the record, and returns if it is there (the task ended before
   the wait began);
3. blocks in ``XREAD`` on the stream from the cursor and looks again when its
   id shows up.

All the waiters of one process and queue share one blocking reader: in
``Client``, the waiting thread that finds no reader running becomes it and
wakes the others; in ``AsyncClient``, one reader task per queue serves every
coroutine. Since ``XREAD`` resumes from the last id it saw, a reconnect
loses no wake-up. As a safety net for a wake-up trimmed away before it was
read (a waiter that fell ``ENDED_MAX_LENGTH`` ends behind), each waiter also
looks for its record every ``RECHECK`` seconds.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from typing import Any, Optional

import orjson

from . import _core
from .errors import (
    FlumeqError,
    InvalidTask,
    RedisUnavailable,
    ResultTimeout,
    TaskCancelled,
    TaskFailed,
)

__all__ = ["RECHECK", "QueueWaiters", "Records", "check_wait", "outcome"]

log = logging.getLogger("flumeq.results")

#: Seconds between a waiter's own looks for its record (the safety net).
RECHECK = 5.0
#: Longest single block in Redis (ms): the reader comes back this often to
#: let a new leader take over and to see timeouts.
BLOCK_MS = 1000
#: Ids read per XREAD.
READ_COUNT = 1000


def check_wait(task_id: Any, queue: Any, timeout: Any) -> Optional[float]:
    """Checks a wait's arguments; returns its deadline (``time.monotonic``)."""
    if not isinstance(task_id, str) or not task_id:
        raise InvalidTask(f"task id must be a non-empty string, got {task_id!r}")
    if not isinstance(queue, str) or not queue:
        raise InvalidTask(f"queue must be a non-empty string, got {queue!r}")
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or math.isnan(timeout):
        raise InvalidTask(f"timeout must be seconds or None, got {timeout!r}")
    if timeout < 0:
        raise InvalidTask(f"timeout must not be negative, got {timeout!r}")
    return time.monotonic() + float(timeout)


def outcome(task_id: str, record: dict[bytes, bytes]) -> Any:
    """The value a result record holds, or the exception it stands for."""
    state = record.get(b"state", b"").decode()
    if state == "succeeded":
        return orjson.loads(record.get(b"value", b"null"))
    if state == "cancelled":
        raise TaskCancelled(task_id)
    if state == "dead":
        raise TaskFailed(
            task_id,
            record.get(b"reason", b"").decode(errors="replace"),
            record.get(b"error", b"").decode(errors="replace"),
            record.get(b"traceback", b"").decode(errors="replace"),
            int(record.get(b"attempts", b"0") or 0),
        )
    raise FlumeqError(f"task {task_id}: its result record has an unknown state {state!r}")


def _pairs(reply: Any) -> dict[bytes, bytes]:
    """An HGETALL reply (a flat list or a list of pairs) as a dict."""
    if not reply:
        return {}
    if isinstance(reply[0], tuple):
        return dict(reply)
    return dict(zip(reply[::2], reply[1::2]))


class Records:
    """The result records of one queue: the commands that look for one, and
    what their replies mean."""

    def __init__(self, prefix: str, queue: str) -> None:
        names = _core.key_names(prefix, queue)
        self.queue = queue
        self._prefix = names["result"]
        self._queues_key = names["queues"].encode()

    def key(self, task_id: str) -> bytes:
        return (self._prefix + task_id).encode()

    def commands(self, task_id: str, first: bool) -> list[list[bytes]]:
        """A first look also checks that the queue exists."""
        read = [b"HGETALL", self.key(task_id)]
        if not first:
            return [read]
        return [[b"SISMEMBER", self._queues_key, self.queue.encode()], read]

    def found(self, replies: list[Any]) -> dict[bytes, bytes]:
        """The record in the replies to ``commands`` (empty: not there)."""
        if len(replies) == 2 and not replies[0]:
            raise InvalidTask(
                f"queue {self.queue!r} is unknown: no task was ever enqueued to it "
                "(check the queue name)"
            )
        return _pairs(replies[-1])

    def read(
        self, reader: _core.Store, cursor: str, block_ms: int, wanted: set[str]
    ) -> tuple[str, dict[str, dict[bytes, bytes]]]:
        """One blocking read of the ``ended`` stream from ``cursor``, then the
        records of the awaited ids that ended, in one pipeline: the new
        cursor and ``{task id: record}`` (an empty record: it expired)."""
        cursor, ids = reader.read_ended(self.queue, cursor, block_ms, READ_COUNT)
        hits = [task_id for task_id in ids if task_id in wanted]
        if not hits:
            return cursor, {}
        replies = reader.pipeline([[b"HGETALL", self.key(task_id)] for task_id in hits])
        return cursor, {task_id: _pairs(reply) for task_id, reply in zip(hits, replies)}


class QueueWaiters:
    """The threads of one process waiting for outcomes of one queue.

    ``store`` serves the short reads (records), ``reader`` is the connection
    the blocking reads use, one for all waiters.
    """

    def __init__(self, store: Any, reader: _core.Store, prefix: str, queue: str) -> None:
        self.queue = queue
        self._records = Records(prefix, queue)
        self._store = store
        self._reader = reader
        self._cond = threading.Condition()
        self._cursor: Optional[str] = None
        self._reading = False
        #: Waiters per awaited id, and the records of awaited ids seen ending
        #: (read by the leading waiter for all, in one pipeline).
        self._wanted: dict[str, int] = {}
        self._ended: dict[str, dict[bytes, bytes]] = {}

    def _record(self, task_id: str, first: bool) -> dict[bytes, bytes]:
        records = self._records
        return records.found(self._store.pipeline(records.commands(task_id, first)))

    def wait(self, task_id: str, deadline: Optional[float]) -> Any:
        """Blocks until ``task_id`` ended; returns its value or raises."""
        with self._cond:
            self._wanted[task_id] = self._wanted.get(task_id, 0) + 1
        try:
            self._start()
            record = self._record(task_id, first=True)
            next_look = time.monotonic() + RECHECK
            outage = 0
            while not record:
                now = time.monotonic()
                if deadline is not None and now >= deadline:
                    raise ResultTimeout(
                        f"task {task_id} did not end within the timeout (queue {self.queue!r})"
                    )
                try:
                    seen = self._wait_for(task_id, deadline, next_look)
                    if seen is not None:
                        record = seen
                    elif time.monotonic() >= next_look:
                        record = self._record(task_id, first=False)
                        next_look = time.monotonic() + RECHECK
                except RedisUnavailable as error:
                    # The wait outlives an outage: the cursor is kept, so
                    # the ends it missed are read once Redis is back.
                    outage = self._outage(error, outage, deadline)
                    continue
                outage = 0
                if seen is not None and not record:
                    raise FlumeqError(
                        f"task {task_id} ended, but its result expired before it was "
                        "read: give it a longer result_ttl"
                    )
            return outcome(task_id, record)
        finally:
            with self._cond:
                left = self._wanted.pop(task_id) - 1
                if left:
                    self._wanted[task_id] = left
                else:
                    self._ended.pop(task_id, None)

    def _outage(self, error: RedisUnavailable, count: int, deadline: Optional[float]) -> int:
        """Waits a little (backing off) while Redis is away; returns the count."""
        if count == 0:
            log.warning("waiting for results of queue %r: redis is away (%s)", self.queue, error)
        pause = min(1.0, 0.05 * 2**count)
        if deadline is not None:
            pause = max(0.0, min(pause, deadline - time.monotonic()))
        time.sleep(pause)
        return count + 1

    def _start(self) -> None:
        """Takes the stream's last id as the cursor, once (before the first
        look for a record, so no end after it can be missed)."""
        with self._cond:
            if self._cursor is not None:
                return
            self._cursor, _ = self._reader.read_ended(self.queue, "", 0, 1)

    def _wait_for(
        self, task_id: str, deadline: Optional[float], until: float
    ) -> Optional[dict[bytes, bytes]]:
        """Waits for the end of ``task_id``, leading the read when nobody
        does, at most until ``until`` or the deadline. Its record once it
        ended (empty: expired), else ``None``."""
        with self._cond:
            if task_id in self._ended:
                return self._ended[task_id]
            limit = until if deadline is None else min(until, deadline)
            if self._reading:
                self._cond.wait(max(0.0, limit - time.monotonic()))
                return self._ended.get(task_id)
            self._reading = True
            cursor = self._cursor or "0-0"
            wanted = set(self._wanted)
        found: dict[str, dict[bytes, bytes]] = {}
        try:
            block_ms = max(1, min(BLOCK_MS, int((limit - time.monotonic()) * 1000)))
            cursor, found = self._records.read(self._reader, cursor, block_ms, wanted)
        finally:
            with self._cond:
                self._reading = False
                self._cursor = cursor
                for ended, record in found.items():
                    if ended in self._wanted:
                        self._ended[ended] = record
                self._cond.notify_all()
        with self._cond:
            return self._ended.get(task_id)
