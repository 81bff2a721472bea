"""Cron entries: every tick enqueued once across engines that carry the
entry (and across a lease holder's kill -9), only the latest missed tick
after an outage, time zones across DST changes, ``flumeq cron``, and clear
errors for bad entries."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from datetime import datetime, timezone
from typing import Any
from zoneinfo import ZoneInfo

import psutil
import pytest
import redis
from click.testing import CliRunner

import flumeq
from conftest import script_env, spawn_script, wait_until
from flumeq.cli import main
from flumeq.cron import Cron, Scheduler
from flumeq.redis_server import RedisServer

BERLIN = ZoneInfo("Europe/Berlin")

ENGINE = """
import sys, flumeq
from conftest import process_redis

def beat(task):
    process_redis(sys.argv[1]).hincrby("runs", task.id, 1)

flumeq.Engine({"beat": beat}, sys.argv[1], consumer=sys.argv[2],
              cron=[flumeq.Cron(1.0, "beat", name="beat")]).run(processes=1)
"""


def local(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, BERLIN).strftime("%Y-%m-%d %H:%M%z")


def ticks(entry: Cron, start: datetime, count: int) -> list[str]:
    at = entry.latest(start.timestamp())
    out = []
    for _ in range(count):
        at = entry.next_after(at)
        out.append(local(at))
    return out


def enqueued_ticks(r: redis.Redis) -> list[float]:
    """The tick times (s) of the beat entry's tasks that ran."""
    seconds = []
    for key in r.hkeys("runs"):
        stamp = key.decode().removeprefix("cron:beat:").rstrip("Z")
        seconds.append(datetime.fromisoformat(stamp).replace(tzinfo=timezone.utc).timestamp())
    return sorted(seconds)


def lease_holder(r: redis.Redis) -> str:
    """The consumer name of the engine holding the beat entry's lease
    (``""`` while nobody does)."""
    value = r.get("flumeq:{cron}:lease:beat")
    return "" if value is None else value.decode().split(":")[0]


def test_three_engines_enqueue_each_tick_once_and_survive_the_holders_kill(
    redis_url: str, r: redis.Redis
) -> None:
    engines = {name: spawn_script(ENGINE, redis_url, name) for name in ("e0", "e1", "e2")}
    try:
        wait_until(lambda: r.exists("flumeq:{cron}:lease:beat") == 1, timeout=30)
        time.sleep(10)
        holder = lease_holder(r)
        killed_at = time.time()
        os.killpg(engines[holder].pid, signal.SIGKILL)
        engines[holder].wait(timeout=10)
        wait_until(lambda: lease_holder(r) not in ("", holder), timeout=15)
        time.sleep(3)
    finally:
        for process in engines.values():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in engines.values():
            process.wait(timeout=30)
    counts = {key.decode(): int(value) for key, value in r.hgetall("runs").items()}
    stats = r.hgetall("flumeq:{default}:stats")
    # No tick twice: each id ran once, and as many tasks went in as ids
    # (with those still in the stream: the killed engine's, pending for it).
    assert set(counts.values()) == {1}, counts
    waiting = [f[b"id"].decode() for _, f in r.xrange("flumeq:{default}:stream")]
    ids = [*counts, *waiting]
    assert len(set(ids)) == len(ids) == int(stats[b"enqueued"]), (stats, waiting)
    for task_id in waiting:
        r.hset("runs", task_id, 0)  # their ticks count below
    seen = enqueued_ticks(r)
    before = [at for at in seen if at < killed_at - 1]
    gaps = [b - a for a, b in zip(before, before[1:])]
    assert len(before) >= 9 and set(gaps) == {1.0}, before  # every second while alive
    after = [at for at in seen if at > killed_at]
    assert after, "no tick after the takeover"
    takeover = after[0] - killed_at
    print(f"cron takeover after kill -9 of the holder: {takeover:.2f}s")
    assert takeover < 6.0, f"takeover took {takeover:.1f}s"
    assert set(b - a for a, b in zip(after, after[1:])) == {1.0}


