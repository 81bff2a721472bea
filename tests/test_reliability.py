"""Reliability promises, each shown with real processes, signals and Redis."""

from __future__ import annotations

import json
import os
import signal
import time
from datetime import datetime, timedelta, timezone

import pytest
import redis

import flumeq
from conftest import counting_handler, process_redis, spawn_script, wait_until
from flumeq.redis_server import RedisServer

STREAM = "flumeq:{default}:stream"
DELAYED = "flumeq:{default}:delayed"

FAST = {"retry_base": 0.02, "retry_max": 0.05}


def runs(r: redis.Redis) -> dict[str, int]:
    return {key.decode(): int(value) for key, value in r.hgetall("runs").items()}


def test_failing_task_is_retried_with_attempt_counts_then_succeeds(
    redis_url: str, r: redis.Redis
) -> None:
    client = flumeq.Client(redis_url)
    info = client.enqueue("flaky", {"fail_times": 2}, max_retry=5)

    def flaky(task: flumeq.Task) -> None:
        conn = process_redis(redis_url)
        conn.rpush("attempts", task.attempt)
        if task.attempt < task.payload["fail_times"]:
            raise RuntimeError(f"failure {task.attempt}")

    report = flumeq.Engine({"flaky": flaky}, redis_url, **FAST).run(processes=1, burst=True)
    assert [int(a) for a in r.lrange("attempts", 0, -1)] == [0, 1, 2]
    assert report["processed"] == 1 and report["failed"] == 2 and report["retried"] == 2
    assert client.dead_letters() == []
    stats = client.stats()
    assert (stats["processed"], stats["failed"], stats["delayed"]) == (1, 2, 0)
    assert r.xlen(STREAM) == 0 and info.id


def test_retries_spent_end_in_dead_letters_with_the_last_error(
    redis_url: str, r: redis.Redis
) -> None:
    client = flumeq.Client(redis_url)
    info = client.enqueue("always", {"x": 1}, max_retry=3)

    def always(task: flumeq.Task) -> None:
        process_redis(redis_url).hincrby("runs", task.id, 1)
        raise ValueError(f"bad run {task.attempt}")

    flumeq.Engine({"always": always}, redis_url, **FAST).run(processes=1, burst=True)
    assert runs(r) == {info.id: 4}  # max_retry=3 means at most 4 runs
    [dead] = client.dead_letters()
    assert dead["id"] == info.id and dead["type"] == "always"
    assert dead["payload"] == {"x": 1}
    assert dead["reason"] == "error"
    assert dead["error"] == "ValueError: bad run 3"
    assert dead["attempts"] == 4
    assert "raise ValueError" in dead["traceback"]
    assert abs(dead["failed_at"] - time.time()) < 30


def test_retry_with_delay_and_reject(redis_url: str, r: redis.Redis) -> None:
    client = flumeq.Client(redis_url)
    client.enqueue("later", {})
    rejected = client.enqueue("refuse", {})

    def later(task: flumeq.Task) -> None:
        process_redis(redis_url).rpush("times", time.time())
        if task.attempt == 0:
            raise flumeq.Retry(delay=0.4)

    def refuse(task: flumeq.Task) -> None:
        process_redis(redis_url).hincrby("runs", task.id, 1)
        raise flumeq.Reject("not for us")

    flumeq.Engine({"later": later, "refuse": refuse}, redis_url).run(processes=1, burst=True)
    first, second = (float(t) for t in r.lrange("times", 0, -1))
    assert 0.4 <= second - first < 1.5
    assert runs(r) == {rejected.id: 1}
    [dead] = client.dead_letters()
    assert (dead["id"], dead["reason"], dead["error"]) == (
        rejected.id,
        "rejected",
        "Reject: not for us",
    )


def test_backoff_grows_exponentially_and_is_capped(redis_url: str, r: redis.Redis) -> None:
    flumeq.Client(redis_url).enqueue("fail", {}, max_retry=4)

    def fail(task: flumeq.Task) -> None:
        process_redis(redis_url).rpush("times", time.time())
        raise RuntimeError("again")

    flumeq.Engine({"fail": fail}, redis_url, retry_base=0.1, retry_max=0.3).run(
        processes=1, burst=True
    )
    times = [float(t) for t in r.lrange("times", 0, -1)]
    gaps = [b - a for a, b in zip(times, times[1:])]
    assert len(gaps) == 4
    # 0.1, 0.2, then capped at 0.3 (jitter takes up to a quarter off).
    assert 0.07 <= gaps[0] < 0.3
    assert 0.15 <= gaps[1] < 0.45
    assert 0.22 <= gaps[2] < 0.55 and 0.22 <= gaps[3] < 0.55


