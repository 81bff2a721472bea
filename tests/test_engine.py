"""Engine end to end on a real Redis with real processes and signals."""

from __future__ import annotations

import asyncio
import contextvars
import json
import os
import signal
import time
from typing import Any

import psutil
import pytest
import redis

import flumeq
from conftest import counting_handler, process_redis, spawn_script, wait_until
from flumeq.redis_server import RedisServer, free_port

STREAM = "flumeq:{default}:stream"
DEAD = "flumeq:{default}:dead"


def dead_letters(r: redis.Redis, key: str = DEAD) -> list[dict[str, str]]:
    return [{k.decode(): v.decode() for k, v in entry.items()} for _, entry in r.xrange(key)]


def test_each_task_runs_exactly_once_and_streams_end_empty(redis_url: str, r: redis.Redis) -> None:
    client = flumeq.Client(redis_url)
    infos = client.enqueue_many([("count", {"n": n}) for n in range(5000)])
    engine = flumeq.Engine({"count": counting_handler(redis_url)}, redis_url)
    report = engine.run(processes=2, burst=True)
    runs = {key.decode(): int(value) for key, value in r.hgetall("runs").items()}
    assert runs == {info.id: 1 for info in infos}
    assert report == {
        "processed": 5000,
        "failed": 0,
        "retried": 0,
        "dead": 0,
        "skipped": 0,
        "handed_back": 0,
        "left_pending": 0,
        "restarts": 0,
        "dispatcher_restarts": 0,
        "cancelled": 0,
        "throttled": 0,
    }
    assert r.xlen(STREAM) == 0
    assert r.xpending(STREAM, "flumeq")["pending"] == 0
    stats = client.stats()
    assert (stats["ready"], stats["in_flight"], stats["processed"]) == (0, 0, 5000)
    # Nothing per task is left behind (memory back to baseline): the empty
    # stream, the counters and run-time histograms (per type, not per task),
    # the queue list. The engine's registry entry left with it.
    assert {key.decode() for key in r.keys("flumeq:*")} == {
        STREAM,
        "flumeq:{default}:stats",
        "flumeq:{default}:durations",
        "flumeq:queues",
    }


def test_handler_sees_the_task_as_enqueued(redis_url: str, r: redis.Redis) -> None:
    client = flumeq.Client(redis_url)
    info = client.enqueue(
        "look",
        {"to": "a@example.com"},
        queue="mail",
        max_retry=4,
        timeout=9,
        labels={"tenant": "acme"},
    )

    def look(task: flumeq.Task) -> None:
        process_redis(redis_url).set(
            "seen",
            json.dumps(
                {
                    "id": task.id,
                    "type": task.type,
                    "queue": task.queue,
                    "payload": task.payload,
                    "attempt": task.attempt,
                    "max_retry": task.max_retry,
                    "labels": task.labels,
                    "timeout": task.timeout,
                    "age": time.time() - task.enqueued_at,
                }
            ),
        )

    flumeq.Engine({"look": look}, redis_url, queues=["mail"]).run(processes=1, burst=True)
    seen = json.loads(r.get("seen"))
    assert seen.pop("age") < 30
    assert seen == {
        "id": info.id,
        "type": "look",
        "queue": "mail",
        "payload": {"to": "a@example.com"},
        "attempt": 0,
        "max_retry": 4,
        "labels": {"tenant": "acme"},
        "timeout": 9.0,
    }


def test_weighted_queues_are_all_served(redis_url: str, r: redis.Redis) -> None:
    client = flumeq.Client(redis_url)
    for queue in ("critical", "default", "low"):
        client.enqueue_many([("count", {}) for _ in range(300)], queue=queue)
    engine = flumeq.Engine(
        {"count": counting_handler(redis_url)},
        redis_url,
        queues={"critical": 6, "default": 3, "low": 1},
    )
    assert engine.run(processes=2, burst=True)["processed"] == 900
    assert r.hlen("runs") == 900


