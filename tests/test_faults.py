"""Fault trials, as an operator would run them: kill -9 any process of an
engine, signal its whole process group, take Redis away during shutdown,
run long async batches, and feed actors what makes them die. Each test
failed on the engine before its fix (see the issue notes)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import resource
import signal
import socket
import subprocess
import threading
import time
from typing import Any, Optional

import psutil
import pytest
import redis

import flumeq
from conftest import (
    Proxy,
    assert_stopped_in_bound,
    counting_handler,
    dispatcher_pid,
    kill_dispatcher,
    process_redis,
    sigterm_group,
    spawn_script,
    tree,
    wait_until,
)
from flumeq.redis_server import RedisServer

STREAM = "flumeq:{default}:stream"

ENGINE = """
    import logging, os, sys, time, flumeq
    from conftest import process_redis
    logging.basicConfig(level=logging.INFO, format="%(name)s %(levelname)s %(message)s")
    url, consumer = sys.argv[1], sys.argv[2]
    def work(task):
        process_redis(url).hincrby("started", task.id, 1)
        time.sleep(task.payload.get("sleep", 0.01))
        process_redis(url).hincrby("runs", task.id, 1)
    engine = flumeq.Engine(
        {"work": work}, url, consumer=consumer,
        shutdown_timeout=float(os.environ.get("SHUTDOWN", "10")),
        claim_stale_after=300, retry_base=0.02, retry_max=0.05,
    )
    print("REPORT", engine.run(processes=2, burst=os.environ.get("BURST") == "1"), flush=True)
"""


def start_engine(url: str, consumer: str, **env: str) -> Any:
    return spawn_script(ENGINE, url, consumer, env=env)


def counts(r: redis.Redis, key: str) -> dict[str, int]:
    return {k.decode(): int(v) for k, v in r.hgetall(key).items()}


def test_engine_survives_kill_of_its_dispatcher(redis_url: str, r: redis.Redis) -> None:
    client = flumeq.Client(redis_url)
    infos = client.enqueue_many([("work", {"sleep": 0.005}) for _ in range(600)])
    engine = start_engine(redis_url, "phoenix")
    try:
        wait_until(lambda: r.hlen("runs") >= 50)
        for round_ in range(2):  # twice: the second restart backs off, and still comes
            kill_dispatcher(r, "phoenix")
            assert engine.poll() is None, f"engine exited after dispatcher kill {round_ + 1}"
        wait_until(lambda: set(counts(r, "runs")) == {info.id for info in infos}, timeout=60)
        assert engine.poll() is None
    finally:
        os.kill(engine.pid, signal.SIGTERM)
        out, err = engine.communicate(timeout=40)
    assert engine.returncode == 0, err.decode()[-3000:]
    assert b"REPORT" in out
    assert client.stats()["ready"] == 0 and client.stats()["in_flight"] == 0


def test_outcomes_a_full_redis_refuses_at_shutdown_stay_pending_and_run(
    redis_url: str, r: redis.Redis
) -> None:
    """Redis full (maxmemory reached, noeviction) under a draining engine,
    then SIGTERM to its group: the outcome transactions are refused (OOM)
    until the shutdown deadline, and nothing of their tasks is removed from
    the stream (the trim after a transaction deletes only what one that was
    applied acked): they stay pending, and the next engine runs them all."""
    client = flumeq.Client(redis_url)
    infos = client.enqueue_many([("work", {"sleep": 0.002}) for _ in range(3000)])
    engine = start_engine(redis_url, "full", SHUTDOWN="2")
    try:
        wait_until(lambda: r.hlen("runs") >= 200)
        r.config_set("maxmemory", "1")
        time.sleep(1.0)
        stop = sigterm_group(engine, tree(engine.pid))
    finally:
        r.config_set("maxmemory", "0")
        if engine.poll() is None:
            os.killpg(engine.pid, signal.SIGKILL)
    assert_stopped_in_bound(engine, stop, "memory")
    assert r.xpending(STREAM, "flumeq")["pending"] > 0, "no outcome was refused"
    again = start_engine(redis_url, "full", BURST="1")
    _, err = again.communicate(timeout=60)
    assert again.returncode == 0, err.decode()[-3000:]
    assert {info.id for info in infos} <= set(counts(r, "runs"))
    stats = client.stats()
    assert (stats["ready"], stats["in_flight"], stats["dead"]) == (0, 0, 0)


def test_sigterm_to_the_whole_process_group_is_graceful(redis_url: str, r: redis.Redis) -> None:
    client = flumeq.Client(redis_url)
    client.enqueue_many([("work", {"sleep": 0.3}) for _ in range(60)])
    engine = start_engine(redis_url, "systemd-unit")
    wait_until(lambda: r.hlen("started") >= 4)
    started_at = time.monotonic()
    os.killpg(engine.pid, signal.SIGTERM)  # as systemd's KillMode=control-group does
    _, err = engine.communicate(timeout=40)
    assert engine.returncode == 0, err.decode()[-3000:]
    assert time.monotonic() - started_at < 10
    started, finished = counts(r, "started"), counts(r, "runs")
    assert finished == started, "a task was cut off mid-run"
    assert all(count == 1 for count in finished.values())
    stats = client.stats()
    assert stats["failed"] == 0, "a group signal made tasks count a failed attempt"
    assert stats["processed"] + stats["ready"] == 60 and stats["in_flight"] == 0
    # Handed-back tasks start over at attempt 0 (nothing counted against them).
    assert all(fields[b"attempt"] == b"0" for _, fields in r.xrange(STREAM))


def test_shutdown_ends_in_bounded_time_without_redis_and_never_spins(tmp_path: Any) -> None:
    server = RedisServer(appendonly=True).start()
    url = server.url
    try:
        conn = redis.Redis.from_url(url)
        flumeq.Client(url).enqueue_many([("work", {"sleep": 0.05}) for _ in range(2000)])
        engine = start_engine(url, "stranded", SHUTDOWN="2")
        wait_until(lambda: conn.hlen("runs") >= 20)
        processes = tree(engine.pid)
        server.kill()
        time.sleep(0.5)
        stop = sigterm_group(engine, processes)
    finally:
        server.stop()
    # shutdown_timeout (2 s) plus the bounded grace for the last writes.
    assert_stopped_in_bound(engine, stop, "redis")
    assert "could not be written" in stop[2], stop[2][-3000:]


ASYNC_NAPS = """
    import asyncio, sys, flumeq
    from conftest import process_redis
    url = sys.argv[1]
    async def nap(task):
        await asyncio.sleep(2)
        process_redis(url).hincrby("runs", task.id, 1)
    print("REPORT", flumeq.Engine({"nap": nap}, url).run(processes=1, burst=True), flush=True)
