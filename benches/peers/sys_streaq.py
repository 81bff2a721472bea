"""streaQ: task.enqueue(); `streaq worker` (async)."""

from __future__ import annotations

import asyncio
import sys
import threading
from typing import Any

import common
from streaq import Worker

NAME = "streaq"
SETTINGS = "Worker defaults, async handler, --workers P"
BULK = "enqueue_many"
ASYNC = True

worker_app = Worker(redis_url=common.URL, anyio_backend="asyncio")


@worker_app.task
async def work_task(payload: dict[str, Any]) -> None:
    await common.work_async()
    common.finish(payload)


class Producer:
    """streaQ's context (coredis, anyio) must be entered and left in one task:
    a loop thread holds it open and sends run inside it."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, daemon=True).start()
        self.ready = threading.Event()
        self.held = asyncio.run_coroutine_threadsafe(self._hold(), self.loop)
        if not self.ready.wait(30):
            raise RuntimeError("streaq producer did not connect")

    async def _hold(self) -> None:
        self.closing = asyncio.Event()
        async with worker_app:
            self.ready.set()
            await self.closing.wait()

    async def _send(self, payloads: list[dict[str, Any]], bulk: bool) -> None:
        if bulk:
            for offset in range(0, len(payloads), 1000):
                chunk = payloads[offset : offset + 1000]
                await worker_app.enqueue_many([work_task.enqueue(p) for p in chunk])
        else:
            for payload in payloads:
                await work_task.enqueue(payload)

    def send(self, payloads: list[dict[str, Any]], bulk: bool) -> None:
        asyncio.run_coroutine_threadsafe(self._send(payloads, bulk), self.loop).result()

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.closing.set)
        self.held.result(30)


def worker(procs: int) -> list[list[str]]:
    return [
        [sys.executable, "-m", "streaq", "run", "sys_streaq:worker_app", "--workers", str(procs)]
    ]
