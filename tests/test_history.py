"""Task history in a real PostgreSQL (initdb'd per module): recording,
searching, the bound while PostgreSQL is away, bad DSNs, cut fields,
retention, and the history process's death."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import psycopg
import pytest
import redis
from click.testing import CliRunner
from postgres import PostgresServer, bin_dir

import flumeq
from conftest import assert_stopped_in_bound, sigterm_group, spawn_script, tree, wait_until
from flumeq.cli import main
from flumeq.history.sink import Sink
from flumeq.redis_server import RedisServer

pytestmark = pytest.mark.skipif(bin_dir() is None, reason="PostgreSQL is not installed")


@pytest.fixture(scope="module")
def postgres() -> Iterator[PostgresServer]:
    with PostgresServer() as server:
        yield server


@pytest.fixture
def dsn(postgres: PostgresServer) -> str:
    """The DSN, with the history tables emptied (the schema stays)."""
    if postgres.process is None:
        postgres.start()
    with psycopg.connect(postgres.dsn, autocommit=True) as connection:
        exists = connection.execute("SELECT to_regclass('flumeq_task')").fetchone()
        if exists and exists[0]:
            connection.execute("TRUNCATE flumeq_task, flumeq_task_event")
    return postgres.dsn


def rows(dsn: str, sql: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(dsn) as connection:
        return connection.execute(sql).fetchall()


def recorded(dsn: str) -> int:
    """Tasks in the history (0 before the history process made the tables)."""
    try:
        return int(rows(dsn, "SELECT count(*) FROM flumeq_task")[0][0])
    except psycopg.errors.UndefinedTable:
        return 0


def ok(task: flumeq.Task) -> Any:
    return {"echo": task.payload}


def failing(task: flumeq.Task) -> None:
    raise ValueError(f"no luck with {task.payload}")


def rejecting(task: flumeq.Task) -> None:
    raise flumeq.Reject("not for us")


def odd_result(task: flumeq.Task) -> Any:
    return object()  # not JSON: recorded as a note, the task still succeeds


HANDLERS = {"ok": ok, "fail": failing, "reject": rejecting, "odd": odd_result}


def engine(url: str, dsn: str, **options: Any) -> flumeq.Engine:
    options.setdefault("retry_base", 0.01)
    options.setdefault("retry_max", 0.02)
    return flumeq.Engine(HANDLERS, url, history=dsn, **options)


def test_every_step_of_each_task_is_recorded_and_searchable(redis_url: str, dsn: str) -> None:
    client = flumeq.Client(redis_url)
    infos = client.enqueue_many([("ok", {"n": n}) for n in range(300)])
    client.enqueue("ok", {"order": 17}, task_id="order-17", labels={"order": "17"})
    client.enqueue("fail", "x", task_id="fails", max_retry=1)
    client.enqueue("reject", None, task_id="rejected", queue="other")
    client.enqueue("odd", None, task_id="odd")
    report = engine(redis_url, dsn, queues=("default", "other")).run(processes=2, burst=True)
    assert report["processed"] == 302 and report["dead"] == 2

    history = flumeq.History(dsn)
    # Every task, once each, with its final state.
    states = dict(rows(dsn, "SELECT state, count(*) FROM flumeq_task GROUP BY state"))
    assert states == {"succeeded": 302, "dead": 2}
    first = history.task(infos[0].id)
    assert first is not None
    assert first["state"] == "succeeded" and first["attempts"] == 1
    assert first["payload"] == '{"n":0}' and first["result"] == '{"echo":{"n":0}}'
    assert first["type"] == "ok" and first["worker"] and first["enqueued_at"] is not None
    assert [event["event"] for event in first["timeline"]] == ["started", "succeeded"]

    failed = history.task("fails")
    assert failed is not None
    assert failed["state"] == "dead" and failed["attempts"] == 2 and failed["reason"] == "error"
    assert "no luck with x" in failed["error"] and "ValueError" in failed["traceback"]
    assert [(e["event"], e["attempt"]) for e in failed["timeline"]] == [
        ("started", 0),
        ("failed", 0),
        ("retried", 0),
        ("started", 1),
        ("failed", 1),
        ("dead", 1),
    ]
    assert failed["timeline"][2]["due_at"] is not None

    rejected = history.task("rejected", queue="other")
    assert rejected is not None and rejected["reason"] == "rejected"
    odd = history.task("odd")
    assert odd is not None and odd["state"] == "succeeded" and "not recorded" in odd["result"]

    # Each filter of search.
    assert [row["task_id"] for row in history.search(label="order=17")] == ["order-17"]
    assert [row["task_id"] for row in history.search(label={"order": "17"})] == ["order-17"]
    assert {row["task_id"] for row in history.search(state="dead")} == {"fails", "rejected"}
    assert [row["task_id"] for row in history.search(queue="other")] == ["rejected"]
    assert [row["task_id"] for row in history.search(type="fail")] == ["fails"]
    assert [row["task_id"] for row in history.search(text="no luck")] == ["fails"]
    assert [row["task_id"] for row in history.search(text='"order":17')] == ["order-17"]
    assert len(history.search(since="1h", limit=1000)) == 304
    assert history.search(until="1h") == []
    # Keyset paging walks every task once.
    seen: list[str] = []
    page = history.search(limit=100)
    while page:
        seen += [row["task_id"] for row in page]
        last = page[-1]
        page = history.search(limit=100, before=(last["updated_at"], last["task_id"]))
    assert len(seen) == len(set(seen)) == 304
    with pytest.raises(flumeq.ConfigError, match="state must be one of"):
        history.search(state="lost")
    with pytest.raises(flumeq.ConfigError, match="since must be"):
        history.search(since="yesterday-ish")
    history.close()


def test_entries_read_again_after_a_crash_before_the_ack_are_not_written_twice(
    redis_url: str, dsn: str
) -> None:
    flumeq.Client(redis_url, history=True).enqueue_many([("ok", {"n": n}) for n in range(40)])
    sink = Sink(redis_url, dsn, ["default"], consumer="crashy")
    acked = sink._ack
    sink._ack = lambda entries: (_ for _ in ()).throw(flumeq.RedisUnavailable("gone"))  # type: ignore[method-assign]
    with pytest.raises(flumeq.RedisUnavailable):
        sink.step()  # written and committed, the ack lost
    assert rows(dsn, "SELECT count(*) FROM flumeq_task_event") == [(40,)]
    sink._ack = acked  # type: ignore[method-assign]
    sink.own_pending = True  # as after the failure (or in the process that claims them)
    while sink.step():
        pass
    assert rows(dsn, "SELECT count(*) FROM flumeq_task_event") == [(40,)]
    r = redis.Redis.from_url(redis_url)
    assert r.xlen("flumeq:{default}:events") == 0
    assert r.hget("flumeq:{default}:stats", "history_buffered") == b"0"


def test_a_reader_on_a_fresh_database_makes_the_schema(postgres: PostgresServer) -> None:
    with psycopg.connect(postgres.dsn, autocommit=True) as connection:
        connection.execute("DROP DATABASE IF EXISTS fresh")
        connection.execute("CREATE DATABASE fresh")
    fresh = postgres.dsn.rsplit("/", 1)[0] + "/fresh"
    with flumeq.History(fresh) as history:
        assert history.search() == []
        assert history.task("nothing") is None
    versions = rows(fresh, "SELECT version FROM flumeq_schema_version ORDER BY version")
    assert versions == [(1,), (2,)]
    indexes = {row[0] for row in rows(fresh, "SELECT indexname FROM pg_indexes")}
    assert {"flumeq_task_labels", "flumeq_task_text", "flumeq_task_queue"} <= indexes


def test_a_recording_client_records_tasks_that_never_ran(redis_url: str, dsn: str) -> None:
    client = flumeq.Client(redis_url, history=dsn)
    client.enqueue("ok", {"later": True}, task_id="later", delay=3600, labels={"k": "v"})
    client.enqueue_many([("ok", {"n": n}) for n in range(5)], queue="waiting")
    client.enqueue("ok", None, task_id="called-off", delay=3600)
    assert flumeq.Client(redis_url).cancel("called-off")  # a client not recording
    sink = Sink(redis_url, dsn, ["default", "waiting"], consumer="test")
    while sink.step():
        pass
    task = flumeq.History(dsn).task("later")
    assert task is not None
    assert task["state"] == "enqueued" and task["payload"] == '{"later":true}'
    assert task["labels"] == {"k": "v"} and task["attempts"] == 0
    assert task["timeline"][0]["due_at"] is not None
    assert len(flumeq.History(dsn).search(queue="waiting")) == 5
    called_off = flumeq.History(dsn).task("called-off")
    assert called_off is not None and called_off["state"] == "cancelled"
    assert [e["event"] for e in called_off["timeline"]] == ["enqueued", "cancelled"]
    stats = redis.Redis.from_url(redis_url).hgetall("flumeq:{default}:stats")
    assert stats[b"history_buffered"] == b"0"
    assert redis.Redis.from_url(redis_url).xlen("flumeq:{default}:events") == 0


def test_postgres_down_never_stops_the_queue_and_the_history_catches_up(
    redis_url: str, dsn: str, postgres: PostgresServer
) -> None:
    client = flumeq.Client(redis_url)
    client.enqueue_many([("ok", {"n": n}) for n in range(2000)])
    postgres.stop()
    started = time.monotonic()
    report = engine(redis_url, dsn, consumer="pod-1").run(processes=2, burst=True)
    assert report["processed"] == 2000
    assert time.monotonic() - started < 30
    r = redis.Redis.from_url(redis_url)
    assert int(r.hget("flumeq:{default}:stats", "history_buffered") or 0) == 4000
    assert int(r.hget("flumeq:{default}:stats", "history_errors") or 0) >= 1
    postgres.start()
    begun = time.monotonic()
    # The same engine back (its pending entries, should it have read any,
    # are its own to re-read; another engine would claim them later).
    sink = Sink(redis_url, dsn, ["default"], consumer="pod-1")
    while sink.step():
        pass
    print(f"caught up 4000 events in {time.monotonic() - begun:.2f}s")
    assert rows(dsn, "SELECT count(*) FROM flumeq_task WHERE state = 'succeeded'") == [(2000,)]
    assert rows(dsn, "SELECT count(*) FROM flumeq_task_event") == [(4000,)]
    assert int(r.hget("flumeq:{default}:stats", "history_buffered") or 0) == 0


def test_past_the_buffer_the_oldest_events_are_dropped_and_counted(
    redis_url: str, dsn: str, postgres: PostgresServer
) -> None:
    client = flumeq.Client(redis_url)
    client.enqueue_many([("ok", {"n": n}) for n in range(3000)])
    postgres.stop()
    report = engine(redis_url, dsn, history_buffer=1000).run(processes=1, burst=True)
    assert report["processed"] == 3000
    r = redis.Redis.from_url(redis_url)
    stats = {
        k.decode(): int(v) for k, v in r.hgetall("flumeq:{default}:stats").items() if b"|" not in k
    }
    assert stats["history_buffered"] <= 1000
    assert stats["history_dropped"] > 0
    # What is buffered is what the stream holds.
    held = sum(int(fields[b"n"]) for _, fields in r.xrange("flumeq:{default}:events"))
    assert held == stats["history_buffered"]
    assert stats["history_buffered"] + stats["history_dropped"] == 6000
    postgres.start()
    sink = Sink(redis_url, dsn, ["default"], consumer="after")
    while sink.step():
        pass
    written = rows(dsn, "SELECT count(*) FROM flumeq_task_event")[0][0]
    assert written == stats["history_buffered"]


def test_bad_dsns_are_clear_with_the_password_masked_and_tasks_still_run(
    redis_url: str, postgres: PostgresServer, caplog: pytest.LogCaptureFixture
) -> None:
    with pytest.raises(flumeq.ConfigError, match="not a valid PostgreSQL connection string"):
        flumeq.Engine(HANDLERS, redis_url, history="host=a port=b=c password=hunter2 '")
    try:
        flumeq.Engine(HANDLERS, redis_url, history="host=x password=hunter2 =bad")
    except flumeq.ConfigError as error:
        assert "hunter2" not in str(error)
    wrong = postgres.dsn.replace(":secret@", ":wrong-password@")
    flumeq.Client(redis_url).enqueue_many([("ok", {"n": n}) for n in range(50)])
    caplog.set_level(logging.INFO, logger="flumeq")
    sink = Sink(redis_url, wrong, ["default"], consumer="bad")
    assert sink._round() > 0
    messages = [
        record.getMessage() for record in caplog.records if "history" in record.getMessage()
    ]
    assert any(
        "flumeq:***@127.0.0.1" in m and "password authentication failed" in m for m in messages
    ), messages
    assert not any("wrong-password" in m for m in messages)
    r = redis.Redis.from_url(redis_url)
    assert int(r.hget("flumeq:{default}:stats", "history_errors") or 0) == 1
    report = engine(redis_url, wrong).run(processes=1, burst=True)
    assert report["processed"] == 50


def test_fields_too_large_for_a_row_are_cut_and_the_row_says_so(redis_url: str, dsn: str) -> None:
    big = "é" * 40_000
    flumeq.Client(redis_url).enqueue("ok", {"big": big}, task_id="big")
    engine(redis_url, dsn).run(processes=1, burst=True)
    task = flumeq.History(dsn).task("big")
    assert task is not None and task["state"] == "succeeded"
    assert len(task["payload"].encode()) <= flumeq._core.MAX_HISTORY_FIELD_BYTES
    assert len(task["result"].encode()) <= flumeq._core.MAX_HISTORY_FIELD_BYTES
    assert task["cut"] == ["p", "v"]


def test_retention_purges_old_rows_in_batches(redis_url: str, dsn: str) -> None:
    flumeq.Client(redis_url).enqueue_many([("ok", {"n": n}) for n in range(20)])
    engine(redis_url, dsn).run(processes=1, burst=True)
    with psycopg.connect(dsn) as connection:
        connection.execute(
            "UPDATE flumeq_task SET updated_at = now() - interval '10 days' "
            "WHERE task_id IN (SELECT task_id FROM flumeq_task LIMIT 12)"
        )
        connection.execute(
            "UPDATE flumeq_task_event SET at = now() - interval '10 days' "
            "WHERE task_id IN (SELECT task_id FROM flumeq_task WHERE updated_at < now() - interval '1 day')"
        )
    assert flumeq.History(dsn).purge(7) == 12
    assert rows(dsn, "SELECT count(*) FROM flumeq_task") == [(8,)]
    assert rows(dsn, "SELECT count(*) FROM flumeq_task_event") == [(16,)]


def test_the_history_process_killed_is_replaced_and_nothing_is_lost(
    redis_url: str, dsn: str, postgres: PostgresServer
) -> None:
    client = flumeq.Client(redis_url)
    run = engine(redis_url, dsn, shutdown_timeout=5)
    thread = threading.Thread(target=run.run, kwargs={"processes": 1})
    thread.start()
    try:
        client.enqueue_many([("ok", {"n": n}) for n in range(200)])

        def history_process() -> psutil.Process:
            """The engine's child connected to PostgreSQL."""
            for child in psutil.Process().children(recursive=True):
                with contextlib.suppress(psutil.NoSuchProcess):
                    for connection in child.net_connections("tcp"):
                        if connection.raddr and connection.raddr.port == postgres.port:
                            return child
            raise AssertionError("no history process")

        deadline = time.monotonic() + 20
        while rows(dsn, "SELECT count(*) FROM flumeq_task")[0][0] < 200:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        victim = history_process()
        os.kill(victim.pid, signal.SIGKILL)
        client.enqueue_many([("ok", {"n": n}) for n in range(200, 400)])
        deadline = time.monotonic() + 30
        while rows(dsn, "SELECT count(*) FROM flumeq_task WHERE state = 'succeeded'")[0][0] < 400:
            assert time.monotonic() < deadline, "the history did not catch up after the kill"
            time.sleep(0.2)
        wait_until(lambda: history_process_or_none(history_process) not in (None, victim.pid))
    finally:
        run.stop()
        thread.join(30)
    assert not thread.is_alive()


