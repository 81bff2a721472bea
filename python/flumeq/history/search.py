"""``flumeq.History``: searching the task history in PostgreSQL."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime, timedelta, timezone
from typing import Any, Optional, Union

import orjson

from ..errors import ConfigError
from . import schema
from .dsn import checked, connect
from .rows import EVENT_COLUMNS, EVENTS, TASK_COLUMNS

__all__ = ["History", "parse_label", "parse_time"]

#: The most tasks one search returns.
MAX_LIMIT = 1000
_SUMMARY = (
    "queue",
    "task_id",
    "type",
    "state",
    "attempts",
    "reason",
    "worker",
    "enqueued_at",
    "started_at",
    "finished_at",
    "duration_ms",
    "updated_at",
)
#: An event's own fields (its queue and task id are the task's).
_EVENT_FIELDS = EVENT_COLUMNS[2:]

When = Union[datetime, timedelta, float, int, str, None]
Label = Union[str, Mapping[str, str], None]


def parse_time(value: When, name: str) -> Optional[datetime]:
    """A search bound: a datetime (naive = UTC), a timedelta or a number of
    seconds (that long ago), or text: ISO 8601, or ``30s``, ``15m``,
    ``2h``, ``7d`` ago."""
    if value is None:
        return None
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=timezone.utc)
    now = datetime.now(timezone.utc)
    if isinstance(value, timedelta):
        return now - value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return now - timedelta(seconds=value)
    if isinstance(value, str):
        text = value.strip()
        units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
        if text[-1:] in units:
            try:
                return now - timedelta(seconds=float(text[:-1]) * units[text[-1]])
            except ValueError:
                pass
        try:
            return parse_time(datetime.fromisoformat(text), name)
        except ValueError:
            pass
    raise ConfigError(
        f"{name} must be a datetime, a timedelta, seconds ago, an ISO 8601 time or "
        f"a span like '15m', '2h' or '7d', got {value!r}"
    )


def parse_label(label: Label) -> Optional[dict[str, str]]:
    """``"key=value"`` (or a mapping of them) as the labels a task must have."""
    if label is None:
        return None
    if isinstance(label, Mapping):
        pairs = dict(label)
    elif isinstance(label, str) and "=" in label:
        key, _, value = label.partition("=")
        pairs = {key: value}
    else:
        raise ConfigError(f"label must be 'key=value' or a mapping, got {label!r}")
    for key, value in pairs.items():
        if not isinstance(key, str) or not isinstance(value, str) or not key:
            raise ConfigError(f"labels are text keys and values, got {key!r}: {value!r}")
    return pairs


class History:
    """Reads the task history an engine with ``history=DSN`` records.

    ``search`` returns task summaries, newest activity first; ``task`` one
    task with its payload, result, error and timeline."""

    def __init__(self, dsn: str) -> None:
        self.dsn = checked(dsn)
        self._connection: Optional[Any] = None

    def _cursor(self) -> Any:
        if self._connection is None or self._connection.closed:
            connection = connect(self.dsn)
            try:
                schema.migrate(connection)  # in transactions
                connection.autocommit = True  # reads: no transaction left open
            except BaseException:
                connection.close()
                raise
            self._connection = connection
        return self._connection.cursor()

    def close(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None

    def __enter__(self) -> History:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def search(
        self,
        queue: Optional[str] = None,
        type: Optional[str] = None,
        state: Optional[str] = None,
        label: Label = None,
        since: When = None,
        until: When = None,
        text: Optional[str] = None,
        limit: int = 50,
        before: Optional[tuple[datetime, str]] = None,
    ) -> list[dict[str, Any]]:
        """Tasks matching every filter given, newest activity first, at most
        ``limit``. ``state`` is a task's latest event (``enqueued``,
        ``started``, ``succeeded``, ``failed``, ``retried``, ``dead``,
        ``cancelled``); ``label`` ``"key=value"`` or a mapping; ``since`` and
        ``until`` bound the latest activity (see ``parse_time``); ``text``
        is looked for in the id, type, error and payload. For the next page,
        pass the last row's ``(updated_at, task_id)`` as ``before``."""
        if isinstance(limit, bool) or not isinstance(limit, int) or not 0 < limit <= MAX_LIMIT:
            raise ConfigError(f"limit must be an integer from 1 to {MAX_LIMIT}, got {limit!r}")
        if state is not None and state not in EVENTS:
            raise ConfigError(f"state must be one of {', '.join(EVENTS)}, got {state!r}")
        where: list[str] = []
        args: list[Any] = []
        for column, value in (("queue", queue), ("type", type), ("state", state)):
            if value is not None:
                where.append(f"{column} = %s")
                args.append(value)
        labels = parse_label(label)
        if labels:
            where.append("labels @> %s::jsonb")
            args.append(orjson.dumps(labels).decode())
        start, end = parse_time(since, "since"), parse_time(until, "until")
        if start is not None:
            where.append("updated_at >= %s")
            args.append(start)
        if end is not None:
            where.append("updated_at < %s")
            args.append(end)
        if text:
            escaped = text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
            where.append(f"{schema.TEXT_EXPRESSION} ILIKE %s")
            args.append(f"%{escaped}%")
        if before is not None:
            where.append("(updated_at, task_id) < (%s, %s)")
            args.extend(before)
        sql = (
            f"SELECT {', '.join(_SUMMARY)} FROM flumeq_task"
            + (f" WHERE {' AND '.join(where)}" if where else "")
            + f" ORDER BY updated_at DESC, task_id DESC LIMIT {limit}"
        )
        with self._cursor() as cursor:
            cursor.execute(sql, args)
            return [dict(zip(_SUMMARY, row)) for row in cursor.fetchall()]

    def task(self, task_id: str, queue: Optional[str] = None) -> Optional[dict[str, Any]]:
        """Task ``task_id`` (of ``queue``, or of whichever queue had it last)
        with every recorded field and its ``timeline`` (events, oldest
        first); ``None`` when the history has no such task."""
        with self._cursor() as cursor:
            sql = f"SELECT {', '.join(TASK_COLUMNS)} FROM flumeq_task WHERE task_id = %s"
            args: list[Any] = [task_id]
            if queue is not None:
                sql += " AND queue = %s"
                args.append(queue)
            cursor.execute(sql + " ORDER BY updated_at DESC LIMIT 1", args)
            row = cursor.fetchone()
            if row is None:
                return None
            task = dict(zip(TASK_COLUMNS, row))
            cursor.execute(
                f"SELECT {', '.join(_EVENT_FIELDS)} FROM flumeq_task_event "
                "WHERE task_id = %s AND queue = %s "
                "ORDER BY at, attempt, array_position(%s::text[], event)",
                (task_id, task["queue"], list(EVENTS)),
            )
            task["timeline"] = [dict(zip(_EVENT_FIELDS, event)) for event in cursor.fetchall()]
            return task

    def purge(self, days: float) -> int:
        """Deletes what is older than ``days`` days (as ``history_retention``
        does); returns the task rows deleted."""
        from .database import Database  # noqa: PLC0415

        database = Database(self.dsn)
        try:
            return database.purge(days)
        finally:
            database.close()
