"""flumeq's exceptions: one base class, children by cause.

Children also subclass the stdlib exception a caller would already catch
(``ValueError`` for bad input, ``ConnectionError`` for an unreachable Redis).
"""

from __future__ import annotations

__all__ = [
    "BufferFull",
    "ConfigError",
    "DuplicateTask",
    "EngineError",
    "FlumeqError",
    "InvalidTask",
    "RedisCommandError",
    "RedisUnavailable",
    "ResultTimeout",
    "TaskCancelled",
    "TaskFailed",
]


class FlumeqError(Exception):
    """Base class of every error flumeq raises."""


class ConfigError(FlumeqError, ValueError):
    """A setting is invalid (bad URL, bad queue weights, bad sizes...)."""


class InvalidTask(FlumeqError, ValueError):
    """A task cannot be enqueued as given (payload not JSON, bad option)."""


class DuplicateTask(FlumeqError):
    """A task with the same ``unique_key`` is still live."""


class RedisUnavailable(FlumeqError, ConnectionError):
    """Redis could not be reached or the connection broke."""


class BufferFull(RedisUnavailable):
    """Redis is unreachable and the client's outage buffer has no room left:
    the tasks of this call were not enqueued."""


class RedisCommandError(FlumeqError):
    """Redis answered a command with an error."""


class EngineError(FlumeqError):
    """The engine could not run (its dispatcher failed to start or crashed)."""


class TaskFailed(FlumeqError):
    """The task whose result was awaited ended in the dead letters.

    ``reason`` is the dead-letter reason (``error``, ``timeout``,
    ``rejected``, ``bad_result``...), ``error`` the last failure's text and
    ``traceback`` its traceback (may be empty); ``attempts`` the runs made.
    """

    def __init__(
        self, task_id: str, reason: str, error: str, traceback: str = "", attempts: int = 0
    ) -> None:
        super().__init__(f"task {task_id} failed ({reason}): {error}")
        self.task_id = task_id
        self.reason = reason
        self.error = error
        self.traceback = traceback
        self.attempts = attempts


class TaskCancelled(FlumeqError):
    """The task whose result was awaited was cancelled."""

    def __init__(self, task_id: str) -> None:
        super().__init__(f"task {task_id} was cancelled")
        self.task_id = task_id


class ResultTimeout(FlumeqError, TimeoutError):
    """The task did not end within the wait's ``timeout``."""
