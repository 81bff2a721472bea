"""``AsyncClient``: ``Client``'s methods as coroutines, for asyncio services.

Redis I/O runs on the client's own I/O thread (the compiled core releases
the GIL while it waits), so the event loop never blocks. Concurrent
``enqueue`` calls share round trips: a call adds its task to the pending
batch and, while one batch is on the wire, the next one fills; each batch
goes out as one pipeline. Waits for results share one blocking reader per
queue (see ``results``).

The outage buffer and the errors are ``Client``'s: the I/O thread drives a
``Client``.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from types import TracebackType
from typing import Any, Callable, Optional, TypeVar, Union

from . import _core
from .client import (
    DEFAULT_MAX_RETRY,
    DEFAULT_TIMEOUT,
    Client,
    Seconds,
    _Call,
    _kept,
    prepare_many,
    prepare_one,
)
from .errors import FlumeqError, RedisUnavailable, ResultTimeout
from .results import BLOCK_MS, RECHECK, Records, check_wait, outcome
from .task import TaskInfo

__all__ = ["AsyncClient"]

T = TypeVar("T")

#: The pairs ``(task id, entry id)`` a batch's pipeline gave, in its order.
_Pairs = list[tuple[str, Optional[str]]]


def _group_key(call: _Call) -> tuple[Any, ...]:
    return (
        call.queue,
        call.max_retry,
        call.timeout_ms,
        call.deadline_ms,
        call.labels,
        call.due_ms,
        call.result_ttl_ms,
        call.retention_ms,
    )


class _Batch(asyncio.Future):  # type: ignore[type-arg]
    """The pending enqueues of one loop that share their options: they go
    out in one pipeline, and every caller awaits this one future (one
    future and one wake-up of the loop per batch, not per call).

    It refuses ``cancel``: one caller's cancellation must not fail the
    others. A cancelled caller gets its ``CancelledError`` when the batch is
    written (its task was on the wire already, as with ``Client.enqueue``).
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, call: _Call) -> None:
        super().__init__(loop=loop)
        self.home = loop
        self.options = call[2:]
        self.queue = call.queue
        self.call = call._replace(items=[])

    def cancel(self, msg: Any = None) -> bool:
        return False

    def finish(self, value: Any, failed: bool) -> None:
        """Loop thread: hands the batch's pairs (or its error) to the callers."""
        if failed:
            super().set_exception(value)
        else:
            super().set_result(value)


