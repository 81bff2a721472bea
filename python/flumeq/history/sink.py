"""The history process: moves task-history events from Redis into
PostgreSQL, off the task path.

An engine started with ``history=DSN`` records events in each queue's
events stream (in the outcome transactions, one entry per write). This
process, one per engine and supervised like the metrics process, reads them
through the consumer group ``flumeq-history`` (engines share the work; an
entry is written by one of them), folds each batch into rows, writes them
in one PostgreSQL transaction (``COPY``), and only then acknowledges and
deletes the entries. So:

- PostgreSQL slow or down never slows the queue: events wait in Redis, at
  most ``history_buffer`` per queue; past it the oldest are dropped, counted
  in the queue's stats (``history_dropped``, the metric
  ``flumeq_history_dropped_total``) and logged once per episode;
- a crash between the write and the ack replays the batch, and the replay
  changes nothing (events are keyed, task rows merged);
- entries a dead engine's history process had read are claimed by another
  after ``CLAIM_IDLE_MS``.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Sequence
from typing import Any, Optional

import orjson

from .. import _core, reads
from ..errors import FlumeqError, RedisCommandError
from .database import Database
from .dsn import HistoryUnavailable, masked
from .rows import Fold

__all__ = ["GROUP", "Sink"]

log = logging.getLogger("flumeq.history")

#: The consumer group of the history processes on every events stream.
GROUP = "flumeq-history"
#: Entries read per queue per round (each holds one outcome write's events).
READ_ENTRIES = 50
#: Pause when a round found nothing, seconds: events reach PostgreSQL
#: within about this much (plus the write).
IDLE_WAIT = 0.2
#: Entries another history process read and did not acknowledge for this
#: long are claimed (their process died), ms.
CLAIM_IDLE_MS = 60_000
#: How often drops are looked for (and logged), seconds.
DROP_CHECK_EVERY = 5.0
#: How often old rows are purged (with a retention; and the replay guard's), seconds.
PURGE_EVERY = 600.0
#: The longest wait between two attempts at reaching PostgreSQL, seconds.
LONGEST_BACKOFF = 10.0
#: At a stop, how long writing what is left may take, seconds.
FINAL_DRAIN = 3.0


class Sink:
    """Moves the events of ``queues`` into ``dsn`` until ``stop`` is set."""

    def __init__(
        self,
        url: str,
        dsn: str,
        queues: Sequence[str],
        *,
        prefix: str = "flumeq",
        consumer: str = "history",
        retention_days: Optional[float] = None,
        stop: Optional[threading.Event] = None,
    ) -> None:
        from ..client import Client  # noqa: PLC0415 - the client imports this package

        self.client = Client(url, prefix=prefix, buffer_size=0)
        self.database = Database(dsn)
        self.shown = masked(dsn)
        self.queues = list(queues)
        self.keys = {queue: _core.key_names(prefix, queue) for queue in self.queues}
        self.consumer = consumer
        self.retention_days = retention_days
        self.stop = stop or threading.Event()
        #: Re-read our own pending entries first (at start, after a failure).
        self.own_pending = True
        self.groups_made = False
        #: Since when PostgreSQL fails (monotonic), or None.
        self.outage: Optional[float] = None
        self.failures = 0
        self.last_claim = 0.0
        self.last_purge = 0.0
        self.last_drop_check = 0.0
        self.dropped_seen: Optional[int] = None
        self.dropping = False
        #: Events written and rows merged since start.
        self.written = 0

    # -- Redis --------------------------------------------------------------

    def _store(self) -> Any:
        return self.client._connection()

    def _make_groups(self) -> None:
        commands: list[list[reads.Arg]] = [
            ["XGROUP", "CREATE", keys["events"], GROUP, "0", "MKSTREAM"]
            for keys in self.keys.values()
        ]
        for reply in reads.run(self._store(), *commands):
            if isinstance(reply, RedisCommandError) and "BUSYGROUP" not in str(reply):
                raise reply
        self.groups_made = True

    def _read(self, start: str) -> list[tuple[str, bytes, int, list[Any]]]:
        """Entries of every queue from ``start`` (``>``: new ones, ``0``: our
        pending ones): ``(queue, entry id, event count, events)``."""
        commands: list[list[reads.Arg]] = [
            [
                "XREADGROUP", "GROUP", GROUP, self.consumer, "COUNT", READ_ENTRIES,
                "STREAMS", keys["events"], start,
            ]
            for keys in self.keys.values()
        ]  # fmt: skip
        found: list[tuple[str, bytes, int, list[Any]]] = []
        for queue, reply in zip(self.queues, reads.run(self._store(), *commands)):
            if isinstance(reply, RedisCommandError):
                if "NOGROUP" in str(reply):
                    self.groups_made = False
                    continue
                raise reply
            for _, entries in reply or []:
                found.extend(self._entries(queue, entries))
        return found

    def _claim(self) -> list[tuple[str, bytes, int, list[Any]]]:
        """Entries that a dead history process had read, now ours."""
        found: list[tuple[str, bytes, int, list[Any]]] = []
        commands: list[list[reads.Arg]] = [
            [
                "XAUTOCLAIM", keys["events"], GROUP, self.consumer, CLAIM_IDLE_MS, "0-0",
                "COUNT", READ_ENTRIES,
            ]
            for keys in self.keys.values()
        ]  # fmt: skip
        for queue, reply in zip(self.queues, reads.run(self._store(), *commands)):
            if isinstance(reply, list) and len(reply) > 1:
                found.extend(self._entries(queue, reply[1]))
        return found

    @staticmethod
    def _entries(queue: str, entries: Any) -> list[tuple[str, bytes, int, list[Any]]]:
        found: list[tuple[str, bytes, int, list[Any]]] = []
        for entry_id, fields in entries or []:
            if fields is None:  # trimmed while pending: only the ack is left
                found.append((queue, entry_id, 0, []))
                continue
            values = reads.pairs(fields)
            try:
                count = int(values.get("n", 0))
                events = orjson.loads(values.get("events", "[]"))
            except (ValueError, orjson.JSONDecodeError):
                log.warning(
                    "history: entry %s of queue %s's events stream is not events; skipped",
                    reads.text(entry_id),
                    queue,
                )
                count, events = 0, []
            found.append((queue, entry_id, count, events if isinstance(events, list) else []))
        return found

    def _ack(self, entries: list[tuple[str, bytes, int, list[Any]]]) -> None:
        by_queue: dict[str, list[tuple[str, int]]] = {}
        for queue, entry_id, count, _ in entries:
            by_queue.setdefault(queue, []).append((reads.text(entry_id), count))
        store = self._store()
        for queue, pairs in by_queue.items():
            store.ack_events(queue, GROUP, pairs)

    def _count(self, field: str) -> None:
        commands: list[list[reads.Arg]] = [
            ["HINCRBY", keys["stats"], field, 1] for keys in self.keys.values()
        ]
        reads.run(self._store(), *commands)

    def _dropped(self) -> int:
        commands: list[list[reads.Arg]] = [
            ["HGET", keys["stats"], "history_dropped"] for keys in self.keys.values()
        ]
        replies = reads.run(self._store(), *commands)
        return sum(reads.integer(reply) for reply in replies if not isinstance(reply, Exception))

    # -- the loop -----------------------------------------------------------

    def step(self) -> int:
        """One round: read, write, acknowledge. Returns the events written
        (0 when nothing was waiting)."""
        if not self.groups_made:
            self._make_groups()
        # PostgreSQL first: nothing is read from Redis while it is away (what
        # one process read is out of the others' reach until it is claimed).
        self.database.open()
        now = time.monotonic()
        entries = []
        if self.own_pending:
            entries = self._read("0")
            if not entries:
                self.own_pending = False
        if not entries and now - self.last_claim >= CLAIM_IDLE_MS / 1000 / 2:
            self.last_claim = now
            entries = self._claim()
        # Entries read before (ours after a failure, or a dead process's)
        # may have been written already: those are only acknowledged.
        written_before: set[tuple[str, str]] = set()
        if entries:
            written_before = self.database.written(
                [(queue, reads.text(entry_id)) for queue, entry_id, _, _ in entries]
            )
        else:
            entries = self._read(">")
        if not entries:
            return 0
        fold = Fold()
        new: list[tuple[str, str]] = []
        for queue, entry_id, _, events in entries:
            key = (queue, reads.text(entry_id))
            if key in written_before:
                continue
            new.append(key)
            for event in events:
                fold.add(queue, event)
        self.database.write(fold, new)
        self._ack(entries)
        written = len(fold.events)
        self.written += written
        return written

    def _failed(self, error: BaseException) -> float:
        """Notes a failure to write; returns how long to wait."""
        self.failures += 1
        self.own_pending = True
        if self.outage is None:
            self.outage = time.monotonic()
            log.error(
                "history: %s; events wait in Redis (at most history_buffer per queue) "
                "and are written once it is back",
                error
                if isinstance(error, HistoryUnavailable)
                else f"writing to {self.shown} failed: {error}",
            )
        else:
            log.debug("history: still failing: %s", error)
        with contextlib.suppress(FlumeqError):
            self._count("history_errors")
        return float(min(LONGEST_BACKOFF, 0.5 * 2 ** min(self.failures - 1, 5)))

    def _recovered(self) -> None:
        if self.outage is not None:
            log.info(
                "history: writing to %s again after %.1fs",
                self.shown,
                time.monotonic() - self.outage,
            )
        self.outage = None
        self.failures = 0

    def _check_drops(self, now: float) -> None:
        if now - self.last_drop_check < DROP_CHECK_EVERY:
            return
        self.last_drop_check = now
        total = self._dropped()
        if self.dropped_seen is not None and total > self.dropped_seen:
            if not self.dropping:
                log.warning(
                    "history: the events buffer is full; the oldest events are dropped "
                    "(%d so far, counted in flumeq_history_dropped_total)",
                    total,
                )
            self.dropping = True
        else:
            self.dropping = False
        self.dropped_seen = total

    def _purge(self, now: float) -> None:
        if now - self.last_purge < PURGE_EVERY:
            return
        self.last_purge = now
        deleted = self.database.purge(self.retention_days)
        if deleted:
            log.info(
                "history: purged %d task(s) older than %g day(s)", deleted, self.retention_days
            )

    def run(self) -> None:
        """Moves events until ``stop`` is set, then writes what is left for
        at most ``FINAL_DRAIN`` seconds (when PostgreSQL answers)."""
        log.info("history: writing task events of %s to %s", ", ".join(self.queues), self.shown)
        while not self.stop.is_set():
            wait = self._round()
            if wait:
                self.stop.wait(wait)
        if self.outage is None:
            until = time.monotonic() + FINAL_DRAIN
            while time.monotonic() < until:
                try:
                    if not self.step():
                        break
                except Exception as error:
                    log.debug("history: final write failed: %s", error)
                    break
        self.database.close()
        self.client.close()

    def _round(self) -> float:
        """One round with its error handling; returns how long to wait next."""
        now = time.monotonic()
        try:
            self._check_drops(now)
        except FlumeqError as error:
            log.debug("history: cannot read the drop counts: %s", error)
        try:
            written = self.step()
        except FlumeqError as error:  # Redis away: the client reconnects
            if isinstance(error, HistoryUnavailable):
                return self._failed(error)
            log.warning("history: reading events failed: %s", error)
            return 1.0
        except Exception as error:
            return self._failed(error)
        self._recovered()
        try:
            self._purge(now)
        except Exception as error:
            log.warning("history: purging old rows failed: %s", error)
        return 0.0 if written else IDLE_WAIT
