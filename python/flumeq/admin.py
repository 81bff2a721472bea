"""``Admin``: what the CLI and the dashboard read and change in Redis.

Everything here is for people, not for the task path: reads are pipelined
(one round trip per page or per view) and bounded, so an admin page never
blocks Redis for long. Key names come from the Rust core (``key_names``), so
they are spelled in one place.

Stats hash fields: ``processed``, ``failed``, ``retried``, ``dead``,
``skipped`` and ``enqueued`` per queue, and ``<counter>|<type>`` per task type
(types may contain ``:``; counter names never contain ``|``).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable
from typing import Any, Optional, Union

import orjson

from . import _core
from .client import Client, safe_url
from .errors import ConfigError, RedisCommandError

__all__ = ["Admin", "COUNTERS"]

#: Counters kept per queue and per task type in the stats hash.
COUNTERS = ("enqueued", "processed", "failed", "retried", "dead")

#: Most entries one task lookup reads from each stream (ready and dead).
SCAN_LIMIT = 100_000
#: Entries per page while scanning a stream.
PAGE = 1000

Arg = Union[str, bytes, int, float]


def _bytes(arg: Arg) -> bytes:
    if isinstance(arg, bytes):
        return arg
    return str(arg).encode()


def _text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return "" if value is None else str(value)


def _int(value: Any) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return 0


def _pairs(flat: Any) -> dict[str, Any]:
    """A flat ``[name, value, ...]`` reply (or a list of pairs) as a dict."""
    if not isinstance(flat, list):
        return {}
    if flat and isinstance(flat[0], tuple):
        return {_text(name): value for name, value in flat}
    return {_text(flat[i]): flat[i + 1] for i in range(0, len(flat) - 1, 2)}


def _entry_ms(entry_id: str) -> int:
    return _int(entry_id.partition("-")[0])


def _task_fields(fields: dict[str, Any]) -> dict[str, Any]:
    """A stream entry's fields, decoded for display (payload stays JSON text)."""
    task: dict[str, Any] = {name: _text(value) for name, value in fields.items()}
    for name in ("attempt", "attempts", "max_retry"):
        if name in task:
            task[name] = _int(task[name])
    for name in ("enqueued_at", "failed_at", "deadline"):
        if task.get(name, "").isdigit():
            task[name] = int(task[name]) / 1000
    if "id" in task:
        task["task_id"] = task.pop("id")
    return task


