"""The web dashboard in a real browser: real Redis, real HTTP (uvicorn in a child
process), headless Chromium driven by Playwright. Also takes the README's
screenshots (into docs/screenshots/ with FLUMEQ_SCREENSHOTS=1)."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from base64 import b64encode
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Optional

import pytest

import flumeq
from conftest import ROOT, spawn_script, wait_until
from flumeq.admin import Admin
from flumeq.cron import Scheduler

try:
    from flumeq.web import create_app, serve
except ImportError as missing:  # pragma: no cover - depends on the machine
    pytest.skip(
        f"the dashboard's dependencies are not installed: {missing}", allow_module_level=True
    )

try:
    from playwright.sync_api import Browser, Page, expect, sync_playwright
except ImportError:  # pragma: no cover - depends on the machine
    sync_playwright = None

CHROMIUM = "/usr/bin/chromium"
# The README's screenshots are refreshed with FLUMEQ_SCREENSHOTS=1; other runs
# take them all the same, into a temporary folder, so the tree stays clean.
DOCS_SHOTS = ROOT / "docs" / "screenshots"
XSS = "<script>window.pwned=1</script>"
NO_VALUE = "\N{EN DASH}"  # what the page shows before it has a value
LOOPBACK = ["localhost", "127.0.0.1", "::1"]

SERVER = """
import json
import sys

import uvicorn

from flumeq.admin import Admin

try:
    from flumeq.web import create_app, serve
except ImportError as missing:  # pragma: no cover - depends on the machine
    pytest.skip(
        f"the dashboard's dependencies are not installed: {missing}", allow_module_level=True
    )
from flumeq.web import create_app

url, port, options = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3])
app = create_app(Admin(url), **options)
uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")
"""


ENGINE = """
import sys, time
import flumeq

def work(seconds):
    return lambda task: time.sleep(seconds)

url, consumer, processes, queues = sys.argv[1:]
handlers = {"email:send": work(0.01), "payment:capture": work(0.02), "report:build": work(60)}
flumeq.Engine(handlers, url, queues=queues.split(","), consumer=consumer).run(
    processes=int(processes)
)
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def request(
    url: str,
    method: str = "GET",
    body: Optional[bytes] = None,
    headers: Optional[dict[str, str]] = None,
) -> tuple[int, dict[str, str], bytes]:
    """One HTTP request; returns status, headers (lower-case names) and body (errors included)."""
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=10) as response:
            return response.status, _lower(response.headers.items()), response.read()
    except urllib.error.HTTPError as error:
        return error.code, _lower(error.headers.items()), error.read()


def _lower(items: Any) -> dict[str, str]:
    return {name.lower(): value for name, value in items}


def start_dashboard(
    redis_url: str, token: str = "", options: Optional[dict[str, Any]] = None
) -> tuple[str, subprocess.Popen[bytes]]:
    """A dashboard in a child process: ``create_app(**options)``; by default
    ``local_only`` without ``token``, else every request needs ``token``."""
    if options is None:
        options = (
            {"token": token, "require_token": True, "allowed_hosts": LOOPBACK}
            if token
            else {"local_only": True}
        )
    port = free_port()
    process = spawn_script(SERVER, redis_url, str(port), json.dumps(options))
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 15
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return base, process
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                _, err = process.communicate()
                raise AssertionError(f"the dashboard did not start: {err.decode()}") from None
            time.sleep(0.05)


def stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGKILL)
    process.communicate()


def csrf_of(base: str, headers: Optional[dict[str, str]] = None) -> str:
    status, _, body = request(base + "/", headers=headers)
    assert status == 200
    match = re.search(rb'<meta name="csrf-token" content="([^"]+)">', body)
    assert match
    return match.group(1).decode()


def post_json(
    url: str, payload: Any, headers: Optional[dict[str, str]] = None
) -> tuple[int, dict[str, str], Any]:
    status, response_headers, body = request(
        url,
        "POST",
        json.dumps(payload).encode(),
        {"Content-Type": "application/json", **(headers or {})},
    )
    return status, response_headers, json.loads(body) if body else None


def make_dead(redis_url: str, queue: str, type_: str, payload: Any, error: str) -> str:
    """Enqueues a task whose handler rejects it, runs a burst engine: one dead letter."""

    def reject(task: flumeq.Task) -> None:
        raise flumeq.Reject(error)

    info = flumeq.Client(redis_url).enqueue(type_, payload, queue=queue)
    flumeq.Engine({type_: reject}, redis_url, queues=(queue,)).run(processes=1, burst=True)
    return info.id


