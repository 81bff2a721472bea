"""What a handler sees (``Task``, ``current_task()``), what ``enqueue``
returns (``TaskInfo``), and the two exceptions a handler raises to steer its
task (``Retry``, ``Reject``)."""

from __future__ import annotations

from contextvars import ContextVar
from typing import TYPE_CHECKING, Any, Generic, Optional, TypeVar

from .errors import FlumeqError

if TYPE_CHECKING:
    from .client import Client

__all__ = ["Cancelled", "Reject", "Retry", "Task", "TaskInfo", "current_task"]

R = TypeVar("R")


class Task:
    """One task, as handed to its handler.

    ``attempt`` is 0 on the first run and counts failed runs before this one;
    ``enqueued_at`` is seconds since the Unix epoch (like ``time.time()``);
    ``timeout`` is the hard limit in seconds (0 = none).
    """

    __slots__ = (
        "attempt",
        "enqueued_at",
        "id",
        "labels",
        "max_retry",
        "payload",
        "queue",
        "timeout",
        "type",
    )

    def __init__(
        self,
        id: str,
        type: str,
        queue: str,
        payload: Any,
        attempt: int,
        max_retry: int,
        enqueued_at: float,
        timeout: float,
        labels: dict[str, str],
    ) -> None:
        self.id = id
        self.type = type
        self.queue = queue
        self.payload = payload
        self.attempt = attempt
        self.max_retry = max_retry
        self.enqueued_at = enqueued_at
        self.timeout = timeout
        self.labels = labels

    def __repr__(self) -> str:
        return f"Task(id={self.id!r}, type={self.type!r}, queue={self.queue!r}, attempt={self.attempt})"


#: The async task the current coroutine runs (set by the actor in each
#: task's own context).
_current: ContextVar[Optional[Task]] = ContextVar("flumeq_current_task", default=None)


class _Running:
    """The sync task the actor runs: an attribute store per task, where a
    context variable's set costs a new context each time (measured: 0.6 µs
    of the engine's 8 µs per no-op task)."""

    __slots__ = ("task",)

    def __init__(self) -> None:
        self.task: Optional[Task] = None


_sync = _Running()


def current_task() -> Optional[Task]:
    """Inside a running task (sync or async): its ``Task`` (id, attempt,
    labels...). ``None`` outside a task."""
    task = _current.get()
    return task if task is not None else _sync.task


class TaskInfo(Generic[R]):
    """What ``Client.enqueue`` returns: the task id and where it went.

    Generic in the task's return type: ``add.enqueue(1, 2).result()`` is an
    ``int`` for ``@app.task def add(a: int, b: int) -> int``.
    """

    __slots__ = ("_client", "entry_id", "id", "queue", "result_ttl", "type")

    def __init__(
        self,
        id: str,
        type: str,
        queue: str,
        entry_id: Optional[str],
        client: Optional[Client] = None,
        result_ttl: Optional[float] = None,
    ) -> None:
        self.id = id
        self.type = type
        self.queue = queue
        #: The Redis stream entry id (``<ms>-<seq>``); ``None`` while scheduled.
        self.entry_id = entry_id
        #: Seconds its outcome is kept once it ended; ``None``: not kept.
        self.result_ttl = result_ttl
        self._client = client

    def result(self, timeout: Optional[float] = None) -> R:
        """Waits for the task to end and returns its handler's return value.

        Retries are waited out. Raises ``TaskFailed`` when it ended in the
        dead letters, ``TaskCancelled`` when it was cancelled, and
        ``ResultTimeout`` when it has not ended within ``timeout`` seconds
        (``None``: wait as long as it takes). Needs a ``result_ttl``.
        """
        if self._client is None:
            raise FlumeqError(
                f"task {self.id}: this TaskInfo has no client to wait with; "
                "use Client.result(task_id, queue=...)"
            )
        if not self.result_ttl:
            raise FlumeqError(
                f"task {self.id} ({self.type}) was enqueued without result_ttl, so its "
                "outcome is not kept: enqueue it with result_ttl=<seconds> to wait for it"
            )
        value: R = self._client.result(self, timeout=timeout)
        return value

    def __repr__(self) -> str:
        return f"TaskInfo(id={self.id!r}, type={self.type!r}, queue={self.queue!r})"


class Retry(FlumeqError):
    """Raise from a handler to run the task again, now or after ``delay`` seconds.

    Counts as a failed attempt (``max_retry`` still applies).
    """

    def __init__(self, delay: Optional[float] = None, reason: str = "") -> None:
        super().__init__(reason or "retry requested")
        self.delay = delay
        self.reason = reason


class Cancelled(BaseException):
    """Raised inside a running sync handler when its task is cancelled
    (``Client.cancel``). A ``BaseException``, like ``KeyboardInterrupt`` and
    ``asyncio.CancelledError``, so ``except Exception`` in a handler does not
    swallow it: clean up in ``finally`` and let it go. A handler that has
    not returned ``cancel_grace`` seconds later (stuck in C code, or
    ignoring it) has its actor process killed and replaced. Async handlers
    get ``asyncio.CancelledError`` instead."""

    def __init__(self, task_id: str = "") -> None:
        super().__init__(f"task {task_id} was cancelled" if task_id else "cancelled")
        self.task_id = task_id


class Reject(FlumeqError):
    """Raise from a handler to send the task straight to dead letters, no retry."""

    def __init__(self, reason: str = "") -> None:
        super().__init__(reason or "rejected")
        self.reason = reason
