"""Global limits against real engines: a rate limit held across two
engines (no one-second window starts more than the limit plus its burst,
and a task held back costs no attempt), a concurrency limit across two
engines of three processes (never more running at once than the limit), a
lease held by an engine killed with -9 freeing within seconds, and bad
limits refused before anything is written."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import time
from typing import Any

import pytest
import redis

import flumeq
from conftest import kill_dispatcher, spawn_script, wait_until
from flumeq import limits
from flumeq.cli import _add_limits
from flumeq.redis_server import RedisServer

ENGINE = """
import json, sys, time, flumeq
from conftest import process_redis

url, mode, processes = sys.argv[1], sys.argv[2], int(sys.argv[3])

def mail(task):
    process_redis(url).rpush("starts", json.dumps([time.time(), task.id, task.attempt]))

def free(task):
    process_redis(url).hincrby("free", task.id, 1)

def report(task):
    started = time.time()
    r = process_redis(url)
    r.set("started:" + task.id, repr(started))
    time.sleep(task.payload)
    r.rpush("spans", json.dumps([started, time.time(), task.id]))

handlers = {"mail": mail, "free": free, "report": report}
if mode == "rate":
    engine = flumeq.Engine(handlers, url, rate_limits={"mail": "20/s"})
else:
    engine = flumeq.Engine(handlers, url, concurrency_limits={"report": 2})
report = engine.run(processes=processes, burst=len(sys.argv) > 4)
print(json.dumps(report))
"""


def finish(engine: subprocess.Popen[bytes], timeout: float = 60) -> dict[str, Any]:
    out, err = engine.communicate(timeout=timeout)
    assert engine.returncode == 0, err.decode()[-3000:]
    report: dict[str, Any] = json.loads(out.decode().strip().splitlines()[-1])
    return report


def test_a_rate_limit_holds_across_two_engines_and_costs_no_attempt(
    redis_url: str, r: redis.Redis
) -> None:
    client = flumeq.Client(redis_url)
    client.enqueue_many([("mail", n) for n in range(100)])
    client.enqueue_many([("free", n) for n in range(200)])
    engines = [spawn_script(ENGINE, redis_url, "rate", "1", "burst") for _ in range(2)]
    reports = [finish(engine) for engine in engines]
    starts = sorted(json.loads(raw) for raw in r.lrange("starts", 0, -1))
    assert len(starts) == 100
    assert len({task_id for _, task_id, _ in starts}) == 100, "each task ran once"
    assert {attempt for _, _, attempt in starts} == {0}, "a held-back task costs no attempt"
    times = [at for at, _, _ in starts]
    bound = 20 + limits.burst(20)
    worst = max(sum(1 for t in times if start <= t < start + 1.0) for start in times)
    assert worst <= bound, (
        f"a 1 s window started {worst} tasks (limit 20, burst {limits.burst(20)})"
    )
    rate = (len(times) - 1) / (times[-1] - times[0])
    assert 14 <= rate <= bound, f"{rate:.1f} tasks/s"
    print(f"rate 20/s over two engines: {rate:.2f} tasks/s, busiest 1 s window {worst}")
    # The free type was not held back.
    assert len(r.hgetall("free")) == 200
    assert sum(report["throttled"] for report in reports) > 0
    assert sum(report["failed"] + report["dead"] for report in reports) == 0
    stats = r.hgetall("flumeq:{default}:stats")
    assert int(stats[b"throttled|mail"]) == sum(report["throttled"] for report in reports)
    assert b"throttled|free" not in stats


def overlap(spans: list[tuple[float, float]]) -> int:
    """Most spans open at once."""
    events = sorted([(start, 1) for start, _ in spans] + [(end, -1) for _, end in spans])
    running = most = 0
    for _, change in events:
        running += change
        most = max(most, running)
    return most


def test_a_concurrency_limit_holds_across_two_engines_of_three_processes(
    redis_url: str, r: redis.Redis
) -> None:
    client = flumeq.Client(redis_url)
    client.enqueue_many([("report", 0.3) for _ in range(12)])
    client.enqueue_many([("free", n) for n in range(50)])
    engines = [spawn_script(ENGINE, redis_url, "leases", "3", "burst") for _ in range(2)]
    reports = [finish(engine) for engine in engines]
    spans = [json.loads(raw) for raw in r.lrange("spans", 0, -1)]
    assert len({task_id for _, _, task_id in spans}) == len(spans) == 12
    assert overlap([(start, end) for start, end, _ in spans]) == 2
    print(
        f"concurrency 2: 12 runs of 0.3 s took {max(e for _, e, _ in spans) - min(b for b, _, _ in spans):.2f} s"
    )
    assert len(r.hgetall("free")) == 50
    assert sum(report["throttled"] for report in reports) > 0
    assert sum(report["processed"] for report in reports) == 62
    # Every lease was freed as its task ended.
    assert r.zcard("flumeq:{limits}:running:report") == 0


def test_a_lease_of_an_engine_killed_with_minus_9_frees_within_seconds(
    redis_url: str, r: redis.Redis
) -> None:
    client = flumeq.Client(redis_url)
    holder = spawn_script(ENGINE, redis_url, "leases", "2")
    waiter = None
    try:
        client.enqueue("report", 60, task_id="long-a")
        client.enqueue("report", 60, task_id="long-b")
        wait_until(lambda: r.exists("started:long-a", "started:long-b") == 2, timeout=30)
        assert r.zcard("flumeq:{limits}:running:report") == 2
        waiter = spawn_script(ENGINE, redis_url, "leases", "1")
        client.enqueue("report", 0.01, task_id="short")
        wait_until(lambda: int(r.hget("flumeq:{default}:stats", "throttled") or 0) > 0)
        time.sleep(1.0)
        assert not r.exists("started:short"), "it ran while both places were held"
        os.killpg(holder.pid, signal.SIGKILL)
        killed_at = time.time()
        holder.wait(timeout=10)
        wait_until(lambda: r.exists("started:short") == 1, timeout=15)
        freed_after = float(r.get("started:short") or 0) - killed_at
        assert freed_after < 9.0, f"the dead engine's places freed after {freed_after:.1f} s"
        print(f"lease freed {freed_after:.2f} s after kill -9")
    finally:
        for engine in (holder, waiter):
            if engine is not None and engine.poll() is None:
                engine.send_signal(signal.SIGTERM)
                engine.communicate(timeout=40)


LIMITED = """
import sys, time, flumeq
from conftest import process_redis

