"""From events (as the engine and the client record them, see the Rust
``history`` module for their keys) to the rows of the history tables.

Events of one batch are folded per task into one ``flumeq_task`` row (a
table row can be upserted once per statement), and each becomes one
``flumeq_task_event`` row.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any, Optional

import orjson

__all__ = ["EVENT_COLUMNS", "EVENTS", "TASK_COLUMNS", "Fold", "enqueued_event"]

#: Every event, in lifecycle order.
EVENTS = ("enqueued", "started", "succeeded", "failed", "retried", "dead", "cancelled")
#: Events that end a task (until it is requeued from the dead letters).
FINAL = frozenset(("succeeded", "dead", "cancelled"))

TASK_COLUMNS = (
    "queue",
    "task_id",
    "type",
    "state",
    "attempts",
    "max_retry",
    "payload",
    "labels",
    "result",
    "error",
    "traceback",
    "reason",
    "worker",
    "enqueued_at",
    "started_at",
    "finished_at",
    "duration_ms",
    "cut",
    "updated_at",
)
EVENT_COLUMNS = (
    "queue",
    "task_id",
    "event",
    "attempt",
    "at",
    "worker",
    "duration_ms",
    "reason",
    "error",
    "traceback",
    "result",
    "due_at",
)
_AT = {name: index for index, name in enumerate(TASK_COLUMNS)}


def _time(ms: Any) -> Optional[datetime]:
    if isinstance(ms, (int, float)) and not isinstance(ms, bool) and ms > 0:
        return datetime.fromtimestamp(ms / 1000, timezone.utc)
    return None


def _text(value: Any) -> Optional[str]:
    """A text field, with NUL characters (which PostgreSQL text refuses) escaped."""
    if value is None:
        return None
    text = value if isinstance(value, str) else str(value)
    return text.replace("\x00", "\\u0000") if "\x00" in text else text


def _labels(raw: Any) -> Optional[str]:
    """Labels as JSON text for a ``jsonb`` column, or ``None`` when they are
    not a JSON object (an entry written by hand)."""
    if not isinstance(raw, str):
        return None
    try:
        labels = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    return orjson.dumps(labels).decode() if isinstance(labels, dict) else None


class Fold:
    """Rows of a batch of events: ``tasks`` (one per queue and task id, as
    lists in ``TASK_COLUMNS`` order) and ``events`` (tuples in
    ``EVENT_COLUMNS`` order). Events must be added in time order per task."""

    def __init__(self) -> None:
        self.tasks: dict[tuple[str, str], list[Any]] = {}
        self.events: list[tuple[Any, ...]] = []
        #: Events not understood (not an object, no id, unknown name), skipped.
        self.skipped = 0

    def add(self, queue: str, event: Any) -> None:
        if not isinstance(event, dict):
            self.skipped += 1
            return
        name, task_id = event.get("e"), event.get("id")
        if name not in EVENTS or not isinstance(task_id, str) or not task_id:
            self.skipped += 1
            return
        attempt: int = event["a"] if isinstance(event.get("a"), int) else 0
        at = _time(event.get("t")) or datetime.now(timezone.utc)
        worker = _text(event.get("w"))
        duration = event.get("d") if isinstance(event.get("d"), int) else None
        error, traceback = _text(event.get("x")), _text(event.get("tb"))
        result, reason = _text(event.get("v")), _text(event.get("r"))
        due = _time(event.get("u"))
        self.events.append(
            (
                queue,
                task_id,
                name,
                attempt,
                at,
                worker,
                duration,
                reason,
                error,
                traceback,
                result,
                due,
            )
        )
        row = self.tasks.get((queue, task_id))
        if row is None:
            row = [None] * len(TASK_COLUMNS)
            row[_AT["queue"]], row[_AT["task_id"]], row[_AT["attempts"]] = queue, task_id, 0
            self.tasks[(queue, task_id)] = row
        if row[_AT["updated_at"]] is None or at >= row[_AT["updated_at"]]:
            row[_AT["state"]], row[_AT["updated_at"]] = name, at
            if worker is not None:
                row[_AT["worker"]] = worker
        runs = attempt + 1 if name in ("started", "succeeded", "failed") else attempt
        row[_AT["attempts"]] = max(row[_AT["attempts"]], runs)
        if "k" in event:
            row[_AT["type"]] = _text(event["k"])
        if "p" in event:
            row[_AT["payload"]] = _text(event["p"])
        if "l" in event:
            row[_AT["labels"]] = _labels(event["l"])
        if isinstance(event.get("m"), int):
            row[_AT["max_retry"]] = event["m"]
        if "q" in event:
            row[_AT["enqueued_at"]] = _time(event["q"])
        if name == "started":
            row[_AT["started_at"]] = at
        if name in FINAL:
            row[_AT["finished_at"]] = at
        if duration is not None:
            row[_AT["duration_ms"]] = duration
        if result is not None:
            row[_AT["result"]] = result
        if error is not None:
            row[_AT["error"]] = error
        if traceback is not None:
            row[_AT["traceback"]] = traceback
        if reason is not None:
            row[_AT["reason"]] = reason
        cut = event.get("c")
        if isinstance(cut, list) and cut:
            known = row[_AT["cut"]] or []
            row[_AT["cut"]] = sorted({*known, *(str(name) for name in cut)})


def enqueued_event(
    task_id: str,
    type_: str,
    payload: bytes,
    at_ms: int,
    max_retry: int,
    labels: Optional[bytes],
    worker: str,
    limit: int,
) -> dict[str, Any]:
    """The ``enqueued`` event of a task a client enqueued, its payload cut
    to ``limit`` bytes (and said so)."""
    text = payload.decode("utf-8", "replace")
    event: dict[str, Any] = {
        "e": "enqueued",
        "id": task_id,
        "a": 0,
        "t": at_ms,
        "w": worker,
        "k": type_,
        "q": at_ms,
        "m": max_retry,
    }
    if len(payload) > limit:
        event["p"] = payload[:limit].decode("utf-8", "ignore")
        event["c"] = ["p"]
    else:
        event["p"] = text
    if labels is not None:
        event["l"] = labels.decode("utf-8", "replace")
    return event
