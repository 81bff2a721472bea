"""SAQ: queue.enqueue(); `saq settings --workers P`."""

from __future__ import annotations

import asyncio
import sys
from typing import Any

import common
from saq import Queue

NAME = "saq"
SETTINGS = "Queue.from_url, concurrency 10 (default), async handler, --workers P"
BULK = None
ASYNC = True

queue = Queue.from_url(common.URL)


async def work_task(ctx: dict[str, Any], *, payload: dict[str, Any]) -> None:
    await common.work_async()
    common.finish(payload)


settings = {"queue": queue, "functions": [work_task]}


class AsyncProducer:
    """queue.enqueue from many coroutines at once."""

    async def start(self) -> None:
        await queue.connect()

    async def send(self, payload: dict[str, Any]) -> None:
        await queue.enqueue("work_task", payload=payload)

    async def close(self) -> None:
        await queue.disconnect()


class Producer:
    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.loop.run_until_complete(queue.connect())

    def send(self, payloads: list[dict[str, Any]], bulk: bool) -> None:
        async def run() -> None:
            for payload in payloads:
                await queue.enqueue("work_task", payload=payload)

        self.loop.run_until_complete(run())

    def close(self) -> None:
        self.loop.run_until_complete(queue.disconnect())


def worker(procs: int) -> list[list[str]]:
    return [[sys.executable, "-m", "saq", "sys_saq.settings", "--workers", str(procs)]]
