"""The history schema, created and migrated by flumeq itself.

Three tables:

- ``flumeq_task``: one row per task (``task_id``, ``queue``), its state as
  of its latest event: what a search returns;
- ``flumeq_task_event``: one row per event (enqueued, started, succeeded,
  failed, retried, dead, cancelled): a task's timeline;
- ``flumeq_history_batch``: the events-stream entries written (for a day),
  so that entries read again after a crash are not written twice.

Migrations are numbered and run in order, each in its own transaction,
under an advisory lock so that engines starting together migrate once; the
applied ones are listed in ``flumeq_schema_version``. A migration is never
edited once released: a change is a new one.
"""

from __future__ import annotations

import logging
from typing import Any

__all__ = ["LATEST", "MIGRATIONS", "TEXT_EXPRESSION", "migrate"]

log = logging.getLogger("flumeq.history")

#: What ``text=`` searches: the id, type, error and payload of a task.
TEXT_EXPRESSION = (
    "(task_id || ' ' || coalesce(type, '') || ' ' || coalesce(error, '') || ' ' "
    "|| coalesce(payload, ''))"
)

_TASKS = """
CREATE TABLE flumeq_task (
    queue        text        NOT NULL,
    task_id      text        NOT NULL,
    type         text,
    state        text        NOT NULL,
    attempts     integer     NOT NULL DEFAULT 0,
    max_retry    integer,
    payload      text,
    labels       jsonb,
    result       text,
    error        text,
    traceback    text,
    reason       text,
    worker       text,
    enqueued_at  timestamptz,
    started_at   timestamptz,
    finished_at  timestamptz,
    duration_ms  bigint,
    cut          text[],
    updated_at   timestamptz NOT NULL,
    PRIMARY KEY (task_id, queue)
);
CREATE INDEX flumeq_task_updated ON flumeq_task (updated_at DESC, task_id DESC);
CREATE INDEX flumeq_task_queue ON flumeq_task (queue, updated_at DESC, task_id DESC);
CREATE INDEX flumeq_task_type ON flumeq_task (type, updated_at DESC, task_id DESC);
CREATE INDEX flumeq_task_state ON flumeq_task (state, updated_at DESC, task_id DESC);
CREATE INDEX flumeq_task_labels ON flumeq_task USING gin (labels jsonb_path_ops);
CREATE TABLE flumeq_task_event (
    queue        text        NOT NULL,
    task_id      text        NOT NULL,
    event        text        NOT NULL,
    attempt      integer     NOT NULL,
    at           timestamptz NOT NULL,
    worker       text,
    duration_ms  bigint,
    reason       text,
    error        text,
    traceback    text,
    result       text,
    due_at       timestamptz
);
CREATE INDEX flumeq_task_event_task ON flumeq_task_event (task_id, queue, at);
CREATE INDEX flumeq_task_event_at ON flumeq_task_event (at);
CREATE TABLE flumeq_history_batch (
    queue        text        NOT NULL,
    entry_id     text        NOT NULL,
    written_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (queue, entry_id)
);
"""


def _text_index(cursor: Any) -> None:
    """The trigram index behind ``text=`` searches. ``pg_trgm`` ships with
    PostgreSQL and is a trusted extension (a database owner may create it);
    where it cannot be created, ``text=`` still works, by a scan."""
    cursor.execute("SAVEPOINT flumeq_trgm")
    try:
        cursor.execute("CREATE EXTENSION IF NOT EXISTS pg_trgm")
        cursor.execute(
            f"CREATE INDEX flumeq_task_text ON flumeq_task USING gin ({TEXT_EXPRESSION} gin_trgm_ops)"
        )
    except Exception as error:
        cursor.execute("ROLLBACK TO SAVEPOINT flumeq_trgm")
        log.warning(
            "history: no trigram index for text searches (%s); they scan the table instead",
            str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__,
        )
    else:
        cursor.execute("RELEASE SAVEPOINT flumeq_trgm")


#: ``(version, what it does, SQL text or a function of a cursor)``.
MIGRATIONS: list[tuple[int, str, Any]] = [
    (1, "task and event tables with their search indexes", _TASKS),
    (2, "trigram index for text searches", _text_index),
]
LATEST = MIGRATIONS[-1][0]

#: Any constant key: engines starting together take turns.
_LOCK = 0x666C756D6571


def migrate(connection: Any) -> int:
    """Brings the schema up to ``LATEST``; returns the version found before."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_advisory_lock(%s)", (_LOCK,))
        try:
            cursor.execute(
                "CREATE TABLE IF NOT EXISTS flumeq_schema_version ("
                "version integer PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now(), "
                "description text NOT NULL)"
            )
            connection.commit()
            cursor.execute("SELECT coalesce(max(version), 0) FROM flumeq_schema_version")
            row = cursor.fetchone()
            found = int(row[0]) if row else 0
            for version, description, step in MIGRATIONS:
                if version <= found:
                    continue
                if callable(step):
                    step(cursor)
                else:
                    cursor.execute(step)
                cursor.execute(
                    "INSERT INTO flumeq_schema_version (version, description) VALUES (%s, %s)",
                    (version, description),
                )
                connection.commit()
                log.info("history: schema migrated to version %d (%s)", version, description)
            return found
        except BaseException:
            connection.rollback()
            raise
        finally:
            cursor.execute("SELECT pg_advisory_unlock(%s)", (_LOCK,))
            connection.commit()