"""


def test_long_async_batches_finish_with_per_task_deadlines(redis_url: str, r: redis.Redis) -> None:
    client = flumeq.Client(redis_url)
    infos = client.enqueue_many([("nap", {}) for _ in range(300)], timeout=3, max_retry=0)
    started = time.monotonic()
    engine = spawn_script(ASYNC_NAPS, redis_url)
    try:
        out, err = engine.communicate(timeout=40)
    except subprocess.TimeoutExpired:
        os.killpg(engine.pid, signal.SIGKILL)
        engine.communicate()
        pytest.fail("300 two-second async tasks (concurrency 100) did not finish in 40 s")
    took = time.monotonic() - started
    assert engine.returncode == 0, err.decode()[-3000:]
    assert counts(r, "runs") == {info.id: 1 for info in infos}
    assert b"'processed': 300" in out and b"'failed': 0" in out
    assert took < 20, f"took {took:.1f}s; three waves of 2 s should take about 6 s"


def test_a_blocked_event_loop_blames_only_the_tasks_that_ran(
    redis_url: str, r: redis.Redis
) -> None:
    client = flumeq.Client(redis_url)
    blocker = client.enqueue("block", {}, timeout=0.5, max_retry=0)
    naps = client.enqueue_many([("nap", {}) for _ in range(30)], timeout=5, max_retry=0)

    async def block(task: flumeq.Task) -> None:
        time.sleep(30)  # blocks the whole loop: asyncio cannot cancel it

    async def nap(task: flumeq.Task) -> None:
        await asyncio.sleep(0.2)
        process_redis(redis_url).hincrby("runs", task.id, 1)

    started = time.monotonic()
    report = flumeq.Engine({"block": block, "nap": nap}, redis_url, concurrency=10).run(
        processes=1, burst=True
    )
    assert time.monotonic() - started < 20
    [dead] = client.dead_letters()
    assert (dead["id"], dead["reason"]) == (blocker.id, "timeout")
    assert "event loop" in dead["error"]
    assert counts(r, "runs") == {info.id: 1 for info in naps}
    assert report["dead"] == 1 and report["processed"] == 30


def test_many_large_failures_in_one_window_are_all_counted(redis_url: str, r: redis.Redis) -> None:
    client = flumeq.Client(redis_url)
    infos = client.enqueue_many([("boom", {}) for _ in range(300)], max_retry=0)

    def boom(task: flumeq.Task) -> None:
        # Fast failures (no warning per task), each with a 20 kB error text:
        # hundreds of them fit in one flush window.
        logging.getLogger("flumeq.actor").disabled = True
        raise ValueError("x" * 20_000)

    started = time.monotonic()
    report = flumeq.Engine({"boom": boom}, redis_url).run(processes=1, burst=True)
    assert time.monotonic() - started < 30
    assert report["dead"] == 300 and report["restarts"] == 0
    letters = client.dead_letters(limit=1000)
    assert {letter["id"] for letter in letters} == {info.id for info in infos}
    limit = flumeq.MAX_TEXT_BYTES
    assert all(len(letter["error"].encode()) <= limit for letter in letters)
    assert all(len(letter["traceback"].encode()) <= limit for letter in letters)
    # An error text keeps its start, a traceback its end (where it raised).
    assert all(letter["error"].startswith("ValueError: xxx") for letter in letters)
    assert all(letter["traceback"].rstrip().endswith("xxx") for letter in letters)


def test_ids_and_types_have_a_size_bound(redis_url: str, r: redis.Redis) -> None:
    client = flumeq.Client(redis_url)
    with pytest.raises(flumeq.InvalidTask, match="task_id"):
        client.enqueue("work", {}, task_id="i" * (flumeq.MAX_ID_BYTES + 1))
    with pytest.raises(flumeq.InvalidTask, match="longer than"):
        client.enqueue("w" * (flumeq.MAX_TYPE_BYTES + 1), {})
    with pytest.raises(flumeq.InvalidTask, match="task_id"):
        client.enqueue_many([("work", {}, "i" * (flumeq.MAX_ID_BYTES + 1))])
    assert r.xlen(STREAM) == 0
    # Written by hand, past the client: dead-lettered with the field named.
    r.xadd(STREAM, {"id": "i" * 70_000, "type": "work", "payload": "{}"})
    r.xadd(STREAM, {"id": "ok-type", "type": "t" * 70_000, "payload": "{}"})
    good = client.enqueue("work", {"sleep": 0})
    report = flumeq.Engine({"work": lambda task: None}, redis_url).run(processes=1, burst=True)
    assert report["processed"] == 1 and report["restarts"] == 0
    letters = client.dead_letters()
    assert sorted(letter["reason"] for letter in letters) == ["invalid", "invalid"]
    errors = " ".join(letter["error"] for letter in letters)
    assert "field 'id'" in errors and "field 'type'" in errors
    assert good.id not in {letter["id"] for letter in letters}


def test_a_crash_in_an_async_batch_blames_only_its_culprit(redis_url: str, r: redis.Redis) -> None:
    client = flumeq.Client(redis_url)
    innocent = client.enqueue("nap", {}, max_retry=0)
    killer = client.enqueue("die", {}, max_retry=0)

    async def nap(task: flumeq.Task) -> None:
        await asyncio.sleep(0.05)
        process_redis(redis_url).hincrby("runs", task.id, 1)

    async def die(task: flumeq.Task) -> None:
        await asyncio.sleep(0.01)  # the innocent task is running too
        os._exit(3)

    report = flumeq.Engine({"nap": nap, "die": die}, redis_url).run(processes=1, burst=True)
    assert counts(r, "runs") == {innocent.id: 1}
    [dead] = client.dead_letters()
    assert (dead["id"], dead["reason"]) == (killer.id, "crashed")
    assert report["processed"] == 1 and report["dead"] == 1


CRASH_LOOP = """
    import os, sys, flumeq
    def die(task):
        os._exit(3)
    flumeq.Engine({"die": die}, sys.argv[1], retry_base=0, retry_max=0).run(processes=1)