ENGINE = """
import sys, time
import flumeq

def work(task):
    time.sleep(0.005)

flumeq.Engine(
    {"work": work}, sys.argv[1], history=sys.argv[2], shutdown_timeout=2, consumer="stopping"
).run(processes=2)
"""


@pytest.mark.parametrize("gone", ["postgresql", "postgresql and redis"])
def test_a_group_sigterm_stops_within_its_bound_with_the_history_database_gone(
    gone: str, dsn: str, postgres: PostgresServer
) -> None:
    server = RedisServer().start()
    try:
        url = server.url
        flumeq.Client(url).enqueue_many([("work", {"n": n}) for n in range(20_000)])
        engine = spawn_script(ENGINE, url, dsn)
        wait_until(lambda: recorded(dsn) > 100, timeout=30)
        processes = tree(engine.pid)
        postgres.stop()
        if "redis" in gone:
            server.kill()
        time.sleep(0.5)
        stop = sigterm_group(engine, processes)
    finally:
        server.stop()
        if postgres.process is None:
            postgres.start()
    assert_stopped_in_bound(engine, stop, gone)


APP = """
import flumeq

def ok(task):
    return {"doubled": task.payload * 2}

def bad(task):
    raise KeyError("missing " + str(task.payload))

handlers = {"ok": ok, "bad": bad}
"""


