"""Logging set-up for the command line (the library itself only adds a
``NullHandler``: applications configure ``logging`` as they like).

Text lines read like Celery's; JSON lines carry the same fields as keys, plus
``task_id``, ``task_type``, ``queue`` and ``attempt`` when a record is about
one task (the actors pass them as ``extra``).
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import orjson

__all__ = ["JsonFormatter", "configure", "task_extra"]

#: Record attributes that describe one task.
TASK_FIELDS = ("task_id", "task_type", "queue", "attempt")

TEXT_FORMAT = "[%(asctime)s: %(levelname)s/%(processName)s] %(name)s: %(message)s"


def task_extra(task: Any) -> dict[str, Any]:
    """The ``extra`` of a log record about ``task``."""
    return {
        "task_id": task.id,
        "task_type": task.type,
        "queue": task.queue,
        "attempt": task.attempt,
    }


class JsonFormatter(logging.Formatter):
    """One JSON object per line."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}",
            "level": record.levelname,
            "logger": record.name,
            "process": record.processName,
            "pid": record.process,
            "message": record.getMessage(),
        }
        for name in TASK_FIELDS:
            if hasattr(record, name):
                line[name] = getattr(record, name)
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(line, default=str).decode()


def configure(level: str = "INFO", fmt: str = "text") -> None:
    """Sends flumeq's (and the handlers') logs to stderr as text or JSON lines."""
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for existing in list(root.handlers):
        root.removeHandler(existing)
    root.addHandler(handler)
    root.setLevel(level.upper())
