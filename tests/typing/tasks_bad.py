"""Must fail ``mypy --strict`` on each line marked ``# E``, and nowhere else."""

from __future__ import annotations

import flumeq

app = flumeq.App()


@app.task
def add(a: int, b: int = 0) -> int:
    return a + b


@app.task(queue="emails")
async def send_email(to: str) -> None: ...


def takes_str(text: str) -> None: ...


def takes_int(number: int) -> None: ...


def misuse() -> None:
    add.enqueue("x")  # E
    add.enqueue(1, c=2)  # E
    add.enqueue()  # E
    add.options(delay=5).enqueue("x")  # E
    add.options(dely=5)  # E
    takes_str(add.enqueue(1).result())  # E
    send_email.enqueue(1)  # E


async def misuse_async() -> None:
    await add.aenqueue(1, 2, 3)  # E
    takes_int(await send_email("a"))  # E