"""


def test_actor_restarts_back_off(redis_url: str, r: redis.Redis) -> None:
    flumeq.Client(redis_url).enqueue("die", {}, max_retry=10_000)
    engine = spawn_script(CRASH_LOOP, redis_url)
    time.sleep(5.0)
    os.kill(engine.pid, signal.SIGTERM)
    engine.communicate(timeout=30)
    crashes = int(r.hget("flumeq:{default}:stats", "failed") or 0)
    # Without backoff an actor crash loop forks as fast as it can (hundreds in 4 s).
    assert 2 <= crashes <= 15, f"{crashes} crashing runs in about 4 s"


class ReplyDropper(Proxy):
    """A TCP proxy in front of Redis that, once, forwards a pipeline holding
    ``trigger`` and then cuts the connection before the reply comes back:
    Redis applied the commands, the client never hears so."""

    def __init__(self, upstream_port: int, trigger: tuple[bytes, ...]) -> None:
        self.trigger = trigger
        self.fired = threading.Event()
        super().__init__(upstream_port)

    def serve(self, client: socket.socket, upstream: socket.socket) -> None:
        cut = threading.Event()
        threading.Thread(target=self._requests, args=(client, upstream, cut), daemon=True).start()
        threading.Thread(target=self._replies, args=(upstream, client, cut), daemon=True).start()

    def _requests(
        self, client: socket.socket, upstream: socket.socket, cut: threading.Event
    ) -> None:
        with contextlib.suppress(OSError):
            while data := client.recv(65536):
                if not self.fired.is_set() and all(t in data for t in self.trigger):
                    self.fired.set()
                    cut.set()  # from now on this connection's replies are dropped
                    upstream.sendall(data)
                    time.sleep(0.2)  # Redis runs it...
                    break  # ...and the reply never arrives
                upstream.sendall(data)
        for side in (client, upstream):
            with contextlib.suppress(OSError):
                side.shutdown(socket.SHUT_RDWR)
            side.close()

    def _replies(
        self, upstream: socket.socket, client: socket.socket, cut: threading.Event
    ) -> None:
        with contextlib.suppress(OSError):
            while (data := upstream.recv(65536)) and not cut.is_set():
                client.sendall(data)


def test_a_replayed_outcome_write_appends_and_counts_nothing_twice(
    redis_server: RedisServer, redis_url: str, r: redis.Redis
) -> None:
    proxy = ReplyDropper(redis_server.port, (b"EXEC", b"XADD", b"XACK"))
    url = f"redis://127.0.0.1:{proxy.port}/0"
    try:
        client = flumeq.Client(redis_url)
        info = client.enqueue("flaky", {})

        def flaky(task: flumeq.Task) -> None:
            process_redis(redis_url).hincrby("runs", f"{task.id}:{task.attempt}", 1)
            if task.attempt == 0:
                raise flumeq.Retry()  # its next run is appended in the outcome MULTI

        report = flumeq.Engine({"flaky": flaky}, url).run(processes=1, burst=True)
        assert proxy.fired.is_set(), "the proxy never saw the outcome write"
    finally:
        proxy.close()
    assert counts(r, "runs") == {f"{info.id}:0": 1, f"{info.id}:1": 1}
    stats = client.stats()
    assert (stats["processed"], stats["failed"]) == (1, 1)
    assert int(r.hget("flumeq:{default}:stats", "retried") or 0) == 1
    assert report["processed"] == 1
    assert r.xlen(STREAM) == 0, "a replayed write still removes the entries it acked"


def test_scripts_run_by_sha_and_survive_a_flushed_script_cache(
    redis_url: str, r: redis.Redis
) -> None:
    r.config_resetstat()
    client = flumeq.Client(redis_url)
    client.enqueue("work", {"sleep": 0}, unique_key="u1")
    r.script_flush()  # as after a Redis restart: every SHA is unknown
    client.enqueue("work", {"sleep": 0}, unique_key="u2")
    client.enqueue("boom", {}, max_retry=0)
    flumeq.Engine({"work": lambda task: None, "boom": lambda task: 1 / 0}, redis_url).run(
        processes=1, burst=True
    )
    assert not r.keys("flumeq:{default}:unique:*"), "unique keys were released"
    assert r.xlen(STREAM) == 0, "done entries were removed after the scripts were loaded"
    r.script_flush()
    assert client.requeue_dead() == 1
    flumeq.Engine({"boom": lambda task: 1 / 0}, redis_url).run(processes=1, burst=True)
    r.script_flush()
    assert client.purge_dead() == 1
    stats = r.info("commandstats")
    assert "cmdstat_eval" not in stats, "a script was sent as full text"
    assert stats["cmdstat_evalsha"]["calls"] > 0
    assert "cmdstat_unlink" in stats, "dead letters were purged with DEL"


def test_a_live_engine_is_never_robbed_of_its_running_task(tmp_path: Any) -> None:
    """Its held entries look stale to others when it cannot refresh them (a
    Redis outage, a stalled dispatcher): its heartbeat still says it lives."""
    server = RedisServer(appendonly=True).start()
    try:
        url = server.url
        conn = redis.Redis.from_url(url)
        info = flumeq.Client(url).enqueue("work", {"sleep": 5.0})
        script = ENGINE.replace("claim_stale_after=300", "claim_stale_after=0.5")
        engines = [spawn_script(script, url, name) for name in ("holder", "bystander")]
        try:
            wait_until(lambda: conn.hget("started", info.id) is not None)
            holder = next(
                name
                for name in ("holder", "bystander")
                if conn.xpending_range(STREAM, "flumeq", "-", "+", 1, name)
            )
            paused = dispatcher_pid(conn, holder)
            assert paused is not None
            os.kill(paused, signal.SIGSTOP)  # no refresh, no heartbeat for 2 s
            try:
                time.sleep(2.0)
            finally:
                os.kill(paused, signal.SIGCONT)
            server.kill()  # and Redis away: every entry looks idle for longer
            time.sleep(1.0)
            server.start()
            conn = redis.Redis.from_url(url)
            wait_until(lambda: conn.hget("runs", info.id) is not None, timeout=30)
            time.sleep(1.0)
            assert counts(conn, "started") == {info.id: 1}, "a live engine's task ran twice"
        finally:
            for engine in engines:
                os.kill(engine.pid, signal.SIGTERM)
            for engine in engines:
                engine.communicate(timeout=30)
    finally:
        server.stop()


METRICS_ENGINE = """
    import sys, flumeq
    flumeq.Engine({"work": lambda task: None}, sys.argv[1], metrics_port=int(sys.argv[2])).run(
        processes=1
    )
