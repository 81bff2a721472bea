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
