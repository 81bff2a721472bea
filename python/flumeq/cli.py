"""The ``flumeq`` command line (also ``python -m flumeq``).

Conventions follow ``celery worker``, ``dramatiq`` and ``rq worker``: a
module path names the app, ``--burst`` drains and exits, SIGTERM stops
gracefully. Every command takes ``--url`` (default ``$FLUMEQ_URL``, else the
local Redis) and ``--prefix``.

Exit codes: 0 done; 1 a failure the message explains (Redis unreachable,
unknown queue, duplicate task, aborted confirmation); 2 bad usage (bad
module path, bad JSON, bad option).
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import logging
import os
import sys
import time
from collections.abc import Mapping
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, Callable, Optional, TypeVar

import click

if TYPE_CHECKING:
    from click._termui_impl import ProgressBar
import orjson

from . import limits, logs
from .admin import Admin
from .app import App
from .client import Client, resolve_url, safe_url
from .engine import Engine, queue_weights
from .errors import ConfigError, DuplicateTask, FlumeqError, InvalidTask, RedisUnavailable
from .extras import require
from .history import History
from .history import dsn as history_dsn
from .history import rows as history_rows
from .redis_server import RedisServer
from .task import Task

__all__ = ["main"]

F = TypeVar("F", bound=Callable[..., Any])


def _noop(task: Task) -> None:
    """The demo's handler: does nothing."""


def redis_options(command: F) -> F:
    """``--url`` and ``--prefix``, shared by every command that talks to Redis."""
    command = click.option(
        "--prefix", default="flumeq", show_default=True, help="Key prefix in Redis."
    )(command)
    return click.option(
        "--url",
        envvar="FLUMEQ_URL",
        default=None,
        help="Redis URL [env FLUMEQ_URL; default redis://127.0.0.1:6379/0].",
    )(command)