def test_a_killed_cron_process_is_replaced_and_ticks_go_on(redis_url: str, r: redis.Redis) -> None:
    engine = spawn_script(ENGINE, redis_url, "solo")
    try:
        wait_until(lambda: r.exists("flumeq:{cron}:lease:beat") == 1, timeout=30)
        value = r.get("flumeq:{cron}:lease:beat")
        assert value is not None
        cron_pid = int(value.decode().rsplit(":", 1)[1])
        assert cron_pid != engine.pid
        os.kill(cron_pid, signal.SIGKILL)
        killed_at = time.time()
        # The supervisor forks a new one; it takes the lease once the old
        # one's passes (the same consumer, another pid).
        wait_until(
            lambda: (
                (r.get("flumeq:{cron}:lease:beat") or b"").decode().endswith(f":{cron_pid}")
                is False
                and r.exists("flumeq:{cron}:lease:beat") == 1
            ),
            timeout=15,
        )
        wait_until(lambda: max(enqueued_ticks(r), default=0) > killed_at + 1, timeout=15)
        assert engine.poll() is None  # the engine kept serving
    finally:
        engine.send_signal(signal.SIGTERM)
        assert engine.wait(timeout=30) == 0
    assert set(int(value) for value in r.hvals("runs")) == {1}


def test_a_graceful_stop_hands_the_entry_over_at_once(redis_url: str, r: redis.Redis) -> None:
    first = spawn_script(ENGINE, redis_url, "first")
    wait_until(lambda: r.exists("flumeq:{cron}:lease:beat") == 1, timeout=30)
    second = spawn_script(ENGINE, redis_url, "second")
    try:
        time.sleep(3)  # the second engine is up and looking
        assert lease_holder(r) == "first"
        first.send_signal(signal.SIGTERM)
        stopped = time.time()
        wait_until(lambda: lease_holder(r) == "second", timeout=10)
        assert time.time() - stopped < 2.5  # not the lease's 3 s plus a look
        assert first.wait(timeout=30) == 0
    finally:
        second.send_signal(signal.SIGTERM)
        second.wait(timeout=30)
    assert set(int(value) for value in r.hvals("runs")) == {1}


def test_sigterm_to_the_holders_process_group_hands_over_at_once(
    redis_url: str, r: redis.Redis
) -> None:
    """systemd sends SIGTERM to every process of the unit: the cron child
    gets it too, lets its lease go, and the engine still stops cleanly."""
    first = spawn_script(ENGINE, redis_url, "first")
    wait_until(lambda: lease_holder(r) == "first", timeout=30)
    second = spawn_script(ENGINE, redis_url, "second")
    try:
        time.sleep(3)
        os.killpg(first.pid, signal.SIGTERM)
        stopped = time.time()
        wait_until(lambda: lease_holder(r) == "second", timeout=10)
        assert time.time() - stopped < 2.5
        assert first.wait(timeout=30) == 0
    finally:
        second.send_signal(signal.SIGTERM)
        second.wait(timeout=30)
    assert set(int(value) for value in r.hvals("runs")) == {1}


def test_a_stop_with_redis_gone_is_bounded_and_does_not_spin() -> None:
    """The cron child cannot let its lease go without Redis: the engine
    still stops within its bound (SIGTERM, then SIGKILL after 2 s)."""
    server = RedisServer().start()
    try:
        conn = redis.Redis.from_url(server.url)
        engine = spawn_script(ENGINE, server.url, "stranded")
        wait_until(lambda: conn.exists("flumeq:{cron}:lease:beat") == 1, timeout=30)
        time.sleep(1.5)
        processes = [psutil.Process(engine.pid), *psutil.Process(engine.pid).children(True)]
        server.kill()
        time.sleep(0.5)
        before = sum(p.cpu_times().user + p.cpu_times().system for p in processes)
        started = time.monotonic()
        os.killpg(engine.pid, signal.SIGTERM)
        _, err = engine.communicate(timeout=60)
        took = time.monotonic() - started
        used = 0.0
        for process in processes:
            with contextlib.suppress(psutil.NoSuchProcess):
                used += process.cpu_times().user + process.cpu_times().system
        used -= before
    finally:
        server.stop()
    assert engine.returncode == 0, err.decode()[-3000:]
    assert took < 15, f"the stop took {took:.1f}s with redis gone"
    assert used < 0.5 * took, f"the engine spun: {used:.2f} CPU-s in {took:.1f}s"


