"""Prometheus metrics, read from Redis at scrape time.

Every number lives in Redis already (stats hashes, stream and ZSET sizes, the
worker registry, run-time histograms the actors report), so any process can
serve all of them: the dashboard's ``/metrics`` and ``flumeq worker
--metrics-port`` use the same collector. The values are cluster-wide; scrape
one endpoint (or de-duplicate by ``job``), not every worker.

Actors time each run in the core (from the task's ``begin`` to the next
``begin`` or ``finish``, so no per-task Python work) and add it to a histogram
per queue and type; about once a second, or when they go idle, the histogram
goes to the dispatcher, which adds it to ``<prefix>:{queue}:durations`` in the
same MULTI as the batch's outcomes.

``serve_metrics`` listens on 127.0.0.1 unless given another ``host``
(``flumeq worker --metrics-host``): the endpoint has no authentication.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Iterator, Sequence
from http.server import ThreadingHTTPServer
from typing import TYPE_CHECKING, Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import MetricsHandler

from . import _core, reads

if TYPE_CHECKING:
    from .admin import Admin

__all__ = ["DURATION_BUCKETS", "FlumeqCollector", "metrics_server", "render", "serve_metrics"]

log = logging.getLogger("flumeq.metrics")

#: Upper bounds (seconds) of the handler run-time buckets (a +Inf bucket
#: follows), defined by the core, which does the counting.
DURATION_BUCKETS: tuple[float, ...] = tuple(_core.duration_buckets())


class FlumeqCollector:
    """Collects flumeq's metrics from Redis through an ``Admin``."""

    def __init__(self, admin: Admin, queues: Sequence[str] | None = None) -> None:
        self.admin = admin
        self.queues = list(queues) if queues else None

    def describe(self) -> list[Metric]:
        # No values at registration time: describing must not reach Redis.
        return []

    def collect(self) -> Iterator[Metric]:
        try:
            rows = self.admin.overview(self.queues)
            workers = self.admin.workers()
            run_times = self.admin.durations(row["name"] for row in rows)
        except Exception as error:
            log.warning("metrics: cannot read redis: %s", error)
            up = GaugeMetricFamily("flumeq_redis_up", "Whether Redis answered this scrape")
            up.add_metric([], 0)
            yield up
            return
        up = GaugeMetricFamily("flumeq_redis_up", "Whether Redis answered this scrape")
        up.add_metric([], 1)
        yield up
        gauges = {
            name: GaugeMetricFamily(f"flumeq_queue_{name}", text, labels=["queue"])
            for name, text in (
                ("ready", "Tasks waiting to be read"),
                ("in_flight", "Tasks delivered to an engine and not finished"),
                ("delayed", "Tasks scheduled for later (delay, at, retry backoff)"),
                ("dead", "Tasks in the dead-letter stream"),
            )
        }
        paused = GaugeMetricFamily(
            "flumeq_queue_paused",
            "1 while the queue is paused (no engine starts its tasks)",
            labels=["queue"],
        )
        age = GaugeMetricFamily(
            "flumeq_queue_oldest_ready_age_seconds",
            "Age of the oldest task waiting to be read (0 when none waits)",
            labels=["queue"],
        )
        counters = {
            name: CounterMetricFamily(
                f"flumeq_tasks_{name}", f"Tasks {name}", labels=["queue", "type"]
            )
            for name in reads.COUNTERS
        }
        history: dict[str, Any] = {
            "history_buffered": GaugeMetricFamily(
                "flumeq_history_buffered",
                "Task-history events waiting in Redis to be written into PostgreSQL",
                labels=["queue"],
            ),
            "history_dropped": CounterMetricFamily(
                "flumeq_history_dropped",
                "Task-history events dropped past history_buffer (PostgreSQL slow or down)",
                labels=["queue"],
            ),
            "history_errors": CounterMetricFamily(
                "flumeq_history_errors",
                "Failed attempts at writing task history into PostgreSQL",
                labels=["queue"],
            ),
        }
        durations = HistogramMetricFamily(
            "flumeq_task_duration_seconds", "Handler run time", labels=["queue", "type"]
        )
        for row in rows:
            queue = row["name"]
            for name, gauge in gauges.items():
                gauge.add_metric([queue], row[name])
            paused.add_metric([queue], 1 if row["paused"] else 0)
            age.add_metric([queue], row["oldest_ready_age"] or 0.0)
            for name, metric in history.items():
                metric.add_metric([queue], row.get(name, 0))
            for type_, counts in sorted(row["types"].items()):
                for name, counter in counters.items():
                    counter.add_metric([queue, type_], counts[name])
            for type_, histogram in sorted(run_times[queue].items()):
                cumulative, buckets = 0, []
                for index, bound in enumerate((*DURATION_BUCKETS, float("inf"))):
                    cumulative += histogram["buckets"].get(index, 0)
                    label = "+Inf" if bound == float("inf") else repr(bound)
                    buckets.append((label, cumulative))
                durations.add_metric([queue, type_], buckets, histogram["sum"])
        yield from gauges.values()
        yield paused
        yield age
        yield from counters.values()
        yield from history.values()
        yield durations
        worker_metrics: dict[str, GaugeMetricFamily | CounterMetricFamily] = {
            "in_flight": GaugeMetricFamily(
                "flumeq_worker_in_flight", "Tasks an engine holds", labels=["worker"]
            ),
            "processes": GaugeMetricFamily(
                "flumeq_worker_processes", "Actor processes of an engine", labels=["worker"]
            ),
            "restarts": CounterMetricFamily(
                "flumeq_worker_actor_restarts",
                "Actors that died and were replaced",
                labels=["worker"],
            ),
            "processed": CounterMetricFamily(
                "flumeq_worker_processed", "Tasks an engine ran successfully", labels=["worker"]
            ),
            "failed": CounterMetricFamily(
                "flumeq_worker_failed", "Failed runs of an engine", labels=["worker"]
            ),
        }
        alive = GaugeMetricFamily("flumeq_workers", "Live engines")
        alive.add_metric([], len(workers))
        for worker in workers:
            for name, metric in worker_metrics.items():
                metric.add_metric([worker["consumer"]], worker[name])
        yield alive
        yield from worker_metrics.values()