# -- fixtures -------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if sync_playwright is None:
        pytest.skip("playwright is not installed: the browser tests of the dashboard are skipped")
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"no Chromium at {CHROMIUM}: the browser tests of the dashboard are skipped")
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    tab = context.new_page()
    tab.set_default_timeout(10_000)
    yield tab
    context.close()


@pytest.fixture(scope="module")
def dashboard(redis_server: Any) -> Iterator[str]:
    """Base URL of a dashboard without token over the shared test Redis."""
    base, process = start_dashboard(redis_server.url)
    yield base
    stop(process)


# -- tests ----------------------------------------------------------------------


def test_overview_updates_live(dashboard: str, page: Page, redis_url: str) -> None:
    client = flumeq.Client(redis_url)
    client.enqueue("email:send", {"to": "a@example.com"}, queue="mail")
    page.goto(dashboard + "/")
    ready = page.locator('#queues tr[data-queue="mail"] td.ready')
    expect(ready).to_have_text("1")
    page.evaluate("window.notReloaded = true")
    client.enqueue_many([("email:send", {"n": n}) for n in range(41)], queue="mail")
    expect(ready).to_have_text("42", timeout=5000)
    expect(page.locator("#total-ready")).to_have_text("42")
    assert page.evaluate("window.notReloaded") is True
    expect(page.locator("#status")).to_have_class(re.compile(r"\bok\b"))


def test_dead_letter_requeue_from_the_page(dashboard: str, page: Page, redis_url: str) -> None:
    client = flumeq.Client(redis_url)
    task_id = make_dead(redis_url, "q", "charge", {"order": 17}, "bad")
    assert client.stats("q")["dead"] == 1

    page.goto(f"{dashboard}/dead/q")
    letter = page.locator(f'article.letter[data-task-id="{task_id}"]')
    expect(letter.locator(".error-text")).to_contain_text("bad")
    expect(letter.locator(".payload")).to_contain_text('"order": 17')
    expect(page.locator("#dead-total")).to_have_text("1")
    letter.locator("button.requeue").click()
    wait_until(lambda: client.stats("q")["dead"] == 0, timeout=5)
    stats = client.stats("q")
    assert (stats["dead"], stats["ready"]) == (0, 1)
    expect(page.locator("#letters")).to_contain_text("No dead letters")
    expect(page.locator("#toast")).to_contain_text("Requeued 1")

    before = stats["processed"]
    flumeq.Engine({"charge": lambda task: None}, redis_url, queues=("q",)).run(
        processes=1, burst=True
    )
    assert client.stats("q")["processed"] == before + 1
    assert client.stats("q")["ready"] == 0


def test_pause_and_resume_from_the_queue_page(dashboard: str, page: Page, redis_url: str) -> None:
    client = flumeq.Client(redis_url)
    client.enqueue("email:send", {}, queue="mail")
    page.goto(f"{dashboard}/queues/mail")
    toggle = page.locator("#pause-toggle")
    expect(toggle).to_have_text("Pause")
    toggle.click()
    expect(page.locator("#toast")).to_contain_text("Paused mail")
    expect(toggle).to_have_text("Resume")
    expect(page.locator("#paused-pill")).to_be_visible()
    assert client.paused() == ["mail"]
    page.goto(f"{dashboard}/")
    expect(page.locator('#queues tr[data-queue="mail"]')).to_contain_text("paused")
    page.goto(f"{dashboard}/queues/mail")
    page.locator("#pause-toggle", has_text="Resume").click()
    expect(page.locator("#toast")).to_contain_text("Resumed mail")
    expect(page.locator("#pause-toggle")).to_have_text("Pause")
    assert client.paused() == []
    # The action needs the page's CSRF token, like every other.
    status, _, _ = post_json(f"{dashboard}/api/pause/mail", {})
    assert status == 403 and client.paused() == []


def test_cancel_from_the_task_page(dashboard: str, page: Page, redis_url: str) -> None:
    client = flumeq.Client(redis_url)
    info = client.enqueue("report:build", {}, queue="reports", delay=600, result_ttl=60)
    page.goto(f"{dashboard}/tasks?id={info.id}")
    hit = page.locator("article.hit")
    expect(hit).to_contain_text("delayed")
    hit.locator("button.cancel-task").click()
    expect(page.locator("#toast")).to_contain_text(f"Cancelled {info.id}")
    expect(page.locator("#results")).to_contain_text("No task")
    assert client.stats("reports")["delayed"] == 0
    with pytest.raises(flumeq.TaskCancelled):
        info.result(timeout=1)
    # Like every action, it needs the page's CSRF token.
    other = client.enqueue("report:build", {}, queue="reports", delay=600)
    status, _, _ = post_json(f"{dashboard}/api/cancel/reports", {"id": other.id})
    assert status == 403 and client.stats("reports")["delayed"] == 1


