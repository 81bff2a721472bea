"""Dramatiq with the Redis broker: actor.send(); `dramatiq -p P -t 8`."""

from __future__ import annotations

import sys
from typing import Any

import common
import dramatiq
from dramatiq.brokers.redis import RedisBroker

NAME = "dramatiq"
SETTINGS = "RedisBroker, max_retries=0, -p P -t 8"
BULK = None
ASYNC = False

broker = RedisBroker(url=common.URL)
dramatiq.set_broker(broker)


@dramatiq.actor(queue_name="bench", max_retries=0)
def work_task(payload: dict[str, Any]) -> None:
    common.work()
    common.finish(payload)


class Producer:
    def send(self, payloads: list[dict[str, Any]], bulk: bool) -> None:
        for payload in payloads:
            work_task.send(payload)

    def close(self) -> None:
        pass


def worker(procs: int) -> list[list[str]]:
    return [
        [
            sys.executable,
            "-m",
            "dramatiq",
            "sys_dramatiq",
            "-p",
            str(procs),
            "-t",
            "8",
            "-Q",
            "bench",
        ]
    ]
