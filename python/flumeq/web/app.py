"""The dashboard: an ASGI app (Starlette + Jinja2) over ``flumeq.admin.Admin``.

Pages are server-rendered shells; ``static/app.js`` fills them from the JSON
API under ``/api/`` and refreshes them every ~1.5 s. ``/metrics`` serves the
Prometheus text format (``flumeq.metrics.render``).

Authentication (when a token is set): HTTP Basic, any user name and the token
as password, or ``Authorization: Bearer <token>`` for scripts and Prometheus.
Basic is what browsers speak without a login form or a session store: a page
request without the token is sent to ``/login``, which answers 401 with a
Basic challenge, so the browser asks once, then sends the credentials with
every later request to the site (``fetch`` included: the challenge came from
the root path) and ``/login`` sends it back to the page. The page script goes
to ``/login`` too when an action is refused with 401. Basic has no logout
(close the browser). Without TLS the token crosses the network in clear
text, so put a TLS proxy in front off-localhost.

- ``token=None``: nothing is asked. ``create_app`` builds such an app only
  with ``local_only=True``, which answers loopback ``Host`` names only
  (``serve`` passes it when it listens on loopback without a token); an app
  mounted anywhere else needs a token.
- ``token`` set: actions (every method but GET/HEAD) need it.
- ``require_token=True`` as well: every request needs it, pages included
  (``serve`` sets it when it listens off-localhost).

CSRF: every action also needs the header ``X-CSRF-Token`` equal to a random
secret made per app and embedded in each page as
``<meta name="csrf-token">`` (compared with ``hmac.compare_digest``); a
request whose ``Origin`` (or ``Sec-Fetch-Site``) shows another site is
refused. A cross-site form cannot set that header and a cross-site script
cannot read the page, so it cannot learn the secret. ``serve`` on loopback
(and any app made with ``local_only=True``) accepts only loopback ``Host``
names, which stops DNS rebinding.

All data is text to the page: Jinja2 autoescapes, the script only writes
``textContent``, and the Content-Security-Policy allows no inline script.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import importlib
import ipaddress
import json
import secrets
import threading
import time
from collections.abc import Awaitable, Iterable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Optional, TypeVar
from urllib.parse import quote, urlsplit

from jinja2 import Environment, FileSystemLoader
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates
from starlette.types import ASGIApp, Receive, Scope, Send

from .._version import __version__
from ..admin import Admin
from ..errors import ConfigError, FlumeqError, RedisUnavailable
from ..history import History, HistoryUnavailable
from ..history.rows import EVENTS

__all__ = ["create_app", "serve"]

HERE = Path(__file__).resolve().parent
#: Most dead letters one page shows.
DEAD_LIMIT = 100
#: Host names accepted when serving on a loopback address.
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
SAFE_METHODS = frozenset({"GET", "HEAD"})
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
REALM = 'Basic realm="flumeq", charset="UTF-8"'
SECURITY_HEADERS = [
    (b"content-security-policy", CSP.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"same-origin"),
]

T = TypeVar("T")


#: The History page's filters (``History.search``'s names).
HISTORY_FILTERS = ("queue", "type", "state", "label", "since", "until", "text")
#: Tasks per History page.
HISTORY_PAGE = 50


def _epochs(value: Any) -> Any:
    """``value`` with its datetimes as seconds since the epoch (as the
    other APIs give times)."""
    if isinstance(value, datetime):
        return value.timestamp()
    if isinstance(value, dict):
        return {key: _epochs(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_epochs(item) for item in value]
    return value


class _Json(JSONResponse):
    """JSON that never fails on an odd value (shown as its text) and is never cached."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=False, default=str, separators=(",", ":")).encode()


def _error(status: int, message: str, headers: Optional[dict[str, str]] = None) -> _Json:
    return _Json({"error": message}, status_code=status, headers=headers)