def test_cron_page_lists_the_entries(dashboard: str, page: Page, redis_url: str) -> None:
    client = flumeq.Client(redis_url)
    entry = flumeq.Cron("*/5 * * * *", "report:build", name="reports", tz="Europe/Berlin")
    scheduler = Scheduler(client, [entry], "host-7")
    scheduler.step(time.time())
    page.goto(f"{dashboard}/cron")
    row = page.locator('#cron tr[data-entry="reports"]')
    expect(row).to_contain_text("*/5 * * * * (Europe/Berlin)")
    expect(row).to_contain_text("report:build")
    expect(row).to_contain_text("host-7")
    expect(row).to_contain_text("never")
    scheduler.release()
    expect(row).to_contain_text("no engine", timeout=5000)


def test_payloads_and_errors_are_text(dashboard: str, page: Page, redis_url: str) -> None:
    task_id = make_dead(redis_url, "q", "xss", {"html": XSS}, XSS)
    page.goto(f"{dashboard}/dead/q")
    letter = page.locator(f'article.letter[data-task-id="{task_id}"]')
    expect(letter.locator(".error-text")).to_contain_text(XSS)
    expect(letter.locator(".payload")).to_contain_text(XSS)
    # Names are data too: a queue, a task type and a looked-up id full of markup.
    evil = '<img src=x onerror="window.pwned=2">'
    flumeq.Client(redis_url).enqueue(evil, {"x": XSS}, queue=evil)
    page.goto(f"{dashboard}/")
    expect(page.locator("#queues")).to_contain_text(evil)
    page.locator("#queues a", has_text=evil).click()
    expect(page.locator("h1")).to_contain_text(evil)
    expect(page.locator("#types")).to_contain_text(evil)
    page.goto(f"{dashboard}/tasks?id={urllib.request.quote(XSS)}")
    expect(page.locator("#task-id")).to_have_value(XSS)
    expect(page.locator("#results")).to_contain_text(XSS)
    page.goto(f"{dashboard}/tasks?id={task_id}")
    expect(page.locator("#results .hit")).to_contain_text(XSS)
    assert page.evaluate("typeof window.pwned") == "undefined"
    assert page.locator("script").count() == 1


def test_queue_names_with_slashes_route_to_their_own_pages(dashboard: str, redis_url: str) -> None:
    """A queue may be called "a/dead": its pages must not read as queue a's."""
    make_dead(redis_url, "a/dead", "charge", {}, "slashed")
    flumeq.Client(redis_url).enqueue("charge", {}, queue="a")
    status, _, body = request(f"{dashboard}/api/queues/a%2Fdead")
    assert status == 200
    assert json.loads(body)["name"] == "a/dead"
    status, _, body = request(f"{dashboard}/api/dead/a%2Fdead")
    assert status == 200
    assert "slashed" in body.decode()
    status, _, body = request(f"{dashboard}/api/dead/a")
    assert (status, "slashed" in body.decode()) == (200, False)
    assert request(f"{dashboard}/queues/a%2Fdead")[0] == 200
    assert request(f"{dashboard}/dead/a%2Fdead")[0] == 200


def test_actions_need_the_csrf_token(dashboard: str, redis_url: str) -> None:
    make_dead(redis_url, "q", "charge", {}, "bad")
    url = f"{dashboard}/api/requeue/q"
    status, _, body = post_json(url, {"ids": None})
    assert status == 403
    assert "X-CSRF-Token" in body["error"]
    token = csrf_of(dashboard)
    status, _, _ = post_json(url, {}, {"X-CSRF-Token": "wrong"})
    assert status == 403
    status, _, body = post_json(url, {}, {"X-CSRF-Token": token, "Origin": "http://evil.example"})
    assert (status, body["error"]) == (403, "cross-origin request refused")
    status, _, _ = post_json(
        f"{dashboard}/api/purge/q",
        {},
        {"X-CSRF-Token": "", "Sec-Fetch-Site": "cross-site"},
    )
    assert status == 403
    assert flumeq.Client(redis_url).stats("q")["dead"] == 1
    status, _, body = post_json(url, {}, {"X-CSRF-Token": token, "Origin": dashboard})
    assert status == 400  # an empty body is not "all"
    status, _, body = post_json(url, {"all": True}, {"X-CSRF-Token": token, "Origin": dashboard})
    assert (status, body) == (200, {"queue": "q", "requeued": 1})
    status, _, body = post_json(f"{dashboard}/api/purge/nope", {}, {"X-CSRF-Token": token})
    assert status == 404
    status, _, _ = request(f"{dashboard}/queues/nope")
    assert status == 404
    # DNS rebinding: a page of another name resolving to 127.0.0.1 is not served.
    status, _, _ = request(f"{dashboard}/", headers={"Host": "rebind.example"})
    assert status == 400