url = sys.argv[1]

def report(task):
    r = process_redis(url)
    r.hincrby("started", task.id, 1)
    time.sleep(task.payload)
    r.hincrby("runs", task.id, 1)

flumeq.Engine(
    {"report": report}, url, consumer="limited", concurrency_limits={"report": 2},
    shutdown_timeout=2, claim_stale_after=60,
).run(processes=2)
"""


def test_limits_survive_a_killed_dispatcher_and_a_redis_restart() -> None:
    server = RedisServer(appendonly=True).start()
    try:
        url = server.url
        r = redis.Redis.from_url(url)
        infos = flumeq.Client(url).enqueue_many([("report", 0.2) for _ in range(30)])
        engine = spawn_script(LIMITED, url)
        try:
            wait_until(lambda: r.hlen("runs") >= 3, timeout=30)
            kill_dispatcher(r, "limited")
            wait_until(lambda: r.hlen("runs") >= 10, timeout=60)
            server.kill()
            time.sleep(1.0)
            server.start()
            r = redis.Redis.from_url(url)
            wait_until(lambda: r.hlen("runs") == len(infos), timeout=90)
            assert engine.poll() is None
        finally:
            engine.send_signal(signal.SIGTERM)
            _, err = engine.communicate(timeout=40)
        assert engine.returncode == 0, err.decode()[-3000:]
        assert r.zcard("flumeq:{limits}:running:report") == 0, "a lease outlived the stop"
        stats = r.hgetall("flumeq:{default}:stats")
        assert int(stats.get(b"dead", 0)) == 0
    finally:
        server.stop()


def test_a_stop_with_redis_gone_while_leases_are_held_is_bounded() -> None:
    server = RedisServer().start()
    try:
        url = server.url
        r = redis.Redis.from_url(url)
        flumeq.Client(url).enqueue_many([("report", 0.5) for _ in range(20)])
        engine = spawn_script(LIMITED, url)
        wait_until(lambda: r.hlen("started") >= 2, timeout=30)
        server.kill()
        time.sleep(0.5)
        started = time.monotonic()
        os.killpg(engine.pid, signal.SIGTERM)
        _, err = engine.communicate(timeout=60)
        took = time.monotonic() - started
    finally:
        server.stop()
    assert engine.returncode == 0, err.decode()[-3000:]
    # shutdown_timeout (2 s) plus the bounded grace for the last writes.
    assert took < 15, f"shutdown took {took:.1f}s with redis gone"


def handler(task: Any) -> None:
    pass


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"rate_limits": {"mail": "fast"}}, "rate_limits['mail']: expected a rate like '100/s'"),
        ({"rate_limits": {"mail": "0/s"}}, "got '0/s'"),
        ({"rate_limits": {"mail": "10/d"}}, "got '10/d'"),
        ({"rate_limits": {"mail": 10}}, "got 10"),
        ({"rate_limits": ["mail"]}, "rate_limits must map task types"),
        ({"concurrency_limits": {"mail": 0}}, "concurrency_limits['mail']: expected a whole"),
        ({"concurrency_limits": {"mail": "2"}}, "got '2'"),
        ({"concurrency_limits": {"": 2}}, "keys must be task type strings"),
    ],
)
def test_bad_limits_are_refused_before_anything_is_written(
    redis_url: str, r: redis.Redis, options: dict[str, Any], message: str
) -> None:
    with pytest.raises(flumeq.ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        flumeq.Engine({"mail": handler}, redis_url, **options)
    assert r.dbsize() == 0


def test_rates_parse_and_a_limit_on_an_unserved_type_warns(
    caplog: pytest.LogCaptureFixture,
) -> None:
    assert limits.parse_rate("100/s") == (100, 1000)
    assert limits.parse_rate(" 20 / m ") == (20, 60_000)
    assert limits.parse_rate("5/h") == (5, 3_600_000)
    with caplog.at_level(logging.WARNING, logger="flumeq.limits"):
        engine = flumeq.Engine(
            {"mail": handler},
            "redis://127.0.0.1:1/0",
            rate_limits={"mail": "5/s", "sms": "1/s"},
            concurrency_limits={"report": 2},
        )
    warned = [record.getMessage() for record in caplog.records]
    assert len(warned) == 2
    assert "'report'" in warned[0] and "'sms'" in warned[1]
    assert engine.rate_limits == [("mail", 5, 1000), ("sms", 1, 1000)]


def test_garbage_in_the_limit_keys_is_replaced_not_failed_on(
    redis_url: str, r: redis.Redis
) -> None:
    r.set("flumeq:{limits}:running:report", "garbage")
    r.hset("flumeq:{limits}:rate:mail", "not", "a string")
    client = flumeq.Client(redis_url)
    client.enqueue_many([("mail", n) for n in range(5)])
    report = finish(spawn_script(ENGINE, redis_url, "rate", "1", "burst"))
    assert report["processed"] == 5
    assert r.type("flumeq:{limits}:rate:mail") in (b"string", b"none")


def test_the_worker_command_line_adds_limits() -> None:
    engine = flumeq.Engine(
        {"mail": handler, "report": handler},
        "redis://127.0.0.1:1/0",
        rate_limits={"mail": "5/s"},
    )
    _add_limits(engine, ("mail=2/m",), ("report=3",))
    assert engine.rate_limits == [("mail", 2, 60_000)]
    assert engine.concurrency_limits == [("report", 3)]
    with pytest.raises(flumeq.ConfigError, match="expects TYPE=VALUE"):
        _add_limits(engine, ("mail",), ())
    with pytest.raises(flumeq.ConfigError, match=r"concurrency_limits\['report'\]"):
        _add_limits(engine, (), ("report=two",))