def test_after_an_outage_only_the_latest_missed_tick_is_enqueued(
    redis_url: str, r: redis.Redis
) -> None:
    """The scheduler's clock is its argument: an outage is a jump of it."""
    client = flumeq.Client(redis_url)
    entry = Cron("*/5 * * * *", "report", {"k": 1}, name="reports", tz="Europe/Berlin")
    first = Scheduler(client, [entry], "a")
    start = datetime(2026, 6, 1, 12, 1, tzinfo=BERLIN).timestamp()
    first.step(start)  # a new entry starts with the next tick, not 12:00
    assert r.xlen("flumeq:{default}:stream") == 0
    first.step(start + 4 * 60 + 1)  # 12:05:01
    first.release()
    # Nobody alive from 12:05:01 to 12:31: ticks 12:10 ... 12:30 were missed;
    # the engine that takes the entry then enqueues the latest only.
    taker = Scheduler(client, [entry], "c")
    taker.step(start + 30 * 60)
    taker.release()
    fields = [entry_fields for _, entry_fields in r.xrange("flumeq:{default}:stream")]
    assert [f[b"id"] for f in fields] == [
        b"cron:reports:2026-06-01T10:05:00Z",
        b"cron:reports:2026-06-01T10:30:00Z",
    ]
    assert fields[0][b"payload"] == b'{"k":1}' and fields[0][b"type"] == b"report"
    # Two schedulers that overlap (the lease passed while one was frozen)
    # never append a tick twice, nor an older one after a newer one.
    frozen = Scheduler(client, [entry], "b")
    tick = entry.latest(start + 30 * 60)
    frozen._enqueue(entry, tick)
    frozen._enqueue(entry, entry.latest(start + 20 * 60))
    assert r.xlen("flumeq:{default}:stream") == 2
    # A last tick overwritten with garbage counts as none: the next tick
    # goes in, the scheduler does not fail on it.
    r.hset("flumeq:{default}:cron", "reports", "garbage")
    fresh = Scheduler(client, [entry], "d")
    fresh.step(start + 35 * 60)
    assert fresh.last == {"reports": entry.latest(start + 35 * 60)}  # its baseline
    assert r.xlen("flumeq:{default}:stream") == 2
    fresh.release()
    frozen._enqueue(entry, entry.latest(start + 40 * 60))
    assert r.xlen("flumeq:{default}:stream") == 3


def test_a_holder_that_was_late_enqueues_each_tick_it_missed(
    redis_url: str, r: redis.Redis
) -> None:
    client = flumeq.Client(redis_url)
    entry = Cron(1.0, "beat", name="beat")
    scheduler = Scheduler(client, [entry], "a")
    start = 1_800_000_000.2
    scheduler.step(start)
    scheduler.step(start + 1)
    scheduler.step(start + 4)  # a 3 s stall of the holder: 3 ticks missed
    ids = [fields[b"id"].decode() for _, fields in r.xrange("flumeq:{default}:stream")]
    assert [entry_id[-10:] for entry_id in ids] == [
        "T08:00:01Z",
        "T08:00:02Z",
        "T08:00:03Z",
        "T08:00:04Z",
    ], ids
    scheduler.step(start + 60)  # a stall past CATCH_UP ticks: the latest only
    assert r.xlen("flumeq:{default}:stream") == 5
    scheduler.release()


