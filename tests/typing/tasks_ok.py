"""Must pass ``mypy --strict``: the types users of @app.task rely on."""

from __future__ import annotations

from typing import Any

from typing_extensions import assert_type

import flumeq
from flumeq.app import AsyncTaskFunction

app = flumeq.App()


@app.task
def add(a: int, b: int = 0) -> int:
    return a + b


@app.task(name="email:send", queue="emails", result_ttl=60)
async def send_email(to: str, subject: str = "") -> dict[str, str]:
    return {"to": to, "subject": subject}


@app.cron("0 3 * * *", tz="UTC")
@app.task(queue="upkeep")
def tidy(days: int = 7) -> int:
    return days


@app.cron(60.0, name="warm")
async def warm() -> None:
    pass


def produce() -> None:
    assert_type(tidy.enqueue(days=1).result(), int)
    assert_type(warm, AsyncTaskFunction[[], None])
    assert_type(add(1, 2), int)
    info = add.enqueue(1, b=2)
    assert_type(info, flumeq.TaskInfo[int])
    assert_type(info.result(timeout=5), int)
    later = add.options(delay=60, task_id="add-1", queue="q").enqueue(1)
    assert_type(later.result(), int)
    mail = send_email.enqueue("a@example.com", subject="hi")
    assert_type(mail.result(), dict[str, str])
    client = flumeq.Client()
    assert_type(client.result(info), Any)


async def produce_async() -> None:
    info = await add.aenqueue(1, 2)
    assert_type(info, flumeq.TaskInfo[int])
    mail = await send_email.options(delay=5).aenqueue("b@example.com")
    assert_type(mail, flumeq.TaskInfo[dict[str, str]])
    assert_type(await send_email("c@example.com"), dict[str, str])
    async with flumeq.AsyncClient() as client:
        assert_type(await client.enqueue("t", {}), flumeq.TaskInfo[Any])
    task = flumeq.current_task()
    assert_type(task, "flumeq.Task | None")


flumeq.Engine(app, queues=("default", "emails"))