def friendly_errors(command: F) -> F:
    """Turns flumeq's errors into one-line messages and exit code 1."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except RedisUnavailable as error:
            url = resolve_url(kwargs.get("url"))
            with contextlib.suppress(ValueError):
                url = safe_url(url)
            raise click.ClickException(f"cannot reach Redis at {url}: {error}") from None
        except FlumeqError as error:
            raise click.ClickException(str(error)) from None

    return wrapper  # type: ignore[return-value]


def _admin(url: Optional[str], prefix: str, group: str = "flumeq") -> Admin:
    admin = Admin(url, prefix=prefix, group=group)
    admin.client.ping()
    return admin


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="flumeq")
def main() -> None:
    """flumeq: a fast, reliable task queue on Redis Streams."""


# -- worker -----------------------------------------------------------------


def parse_queues(spec: Optional[str]) -> Optional[Any]:
    """``a,b`` → ("a", "b"); ``critical=6,default=3`` → {"critical": 6, ...}."""
    if not spec:
        return None
    parts = [part.strip() for part in spec.split(",") if part.strip()]
    if not parts:
        raise click.BadParameter("name at least one queue", param_hint="'--queues'")
    if not any("=" in part for part in parts):
        return tuple(parts)
    weights: dict[str, int] = {}
    for part in parts:
        name, _, weight = part.partition("=")
        try:
            weights[name.strip()] = int(weight) if weight else 1
        except ValueError:
            raise click.BadParameter(
                f"weight of queue {name!r} must be an integer, got {weight!r}",
                param_hint="'--queues'",
            ) from None
    return weights


def load_app(path: str) -> Any:
    """The object at ``module:attr`` (``module`` alone: its ``app``, ``engine``
    or ``handlers``), importing from the current directory like celery does."""
    module_name, _, attr = path.partition(":")
    if not module_name:
        raise click.BadParameter(f"{path!r} is not MODULE:ATTR", param_hint="'APP'")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except Exception as error:
        raise click.BadParameter(
            f"cannot import module {module_name!r}: {type(error).__name__}: {error}",
            param_hint="'APP'",
        ) from None
    names = [attr] if attr else ["app", "engine", "handlers"]
    for name in names:
        target: Any = module
        try:
            for part in name.split("."):
                target = getattr(target, part)
        except AttributeError:
            continue
        return target
    wanted = " or ".join(repr(name) for name in names)
    raise click.BadParameter(f"module {module_name!r} has no {wanted}", param_hint="'APP'")


@main.command()
@click.argument("app")
@click.option(
    "--processes",
    "-p",
    type=click.IntRange(min=1),
    default=None,
    help="Actor processes [default: CPU count].",
)
@click.option(
    "--queues",
    "-q",
    default=None,
    help="Queues to serve: 'a,b' or with weights 'critical=6,default=3'.",
)
@click.option("--burst", is_flag=True, help="Exit once no task is ready, in flight or delayed.")
@click.option(
    "--strict",
    is_flag=True,
    help="Strict priority: a queue's tasks run only while the queues before it (with "
    "weights: the heavier ones) have none ready.",
)
@click.option(
    "--rate-limit",
    "rate_limits",
    multiple=True,
    metavar="TYPE=N/s",
    help="A global rate limit of a task type across every engine: N/s, N/m or N/h (repeatable).",
)
@click.option(
    "--concurrency-limit",
    "concurrency_limits",
    multiple=True,
    metavar="TYPE=N",
    help="At most N tasks of the type running at once across every engine (repeatable).",
)
@click.option("--group", default=None, help="Consumer group [default: the engine's, 'flumeq'].")
@click.option(
    "--consumer",
    envvar="FLUMEQ_CONSUMER",
    default=None,
    help="This worker's consumer name; a stable one (a pod or host name) takes its own "
    "unfinished tasks back at once after a restart [env FLUMEQ_CONSUMER; default "
    "<host>-<pid>, or an Engine app's own].",
)
@click.option(
    "--log-level",
    type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False),
    default="INFO",
    show_default=True,
)
@click.option(
    "--log-format", type=click.Choice(["text", "json"]), default="text", show_default=True
)
@click.option(
    "--metrics-port",
    type=click.IntRange(1, 65535),
    default=None,
    help="Serve Prometheus /metrics on this port.",
)
@click.option(
    "--metrics-host",
    envvar="FLUMEQ_METRICS_HOST",
    default=None,
    help="Address /metrics listens on; it has no authentication, so widen it only on a "
    "trusted network [env FLUMEQ_METRICS_HOST; default 127.0.0.1, or an Engine app's own].",
)
@click.option(
    "--history",
    envvar="FLUMEQ_HISTORY",
    default=None,
    metavar="DSN",
    help="Record every task's lifecycle in this PostgreSQL database (needs "
    "flumeq[postgres]) [env FLUMEQ_HISTORY].",
)
@click.option(
    "--history-retention",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    metavar="DAYS",
    help="Purge history older than this many days.",
)
@redis_options
def worker(
    app: str,
    processes: Optional[int],
    queues: Optional[str],
    burst: bool,
    strict: bool,
    rate_limits: tuple[str, ...],
    concurrency_limits: tuple[str, ...],
    group: Optional[str],
    consumer: Optional[str],
    log_level: str,
    log_format: str,
    metrics_port: Optional[int],
    metrics_host: Optional[str],
    history: Optional[str],
    history_retention: Optional[float],
    url: Optional[str],
    prefix: str,
) -> None:
    """Run the tasks of APP (MODULE:ATTR: a flumeq.App, an Engine, or a
    mapping of task type to handler) until SIGTERM/SIGINT, or with --burst until drained."""
    logs.configure(log_level, log_format)
    target = load_app(app)
    queue_spec = parse_queues(queues)
    try:
        engine = _engine_for(
            target,
            app,
            url,
            prefix,
            queue_spec,
            group,
            metrics_port,
            metrics_host,
            consumer,
            strict,
        )
        _add_limits(engine, rate_limits, concurrency_limits)
        if history:
            engine.history = history_dsn.checked(history)
        if history_retention is not None:
            engine.history_retention = history_retention
    except ConfigError as error:
        raise click.BadParameter(str(error)) from None
    log = logging.getLogger("flumeq.cli")
    try:
        Client(engine.url, prefix=engine.prefix, timeout=2.0, buffer_size=0).ping()
    except RedisUnavailable as error:
        log.warning(
            "cannot reach Redis at %s yet (%s); waiting for it", safe_url(engine.url), error
        )
    try:
        report = engine.run(processes=processes, burst=burst)
    except FlumeqError as error:
        raise click.ClickException(str(error)) from None
    if report:
        log.info("stopped: %s", ", ".join(f"{name}={value}" for name, value in report.items()))


def _pairs(given: tuple[str, ...], option: str) -> dict[str, str]:
    pairs = {}
    for item in given:
        kind, equals, value = item.partition("=")
        if not equals or not kind:
            raise ConfigError(f"{option} expects TYPE=VALUE, got {item!r}")
        pairs[kind] = value
    return pairs


def _add_limits(engine: Engine, rates: tuple[str, ...], concurrency: tuple[str, ...]) -> None:
    """Adds the command line's limits to the engine's (they win for a type
    both name)."""
    if not rates and not concurrency:
        return
    added_rates = limits.checked_rates(_pairs(rates, "--rate-limit"))
    counts = {}
    for kind, value in _pairs(concurrency, "--concurrency-limit").items():
        counts[kind] = int(value) if value.isdigit() else value
    added_counts = limits.checked_concurrency(counts)
    named = {kind for kind, _, _ in added_rates}
    engine.rate_limits = [*(r for r in engine.rate_limits if r[0] not in named), *added_rates]
    named = {kind for kind, _ in added_counts}
    engine.concurrency_limits = [
        *(c for c in engine.concurrency_limits if c[0] not in named),
        *added_counts,
    ]
    limits.warn_unserved(named | {kind for kind, _, _ in added_rates}, engine.handlers)


def _engine_for(
    target: Any,
    app: str,
    url: Optional[str],
    prefix: str,
    queues: Optional[Any],
    group: Optional[str],
    metrics_port: Optional[int],
    metrics_host: Optional[str],
    consumer: Optional[str] = None,
    strict: bool = False,
) -> Engine:
    if isinstance(target, Engine):
        engine = target
        if consumer:
            engine.consumer = consumer
        if url:
            engine.url = url
        if strict:
            engine.strict = True
        if queues is not None:
            engine.queues = queue_weights(queues, engine.strict)
        if group:
            engine.group = group
        if metrics_port:
            engine.metrics_port = metrics_port
        if metrics_host is not None:
            engine.metrics_host = metrics_host
        if prefix != "flumeq":
            engine.prefix = prefix
        return engine
    if isinstance(target, (Mapping, App)):
        engine = Engine(
            target,
            url,
            queues=queues or None,
            group=group or "flumeq",
            prefix=prefix,
            metrics_port=metrics_port,
            metrics_host=metrics_host or "127.0.0.1",
            consumer=consumer,
            strict=strict,
        )
        return engine
    raise click.BadParameter(
        f"{app!r} is a {type(target).__name__}; expected a flumeq.App, an Engine "
        "or a mapping of task type to handler",
        param_hint="'APP'",
    )


# -- history ----------------------------------------------------------------


def _stamp(stamp: Any) -> str:
    return stamp.strftime("%Y-%m-%d %H:%M:%S") if stamp is not None else ""


def _json_default(value: Any) -> Any:
    if hasattr(value, "isoformat"):
        return value.isoformat()
    raise TypeError(type(value).__name__)


@main.command("history")
@click.argument("task_id", required=False)
@click.option("--queue", "-q", default=None, help="Only this queue.")
@click.option("--type", "-t", "type_", default=None, help="Only this task type.")
@click.option(
    "--state",
    "-s",
    type=click.Choice(list(history_rows.EVENTS)),
    default=None,
    help="Only tasks whose latest event is this.",
)
@click.option(
    "--label", "-l", default=None, metavar="KEY=VALUE", help="Only tasks with this label."
)
@click.option(
    "--since", default=None, help="Latest activity since: ISO time, or '15m', '2h', '7d' ago."
)
@click.option("--until", default=None, help="Latest activity before (same forms as --since).")
@click.option("--text", default=None, help="Text in the id, type, error or payload.")
@click.option("--limit", "-n", type=click.IntRange(1, 1000), default=50, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.option(
    "--dsn",
    envvar="FLUMEQ_HISTORY",
    required=True,
    help="The history's PostgreSQL database [env FLUMEQ_HISTORY].",
)
@friendly_errors
def history_command(
    task_id: Optional[str],
    queue: Optional[str],
    type_: Optional[str],
    state: Optional[str],
    label: Optional[str],
    since: Optional[str],
    until: Optional[str],
    text: Optional[str],
    limit: int,
    as_json: bool,
    dsn: str,
) -> None:
    """Search the task history (engines run with --history), or show one
    task's timeline with TASK_ID."""
    with History(dsn) as history:
        if task_id is not None:
            task = history.task(task_id, queue=queue)
            if task is None:
                raise click.ClickException(f"task {task_id!r} is not in the history")
            if as_json:
                click.echo(orjson.dumps(task, default=_json_default, option=orjson.OPT_INDENT_2))
                return
            for name in ("task_id", "queue", "type", "state", "attempts", "worker", "reason"):
                click.echo(f"{name:>11}: {task[name] if task[name] is not None else ''}")
            for name in ("enqueued_at", "started_at", "finished_at"):
                click.echo(f"{name:>11}: {_stamp(task[name])}")
            for name in ("labels", "payload", "result", "error"):
                if task[name] is not None:
                    shown = orjson.dumps(task[name]).decode() if name == "labels" else task[name]
                    click.echo(f"{name:>11}: {shown}")
            if task["cut"]:
                click.echo(f"{'cut':>11}: {', '.join(task['cut'])} (longer than the history keeps)")
            click.echo("")
            click.echo(
                _table(
                    ["at", "event", "attempt", "worker", "ms", "detail"],
                    [
                        [
                            _stamp(event["at"]),
                            event["event"],
                            event["attempt"],
                            event["worker"] or "",
                            "" if event["duration_ms"] is None else event["duration_ms"],
                            " ".join(
                                str(part)
                                for part in (
                                    event["reason"],
                                    (event["error"] or "").splitlines()[0]
                                    if event["error"]
                                    else None,
                                    f"due {_stamp(event['due_at'])}" if event["due_at"] else None,
                                )
                                if part
                            ),
                        ]
                        for event in task["timeline"]
                    ],
                )
            )
            if task["traceback"]:
                click.echo("")
                click.echo(task["traceback"].rstrip())
            return
        rows = history.search(
            queue=queue,
            type=type_,
            state=state,
            label=label,
            since=since,
            until=until,
            text=text,
            limit=limit,
        )
    if as_json:
        click.echo(orjson.dumps(rows, default=_json_default, option=orjson.OPT_INDENT_2))
        return
    if not rows:
        click.echo("no task in the history matches")
        return
    click.echo(
        _table(
            ["task id", "queue", "type", "state", "attempts", "updated", "ms"],
            [
                [
                    row["task_id"],
                    row["queue"],
                    row["type"] or "",
                    row["state"],
                    row["attempts"],
                    _stamp(row["updated_at"]),
                    "" if row["duration_ms"] is None else row["duration_ms"],
                ]
                for row in rows
            ],
        )
    )


