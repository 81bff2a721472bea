"""Handlers that fail in each of the ways flumeq handles, and an engine
configured as you would in production."""

import socket

import flumeq


def charge_card(task: flumeq.Task) -> None:
    """Flaky downstream: fails on the first two runs, then works."""
    if task.attempt < 2:
        raise ConnectionError("payment gateway timed out")


def sync_inventory(task: flumeq.Task) -> None:
    """Asks to run again soon, without waiting out the backoff."""
    if task.attempt == 0:
        raise flumeq.Retry(delay=0.2)


def import_csv(task: flumeq.Task) -> None:
    """Bad input will never get better: straight to the dead letters."""
    if "rows" not in task.payload:
        raise flumeq.Reject("payload has no 'rows'")


def render_report(task: flumeq.Task) -> None:
    """A bug: every run fails, until someone fixes it and requeues."""
    raise ValueError(f"cannot render report {task.payload['id']}")


handlers = {
    "card:charge": charge_card,
    "inventory:sync": sync_inventory,
    "csv:import": import_csv,
    "report:render": render_report,
}

engine = flumeq.Engine(
    handlers,
    # A stable consumer name (a pod or host name) lets a restarted worker
    # take its own unfinished tasks back at once instead of after the
    # claim timeout.
    consumer=f"{socket.gethostname()}-reports",
    # Backoff base·2^attempt, capped: 1 s, 2 s, 4 s ... at most 10 min.
    # (The demo shortens both to run in seconds.)
    retry_base=1.0,
    retry_max=600.0,
    # A dead worker's tasks go to another after 5 minutes idle; a live one
    # keeps its own fresh, so this only needs to exceed a worker's pauses.
    claim_stale_after=300.0,
    # On SIGTERM: finish running tasks for up to 60 s, hand back the rest.
    shutdown_timeout=60.0,
    # A task id that completed is not run again for a day (exactly once in
    # effect for tasks enqueued with your own task_id).
    processed_ttl=86400.0,
    # Keep at most ~100k dead letters per queue.
    dead_max_length=100_000,
)
