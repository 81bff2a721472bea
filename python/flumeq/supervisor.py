"""The supervisor: the process that called ``Engine.run``, and the parent of
an engine's processes.

Start order (stop order is the reverse):

1. the shared region (rings + eventfds) is created, in this process;
2. the actor processes are forked, one per ring slot;
3. the dispatcher process is forked; it runs the Rust dispatcher (tokio,
   Redis connections) and is the only process of the engine with threads;
4. the helpers: the metrics process (with ``metrics_port``) and the cron
   process (with cron entries, not in burst mode).

This process never starts a thread, so it can fork a replacement at any
time. It waits on its children and on signals (a self-pipe wakes it at
once), and keeps the engine whole:

- an actor that dies is replaced once the dispatcher took its tasks back,
  at once the first time, then with a growing delay while it keeps dying
  young (a crash loop never forks flat out);
- a dispatcher that dies is replaced too, with the same backoff: its actors
  are killed (their batches died with it), the region is emptied, and a new
  dispatcher with the same consumer name takes its pending tasks back at
  once;
- a helper (metrics, cron) is replaced when it dies, with the same backoff.

SIGINT/SIGTERM ask for a graceful stop; a second one stops at once. The
engine returns only then, or at the end of a burst. A stop is bounded: past
``shutdown_timeout`` plus the dispatcher's write grace plus a margin, what
is still running is killed (those tasks stay pending in Redis).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time
from types import FrameType
from typing import TYPE_CHECKING, Any, Callable, Optional

import multiprocess
from multiprocess.connection import wait

from . import _core
from .actor import actor_main
from .cron import scheduler_main
from .errors import ConfigError, InvalidTask

if TYPE_CHECKING:
    from .engine import Engine

__all__ = ["Supervisor"]

log = logging.getLogger("flumeq.engine")

#: A child that lived this long (seconds) before dying is restarted at once.
HEALTHY_AFTER = 30.0
#: First and longest wait before restarting a child that keeps dying young.
FIRST_BACKOFF = 0.1
LONGEST_BACKOFF = 30.0
#: Margin on top of ``shutdown_timeout`` and the write grace before a stop
#: kills what still runs.
STOP_MARGIN = 5.0
#: Errors of the dispatcher that a restart cannot mend: the engine raises them.
FATAL = {"ConfigError": ConfigError, "InvalidTask": InvalidTask}


class _Backoff:
    """Restart delays of one child: nothing after a healthy life, then
    doubling while it keeps dying young."""

    def __init__(self) -> None:
        self.deaths = 0

    def next_delay(self, lived: float) -> float:
        if lived >= HEALTHY_AFTER:
            self.deaths = 0
        self.deaths += 1
        if self.deaths == 1 and lived >= HEALTHY_AFTER:
            return 0.0
        return float(min(FIRST_BACKOFF * 2.0 ** (self.deaths - 1), LONGEST_BACKOFF))


class _Helper:
    """A child off the task path (metrics, cron): started with the engine,
    replaced with backoff when it dies, stopped first (SIGTERM, then
    SIGKILL after ``grace`` seconds; 0 kills at once), or, ``early``, as
    soon as the engine starts stopping."""

    def __init__(
        self,
        context: Any,
        name: str,
        target: Callable[..., None],
        args: tuple[Any, ...],
        grace: float = 0.0,
        early: bool = False,
    ) -> None:
        self.context = context
        #: Stopped as soon as the engine starts stopping (not at its end).
        self.early = early
        self.name = name
        self.target = target
        self.args = args
        self.grace = grace
        self.process: Any = None
        self.born = 0.0
        self.backoff = _Backoff()
        #: When a dead one is to be replaced.
        self.due: Optional[float] = None

    def start(self) -> None:
        self.process = self.context.Process(
            target=self.target, args=self.args, name=f"flumeq-{self.name}", daemon=True
        )
        self.process.start()
        self.born = time.monotonic()

    def tend(self, now: float) -> None:
        """Replaces it when it died (after its backoff)."""
        if self.due is not None:
            if now >= self.due:
                self.due = None
                self.start()
            return
        if not self.process.is_alive():
            self.process.join()
            delay = self.backoff.next_delay(now - self.born)
            log.warning(
                "the %s process exited with code %s; restarting it in %.1fs",
                self.name,
                self.process.exitcode,
                delay,
            )
            self.due = now + delay

    def waitable(self) -> Optional[Any]:
        """Its sentinel while it runs (ready once it exits)."""
        return None if self.due is not None else self.process.sentinel

    def stop(self) -> None:
        process = self.process
        if process is None or not process.is_alive():
            if process is not None:
                process.join()
            return
        if self.grace > 0:
            process.terminate()
            process.join(self.grace)
        if process.is_alive():
            process.kill()
        process.join()


def _dispatcher_main(region: _core.Region, settings: dict[str, Any], report: Any) -> None:
    """Entry point of the dispatcher process. It catches SIGINT and SIGTERM
    in Rust (a group-wide signal is a stop request, like one sent to the
    supervisor); Python's handlers could not run while it is in Rust."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _core.die_with_parent()
    try:
        outcome = _core.run_dispatcher(region, settings)
    except BaseException as error:
        report.send(("error", type(error).__name__, str(error)))
        raise SystemExit(1) from None
    report.send(("ok", outcome))


