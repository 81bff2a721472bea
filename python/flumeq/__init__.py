"""flumeq: a fast, reliable distributed task queue for Python on Redis Streams.

A Rust core reads batches from Redis and hands them over shared memory to
worker processes that run your handlers.
"""

from __future__ import annotations

import logging

# First (and sorted first): it says what is wrong when the compiled core is
# missing or stale.
from ._version import __version__ as __version__
from .admin import Admin
from .aio import AsyncClient
from .app import App
from .client import (
    DEFAULT_MAX_RETRY,
    DEFAULT_URL,
    MAX_ID_BYTES,
    MAX_RESULT_BYTES,
    MAX_TEXT_BYTES,
    MAX_TYPE_BYTES,
    Client,
)
from .cron import Cron
from .engine import Engine
from .errors import (
    BufferFull,
    ConfigError,
    DuplicateTask,
    EngineError,
    FlumeqError,
    InvalidTask,
    RedisCommandError,
    RedisUnavailable,
    ResultTimeout,
    TaskCancelled,
    TaskFailed,
)
from .history import History, HistoryUnavailable
from .task import Cancelled, Reject, Retry, Task, TaskInfo, current_task

# A library logs; the application decides where to. Records of the Rust core
# arrive as "flumeq.dispatcher", "flumeq.dispatcher.recovery", ...
logging.getLogger("flumeq").addHandler(logging.NullHandler())

__all__ = [
    # producing and running
    "App",
    "Client",
    "AsyncClient",
    "Engine",
    "Cron",
    # inspecting and managing (what the CLI and the dashboard use)
    "Admin",
    "History",
    # what handlers see and raise
    "Task",
    "TaskInfo",
    "Retry",
    "Reject",
    "Cancelled",
    "current_task",
    # errors
    "FlumeqError",
    "ConfigError",
    "InvalidTask",
    "DuplicateTask",
    "RedisUnavailable",
    "BufferFull",
    "RedisCommandError",
    "EngineError",
    "TaskFailed",
    "TaskCancelled",
    "ResultTimeout",
    "HistoryUnavailable",
    # defaults and bounds
    "DEFAULT_URL",
    "DEFAULT_MAX_RETRY",
    "MAX_ID_BYTES",
    "MAX_TYPE_BYTES",
    "MAX_TEXT_BYTES",
    "MAX_RESULT_BYTES",
]