def test_the_cli_records_with_worker_history_and_searches_with_history(
    redis_url: str, dsn: str, tmp_path: Path
) -> None:
    (tmp_path / "histapp.py").write_text(APP)
    client = flumeq.Client(redis_url)
    client.enqueue("ok", 21, task_id="cli-ok", labels={"team": "a"})
    client.enqueue("bad", 1, task_id="cli-bad", max_retry=0)
    done = subprocess.run(
        [sys.executable, "-m", "flumeq", "worker", "histapp:handlers", "-p", "1", "--burst",
         "--url", redis_url, "--history", dsn],
        cwd=tmp_path, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "secret" not in done.stdout + done.stderr

    def cli(*args: str) -> str:
        result = CliRunner().invoke(main, ["history", *args], env={"FLUMEQ_HISTORY": dsn})
        assert result.exit_code == 0, result.output
        return result.output

    table = cli()
    assert "cli-ok" in table and "cli-bad" in table and "succeeded" in table and "dead" in table
    assert "cli-bad" not in cli("--state", "succeeded")
    assert "cli-ok" not in cli("--label", "team=b")
    found = json.loads(cli("--label", "team=a", "--json"))
    assert [row["task_id"] for row in found] == ["cli-ok"]
    timeline = cli("cli-bad")
    for expected in ("state: dead", "KeyError", "started", "failed", "dead", "Traceback"):
        assert expected in timeline, timeline
    one = json.loads(cli("cli-ok", "--json"))
    assert one["result"] == '{"doubled":42}' and [e["event"] for e in one["timeline"]] == [
        "started",
        "succeeded",
    ]
    missing = CliRunner().invoke(main, ["history", "nope", "--dsn", dsn])
    assert missing.exit_code == 1 and "not in the history" in missing.output
    refused = CliRunner().invoke(main, ["history", "--dsn", dsn.replace(":secret@", ":nope@")])
    assert refused.exit_code == 1 and "flumeq:***@" in refused.output
    assert "nope@" not in refused.output


def history_process_or_none(find: Any) -> Any:
    try:
        return find().pid
    except AssertionError:
        return None


# -- the dashboard's History page (headless Chromium) ---------------------------

DASHBOARD = """
import sys

import uvicorn

import flumeq
from flumeq.web import create_app

url, port, dsn = sys.argv[1], int(sys.argv[2]), sys.argv[3]
app = create_app(
    flumeq.Admin(url), local_only=True, history=flumeq.History(dsn) if dsn else None
)
uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")
"""
XSS = "<script>window.pwned=1</script>"


def start_board(redis_url: str, dsn: str) -> tuple[str, subprocess.Popen[bytes]]:
    from test_web import free_port  # noqa: PLC0415

    port = free_port()
    process = spawn_script(DASHBOARD, redis_url, str(port), dsn)
    deadline = time.monotonic() + 15
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/history", timeout=1):
                return f"http://127.0.0.1:{port}", process
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                raise AssertionError(f"no dashboard: {process.communicate()[1]!r}") from None
            time.sleep(0.1)


def test_the_dashboard_history_page_filters_pages_and_shows_a_timeline(
    redis_url: str, dsn: str, tmp_path: Path
) -> None:
    playwright = pytest.importorskip("playwright.sync_api")
    from test_web import CHROMIUM, DOCS_SHOTS, stop  # noqa: PLC0415

    client = flumeq.Client(redis_url, history=True)
    client.enqueue_many(
        [("email:send", {"to": f"user{n}@example.com", "template": "welcome"}) for n in range(30)],
        queue="emails",
        labels={"campaign": "winter"},
    )
    client.enqueue("charge", {"order": 17, "note": XSS}, task_id="order-17", max_retry=1)

    def charge(task: flumeq.Task) -> None:
        raise ConnectionError("card processor timed out for order " + str(task.payload["order"]))

    flumeq.Engine(
        {"email:send": lambda task: {"sent": True}, "charge": charge},
        redis_url,
        queues=("default", "emails"),
        history=dsn,
        retry_base=0.01,
        retry_max=0.02,
    ).run(processes=1, burst=True)
    # A delayed one (after the burst engine, which waits for delayed tasks).
    client.enqueue("charge", {"order": 18}, task_id="order-18", delay=3600)
    Sink(redis_url, dsn, ["default"], consumer="board").step()
    shots = DOCS_SHOTS if os.environ.get("FLUMEQ_SCREENSHOTS") == "1" else tmp_path
    base, process = start_board(redis_url, dsn)
    bare, bare_process = start_board(redis_url, "")
    try:
        status, body = _get(base + "/api/history?state=lost")
        assert status == 400 and "state must be one of" in body
        assert _get(bare + "/api/history")[0] == 404
        with playwright.sync_playwright() as driver:
            browser = driver.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.set_default_timeout(10_000)
            page.goto(bare + "/history")
            playwright.expect(page.locator("#history-off")).to_contain_text("--history DSN")

            page.goto(base + "/history?limit=20")
            rows = page.locator("#history-table tbody tr")
            playwright.expect(rows).to_have_count(20)
            page.locator("#history-more").click()
            playwright.expect(rows).to_have_count(32)
            playwright.expect(page.locator("#history-more")).to_be_hidden()

            page.goto(base + "/history?state=dead")
            playwright.expect(rows).to_have_count(1)
            playwright.expect(rows.first).to_contain_text("order-17")
            page.goto(base + "/history?label=campaign%3Dwinter&queue=emails")
            playwright.expect(rows).to_have_count(30)
            page.goto(base + "/history?text=processor")
            playwright.expect(rows).to_have_count(1)
            rows.first.locator("a.task-link").click()
            shown = page.locator("#history-task article")
            playwright.expect(shown).to_contain_text("ConnectionError")
            timeline = shown.locator("table.timeline tbody tr")
            playwright.expect(timeline).to_have_count(
                7
            )  # enqueued, then 2 x (started, failed), retried, dead
            playwright.expect(shown.locator("pre.payload")).to_contain_text(XSS)
            assert page.evaluate("window.pwned") is None
            page.screenshot(path=str(shots / "history.png"), full_page=True)

            # From the dead letters to the timeline.
            page.goto(base + "/dead/default")
            page.locator('article.letter[data-task-id="order-17"] a.history-link').click()
            playwright.expect(page.locator("#history-task article")).to_contain_text("order-17")
            # From a task lookup (the delayed one) to its history.
            page.goto(base + "/tasks?id=order-18")
            page.locator("article.hit a.history-link").click()
            playwright.expect(page.locator("#history-task article")).to_contain_text("enqueued")
            browser.close()
    finally:
        stop(process)
        stop(bare_process)
    assert (shots / "history.png").stat().st_size > 10_000


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()
