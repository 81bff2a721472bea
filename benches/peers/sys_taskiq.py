"""taskiq with taskiq-redis's stream broker: task.kiq(); `taskiq worker --workers P`."""

from __future__ import annotations

import asyncio
import sys
from typing import Any

import common
from taskiq_redis import RedisStreamBroker

NAME = "taskiq"
SETTINGS = "RedisStreamBroker, async handler, --workers P, defaults otherwise"
BULK = None
ASYNC = True

broker = RedisStreamBroker(url=common.URL)


@broker.task(task_name="bench.work")
async def work_task(payload: dict[str, Any]) -> None:
    await common.work_async()
    common.finish(payload)


class AsyncProducer:
    """task.kiq from many coroutines at once."""

    async def start(self) -> None:
        await broker.startup()

    async def send(self, payload: dict[str, Any]) -> None:
        await work_task.kiq(payload)

    async def close(self) -> None:
        await broker.shutdown()


class Producer:
    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.loop.run_until_complete(broker.startup())

    def send(self, payloads: list[dict[str, Any]], bulk: bool) -> None:
        async def run() -> None:
            for payload in payloads:
                await work_task.kiq(payload)

        self.loop.run_until_complete(run())

    def close(self) -> None:
        self.loop.run_until_complete(broker.shutdown())


def worker(procs: int) -> list[list[str]]:
    return [
        [sys.executable, "-m", "taskiq", "worker", "sys_taskiq:broker", "--workers", str(procs)]
    ]
