"""Cancellation against real engines: a ready or delayed task is removed and
never runs; a running one is reached on any engine within a second (a sync
handler gets ``flumeq.Cancelled``, an async one ``CancelledError``), one
stuck in C code has its actor killed after ``cancel_grace`` while the engine
keeps serving; a cancel made while the engine was cut off from Redis reaches
it once it is back. Cancelled is final: no retry, no dead letter, counted,
``TaskCancelled`` for waiters, unique key released."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
from typing import Any

import pytest
import redis
from click.testing import CliRunner

import flumeq
from conftest import CutProxy, script_env, spawn_script, wait_until
from flumeq.cli import main
from flumeq.redis_server import RedisServer

ENGINE = """
import asyncio, json, sys, time, flumeq
from conftest import process_redis

def started(task):
    r = process_redis(sys.argv[1])
    r.hincrby("runs", task.id, 1)
    r.set("started:" + task.id, repr(time.time()))
    return r

def loop(task):
    r = started(task)
    try:
        end = time.time() + 60
        spins = 0
        while time.time() < end:
            spins += 1
    except flumeq.Cancelled:
        r.set("cancelled:" + task.id, repr(time.time()))
        raise

def stuck(task):
    started(task)
    sum(range(10**11))  # minutes inside one C call that never looks at signals

async def nap(task):
    r = started(task)
    try:
        await asyncio.sleep(60)
    except asyncio.CancelledError:
        r.set("cancelled:" + task.id, repr(time.time()))
        raise

def quick(task):
    process_redis(sys.argv[1]).hincrby("runs", task.id, 1)

