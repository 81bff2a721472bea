"""Pause and resume against real engines: within a second no engine starts
a task of a paused queue (tasks already handed to actors go back unrun),
enqueues and delayed moves go on, running tasks finish, and after a resume
every task runs exactly once."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest
import redis
from click.testing import CliRunner

import flumeq
from conftest import kill_dispatcher, script_env, spawn_script, wait_until
from flumeq.admin import Admin
from flumeq.cli import main
from flumeq.metrics import render

ENGINE = """
import asyncio, sys, time, flumeq
from conftest import process_redis

def record(task):
    r = process_redis(sys.argv[1])
    r.rpush("starts:" + task.queue, repr(time.time()))
    r.hincrby("runs", task.id, 1)

def slow(task):
    record(task)
    time.sleep(0.05)

async def slow_async(task):
    record(task)
    await asyncio.sleep(0.2)

flumeq.Engine({"slow": slow, "slow_async": slow_async}, sys.argv[1], queues=("a", "b"),
              concurrency=3).run(processes=1)
"""


def starts(r: redis.Redis, queue: str) -> list[float]:
    return [float(value) for value in r.lrange(f"starts:{queue}", 0, -1)]


def runs(r: redis.Redis) -> dict[str, int]:
    return {key.decode(): int(value) for key, value in r.hgetall("runs").items()}


def stop(engines: list[subprocess.Popen[bytes]]) -> None:
    for engine in engines:
        engine.send_signal(signal.SIGTERM)
    for engine in engines:
        engine.wait(timeout=30)


@pytest.mark.parametrize("kind", ["slow", "slow_async"])
def test_pause_stops_every_engine_within_a_second_and_resume_runs_the_rest(
    redis_url: str, r: redis.Redis, kind: str
) -> None:
    client = flumeq.Client(redis_url)
    engines = [spawn_script(ENGINE, redis_url) for _ in range(2)]
    try:
        infos = client.enqueue_many([(kind, {"n": n}) for n in range(400)], queue="a")
        wait_until(lambda: len(starts(r, "a")) >= 20, timeout=30)
        assert client.pause("a") is True
        assert client.pause("a") is False  # paused already
        paused_at = time.time()
        # Enqueues and delayed moves go on; the other queue keeps running.
        more = client.enqueue_many([(kind, {"n": n}) for n in range(50)], queue="a")
        later = client.enqueue(kind, {"n": "delayed"}, queue="a", delay=0.2)
        others = client.enqueue_many([(kind, {"n": n}) for n in range(10)], queue="b")
        time.sleep(2.0)
        reach = max(starts(r, "a")) - paused_at
        print(f"pause reach ({kind}): last start of a paused queue's task {reach:.3f}s after")
        late = [at for at in starts(r, "a") if at > paused_at + 1.0]
        assert late == [], f"{len(late)} task(s) of a paused queue started after 1 s"
        assert r.zcard("flumeq:{a}:delayed") == 0  # moved to the stream meanwhile
        assert client.stats("a")["ready"] > 0
        wait_until(lambda: all(info.id in runs(r) for info in others), timeout=30)
        assert client.paused() == ["a"]

        assert client.resume("a") is True
        assert client.resume("a") is False
        every = [*infos, *more, later]
        wait_until(lambda: len(runs(r)) == len(every) + len(others), timeout=60)
        counts = runs(r)
        assert all(counts[info.id] == 1 for info in every), "a task ran twice or not at all"
        assert client.paused() == []
    finally:
        stop(engines)
    for engine in engines:
        assert engine.returncode == 0


def test_an_engine_started_while_its_queue_is_paused_runs_only_the_others(
    redis_url: str, r: redis.Redis
) -> None:
    """The paused set is read before the first task is: a burst engine runs
    queue b, leaves paused a untouched, and ends (a paused queue's tasks are
    not work left for a burst)."""
    client = flumeq.Client(redis_url)
    client.pause("a")
    waiting = client.enqueue_many([("slow", {"n": n}) for n in range(30)], queue="a")
    done = client.enqueue_many([("slow", {"n": n}) for n in range(30)], queue="b")
    engine = subprocess.run(
        [
            sys.executable,
            "-c",
            ENGINE.replace("run(processes=1)", "run(processes=1, burst=True)"),
            redis_url,
        ],
        env=script_env(),
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert engine.returncode == 0, engine.stderr.decode()
    counts = runs(r)
    assert all(counts.get(info.id) == 1 for info in done)
    assert not any(info.id in counts for info in waiting)
    assert client.stats("a")["ready"] == 30


def test_paused_state_in_admin_cli_metrics_and_bad_names(redis_url: str, r: redis.Redis) -> None:
    client = flumeq.Client(redis_url)
    client.enqueue("t", {}, queue="mail")
    runner = CliRunner()
    out = runner.invoke(main, ["queue", "pause", "mail", "typo", "--url", redis_url])
    assert out.exit_code == 0, out.output
    assert "paused 'mail'\n" in out.output
    assert "paused 'typo' (no task was ever enqueued to it)" in out.output
    listing = runner.invoke(main, ["queue", "list", "--url", redis_url])
    assert listing.exit_code == 0, listing.output
    assert [line.split()[:2] for line in listing.output.splitlines()[2:]] == [
        ["mail", "paused"],
        ["typo", "paused"],
    ]
    stats = runner.invoke(main, ["stats", "--url", redis_url])
    assert "mail (paused)" in stats.output
    with Admin(redis_url) as admin:
        [row] = admin.overview(["mail"])
        assert row["paused"] is True
        text = render(admin)[0].decode()
    assert 'flumeq_queue_paused{queue="mail"} 1.0' in text
    out = runner.invoke(main, ["queue", "resume", "mail", "--url", redis_url])
    assert "resumed 'mail'" in out.output
    assert client.paused() == ["typo"]

    for bad in ("", "a{b}", 3):
        with pytest.raises(flumeq.ConfigError):
            client.pause(bad)  # type: ignore[arg-type]
    assert client.paused() == ["typo"]
    out = runner.invoke(main, ["queue", "pause", "x}y", "--url", redis_url])
    assert out.exit_code != 0 and "x}y" in out.output


def test_a_dispatcher_killed_while_its_queue_is_paused_starts_none_of_it(
    redis_url: str, r: redis.Redis
) -> None:
    """The marks actors check live in the engine's shared memory and the
    paused set in Redis: a dispatcher restarted after kill -9 reads the set
    before its first read, so nothing of the paused queue starts, and a
    resume then runs every task once."""
    source = ENGINE.replace('queues=("a", "b"),', 'queues=("a", "b"), consumer="pausing",')
    assert "consumer=" in source
    client = flumeq.Client(redis_url)
    engine = spawn_script(source, redis_url)
    try:
        infos = client.enqueue_many([("slow", {"n": n}) for n in range(300)], queue="a")
        wait_until(lambda: len(starts(r, "a")) >= 10, timeout=30)
        client.pause("a")
        time.sleep(1.0)
        kill_dispatcher(r, "pausing")
        restarted = time.time()
        time.sleep(2.0)
        late = [at for at in starts(r, "a") if at > restarted]
        assert late == [], f"{len(late)} task(s) of the paused queue started after the restart"
        assert engine.poll() is None
        client.resume("a")
        wait_until(lambda: all(info.id in runs(r) for info in infos), timeout=60)
    finally:
        stop([engine])
    # Nothing of "a" ran when the dispatcher (and its actors) died: the
    # queue had been paused a second before, so each task ran once.
    assert all(count == 1 for count in runs(r).values())
    assert engine.returncode == 0