def test_delayed_tasks_run_on_time(redis_url: str, r: redis.Redis) -> None:
    client = flumeq.Client(redis_url)
    enqueued = time.time()
    late = client.enqueue("stamp", {"name": "delay"}, delay=0.8)
    at = client.enqueue(
        "stamp", {"name": "at"}, at=datetime.now(timezone.utc) + timedelta(seconds=1.2)
    )
    client.enqueue("stamp", {"name": "now"})
    assert late.entry_id is None and at.entry_id is None
    assert client.stats()["delayed"] == 2
    member = json.loads(r.zrange(DELAYED, 0, 0)[0])
    assert member[:4] == ["id", late.id, "type", "stamp"]

    def stamp(task: flumeq.Task) -> None:
        process_redis(redis_url).hset("ran_at", task.payload["name"], time.time())

    flumeq.Engine({"stamp": stamp}, redis_url).run(processes=1, burst=True)
    ran = {k.decode(): float(v) - enqueued for k, v in r.hgetall("ran_at").items()}
    assert ran["now"] < 0.5
    # Within ~100 ms of the due time (plus scheduling slack on a busy machine).
    assert 0.8 <= ran["delay"] < 1.1, ran
    assert 1.2 <= ran["at"] < 1.5, ran
    assert r.zcard(DELAYED) == 0


def test_burst_waits_for_tasks_that_are_only_scheduled(redis_url: str, r: redis.Redis) -> None:
    client = flumeq.Client(redis_url)
    info = client.enqueue("count", {}, delay=0.5)
    flumeq.Engine({"count": counting_handler(redis_url)}, redis_url).run(processes=1, burst=True)
    assert runs(r) == {info.id: 1}


def test_past_deadline_is_not_run(redis_url: str, r: redis.Redis) -> None:
    client = flumeq.Client(redis_url)
    info = client.enqueue("count", {}, deadline=datetime.now(timezone.utc) - timedelta(seconds=1))
    flumeq.Engine({"count": counting_handler(redis_url)}, redis_url).run(processes=1, burst=True)
    assert runs(r) == {}
    [dead] = client.dead_letters()
    assert (dead["id"], dead["reason"]) == (info.id, "expired")


def test_dead_letters_can_be_listed_requeued_and_purged(redis_url: str, r: redis.Redis) -> None:
    client = flumeq.Client(redis_url)
    doomed = [client.enqueue("nope", {"n": n}, max_retry=0) for n in range(3)]
    flumeq.Engine({}, redis_url).run(processes=1, burst=True)
    letters = client.dead_letters(limit=2)
    assert [letter["id"] for letter in letters] == [doomed[2].id, doomed[1].id]
    assert client.requeue_dead(ids=[doomed[0].id]) == 1
    assert client.requeue_dead(ids=[]) == 0
    assert client.stats()["dead"] == 2
    flumeq.Engine({"nope": counting_handler(redis_url)}, redis_url).run(processes=1, burst=True)
    assert runs(r) == {doomed[0].id: 1}
    assert client.requeue_dead() == 2
    entries = [
        {k.decode(): v.decode() for k, v in fields.items()} for _, fields in r.xrange(STREAM)
    ]
    assert {entry["id"] for entry in entries} == {doomed[1].id, doomed[2].id}
    assert all(entry["attempt"] == "0" and "error" not in entry for entry in entries)
    r.delete(STREAM)
    flumeq.Engine({}, redis_url).run(processes=1, burst=True)  # nothing to do
    client.enqueue("nope", {}, max_retry=0)
    flumeq.Engine({}, redis_url).run(processes=1, burst=True)
    assert client.purge_dead() == 1
    assert client.dead_letters() == [] and client.stats()["dead"] == 0


