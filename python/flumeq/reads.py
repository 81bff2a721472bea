"""Reading queue state from Redis, for ``Client`` and ``Admin`` alike.

These are people's reads (stats, dead letters, dashboards), not the task path:
commands go through the core's generic pipeline (one round trip per call) and
replies are turned into plain dicts here, in one place. Key names come from
the core (``key_names``).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable, Sequence
from typing import Any, Union

import orjson

from . import _core
from .errors import RedisCommandError

__all__ = [
    "COUNTERS",
    "dead_letters",
    "delayed_fields",
    "integer",
    "one",
    "pairs",
    "queue_rows",
    "run",
    "task_fields",
    "text",
]

#: Counters kept per queue and per task type in the stats hash
#: (``<counter>`` and ``<counter>|<type>``; counter names never hold ``|``).
COUNTERS = ("enqueued", "processed", "failed", "retried", "dead", "cancelled", "throttled")

Arg = Union[str, bytes, int, float]


def _bytes(arg: Arg) -> bytes:
    return arg if isinstance(arg, bytes) else str(arg).encode()


def text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return "" if value is None else str(value)


def integer(value: Any) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return 0


def pairs(flat: Any) -> dict[str, Any]:
    """A flat ``[name, value, ...]`` reply (or a list of pairs) as a dict."""
    if not isinstance(flat, list):
        return {}
    if flat and isinstance(flat[0], tuple):
        return {text(name): value for name, value in flat}
    return {text(flat[i]): flat[i + 1] for i in range(0, len(flat) - 1, 2)}


def run(store: _core.Store, *commands: Iterable[Arg]) -> list[Any]:
    """Runs commands in one pipeline; refused ones come back as errors in place."""
    if not commands:
        return []
    return store.pipeline([[_bytes(arg) for arg in command] for command in commands])


def one(store: _core.Store, *command: Arg) -> Any:
    """Runs one command; a refusal is raised."""
    (reply,) = run(store, command)
    if isinstance(reply, RedisCommandError):
        raise reply
    return reply


def task_fields(fields: dict[str, Any]) -> dict[str, Any]:
    """A task entry's (or dead letter's) fields as text, with counts as ints
    and times as seconds since the epoch; the payload stays JSON text."""
    task: dict[str, Any] = {name: text(value) for name, value in fields.items()}
    for name in ("attempt", "attempts", "max_retry"):
        if name in task:
            task[name] = integer(task[name])
    for name in ("enqueued_at", "failed_at", "deadline"):
        if task.get(name, "").isdigit():
            task[name] = int(task[name]) / 1000
    return task


def delayed_fields(member: Any) -> dict[str, str]:
    """The fields of a delayed-ZSET member (a JSON array of name, value, ...)."""
    with contextlib.suppress(orjson.JSONDecodeError, TypeError, ValueError):
        values = orjson.loads(member)
        if isinstance(values, list):
            return dict(zip(values[::2], values[1::2]))
    return {}


def dead_letters(
    store: _core.Store, prefix: str, queue: str, limit: int
) -> list[tuple[str, dict[str, Any]]]:
    """The newest ``limit`` dead letters of ``queue``, newest first, as
    (dead entry id, ``task_fields``)."""
    dead = _core.key_names(prefix, queue)["dead"]
    reply = one(store, "XREVRANGE", dead, "+", "-", "COUNT", limit)
    return [(text(entry_id), task_fields(pairs(fields))) for entry_id, fields in reply]


def _group_info(groups: Any, group: str) -> dict[str, Any]:
    if not isinstance(groups, list):
        return {}  # no stream yet: XINFO refused
    for info in groups:
        fields = pairs(info)
        if text(fields.get("name")) == group:
            return fields
    return {}


def _counters(reply: Any) -> dict[str, Any]:
    counters: dict[str, Any] = dict.fromkeys(COUNTERS, 0)
    types: dict[str, dict[str, int]] = {}
    for field, value in pairs(reply).items():
        counter, bar, type_ = field.partition("|")
        if not bar:
            counters[counter] = integer(value)
        elif counter in COUNTERS:
            types.setdefault(type_, dict.fromkeys(COUNTERS, 0))[counter] = integer(value)
    counters["types"] = types
    # "dead" in a row is what the dead-letter stream holds now; the counter
    # of tasks ever dead-lettered is "dead_total".
    counters["dead_total"] = counters.pop("dead")
    return counters


def queue_rows(
    store: _core.Store, prefix: str, group: str, names: Sequence[str], oldest: bool = True
) -> list[dict[str, Any]]:
    """Counts of each queue as consumer group ``group`` sees it: ready,
    in_flight, delayed, dead (held now), consumers, paused, processed, failed,
    retried, enqueued, dead_total (ever), skipped, cancelled, throttled (held
    back by a global limit), ``types`` (the counters per
    task type) and, with ``oldest``, oldest_ready_age (seconds, or None).
    One round trip, two with ``oldest``."""
    keys = [_core.key_names(prefix, name) for name in names]
    commands: list[list[Arg]] = [["SMEMBERS", _core.key_names(prefix)["paused"]]]
    for key in keys:
        commands += [
            ["XLEN", key["stream"]],
            ["XINFO", "GROUPS", key["stream"]],
            ["ZCARD", key["delayed"]],
            ["XLEN", key["dead"]],
            ["HGETALL", key["stats"]],
        ]
    paused_reply, *replies = run(store, *commands)
    if isinstance(paused_reply, RedisCommandError):
        raise paused_reply
    paused = {text(name) for name in paused_reply}
    for reply in replies[::5] + replies[2::5] + replies[3::5] + replies[4::5]:
        if isinstance(reply, RedisCommandError):
            raise reply  # only XINFO may be refused (a stream not made yet)
    rows: list[dict[str, Any]] = []
    firsts: list[list[Arg]] = []
    for index, name in enumerate(names):
        length, groups, delayed, dead, counters = replies[index * 5 : index * 5 + 5]
        info = _group_info(groups, group)
        in_flight = integer(info.get("pending"))
        row: dict[str, Any] = {
            "name": name,
            # Done entries are deleted, so the stream holds exactly the
            # undelivered and the pending ones.
            "ready": max(0, integer(length) - in_flight),
            "in_flight": in_flight,
            "delayed": integer(delayed),
            "dead": integer(dead),
            "consumers": integer(info.get("consumers")),
            "paused": name in paused,
        }
        row.update(_counters(counters))
        rows.append(row)
        last = text(info.get("last-delivered-id")) or "0-0"
        firsts.append(["XRANGE", keys[index]["stream"], f"({last}", "+", "COUNT", 1])
    if not oldest:
        return rows
    now_ms = time.time() * 1000
    for row, first in zip(rows, run(store, *firsts)):
        entries = first if isinstance(first, list) else []
        born_ms = integer(text(entries[0][0]).partition("-")[0]) if entries else 0
        row["oldest_ready_age"] = (
            max(0.0, (now_ms - born_ms) / 1000) if entries and row["ready"] else None
        )
    return rows
