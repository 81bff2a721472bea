"""Chaos soak: run tasks while killing any process of the engines, signalling
their whole process groups and restarting Redis.

Not part of the test suite (it runs for a minute or more). Usage:

    python tests/soak/chaos.py [--tasks 100000] [--engines 2] [--processes 2]
        [--actor-kills 10] [--dispatcher-kills 4] [--engine-kills 5]
        [--group-sigterms 6] [--redis-restarts 6] [--every 1.5] [--seed 7]

Starts its own redis-server (append-only file, fsync always), enqueues the
tasks (each sleeps 1 ms, then counts its run in Redis), and runs engines as
separate process trees (the supervisor leads its own process group). While
work remains it causes the faults, shuffled, one every ``--every`` seconds:

- actor kill: kill -9 of one actor;
- dispatcher kill: kill -9 of one dispatcher (the engine must restart it);
- engine kill: kill -9 of a whole process group (a new engine replaces it);
- group SIGTERM: SIGTERM to a whole process group, as systemd does; the
  engine must exit 0 on its own (a new one replaces it);
- Redis restart: kill -9 of redis-server, restarted 0.2 to 1.5 s later.

An engine that exits without being told to counts as "exited on its own".
At the end it prints one table: tasks, lost (never ran and not dead), runs
beyond the first (duplicates, and their share), dead letters, each fault's
count, engines that exited on their own, and graceful stops that did not
exit 0.
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
from typing import Optional

import psutil
import redis

import flumeq
from flumeq.redis_server import RedisServer

ENGINE = """
    import sys, time, flumeq
    from conftest import process_redis
    url, processes = sys.argv[1], int(sys.argv[2])
    def work(task):
        time.sleep(0.001)
        process_redis(url).hincrby("soak:runs", task.id, 1)
    flumeq.Engine({"work": work}, url, consumer=sys.argv[3], claim_stale_after=3,
                  retry_base=0.05, retry_max=1, shutdown_timeout=5).run(processes=processes)