def test_unique_key_blocks_duplicates_until_the_task_finishes(
    redis_url: str, r: redis.Redis
) -> None:
    client = flumeq.Client(redis_url)
    first = client.enqueue("count", {}, unique_key="report:42")
    with pytest.raises(flumeq.DuplicateTask, match="report:42"):
        client.enqueue("count", {}, unique_key="report:42")
    assert client.stats()["ready"] == 1
    flumeq.Engine({"count": counting_handler(redis_url)}, redis_url).run(processes=1, burst=True)
    second = client.enqueue("count", {}, unique_key="report:42")  # released on success
    dead = client.enqueue("missing-handler", {}, unique_key="job:7", max_retry=0)
    flumeq.Engine({"count": counting_handler(redis_url)}, redis_url).run(processes=1, burst=True)
    assert runs(r) == {first.id: 1, second.id: 1}
    client.enqueue("count", {}, unique_key="job:7")  # released on dead-lettering
    assert dead.id
    client.enqueue("count", {}, unique_key="short", unique_ttl=0.2)
    time.sleep(0.3)
    client.enqueue("count", {}, unique_key="short")  # expired


def test_completed_task_id_is_not_run_again(redis_url: str, r: redis.Redis) -> None:
    client = flumeq.Client(redis_url)
    client.enqueue("count", {}, task_id="order-1001")
    engine = flumeq.Engine({"count": counting_handler(redis_url)}, redis_url)
    engine.run(processes=1, burst=True)
    client.enqueue("count", {}, task_id="order-1001")
    client.enqueue_many([("count", {}, "order-1001"), ("count", {}, "order-1002")])
    report = engine.run(processes=1, burst=True)
    assert runs(r) == {"order-1001": 1, "order-1002": 1}
    assert report["skipped"] == 2 and report["processed"] == 1
    assert r.pttl("flumeq:{default}:done:order-1001") > 0


def test_actor_that_exits_on_first_attempt_is_replaced_and_task_retried(
    redis_url: str, r: redis.Redis
) -> None:
    client = flumeq.Client(redis_url)
    info = client.enqueue("exit_once", {})
    others = client.enqueue_many([("count", {}) for _ in range(50)])

    def exit_once(task: flumeq.Task) -> None:
        process_redis(redis_url).hincrby("runs", task.id, 1)
        if task.attempt == 0:
            os._exit(3)

    report = flumeq.Engine(
        {"exit_once": exit_once, "count": counting_handler(redis_url)}, redis_url, **FAST
    ).run(processes=2, burst=True)
    assert runs(r) == {info.id: 2, **{o.id: 1 for o in others}}
    assert report["retried"] == 1 and report["dead"] == 0


def test_hung_handler_is_killed_at_its_timeout_and_retried(redis_url: str, r: redis.Redis) -> None:
    client = flumeq.Client(redis_url)
    info = client.enqueue("hang_once", {}, timeout=0.3, max_retry=2)

    def hang_once(task: flumeq.Task) -> None:
        process_redis(redis_url).hincrby("runs", task.id, 1)
        if task.attempt == 0:
            time.sleep(60)

    started = time.monotonic()
    flumeq.Engine({"hang_once": hang_once}, redis_url, **FAST).run(processes=1, burst=True)
    assert time.monotonic() - started < 10
    assert runs(r) == {info.id: 2}


ENGINE = """
    import os, sys, time, flumeq
    from conftest import process_redis
    url, consumer, stale, sleep = sys.argv[1], sys.argv[2], float(sys.argv[3]), float(sys.argv[4])
    def work(task):
        process_redis(url).hincrby("started", task.id, 1)
        time.sleep(task.payload.get("sleep", sleep))
        process_redis(url).hincrby("runs", task.id, 1)
        process_redis(url).hincrby("by", consumer, 1)
    burst = os.environ.get("BURST") == "1"
    print(flumeq.Engine({"work": work}, url, consumer=consumer, claim_stale_after=stale,
                        shutdown_timeout=10, retry_base=0.02, retry_max=0.05)
          .run(processes=2, burst=burst), flush=True)
"""


def start_engine(
    url: str, consumer: str, stale: float = 300.0, sleep: float = 0.01, burst: bool = False
):  # type: ignore[no-untyped-def]
    burst_flag = {"BURST": "1" if burst else "0"}
    return spawn_script(ENGINE, url, consumer, str(stale), str(sleep), env=burst_flag)