def render(admin: Admin, queues: Sequence[str] | None = None) -> tuple[bytes, str]:
    """The Prometheus text exposition of flumeq's metrics: (body, content type)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(FlumeqCollector(admin, queues))
    return generate_latest(registry), CONTENT_TYPE_LATEST


class _Server(ThreadingHTTPServer):
    daemon_threads = True


class _Server6(_Server):
    address_family = socket.AF_INET6


def metrics_server(
    admin: Admin, port: int, host: str = "127.0.0.1", queues: Sequence[str] | None = None
) -> ThreadingHTTPServer:
    """An HTTP server of ``/metrics``, listening on ``host:port`` (an IPv6
    address such as ``::1`` too; port 0 picks a free one); not yet serving."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(FlumeqCollector(admin, queues))
    handler = MetricsHandler.factory(registry)
    server_class = _Server6 if ":" in host else _Server
    return server_class((host.strip("[]"), port), handler)


def serve_metrics(
    admin: Admin, port: int, host: str = "127.0.0.1", queues: Sequence[str] | None = None
) -> None:
    """Serves ``/metrics`` on ``host:port`` until the process ends (blocks).

    ``host`` defaults to loopback: the endpoint has no authentication, so
    listen wider (``0.0.0.0``) only where the network is trusted."""
    server = metrics_server(admin, port, host, queues)
    shown = f"[{host.strip('[]')}]" if ":" in host else host
    log.info("metrics on http://%s:%d/metrics", shown, server.server_address[1])
    server.serve_forever()