def _host_name(host_header: str) -> str:
    """The host name of a ``Host`` header, without port or IPv6 brackets."""
    host = host_header.strip().lower()
    if host.startswith("["):
        return host[1:].partition("]")[0]
    return host.rpartition(":")[0] if host.count(":") == 1 else host


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address or ``localhost``) only listens on this machine."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _token_in(authorization: str, token: str) -> bool:
    """Whether an ``Authorization`` header carries ``token`` (Bearer, or Basic password)."""
    scheme, _, value = authorization.strip().partition(" ")
    value = value.strip()
    if scheme.lower() == "bearer":
        given = value.encode()
    elif scheme.lower() == "basic":
        try:
            decoded = base64.b64decode(value.encode("ascii"), validate=True)
        except (binascii.Error, UnicodeEncodeError):
            return False
        given = decoded.partition(b":")[2]
    else:
        return False
    return hmac.compare_digest(given, token.encode())


def authorized(request: Request, token: Optional[str]) -> bool:
    """Whether ``request`` may pass a gate guarded by ``token`` (``None``: open)."""
    return token is None or _token_in(request.headers.get("authorization", ""), token)


def _route_path(scope: Scope) -> str:
    path: str = scope["path"]
    root: str = scope.get("root_path", "")
    return path[len(root) :] if root and path.startswith(root) else path


class _Gate:
    """ASGI middleware: allowed ``Host`` names, then the token, then security headers."""

    def __init__(
        self,
        app: ASGIApp,
        token: Optional[str],
        require_token: bool,
        allowed_hosts: Optional[frozenset[str]],
    ) -> None:
        self.app = app
        self.token = token
        self.require_token = require_token
        self.allowed_hosts = allowed_hosts

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request = Request(scope)
        response: Optional[Response] = None
        if (
            self.allowed_hosts is not None
            and _host_name(request.headers.get("host", "")) not in self.allowed_hosts
        ):
            response = _error(400, "this host name is not served here")
        elif (
            self.token is not None
            and (self.require_token or request.method not in SAFE_METHODS)
            and _route_path(scope) != "/login"  # it asks by itself
            and not authorized(request, self.token)
        ):
            response = self._refuse(request)
        if response is not None:
            await response(scope, receive, send)
            return

        async def send_with_headers(message: Any) -> None:
            if message["type"] == "http.response.start":
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], *SECURITY_HEADERS]
            await send(message)

        await self.app(scope, receive, send_with_headers)

    @staticmethod
    def _refuse(request: Request) -> Response:
        wants_page = request.method in SAFE_METHODS and "text/html" in request.headers.get(
            "accept", ""
        )
        path = _route_path(request.scope)
        if wants_page and not path.startswith("/api/"):
            # Ask on /login, at the root: a browser then sends the credentials with
            # every request to this site, not only to paths under the one that asked.
            root = request.scope.get("root_path", "").rstrip("/")
            query = request.url.query
            target = quote(path + ("?" + query if query else ""), safe="")
            return RedirectResponse(f"{root}/login?next={target}", status_code=303)
        return _error(
            401,
            "the dashboard token is needed: HTTP Basic (any user, the token as password) "
            "or Authorization: Bearer <token>",
            {"WWW-Authenticate": REALM},
        )


def _challenge(text: str) -> Response:
    """A 401 that makes a browser ask for the user name and password."""
    return Response(
        text + "\n", status_code=401, media_type="text/plain", headers={"WWW-Authenticate": REALM}
    )


