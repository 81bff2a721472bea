"""CPU per task of a drain: the engine's processes and Redis, apart.

Wall-clock rates on a shared 2-core VM swing by ±15 % between runs; CPU time
per task moves far less, so this is the bench for "did this change make the
hot path dearer?". Run it from two virtualenvs (one per build) and compare:

    python benches/cpu.py [--tasks 200000] [--processes 2] [--rounds 5]
                          [--variants plain,app,middleware,limits,limited,tls,cluster,
                                      three,shards3]

It starts its own redis-server, enqueues no-op tasks, drains them with a
burst engine in this process, and reads the engine's CPU from
RUSAGE_CHILDREN (the actors and the dispatcher are this process's children)
and Redis's from INFO cpu. Prints the median over the rounds.

Variants (run interleaved, round by round): `plain` a `{type: handler}`
mapping; `app` the same no-op as an `@app.task`; `middleware` the mapping
with one middleware whose five hooks do nothing; `limits` the mapping with a
rate and a concurrency limit on two other task types (the drain's own type
is not limited, so this measures what looking at the batches costs);
`limited` a rate limit on the drain's own type, far above the drain's pace
(every batch pays the limits script, and none is held back); `tls` the
mapping over `rediss://` to a TLS-only redis-server (a CA made by openssl,
as the tests do); `cluster` the mapping against a cluster-enabled
redis-server owning every slot (what Cluster mode costs Redis itself);
`history` the mapping recording task history with PostgreSQL unreachable
(the events go to Redis and wait there: what recording costs the task
path); `three` the mapping draining three queues on one Redis, and `shards3` the
same three queues on a 3-master Redis Cluster (`redis+cluster://`, each
queue on its own master; Redis CPU is the sum over the three masters).
"""

from __future__ import annotations

import argparse
import contextlib
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Optional

import redis

import flumeq
from flumeq.redis_server import RedisServer


class NoOp:
    """A middleware with every hook, each doing nothing."""

    def before_enqueue(self, fields: dict[str, Any]) -> None:
        pass

    def before_run(self, task: flumeq.Task) -> None:
        pass

    def after_run(self, task: flumeq.Task, result: Any, error: Optional[BaseException]) -> None:
        pass

    def on_retry(self, task: flumeq.Task, error: BaseException, delay: Optional[float]) -> None:
        pass

    def on_dead(self, task: flumeq.Task, reason: str, error: BaseException) -> None:
        pass


def engine_for(variant: str, url: str) -> tuple[str, flumeq.Engine]:
    """The task type to enqueue and the engine of a variant."""
    if variant == "app":
        app = flumeq.App(url)

        @app.task(name="noop")
        def noop(n: int) -> None:
            return None

        return noop.name, flumeq.Engine(app, queues=("cpu",))
    middleware = [NoOp()] if variant == "middleware" else []
    handlers = {"noop": lambda task: None, "mail": lambda task: None, "report": lambda task: None}
    limits: dict[str, Any] = {}
    if variant == "limits":
        limits = {"rate_limits": {"mail": "100/s"}, "concurrency_limits": {"report": 2}}
    if variant == "limited":
        limits = {"rate_limits": {"noop": "10000000/s"}}
    if variant == "history":
        # Recording with PostgreSQL away (nothing listens on port 1): what
        # the task path pays for history, without the writer's work.
        limits = {"history": "postgresql://flumeq@127.0.0.1:1/flumeq"}
    # tls, cluster, three, shards3: the plain engine, on another server or
    # with more queues.
    engine = flumeq.Engine(
        handlers, url, queues=QUEUES.get(variant, ("cpu",)), middleware=middleware, **limits
    )
    return "noop", engine


#: The queues of the variants that drain several (set by ``urls_for``).
QUEUES: dict[str, tuple[str, ...]] = {}
#: The Redis servers whose CPU a variant's drain costs (default: its URL's).
NODES: dict[str, list[str]] = {}