def test_engine_killed_mid_run_loses_nothing(redis_url: str, r: redis.Redis) -> None:
    client = flumeq.Client(redis_url)
    infos = client.enqueue_many([("work", {}) for _ in range(400)])
    first = start_engine(redis_url, "doomed", sleep=0.01)
    wait_until(lambda: r.hlen("runs") >= 50)
    os.killpg(first.pid, signal.SIGKILL)  # supervisor, dispatcher and actors at once
    first.wait()
    assert r.hlen("runs") < 400
    second = start_engine(redis_url, "rescuer", stale=0.5, burst=True)
    assert second.wait(60) == 0, second.stderr.read() if second.stderr else ""
    done = runs(r)
    assert set(done) == {info.id for info in infos}  # nothing lost
    duplicates = sum(count - 1 for count in done.values())
    assert duplicates <= 2 * 2 * 512  # at most what the dead engine held
    assert r.xlen(STREAM) == 0


def test_restarted_consumer_takes_back_its_own_pending_at_once(
    redis_url: str, r: redis.Redis
) -> None:
    client = flumeq.Client(redis_url)
    infos = client.enqueue_many([("work", {}) for _ in range(200)])
    first = start_engine(redis_url, "pod-7", sleep=0.02)
    wait_until(lambda: r.hlen("runs") >= 20)
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    started = time.monotonic()
    # Same consumer name, stale threshold far away: only "own pending" can help.
    again = start_engine(redis_url, "pod-7", stale=600, burst=True)
    assert again.wait(60) == 0
    assert time.monotonic() - started < 30
    assert set(runs(r)) == {info.id for info in infos}


def test_long_task_is_not_claimed_while_its_engine_lives(redis_url: str, r: redis.Redis) -> None:
    client = flumeq.Client(redis_url)
    info = client.enqueue("work", {"sleep": 2.5})
    engines = [start_engine(redis_url, name, stale=0.4) for name in ("a", "b")]
    try:
        wait_until(lambda: r.hget("runs", info.id) is not None, timeout=30)
        time.sleep(1.0)  # give the other engine every chance to steal it
        assert runs(r) == {info.id: 1}
        assert int(r.hget("started", info.id) or 0) == 1
    finally:
        for engine in engines:
            os.kill(engine.pid, signal.SIGTERM)
        for engine in engines:
            assert engine.wait(30) == 0


def test_sigterm_hands_back_unstarted_tasks_for_a_second_engine(
    redis_url: str, r: redis.Redis
) -> None:
    client = flumeq.Client(redis_url)
    infos = client.enqueue_many([("work", {}) for _ in range(300)])
    first = start_engine(redis_url, "leaving", sleep=0.05)
    wait_until(lambda: r.hlen("runs") >= 10)
    os.kill(first.pid, signal.SIGTERM)
    out, err = first.communicate(timeout=30)
    assert first.returncode == 0, err.decode()
    assert b"'handed_back'" in out
    started = {k.decode(): int(v) for k, v in r.hgetall("started").items()}
    assert runs(r) == started  # every started task finished
    assert client.stats()["in_flight"] == 0  # nothing left pending behind
    second = start_engine(redis_url, "arriving", burst=True)
    assert second.wait(60) == 0
    assert runs(r) == {info.id: 1 for info in infos}


def test_redis_restart_mid_run_is_survived(tmp_path: object) -> None:
    server = RedisServer(appendonly=True).start()
    try:
        url = server.url
        conn = redis.Redis.from_url(url)
        client = flumeq.Client(url)
        infos = client.enqueue_many([("work", {}) for _ in range(600)])
        engine = start_engine(url, "survivor", sleep=0.005)
        wait_until(lambda: conn.hlen("runs") >= 100)
        server.kill()
        time.sleep(1.0)
        server.start()
        conn = redis.Redis.from_url(url)
        wait_until(lambda: conn.hlen("runs") == 600, timeout=60)
        time.sleep(0.5)
        assert engine.poll() is None  # the engine never exited
        os.kill(engine.pid, signal.SIGTERM)
        assert engine.wait(30) == 0
        done = {k.decode(): int(v) for k, v in conn.hgetall("runs").items()}
        assert set(done) == {info.id for info in infos}
        assert flumeq.Client(url).stats()["ready"] == 0
    finally:
        server.stop()