def test_each_tick_runs_the_engines_before_enqueue_hooks(redis_url: str, r: redis.Redis) -> None:
    """A tick is an enqueue like any other: the producer hooks run at its
    time (not once when the entry was made), and a raising one changes
    nothing."""

    class Stamp:
        calls = 0

        def before_enqueue(self, fields: dict[str, Any]) -> None:
            Stamp.calls += 1
            fields["labels"]["tick"] = str(Stamp.calls)

    class Broken:
        def before_enqueue(self, fields: dict[str, Any]) -> None:
            raise RuntimeError("hook bug")

    entry = Cron(1.0, "beat", {"k": 1}, name="hooked", labels={"team": "ops"})
    assert Stamp.calls == 0  # not at configuration time
    scheduler = Scheduler(flumeq.Client(redis_url), [entry], "a", [Stamp(), Broken()])
    start = 1_800_000_000.5
    scheduler.step(start)
    scheduler.step(start + 1)
    scheduler.step(start + 2)
    labels = [json.loads(f[b"labels"]) for _, f in r.xrange("flumeq:{default}:stream")]
    assert labels == [{"team": "ops", "tick": "1"}, {"team": "ops", "tick": "2"}]
    scheduler.release()


def test_time_zones_across_the_spring_and_autumn_changes() -> None:
    daily = Cron("30 2 * * *", "nightly", tz="Europe/Berlin")
    half_hourly = Cron("*/30 * * * *", "sync", tz="Europe/Berlin")
    # Spring (2026-03-29, 02:00 -> 03:00): 02:30 does not exist that day.
    assert ticks(daily, datetime(2026, 3, 28, 12, 0, tzinfo=BERLIN), 3) == [
        "2026-03-29 03:00+0200",
        "2026-03-30 02:30+0200",
        "2026-03-31 02:30+0200",
    ]
    assert ticks(half_hourly, datetime(2026, 3, 29, 1, 10, tzinfo=BERLIN), 3) == [
        "2026-03-29 01:30+0100",
        "2026-03-29 03:00+0200",
        "2026-03-29 03:30+0200",
    ]
    # Autumn (2026-10-25, 03:00 -> 02:00): 02:00-02:59 comes twice, ticks once.
    assert ticks(daily, datetime(2026, 10, 24, 12, 0, tzinfo=BERLIN), 2) == [
        "2026-10-25 02:30+0200",
        "2026-10-26 02:30+0100",
    ]
    assert ticks(half_hourly, datetime(2026, 10, 25, 1, 40, tzinfo=BERLIN), 4) == [
        "2026-10-25 02:00+0200",
        "2026-10-25 02:30+0200",
        "2026-10-25 03:00+0100",
        "2026-10-25 03:30+0100",
    ]
    # In the repeated hour the latest tick is the first 02:30, not a new one.
    repeated = datetime(2026, 10, 25, 2, 40, tzinfo=BERLIN).replace(fold=1).timestamp()
    assert local(daily.latest(repeated)) == "2026-10-25 02:30+0200"
    # Intervals are on multiples of the interval since the epoch.
    every = Cron(10.0, "warm")
    assert every.latest(1_000_000_007.5) == 1_000_000_000_000
    assert every.next_after(1_000_000_000_000) == 1_000_000_010_000


