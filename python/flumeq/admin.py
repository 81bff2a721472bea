"""``Admin``: what the CLI and the dashboard read and change in Redis.

Everything here is for people, not for the task path: reads are pipelined
(one round trip per page or per view) and bounded, so an admin page never
blocks Redis for long. The shared reads (queue counts, dead letters, field
decoding) live in ``reads``, which ``Client`` uses too.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable
from typing import Any, Optional

import orjson

from . import _core, reads
from .client import Client, checked_queue, safe_url
from .cron import entries_in_redis
from .errors import ConfigError, RedisCommandError
from .reads import COUNTERS, integer, pairs, text

__all__ = ["COUNTERS", "Admin"]

#: Most entries one task lookup reads from each stream (ready and dead).
SCAN_LIMIT = 100_000
#: Entries per page while scanning a stream.
PAGE = 1000


def _task(fields: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """A task's fields for people: ``task_fields`` with ``id`` as ``task_id``."""
    task = reads.task_fields(fields)
    if "id" in task:
        task["task_id"] = task.pop("id")
    task.update(extra)
    return task


def _summary(reply: Any, queue: str) -> Optional[dict[str, Any]]:
    """A kept summary of a completed task (``retention``) as a lookup hit:
    times in seconds, ``state`` done (it succeeded), dead or cancelled."""
    if not isinstance(reply, bytes):
        return None
    try:
        summary = orjson.loads(reply)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(summary, dict):
        return None
    hit: dict[str, Any] = {"queue": queue, "completed": True, "task_id": summary.pop("id", "")}
    for name, value in summary.items():
        timed = name.endswith("_at") and isinstance(value, int)
        hit[name] = value / 1000 if timed else value
    if hit.get("state") == "succeeded":
        hit["state"] = "done"
    return hit


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

    def _run(self, *commands: Iterable[reads.Arg]) -> list[Any]:
        return reads.run(self.client._connection(), *commands)

    def _one(self, *command: reads.Arg) -> Any:
        return reads.one(self.client._connection(), *command)

    def _queue_keys(self, queue: str) -> dict[str, str]:
        return _core.key_names(self.prefix, checked_queue(queue))

    def _known(self, queue: str) -> dict[str, str]:
        """The keys of ``queue``; an unknown queue is a ``ConfigError`` naming the known ones."""
        keys = self._queue_keys(queue)
        if not self.has_queue(queue):
            known = ", ".join(self.queues()) or "none yet"
            raise ConfigError(f"unknown queue {queue!r} (known queues: {known})")
        return keys

    # -- queues -----------------------------------------------------------

    def queues(self) -> list[str]:
        """Names of the known queues (any that ever had a task), sorted."""
        return sorted(text(name) for name in self._one("SMEMBERS", self._keys["queues"]))

    def pause(self, queue: str) -> bool:
        """``Client.pause``: no engine starts ``queue``'s tasks until resumed."""
        return self.client.pause(queue)

    def resume(self, queue: str) -> bool:
        """``Client.resume``."""
        return self.client.resume(queue)

    def paused(self) -> list[str]:
        """The paused queues, sorted."""
        return self.client.paused()

    def cancel(self, task_id: str, queue: str = "default") -> bool:
        """``Client.cancel`` (for this admin's consumer group)."""
        return self.client.cancel(task_id, queue, group=self.group)

    def cron_entries(self) -> list[dict[str, Any]]:
        """The cron entries engines carry (see ``flumeq.cron.entries_in_redis``)."""
        return entries_in_redis(self.client)

    def has_queue(self, queue: str) -> bool:
        return bool(self._one("SISMEMBER", self._keys["queues"], queue))

    def overview(self, queues: Optional[Iterable[str]] = None) -> list[dict[str, Any]]:
        """Counts of each queue (all known ones by default; naming an unknown
        one is a ``ConfigError``): see ``reads.queue_rows``."""
        if queues is None:
            names = self.queues()
        else:
            names = list(queues)
            for name in names:
                self._known(name)
        return reads.queue_rows(self.client._connection(), self.prefix, self.group, names)

    def queue(self, name: str, limit: int = 100) -> dict[str, Any]:
        """One queue in detail: its counts (``consumer_count``), the group's
        ``consumers`` with their pending counts and idle times, ``pending``
        entries with idle times, and the next ``delayed_tasks`` (``limit`` each)."""
        key = self._known(name)
        (detail,) = reads.queue_rows(self.client._connection(), self.prefix, self.group, [name])
        consumers, pending, delayed = self._run(
            ["XINFO", "CONSUMERS", key["stream"], self.group],
            ["XPENDING", key["stream"], self.group, "-", "+", limit],
            ["ZRANGE", key["delayed"], 0, limit - 1, "WITHSCORES"],
        )
        detail["consumer_count"] = detail["consumers"]
        detail["consumers"] = [
            {
                "name": text(info.get("name")),
                "pending": integer(info.get("pending")),
                "idle": integer(info.get("idle")) / 1000,
            }
            for info in (pairs(raw) for raw in (consumers if isinstance(consumers, list) else []))
        ]
        rows = pending if isinstance(pending, list) else []
        entries = (
            self._run(*(["XRANGE", key["stream"], row[0], row[0]] for row in rows)) if rows else []
        )
        detail["pending"] = []
        for row, entry in zip(rows, entries):
            fields = pairs(entry[0][1]) if isinstance(entry, list) and entry else {}
            detail["pending"].append(
                {
                    "entry_id": text(row[0]),
                    "task_id": text(fields.get("id")),
                    "type": text(fields.get("type")),
                    "consumer": text(row[1]),
                    "idle": integer(row[2]) / 1000,
                    "deliveries": integer(row[3]),
                }
            )
        detail["delayed_tasks"] = []
        flat = delayed if isinstance(delayed, list) else []
        for member, score in zip(flat[::2], flat[1::2]):
            fields = reads.delayed_fields(member)
            detail["delayed_tasks"].append(
                {
                    "due": float(text(score)) / 1000,
                    "task_id": fields.get("id", ""),
                    "type": fields.get("type", ""),
                    "attempt": integer(fields.get("attempt")),
                    "error": fields.get("error", ""),
                }
            )
        return detail

    # -- dead letters -----------------------------------------------------

    def dead_letters(self, queue: str, limit: int = 100) -> list[dict[str, Any]]:
        """The newest dead letters, newest first; the payload stays JSON text."""
        self._known(queue)
        return [
            _task(fields, entry_id=entry_id)
            for entry_id, fields in reads.dead_letters(
                self.client._connection(), self.prefix, queue, limit
            )
        ]

    def dead_letters_by_id(
        self, queue: str, task_ids: Iterable[str], scan_limit: int = SCAN_LIMIT
    ) -> list[dict[str, Any]]:
        """The dead letters of these task ids, oldest first (scanned in pages)."""
        key = self._known(queue)
        return [
            _task(fields, entry_id=entry_id)
            for entry_id, fields in self._scan(key["dead"], set(task_ids), scan_limit)
        ]

    def requeue_dead(self, queue: str, ids: Optional[Iterable[str]] = None) -> int:
        """Moves dead letters (all, or these task ids) back to the stream."""
        self._known(queue)
        return self.client.requeue_dead(queue, ids)

    def purge_dead(self, queue: str) -> int:
        """Deletes every dead letter of ``queue``; returns how many there were."""
        self._known(queue)
        return self.client.purge_dead(queue)

    # -- tasks ------------------------------------------------------------

    def find_task(self, task_id: str, scan_limit: int = SCAN_LIMIT) -> list[dict[str, Any]]:
        """Where task ``task_id`` is: each hit has ``queue``, ``state`` (ready,
        in_flight, delayed, dead, done or cancelled) and the task's fields.
        A task enqueued with a ``retention`` that ended is found by its kept
        summary (``completed`` is true, with ``result`` or ``reason`` and
        ``error``, ``started_at``, ``finished_at``, ``worker``): the queue's
        streams are not scanned for it. Other done tasks are deleted from
        Redis, so only those enqueued with a custom id leave a trace (their
        done marker, for ``processed_ttl``). Streams are scanned in pages,
        at most ``scan_limit`` entries each."""
        found: list[dict[str, Any]] = []
        for queue in self.queues():
            key = self._queue_keys(queue)
            pattern = '*"id","' + "".join(f"\\{c}" if c in "*?[]\\" else c for c in task_id) + '"*'
            done, summary, expires, delayed = self._run(
                ["EXISTS", key["done"] + task_id],
                ["HGET", key["completed"], task_id],
                ["ZSCORE", key["completed_expiry"], task_id],
                ["ZSCAN", key["delayed"], 0, "MATCH", pattern, "COUNT", 1000],
            )
            # Expired summaries go at the queue's next write of summaries.
            if isinstance(expires, bytes):
                expires = float(text(expires))
            live = isinstance(expires, (int, float)) and expires > time.time() * 1000
            kept = _summary(summary, queue) if live else None
            if kept is not None and kept["state"] != "dead":
                found.append(kept)
                continue
            if integer(done):
                found.append({"queue": queue, "state": "done", "task_id": task_id})
            for hit in self._zscan_all(key["delayed"], pattern, delayed):
                found.append({**hit, "queue": queue, "state": "delayed"})
            for entry_id, fields in self._scan(key["stream"], {task_id}, scan_limit):
                # No group yet (no engine ever served the queue): nothing pending.
                (pending,) = self._run(
                    ["XPENDING", key["stream"], self.group, entry_id, entry_id, 1]
                )
                state = "in_flight" if isinstance(pending, list) and pending else "ready"
                found.append(_task(fields, queue=queue, state=state, entry_id=entry_id))
            letters = [
                _task(fields, queue=queue, state="dead", entry_id=entry_id)
                for entry_id, fields in self._scan(key["dead"], {task_id}, scan_limit)
            ]
            if kept is not None and not letters:
                letters = [kept]  # its dead letter was requeued or purged since
            found.extend(letters)
        return found

    def _zscan_all(self, key: str, pattern: str, first: Any) -> list[dict[str, Any]]:
        hits: list[dict[str, Any]] = []
        reply = first
        while isinstance(reply, list) and len(reply) == 2:
            cursor, flat = reply
            for member, score in zip(flat[::2], flat[1::2]):
                fields = reads.delayed_fields(member)
                if fields:
                    hits.append(_task(fields, due=float(text(score)) / 1000))
            if text(cursor) == "0":
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
                values = pairs(fields)
                if values.get("id") in wanted:
                    hits.append((text(entry_id), values))
            seen += len(page)
            if len(page) < PAGE:
                break
            start = "(" + text(page[-1][0])
        return hits

    # -- workers ----------------------------------------------------------

    def workers(self) -> list[dict[str, Any]]:
        """Live engines, from their heartbeats; dead ones are dropped."""
        consumers = [text(name) for name in self._one("ZRANGE", self._keys["workers"], 0, -1)]
        if not consumers:
            return []
        replies = self._run(*(["HGETALL", self._keys["worker"] + name] for name in consumers))
        workers, gone = [], []
        for name, reply in zip(consumers, replies):
            fields = {key: text(value) for key, value in pairs(reply).items()}
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
                worker[counter] = integer(fields.get(counter))
            for stamp in ("started", "heartbeat"):
                worker[stamp] = integer(fields.get(stamp)) / 1000
            workers.append(worker)
        if gone:
            # Their hash expired: the engine stopped without a goodbye.
            self._run(["ZREM", self._keys["workers"], *gone])
        return sorted(workers, key=lambda worker: worker["consumer"])

    # -- durations --------------------------------------------------------

    def durations(self, queues: Iterable[str]) -> dict[str, dict[str, dict[str, Any]]]:
        """Handler run times of each queue per task type, in one round trip:
        ``{queue: {type: {"sum": seconds, "buckets": {index: runs}}}}``, the
        buckets those of ``flumeq.metrics.DURATION_BUCKETS`` (not cumulative)."""
        names = list(queues)
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
        for field, value in pairs(reply).items():
            type_, _, slot = field.rpartition("|")
            if not type_ or not (slot == "sum" or slot.isdigit()):
                continue  # not ours: written by hand
            entry = per_type.setdefault(type_, {"sum": 0.0, "buckets": {}})
            if slot == "sum":
                with contextlib.suppress(ValueError):
                    entry["sum"] = float(text(value))
            else:
                entry["buckets"][int(slot)] = integer(value)
        return per_type

    def close(self) -> None:
        self.client.close()

    def __enter__(self) -> Admin:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()