def _metrics_main(
    url: str, prefix: str, group: str, host: str, port: int, queues: list[str]
) -> None:
    """Entry point of the metrics process (``metrics_port``)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _core.die_with_parent()
    # prometheus-client loads here only: importing flumeq stays light (fewer
    # modules and objects for every producer's garbage collector).
    from .admin import Admin  # noqa: PLC0415
    from .metrics import serve_metrics  # noqa: PLC0415

    serve_metrics(Admin(url, prefix=prefix, group=group), port, queues=queues, host=host)


#: How much lower the history process's CPU priority is.
HISTORY_NICE = 10


def _history_main(
    url: str,
    dsn: str,
    queues: list[str],
    prefix: str,
    consumer: str,
    retention_days: Optional[float],
) -> None:
    """Entry point of the history process (``history``): SIGTERM makes it
    write what is left (briefly) and exit. It runs at a lower CPU priority
    (nice +10): on a busy machine the task path goes first, and the history
    catches up when the queue is quiet (events wait in Redis meanwhile)."""
    import threading  # noqa: PLC0415

    from .history.sink import Sink  # noqa: PLC0415

    stop = threading.Event()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    _core.die_with_parent()
    with contextlib.suppress(OSError):
        os.nice(HISTORY_NICE)
    Sink(
        url,
        dsn,
        queues,
        prefix=prefix,
        consumer=consumer,
        retention_days=retention_days,
        stop=stop,
    ).run()


class Supervisor:
    """Runs one engine's process tree until it stops (see the module doc)."""

    def __init__(
        self, engine: Engine, region: _core.Region, settings: dict[str, Any], burst: bool
    ) -> None:
        self.engine = engine
        self.region = region
        self.settings = settings
        self.burst = burst
        self.count = region.processes
        self.context = multiprocess.get_context("fork")
        self.queue_names = [name for name, _ in engine.queues]
        self.actors: list[Any] = [None] * self.count
        self.actor_born = [0.0] * self.count
        self.actor_backoff = [_Backoff() for _ in range(self.count)]
        self.actor_due: dict[int, float] = {}
        self.lost: dict[int, float] = {}
        self.dispatcher: Any = None
        self.dispatcher_born = 0.0
        self.dispatcher_backoff = _Backoff()
        self.dispatcher_due: Optional[float] = None
        self.dispatcher_restarts = 0
        self.reports: Any = None
        self.helpers: list[_Helper] = []
        self.signals = 0
        self.stop_since: Optional[float] = None
        self.finished: Optional[tuple[Any, ...]] = None
        self.wake_read, self.wake_write = os.pipe()
        for fd in (self.wake_read, self.wake_write):
            os.set_blocking(fd, False)

    # -- children ----------------------------------------------------------

    def _start_actor(self, slot: int) -> None:
        self.region.mark_starting(slot)
        process = self.context.Process(
            target=actor_main,
            args=(
                self.region,
                slot,
                self.engine.run_handlers(),
                self.queue_names,
                self.engine.concurrency,
            ),
            name=f"flumeq-actor-{slot}",
            daemon=True,
        )
        process.start()
        self.actors[slot] = process
        self.actor_born[slot] = time.monotonic()

    def _start_dispatcher(self) -> None:
        reader, writer = self.context.Pipe(duplex=False)
        process = self.context.Process(
            target=_dispatcher_main,
            args=(self.region, self.settings, writer),
            name="flumeq-dispatcher",
            daemon=True,
        )
        process.start()
        writer.close()
        self.dispatcher, self.reports = process, reader
        self.dispatcher_born = time.monotonic()

    def _start_helpers(self) -> None:
        engine = self.engine
        if engine.metrics_port:
            self.helpers.append(
                _Helper(
                    self.context,
                    "metrics",
                    _metrics_main,
                    (
                        engine.url,
                        engine.prefix,
                        engine.group,
                        engine.metrics_host,
                        engine.metrics_port,
                        self.queue_names,
                    ),
                )
            )
        if engine.history:
            # SIGTERM first: it writes what the last outcomes recorded.
            self.helpers.append(
                _Helper(
                    self.context,
                    "history",
                    _history_main,
                    (
                        engine.url,
                        engine.history,
                        self.queue_names,
                        engine.prefix,
                        engine.consumer,
                        engine.history_retention,
                    ),
                    grace=5.0,
                )
            )
        if engine.cron and not self.burst:
            # SIGTERM first: it lets its leases go, so another engine takes
            # its entries over at once.
            self.helpers.append(
                _Helper(
                    self.context,
                    "cron",
                    scheduler_main,
                    (engine.url, engine.prefix, engine.cron, engine.consumer, engine.middleware),
                    grace=2.0,
                    early=True,
                )
            )
        for helper in self.helpers:
            helper.start()

    def _report(self) -> Optional[tuple[Any, ...]]:
        """What the dead dispatcher said before it exited, if anything."""
        reader, self.reports = self.reports, None
        try:
            if reader is not None and reader.poll():
                outcome: tuple[Any, ...] = reader.recv()
                return outcome
        except (EOFError, OSError):
            pass
        finally:
            if reader is not None:
                reader.close()
        return None

    def _kill(self, process: Any) -> None:
        if process is not None and process.is_alive():
            process.kill()
        if process is not None:
            process.join()

    # -- signals -----------------------------------------------------------

    def _on_signal(self, signum: int, _frame: Optional[FrameType]) -> None:
        self.signals += 1
        if self.signals == 1:
            log.info(
                "%s: stopping gracefully (send again to stop at once)", signal.Signals(signum).name
            )
            self.region.request_stop()

    def _install_signals(self) -> Callable[[], None]:
        """Installs the handlers (from the main thread only: an engine run
        from another thread is stopped with ``Engine.stop``); returns what
        undoes it."""
        if threading.current_thread() is not threading.main_thread():
            return lambda: None
        previous = {
            signum: signal.signal(signum, self._on_signal)
            for signum in (signal.SIGINT, signal.SIGTERM)
        }
        wakeup = signal.set_wakeup_fd(self.wake_write, warn_on_full_buffer=False)

        def restore() -> None:
            signal.set_wakeup_fd(wakeup)
            for signum, handler in previous.items():
                signal.signal(signum, handler)

        return restore

    # -- the loop ----------------------------------------------------------

    def run(self) -> dict[str, int]:
        restore = self._install_signals()
        try:
            for slot in range(self.count):
                self._start_actor(slot)
            self._start_dispatcher()
            self._start_helpers()
            log.info(
                "engine %s serving %s with %d process(es)%s",
                self.engine.consumer,
                ", ".join(self.queue_names),
                self.count,
                " (burst)" if self.burst else "",
            )
            self._supervise()
        finally:
            restore()
            self._close()
        return self._result()

    def _supervise(self) -> None:
        while True:
            now = time.monotonic()
            if self.signals > 1:
                log.warning("second signal: stopping now; unfinished tasks stay pending in Redis")
                self.finished = ("at-once",)
                return
            if self.region.stop_requested() and self.stop_since is None:
                self.stop_since = now
                for helper in self.helpers:
                    if helper.early:
                        helper.stop()  # cron: its entries go to another engine now
            if self._dispatcher_exited(now):
                return
            if self.dispatcher is None and self.stop_since is not None:
                return  # it died while stopping: nothing left to restart for
            if (
                self.dispatcher is None
                and self.dispatcher_due is not None
                and now >= self.dispatcher_due
            ):
                self.dispatcher_due = None
                self.dispatcher_restarts += 1
                for slot in range(self.count):
                    self._start_actor(slot)
                self._start_dispatcher()
            self._tend_actors(now)
            if self.stop_since is None:
                for helper in self.helpers:
                    helper.tend(now)
            if self.stop_since is not None:
                limit = self.engine.shutdown_timeout + _core.WRITE_GRACE_MS / 1000 + STOP_MARGIN
                if now - self.stop_since > limit:
                    log.warning(
                        "the engine did not stop within %.0fs; killing what still runs "
                        "(unfinished tasks stay pending in Redis)",
                        limit,
                    )
                    self.finished = ("overdue",)
                    return
            self._wait(now)

    def _dispatcher_exited(self, now: float) -> bool:
        """Handles a dispatcher that exited; whether the engine is done."""
        if self.dispatcher is None or self.dispatcher.is_alive():
            return False
        self.dispatcher.join()
        code, pid = self.dispatcher.exitcode, self.dispatcher.pid
        self.dispatcher = None
        outcome = self._report()
        if outcome is not None and outcome[0] == "ok":
            self.finished = outcome
            return True
        if outcome is not None and outcome[1] in FATAL:
            self.finished = outcome
            return True
        if self.stop_since is not None:
            log.warning("the dispatcher exited with code %s while stopping", code)
            self.finished = outcome or ("died",)
            return True
        reason = f": {outcome[1]}: {outcome[2]}" if outcome else ""
        delay = self.dispatcher_backoff.next_delay(now - self.dispatcher_born)
        log.warning(
            "the dispatcher (pid %s) exited with code %s%s; restarting it in %.1fs "
            "(its tasks are taken back at once, as consumer %s)",
            pid,
            code,
            reason,
            delay,
            self.engine.consumer,
        )
        # Its actors' batches died with it: kill them, empty the region.
        for slot, actor in enumerate(self.actors):
            self._kill(actor)
            self.actors[slot] = None
        self.lost.clear()
        self.actor_due.clear()
        self.region.reset_slots()
        self.dispatcher_due = now + delay
        return False

    def _tend_actors(self, now: float) -> None:
        closing = self.region.closing()
        for slot, actor in enumerate(self.actors):
            if actor is None or actor.is_alive():
                continue
            actor.join()
            self.actors[slot] = None
            if closing or self.dispatcher is None:
                continue  # expected: the dispatcher released it, or is being replaced
            code = actor.exitcode
            log.warning(
                "actor %d (pid %s) exited with code %s; replacing it", slot, actor.pid, code
            )
            self.region.mark_lost(slot, code if code is not None else -9)
            self.lost[slot] = now - self.actor_born[slot]
        for slot, lived in list(self.lost.items()):
            if self.region.slot_state(slot) == _core.SLOT_RECLAIMED:
                del self.lost[slot]
                delay = self.actor_backoff[slot].next_delay(lived)
                if delay > 0:
                    log.info("actor %d keeps dying young: restarting it in %.1fs", slot, delay)
                self.actor_due[slot] = now + delay
        if closing or self.dispatcher is None:
            return
        for slot, due in list(self.actor_due.items()):
            if now >= due:
                del self.actor_due[slot]
                self._start_actor(slot)

    def _wait(self, now: float) -> None:
        """Sleeps until a child exits, a signal arrives, or something is due."""
        # Only what the loop will act on: a due time it skips (actors while
        # the engine closes, helpers while it stops) would make this spin.
        dues: list[float] = []
        if not self.region.closing() and self.dispatcher is not None:
            dues += self.actor_due.values()
        if self.dispatcher_due is not None:
            dues.append(self.dispatcher_due)
        if self.stop_since is None:
            dues += [helper.due for helper in self.helpers if helper.due is not None]
        timeout = 1.0
        if dues:
            timeout = min(timeout, max(0.0, min(dues) - now))
        if self.lost:
            # The dispatcher reclaims a lost slot within moments.
            timeout = min(timeout, 0.02)
        waitables: list[Any] = [self.wake_read]
        children = [*self.actors, self.dispatcher]
        waitables += [child.sentinel for child in children if child is not None]
        if self.stop_since is None:
            waitables += [helper.waitable() for helper in self.helpers if helper.due is None]
        wait(waitables, timeout=timeout)
        with contextlib.suppress(BlockingIOError):
            while os.read(self.wake_read, 512):
                pass

    # -- the end -----------------------------------------------------------

    def _close(self) -> None:
        """Stops every child (stop order: helpers, dispatcher, actors)."""
        for helper in self.helpers:
            helper.stop()
        orderly = self.finished is not None and self.finished[0] == "ok"
        if not orderly:
            self._kill(self.dispatcher)
        elif self.dispatcher is not None:
            self.dispatcher.join()
        self.region.close_all()
        # Tasks the dispatcher left pending (shutdown timeout) must not finish
        # unrecorded: stop their actors now. Otherwise actors exit by
        # themselves once they see the closed rings.
        left = not orderly or self.region.counts()["left_pending"] > 0
        for actor in self.actors:
            if actor is None:
                continue
            if left:
                actor.kill()
            actor.join(timeout=5)
            if actor.is_alive():
                actor.kill()
                actor.join()
        if self.reports is not None:
            self.reports.close()
        os.close(self.wake_read)
        os.close(self.wake_write)

    def _result(self) -> dict[str, int]:
        counts = dict(self.region.counts())
        counts["dispatcher_restarts"] = self.dispatcher_restarts
        outcome = self.finished or ("died",)
        if outcome[0] == "error" and outcome[1] in FATAL:
            raise FATAL[outcome[1]](outcome[2])
        if outcome[0] == "error":
            log.error("the dispatcher failed while stopping: %s: %s", outcome[1], outcome[2])
        elif outcome[0] != "ok":
            log.warning("stopped without a clean dispatcher stop (%s)", outcome[0])
        return counts
