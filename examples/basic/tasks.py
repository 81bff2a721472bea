"""Handlers and the engine: serve them with `flumeq worker tasks:engine`."""

import logging

import flumeq

log = logging.getLogger("example")


def send_email(task: flumeq.Task) -> None:
    log.info(
        "sending %r to %s (attempt %d)", task.payload["subject"], task.payload["to"], task.attempt
    )


def resize_image(task: flumeq.Task) -> None:
    width, height = task.payload["size"]
    log.info("resizing %s to %dx%d", task.payload["path"], width, height)


handlers = {"email:send": send_email, "image:resize": resize_image}
engine = flumeq.Engine(handlers, queues={"critical": 3, "default": 1})