class AsyncClient:
    """Enqueues tasks and reads queue state from asyncio code.

    Takes ``Client``'s arguments. Use it from any running loop (also from
    several); ``async with AsyncClient() as client:`` closes it.
    """

    def __init__(
        self,
        url: Optional[str] = None,
        *,
        prefix: str = "flumeq",
        timeout: float = 5.0,
        buffer_size: int = 1000,
        middleware: Iterable[Any] = (),
        history: Union[str, bool, None] = None,
    ) -> None:
        self._client = Client(
            url,
            prefix=prefix,
            timeout=timeout,
            buffer_size=buffer_size,
            middleware=middleware,
            history=history,
        )
        self.middleware = self._client.middleware
        self.url = self._client.url
        self.prefix = prefix
        self._timeout = timeout
        self._io = ThreadPoolExecutor(1, thread_name_prefix="flumeq-io")
        self._lock = threading.Lock()
        #: Open batches by loop and options; the last one joined, checked first.
        self._open: dict[tuple[Any, ...], _Batch] = {}
        self._last: Optional[_Batch] = None
        self._sending = False
        self._readers: dict[str, _QueueReader] = {}
        #: Pipelines the batched enqueues went out in (one per send of a
        #: group of calls with the same options).
        self.round_trips = 0

    # ---- enqueue ---------------------------------------------------------

    async def enqueue(
        self,
        type: str,
        payload: Any = None,
        *,
        queue: str = "default",
        max_retry: int = DEFAULT_MAX_RETRY,
        timeout: Optional[Seconds] = DEFAULT_TIMEOUT,
        delay: Optional[Seconds] = None,
        at: Optional[datetime] = None,
        deadline: Optional[datetime] = None,
        unique_key: Optional[str] = None,
        unique_ttl: Seconds = 3600.0,
        task_id: Optional[str] = None,
        labels: Optional[Mapping[str, str]] = None,
        result_ttl: Optional[Seconds] = None,
        retention: Optional[Seconds] = None,
        **unknown: Any,
    ) -> TaskInfo[Any]:
        """``Client.enqueue`` as a coroutine; concurrent calls share round trips."""
        call, unique_ttl_ms = prepare_one(
            type,
            payload,
            queue=queue,
            max_retry=max_retry,
            timeout=timeout,
            delay=delay,
            at=at,
            deadline=deadline,
            unique_key=unique_key,
            unique_ttl=unique_ttl,
            task_id=task_id,
            labels=labels,
            result_ttl=result_ttl,
            unknown=unknown,
            middleware=self.middleware,
            retention=retention,
        )
        if unique_key is not None:
            [(id_, entry_id)] = await self._run(self._client._send, call, unique_key, unique_ttl_ms)
        else:
            batch, start = self._join(call)
            pairs: _Pairs = await batch
            id_, entry_id = pairs[start]
        return TaskInfo(id_, call.items[0][0], queue, entry_id, self._client, _kept(call))

    async def enqueue_many(
        self,
        items: Iterable[Sequence[Any]],
        *,
        queue: str = "default",
        max_retry: int = DEFAULT_MAX_RETRY,
        timeout: Optional[Seconds] = DEFAULT_TIMEOUT,
        labels: Optional[Mapping[str, str]] = None,
        result_ttl: Optional[Seconds] = None,
        retention: Optional[Seconds] = None,
    ) -> list[TaskInfo[Any]]:
        """``Client.enqueue_many`` as a coroutine."""
        call = prepare_many(
            items,
            queue=queue,
            max_retry=max_retry,
            timeout=timeout,
            labels=labels,
            result_ttl=result_ttl,
            middleware=self.middleware,
            retention=retention,
        )
        if call is None:
            return []
        batch, start = self._join(call)
        pairs: _Pairs = await batch
        kept = _kept(call)
        return [
            TaskInfo(id_, item[0], queue, entry_id, self._client, kept)
            for (id_, entry_id), item in zip(pairs[start : start + len(call.items)], call.items)
        ]

    def _join(self, call: _Call) -> tuple[_Batch, int]:
        """Adds ``call``'s items to its loop's open batch of the same
        options (a new one if none); starts a send unless one runs. Returns
        the batch and where the call's items start in it."""
        loop = asyncio.get_running_loop()
        with self._lock:
            batch = self._last
            if (
                batch is None
                or batch.home is not loop
                or batch.queue != call.queue
                or batch.options != call[2:]
            ):
                key = (loop, *_group_key(call))
                batch = self._open.get(key)
                if batch is None:
                    batch = self._open[key] = _Batch(loop, call)
                self._last = batch
            items = batch.call.items
            start = len(items)
            items.extend(call.items)
            idle = not self._sending
            self._sending = True
        if idle:
            self._io.submit(self._drain)
        return batch, start

    def _drain(self) -> None:
        """I/O thread: sends the open batches until none is left, each as one
        pipeline, and hands each its outcome on its loop."""
        while True:
            with self._lock:
                batches = list(self._open.values())
                self._open.clear()
                self._last = None
                if not batches:
                    self._sending = False
                    return
            for batch in batches:
                self.round_trips += 1
                try:
                    outcome: Any = self._client._send(batch.call)
                    failed = False
                except BaseException as error:  # handed to each caller
                    outcome, failed = error, True
                # A closed loop raises: nobody waits there any more.
                with contextlib.suppress(RuntimeError):
                    batch.home.call_soon_threadsafe(batch.finish, outcome, failed)

    # ---- results ---------------------------------------------------------

    async def result(
        self,
        info_or_id: Union[TaskInfo[Any], str],
        *,
        queue: str = "default",
        timeout: Optional[float] = None,
    ) -> Any:
        """``Client.result`` as a coroutine: every coroutine waiting on one
        queue shares one connection and one blocking read."""
        if isinstance(info_or_id, TaskInfo):
            task_id, queue = info_or_id.id, info_or_id.queue
        else:
            task_id = info_or_id
        deadline = check_wait(task_id, queue, timeout)
        reader = self._readers.get(queue)
        if reader is None:
            reader = self._readers[queue] = _QueueReader(self, queue)
        return await reader.wait(task_id, deadline)

    # ---- the rest of Client ----------------------------------------------

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._io, fn, *args)

    async def stats(self, queue: str = "default", *, group: str = "flumeq") -> dict[str, int]:
        """``Client.stats`` as a coroutine."""
        return await self._run(lambda: self._client.stats(queue, group=group))

    async def dead_letters(self, queue: str = "default", limit: int = 100) -> list[dict[str, Any]]:
        """``Client.dead_letters`` as a coroutine."""
        return await self._run(self._client.dead_letters, queue, limit)

    async def requeue_dead(
        self, queue: str = "default", ids: Optional[Iterable[str]] = None
    ) -> int:
        """``Client.requeue_dead`` as a coroutine."""
        return await self._run(self._client.requeue_dead, queue, ids)

    async def purge_dead(self, queue: str = "default") -> int:
        """``Client.purge_dead`` as a coroutine."""
        return await self._run(self._client.purge_dead, queue)

    async def cancel(
        self, task_id: Union[str, TaskInfo[Any]], queue: str = "default", *, group: str = "flumeq"
    ) -> bool:
        """``Client.cancel`` as a coroutine."""
        return await self._run(lambda: self._client.cancel(task_id, queue, group=group))

    async def pause(self, queue: str) -> bool:
        """``Client.pause`` as a coroutine."""
        return await self._run(self._client.pause, queue)

    async def resume(self, queue: str) -> bool:
        """``Client.resume`` as a coroutine."""
        return await self._run(self._client.resume, queue)

    async def paused(self) -> list[str]:
        """``Client.paused`` as a coroutine."""
        return await self._run(self._client.paused)

    async def ping(self) -> None:
        """``Client.ping`` as a coroutine."""
        await self._run(self._client.ping)

    async def flush(self) -> int:
        """``Client.flush`` as a coroutine."""
        return await self._run(self._client.flush)

    @property
    def buffered(self) -> int:
        """Tasks held in memory because Redis was unreachable."""
        return self._client.buffered

    async def close(self) -> None:
        """Writes buffered tasks and closes the connections (as
        ``Client.close``); stops the readers."""
        for reader in list(self._readers.values()):
            reader.stop()
        self._readers.clear()
        await self._run(self._client.close)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self,
        exc_type: Optional[type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> None:
        await self.close()


class _QueueReader:
    """The coroutines of one loop waiting for outcomes of one queue, and the
    one blocking read (on its own thread and connection) that wakes them."""

    def __init__(self, owner: AsyncClient, queue: str) -> None:
        self.owner = owner
        self.queue = queue
        self._records = Records(owner.prefix, queue)
        self._store = _core.Store(owner.url, owner.prefix, owner._timeout)
        self._thread = ThreadPoolExecutor(1, thread_name_prefix=f"flumeq-wait-{queue}")
        self._cursor: Optional[str] = None
        self._starting: Optional[asyncio.Future[None]] = None
        self._waiting: dict[str, list[asyncio.Future[dict[bytes, bytes]]]] = {}
        self._task: Optional[asyncio.Task[None]] = None
        self._stopped = False

    async def _in_thread(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._thread, fn, *args)

    async def _start(self) -> None:
        """The stream's last id, once, before the first look for a record."""
        if self._cursor is not None:
            return
        if self._starting is None:
            self._starting = asyncio.get_running_loop().create_future()
            try:
                self._cursor, _ = await self._in_thread(
                    self._store.read_ended, self.queue, "", 0, 1
                )
            except BaseException as error:
                self._starting.set_exception(error)
                self._starting.exception()  # retrieved: later waiters see it too
                self._starting = None
                raise
            self._starting.set_result(None)
        else:
            await asyncio.shield(self._starting)

    async def _look(self, task_id: str, first: bool) -> dict[bytes, bytes]:
        store = self.owner._client._connection()
        commands = self._records.commands(task_id, first)
        return self._records.found(await self.owner._run(store.pipeline, commands))

    async def wait(self, task_id: str, deadline: Optional[float]) -> Any:
        await self._start()
        loop = asyncio.get_running_loop()
        future: asyncio.Future[dict[bytes, bytes]] = loop.create_future()
        self._waiting.setdefault(task_id, []).append(future)
        try:
            record = await self._look(task_id, first=True)
            if not record and (self._task is None or self._task.done()):
                self._task = loop.create_task(self._read())
            while not record:
                now = time.monotonic()
                if deadline is not None and now >= deadline:
                    raise ResultTimeout(
                        f"task {task_id} did not end within the timeout (queue {self.queue!r})"
                    )
                limit = RECHECK if deadline is None else min(RECHECK, deadline - now)
                try:
                    record = await asyncio.wait_for(asyncio.shield(future), limit)
                    if not record:
                        raise FlumeqError(
                            f"task {task_id} ended, but its result expired before it was "
                            "read: give it a longer result_ttl"
                        )
                except asyncio.TimeoutError:
                    # Redis away: the reader backs off; look again later.
                    with contextlib.suppress(RedisUnavailable):
                        record = await self._look(task_id, first=False)
            return outcome(task_id, record)
        finally:
            futures = self._waiting.get(task_id, [])
            if future in futures:
                futures.remove(future)
            if not futures:
                self._waiting.pop(task_id, None)

    async def _read(self) -> None:
        """Reads while anyone waits; wakes the waiters of the ids it sees."""
        failures = 0
        while self._waiting and not self._stopped:
            try:
                cursor, records = await self._in_thread(
                    self._records.read,
                    self._store,
                    self._cursor or "0-0",
                    BLOCK_MS,
                    set(self._waiting),
                )
            except FlumeqError:
                # Redis away: the waiters' own looks go on; back off here.
                failures += 1
                await asyncio.sleep(min(2.0, 0.05 * 2**failures))
                continue
            failures = 0
            self._cursor = cursor
            for task_id, record in records.items():
                for future in self._waiting.get(task_id, []):
                    if not future.done():
                        future.set_result(record)

    def stop(self) -> None:
        self._stopped = True
        if self._task is not None:
            self._task.cancel()
        self._thread.shutdown(wait=False)
