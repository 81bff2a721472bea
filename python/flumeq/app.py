"""``App`` and ``@app.task``: tasks declared as typed Python functions.

A decorated function keeps its signature: a plain call runs it right here,
``.enqueue(...)`` (or ``await .aenqueue(...)``) checks the arguments against
the signature, sends them as a JSON object by name, and returns a
``TaskInfo`` generic in the function's return type. An engine serving the
app calls the function with the arguments it was enqueued with.
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Awaitable, Coroutine, Iterable, Mapping
from datetime import datetime
from typing import Any, Callable, Generic, Optional, TypeVar, Union, overload

from . import hooks
from .aio import AsyncClient
from .client import DEFAULT_MAX_RETRY, DEFAULT_TIMEOUT, Client, Seconds
from .cron import Cron, checked_entries
from .errors import ConfigError, InvalidTask
from .task import Reject, Task, TaskInfo

if sys.version_info >= (3, 10):
    from typing import ParamSpec
else:  # pragma: no cover - CPython 3.9
    from typing_extensions import ParamSpec

__all__ = ["App", "AsyncTaskFunction", "BoundTask", "SyncTaskFunction", "TaskFunction"]

P = ParamSpec("P")
R = TypeVar("R")
T = TypeVar("T", bound="TaskFunction[Any, Any]")

#: What ``app.task(...)`` and ``options(...)`` accept: ``Client.enqueue``'s
#: options.
OPTIONS = frozenset(
    {
        "queue",
        "max_retry",
        "timeout",
        "delay",
        "at",
        "deadline",
        "unique_key",
        "unique_ttl",
        "task_id",
        "labels",
        "result_ttl",
        "retention",
    }
)
#: The task options a cron entry takes over.
CRON_OPTIONS = frozenset({"queue", "max_retry", "timeout", "labels", "result_ttl", "retention"})
#: Options that make sense per call only, not as a task's default.
PER_CALL = frozenset({"delay", "at", "deadline", "task_id", "unique_key"})

_PLAIN_KINDS = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)


def _checked_options(where: str, options: Mapping[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(options) - OPTIONS)
    if unknown:
        raise InvalidTask(
            f"{where}: unknown option(s) {', '.join(unknown)}; accepted: {', '.join(sorted(OPTIONS))}"
        )
    return dict(options)


class TaskFunction(Generic[P, R]):
    """A function declared with ``@app.task``: enqueue it, or call it."""

    def __init__(
        self, app: App, fn: Callable[..., Any], name: str, options: Mapping[str, Any]
    ) -> None:
        self.app = app
        self.fn = fn
        #: The task type on the wire.
        self.name = name
        #: This task's default options for ``Client.enqueue``.
        self.defaults = _checked_options(f"task {name!r}", options)
        self.queue: str = self.defaults.get("queue", "default")
        self.signature = inspect.signature(fn)
        # Arguments that can all be passed by name are sent and called as
        # they are; others (positional-only, *args, **kwargs) are rebuilt.
        self._plain = all(p.kind in _PLAIN_KINDS for p in self.signature.parameters.values())
        self.__name__ = getattr(fn, "__name__", name)
        self.__qualname__ = getattr(fn, "__qualname__", name)
        self.__module__ = getattr(fn, "__module__", "")
        self.__doc__ = fn.__doc__
        self.__wrapped__ = fn

    def payload(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """The arguments bound by name, as they are sent (``TypeError`` when
        they do not fit the signature)."""
        try:
            bound = self.signature.bind(*args, **kwargs)
        except TypeError as error:
            raise TypeError(f"task {self.name!r}: {error}") from None
        return dict(bound.arguments)

    def enqueue(self, *args: P.args, **kwargs: P.kwargs) -> TaskInfo[R]:
        """Sends the task with these arguments; returns its ``TaskInfo``."""
        return self._send(self.defaults, args, kwargs)

    async def aenqueue(self, *args: P.args, **kwargs: P.kwargs) -> TaskInfo[R]:
        """``enqueue`` through the app's ``AsyncClient``."""
        return await self._asend(self.defaults, args, kwargs)

    def options(
        self,
        *,
        queue: Optional[str] = None,
        max_retry: Optional[int] = None,
        timeout: Optional[Seconds] = None,
        delay: Optional[Seconds] = None,
        at: Optional[datetime] = None,
        deadline: Optional[datetime] = None,
        unique_key: Optional[str] = None,
        unique_ttl: Optional[Seconds] = None,
        task_id: Optional[str] = None,
        labels: Optional[Mapping[str, str]] = None,
        result_ttl: Optional[Seconds] = None,
        retention: Optional[Seconds] = None,
    ) -> BoundTask[P, R]:
        """This task with options for one call: ``add.options(delay=60).enqueue(1, 2)``.
        Options left ``None`` keep the task's defaults."""
        given = {
            "queue": queue,
            "max_retry": max_retry,
            "timeout": timeout,
            "delay": delay,
            "at": at,
            "deadline": deadline,
            "unique_key": unique_key,
            "unique_ttl": unique_ttl,
            "task_id": task_id,
            "labels": labels,
            "result_ttl": result_ttl,
            "retention": retention,
        }
        merged = dict(self.defaults)
        merged.update({name: value for name, value in given.items() if value is not None})
        return BoundTask(self, merged)

    def _send(
        self, options: Mapping[str, Any], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> TaskInfo[R]:
        info: TaskInfo[R] = self.app.client.enqueue(
            self.name, self.payload(*args, **kwargs), **options
        )
        return info

    async def _asend(
        self, options: Mapping[str, Any], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> TaskInfo[R]:
        info: TaskInfo[R] = await self.app.aclient.enqueue(
            self.name, self.payload(*args, **kwargs), **options
        )
        return info

    def handler(self) -> Callable[[Task], Any]:
        """What the engine calls: the function with the task's arguments."""
        fn, name = self.fn, self.name
        if self._plain:

            def run(task: Task) -> Any:
                payload = task.payload
                if payload.__class__ is not dict:
                    _not_arguments(name, payload)
                return fn(**payload)

        else:
            signature = self.signature

            def run(task: Task) -> Any:
                payload = task.payload
                if payload.__class__ is not dict:
                    _not_arguments(name, payload)
                args, kwargs = _rebuild(signature, payload)
                return fn(*args, **kwargs)

        if inspect.iscoroutinefunction(fn):

            async def run_async(task: Task) -> Any:
                return await run(task)

            return run_async
        return run

    def __repr__(self) -> str:
        return f"<task {self.name!r} queue={self.queue!r}>"


class SyncTaskFunction(TaskFunction[P, R]):
    """A plain function declared as a task; calling it runs it here."""

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        result: R = self.fn(*args, **kwargs)
        return result


class AsyncTaskFunction(TaskFunction[P, R]):
    """An ``async def`` declared as a task; calling it gives the coroutine."""

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> Coroutine[Any, Any, R]:
        coroutine: Coroutine[Any, Any, R] = self.fn(*args, **kwargs)
        return coroutine


class BoundTask(Generic[P, R]):
    """A task with options for one call (``task.options(...)``)."""

    def __init__(self, task: TaskFunction[P, R], options: dict[str, Any]) -> None:
        self.task = task
        self.options = _checked_options(f"task {task.name!r}", options)

    def enqueue(self, *args: P.args, **kwargs: P.kwargs) -> TaskInfo[R]:
        """Sends the task with these arguments and the bound options."""
        return self.task._send(self.options, args, kwargs)

    async def aenqueue(self, *args: P.args, **kwargs: P.kwargs) -> TaskInfo[R]:
        """``enqueue`` through the app's ``AsyncClient``."""
        return await self.task._asend(self.options, args, kwargs)


def _not_arguments(name: str, payload: Any) -> None:
    raise Reject(
        f"task {name!r} takes a JSON object of its arguments by name, got a "
        f"{type(payload).__name__}"
    )


def _rebuild(
    signature: inspect.Signature, payload: dict[str, Any]
) -> tuple[list[Any], dict[str, Any]]:
    """Positional and keyword arguments from arguments bound by name."""
    args: list[Any] = []
    kwargs: dict[str, Any] = {}
    for name, parameter in signature.parameters.items():
        if name not in payload:
            continue
        value = payload[name]
        if parameter.kind is inspect.Parameter.POSITIONAL_ONLY:
            args.append(value)
        elif parameter.kind is inspect.Parameter.VAR_POSITIONAL:
            args.extend(value)
        elif parameter.kind is inspect.Parameter.VAR_KEYWORD:
            kwargs.update(value)
        else:
            kwargs[name] = value
    return args, kwargs


class App:
    """A set of tasks, and the clients to enqueue them with.

    ``url`` defaults to ``$FLUMEQ_URL``, then the local Redis. The ``Client``
    and ``AsyncClient`` are made on first use (``app.client``,
    ``app.aclient``). ``result_ttl`` is the default of every task's
    ``result_ttl`` (``None``: outcomes are not kept unless a task or a call
    asks). ``middleware`` (see ``flumeq.hooks``) goes to both clients and to
    every engine serving the app.
    """

    def __init__(
        self,
        url: Optional[str] = None,
        *,
        prefix: str = "flumeq",
        result_ttl: Optional[Seconds] = None,
        middleware: Iterable[Any] = (),
    ) -> None:
        self.url = url
        self.middleware = hooks.checked(middleware)
        self.prefix = prefix
        self.result_ttl = result_ttl
        #: The tasks by type name.
        self.tasks: dict[str, TaskFunction[Any, Any]] = {}
        #: The ``@app.cron`` entries, carried by every engine serving the app.
        self.cron_entries: list[Cron] = []
        self._client: Optional[Client] = None
        self._aclient: Optional[AsyncClient] = None

    @property
    def client(self) -> Client:
        """The app's ``Client`` (made on first use)."""
        if self._client is None:
            self._client = Client(self.url, prefix=self.prefix, middleware=self.middleware)
        return self._client

    @property
    def aclient(self) -> AsyncClient:
        """The app's ``AsyncClient`` (made on first use)."""
        if self._aclient is None:
            self._aclient = AsyncClient(self.url, prefix=self.prefix, middleware=self.middleware)
        return self._aclient

    @overload
    def task(  # type: ignore[overload-overlap]
        self, fn: Callable[P, Awaitable[R]], /
    ) -> AsyncTaskFunction[P, R]: ...

    @overload
    def task(self, fn: Callable[P, R], /) -> SyncTaskFunction[P, R]: ...

    @overload
    def task(
        self,
        *,
        name: Optional[str] = None,
        queue: str = "default",
        max_retry: int = DEFAULT_MAX_RETRY,
        timeout: Optional[Seconds] = DEFAULT_TIMEOUT,
        unique_ttl: Seconds = 3600.0,
        labels: Optional[Mapping[str, str]] = None,
        result_ttl: Optional[Seconds] = None,
        retention: Optional[Seconds] = None,
    ) -> _Decorator: ...

    def task(  # type: ignore[misc]
        self, fn: Optional[Callable[..., Any]] = None, /, **options: Any
    ) -> Any:
        """Declares a task: ``@app.task``, or ``@app.task(name=..., queue=...,
        max_retry=..., timeout=..., result_ttl=...)``. The type name is
        ``<module>.<qualname>`` unless ``name`` is given."""
        if fn is not None:
            return self._declare(fn, {})
        per_call = sorted(PER_CALL & set(options))
        if per_call:
            raise InvalidTask(
                f"app.task: {', '.join(per_call)} apply to one call: use "
                "task.options(...).enqueue(...)"
            )

        def decorate(fn: Callable[..., Any]) -> Any:
            return self._declare(fn, options)

        return _Decorator(decorate)

    def _declare(self, fn: Callable[..., Any], options: dict[str, Any]) -> TaskFunction[Any, Any]:
        if not callable(fn):
            raise ConfigError(f"app.task decorates a function, got {fn!r}")
        options = dict(options)
        name = options.pop("name", None) or f"{fn.__module__}.{fn.__qualname__}"
        if not isinstance(name, str):
            raise ConfigError(f"task name must be a string, got {name!r}")
        if "result_ttl" not in options and self.result_ttl is not None:
            options["result_ttl"] = self.result_ttl
        kind = AsyncTaskFunction if inspect.iscoroutinefunction(fn) else SyncTaskFunction
        declared: TaskFunction[Any, Any] = kind(self, fn, name, options)
        if name in self.tasks and self.tasks[name].fn is not fn:
            raise ConfigError(f"two tasks are named {name!r}; give one a name=")
        self.tasks[name] = declared
        return declared

    def cron(
        self,
        schedule: Union[str, float],
        *,
        name: Optional[str] = None,
        tz: Optional[str] = None,
        **options: Any,
    ) -> _CronDecorator:
        """Enqueues a task on a schedule (see ``flumeq.Cron``):
        ``@app.cron("0 3 * * *", tz="UTC")`` above ``@app.task``, or on a
        plain function, which it declares as a task (and returns). The task
        must take no required arguments (a tick sends none). ``name``
        defaults to the task's; ``options`` (``queue``, ``max_retry``,
        ``timeout``, ``labels``, ``result_ttl``) default to the task's."""

        def decorate(target: Any) -> TaskFunction[Any, Any]:
            task = target if isinstance(target, TaskFunction) else self._declare(target, {})
            required = [
                parameter.name
                for parameter in task.signature.parameters.values()
                if parameter.default is inspect.Parameter.empty
                and parameter.kind
                not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
            ]
            if required:
                raise ConfigError(
                    f"app.cron: task {task.name!r} needs argument(s) {', '.join(required)}; "
                    "a cron tick sends none"
                )
            kept = {key: value for key, value in task.defaults.items() if key in CRON_OPTIONS}
            kept.update(options)
            entry = Cron(schedule, task.name, {}, name=name or task.name, tz=tz, **kept)
            self.cron_entries = checked_entries([*self.cron_entries, entry])
            return task

        return _CronDecorator(decorate)

    def handlers(self) -> dict[str, Callable[[Task], Any]]:
        """The mapping of task type to handler an engine serves."""
        return {name: task.handler() for name, task in self.tasks.items()}

    def queues(self) -> tuple[str, ...]:
        """The queues the app's tasks go to (``default`` when it has none)."""
        return tuple(sorted({task.queue for task in self.tasks.values()})) or ("default",)

    def __repr__(self) -> str:
        return f"<App tasks={len(self.tasks)}>"


class _Decorator:
    """What ``app.task(...)`` returns: applied to a function, its task."""

    def __init__(self, decorate: Callable[[Callable[..., Any]], Any]) -> None:
        self._decorate = decorate

    @overload
    def __call__(  # type: ignore[overload-overlap]
        self, fn: Callable[P, Awaitable[R]], /
    ) -> AsyncTaskFunction[P, R]: ...

    @overload
    def __call__(self, fn: Callable[P, R], /) -> SyncTaskFunction[P, R]: ...

    def __call__(self, fn: Callable[..., Any], /) -> Any:
        return self._decorate(fn)


class _CronDecorator:
    """What ``app.cron(...)`` returns: applied to a task (or a function,
    declared as one), that task."""

    def __init__(self, decorate: Callable[[Any], TaskFunction[Any, Any]]) -> None:
        self._decorate = decorate

    @overload
    def __call__(self, fn: T, /) -> T: ...

    @overload
    def __call__(  # type: ignore[overload-overlap]
        self, fn: Callable[P, Awaitable[R]], /
    ) -> AsyncTaskFunction[P, R]: ...

    @overload
    def __call__(self, fn: Callable[P, R], /) -> SyncTaskFunction[P, R]: ...

    def __call__(self, fn: Any, /) -> Any:
        return self._decorate(fn)


Target = Union[App, Mapping[str, Callable[[Task], Any]]]