def test_poison_task_ends_in_dead_letters(redis_url: str, r: redis.Redis) -> None:
    client = flumeq.Client(redis_url)
    info = client.enqueue("count", {}, max_retry=1)
    r.xgroup_create(STREAM, "flumeq", id="0")
    [[_, [(entry_id, _)]]] = r.xreadgroup("flumeq", "crashed-engine", {STREAM: ">"})
    for _ in range(3):  # as if three engines died while running it
        r.xclaim(STREAM, "flumeq", "crashed-engine", 0, [entry_id])
    time.sleep(0.3)
    engine = start_engine(redis_url, "cleaner", stale=0.2)
    try:
        wait_until(lambda: len(client.dead_letters()) == 1)
    finally:
        os.kill(engine.pid, signal.SIGTERM)
        engine.wait(30)
    [dead] = client.dead_letters()
    assert (dead["id"], dead["reason"]) == (info.id, "poison")
    assert "delivered 5 times" in dead["error"]  # 1 read + 3 claims + ours
    assert runs(r) == {}


def test_idle_dead_consumers_are_removed(redis_url: str, r: redis.Redis) -> None:
    flumeq.Client(redis_url).enqueue("work", {})
    r.xgroup_create(STREAM, "flumeq", id="$")
    r.xreadgroup("flumeq", "ghost", {STREAM: ">"}, count=1)  # nothing new: no pending
    time.sleep(0.6)
    engine = start_engine(redis_url, "janitor", stale=0.2)
    try:
        wait_until(
            lambda: b"ghost" not in [c["name"] for c in r.xinfo_consumers(STREAM, "flumeq")],
            timeout=15,
        )
    finally:
        os.kill(engine.pid, signal.SIGTERM)
        engine.wait(30)


def test_bad_client_options_raise_before_any_write(redis_url: str, r: redis.Redis) -> None:
    client = flumeq.Client(redis_url)
    with pytest.raises(flumeq.InvalidTask, match="give delay or at, not both"):
        client.enqueue("t", delay=1, at=datetime.now(timezone.utc))
    with pytest.raises(flumeq.InvalidTask, match="unique_ttl must not be negative"):
        client.enqueue("t", unique_key="k", unique_ttl=-1)
    with pytest.raises(flumeq.InvalidTask, match="limit must be an integer"):
        client.dead_letters(limit=0)
    assert r.dbsize() == 0


def test_client_buffers_while_redis_is_down_and_never_drops_silently() -> None:
    server = RedisServer(appendonly=True).start()
    try:
        client = flumeq.Client(server.url, buffer_size=5, timeout=0.5)
        client.enqueue("t", {"n": 0})
        server.kill()
        kept = [client.enqueue("t", {"n": n}) for n in range(1, 4)]
        many = client.enqueue_many([("t", {"n": 4}), ("t", {"n": 5})])
        assert all(info.entry_id is None for info in kept + many)
        assert client.buffered == 5
        with pytest.raises(flumeq.BufferFull, match="these 1 task"):
            client.enqueue("t", {"n": 6})
        with pytest.raises(flumeq.RedisUnavailable):
            client.enqueue("t", {}, unique_key="never-buffered")
        with pytest.raises(flumeq.RedisUnavailable, match="5 buffered task"):
            client.close()
        server.start()
        late = client.enqueue("t", {"n": 7})
        assert client.buffered == 0 and late.entry_id
        conn = redis.Redis.from_url(server.url)
        stored = [json.loads(fields[b"payload"]) for _, fields in conn.xrange(STREAM)]
        assert [payload["n"] for payload in stored] == [0, 1, 2, 3, 4, 5, 7]
        ids = [fields[b"id"].decode() for _, fields in conn.xrange(STREAM)]
        assert ids[1:6] == [info.id for info in kept + many]
        assert all(b"idempotent" not in fields for _, fields in conn.xrange(STREAM))
        client.close()
    finally:
        server.stop()


