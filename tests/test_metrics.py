"""The Prometheus endpoint's collector: real Redis, real engine runs, and what
it does when Redis is away or holds garbage."""

from __future__ import annotations

import os
import signal
import socket
import threading
import urllib.request

import psutil
import redis

import flumeq
from conftest import spawn_script, wait_until
from flumeq.admin import Admin
from flumeq.metrics import DURATION_BUCKETS, metrics_server, render
from flumeq.redis_server import RedisServer


def sample(text: str, name: str) -> float:
    """The value of the one sample line starting with ``name``."""
    (line,) = [line for line in text.splitlines() if line.startswith(name + " ")]
    return float(line.rsplit(" ", 1)[1])


def test_counts_per_type_durations_and_depth(redis_url: str) -> None:
    client = flumeq.Client(redis_url)
    client.enqueue_many([("fast", {"n": n}) for n in range(20)], queue="m")
    client.enqueue_many([("flaky", {"n": n}) for n in range(4)], queue="m", max_retry=1)
    # A delayed task in a queue the engine does not serve (burst would wait for it).
    client.enqueue("later", {}, queue="other", delay=600)

    def flaky(task: flumeq.Task) -> None:
        raise RuntimeError("no")

    engine = flumeq.Engine(
        {"fast": lambda task: None, "flaky": flaky}, redis_url, queues=("m",), retry_base=0
    )
    done = engine.run(processes=1, burst=True)
    assert done["processed"] == 20
    assert done["dead"] == 4

    text = render(Admin(redis_url))[0].decode()
    assert sample(text, 'flumeq_tasks_enqueued_total{queue="m",type="fast"}') == 20
    assert sample(text, 'flumeq_tasks_processed_total{queue="m",type="fast"}') == 20
    assert sample(text, 'flumeq_tasks_failed_total{queue="m",type="flaky"}') == 8
    assert sample(text, 'flumeq_tasks_retried_total{queue="m",type="flaky"}') == 4
    assert sample(text, 'flumeq_tasks_dead_total{queue="m",type="flaky"}') == 4
    assert sample(text, 'flumeq_queue_dead{queue="m"}') == 4
    assert sample(text, 'flumeq_queue_delayed{queue="other"}') == 1
    # Every run is in the histogram: 20 successes and 8 failed runs.
    assert sample(text, 'flumeq_task_duration_seconds_count{queue="m",type="fast"}') == 20
    assert sample(text, 'flumeq_task_duration_seconds_count{queue="m",type="flaky"}') == 8
    inf = sample(text, 'flumeq_task_duration_seconds_bucket{le="+Inf",queue="m",type="fast"}')
    last = sample(
        text,
        f'flumeq_task_duration_seconds_bucket{{le="{DURATION_BUCKETS[-1]!r}",queue="m",type="fast"}}',
    )
    assert inf == last == 20  # no-op runs take far less than a minute
    assert sample(text, "flumeq_redis_up") == 1


def test_an_empty_redis_scrapes_fine(redis_url: str) -> None:
    text = render(Admin(redis_url))[0].decode()
    assert sample(text, "flumeq_redis_up") == 1
    assert sample(text, "flumeq_workers") == 0


def test_redis_away_is_a_metric_not_an_error() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    text = render(Admin(f"redis://127.0.0.1:{port}/0", timeout=0.5))[0].decode()
    assert sample(text, "flumeq_redis_up") == 0


def test_garbage_in_stats_durations_and_registry_is_skipped(redis_url: str, r: redis.Redis) -> None:
    flumeq.Client(redis_url).enqueue("t", {}, queue="g")
    r.hset("flumeq:{g}:stats", mapping={"processed": "lots", "weird|": "1", "processed|t": "3"})
    r.hset("flumeq:{g}:durations", mapping={"t|sum": "NaNx", "t|zz": "1", "t|0": "2", "junk": "x"})
    r.zadd("flumeq:workers", {"ghost": 1})
    r.hset("flumeq:worker:ghost", mapping={"pid": "abc", "queues": "{not json"})
    text = render(Admin(redis_url))[0].decode()
    assert sample(text, "flumeq_redis_up") == 1
    assert sample(text, 'flumeq_tasks_processed_total{queue="g",type="t"}') == 3
    assert sample(text, 'flumeq_task_duration_seconds_count{queue="g",type="t"}') == 2
    assert sample(text, 'flumeq_queue_ready{queue="g"}') == 1
    (ghost,) = Admin(redis_url).workers()
    assert ghost["pid"] == 0


ENGINE = """
    import sys, flumeq
    flumeq.Engine({"t": lambda task: None}, sys.argv[1], consumer="phoenix").run(processes=1)
"""


def test_registry_and_counters_come_back_after_redis_loses_everything() -> None:
    """Redis restarted without persistence: the live worker registers again
    within a heartbeat or two, and counting and scraping carry on."""
    server = RedisServer().start()
    engine = None
    try:
        url = server.url
        admin = Admin(url, timeout=1.0)
        engine = spawn_script(ENGINE, url)
        wait_until(lambda: [w["consumer"] for w in admin.workers()] == ["phoenix"])
        server.kill()
        assert sample(render(admin)[0].decode(), "flumeq_redis_up") == 0
        server.start()
        wait_until(lambda: [w["consumer"] for w in admin.workers()] == ["phoenix"], timeout=30)
        flumeq.Client(url).enqueue_many([("t", {}) for _ in range(10)])
        wait_until(lambda: flumeq.Client(url).stats()["processed"] == 10, timeout=30)
        text = render(admin)[0].decode()
        assert sample(text, "flumeq_redis_up") == 1
        assert sample(text, 'flumeq_tasks_processed_total{queue="default",type="t"}') == 10
        assert engine.poll() is None
    finally:
        if engine is not None:
            os.killpg(engine.pid, signal.SIGKILL)
            engine.wait()
        server.stop()


SERVE_METRICS = """
import sys

from flumeq.admin import Admin
from flumeq.metrics import serve_metrics

serve_metrics(Admin(sys.argv[1]), int(sys.argv[2]))
"""


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        return str(reply.read().decode())


def test_metrics_server_listens_on_loopback_by_default(redis_url: str) -> None:
    server = metrics_server(Admin(redis_url), 0)
    host, port = server.server_address[:2]
    assert host == "127.0.0.1"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        assert sample(scrape(int(port)), "flumeq_redis_up") == 1
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def test_serve_metrics_binds_only_loopback(redis_url: str) -> None:
    """serve_metrics with no host: its process listens on 127.0.0.1 alone
    (it listened on every address before)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    process = spawn_script(SERVE_METRICS, redis_url, str(port))
    try:

        def listening() -> list[str]:
            return [
                connection.laddr.ip
                for connection in psutil.Process(process.pid).net_connections(kind="inet")
                if connection.status == psutil.CONN_LISTEN and connection.laddr.port == port
            ]

        wait_until(lambda: bool(listening()) or process.poll() is not None, timeout=15)
        assert process.poll() is None, process.communicate()[1].decode()
        assert listening() == ["127.0.0.1"]
        assert sample(scrape(port), "flumeq_redis_up") == 1
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