# -- enqueue ----------------------------------------------------------------


@main.command()
@click.argument("task_type")
@click.argument("payload", required=False, default=None)
@click.option("--queue", "-q", default="default", show_default=True)
@click.option("--delay", type=float, default=None, help="Run after this many seconds.")
@click.option(
    "--at",
    "at",
    type=click.DateTime(["%Y-%m-%dT%H:%M:%S", "%Y-%m-%d %H:%M:%S", "%Y-%m-%dT%H:%M:%S%z"]),
    default=None,
    help="Run at this time (ISO 8601; local time unless an offset is given).",
)
@click.option(
    "--max-retry",
    type=click.IntRange(min=0),
    default=None,
    help="Retries after a failure [default: 25].",
)
@click.option(
    "--timeout", type=float, default=None, help="Hard limit of one run, seconds [default: 30]."
)
@click.option("--unique-key", default=None, help="Refuse a duplicate while this key is held.")
@click.option("--task-id", default=None, help="Custom (idempotent) task id.")
@redis_options
@friendly_errors
def enqueue(
    task_type: str,
    payload: Optional[str],
    queue: str,
    delay: Optional[float],
    at: Optional[datetime],
    max_retry: Optional[int],
    timeout: Optional[float],
    unique_key: Optional[str],
    task_id: Optional[str],
    url: Optional[str],
    prefix: str,
) -> None:
    """Enqueue a task of TASK_TYPE with a JSON PAYLOAD; print its id."""
    try:
        body = None if payload is None else orjson.loads(payload)
    except orjson.JSONDecodeError as error:
        raise click.BadParameter(f"not valid JSON: {error}", param_hint="'PAYLOAD'") from None
    options: dict[str, Any] = {
        "queue": queue,
        "delay": delay,
        "unique_key": unique_key,
        "task_id": task_id,
    }
    if at is not None:
        options["at"] = at if at.tzinfo else at.astimezone(timezone.utc)
    if max_retry is not None:
        options["max_retry"] = max_retry
    if timeout is not None:
        options["timeout"] = timeout
    with Client(url, prefix=prefix, buffer_size=0) as client:
        try:
            info = client.enqueue(task_type, body, **options)
        except DuplicateTask as error:
            raise click.ClickException(str(error)) from None
        except InvalidTask as error:
            raise click.UsageError(str(error)) from None
    click.echo(info.id)