def test_two_engines_on_one_group_share_work_without_duplicates(
    redis_url: str, r: redis.Redis
) -> None:
    client = flumeq.Client(redis_url)
    infos = client.enqueue_many([("count", {"n": n}) for n in range(6000)])
    script = """
        import sys, time, flumeq
        from conftest import process_redis
        url, name = sys.argv[1], sys.argv[2]
        def count(task):
            process_redis(url).hincrby("runs", task.id, 1)
            process_redis(url).hincrby("by_engine", name, 1)
            time.sleep(0.0005)
        flumeq.Engine({"count": count}, url, consumer=name).run(processes=1, burst=True)
    """
    engines = [spawn_script(script, redis_url, name) for name in ("engine-a", "engine-b")]
    for engine in engines:
        assert engine.wait(120) == 0, engine.stderr.read() if engine.stderr else ""
    runs = {key.decode(): int(value) for key, value in r.hgetall("runs").items()}
    assert runs == {info.id: 1 for info in infos}
    shares = {key.decode(): int(value) for key, value in r.hgetall("by_engine").items()}
    assert sum(shares.values()) == 6000
    assert shares.get("engine-a", 0) > 0 and shares.get("engine-b", 0) > 0, shares


def test_failures_and_unknown_types_go_to_dead_letters(redis_url: str, r: redis.Redis) -> None:
    client = flumeq.Client(redis_url)
    ok = client.enqueue_many([("count", {}) for _ in range(50)])
    bad = client.enqueue("explode", {"why": "test"}, max_retry=0)
    unknown = client.enqueue("no-such-type", {})

    def explode(task: flumeq.Task) -> None:
        raise ValueError(f"cannot handle {task.payload['why']}")

    report = flumeq.Engine(
        {"count": counting_handler(redis_url), "explode": explode}, redis_url
    ).run(processes=2, burst=True)
    assert r.hlen("runs") == len(ok)
    dead = {entry["id"]: entry for entry in dead_letters(r)}
    assert set(dead) == {bad.id, unknown.id}
    assert dead[bad.id]["error"] == "ValueError: cannot handle test"
    assert "Traceback" in dead[bad.id]["traceback"] and "explode" in dead[bad.id]["traceback"]
    assert dead[bad.id]["reason"] == "error"
    assert dead[bad.id]["type"] == "explode" and json.loads(dead[bad.id]["payload"]) == {
        "why": "test"
    }
    assert dead[unknown.id]["reason"] == "unknown_type"
    assert "no handler registered for task type 'no-such-type'" in dead[unknown.id]["error"]
    assert r.xlen(STREAM) == 0
    assert report["dead"] == 2
    assert client.stats()["dead"] == 2


def test_garbage_entries_are_dead_lettered_with_the_field_named(
    redis_url: str, r: redis.Redis
) -> None:
    flumeq.Client(redis_url).enqueue("count", {})
    r.xadd(STREAM, {"hello": "world"})
    r.xadd(STREAM, {"id": "x1", "type": "count", "payload": "{not json"})
    r.xadd(STREAM, {"id": "x2", "type": "count", "payload": "{}", "attempt": "many"})
    r.xadd(STREAM, {"id": "x3", "type": "count", "payload": "{}", "labels": "[]"})
    flumeq.Client(redis_url).enqueue("count", {})
    flumeq.Engine({"count": counting_handler(redis_url)}, redis_url).run(processes=1, burst=True)
    assert r.hlen("runs") == 2
    errors = [(entry.get("id"), entry["reason"], entry["error"]) for entry in dead_letters(r)]
    assert (None, "invalid", "field 'id': missing") in errors
    assert (
        "x2",
        "invalid",
        "field 'attempt': expected a non-negative integer, got 'many'",
    ) in errors
    assert ("x3", "invalid", "field 'labels': expected a JSON object, got '[]'") in errors
    [payload_error] = [error for id_, _, error in errors if id_ == "x1"]
    assert payload_error.startswith("task x1: field 'payload':")
    assert r.xlen(STREAM) == 0


def test_killed_actor_is_replaced_and_nothing_is_lost(redis_url: str, r: redis.Redis) -> None:
    client = flumeq.Client(redis_url)
    infos = client.enqueue_many([("count", {"n": n}) for n in range(400)])
    killer = client.enqueue("die", {}, max_retry=0)

    def die(task: flumeq.Task) -> None:
        os.kill(os.getpid(), signal.SIGKILL)

    report = flumeq.Engine({"count": counting_handler(redis_url), "die": die}, redis_url).run(
        processes=2, burst=True
    )
    runs = {key.decode() for key in r.hkeys("runs")}
    assert runs == {info.id for info in infos}
    [dead] = dead_letters(r)
    assert dead["id"] == killer.id
    assert "killed by signal 9" in dead["error"]
    assert dead["reason"] == "crashed" and dead["attempts"] == "1"
    assert report["processed"] == 400 and r.xlen(STREAM) == 0


