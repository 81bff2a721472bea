"""Cron: tasks enqueued on a schedule, each tick once however many engines
carry the entry.

``Cron("*/5 * * * *", "report:build", {...}, tz="Europe/Berlin")`` (a cron
expression, parsed by croniter) or ``Cron(10.0, "cache:warm")`` (every 10
seconds, on multiples of 10 s since the epoch, so every engine agrees on
the ticks). ``Engine(cron=[...])`` and ``@app.cron(...)`` carry entries.

How a tick goes in once:

- Each entry has a scheduler lease, ``<prefix>:{cron}:lease:<name>`` (3 s,
  renewed every second, all leases in one script). The engine holding it
  enqueues the entry's ticks; when it dies, another engine carrying the
  entry takes the lease within about 4 s.
- The tick is appended by one script that also keeps the entry's last tick
  in ``<prefix>:{<queue>}:cron``: a tick at or before the last one is never
  appended, so two schedulers that overlap (a paused one waking up after
  its lease passed) cannot append a tick twice.
- The task id is derived from the entry's name and the tick's time
  (``cron:<name>:<UTC time>``).
- After an outage (no engine alive, Redis away, a takeover) only the latest
  missed tick is enqueued; a holder that was merely late (up to
  ``CATCH_UP`` ticks) enqueues each tick it missed. A new entry starts with
  the next tick, not a past one.

Time zones follow ``tz`` (zoneinfo; UTC by default). On the spring change a
time that does not exist that day runs at the first time after the gap
(croniter's way: a daily 02:30 in Europe/Berlin runs at 03:00); on the
autumn change a time already ticked is not ticked again in the repeated
hour (as cron does): a daily 02:30 runs once, and an every-30-minutes entry
skips the repeated 02:00 and 02:30.

The schedulers run in a child process of each engine (``scheduler_main``),
replaced by the supervisor if it dies; ``flumeq cron`` lists the entries.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import socket
import time
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime, timezone
from types import FrameType
from typing import Any, Optional, Union

import orjson

from . import _core, hooks, reads
from .client import (
    DEFAULT_MAX_RETRY,
    DEFAULT_TIMEOUT,
    Client,
    Seconds,
    _Call,
    checked_queue,
    prepare_one,
)
from .errors import ConfigError, FlumeqError, InvalidTask, RedisUnavailable

__all__ = ["Cron", "entries_in_redis", "scheduler_main"]

log = logging.getLogger("flumeq.cron")

#: How long a scheduler lease lasts without renewal, and how often it is
#: renewed (or a free one looked for): the takeover after a holder's death
#: is at most about their sum.
LEASE = 3.0
RENEW = 1.0
#: Ticks a holder that was late (a slow host, a long pause of the process)
#: still enqueues one by one; later ones than that collapse to the latest.
CATCH_UP = 10
#: Longest wait between two looks at Redis when Redis is away.
LONGEST_WAIT = 5.0


def _zone(name: str, where: str) -> Any:
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError  # noqa: PLC0415

    if not isinstance(name, str) or not name:
        raise ConfigError(f"{where}: tz must be a time zone name, got {name!r}")
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError) as error:
        raise ConfigError(f"{where}: unknown time zone {name!r} ({error})") from None


class Cron:
    """One cron entry: enqueue ``type`` with ``payload`` on ``schedule``.

    ``schedule`` is a cron expression (five fields; a sixth, seconds, as
    croniter reads it) or a number of seconds. ``name``
    (default: the type) identifies the entry across engines and deploys;
    two entries of one engine need different names. ``tz`` applies to cron
    expressions. The enqueue options are ``Client.enqueue``'s: ``queue``,
    ``max_retry``, ``timeout``, ``labels``, ``result_ttl``, ``retention``.
    """

    def __init__(
        self,
        schedule: Union[str, float],
        type: str,
        payload: Any = None,
        *,
        name: Optional[str] = None,
        queue: str = "default",
        tz: Optional[str] = None,
        max_retry: int = DEFAULT_MAX_RETRY,
        timeout: Optional[Seconds] = DEFAULT_TIMEOUT,
        labels: Optional[Mapping[str, str]] = None,
        result_ttl: Optional[Seconds] = None,
        retention: Optional[Seconds] = None,
    ) -> None:
        if not isinstance(type, str) or not type:
            raise ConfigError(f"cron entry: type must be a task type string, got {type!r}")
        if name is None:
            name = type
        if not isinstance(name, str) or not name.strip() or len(name) > 200:
            raise ConfigError(f"cron entry for {type!r}: name must be a short string, got {name!r}")
        self.name = name
        where = f"cron entry {name!r}"
        self.type = type
        self.payload = payload
        self.queue = queue
        self.tz = "UTC" if tz is None else tz
        self._zone = _zone(self.tz, where)
        self.expression: Optional[str] = None
        self.interval_ms = 0
        if isinstance(schedule, str):
            from croniter import croniter  # noqa: PLC0415

            try:
                croniter(schedule, datetime.now(self._zone))
            except (ValueError, KeyError, TypeError) as error:
                raise ConfigError(f"{where}: bad cron expression {schedule!r} ({error})") from None
            self.expression = schedule
        elif (
            isinstance(schedule, (int, float))
            and not isinstance(schedule, bool)
            and math.isfinite(schedule)
            and round(schedule * 1000) >= 1
        ):
            if tz is not None:
                raise ConfigError(f"{where}: tz applies to cron expressions, not intervals")
            self.interval_ms = round(schedule * 1000)
        else:
            raise ConfigError(
                f"{where}: schedule must be a cron expression or seconds > 0, got {schedule!r}"
            )
        self.schedule = schedule
        self._options: dict[str, Any] = {
            "queue": queue,
            "max_retry": max_retry,
            "timeout": timeout,
            "labels": labels,
            "result_ttl": result_ttl,
            "retention": retention,
        }
        #: The tick's enqueue when no hook runs (made once).
        self._plain: Optional[_Call] = None
        try:
            checked_queue(queue)
            # Checked now; the hooks run at each tick, as for any enqueue.
            self._plain = self.call((), run_hooks=False)
        except (InvalidTask, ConfigError) as error:
            raise ConfigError(f"{where}: {error}") from None

    def call(self, middleware: Sequence[Any], run_hooks: bool = True) -> _Call:
        """The enqueue of one tick, after the ``before_enqueue`` hooks of
        ``middleware`` (and the process's global ones)."""
        if self._plain is not None and not (run_hooks and (middleware or hooks.GLOBAL)):
            return self._plain
        call, _ = prepare_one(
            self.type,
            self.payload,
            delay=None,
            at=None,
            deadline=None,
            unique_key=None,
            unique_ttl=3600.0,
            task_id=None,
            unknown={},
            middleware=middleware,
            run_hooks=run_hooks,
            **self._options,
        )
        return call

    # -- ticks ----------------------------------------------------------------

    def latest(self, now: float) -> int:
        """The latest tick (ms since the epoch) at or before ``now`` (s)."""
        now_ms = math.floor(now * 1000)
        if self.interval_ms:
            return now_ms // self.interval_ms * self.interval_ms
        from croniter import croniter  # noqa: PLC0415

        # A moment after now, so that a tick at now itself counts.
        it = croniter(self.expression or "", datetime.fromtimestamp(now + 0.0005, self._zone))
        while True:
            tick: datetime = it.get_prev(datetime)
            if not self._repeated(tick):
                return round(tick.timestamp() * 1000)

    def next_after(self, tick_ms: int) -> int:
        """The first tick (ms) after ``tick_ms``."""
        if self.interval_ms:
            return (tick_ms // self.interval_ms + 1) * self.interval_ms
        from croniter import croniter  # noqa: PLC0415

        it = croniter(self.expression or "", datetime.fromtimestamp(tick_ms / 1000, self._zone))
        while True:
            tick: datetime = it.get_next(datetime)
            if not self._repeated(tick):
                return round(tick.timestamp() * 1000)

    def _repeated(self, tick: datetime) -> bool:
        """Whether ``tick`` is the second time its wall-clock time occurs
        (the autumn change's repeated hour): cron ticks a time once."""
        first = tick.replace(tzinfo=None, fold=0).replace(tzinfo=self._zone)
        return first.utcoffset() != tick.utcoffset()

    def task_id(self, tick_ms: int) -> str:
        """The id of the task of the tick at ``tick_ms``."""
        at = datetime.fromtimestamp(tick_ms / 1000, timezone.utc)
        text = at.strftime("%Y-%m-%dT%H:%M:%S")
        if tick_ms % 1000:
            text += f".{tick_ms % 1000:03d}"
        return f"cron:{self.name}:{text}Z"

    def describe(self) -> dict[str, Any]:
        """The entry as ``flumeq cron`` shows it."""
        return {
            "name": self.name,
            "schedule": self.schedule,
            "tz": self.tz if self.expression else None,
            "type": self.type,
            "queue": self.queue,
        }

    def __repr__(self) -> str:
        return f"Cron({self.schedule!r}, {self.type!r}, name={self.name!r}, queue={self.queue!r})"


def checked_entries(entries: Iterable[Any]) -> list[Cron]:
    """``entries`` as a list of ``Cron``; ``ConfigError`` for anything else
    and for two entries of one name."""
    checked: list[Cron] = []
    names: set[str] = set()
    for entry in entries:
        if not isinstance(entry, Cron):
            raise ConfigError(f"cron entries must be flumeq.Cron objects, got {entry!r}")
        if entry.name in names:
            raise ConfigError(f"two cron entries are named {entry.name!r}; give one a name=")
        names.add(entry.name)
        checked.append(entry)
    return checked


# -- the scheduler ---------------------------------------------------------------


def _tick(stored: Any) -> Optional[int]:
    """A stored last tick (ms), or ``None`` when absent or not a number."""
    try:
        return int(stored) if isinstance(stored, bytes) else None
    except ValueError:
        return None


class _Stop(Exception):
    """SIGTERM: let the leases go and exit."""


class Scheduler:
    """Enqueues the ticks of the entries whose leases it holds."""

    def __init__(
        self,
        client: Client,
        entries: Sequence[Cron],
        holder: str,
        middleware: Sequence[Any] = (),
    ) -> None:
        self.client = client
        #: Whose ``before_enqueue`` hooks run on each tick (the engine's).
        self.middleware = middleware
        self.entries = list(entries)
        self.holder = holder
        self.keys = _core.key_names(client.prefix)
        #: Per entry it holds: the last tick enqueued (or, for an entry
        #: never ticked, the tick it started after), in ms.
        self.last: dict[str, int] = {}
        self.registered = False

    def step(self, now: float) -> float:
        """One look: renews or takes the leases, enqueues due ticks.
        Returns the seconds until the next look."""
        store = self.client._connection()
        names = [entry.name for entry in self.entries]
        if not self.registered:
            described = [orjson.dumps(entry.describe()) for entry in self.entries]
            pairs = [arg for name, text in zip(names, described) for arg in (name, text)]
            reads.one(store, "HSET", self.keys["cron_entries"], *pairs)
            self.registered = True
        held = store.cron_leases(names, self.holder, round(LEASE * 1000))
        wait = RENEW
        for entry, mine in zip(self.entries, held):
            if not mine:
                self.last.pop(entry.name, None)  # read again once it is ours
                continue
            taken_now = entry.name not in self.last
            if taken_now:
                stored = reads.one(
                    store,
                    "HGET",
                    _core.key_names(self.client.prefix, entry.queue)["cron"],
                    entry.name,
                )
                self.last[entry.name] = _tick(stored) or entry.latest(now)
                log.info("cron entry %r: this engine holds its lease", entry.name)
            due = entry.latest(now)
            last = self.last[entry.name]
            if due > last:
                # Held all along (this process was only late): every tick
                # since the last, up to CATCH_UP. Just taken (an outage, a
                # takeover): the latest only.
                ticks = [due]
                if not taken_now:
                    ticks = []
                    at = entry.next_after(last)
                    while at <= due and len(ticks) < CATCH_UP:
                        ticks.append(at)
                        at = entry.next_after(at)
                    if ticks[-1] != due:
                        ticks = [due]
                for tick in ticks:
                    self._enqueue(entry, tick)
                self.last[entry.name] = due
            wait = min(wait, max(0.0, entry.next_after(due) / 1000 - now))
        return wait

    def _enqueue(self, entry: Cron, tick_ms: int) -> None:
        call = entry.call(self.middleware)
        task_id = entry.task_id(tick_ms)
        type_, body, _, _ = call.items[0]
        appended = self.client._connection().enqueue(
            call.queue,
            [(type_, body, task_id, True)],
            call.max_retry,
            call.timeout_ms,
            labels=call.labels,
            result_ttl_ms=call.result_ttl_ms,
            tick=(entry.name, tick_ms),
            retention_ms=call.retention_ms,
        )
        if appended:
            log.info("cron entry %r: enqueued %s (%s)", entry.name, task_id, entry.type)
        else:
            log.info("cron entry %r: %s was enqueued already", entry.name, task_id)

    def release(self) -> None:
        """Lets go of the leases it holds (a graceful stop: another engine
        takes over at once, not after the lease's time)."""
        names = [entry.name for entry in self.entries]
        self.client._connection().cron_leases(names, self.holder, 0)

    def run(self) -> None:
        """Looks at Redis until SIGTERM; waits out Redis outages."""
        failing = False
        wait_after_failure = RENEW
        while True:
            try:
                wait = self.step(time.time())
                if failing:
                    log.info("cron: redis answers again")
                failing, wait_after_failure = False, RENEW
            except (RedisUnavailable, FlumeqError) as error:
                if not failing:
                    log.warning("cron: cannot reach redis (%s); retrying", error)
                failing = True
                self.last.clear()
                self.registered = False
                wait = wait_after_failure
                wait_after_failure = min(wait_after_failure * 2, LONGEST_WAIT)
            # Just past the next tick, so that it counts as due.
            time.sleep(wait + 0.002)


def scheduler_main(
    url: str, prefix: str, entries: list[Cron], consumer: str, middleware: Sequence[Any] = ()
) -> None:
    """Entry point of an engine's cron process: SIGINT is the supervisor's
    (a terminal's Ctrl-C reaches the whole group); SIGTERM lets the leases
    go and exits."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)

    def stop(_signum: int, _frame: Optional[FrameType]) -> None:
        raise _Stop

    signal.signal(signal.SIGTERM, stop)
    _core.die_with_parent()
    client = Client(url, prefix=prefix, buffer_size=0)
    holder = f"{consumer}:{socket.gethostname()}:{os.getpid()}"
    scheduler = Scheduler(client, entries, holder, middleware)
    with contextlib.suppress(_Stop):
        scheduler.run()
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    # Else they pass by themselves within LEASE.
    with contextlib.suppress(FlumeqError):
        scheduler.release()


def entries_in_redis(client: Client) -> list[dict[str, Any]]:
    """The entries engines carry, as ``flumeq cron`` lists them: name,
    schedule, tz, type, queue, next (s since the epoch), last_tick (s, or
    None), task_id (of the last tick), holder (of the lease, or None)."""
    store = client._connection()
    keys = _core.key_names(client.prefix)
    described = reads.one(store, "HGETALL", keys["cron_entries"])
    rows = []
    for name, value in reads.pairs(described).items():
        try:
            row = orjson.loads(value)
            if not isinstance(row, dict) or not {"schedule", "type", "queue"} <= set(row):
                raise ValueError("not an entry's description")
        except ValueError as error:  # garbage written by hand: say so, list the rest
            log.warning("cron entry %r in redis is unreadable (%s); skipped", name, error)
            continue
        row["name"] = name
        rows.append(row)
    rows.sort(key=lambda row: str(row["name"]))
    commands: list[list[reads.Arg]] = []
    for row in rows:
        commands.append(["HGET", _core.key_names(client.prefix, row["queue"])["cron"], row["name"]])
        commands.append(["GET", keys["cron_lease"] + row["name"]])
    replies = reads.run(store, *commands)
    now = time.time()
    for index, row in enumerate(rows):
        last, holder = replies[2 * index], replies[2 * index + 1]
        last_ms = _tick(last)
        row["last_tick"] = None if last_ms is None else last_ms / 1000
        row["holder"] = reads.text(holder) if isinstance(holder, bytes) else None
        try:
            entry = Cron(
                row["schedule"], row["type"], name=row["name"], queue=row["queue"], tz=row.get("tz")
            )
        except ConfigError as error:  # written by an engine of another version
            log.warning("cron entry %r in redis cannot be read here: %s", row["name"], error)
            row["task_id"] = row["next"] = None
            continue
        row["task_id"] = None if last_ms is None else entry.task_id(last_ms)
        row["next"] = entry.next_after(entry.latest(now)) / 1000
    return rows
