"""The ``flumeq`` command line."""

from __future__ import annotations

import logging
import os
import time

import click

from .client import Client
from .engine import Engine
from .redis_server import RedisServer
from .task import Task

__all__ = ["main"]


def _noop(task: Task) -> None:
    """The demo's handler: does nothing."""


@click.group()
@click.version_option(package_name="flumeq")
def main() -> None:
    """flumeq: a fast, reliable task queue on Redis Streams."""


@main.command()
@click.option(
    "--tasks", "-n", default=100_000, show_default=True, help="Tasks to enqueue and drain."
)
@click.option(
    "--processes", "-p", type=int, default=None, help="Actor processes [default: CPU count]."
)
@click.option("--url", default=None, help="Use this Redis instead of starting a private one.")
def demo(tasks: int, processes: int | None, url: str | None) -> None:
    """Enqueue and drain no-op tasks on a private redis-server; print the rates."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    processes = processes or os.cpu_count() or 1
    server = None if url else RedisServer().start()
    target = url or (server.url if server else "")
    try:
        if server:
            click.echo(f"started a private redis-server on {server.url}")
        chunk = 5000
        with Client(target) as client:
            started = time.perf_counter()
            with click.progressbar(length=tasks, label="enqueue") as bar:
                for offset in range(0, tasks, chunk):
                    size = min(chunk, tasks - offset)
                    client.enqueue_many(
                        [("noop", {"n": offset + i}) for i in range(size)], queue="demo"
                    )
                    bar.update(size)
            enqueue_seconds = time.perf_counter() - started
            click.echo(f"draining with {processes} process(es)...")
            started = time.perf_counter()
            report = Engine({"noop": _noop}, target, queues=("demo",)).run(
                processes=processes, burst=True
            )
            drain_seconds = time.perf_counter() - started
            stats = client.stats("demo")
        click.echo(
            f"enqueued {tasks} tasks in {enqueue_seconds:.2f}s: {tasks / enqueue_seconds:,.0f} tasks/s"
        )
        click.echo(
            f"drained  {report['processed']} tasks in {drain_seconds:.2f}s: "
            f"{report['processed'] / drain_seconds:,.0f} tasks/s"
        )
        click.echo(
            f"left: ready={stats['ready']} in_flight={stats['in_flight']} dead={stats['dead']}"
        )
    finally:
        if server:
            server.stop()