def test_serve_refuses_off_localhost_without_token(redis_url: str) -> None:
    with Admin(redis_url) as admin:
        for host in ("0.0.0.0", "192.0.2.7", "dashboard.example"):
            with pytest.raises(flumeq.ConfigError, match="--token"):
                serve(admin, host=host, port=free_port())
        with pytest.raises(flumeq.ConfigError):
            create_app(admin, require_token=True)


def test_create_app_needs_a_token_or_local_only(redis_url: str) -> None:
    with Admin(redis_url) as admin:
        with pytest.raises(flumeq.ConfigError) as refused:
            create_app(admin)
        assert "token=" in str(refused.value) and "local_only=True" in str(refused.value)
        with pytest.raises(flumeq.ConfigError, match=r"not dashboard\.example"):
            create_app(admin, local_only=True, allowed_hosts=("localhost", "dashboard.example"))
    make_dead(redis_url, "q", "charge", {}, "bad")
    make_dead(redis_url, "q", "charge", {}, "worse")

    # local_only without a token: loopback Host names only, actions open to them.
    base, process = start_dashboard(redis_url, options={"local_only": True})
    try:
        for name in ("127.0.0.1", "localhost", "[::1]"):
            status, _, _ = request(base + "/", headers={"Host": name})
            assert status == 200, name
        for name in ("rebind.example", "192.0.2.7", "localhost.example"):
            status, _, body = request(base + "/api/overview", headers={"Host": name})
            assert (status, json.loads(body)["error"]) == (400, "this host name is not served here")
            status, _, _ = post_json(
                f"{base}/api/purge/q", {}, {"Host": name, "X-CSRF-Token": csrf_of(base)}
            )
            assert status == 400, name
        assert flumeq.Client(redis_url).stats("q")["dead"] == 2
        status, _, body = post_json(f"{base}/api/purge/q", {}, {"X-CSRF-Token": csrf_of(base)})
        assert (status, body) == (200, {"queue": "q", "purged": 2})
    finally:
        stop(process)

    # A token, as before: any Host, pages open, actions need the token.
    make_dead(redis_url, "q", "charge", {}, "again")
    base, process = start_dashboard(redis_url, options={"token": "t"})
    try:
        status, _, _ = request(base + "/", headers={"Host": "dashboard.example"})
        assert status == 200
        csrf = csrf_of(base)
        status, _, _ = post_json(f"{base}/api/purge/q", {}, {"X-CSRF-Token": csrf})
        assert status == 401
        status, _, body = post_json(
            f"{base}/api/purge/q", {}, {"X-CSRF-Token": csrf, "Authorization": "Bearer t"}
        )
        assert (status, body) == (200, {"queue": "q", "purged": 1})
    finally:
        stop(process)


def test_token_guards_pages_and_actions(browser: Browser, redis_url: str) -> None:
    task_id = make_dead(redis_url, "q", "charge", {}, "bad")
    make_dead(redis_url, "q", "charge", {}, "worse")
    base, process = start_dashboard(redis_url, token="s3cret")
    try:
        url = f"{base}/api/requeue/q"
        status, headers, body = post_json(url, {})
        assert status == 401
        assert headers["www-authenticate"].startswith("Basic")
        status, headers, _ = request(base + "/")
        assert status == 401
        status, _, _ = request(base + "/", headers={"Authorization": "Bearer wrong"})
        assert status == 401

        bearer = {"Authorization": "Bearer s3cret"}
        basic = {"Authorization": "Basic " + b64encode(b"admin:s3cret").decode()}
        csrf = csrf_of(base, basic)
        status, _, body = post_json(url, {}, bearer)
        assert status == 403  # the token alone is not enough
        status, _, body = post_json(url, {"ids": []}, {**bearer, "X-CSRF-Token": csrf})
        assert status == 400
        status, _, body = post_json(url, {"ids": ["nope"]}, {**bearer, "X-CSRF-Token": csrf})
        assert (status, body) == (200, {"queue": "q", "requeued": 0})
        status, _, _ = request(base + "/api/overview", headers=basic)
        assert status == 200

        # A browser: a page sends it to /login, which asks for the token (HTTP
        # Basic) and comes back; the page's own requests then carry it.
        context = browser.new_context(http_credentials={"username": "me", "password": "s3cret"})
        try:
            tab = context.new_page()
            tab.goto(f"{base}/dead/q")
            assert tab.url == f"{base}/dead/q"
            letter = tab.locator(f'article.letter[data-task-id="{task_id}"]')
            letter.locator("button.requeue").click()
            expect(tab.locator("#toast")).to_contain_text("Requeued 1")
            expect(tab.locator("article.letter")).to_have_count(1)
            # Off-site "next" targets are not followed.
            tab.goto(f"{base}/login?next=//evil.example/")
            assert tab.url == f"{base}/"
        finally:
            context.close()
        assert flumeq.Client(redis_url).stats("q")["dead"] == 1
    finally:
        stop(process)


