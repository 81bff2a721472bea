"""What a handler sees (``Task``), what ``enqueue`` returns (``TaskInfo``), and
the two exceptions a handler raises to steer its task (``Retry``, ``Reject``)."""

from __future__ import annotations

from typing import Any, Optional

from .errors import FlumeqError

__all__ = ["Reject", "Retry", "Task", "TaskInfo"]


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


class TaskInfo:
    """What ``Client.enqueue`` returns: the task id and where it went."""

    __slots__ = ("entry_id", "id", "queue", "type")

    def __init__(self, id: str, type: str, queue: str, entry_id: Optional[str]) -> None:
        self.id = id
        self.type = type
        self.queue = queue
        #: The Redis stream entry id (``<ms>-<seq>``); ``None`` while scheduled.
        self.entry_id = entry_id

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


class Reject(FlumeqError):
    """Raise from a handler to send the task straight to dead letters, no retry."""

    def __init__(self, reason: str = "") -> None:
        super().__init__(reason or "rejected")
        self.reason = reason
