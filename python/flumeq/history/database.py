"""Writing folded events into PostgreSQL: one transaction per batch, rows
sent with ``COPY`` into temporary tables, then merged into the history
tables (a task row keeps the latest state and every field it learnt). The
events-stream entries written are noted in the same transaction, so that
entries read again (after a crash between the commit and the ack) are
recognised and skipped, not written twice."""

from __future__ import annotations

import logging
from typing import Any, Optional

from . import schema
from .dsn import connect
from .rows import EVENT_COLUMNS, TASK_COLUMNS, Fold

__all__ = ["Database"]

log = logging.getLogger("flumeq.history")

_STAGE = """
CREATE TEMPORARY TABLE IF NOT EXISTS flumeq_task_stage
    (LIKE flumeq_task INCLUDING DEFAULTS) ON COMMIT DELETE ROWS;
CREATE TEMPORARY TABLE IF NOT EXISTS flumeq_task_event_stage
    (LIKE flumeq_task_event INCLUDING DEFAULTS) ON COMMIT DELETE ROWS;
"""

_COLUMNS = ", ".join(TASK_COLUMNS)
_MERGE_TASKS = f"""
INSERT INTO flumeq_task AS t ({_COLUMNS})
SELECT {_COLUMNS} FROM flumeq_task_stage
ON CONFLICT (task_id, queue) DO UPDATE SET
    type = coalesce(EXCLUDED.type, t.type),
    state = CASE WHEN EXCLUDED.updated_at >= t.updated_at THEN EXCLUDED.state ELSE t.state END,
    worker = CASE WHEN EXCLUDED.updated_at >= t.updated_at
                  THEN coalesce(EXCLUDED.worker, t.worker) ELSE t.worker END,
    attempts = greatest(EXCLUDED.attempts, t.attempts),
    max_retry = coalesce(EXCLUDED.max_retry, t.max_retry),
    payload = coalesce(EXCLUDED.payload, t.payload),
    labels = coalesce(EXCLUDED.labels, t.labels),
    result = coalesce(EXCLUDED.result, t.result),
    error = coalesce(EXCLUDED.error, t.error),
    traceback = coalesce(EXCLUDED.traceback, t.traceback),
    reason = coalesce(EXCLUDED.reason, t.reason),
    enqueued_at = coalesce(t.enqueued_at, EXCLUDED.enqueued_at),
    started_at = greatest(EXCLUDED.started_at, t.started_at),
    finished_at = greatest(EXCLUDED.finished_at, t.finished_at),
    duration_ms = coalesce(EXCLUDED.duration_ms, t.duration_ms),
    cut = coalesce(EXCLUDED.cut, t.cut),
    updated_at = greatest(EXCLUDED.updated_at, t.updated_at)
"""
_MERGE_EVENTS = f"""
INSERT INTO flumeq_task_event ({", ".join(EVENT_COLUMNS)})
SELECT {", ".join(EVENT_COLUMNS)} FROM flumeq_task_event_stage
"""
#: How long written entries are remembered: far longer than an entry can
#: stay pending (it is claimed after a minute).
BATCH_MEMORY = "1 day"

#: Rows one purge statement deletes: short transactions, no long lock.
PURGE_BATCH = 5000


class Database:
    """One connection to the history database, migrated on first use."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self.connection: Optional[Any] = None

    def open(self) -> Any:
        """The connection (made, migrated and prepared when there is none)."""
        if self.connection is None or self.connection.closed:
            connection = connect(self.dsn)
            try:
                schema.migrate(connection)
                with connection.cursor() as cursor:
                    cursor.execute(_STAGE)
                connection.commit()
            except BaseException:
                connection.close()
                raise
            self.connection = connection
        return self.connection

    def close(self) -> None:
        if self.connection is not None:
            try:
                self.connection.close()
            finally:
                self.connection = None

    def written(self, entries: list[tuple[str, str]]) -> set[tuple[str, str]]:
        """Which of ``(queue, entry id)`` were written already."""
        if not entries:
            return set()
        connection = self.open()
        try:
            with connection.cursor() as cursor:
                cursor.execute(
                    "SELECT queue, entry_id FROM flumeq_history_batch "
                    "WHERE (queue, entry_id) IN (SELECT * FROM unnest(%s::text[], %s::text[]))",
                    ([queue for queue, _ in entries], [entry for _, entry in entries]),
                )
                found = {(queue, entry) for queue, entry in cursor.fetchall()}
            connection.commit()
        except BaseException:
            self.close()
            raise
        return found

    def write(self, fold: Fold, entries: list[tuple[str, str]]) -> None:
        """Writes a batch and notes its ``(queue, entry id)`` as written, in
        one transaction (all of it or nothing)."""
        if not entries:
            return
        connection = self.open()
        try:
            with connection.cursor() as cursor:
                with cursor.copy("COPY flumeq_history_batch (queue, entry_id) FROM STDIN") as copy:
                    for entry in entries:
                        copy.write_row(entry)
                with cursor.copy(f"COPY flumeq_task_stage ({_COLUMNS}) FROM STDIN") as copy:
                    for row in fold.tasks.values():
                        copy.write_row(row)
                with cursor.copy(
                    f"COPY flumeq_task_event_stage ({', '.join(EVENT_COLUMNS)}) FROM STDIN"
                ) as copy:
                    for event in fold.events:
                        copy.write_row(event)
                cursor.execute(_MERGE_TASKS)
                cursor.execute(_MERGE_EVENTS)
            connection.commit()
        except BaseException:
            self.close()
            raise

    def purge(self, days: Optional[float]) -> int:
        """Deletes tasks not updated for ``days`` days and events older than
        that (``None``: none), ``PURGE_BATCH`` rows per transaction, and
        the replay guard's old entries; returns the task rows deleted."""
        connection = self.open()
        deleted = 0
        cutoff = "now() - make_interval(secs => %s)"
        seconds = (days or 0) * 86400
        try:
            with connection.cursor() as cursor:
                cursor.execute(
                    f"DELETE FROM flumeq_history_batch WHERE written_at < now() - interval '{BATCH_MEMORY}'"
                )
            connection.commit()
            for table, column in (("flumeq_task", "updated_at"), ("flumeq_task_event", "at")):
                if days is None:
                    break
                while True:
                    with connection.cursor() as cursor:
                        cursor.execute(
                            f"DELETE FROM {table} WHERE ctid = ANY(ARRAY("
                            f"SELECT ctid FROM {table} WHERE {column} < {cutoff} "
                            f"LIMIT {PURGE_BATCH}))",
                            (seconds,),
                        )
                        count = cursor.rowcount
                    connection.commit()
                    if table == "flumeq_task":
                        deleted += count
                    if count < PURGE_BATCH:
                        break
        except BaseException:
            self.close()
            raise
        return deleted