"""

FAULTS = ("actor", "dispatcher", "engine", "sigterm", "redis")


class Engines:
    """The engines of the soak, each its own process group."""

    def __init__(self, url: str, count: int, processes: int) -> None:
        self.url = url
        self.processes = processes
        self.serial = 0
        self.on_their_own = 0
        self.unclean = 0
        self.running: list[subprocess.Popen[bytes]] = [self.start() for _ in range(count)]

    def start(self) -> subprocess.Popen[bytes]:
        self.serial += 1
        tests = str(Path(__file__).resolve().parent.parent)
        return subprocess.Popen(
            [
                sys.executable,
                "-c",
                textwrap.dedent(ENGINE),
                self.url,
                str(self.processes),
                f"soak-{self.serial}",
            ],
            # The handler counts through the tests' per-process client.
            env=dict(os.environ, PYTHONPATH=tests),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )

    def check(self) -> None:
        """Replaces engines that exited without being told to."""
        for index, engine in enumerate(self.running):
            if engine.poll() is not None:
                self.on_their_own += 1
                print(f"  engine pid {engine.pid} exited on its own ({engine.returncode})")
                self.running[index] = self.start()

    def children(self, chance: random.Random, dispatcher: bool) -> Optional[int]:
        """The pid of a random actor (or dispatcher) of a random engine;
        ``None`` when it cannot be told (Redis is away)."""
        engine = chance.choice(self.running)
        try:
            kids = [child.pid for child in psutil.Process(engine.pid).children()]
            # A dispatcher names its read connections after its pid.
            names = [str(c.get("name", "")) for c in redis.Redis.from_url(self.url).client_list()]
        except (psutil.NoSuchProcess, redis.RedisError):
            return None
        dispatchers = {pid for pid in kids if any(n.endswith(f":reader:{pid}") for n in names)}
        wanted = [pid for pid in kids if (pid in dispatchers) == dispatcher]
        return chance.choice(wanted) if wanted and dispatchers else None

    def replace(self, index: int, how: int) -> None:
        engine = self.running[index]
        os.killpg(engine.pid, how)
        try:
            code = engine.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(engine.pid, signal.SIGKILL)
            code = engine.wait()
        if how == signal.SIGTERM and code != 0:
            self.unclean += 1
            print(f"  engine pid {engine.pid} exited {code} after SIGTERM")
        self.running[index] = self.start()

    def stop(self) -> None:
        for engine in self.running:
            try:
                os.killpg(engine.pid, signal.SIGTERM)
                engine.wait(30)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                os.killpg(engine.pid, signal.SIGKILL)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tasks", type=int, default=100_000)
    parser.add_argument("--engines", type=int, default=2)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--actor-kills", type=int, default=10)
    parser.add_argument("--dispatcher-kills", type=int, default=4)
    parser.add_argument("--engine-kills", type=int, default=5)
    parser.add_argument("--group-sigterms", type=int, default=6)
    parser.add_argument("--redis-restarts", type=int, default=6)
    parser.add_argument("--every", type=float, default=1.5)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    chance = random.Random(args.seed)
    plan = (
        ["actor"] * args.actor_kills
        + ["dispatcher"] * args.dispatcher_kills
        + ["engine"] * args.engine_kills
        + ["sigterm"] * args.group_sigterms
        + ["redis"] * args.redis_restarts
    )
    chance.shuffle(plan)
    done_faults = dict.fromkeys(FAULTS, 0)

    server = RedisServer(appendonly=True).start()
    url = server.url
    engines: Optional[Engines] = None
    started = time.monotonic()
    try:
        client = flumeq.Client(url)
        ids: list[str] = []
        for offset in range(0, args.tasks, 5000):
            size = min(5000, args.tasks - offset)
            batch = [("work", {"n": offset + i}) for i in range(size)]
            ids += [info.id for info in client.enqueue_many(batch)]
        engines = Engines(url, args.engines, args.processes)
        conn = redis.Redis.from_url(url)

        def done_count() -> int:
            try:
                return int(conn.hlen("soak:runs"))
            except redis.RedisError:
                return -1

        started = time.monotonic()
        for fault in plan:
            time.sleep(args.every)
            engines.check()
            if done_count() >= args.tasks:
                break
            if fault in ("actor", "dispatcher"):
                pid = engines.children(chance, dispatcher=fault == "dispatcher")
                if pid is None:
                    continue
                os.kill(pid, signal.SIGKILL)
            elif fault in ("engine", "sigterm"):
                how = signal.SIGKILL if fault == "engine" else signal.SIGTERM
                engines.replace(chance.randrange(len(engines.running)), how)
            else:
                server.kill()
                time.sleep(chance.uniform(0.2, 1.5))
                server.start()
                conn = redis.Redis.from_url(url)
            done_faults[fault] += 1
            print(
                f"{time.monotonic() - started:6.1f}s done {done_count():>7} after {fault}",
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
            engines.check()
            time.sleep(0.5)
        took = time.monotonic() - started
        ran = {key.decode(): int(value) for key, value in conn.hgetall("soak:runs").items()}
        dead = {letter["id"] for letter in client.dead_letters(limit=100_000)}
        lost = [task_id for task_id in ids if task_id not in ran and task_id not in dead]
        duplicates = sum(count - 1 for count in ran.values())
        print()
        print(
            "| tasks | lost | runs beyond the first | dead letters | actor kills | "
            "dispatcher kills | engine kills | group SIGTERMs | Redis restarts | "
            "engines exiting on their own | SIGTERM exits not 0 | seconds |"
        )
        print("|---|---|---|---|---|---|---|---|---|---|---|---|")
        print(
            f"| {args.tasks:,} | {len(lost)} | {duplicates:,} ({duplicates / args.tasks:.2%}) "
            f"| {len(dead)} | {done_faults['actor']} | {done_faults['dispatcher']} "
            f"| {done_faults['engine']} | {done_faults['sigterm']} | {done_faults['redis']} "
            f"| {engines.on_their_own} | {engines.unclean} | {took:.0f} |"
        )
        if lost:
            print("lost, for example:", lost[:5])
            raise SystemExit(1)
    finally:
        if engines is not None:
            engines.stop()
        server.stop()


if __name__ == "__main__":
    main()
