"""Middleware hooks and OpenTelemetry tracing with a real engine: run hooks
run in the actors, a raising hook loses nothing, spans link to producers."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

import pytest
import redis

import flumeq
from conftest import process_redis

pytest.importorskip("opentelemetry.sdk", reason="the tracing test needs opentelemetry-sdk")

from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import (
    InMemorySpanExporter,
)
from opentelemetry.trace import SpanKind, StatusCode

import flumeq.tracing


class Recorder:
    """Writes each hook call to Redis, from whichever process makes it."""

    def __init__(self, url: str) -> None:
        self.url = url

    def _log(self, *parts: Any) -> None:
        process_redis(self.url).rpush("hooks", json.dumps([os.getpid(), *parts]))

    def before_enqueue(self, fields: dict[str, Any]) -> None:
        fields["labels"]["hooked"] = "yes"
        self._log("before_enqueue", fields["type"], fields.get("count"))

    def before_run(self, task: flumeq.Task) -> None:
        self._log("before_run", task.type, task.attempt)

    def after_run(self, task: flumeq.Task, result: Any, error: Optional[BaseException]) -> None:
        self._log("after_run", task.type, result, type(error).__name__ if error else None)

    def on_retry(self, task: flumeq.Task, error: BaseException, delay: Optional[float]) -> None:
        self._log("on_retry", task.type, delay)

    def on_dead(self, task: flumeq.Task, reason: str, error: BaseException) -> None:
        self._log("on_dead", task.type, reason)


class Broken:
    """Every hook raises."""

    def before_enqueue(self, fields: dict[str, Any]) -> None:
        raise RuntimeError("hook bug")

    def before_run(self, task: flumeq.Task) -> None:
        raise RuntimeError("hook bug")

    def after_run(self, task: flumeq.Task, result: Any, error: Optional[BaseException]) -> None:
        raise RuntimeError("hook bug")

    def on_dead(self, task: flumeq.Task, reason: str, error: BaseException) -> None:
        raise RuntimeError("hook bug")


def calls(r: redis.Redis) -> list[list[Any]]:
    return [json.loads(item) for item in r.lrange("hooks", 0, -1)]


def test_hooks_run_where_they_should_and_a_raising_hook_loses_nothing(
    redis_url: str, r: redis.Redis
) -> None:
    recorder = Recorder(redis_url)
    client = flumeq.Client(redis_url, middleware=[Broken(), recorder])
    ok = client.enqueue("ok", {"n": 1}, result_ttl=60)
    client.enqueue("flaky", {}, max_retry=1)
    client.enqueue_many([("nope", {})] * 3, max_retry=0)
    assert r.xlen("flumeq:{default}:stream") == 5
    assert json.loads(r.xrange("flumeq:{default}:stream")[0][1][b"labels"]) == {"hooked": "yes"}

    def flaky(task: flumeq.Task) -> None:
        raise flumeq.Retry(delay=0.01) if task.attempt == 0 else ValueError("still no")

    def nope(task: flumeq.Task) -> None:
        raise flumeq.Reject("never")

    handlers = {"ok": lambda task: task.payload["n"] + 1, "flaky": flaky, "nope": nope}
    engine = flumeq.Engine(handlers, redis_url, middleware=[Broken(), recorder])
    report = engine.run(processes=1, burst=True)
    assert (report["processed"], report["dead"]) == (1, 4)
    assert ok.result(timeout=5) == 2
    seen = calls(r)
    here = os.getpid()
    assert [call[1:] for call in seen if call[0] == here] == [
        ["before_enqueue", "ok", None],
        ["before_enqueue", "flaky", None],
        ["before_enqueue", "nope", 3],
    ]
    in_actor = sorted(tuple(call[1:]) for call in seen if call[0] != here)
    assert in_actor == sorted(
        [
            ("before_run", "ok", 0),
            ("after_run", "ok", 2, None),
            ("before_run", "flaky", 0),
            ("after_run", "flaky", None, "Retry"),
            ("on_retry", "flaky", 0.01),
            ("before_run", "flaky", 1),
            ("after_run", "flaky", None, "ValueError"),
            ("on_dead", "flaky", "error"),
            *[("before_run", "nope", 0), ("after_run", "nope", None, "Reject")] * 3,
            *[("on_dead", "nope", "rejected")] * 3,
        ]
    )


def test_without_middleware_handlers_are_not_wrapped(redis_url: str) -> None:
    def handler(task: flumeq.Task) -> None:
        return None

    assert flumeq.Engine({"t": handler}, redis_url).run_handlers()["t"] is handler
    with pytest.raises(TypeError, match="has none of the hooks"):
        flumeq.Client(redis_url, middleware=[object()])


class FileExporter(InMemorySpanExporter):
    """Keeps spans in memory and appends them to a file: actors are other
    processes, so the test reads what theirs exported from there."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.path = path

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        with self.path.open("a") as out:
            for span in spans:
                parent = span.parent.span_id if span.parent else None
                out.write(
                    json.dumps(
                        {
                            "name": span.name,
                            "kind": span.kind.name,
                            "trace": span.context.trace_id,
                            "span": span.context.span_id,
                            "parent": parent,
                            "attributes": dict(span.attributes or {}),
                            "status": span.status.status_code.name,
                        }
                    )
                    + "\n"
                )
        return super().export(spans)


def test_each_run_is_a_consumer_span_child_of_the_producer(redis_url: str, tmp_path: Path) -> None:
    path = tmp_path / "spans.jsonl"
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(FileExporter(path)))
    flumeq.tracing.instrument(tracer_provider=provider)
    try:
        client = flumeq.Client(redis_url)
        untraced = client.enqueue("work", {"fail": False})
        with provider.get_tracer("test").start_as_current_span("request") as request:
            traced = client.enqueue("work", {"fail": False})
            failing = client.enqueue("work", {"fail": True}, max_retry=0)

        def work(task: flumeq.Task) -> None:
            if task.payload["fail"]:
                raise ValueError("boom")

        flumeq.Engine({"work": work}, redis_url).run(processes=1, burst=True)
    finally:
        flumeq.tracing.uninstrument()
    spans = {
        span["attributes"]["messaging.message.id"]: span
        for span in map(json.loads, path.read_text().splitlines())
        if span["kind"] == SpanKind.CONSUMER.name
    }
    assert set(spans) == {untraced.id, traced.id, failing.id}
    run = spans[traced.id]
    context = request.get_span_context()
    assert run["name"] == "process work"
    assert (run["trace"], run["parent"]) == (context.trace_id, context.span_id)
    assert run["attributes"] == {
        "messaging.system": "flumeq",
        "messaging.operation.type": "process",
        "messaging.operation.name": "process",
        "messaging.destination.name": "default",
        "messaging.message.id": traced.id,
        "flumeq.task.type": "work",
        "flumeq.attempt": 0,
    }
    assert run["status"] == StatusCode.UNSET.name
    assert spans[failing.id]["status"] == StatusCode.ERROR.name
    assert spans[failing.id]["parent"] == context.span_id
    assert spans[untraced.id]["parent"] is None
    assert spans[untraced.id]["trace"] != context.trace_id