def test_task_running_past_the_shutdown_timeout_is_left_pending_uncounted(
    redis_url: str, r: redis.Redis
) -> None:
    client = flumeq.Client(redis_url)
    info = client.enqueue("work", {"sleep": 3})
    script = ENGINE.replace("shutdown_timeout=10", "shutdown_timeout=0.3")
    engine = spawn_script(script, redis_url, "short-lived", "300", "0")
    wait_until(lambda: r.hget("started", info.id) is not None)
    started = time.monotonic()
    os.kill(engine.pid, signal.SIGTERM)
    out, _ = engine.communicate(timeout=30)
    assert engine.returncode == 0 and time.monotonic() - started < 3
    assert b"'left_pending': 1" in out
    assert runs(r) == {}
    [pending] = r.xpending_range(STREAM, "flumeq", "-", "+", 10)
    [(_, fields)] = r.xrange(STREAM)
    assert fields[b"attempt"] == b"0"  # the cut-off run is not counted
    assert pending["consumer"] == b"short-lived"
    rescuer = start_engine(redis_url, "rescuer", stale=0.3, burst=True)
    assert rescuer.wait(60) == 0
    assert runs(r) == {info.id: 1}


def test_tasks_delivered_while_a_reply_was_lost_are_taken_back(
    redis_url: str, r: redis.Redis
) -> None:
    engine = start_engine(redis_url, "steady")  # claim_stale_after: 300 s
    try:

        def reader() -> dict[str, object] | None:
            for client in r.client_list():
                if client.get("name", "").startswith("flumeq:steady:reader:"):
                    return client
            return None

        wait_until(lambda: reader() is not None)
        connection = reader()
        assert connection is not None
        dispatcher_pid = int(str(connection["name"]).rsplit(":", 1)[1])
        os.kill(dispatcher_pid, signal.SIGSTOP)
        try:
            r.client_kill_filter(_id=connection["id"])
            infos = flumeq.Client(redis_url).enqueue_many([("work", {}) for _ in range(5)])
            # Redis delivers them to the engine's consumer; the engine never sees
            # the reply (as when Redis dies right after running XREADGROUP).
            r.xreadgroup("flumeq", "steady", {STREAM: ">"}, count=5)
        finally:
            os.kill(dispatcher_pid, signal.SIGCONT)
        wait_until(lambda: len(runs(r)) == 5, timeout=15)
        assert runs(r) == {info.id: 1 for info in infos}
    finally:
        os.kill(engine.pid, signal.SIGTERM)
        assert engine.wait(30) == 0


def test_done_entries_leave_the_stream_but_no_entry_a_group_needs(
    redis_url: str, r: redis.Redis
) -> None:
    """Done entries are trimmed (XTRIM MINID behind the oldest entry still
    needed) or deleted: an entry pending at a consumer that died stays until
    it is claimed and run (6 s idle), one held by a long task stays while it
    runs, and everything done after them leaves the stream at once."""
    client = flumeq.Client(redis_url)
    ghost = client.enqueue("work", {"who": "ghost"})
    r.xgroup_create(STREAM, "flumeq", id="0")
    # A consumer that read one task and died (no registry entry): its entry
    # is the oldest the group still needs.
    r.xreadgroup("flumeq", "ghost", {STREAM: ">"}, count=1)
    slow = client.enqueue("work", {"sleep": 2.0})
    fast = client.enqueue_many([("work", {"n": n}) for n in range(2000)])
    engine = spawn_script(TRIM_ENGINE, redis_url)
    try:
        wait_until(lambda: {info.id for info in fast} <= set(runs(r)), timeout=30)
        entries = {fields[b"id"].decode() for _, fields in r.xrange(STREAM)}
        # The fast ones are gone though the ghost's and the slow one's are older.
        assert ghost.id in entries and entries <= {ghost.id, slow.id}
        assert ghost.id not in runs(r)
        wait_until(lambda: {ghost.id, slow.id} <= set(runs(r)), timeout=30)
        wait_until(lambda: r.xlen(STREAM) == 0, timeout=10)
    finally:
        os.killpg(engine.pid, signal.SIGTERM)
        engine.wait(timeout=30)
    assert r.xpending(STREAM, "flumeq")["pending"] == 0
    assert all(count == 1 for count in runs(r).values())


TRIM_ENGINE = """
import sys, time
import flumeq
from conftest import process_redis

def work(task):
    if "sleep" in task.payload:
        time.sleep(task.payload["sleep"])
    process_redis(sys.argv[1]).hincrby("runs", task.id, 1)

flumeq.Engine({"work": work}, sys.argv[1], claim_stale_after=6.0).run(processes=2)
"""