def test_hard_timeout_kills_the_actor_and_the_engine_goes_on(
    redis_url: str, r: redis.Redis
) -> None:
    client = flumeq.Client(redis_url)
    slow = client.enqueue("hang", {}, timeout=0.3, max_retry=0)
    infos = client.enqueue_many([("count", {}) for _ in range(20)])

    def hang(task: flumeq.Task) -> None:
        time.sleep(60)

    started = time.monotonic()
    flumeq.Engine({"count": counting_handler(redis_url), "hang": hang}, redis_url).run(
        processes=1, burst=True
    )
    assert time.monotonic() - started < 10
    assert {key.decode() for key in r.hkeys("runs")} == {info.id for info in infos}
    [dead] = dead_letters(r)
    assert dead["id"] == slow.id and dead["reason"] == "timeout"
    assert "longer than 0.3s" in dead["error"]


ENGINE_SCRIPT = """
    import logging, sys, time, flumeq
    from conftest import process_redis
    logging.basicConfig(level=logging.INFO)
    url = sys.argv[1]
    def slow(task):
        process_redis(url).hincrby("started", task.id, 1)
        time.sleep(task.payload["sleep"])
        process_redis(url).hincrby("runs", task.id, 1)
    report = flumeq.Engine({"slow": slow}, url, shutdown_timeout=10).run(processes=2)
    print("REPORT", report, flush=True)
"""


def test_sigterm_finishes_running_tasks_and_exits_zero(redis_url: str, r: redis.Redis) -> None:
    client = flumeq.Client(redis_url)
    client.enqueue_many([("slow", {"sleep": 0.2}) for _ in range(100)])
    engine = spawn_script(ENGINE_SCRIPT, redis_url)
    wait_until(lambda: r.hlen("started") >= 4)
    os.kill(engine.pid, signal.SIGTERM)
    out, err = engine.communicate(timeout=30)
    assert engine.returncode == 0, err.decode()
    started = {k.decode(): int(v) for k, v in r.hgetall("started").items()}
    runs = {k.decode(): int(v) for k, v in r.hgetall("runs").items()}
    # Every task that started also finished, exactly once; none was cut off.
    assert runs == started
    assert b"REPORT" in out
    stats = client.stats()
    # Nothing lost: each task is done, or still in the stream for the next engine.
    assert stats["processed"] == len(runs)
    assert stats["processed"] + stats["ready"] + stats["in_flight"] == 100


def test_idle_engine_uses_almost_no_cpu(redis_url: str) -> None:
    engine = spawn_script(ENGINE_SCRIPT, redis_url)
    try:
        time.sleep(2.0)  # start-up
        tree = psutil.Process(engine.pid)
        processes = [tree, *tree.children(recursive=True)]
        assert len(processes) == 4  # supervisor, dispatcher, 2 actors

        def cpu() -> float:
            total = 0.0
            for process in processes:
                times = process.cpu_times()
                total += times.user + times.system
            return total

        before = cpu()
        time.sleep(3.0)
        used = cpu() - before
        assert used < 0.09, f"idle engine used {used:.3f}s of CPU in 3s"
    finally:
        os.kill(engine.pid, signal.SIGTERM)
        assert engine.wait(20) == 0


def test_bad_engine_settings_are_clear_errors(redis_url: str) -> None:
    with pytest.raises(flumeq.ConfigError, match="handler for 'x' is not callable"):
        flumeq.Engine({"x": 42})  # type: ignore[dict-item]
    with pytest.raises(flumeq.ConfigError, match="weight must be an integer >= 1"):
        flumeq.Engine({}, queues={"a": 0})
    with pytest.raises(flumeq.ConfigError, match="processes must be an integer >= 1"):
        flumeq.Engine({}, redis_url).run(processes=0)
    with pytest.raises(flumeq.ConfigError, match="invalid queue name"):
        flumeq.Engine({}, redis_url, queues=["bad{name}"])


def test_engine_waits_for_redis_that_starts_late(tmp_path: Any) -> None:
    port = free_port()
    url = f"redis://127.0.0.1:{port}/0"
    script = """
        import sys, flumeq
        print(flumeq.Engine({"noop": lambda t: None}, sys.argv[1]).run(processes=1, burst=True))
    """
    # The task is written beforehand into the data directory (AOF) the late
    # server loads, so it is there before the engine can connect and see an
    # empty queue.
    data = str(tmp_path)
    with RedisServer(appendonly=True, directory=data) as seed:
        flumeq.Client(seed.url).enqueue("noop", {})
        seed.stop(keep_data=True)
    engine = spawn_script(script, url)
    time.sleep(1.5)
    assert engine.poll() is None  # still trying, not crashed
    with RedisServer(port=port, appendonly=True, directory=data):
        out, err = engine.communicate(timeout=30)
        assert engine.returncode == 0, err.decode()
        assert b"'processed': 1" in out


