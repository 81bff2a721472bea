"""Chaos soak: push tasks while killing actors and engines and restarting Redis.

Not part of the test suite (it runs for minutes). Usage:

    python tests/soak/chaos.py [--tasks 100000] [--engines 2] [--seconds 600]

Starts its own redis-server (append-only file, fsync always), enqueues the
tasks, runs engines as separate process trees, and every 1-3 s does one of:
kill -9 one actor, kill -9 a whole engine (a new one replaces it), or kill -9
and restart Redis. Each run of a task is counted in Redis by the handler.
At the end it prints: tasks, lost (never ran and not dead-lettered),
duplicate runs, dead letters, and how many of each fault it caused.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import redis

import flumeq
from flumeq.redis_server import RedisServer

ENGINE = """
    import sys, time, flumeq
    from conftest import process_redis
    url = sys.argv[1]
    def work(task):
        time.sleep(0.002)
        process_redis(url).hincrby("soak:runs", task.id, 1)
    flumeq.Engine({"work": work}, url, claim_stale_after=3, retry_base=0.05, retry_max=1,
                  shutdown_timeout=5).run(processes=2)
"""


def start_engine(url: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(ENGINE), url],
        # The handler counts through the tests' per-process client.
        env=dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent)),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tasks", type=int, default=100_000)
    parser.add_argument("--engines", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=600.0)
    parser.add_argument("--seed", type=int, default=None)
    args = parser.parse_args()
    chance = random.Random(args.seed)
    faults = {"actor_kills": 0, "engine_kills": 0, "redis_restarts": 0}

    server = RedisServer(appendonly=True).start()
    url = server.url
    engines: list[subprocess.Popen[bytes]] = []
    started = time.monotonic()
    try:
        client = flumeq.Client(url)
        ids: list[str] = []
        for offset in range(0, args.tasks, 5000):
            size = min(5000, args.tasks - offset)
            ids += [
                info.id
                for info in client.enqueue_many([("work", {"n": offset + i}) for i in range(size)])
            ]
        engines = [start_engine(url) for _ in range(args.engines)]
        conn = redis.Redis.from_url(url)

        def done_count() -> int:
            try:
                return int(conn.hlen("soak:runs"))
            except redis.RedisError:
                return -1

        while time.monotonic() - started < args.seconds:
            time.sleep(chance.uniform(1.0, 3.0))
            progress = done_count()
            if progress >= args.tasks:
                break
            action = chance.choice(["actor", "actor", "engine", "redis"])
            if action == "actor":
                engine = chance.choice(engines)
                children = [
                    p
                    for p in psutil.Process(engine.pid).children(recursive=True)
                    if "actor" in " ".join(p.cmdline()) or True
                ]
                actors = children[:-1] if len(children) > 1 else children
                if actors:
                    os.kill(chance.choice(actors).pid, signal.SIGKILL)
                    faults["actor_kills"] += 1
            elif action == "engine":
                index = chance.randrange(len(engines))
                os.killpg(engines[index].pid, signal.SIGKILL)
                engines[index].wait()
                engines[index] = start_engine(url)
                faults["engine_kills"] += 1
            else:
                server.kill()
                time.sleep(chance.uniform(0.2, 1.5))
                server.start()
                conn = redis.Redis.from_url(url)
                faults["redis_restarts"] += 1
            print(
                f"{time.monotonic() - started:6.1f}s done {done_count():>7} after {action}",
                flush=True,
            )

        # Let the last stale tasks be claimed and finished, calmly.
        deadline = time.monotonic() + 120

        def dead_count() -> int:
            try:
                return client.stats()["dead"]
            except flumeq.RedisUnavailable:
                return 0

        while done_count() + dead_count() < args.tasks and time.monotonic() < deadline:
            for index, engine in enumerate(engines):
                if engine.poll() is not None:
                    engines[index] = start_engine(url)
            time.sleep(1)
        ran = {key.decode(): int(value) for key, value in conn.hgetall("soak:runs").items()}
        dead = {letter["id"] for letter in client.dead_letters(limit=100_000)}
        lost = [task_id for task_id in ids if task_id not in ran and task_id not in dead]
        duplicates = sum(count - 1 for count in ran.values())
        print()
        print(
            "| tasks | lost | duplicate runs | dead letters | process kills | engine kills | redis restarts | seconds |"
        )
        print("|---|---|---|---|---|---|---|---|")
        print(
            f"| {args.tasks} | {len(lost)} | {duplicates} | {len(dead)} | {faults['actor_kills']} "
            f"| {faults['engine_kills']} | {faults['redis_restarts']} | {time.monotonic() - started:.0f} |"
        )
        if lost:
            print("lost, for example:", lost[:5])
            raise SystemExit(1)
    finally:
        for engine in engines:
            try:
                os.killpg(engine.pid, signal.SIGTERM)
                engine.wait(20)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                os.killpg(engine.pid, signal.SIGKILL)
        server.stop()


if __name__ == "__main__":
    main()
