"""A worker whose handler records each run in Redis (to count them)."""

import os
import sys
import time

import redis

import flumeq

url, consumer = sys.argv[1], sys.argv[2]
_connections: dict[int, redis.Redis] = {}


def work(task: flumeq.Task) -> None:
    time.sleep(task.payload["seconds"])
    # One connection per process (actors are forked).
    pid = os.getpid()
    if pid not in _connections:
        _connections[pid] = redis.Redis.from_url(url)
    _connections[pid].hincrby("example:runs", task.id, 1)


flumeq.Engine({"work": work}, url, consumer=consumer).run(processes=2, burst=len(sys.argv) > 3)