class _Dashboard:
    """The endpoints, around one ``Admin`` shared by every request."""

    def __init__(
        self, admin: Admin, token: Optional[str], history: Optional[History] = None
    ) -> None:
        self.admin = admin
        self.token = token
        #: The task history, when the dashboard was given its database.
        self.history = history
        self._history_lock = threading.Lock()
        self.csrf = secrets.token_urlsafe(32)
        # Admin calls block (Redis round trips): run them off the event loop, one at a time.
        self._lock = threading.Lock()
        env = Environment(loader=FileSystemLoader(HERE / "templates"), autoescape=True)
        self.templates = Jinja2Templates(env=env)

    # -- plumbing ---------------------------------------------------------

    def _locked(self, call: Callable[..., T], *args: Any) -> T:
        with self._lock:
            return call(*args)

    async def _admin(self, call: Callable[..., T], *args: Any) -> T:
        return await run_in_threadpool(self._locked, call, *args)

    async def _known(self, name: str) -> bool:
        """For pages, which answer an unknown queue with a 404 page (the
        API gets the ``ConfigError`` Admin raises, as a 404 JSON error)."""
        return await self._admin(self.admin.has_queue, name)

    async def _api(self, produce: Callable[[], Awaitable[Any]]) -> Response:
        """Runs ``produce``; Admin errors become JSON errors with a fitting status."""
        try:
            return _Json(await produce(), headers={"Cache-Control": "no-store"})
        except ConfigError as error:
            return _error(404, str(error))
        except RedisUnavailable as error:
            return _error(503, f"redis is unreachable: {error}")
        except FlumeqError as error:
            return _error(500, f"{type(error).__name__}: {error}")

    def _page(self, request: Request, template: str, status: int = 200, **context: Any) -> Response:
        context.update(
            csrf_token=self.csrf,
            root=request.scope.get("root_path", "").rstrip("/"),
            redis=self.admin.url_for_display,
            version=__version__,
        )
        return self.templates.TemplateResponse(
            request,
            template,
            context,
            status_code=status,
            headers={"Cache-Control": "no-store"},
        )

    def _action_problem(self, request: Request) -> Optional[str]:
        """Why an action request is refused as cross-site, or None."""
        origin = request.headers.get("origin")
        host = request.headers.get("host", "").lower()
        if origin is not None and (origin == "null" or urlsplit(origin).netloc.lower() != host):
            return "cross-origin request refused"
        site = request.headers.get("sec-fetch-site")
        if site is not None and site not in ("same-origin", "none"):
            return "cross-site request refused"
        sent = request.headers.get("x-csrf-token", "")
        if not hmac.compare_digest(sent.encode(), self.csrf.encode()):
            return "missing or wrong X-CSRF-Token header (reload the page)"
        return None

    # -- pages ------------------------------------------------------------

    async def overview_page(self, request: Request) -> Response:
        return self._page(request, "overview.html", page="overview", title="Overview")

    async def queue_page(self, request: Request) -> Response:
        name = request.path_params["name"]
        if not await self._known(name):
            return self._not_found(request, f"There is no queue named {name!r}.")
        return self._page(request, "queue.html", page="queue", title=name, queue=name)

    async def dead_page(self, request: Request) -> Response:
        name = request.path_params["name"]
        if not await self._known(name):
            return self._not_found(request, f"There is no queue named {name!r}.")
        return self._page(
            request, "dead.html", page="dead", title=f"{name}: dead letters", queue=name
        )

    async def task_page(self, request: Request) -> Response:
        task_id = request.query_params.get("id", "").strip()
        return self._page(request, "task.html", page="task", title="Task lookup", task_id=task_id)

    async def history_page(self, request: Request) -> Response:
        params = request.query_params
        return self._page(
            request,
            "history.html",
            page="history",
            title="History",
            history_on=self.history is not None,
            filters={name: params.get(name, "") for name in HISTORY_FILTERS},
            task_id=params.get("task", "").strip(),
            states=EVENTS,
        )

    async def workers_page(self, request: Request) -> Response:
        return self._page(request, "workers.html", page="workers", title="Workers")

    async def cron_page(self, request: Request) -> Response:
        return self._page(request, "cron.html", page="cron", title="Cron")

    async def login(self, request: Request) -> Response:
        """Asks the browser for the token, then goes back to ``next``."""
        if not authorized(request, self.token):
            return _challenge("Log in with any user name and the dashboard token as password.")
        target = request.query_params.get("next", "")
        # Only a path of this site: browsers read "//host", "/\\host" or "/<tab>/host"
        # as another site.
        if (
            not target.startswith("/")
            or target.startswith("//")
            or any(char == "\\" or ord(char) < 32 for char in target)
        ):
            target = "/"
        root = request.scope.get("root_path", "").rstrip("/")
        return RedirectResponse(root + target, status_code=303)

    def _not_found(self, request: Request, message: str) -> Response:
        return self._page(
            request, "error.html", status=404, page="error", title="Not found", message=message
        )

    async def metrics(self, request: Request) -> Response:
        try:
            module = importlib.import_module("flumeq.metrics")
        except ImportError as error:
            message = f"metrics need the 'metrics' extra (pip install 'flumeq[metrics]'): {error}"
            return Response(message + "\n", 501, media_type="text/plain")
        try:
            render: Callable[[Admin], tuple[bytes, str]] = module.render
            body, content_type = await self._admin(render, self.admin)
        except RedisUnavailable as error:
            return Response(f"redis is unreachable: {error}\n", 503, media_type="text/plain")
        return Response(body, headers={"Content-Type": content_type, "Cache-Control": "no-store"})

    # -- JSON -------------------------------------------------------------

    async def api_overview(self, request: Request) -> Response:
        async def produce() -> dict[str, Any]:
            queues = await self._admin(self.admin.overview)
            workers = await self._admin(self.admin.workers)
            return {"time": time.time(), "queues": queues, "workers": workers}

        return await self._api(produce)

    async def api_queue(self, request: Request) -> Response:
        name = request.path_params["name"]

        async def produce() -> dict[str, Any]:
            detail = await self._admin(self.admin.queue, name)
            detail["time"] = time.time()
            return detail

        return await self._api(produce)

    async def api_dead(self, request: Request) -> Response:
        name = request.path_params["name"]

        async def produce() -> dict[str, Any]:
            letters = await self._admin(self.admin.dead_letters, name, DEAD_LIMIT)
            (row,) = await self._admin(self.admin.overview, [name])
            return {"queue": name, "total": row.get("dead", len(letters)), "dead": letters}

        return await self._api(produce)

    async def api_task(self, request: Request) -> Response:
        task_id = request.query_params.get("id", "").strip()

        async def produce() -> dict[str, Any]:
            if not task_id:
                return {"id": "", "found": []}
            return {"id": task_id, "found": await self._admin(self.admin.find_task, task_id)}

        return await self._api(produce)

    async def _from_history(self, call: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        def locked() -> T:
            with self._history_lock:
                return call(*args, **kwargs)

        return await run_in_threadpool(locked)

    async def _history_api(self, produce: Callable[[History], Awaitable[Any]]) -> Response:
        """Runs ``produce`` on the history: 404 without one, 400 for a bad
        filter, 503 when PostgreSQL cannot be reached."""
        if self.history is None:
            return _error(404, "no history database: start the dashboard with --history DSN")
        try:
            return _Json(
                _epochs(await produce(self.history)), headers={"Cache-Control": "no-store"}
            )
        except ConfigError as error:
            return _error(400, str(error))
        except HistoryUnavailable as error:
            return _error(503, str(error))
        except Exception as error:
            self.history.close()
            return _error(503, f"the history database failed: {type(error).__name__}: {error}")

    async def api_history(self, request: Request) -> Response:
        params = request.query_params
        filters: dict[str, Any] = {
            name: params[name] for name in HISTORY_FILTERS if params.get(name, "").strip()
        }
        limit = params.get("limit", str(HISTORY_PAGE))
        before_at, before_id = params.get("before_at"), params.get("before_id")

        async def produce(history: History) -> dict[str, Any]:
            try:
                count = int(limit)
                before = None
                if before_at and before_id:
                    before = (datetime.fromtimestamp(float(before_at), timezone.utc), before_id)
            except ValueError:
                raise ConfigError("limit and before_at must be numbers") from None
            rows = await self._from_history(history.search, limit=count, before=before, **filters)
            return {"tasks": rows, "more": len(rows) == count}

        return await self._history_api(produce)

    async def api_history_task(self, request: Request) -> Response:
        task_id = request.query_params.get("id", "").strip()
        queue = request.query_params.get("queue") or None

        async def produce(history: History) -> dict[str, Any]:
            task = await self._from_history(history.task, task_id, queue) if task_id else None
            return {"id": task_id, "task": task}

        return await self._history_api(produce)

    async def api_workers(self, request: Request) -> Response:
        async def produce() -> dict[str, Any]:
            return {"time": time.time(), "workers": await self._admin(self.admin.workers)}

        return await self._api(produce)

    async def api_cron(self, request: Request) -> Response:
        async def produce() -> dict[str, Any]:
            entries = await self._admin(self.admin.cron_entries)
            return {"time": time.time(), "entries": entries}

        return await self._api(produce)

    # -- actions ----------------------------------------------------------

    async def _action_input(self, request: Request) -> tuple[str, dict[str, Any]] | Response:
        """The queue name and JSON body of an action, or the error to answer."""
        problem = self._action_problem(request)
        if problem:
            return _error(403, problem)
        raw = await request.body()
        body: Any = {}
        if raw.strip():
            try:
                body = json.loads(raw)
            except ValueError as error:
                return _error(400, f"bad JSON body: {error}")
        if not isinstance(body, dict):
            return _error(400, "bad JSON body: the body must be a JSON object")
        return request.path_params["name"], body

    async def requeue(self, request: Request) -> Response:
        """Body ``{"ids": ["<task id>", ...]}`` requeues those; ``{"all": true}`` all."""
        given = await self._action_input(request)
        if isinstance(given, Response):
            return given
        name, body = given
        ids = body.get("ids")
        if body.get("all") is True and ids is None:
            pass  # every dead letter of the queue
        elif (
            not isinstance(ids, list)
            or not ids
            or not all(isinstance(id_, str) and id_ for id_ in ids)
        ):
            return _error(
                400, 'give "ids": a non-empty list of task ids, or "all": true (not both)'
            )

        async def produce() -> dict[str, Any]:
            count = await self._admin(self.admin.requeue_dead, name, ids)
            return {"queue": name, "requeued": count}

        return await self._api(produce)

    async def purge(self, request: Request) -> Response:
        problem = self._action_problem(request)
        if problem:
            return _error(403, problem)
        name = request.path_params["name"]

        async def produce() -> dict[str, Any]:
            return {"queue": name, "purged": await self._admin(self.admin.purge_dead, name)}

        return await self._api(produce)

    async def pause(self, request: Request) -> Response:
        return await self._set_paused(request, True)

    async def resume(self, request: Request) -> Response:
        return await self._set_paused(request, False)

    async def _set_paused(self, request: Request, paused: bool) -> Response:
        problem = self._action_problem(request)
        if problem:
            return _error(403, problem)
        name = request.path_params["name"]

        async def produce() -> dict[str, Any]:
            call = self.admin.pause if paused else self.admin.resume
            changed = await self._admin(call, name)
            return {"queue": name, "paused": paused, "changed": changed}

        return await self._api(produce)

    async def cancel(self, request: Request) -> Response:
        """Body ``{"id": "<task id>"}`` cancels that task of the queue."""
        given = await self._action_input(request)
        if isinstance(given, Response):
            return given
        name, body = given
        task_id = body.get("id")
        if not isinstance(task_id, str) or not task_id:
            return _error(400, 'give "id": the task id to cancel')

        async def produce() -> dict[str, Any]:
            found = await self._admin(self.admin.cancel, task_id, name)
            return {"queue": name, "id": task_id, "cancelled": found}

        return await self._api(produce)

    async def api_not_found(self, request: Request) -> Response:
        return _error(404, "no such API endpoint")


def create_app(
    admin: Admin,
    *,
    token: Optional[str] = None,
    require_token: bool = False,
    allowed_hosts: Optional[Iterable[str]] = None,
    local_only: bool = False,
    history: Optional[History] = None,
) -> Starlette:
    """The dashboard as an ASGI app over ``admin`` (and ``history``, whose
    History page searches the task history in PostgreSQL).

    ``token``: actions need it (HTTP Basic password or Bearer); with
    ``require_token`` every request does. ``allowed_hosts``: ``Host`` names
    answered (any when ``None``), against DNS rebinding. ``local_only``: only
    loopback ``Host`` names are answered (``LOOPBACK_NAMES`` unless
    ``allowed_hosts`` names other loopback ones); it checks the ``Host``
    header, so the server must listen on loopback too. Without a token the
    app is built only with ``local_only=True``: an open app mounted elsewhere
    would let anyone who reaches it requeue and purge dead letters. The
    caller keeps ``admin`` and closes it.
    """
    if token is not None and not token:
        raise ConfigError("the dashboard token must not be empty")
    if require_token and token is None:
        raise ConfigError("require_token=True needs a token")
    if token is None and not local_only:
        raise ConfigError(
            "refusing to build the dashboard app without a token: wherever it is mounted, "
            "anyone who can reach it could read payloads and requeue or purge dead letters; "
            "pass token=... (actions then need it), or local_only=True to answer loopback "
            "Host names only"
        )
    if local_only and allowed_hosts is None:
        allowed_hosts = LOOPBACK_NAMES
    hosts = None if allowed_hosts is None else frozenset(_host_name(h) for h in allowed_hosts)
    if local_only and hosts is not None:
        foreign = sorted(name for name in hosts if not is_loopback(name))
        if foreign:
            raise ConfigError(
                f"local_only=True answers loopback Host names only, not {', '.join(foreign)}"
            )
    board = _Dashboard(admin, token, history)
    return Starlette(
        routes=[
            Route("/", board.overview_page, name="overview"),
            # Queue names may hold "/": each route takes the whole rest of the
            # path as the name, and no route's prefix is another's.
            Route("/queues/{name:path}", board.queue_page, name="queue"),
            Route("/dead/{name:path}", board.dead_page, name="dead"),
            Route("/tasks", board.task_page, name="tasks"),
            Route("/history", board.history_page, name="history"),
            Route("/workers", board.workers_page, name="workers"),
            Route("/cron", board.cron_page, name="cron"),
            Route("/login", board.login, name="login"),
            Route("/metrics", board.metrics, name="metrics"),
            Route("/api/overview", board.api_overview),
            Route("/api/workers", board.api_workers),
            Route("/api/cron", board.api_cron),
            Route("/api/tasks", board.api_task),
            Route("/api/history", board.api_history),
            Route("/api/history/task", board.api_history_task),
            Route("/api/requeue/{name:path}", board.requeue, methods=["POST"]),
            Route("/api/purge/{name:path}", board.purge, methods=["POST"]),
            Route("/api/pause/{name:path}", board.pause, methods=["POST"]),
            Route("/api/resume/{name:path}", board.resume, methods=["POST"]),
            Route("/api/cancel/{name:path}", board.cancel, methods=["POST"]),
            Route("/api/dead/{name:path}", board.api_dead),
            Route("/api/queues/{name:path}", board.api_queue),
            Route("/api/{rest:path}", board.api_not_found, methods=["GET", "POST"]),
            Mount("/static", StaticFiles(directory=HERE / "static"), name="static"),
        ],
        middleware=[
            Middleware(_Gate, token=token, require_token=require_token, allowed_hosts=hosts)
        ],
    )


def serve(
    admin: Admin,
    host: str = "127.0.0.1",
    port: int = 8080,
    token: Optional[str] = None,
    history: Optional[History] = None,
) -> None:
    """Serves the dashboard with uvicorn until interrupted.

    Off-localhost a token is required and then guards every page; on a
    loopback address pages are open (actions need the token when one is
    given) and only loopback ``Host`` names are answered.
    """
    loopback = is_loopback(host)
    if not loopback and not token:
        raise ConfigError(
            f"refusing to serve the dashboard on {host!r} without a token: off localhost "
            "anyone who can reach it could read payloads and requeue or purge dead letters; "
            "pass --token (serve(..., token=...)) or listen on 127.0.0.1"
        )
    app = create_app(
        admin,
        token=token or None,
        require_token=not loopback,
        allowed_hosts=(*LOOPBACK_NAMES, host) if loopback else None,
        local_only=loopback and not token,
        history=history,
    )
    import uvicorn  # noqa: PLC0415 (only needed to serve)

    uvicorn.run(app, host=host, port=port, log_level="warning")