burst = len(sys.argv) > 2 and sys.argv[2] == "burst"
report = flumeq.Engine(
    {"loop": loop, "stuck": stuck, "nap": nap, "quick": quick}, sys.argv[1],
    cancel_grace=1.0, concurrency=4, claim_stale_after=60,
).run(processes=2, burst=burst)
print(json.dumps(report))
"""


def runs(r: redis.Redis) -> dict[str, int]:
    return {key.decode(): int(value) for key, value in r.hgetall("runs").items()}


def stop(engine: subprocess.Popen[bytes]) -> dict[str, Any]:
    engine.send_signal(signal.SIGTERM)
    out, err = engine.communicate(timeout=40)
    assert engine.returncode == 0, err.decode()[-3000:]
    print(err.decode()[-4000:])
    report: dict[str, Any] = json.loads(out.decode().strip().splitlines()[-1])
    return report


def stats(r: redis.Redis, queue: str = "default") -> dict[str, int]:
    return {k.decode(): int(v) for k, v in r.hgetall(f"flumeq:{{{queue}}}:stats").items()}


def test_ready_and_delayed_tasks_are_removed_and_never_run(redis_url: str, r: redis.Redis) -> None:
    client = flumeq.Client(redis_url)
    first, middle, last = (client.enqueue("quick", {"n": n}, result_ttl=60) for n in range(3))
    later = client.enqueue("quick", {}, delay=60, result_ttl=60, unique_key="warm")
    retry_like = client.enqueue("quick", {}, delay=60, task_id="order-17")
    assert client.cancel(middle) is True  # a TaskInfo carries its queue
    assert client.cancel(later.id, "default") is True
    assert client.cancel("order-17") is True
    assert r.zcard("flumeq:{default}:delayed") == 0
    # The unique key went with its task: the same key can be used again.
    again = client.enqueue("quick", {}, unique_key="warm")
    # Gone, unknown, or never there: False, nothing written.
    assert client.cancel(middle) is False
    assert client.cancel("no-such-task") is False
    assert client.cancel(retry_like.id, "other-queue") is False
    assert r.exists("flumeq:{default}:cancels") == 0
    with pytest.raises(flumeq.InvalidTask, match="non-empty"):
        client.cancel("")
    with pytest.raises(flumeq.ConfigError):
        client.cancel("x", "bad}queue")
    for info in (middle, later):
        with pytest.raises(flumeq.TaskCancelled):
            info.result(timeout=1)

    done = subprocess.run(
        [sys.executable, "-c", ENGINE, redis_url, "burst"],
        env=script_env(),
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    assert set(runs(r)) == {first.id, last.id, again.id}
    counts = stats(r)
    assert counts["cancelled"] == 3 and counts["cancelled|quick"] == 3
    assert counts.get("dead", 0) == 0 and counts.get("failed", 0) == 0
    assert client.stats()["cancelled"] == 3


@pytest.mark.parametrize("kind", ["loop", "nap"])
def test_a_running_task_is_stopped_on_any_engine_within_a_second(
    redis_url: str, r: redis.Redis, kind: str
) -> None:
    """A sync handler spinning in Python gets ``flumeq.Cancelled``; an async
    one ``CancelledError``. Two engines: whichever runs it is reached."""
    client = flumeq.Client(redis_url)
    engines = [spawn_script(ENGINE, redis_url) for _ in range(2)]
    try:
        info = client.enqueue(kind, {}, result_ttl=60, max_retry=3, unique_key=f"u-{kind}")
        wait_until(lambda: r.exists(f"started:{info.id}") == 1, timeout=30)
        asked = time.time()
        assert client.cancel(info) is True
        wait_until(lambda: r.exists(f"cancelled:{info.id}") == 1, timeout=10)
        reach = float(r.get(f"cancelled:{info.id}") or 0) - asked
        print(f"cancel reach ({kind}): the handler was interrupted {reach:.3f}s after the cancel")
        assert reach < 1.0
        with pytest.raises(flumeq.TaskCancelled):
            info.result(timeout=10)
        # The engines carry on, and the cancelled task is not run again.
        quick = client.enqueue_many([("quick", {"n": n}) for n in range(20)])
        wait_until(lambda: all(q.id in runs(r) for q in quick), timeout=20)
        client.enqueue("quick", {}, unique_key=f"u-{kind}")  # released
        time.sleep(1.5)
        assert runs(r)[info.id] == 1
    finally:
        reports = [stop(engine) for engine in engines]
    assert sum(report["cancelled"] for report in reports) == 1
    assert sum(report["restarts"] for report in reports) == 0
    counts = stats(r)
    assert counts["cancelled"] == 1
    assert counts.get("retried", 0) == 0 and counts.get("dead", 0) == 0
    assert r.xlen("flumeq:{default}:dead") == 0


def test_a_handler_stuck_in_c_code_is_killed_after_the_grace(
    redis_url: str, r: redis.Redis
) -> None:
    client = flumeq.Client(redis_url)
    engine = spawn_script(ENGINE, redis_url)
    try:
        info = client.enqueue("stuck", {}, result_ttl=60)
        wait_until(lambda: r.exists(f"started:{info.id}") == 1, timeout=30)
        asked = time.monotonic()
        assert client.cancel(info) is True
        with pytest.raises(flumeq.TaskCancelled):
            info.result(timeout=15)
        took = time.monotonic() - asked
        print(f"a handler stuck in C ended as cancelled {took:.2f}s after the cancel (grace 1 s)")
        assert 0.9 <= took < 5
        # The engine serves on: the killed actor was replaced.
        quick = client.enqueue_many([("quick", {"n": n}) for n in range(20)])
        wait_until(lambda: all(q.id in runs(r) for q in quick), timeout=30)
        assert runs(r)[info.id] == 1
    finally:
        report = stop(engine)
    assert report["cancelled"] == 1 and report["restarts"] == 1
    assert stats(r).get("failed", 0) == 0


def test_a_cancel_made_while_the_engine_was_cut_off_reaches_it_when_it_is_back(
    redis_server: RedisServer, redis_url: str, r: redis.Redis
) -> None:
    """The cancel is a record, not a message: the engine reads it after it
    reconnects (pub/sub would have lost it)."""
    proxy = CutProxy(redis_server.port)
    client = flumeq.Client(redis_url)
    engine = spawn_script(ENGINE, proxy.url)
    try:
        info = client.enqueue("loop", {}, result_ttl=60)
        wait_until(lambda: r.exists(f"started:{info.id}") == 1, timeout=30)
        proxy.cut()
        assert client.cancel(info) is True
        time.sleep(1.5)
        assert r.exists(f"cancelled:{info.id}") == 0, "reached without a connection?"
        proxy.mend()
        mended = time.monotonic()
        with pytest.raises(flumeq.TaskCancelled):
            info.result(timeout=20)
        print(f"cancel reached the reconnected engine {time.monotonic() - mended:.2f}s after")
        assert r.exists(f"cancelled:{info.id}") == 1
    finally:
        report = stop(engine)
        proxy.close()
    assert report["cancelled"] == 1


def test_cancel_from_the_cli(redis_url: str, r: redis.Redis) -> None:
    client = flumeq.Client(redis_url)
    info = client.enqueue("quick", {}, queue="mail", delay=60)
    runner = CliRunner()
    result = runner.invoke(main, ["cancel", info.id, "--queue", "mail", "--url", redis_url])
    assert result.exit_code == 0, result.output
    assert f"cancelled {info.id}" in result.output
    result = runner.invoke(main, ["cancel", info.id, "-q", "mail", "--url", redis_url])
    assert result.exit_code == 1
    assert "not found in queue 'mail'" in result.output
    assert r.zcard("flumeq:{mail}:delayed") == 0


async def _async_cancel(url: str) -> tuple[bool, bool]:
    async with flumeq.AsyncClient(url) as client:
        info = await client.enqueue("quick", {}, delay=60)
        return await client.cancel(info), await client.cancel(info.id)


def test_async_client_cancel(redis_url: str) -> None:
    assert asyncio.run(_async_cancel(redis_url)) == (True, False)