class Admin:
    """Inspects and manages flumeq's queues, dead letters and workers."""

    def __init__(
        self,
        url: Optional[str] = None,
        *,
        prefix: str = "flumeq",
        group: str = "flumeq",
        timeout: float = 5.0,
    ) -> None:
        self.client = Client(url, prefix=prefix, timeout=timeout, buffer_size=0)
        self.url = self.client.url
        self.url_for_display = safe_url(self.url)
        self.prefix = prefix
        self.group = group
        self._keys = _core.key_names(prefix)

    # -- plumbing ---------------------------------------------------------

    def _run(self, *commands: Iterable[Arg]) -> list[Any]:
        """Runs commands in one pipeline; refused ones come back as errors."""
        if not commands:
            return []
        return self.client._store.pipeline(
            [[_bytes(arg) for arg in command] for command in commands]
        )

    def _one(self, *command: Arg) -> Any:
        (reply,) = self._run(command)
        if isinstance(reply, RedisCommandError):
            raise reply
        return reply

    def _queue_keys(self, queue: str) -> dict[str, str]:
        problem = _core.queue_problem(queue)
        if problem:
            raise ConfigError(problem)
        return _core.key_names(self.prefix, queue)

    # -- queues -----------------------------------------------------------

    def queues(self) -> list[str]:
        """Names of the known queues (any that ever had a task), sorted."""
        return sorted(_text(name) for name in self._one("SMEMBERS", self._keys["queues"]))

    def has_queue(self, queue: str) -> bool:
        return bool(self._one("SISMEMBER", self._keys["queues"], queue))

    def overview(self, queues: Optional[Iterable[str]] = None) -> list[dict[str, Any]]:
        """Counts of each queue: ready, in_flight, delayed, dead (held now),
        processed, failed, retried, enqueued, dead_total (ever), skipped,
        oldest_ready_age (seconds, or None), and ``types``: the counters per
        task type (enqueued, processed, failed, retried, dead)."""
        names = list(queues) if queues is not None else self.queues()
        if not names:
            return []
        keys = [self._queue_keys(name) for name in names]
        commands: list[list[Arg]] = []
        for key in keys:
            commands += [
                ["XLEN", key["stream"]],
                ["XINFO", "GROUPS", key["stream"]],
                ["ZCARD", key["delayed"]],
                ["XLEN", key["dead"]],
                ["HGETALL", key["stats"]],
            ]
        replies = self._run(*commands)
        rows: list[dict[str, Any]] = []
        firsts: list[list[Arg]] = []
        for index, name in enumerate(names):
            length, groups, delayed, dead, counters = replies[index * 5 : index * 5 + 5]
            group = self._group_info(groups)
            in_flight = _int(group.get("pending"))
            row: dict[str, Any] = {
                "name": name,
                "ready": max(0, _int(length) - in_flight),
                "in_flight": in_flight,
                "delayed": _int(delayed),
                "dead": _int(dead),
                "consumers": _int(group.get("consumers")),
            }
            totals = self._counters(counters)
            # "dead" above is what the dead-letter stream holds now; the
            # counter of tasks ever dead-lettered is "dead_total".
            totals["dead_total"] = totals.pop("dead")
            row.update(totals)
            rows.append(row)
            last = _text(group.get("last-delivered-id")) or "0-0"
            firsts.append(["XRANGE", keys[index]["stream"], f"({last}", "+", "COUNT", 1])
        now_ms = time.time() * 1000
        for row, first in zip(rows, self._run(*firsts)):
            entries = first if isinstance(first, list) else []
            row["oldest_ready_age"] = (
                max(0.0, (now_ms - _entry_ms(_text(entries[0][0]))) / 1000)
                if entries and row["ready"]
                else None
            )
        return rows

    def _group_info(self, groups: Any) -> dict[str, Any]:
        if not isinstance(groups, list):
            return {}
        for info in groups:
            fields = _pairs(info)
            if _text(fields.get("name")) == self.group:
                return fields
        return {}

    @staticmethod
    def _counters(reply: Any) -> dict[str, Any]:
        counters: dict[str, Any] = dict.fromkeys(COUNTERS, 0)
        types: dict[str, dict[str, int]] = {}
        for field, value in _pairs(reply).items():
            counter, bar, type_ = field.partition("|")
            if not bar:
                counters[counter] = _int(value)
            elif counter in COUNTERS:
                types.setdefault(type_, dict.fromkeys(COUNTERS, 0))[counter] = _int(value)
        counters["types"] = types
        return counters

    def queue(self, name: str, limit: int = 100) -> dict[str, Any]:
        """One queue in detail: its counts, the group's consumers, pending
        entries with idle times, and the next delayed tasks (``limit`` each)."""
        if not self.has_queue(name):
            raise ConfigError(
                f"unknown queue {name!r} (known: {', '.join(self.queues()) or 'none'})"
            )
        key = self._queue_keys(name)
        (detail,) = self.overview([name])
        consumers, pending, delayed = self._run(
            ["XINFO", "CONSUMERS", key["stream"], self.group],
            ["XPENDING", key["stream"], self.group, "-", "+", limit],
            ["ZRANGE", key["delayed"], 0, limit - 1, "WITHSCORES"],
        )
        detail["consumers_detail"] = [
            {
                "name": _text(info.get("name")),
                "pending": _int(info.get("pending")),
                "idle": _int(info.get("idle")) / 1000,
            }
            for info in (_pairs(raw) for raw in (consumers if isinstance(consumers, list) else []))
        ]
        rows = pending if isinstance(pending, list) else []
        entries = (
            self._run(*(["XRANGE", key["stream"], row[0], row[0]] for row in rows)) if rows else []
        )
        detail["pending"] = []
        for row, entry in zip(rows, entries):
            fields = _pairs(entry[0][1]) if isinstance(entry, list) and entry else {}
            detail["pending"].append(
                {
                    "entry_id": _text(row[0]),
                    "task_id": _text(fields.get("id")),
                    "type": _text(fields.get("type")),
                    "consumer": _text(row[1]),
                    "idle": _int(row[2]) / 1000,
                    "deliveries": _int(row[3]),
                }
            )
        detail["delayed_tasks"] = []
        flat = delayed if isinstance(delayed, list) else []
        for member, score in zip(flat[::2], flat[1::2]):
            fields = {}
            with contextlib.suppress(orjson.JSONDecodeError):
                values = orjson.loads(member)
                fields = dict(zip(values[::2], values[1::2]))
            detail["delayed_tasks"].append(
                {
                    "due": float(_text(score)) / 1000,
                    "task_id": fields.get("id", ""),
                    "type": fields.get("type", ""),
                    "attempt": _int(fields.get("attempt")),
                    "error": fields.get("error", ""),
                }
            )
        return detail

    # -- dead letters -----------------------------------------------------

    def dead_letters(self, queue: str, limit: int = 100) -> list[dict[str, Any]]:
        """The newest dead letters, newest first; the payload stays JSON text."""
        key = self._queue_keys(queue)
        reply = self._one("XREVRANGE", key["dead"], "+", "-", "COUNT", limit)
        letters = []
        for entry_id, fields in reply:
            letter = _task_fields(_pairs(fields))
            letter["entry_id"] = _text(entry_id)
            letters.append(letter)
        return letters

    def dead_letters_by_id(
        self, queue: str, task_ids: Iterable[str], scan_limit: int = SCAN_LIMIT
    ) -> list[dict[str, Any]]:
        """The dead letters of these task ids, oldest first (scanned in pages)."""
        key = self._queue_keys(queue)
        letters = []
        for entry_id, fields in self._scan(key["dead"], set(task_ids), scan_limit):
            letter = _task_fields(fields)
            letter["entry_id"] = entry_id
            letters.append(letter)
        return letters

    def requeue_dead(self, queue: str, ids: Optional[Iterable[str]] = None) -> int:
        """Moves dead letters (all, or these task ids) back to the stream."""
        return self.client.requeue_dead(queue, ids)

    def purge_dead(self, queue: str) -> int:
        """Deletes every dead letter of ``queue``; returns how many there were."""
        return self.client.purge_dead(queue)

    # -- tasks ------------------------------------------------------------

    def find_task(self, task_id: str, scan_limit: int = SCAN_LIMIT) -> list[dict[str, Any]]:
        """Where task ``task_id`` is: each hit has ``queue``, ``state`` (ready,
        in_flight, delayed, dead or done) and the task's fields. Done tasks
        are deleted from Redis, so only those enqueued with a custom id leave
        a trace (their done marker, for ``processed_ttl``). Streams are
        scanned in pages, at most ``scan_limit`` entries each."""
        found: list[dict[str, Any]] = []
        for queue in self.queues():
            key = self._queue_keys(queue)
            pattern = '*"id","' + "".join(f"\\{c}" if c in "*?[]\\" else c for c in task_id) + '"*'
            done, delayed = self._run(
                ["EXISTS", key["done"] + task_id],
                ["ZSCAN", key["delayed"], 0, "MATCH", pattern, "COUNT", 1000],
            )
            if _int(done):
                found.append({"queue": queue, "state": "done", "task_id": task_id})
            for hit in self._zscan_all(key["delayed"], pattern, delayed):
                found.append({"queue": queue, "state": "delayed", **hit})
            for entry_id, fields in self._scan(key["stream"], {task_id}, scan_limit):
                # No group yet (no engine ever served the queue): nothing pending.
                (pending,) = self._run(
                    ["XPENDING", key["stream"], self.group, entry_id, entry_id, 1]
                )
                pending = pending if isinstance(pending, list) else []
                task = _task_fields(fields)
                task["entry_id"] = entry_id
                state = "in_flight" if pending else "ready"
                found.append({"queue": queue, "state": state, **task})
            for entry_id, fields in self._scan(key["dead"], {task_id}, scan_limit):
                task = _task_fields(fields)
                task["entry_id"] = entry_id
                found.append({"queue": queue, "state": "dead", **task})
        return found

    def _zscan_all(self, key: str, pattern: str, first: Any) -> list[dict[str, Any]]:
        hits: list[dict[str, Any]] = []
        reply = first
        while isinstance(reply, list) and len(reply) == 2:
            cursor, flat = reply
            for member, score in zip(flat[::2], flat[1::2]):
                with contextlib.suppress(orjson.JSONDecodeError, TypeError):
                    values = orjson.loads(member)
                    task = _task_fields(dict(zip(values[::2], values[1::2])))
                    task["due"] = float(_text(score)) / 1000
                    hits.append(task)
            if _text(cursor) == "0":
                break
            reply = self._one("ZSCAN", key, cursor, "MATCH", pattern, "COUNT", 1000)
        return hits

    def _scan(
        self, stream: str, task_ids: set[str], limit: int
    ) -> list[tuple[str, dict[str, Any]]]:
        hits = []
        start = "-"
        seen = 0
        wanted = {task_id.encode() for task_id in task_ids}
        while seen < limit:
            page = self._one("XRANGE", stream, start, "+", "COUNT", PAGE)
            if not page:
                break
            for entry_id, fields in page:
                values = _pairs(fields)
                if values.get("id") in wanted:
                    hits.append((_text(entry_id), values))
            seen += len(page)
            if len(page) < PAGE:
                break
            start = "(" + _text(page[-1][0])
        return hits

    # -- workers ----------------------------------------------------------

    def workers(self) -> list[dict[str, Any]]:
        """Live engines, from their heartbeats; dead ones are dropped."""
        consumers = [_text(name) for name in self._one("ZRANGE", self._keys["workers"], 0, -1)]
        if not consumers:
            return []
        replies = self._run(*(["HGETALL", self._keys["worker"] + name] for name in consumers))
        workers, gone = [], []
        for name, reply in zip(consumers, replies):
            fields = {key: _text(value) for key, value in _pairs(reply).items()}
            if not fields:
                gone.append(name)
                continue
            worker: dict[str, Any] = dict(fields)
            worker["consumer"] = name
            with contextlib.suppress(orjson.JSONDecodeError):
                worker["queues"] = orjson.loads(fields.get("queues", "[]"))
            for counter in (
                "pid",
                "processes",
                "processed",
                "failed",
                "retried",
                "dead",
                "restarts",
                "in_flight",
            ):
                worker[counter] = _int(fields.get(counter))
            for stamp in ("started", "heartbeat"):
                worker[stamp] = _int(fields.get(stamp)) / 1000
            workers.append(worker)
        if gone:
            # Their hash expired: the engine stopped without a goodbye.
            self._run(["ZREM", self._keys["workers"], *gone])
        return sorted(workers, key=lambda worker: worker["consumer"])

    # -- durations --------------------------------------------------------

    def durations(self, queue: str) -> dict[str, dict[str, Any]]:
        """Handler run times of ``queue`` per task type: ``sum`` (seconds) and
        ``buckets`` (counts per bucket of ``flumeq.metrics.DURATION_BUCKETS``,
        not cumulative)."""
        return self.durations_of([queue])[queue]

    def durations_of(self, queues: Iterable[str]) -> dict[str, dict[str, dict[str, Any]]]:
        """``durations`` of several queues, in one round trip."""
        names = list(queues)
        if not names:
            return {}
        replies = self._run(*(["HGETALL", self._queue_keys(name)["durations"]] for name in names))
        out = {}
        for name, reply in zip(names, replies):
            if isinstance(reply, RedisCommandError):
                raise reply
            out[name] = self._histograms(reply)
        return out

    @staticmethod
    def _histograms(reply: Any) -> dict[str, dict[str, Any]]:
        per_type: dict[str, dict[str, Any]] = {}
        for field, value in _pairs(reply).items():
            type_, _, slot = field.rpartition("|")
            if not type_ or not (slot == "sum" or slot.isdigit()):
                continue  # not ours: written by hand
            entry = per_type.setdefault(type_, {"sum": 0.0, "buckets": {}})
            if slot == "sum":
                with contextlib.suppress(ValueError):
                    entry["sum"] = float(_text(value))
            else:
                entry["buckets"][int(slot)] = _int(value)
        return per_type

    def close(self) -> None:
        self.client.close()

    def __enter__(self) -> Admin:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()
