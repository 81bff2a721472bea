"""OpenTelemetry tracing (the ``otel`` extra: ``pip install 'flumeq[otel]'``).

``flumeq.tracing.instrument()`` adds ``TracingMiddleware`` to every client
and engine of the process:

- an enqueue made inside a recording span puts that span's W3C
  ``traceparent`` (and ``tracestate``) into the task's labels, so they
  travel as plain fields; outside a span nothing is added;
- each run is a CONSUMER span ``process <type>``, child of the producer's
  span, with the messaging attributes ``messaging.system=flumeq``,
  ``messaging.operation.type=process``, ``messaging.operation.name=process``,
  ``messaging.destination.name=<queue>``, ``messaging.message.id=<task id>``
  and ``flumeq.task.type``, ``flumeq.attempt``; a failed run records its
  exception and an error status. A retry is a new span with the same parent.

Call it before ``Engine.run``: actors are forked from the engine's process
and inherit it. Set up the SDK (tracer provider, exporter) there too, or in
each actor: spans are ended, and so handed to the span processor, in the
actor that ran the task.
"""

from __future__ import annotations

import contextvars
from typing import Any, Optional

from . import hooks
from .extras import require
from .task import Task

__all__ = ["TracingMiddleware", "instrument", "uninstrument"]

_TRACE_LABELS = ("traceparent", "tracestate")


class TracingMiddleware:
    """Producer: ``traceparent`` into the labels. Consumer: a span per run."""

    def __init__(self, tracer_provider: Optional[Any] = None) -> None:
        require("otel", "flumeq.tracing")
        # Imported here: the extra is optional.
        import opentelemetry.context as context  # noqa: PLC0415, PLR0402 (mypy on 3.9 needs this form)
        import opentelemetry.propagate as propagate  # noqa: PLC0415, PLR0402 (mypy on 3.9 needs this form)
        import opentelemetry.trace as trace  # noqa: PLC0415, PLR0402 (mypy on 3.9 needs this form)

        self._context = context
        self._propagate = propagate
        self._trace = trace
        self._tracer_provider = tracer_provider
        self._running: contextvars.ContextVar[Optional[tuple[Any, Any]]] = contextvars.ContextVar(
            "flumeq_span", default=None
        )

    def _tracer(self) -> Any:
        # Looked up per run: the provider may be set after instrument(), and
        # in an actor after the fork.
        return self._trace.get_tracer("flumeq", tracer_provider=self._tracer_provider)

    def before_enqueue(self, fields: dict[str, Any]) -> None:
        if not self._trace.get_current_span().is_recording():
            return
        carrier: dict[str, str] = {}
        self._propagate.inject(carrier)
        fields["labels"].update(
            {name: value for name, value in carrier.items() if name in _TRACE_LABELS}
        )

    def before_run(self, task: Task) -> None:
        parent = self._propagate.extract(
            {name: task.labels[name] for name in _TRACE_LABELS if name in task.labels}
        )
        span = self._tracer().start_span(
            f"process {task.type}",
            context=parent,
            kind=self._trace.SpanKind.CONSUMER,
            attributes={
                "messaging.system": "flumeq",
                "messaging.operation.type": "process",
                "messaging.operation.name": "process",
                "messaging.destination.name": task.queue,
                "messaging.message.id": task.id,
                "flumeq.task.type": task.type,
                "flumeq.attempt": task.attempt,
            },
        )
        token = self._context.attach(self._trace.set_span_in_context(span))
        self._running.set((span, token))

    def after_run(self, task: Task, result: Any, error: Optional[BaseException]) -> None:
        running = self._running.get()
        if running is None:
            return
        span, token = running
        self._running.set(None)
        if error is not None:
            span.record_exception(error)
            span.set_status(self._trace.Status(self._trace.StatusCode.ERROR, str(error)))
        span.end()
        self._context.detach(token)


def _installed() -> Optional[TracingMiddleware]:
    for item in hooks.GLOBAL:
        if isinstance(item, TracingMiddleware):
            return item
    return None


def instrument(tracer_provider: Optional[Any] = None) -> TracingMiddleware:
    """Traces every client and engine of this process (idempotent)."""
    installed = _installed()
    if installed is None:
        installed = TracingMiddleware(tracer_provider)
        hooks.GLOBAL.append(installed)
    return installed


def uninstrument() -> None:
    """Undoes ``instrument()``."""
    installed = _installed()
    if installed is not None:
        hooks.GLOBAL.remove(installed)