"""


def test_a_killed_metrics_process_is_replaced_and_listens_on_loopback(redis_url: str) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    engine = spawn_script(METRICS_ENGINE, redis_url, str(port))

    def listener() -> Optional[psutil.Process]:
        for child in psutil.Process(engine.pid).children():
            with contextlib.suppress(psutil.NoSuchProcess):
                for connection in child.net_connections("tcp"):
                    if connection.status == psutil.CONN_LISTEN and connection.laddr.port == port:
                        assert connection.laddr.ip == "127.0.0.1"
                        return child
        return None

    try:
        wait_until(lambda: listener() is not None)
        first = listener()
        assert first is not None
        first.kill()
        wait_until(lambda: (again := listener()) is not None and again.pid != first.pid)
        assert engine.poll() is None
    finally:
        os.kill(engine.pid, signal.SIGTERM)
        _, err = engine.communicate(timeout=30)
    assert engine.returncode == 0, err.decode()[-2000:]


def test_a_burst_waiting_for_a_delayed_task_does_not_spin(redis_url: str, r: redis.Redis) -> None:
    info = flumeq.Client(redis_url).enqueue("work", {"sleep": 0}, delay=3.0)

    def redis_cpu() -> float:
        cpu = r.info("cpu")
        return float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"])

    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    redis_before = redis_cpu()
    started = time.monotonic()
    report = flumeq.Engine({"work": counting_handler(redis_url)}, redis_url).run(
        processes=1, burst=True
    )
    took = time.monotonic() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    engine = (after.ru_utime - children.ru_utime) + (after.ru_stime - children.ru_stime)
    assert report["processed"] == 1 and counts(r, "runs") == {info.id: 1}
    assert took >= 2.5
    assert engine < 0.5, f"the engine used {engine:.2f} CPU-s waiting {took:.1f}s"
    assert redis_cpu() - redis_before < 0.5, "the engine kept redis busy while waiting"


def test_waiters_outlive_a_redis_restart_and_a_killed_actor() -> None:
    """Sync and async waiters blocked in Redis when it restarts resume from
    their cursor; a task whose actor is killed mid-run is retried and its
    result still reaches them."""
    server = RedisServer(appendonly=True).start()
    try:
        url = server.url
        client = flumeq.Client(url, timeout=1.0)
        plain = client.enqueue("add", {"n": 1}, result_ttl=60)
        doomed = client.enqueue("die_once", {"n": 2}, result_ttl=60, max_retry=3)
        got: dict[str, Any] = {}

        def wait_sync() -> None:
            got["sync"] = client.result(plain, timeout=60)

        async def wait_async() -> None:
            async with flumeq.AsyncClient(url, timeout=1.0) as aclient:
                got["async"] = await aclient.result(doomed, timeout=60)

        waiters = [
            threading.Thread(target=wait_sync),
            threading.Thread(target=asyncio.run, args=(wait_async(),)),
        ]
        for waiter in waiters:
            waiter.start()
        time.sleep(0.5)
        server.kill()
        time.sleep(1.5)
        server.start()
        engine = spawn_script(
            """
            import os, sys, flumeq
            from conftest import process_redis

            def die_once(task):
                if task.attempt == 0:
                    os.kill(os.getpid(), 9)
                return task.payload["n"] * 10

            handlers = {"add": lambda task: task.payload["n"] + 1, "die_once": die_once}
            flumeq.Engine(handlers, sys.argv[1], retry_base=0.01, retry_max=0.01).run(processes=1)
            """,
            url,
        )
        try:
            for waiter in waiters:
                waiter.join(timeout=60)
            assert got == {"sync": 2, "async": 20}
        finally:
            os.kill(engine.pid, signal.SIGTERM)
            engine.communicate(timeout=30)
    finally:
        server.stop()


def test_sigterm_to_the_group_lets_async_tasks_of_every_batch_finish(
    redis_url: str, r: redis.Redis
) -> None:
    """An async actor runs several batches at once; a group-wide SIGTERM
    (systemd) finishes the running tasks, hands the rest back, exits 0."""
    client = flumeq.Client(redis_url)
    engine = spawn_script(
        """
        import asyncio, sys, flumeq
        from conftest import process_redis

        async def slow(task):
            process_redis(sys.argv[1]).hincrby("started", task.id, 1)
            await asyncio.sleep(1.0)
            process_redis(sys.argv[1]).hincrby("runs", task.id, 1)

        flumeq.Engine({"slow": slow}, sys.argv[1], concurrency=10).run(processes=2)
        """,
        redis_url,
    )
    wait_until(lambda: bool(r.exists("flumeq:workers")), timeout=30)
    infos = []
    for n in range(60):  # arriving one by one: many small batches per actor
        infos.append(client.enqueue("slow", {"n": n}))
        time.sleep(0.005)
    wait_until(lambda: r.hlen("started") >= 10, timeout=30)
    os.killpg(engine.pid, signal.SIGTERM)
    assert engine.wait(timeout=40) == 0
    started, runs = counts(r, "started"), counts(r, "runs")
    assert started and runs == started, "a task that started did not finish"
    assert all(count == 1 for count in started.values())
    assert r.xlen("flumeq:{default}:dead") == 0
    left = client.stats()
    assert left["ready"] + len(runs) == len(infos), (left, len(runs))


def test_kept_results_survive_kills_of_the_dispatcher(redis_url: str, r: redis.Redis) -> None:
    """Outcomes ride in the ack's MULTI: a dispatcher killed with -9 while
    outcomes are on their way loses none. Every task's result is there once
    it ended, waited for by one client throughout, and no task is acked
    without its result (nor the other way round)."""
    source = """
        import sys, time, flumeq
        def square(task):
            time.sleep(0.002)
            return task.payload["n"] ** 2
        flumeq.Engine({"square": square}, sys.argv[1], consumer="keeper",
                      claim_stale_after=300).run(processes=2)
    """
    client = flumeq.Client(redis_url)
    infos = client.enqueue_many([("square", {"n": n}) for n in range(1500)], result_ttl=600)
    engine = spawn_script(source, redis_url)
    try:
        for _ in range(2):
            wait_until(lambda: dispatcher_pid(r, "keeper") is not None, timeout=30)
            time.sleep(0.4)  # outcomes are being written
            kill_dispatcher(r, "keeper")
        values = [info.result(timeout=60) for info in infos]
        assert values == [n**2 for n in range(1500)]
        assert engine.poll() is None
    finally:
        engine.send_signal(signal.SIGTERM)
        assert engine.wait(timeout=40) == 0
    stats = client.stats()
    assert (stats["ready"], stats["in_flight"], stats["dead"]) == (0, 0, 0)
    # Each result hash is there exactly for the acked tasks: all of them.
    assert all(r.exists(f"flumeq:{{default}}:result:{info.id}") for info in infos)