def test_app_cron_and_the_cron_listing(redis_url: str, r: redis.Redis) -> None:
    app = flumeq.App(redis_url)

    @app.cron(2.0, name="tidy")
    @app.task(queue="upkeep", max_retry=1)
    def tidy(days: int = 3) -> None:
        pass

    @app.cron("0 3 * * *", tz="UTC")
    def nightly() -> None:
        pass

    with pytest.raises(flumeq.ConfigError, match="needs argument"):

        @app.cron(60.0)
        @app.task
        def needs(order: int) -> None:
            pass

    engine = flumeq.Engine(app)
    assert [entry.name for entry in engine.cron] == ["tidy", nightly.name]
    assert nightly.name.endswith(".nightly")
    assert (engine.cron[0].queue, engine.cron[0].type) == ("upkeep", tidy.name)
    client = flumeq.Client(redis_url)
    scheduler = Scheduler(client, engine.cron, "host-1")
    now = time.time()
    scheduler.step(now)
    scheduler.step(now + 2.0)
    out = CliRunner().invoke(main, ["cron", "--url", redis_url])
    assert out.exit_code == 0, out.output
    lines = out.output.splitlines()
    tidy_line = next(line for line in lines if line.startswith("tidy"))
    assert "every 2.0s" in tidy_line and "-> upkeep" in tidy_line and "host-1" in tidy_line
    assert "cron:tidy:" in tidy_line
    nightly_line = next(line for line in lines if line.startswith(nightly.name))
    assert "0 3 * * * (UTC)" in nightly_line and "never" in nightly_line
    assert r.xlen("flumeq:{upkeep}:stream") == 1
    scheduler.release()
    # Garbage in the registry is skipped, not a crash.
    r.hset(
        "flumeq:{cron}:entries",
        mapping={"junk": b"\xff{", "odd": b'{"schedule": "61 * * * *", "type": "t", "queue": "q"}'},
    )
    out = CliRunner().invoke(main, ["cron", "--url", redis_url])
    assert out.exit_code == 0, out.output
    assert "no engine" in out.output
    assert "junk" not in out.output
    odd = next(line for line in out.output.splitlines() if line.startswith("odd"))
    assert "never" in odd


@pytest.mark.parametrize(
    ("args", "kwargs", "message"),
    [
        (("61 * * * *", "t"), {}, "cron entry 't': bad cron expression"),
        (("* * *", "t"), {"name": "short"}, "cron entry 'short': bad cron expression"),
        (("* * * * *", "t"), {"tz": "Mars/Olympus"}, "unknown time zone 'Mars/Olympus'"),
        ((0, "t"), {}, "schedule must be a cron expression or seconds > 0"),
        ((True, "t"), {}, "schedule must be"),
        ((5.0, "t"), {"tz": "UTC"}, "tz applies to cron expressions"),
        ((5.0, "t", {1, 2}), {}, "not JSON-serialisable"),
        ((5.0, "t"), {"queue": "a{b"}, "cron entry 't'"),
        ((5.0, ""), {}, "type must be a task type string"),
        ((5.0, "t"), {"name": ""}, "name must be a short string"),
    ],
)
def test_bad_entries_are_config_errors_naming_the_entry(
    args: tuple[Any, ...], kwargs: dict[str, Any], message: str
) -> None:
    with pytest.raises(flumeq.ConfigError, match=message.replace("*", r"\*").replace("{", r"\{")):
        Cron(*args, **kwargs)


def test_two_entries_of_one_name_and_foreign_objects_are_refused(redis_url: str) -> None:
    with pytest.raises(flumeq.ConfigError, match="two cron entries are named 'a'"):
        flumeq.Engine({}, redis_url, cron=[Cron(1.0, "a"), Cron(2.0, "a")])
    with pytest.raises(flumeq.ConfigError, match=r"flumeq\.Cron objects"):
        flumeq.Engine({}, redis_url, cron=["* * * * *"])  # type: ignore[list-item]


def test_a_burst_engine_starts_no_cron_process(redis_url: str, r: redis.Redis) -> None:
    source = ENGINE.replace("run(processes=1)", "run(processes=1, burst=True)")
    engine = subprocess.run(
        [sys.executable, "-c", source, redis_url, "burst"],
        env=script_env(),
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert engine.returncode == 0, engine.stderr.decode()
    assert r.exists("flumeq:{cron}:lease:beat") == 0