def test_screenshots(dashboard: str, page: Page, redis_url: str, tmp_path: Path) -> None:
    """Realistic data: an engine (child process) busy on a few queues, a dead
    letter with a traceback, delayed tasks; one screenshot per page."""
    shots = DOCS_SHOTS if os.environ.get("FLUMEQ_SCREENSHOTS") == "1" else tmp_path
    client = flumeq.Client(redis_url)
    client.enqueue_many(
        [("image:resize", {"image": f"img_{n:04}.png", "width": 640}) for n in range(40)],
        queue="default",
    )
    client.enqueue("image:resize", {"image": "corrupt.png", "width": 640}, max_retry=0)
    client.enqueue("image:resize", {"image": "huge.tiff", "width": 99999}, max_retry=0)

    def resize(task: flumeq.Task) -> None:
        if task.payload["image"] == "corrupt.png":
            raise ValueError("cannot identify image file 'corrupt.png'")
        if task.payload["width"] > 10_000:
            raise flumeq.Reject("width 99999 is beyond the 10000 px limit")

    flumeq.Engine({"image:resize": resize}, redis_url, queues=("default",)).run(
        processes=1, burst=True
    )
    client.enqueue_many(
        [
            ("email:send", {"to": f"user{n}@example.com", "template": "welcome"})
            for n in range(4000)
        ],
        queue="emails",
    )
    for n in range(6):
        client.enqueue(
            "email:digest", {"user": 100 + n, "period": "weekly"}, queue="emails", delay=90 + 60 * n
        )
    client.enqueue_many(
        [("payment:capture", {"order": 5000 + n, "amount_cents": 1299 + n}) for n in range(2000)],
        queue="critical",
    )
    client.enqueue_many(
        [("report:build", {"day": f"2026-11-{day:02}"}) for day in range(1, 9)], queue="reports"
    )
    engines = [
        spawn_script(ENGINE, redis_url, "web-1", "2", "critical,emails"),
        spawn_script(ENGINE, redis_url, "reports-1", "1", "reports"),
    ]
    admin = Admin(redis_url)
    try:
        # The workers list needs the engine's heartbeat; go on without it after a while.
        deadline = time.monotonic() + 8
        while len(admin.workers()) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        wait_until(lambda: client.stats("emails")["processed"] > 0, timeout=10)
        shots.mkdir(parents=True, exist_ok=True)

        page.goto(dashboard + "/")
        expect(page.locator("#total-rate")).not_to_have_text(NO_VALUE, timeout=8000)
        page.wait_for_timeout(1600)
        page.screenshot(path=str(shots / "overview.png"))

        page.goto(dashboard + "/queues/emails")
        expect(page.locator("#delayed tbody tr").first).not_to_have_class("empty")
        expect(page.locator("#count-rate")).not_to_have_text(NO_VALUE, timeout=8000)
        page.screenshot(path=str(shots / "queue.png"))

        page.goto(dashboard + "/dead/default")
        expect(page.locator("article.letter")).to_have_count(2)
        page.locator("article.letter details summary").first.click()
        page.screenshot(path=str(shots / "dead.png"))

        page.goto(dashboard + "/workers")
        expect(page.locator("#workers-full tbody tr").first).to_be_visible()
        page.wait_for_timeout(300)
        page.screenshot(path=str(shots / "workers.png"))
    finally:
        admin.close()
        for engine in engines:
            stop(engine)
    for name in ("overview", "queue", "dead", "workers"):
        assert (shots / f"{name}.png").stat().st_size > 10_000