def test_async_handlers_run_concurrently_with_retries_and_timeouts(
    redis_url: str, r: redis.Redis
) -> None:
    client = flumeq.Client(redis_url)
    infos = client.enqueue_many([("wait", {"n": n}) for n in range(200)])
    flaky = client.enqueue("flaky", {}, max_retry=2)
    slow = client.enqueue("slow", {}, timeout=0.2, max_retry=0)
    plain = client.enqueue("count", {})

    async def wait(task: flumeq.Task) -> None:
        await asyncio.sleep(0.05)
        process_redis(redis_url).hincrby("runs", task.id, 1)

    async def flaky_handler(task: flumeq.Task) -> None:
        process_redis(redis_url).hincrby("runs", task.id, 1)
        if task.attempt == 0:
            raise ValueError("first try fails")

    async def slow_handler(task: flumeq.Task) -> None:
        await asyncio.sleep(5)

    started = time.monotonic()
    report = flumeq.Engine(
        {
            "wait": wait,
            "flaky": flaky_handler,
            "slow": slow_handler,
            "count": counting_handler(redis_url),
        },
        redis_url,
        retry_base=0.02,
        retry_max=0.05,
        concurrency=50,
    ).run(processes=1, burst=True)
    elapsed = time.monotonic() - started
    runs = {key.decode(): int(value) for key, value in r.hgetall("runs").items()}
    assert runs == {**{info.id: 1 for info in infos}, flaky.id: 2, plain.id: 1}
    assert elapsed < 3  # 200 tasks of 50 ms one after another would take 10 s
    [dead] = dead_letters(r)
    assert dead["id"] == slow.id and "longer than 0.2s" in dead["error"]
    assert report["retried"] == 1 and report["dead"] == 1


def test_async_concurrency_bound_and_a_fresh_context_per_task(
    redis_url: str, r: redis.Redis
) -> None:
    """However many tasks an actor holds, at most ``concurrency`` run at
    once; a context variable a handler sets is not seen by later tasks."""
    client = flumeq.Client(redis_url)
    client.enqueue_many([("probe", {"n": n}) for n in range(300)])
    seen = contextvars.ContextVar("seen", default="unset")
    state = {"active": 0, "peak": 0, "leaks": 0}

    async def probe(task: flumeq.Task) -> None:
        state["active"] += 1
        state["peak"] = max(state["peak"], state["active"])
        if seen.get() != "unset":
            state["leaks"] += 1
        seen.set(task.id)
        await asyncio.sleep(0.01)
        state["active"] -= 1
        if task.payload["n"] % 100 == 99:
            process_redis(redis_url).hset("probe", task.id, json.dumps(state))

    report = flumeq.Engine({"probe": probe}, redis_url, concurrency=7).run(processes=1, burst=True)
    assert report["processed"] == 300
    states = [json.loads(value) for value in r.hvals("probe")]
    assert states and all(item["peak"] == 7 and item["leaks"] == 0 for item in states), states


def test_async_tasks_of_separate_batches_run_side_by_side(redis_url: str, r: redis.Redis) -> None:
    """Tasks arriving one by one (one batch each) still share the actor's
    concurrency: a slow async task never holds back the next batch."""
    engine = spawn_script(
        """
        import asyncio, sys, flumeq
        from conftest import process_redis

        async def slow(task):
            r = process_redis(sys.argv[1])
            active = r.incr("active")
            r.eval("if tonumber(ARGV[1]) > tonumber(redis.call('get', KEYS[1]) or '0') then "
                   "redis.call('set', KEYS[1], ARGV[1]) end", 1, "peak", active)
            await asyncio.sleep(1.0)
            r.decr("active")

        flumeq.Engine({"slow": slow}, sys.argv[1], concurrency=50).run(processes=1)
        """,
        redis_url,
    )
    try:
        client = flumeq.Client(redis_url)
        wait_until(lambda: bool(r.exists("flumeq:workers")), timeout=30)
        for n in range(30):
            client.enqueue("slow", {"n": n})
            time.sleep(0.005)
        wait_until(
            lambda: int(r.hget("flumeq:{default}:stats", "processed") or 0) == 30, timeout=30
        )
        assert int(r.get("peak") or 0) >= 25
    finally:
        engine.send_signal(signal.SIGTERM)
        engine.wait(timeout=30)