# -- stats ------------------------------------------------------------------

STAT_COLUMNS = ("ready", "in_flight", "delayed", "dead", "processed", "failed", "cancelled")


def _table(headers: list[str], rows: list[list[Any]]) -> str:
    cells = [headers] + [[str(value) for value in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = []
    for number, row in enumerate(cells):
        lines.append(
            "  ".join(
                value.ljust(widths[i]) if i == 0 else value.rjust(widths[i])
                for i, value in enumerate(row)
            ).rstrip()
        )
        if number == 0:
            lines.append("  ".join("-" * width for width in widths))
    return "\n".join(lines)


def _ago(stamp: float) -> str:
    seconds = max(0.0, time.time() - stamp)
    if seconds < 120:
        return f"{seconds:.0f}s ago"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m ago"
    return f"{seconds / 3600:.1f}h ago"


def render_stats(admin: Admin, queues: Optional[list[str]], interval: float) -> str:
    """The stats tables: queues (with a rate over ``interval`` seconds) and workers."""
    before = {row["name"]: row["processed"] for row in admin.overview(queues)} if interval else {}
    if interval:
        time.sleep(interval)
    rows = admin.overview(queues)
    table_rows = []
    for row in rows:
        rate = ""
        if interval and row["name"] in before:
            rate = f"{(row['processed'] - before[row['name']]) / interval:,.0f}/s"
        name = f"{row['name']} (paused)" if row["paused"] else row["name"]
        table_rows.append([name, *(row[column] for column in STAT_COLUMNS), rate])
    headers = [
        "queue",
        "ready",
        "in flight",
        "delayed",
        "dead",
        "processed",
        "failed",
        "cancelled",
        "rate",
    ]
    out = [_table(headers, table_rows) if rows else "no queues yet"]
    workers = admin.workers()
    out.append("")
    if workers:
        out.append(
            _table(
                [
                    "worker",
                    "host",
                    "pid",
                    "queues",
                    "procs",
                    "processed",
                    "failed",
                    "in flight",
                    "heartbeat",
                ],
                [
                    [
                        worker["consumer"],
                        worker.get("host", ""),
                        worker["pid"],
                        ",".join(worker.get("queues", [])),
                        worker["processes"],
                        worker["processed"],
                        worker["failed"],
                        worker["in_flight"],
                        _ago(worker["heartbeat"]),
                    ]
                    for worker in workers
                ],
            )
        )
    else:
        out.append("no live workers")
    return "\n".join(out)


@main.command()
@click.option("--queue", "-q", "queues", multiple=True, help="Only this queue (repeatable).")
@click.option("--watch", "-w", is_flag=True, help="Refresh until Ctrl-C.")
@click.option(
    "--interval",
    type=click.FloatRange(min=0),
    default=1.0,
    show_default=True,
    help="Seconds between samples (rate).",
)
@click.option("--group", default="flumeq", show_default=True)
@redis_options
@friendly_errors
def stats(
    queues: tuple[str, ...],
    watch: bool,
    interval: float,
    group: str,
    url: Optional[str],
    prefix: str,
) -> None:
    """Per-queue counts (ready, in flight, delayed, dead, processed, failed,
    rate) and the live workers."""
    admin = _admin(url, prefix, group)
    selected = list(queues) or None
    if selected:
        admin.overview(selected)  # an unknown queue fails here, before any wait
    if not watch:
        click.echo(render_stats(admin, selected, interval))
        return
    try:
        while True:
            text = render_stats(admin, selected, max(interval, 0.5))
            click.clear()
            click.echo(f"flumeq stats — {safe_url(admin.url)} — {time.strftime('%H:%M:%S')}\n")
            click.echo(text)
    except KeyboardInterrupt:
        pass


# -- dead letters -------------------------------------------------------------


@main.group()
def dead() -> None:
    """Inspect, requeue or purge dead letters."""


@dead.command("list")
@click.argument("queue")
@click.option("--limit", "-n", type=click.IntRange(min=1), default=20, show_default=True)
@redis_options
@friendly_errors
def dead_list(queue: str, limit: int, url: Optional[str], prefix: str) -> None:
    """The newest dead letters of QUEUE."""
    admin = _admin(url, prefix)
    letters = admin.dead_letters(queue, limit)
    if not letters:
        click.echo(f"no dead letters in {queue!r}")
        return
    rows = [
        [
            letter.get("task_id", ""),
            letter.get("type", ""),
            letter.get("reason", ""),
            letter.get("attempts", ""),
            _ago(letter["failed_at"]) if isinstance(letter.get("failed_at"), float) else "",
            letter.get("error", "").splitlines()[0][:60] if letter.get("error") else "",
        ]
        for letter in letters
    ]
    click.echo(_table(["task id", "type", "reason", "runs", "failed", "error"], rows))


@dead.command("show")
@click.argument("queue")
@click.argument("ids", nargs=-1, required=True)
@redis_options
@friendly_errors
def dead_show(queue: str, ids: tuple[str, ...], url: Optional[str], prefix: str) -> None:
    """Everything about dead letters IDS (task ids) of QUEUE."""
    admin = _admin(url, prefix)
    wanted = set(ids)
    found = admin.dead_letters_by_id(queue, wanted)
    for letter in found:
        for name in (
            "task_id",
            "type",
            "reason",
            "attempts",
            "error",
            "payload",
            "labels",
            "enqueued_at",
            "failed_at",
        ):
            if name in letter:
                click.echo(f"{name:>12}: {letter[name]}")
        if letter.get("traceback"):
            click.echo("   traceback:")
            click.echo(letter["traceback"].rstrip())
        click.echo("")
    missing = wanted - {letter.get("task_id") for letter in found}
    if missing:
        raise click.ClickException(
            f"no dead letter with task id {', '.join(sorted(missing))} in {queue!r}"
        )


@dead.command("requeue")
@click.argument("queue")
@click.argument("ids", nargs=-1)
@click.option("--all", "all_", is_flag=True, help="Requeue every dead letter of QUEUE.")
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
@redis_options
@friendly_errors
def dead_requeue(
    queue: str, ids: tuple[str, ...], all_: bool, yes: bool, url: Optional[str], prefix: str
) -> None:
    """Move dead letters IDS (or --all) of QUEUE back to the queue as fresh tasks."""
    if bool(ids) == all_:
        raise click.UsageError("give task ids or --all (not both)")
    admin = _admin(url, prefix)
    if all_ and not yes:
        count = admin.overview([queue])[0]["dead"]
        click.confirm(f"Requeue all {count} dead letters of {queue!r}?", abort=True)
    moved = admin.requeue_dead(queue, list(ids) if ids else None)
    click.echo(f"requeued {moved} task(s) to {queue!r}")
    if ids and moved < len(set(ids)):
        raise click.ClickException(
            f"{len(set(ids)) - moved} of the given ids were not dead letters of {queue!r}"
        )


@dead.command("purge")
@click.argument("queue")
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
@redis_options
@friendly_errors
def dead_purge(queue: str, yes: bool, url: Optional[str], prefix: str) -> None:
    """Delete every dead letter of QUEUE."""
    admin = _admin(url, prefix)
    if not yes:
        count = admin.overview([queue])[0]["dead"]
        click.confirm(
            f"Delete all {count} dead letters of {queue!r}? This cannot be undone", abort=True
        )
    click.echo(f"purged {admin.purge_dead(queue)} dead letter(s) of {queue!r}")


# -- queue ------------------------------------------------------------------


@main.group()
def queue() -> None:
    """Pause, resume or list queues."""


@queue.command("pause")
@click.argument("names", metavar="QUEUE...", nargs=-1, required=True)
@redis_options
@friendly_errors
def queue_pause(names: tuple[str, ...], url: Optional[str], prefix: str) -> None:
    """Pause QUEUE on every engine: within about a second none starts its
    tasks (running ones finish); enqueues and delayed moves go on."""
    admin = _admin(url, prefix)
    for name in names:
        changed = admin.pause(name)
        known = "" if admin.has_queue(name) else " (no task was ever enqueued to it)"
        click.echo(f"paused {name!r}{known}" if changed else f"{name!r} was paused already")


@queue.command("resume")
@click.argument("names", metavar="QUEUE...", nargs=-1, required=True)
@redis_options
@friendly_errors
def queue_resume(names: tuple[str, ...], url: Optional[str], prefix: str) -> None:
    """Let engines start QUEUE's tasks again."""
    admin = _admin(url, prefix)
    for name in names:
        changed = admin.resume(name)
        click.echo(f"resumed {name!r}" if changed else f"{name!r} was not paused")


@queue.command("list")
@redis_options
@friendly_errors
def queue_list(url: Optional[str], prefix: str) -> None:
    """Known queues with their counts, and whether each is paused."""
    admin = _admin(url, prefix)
    rows = admin.overview()
    paused_only = sorted(set(admin.paused()) - {row["name"] for row in rows})
    table = [
        [row["name"], "paused" if row["paused"] else "running", row["ready"], row["in_flight"]]
        for row in rows
    ] + [[name, "paused", 0, 0] for name in paused_only]
    if not table:
        click.echo("no queues yet")
        return
    click.echo(_table(["queue", "state", "ready", "in flight"], table))


# -- cancel -----------------------------------------------------------------


@main.command()
@click.argument("task_ids", metavar="TASK_ID...", nargs=-1, required=True)
@click.option("--queue", "-q", "queue_name", default="default", show_default=True)
@click.option("--group", default="flumeq", show_default=True, help="Consumer group of the engines.")
@redis_options
@friendly_errors
def cancel(
    task_ids: tuple[str, ...], queue_name: str, group: str, url: Optional[str], prefix: str
) -> None:
    """Cancel tasks of a queue: a delayed or ready one never runs; a running
    one is stopped within about a second on any engine. Exits 1 when some id
    was not found (unknown, or ended already)."""
    admin = _admin(url, prefix, group)
    missing = 0
    for task_id in task_ids:
        if admin.cancel(task_id, queue_name):
            click.echo(f"cancelled {task_id}")
        else:
            missing += 1
            click.echo(
                f"{task_id}: not found in queue {queue_name!r} (unknown, or ended)", err=True
            )
    if missing:
        sys.exit(1)


@main.command("task")
@click.argument("task_id")
@click.option("--group", default="flumeq", show_default=True, help="Consumer group of the engines.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@redis_options
@friendly_errors
def task_command(task_id: str, group: str, as_json: bool, url: Optional[str], prefix: str) -> None:
    """Find a task in Redis: ready, in flight, delayed, dead, or ended and
    kept (enqueued with a retention). Exits 1 when it is nowhere."""
    found = _admin(url, prefix, group).find_task(task_id)
    if as_json:
        click.echo(orjson.dumps(found, option=orjson.OPT_INDENT_2))
    for number, hit in enumerate([] if as_json else found):
        if number:
            click.echo("")
        for name, value in hit.items():
            if value is None or value == "" or name == "task_id":
                continue
            if name.endswith("_at") and isinstance(value, (int, float)):
                shown = _when(value)
            else:
                shown = value if isinstance(value, str) else orjson.dumps(value).decode()
            click.echo(f"{name:>12}: {shown}")
    if not found:
        click.echo(
            f"task {task_id!r} is not in Redis (done tasks leave no trace unless enqueued "
            "with a retention or their own task_id; see also flumeq history)",
            err=True,
        )
        sys.exit(1)


# -- cron -------------------------------------------------------------------


def _when(stamp: Optional[float]) -> str:
    if stamp is None:
        return "never"
    moment = datetime.fromtimestamp(stamp, timezone.utc)
    return moment.strftime("%Y-%m-%d %H:%M:%S") + "Z"


@main.command()
@redis_options
@friendly_errors
def cron(url: Optional[str], prefix: str) -> None:
    """The cron entries engines carry: schedule, next run, last tick
    enqueued and its task id, and the engine holding the entry's lease."""
    admin = _admin(url, prefix)
    rows = admin.cron_entries()
    if not rows:
        click.echo("no cron entries (an engine with cron entries registers them when it starts)")
        return
    table = [
        [
            row["name"],
            f"{row['schedule']} ({row['tz']})" if row.get("tz") else f"every {row['schedule']}s",
            f"{row['type']} -> {row['queue']}",
            _when(row["next"]),
            _when(row["last_tick"]),
            row["task_id"] or "",
            row["holder"] or "no engine",
        ]
        for row in rows
    ]
    headers = ["entry", "schedule", "task", "next", "last tick", "task id", "held by"]
    click.echo(_table(headers, table))


# -- ui ---------------------------------------------------------------------


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=click.IntRange(1, 65535), default=8080, show_default=True)
@click.option(
    "--token",
    envvar="FLUMEQ_UI_TOKEN",
    default=None,
    help="Token required for actions [env FLUMEQ_UI_TOKEN]; required off localhost.",
)
@click.option("--group", default="flumeq", show_default=True)
@click.option(
    "--log-level",
    type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False),
    default="INFO",
    show_default=True,
)
@click.option(
    "--history",
    envvar="FLUMEQ_HISTORY",
    default=None,
    metavar="DSN",
    help="The task history's PostgreSQL database, for the History page [env FLUMEQ_HISTORY].",
)
@redis_options
@friendly_errors
def ui(
    host: str,
    port: int,
    token: Optional[str],
    group: str,
    log_level: str,
    history: Optional[str],
    url: Optional[str],
    prefix: str,
) -> None:
    """Serve the web dashboard (and /metrics)."""
    try:
        require("web", "flumeq ui")
    except ConfigError as error:
        raise click.ClickException(str(error)) from None
    # The web stack loads only for this command.
    from .web.app import is_loopback, serve  # noqa: PLC0415

    if not token and not is_loopback(host):
        raise click.UsageError(
            f"--token is required to serve on {host!r}: off localhost anyone who can reach "
            "the dashboard could read payloads and requeue or purge dead letters"
        )
    logs.configure(log_level)
    admin = _admin(url, prefix, group)
    click.echo(f"flumeq dashboard for {safe_url(admin.url)} on http://{host}:{port}/")
    try:
        serve(
            admin,
            host=host,
            port=port,
            token=token,
            history=History(history) if history else None,
        )
    except ConfigError as error:
        raise click.UsageError(str(error)) from None


# -- demo -------------------------------------------------------------------


@main.command()
@click.option(
    "--tasks", "-n", default=100_000, show_default=True, help="Tasks to enqueue and drain."
)
@click.option(
    "--processes", "-p", type=int, default=None, help="Actor processes [default: CPU count]."
)
@click.option("--url", default=None, help="Use this Redis instead of starting a private one.")
def demo(tasks: int, processes: int | None, url: str | None) -> None:
    """Enqueue and drain no-op tasks on a private redis-server; print the rates."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    processes = processes or os.cpu_count() or 1
    server = None if url else RedisServer().start()
    target = url or (server.url if server else "")
    try:
        if server:
            click.echo(f"started a private redis-server on {server.url}")
        chunk = 5000
        with Client(target) as client:
            started = time.perf_counter()
            progress: ProgressBar[int] = click.progressbar(length=tasks, label="enqueue")
            with progress as bar:
                for offset in range(0, tasks, chunk):
                    size = min(chunk, tasks - offset)
                    client.enqueue_many(
                        [("noop", {"n": offset + i}) for i in range(size)], queue="demo"
                    )
                    bar.update(size)
            enqueue_seconds = time.perf_counter() - started
            click.echo(f"draining with {processes} process(es)...")
            started = time.perf_counter()
            report = Engine({"noop": _noop}, target, queues=("demo",)).run(
                processes=processes, burst=True
            )
            drain_seconds = time.perf_counter() - started
            stats = client.stats("demo")
        click.echo(
            f"enqueued {tasks} tasks in {enqueue_seconds:.2f}s: {tasks / enqueue_seconds:,.0f} tasks/s"
        )
        click.echo(
            f"drained  {report['processed']} tasks in {drain_seconds:.2f}s: "
            f"{report['processed'] / drain_seconds:,.0f} tasks/s"
        )
        click.echo(
            f"left: ready={stats['ready']} in_flight={stats['in_flight']} dead={stats['dead']}"
        )
    finally:
        if server:
            server.stop()