def urls_for(variants: list[str], servers: contextlib.ExitStack) -> dict[str, str]:
    """The Redis URL of each variant; the servers stop with ``servers``."""
    plain = servers.enter_context(RedisServer())
    urls = {variant: plain.url for variant in variants}
    if {"tls", "cluster", "three", "shards3"} & set(variants):
        # The test deployments' helpers: a CA made by openssl, cluster nodes.
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
        from deployments import Cluster, ClusterNode, TlsServer  # noqa: PLC0415

        if "three" in variants or "shards3" in variants:
            cluster = Cluster()
            servers.callback(cluster.close)
            names: dict[int, str] = {}
            for n in range(100):
                names.setdefault(cluster.master_of(f"cpu{n}"), f"cpu{n}")
            queues = tuple(names.values())
            QUEUES.update(three=queues, shards3=queues)
            urls["shards3"] = cluster.url
            NODES["shards3"] = [f"redis://127.0.0.1:{port}/0" for port in cluster.ports]

        if "tls" in variants:
            tls = TlsServer()
            servers.callback(tls.close)
            urls["tls"] = tls.url()
        if "cluster" in variants:
            node = ClusterNode()
            servers.callback(node.close)
            urls["cluster"] = node.url
    return urls


def one_round(
    url: str, tasks: int, processes: int, variant: str = "plain"
) -> tuple[float, float, float]:
    """(tasks/s, engine µs/task, redis µs/task) of one drain."""
    kind, engine = engine_for(variant, url)
    client = flumeq.Client(url)
    queues = QUEUES.get(variant, ("cpu",))
    for start in range(0, tasks, 5000):
        count = min(5000, tasks - start)
        queue = queues[(start // 5000) % len(queues)]
        client.enqueue_many([(kind, {"n": start + n}) for n in range(count)], queue=queue)
    nodes = [redis.Redis.from_url(node) for node in NODES.get(variant, [url])]

    def redis_cpu() -> float:
        infos = [node.info("cpu") for node in nodes]
        return sum(float(info["used_cpu_user"]) + float(info["used_cpu_sys"]) for info in infos)

    redis_before = redis_cpu()
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    report = engine.run(processes=processes, burst=True)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    assert report["processed"] == tasks, report
    engine = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return tasks / wall, engine / tasks * 1e6, (redis_cpu() - redis_before) / tasks * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=200_000)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--variants", default="plain,app,middleware,limits,limited")
    args = parser.parse_args()
    variants = args.variants.split(",")
    results: dict[str, list[tuple[float, float, float]]] = {name: [] for name in variants}
    with contextlib.ExitStack() as servers:
        urls = urls_for(variants, servers)
        for _ in range(args.rounds):
            for variant in variants:
                results[variant].append(
                    one_round(urls[variant], args.tasks, args.processes, variant)
                )
    print(f"{args.tasks} no-op tasks, {args.processes} processes, median of {args.rounds}")
    print("| handler | drain tasks/s | engine CPU µs/task | Redis CPU µs/task |")
    print("|---|---|---|---|")
    labels = {
        "plain": "mapping",
        "app": "@app.task",
        "middleware": "mapping + 1 no-op middleware",
        "limits": "mapping, limits on 2 other types",
        "limited": "mapping, a rate limit on its type",
        "history": "mapping, recording history (PostgreSQL away)",
        "tls": "mapping, over TLS (rediss://)",
        "cluster": "mapping, cluster-enabled Redis",
        "three": "mapping, 3 queues, one Redis",
        "shards3": "mapping, 3 queues on 3 Cluster masters",
    }
    for variant in variants:
        rate, engine, red = (statistics.median(column) for column in zip(*results[variant]))
        print(f"| {labels[variant]} | {rate:,.0f} | {engine:.2f} | {red:.2f} |")


if __name__ == "__main__":
    main()
