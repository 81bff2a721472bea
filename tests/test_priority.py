"""Strict priority against a real engine: a lower queue's task starts only
while no higher queue has one ready, and a higher task arriving while an
actor is busy with lower ones waits for at most one of them (the one queued
behind the running task). Weighted reads give every queue its share."""

from __future__ import annotations

import signal
import time

import redis

import flumeq
from conftest import spawn_script, wait_until

ENGINE = """
import sys, time, flumeq
from conftest import process_redis

def work(task):
    process_redis(sys.argv[1]).rpush("order", task.queue + ":" + repr(time.time()))
    time.sleep(0.02)

queues = {"high": 1, "mid": 1, "low": 1} if sys.argv[2] == "strict" else {"high": 3, "low": 1}
flumeq.Engine({"work": work}, sys.argv[1], queues=tuple(queues) if sys.argv[2] == "strict"
              else queues, strict=sys.argv[2] == "strict").run(processes=1)
"""

#: Lower-queue tasks that may start after a higher one arrived, per actor
#: process: the one queued behind the running task.
BOUND = 1


def order(r: redis.Redis) -> list[tuple[str, float]]:
    rows = []
    for item in r.lrange("order", 0, -1):
        queue, _, at = item.decode().partition(":")
        rows.append((queue, float(at)))
    return rows


def test_strict_priority_runs_higher_queues_first_within_the_bound(
    redis_url: str, r: redis.Redis
) -> None:
    client = flumeq.Client(redis_url)
    client.enqueue_many([("work", {"n": n}) for n in range(40)], queue="low")
    client.enqueue_many([("work", {"n": n}) for n in range(20)], queue="mid")
    client.enqueue_many([("work", {"n": n}) for n in range(20)], queue="high")
    engine = spawn_script(ENGINE, redis_url, "strict")
    try:
        wait_until(lambda: r.llen("order") >= 50, timeout=30)
        # Work of a higher queue arrives while the actor runs low tasks.
        client.enqueue_many([("work", {"n": n}) for n in range(10)], queue="high")
        arrived = time.time()
        wait_until(lambda: r.llen("order") == 90, timeout=30)
    finally:
        engine.send_signal(signal.SIGTERM)
        engine.wait(timeout=30)
    runs = order(r)
    queues = [queue for queue, _ in runs[:40]]
    # Everything ready at the start: all high, then all mid, then low.
    assert queues == ["high"] * 20 + ["mid"] * 20, queues
    late_high = [at for queue, at in runs if queue == "high" and at > arrived]
    assert len(late_high) == 10
    low_meanwhile = [at for queue, at in runs if queue == "low" and arrived < at < max(late_high)]
    assert len(low_meanwhile) <= BOUND, f"{len(low_meanwhile)} low task(s) ran first"


def test_weighted_reads_serve_every_queue(redis_url: str, r: redis.Redis) -> None:
    client = flumeq.Client(redis_url)
    client.enqueue_many([("work", {"n": n}) for n in range(300)], queue="high")
    client.enqueue_many([("work", {"n": n}) for n in range(300)], queue="low")
    engine = spawn_script(ENGINE, redis_url, "weighted")
    try:
        wait_until(lambda: r.llen("order") >= 100, timeout=30)
    finally:
        engine.send_signal(signal.SIGTERM)
        engine.wait(timeout=30)
    first = [queue for queue, _ in order(r)[:100]]
    # Weights 3:1, carried from read to read however small the reads: about
    # a quarter low (within a read's worth), and the low queue not starved.
    assert 15 <= first.count("low") <= 35, first.count("low")


def test_strict_order_of_a_weighted_mapping_is_by_weight(redis_url: str) -> None:
    engine = flumeq.Engine(
        {"work": print}, redis_url, queues={"low": 1, "critical": 9, "default": 3}, strict=True
    )
    assert [name for name, _ in engine.queues] == ["critical", "default", "low"]
    plain = flumeq.Engine({"work": print}, redis_url, queues={"low": 1, "critical": 9})
    assert [name for name, _ in plain.queues] == ["low", "critical"]
