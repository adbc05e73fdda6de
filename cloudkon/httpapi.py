"""The HTTP API: submit a job and poll for its results with plain HTTP and JSON.

Owns the routes of a scheduler started with ``--http-port``, their authentication, the
requests answered at once and the JSON shapes, documented in docs/openapi.json:

    POST /tasks/submit            {"count": 2, "tasks": ["sleep 10", "echo hi"]}
                                  -> {"status": "ok", "cursor": "..."}
    GET  /tasks/result/{cursor}   -> {"status": "completed", "tasks": [...]} once every
                                     task is done, {"status": "not completed", ...} before;
                                     ?offset=N&limit=M for a page of the tasks of a big job
    POST /jobs/{id}/cancel        -> {"status": "ok", "cancelled": N}, as client.py --cancel
    GET  /dashboard/state         -> the dashboard's JSON (telemetry.py)
    GET  /metrics                 -> Prometheus text (metrics.py, telemetry.py)
    GET  /, /dashboard.css, /dashboard.js: the dashboard's page (cloudkon/dashboard/), no token

With ``metrics_only`` (``--metrics-port``) the server answers GET /metrics alone, without a
token, for a scraper.  Every refusal is JSON too.  The server under the routes, hardened
against slow and greedy clients (connections capped, request deadlines, head and body limits,
a byte budget for bodies), is httpserver.py's; a body is read before its request takes one of the
MAX_CONCURRENT_REQUESTS slots that answer (a slow upload holds no slot).  The server's
threads hand every request to the scheduler's event loop (a ``JobService``), so jobs
submitted here are the same jobs as over the TCP protocol, with the same cursors and the
same store.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import hmac
import importlib.resources
import logging
import re
import threading
import urllib.parse
from collections.abc import Callable
from http import HTTPStatus
from typing import Any, NamedTuple, TypeVar

from cloudkon import protocol
from cloudkon.errors import BackendError, BadRequest
from cloudkon.httpserver import HttpFailure, JsonHandler, Server, failure_body, whole_number
from cloudkon.metrics import CONTENT_TYPE, exposition
from cloudkon.results import task_record
from cloudkon.service import JobService
from cloudkon.tasks import ResultBatch
from cloudkon.telemetry import Telemetry

log = logging.getLogger("cloudkon.http")

# Requests answered at once (parsing a body, asking the scheduler); more are answered 503
# at once rather than queued.  A request takes its slot once its body has arrived.
MAX_CONCURRENT_REQUESTS = 8
# Longest wait for the scheduler's answer (reading a big job's results from the store).
ANSWER_TIMEOUT_SECONDS = 300

_RESULT_PREFIX = "/tasks/result/"
_CANCEL_PATH = re.compile(r"/jobs/([^/]+)/cancel")
# The dashboard's files (cloudkon/dashboard/, package data), by path: they hold no data, so no token.
_PAGES = {"/": ("index.html", "text/html; charset=utf-8"),
          "/dashboard.css": ("dashboard.css", "text/css; charset=utf-8"),
          "/dashboard.js": ("dashboard.js", "text/javascript; charset=utf-8")}
# Fetched again at each load (a scheduler's upgrade shows at once), and what the page may load:
# its own files only, no inline script or style (an injected one does not run); and no other site
# may frame it (a click on Cancel through a page laid over it).
_PAGE_HEADERS = {"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff", "X-Frame-Options": "DENY",
                 "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; style-src 'self'; "
                                            "script-src 'self'; frame-ancestors 'none'"}


class Document(NamedTuple):
    """An answer that is not the API's JSON: a page's file, the metrics' text."""

    content_type: str
    data: bytes
    headers: dict[str, str]


# An answer: its status and JSON body (or a Document).
Reply = tuple[HTTPStatus, dict[str, Any] | Document]
# What serves a route: its method, the function answering it, and whether it needs no token.
Route = tuple[str, Callable[[bytearray | None], Reply], bool]
T = TypeVar("T")

_STATUS_OF_CODE = {"too_large": HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                   "shutting_down": HTTPStatus.SERVICE_UNAVAILABLE}


class HttpApi:
    """The API's server on its own threads, forwarding to ``service`` on ``loop``."""

    def __init__(self, host: str, port: int, token: str | None, service: JobService,
                 loop: asyncio.AbstractEventLoop, telemetry: Telemetry | None = None,
                 metrics_only: bool = False) -> None:
        """``telemetry``: the figures the dashboard and /metrics show (without it, those routes are
        not served); ``metrics_only``: serve GET /metrics alone, without a token (--metrics-port)."""
        self.token = None if metrics_only else token
        self.service = service
        self.loop = loop
        self.telemetry = telemetry
        self.slots = threading.BoundedSemaphore(MAX_CONCURRENT_REQUESTS)
        handler = type("Handler", (_MetricsHandler if metrics_only else _Handler,), {"api": self})
        self._server = Server((host, port), handler)
        self.address = self._server.server_address[:2]
        self.title = "metrics" if metrics_only else "HTTP API"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True,
                                        name="cloudkon-metrics" if metrics_only else "cloudkon-http")

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def call(self, coroutine: Any) -> Any:
        """Run a service coroutine on the scheduler's loop and wait for its answer."""
        future = asyncio.run_coroutine_threadsafe(coroutine, self.loop)
        try:
            return future.result(ANSWER_TIMEOUT_SECONDS)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise BackendError(f"the scheduler did not answer within {ANSWER_TIMEOUT_SECONDS} s") from None

    def on_loop(self, function: Callable[[], T]) -> T:
        """``function()`` run on the scheduler's loop (what it reads is the loop's), its answer waited for."""
        async def run() -> T:
            return function()
        return self.call(run())


class _Handler(JsonHandler):
    """The API's routes, answered on JsonHandler's requests."""

    api: HttpApi
    routes = ("the API has POST /tasks/submit, GET /tasks/result/{cursor}, POST /jobs/{id}/cancel, "
              "GET /dashboard/state, GET /metrics and the dashboard at GET /")

    def _dispatch(self) -> None:
        path, _, query = self.path.partition("?")
        method, serve, public = self._route(path, query)
        if self.command != method:
            serve = functools.partial(self._wrong_method, method)
        self._answer(serve, public)

    def _route(self, path: str, query: str) -> Route:
        cursor = path.removeprefix(_RESULT_PREFIX)
        cancel = _CANCEL_PATH.fullmatch(path)
        if path == "/tasks/submit":
            return "POST", self._submit, False
        if cursor != path and "/" not in cursor:
            return "GET", lambda body: self._result(cursor, urllib.parse.parse_qs(query)), False
        if cancel is not None:
            return "POST", lambda body: self._cancel(cancel[1], body), False
        if self.api.telemetry is not None and path in ("/dashboard/state", "/metrics"):
            return "GET", self._state if path == "/dashboard/state" else self._metrics, False
        if self.api.telemetry is not None and path in _PAGES:
            return "GET", lambda body: _page(*_PAGES[path]), True
        return self.command, self._no_route, False

    # Every method HTTP defines is answered here (404, or 405 on a known path); any other
    # is refused by http.server with a 501, through send_error.
    do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_TRACE = \
        do_CONNECT = _dispatch  # noqa: N815 (the names http.server calls)

    def _answer(self, serve: Callable[[bytearray | None], Reply], public: bool) -> None:
        headers: dict[str, str] = {}
        try:
            if not public:
                self._check_token()
            body = self.receive_body()
            status, payload = self._in_a_slot(serve, body)
        except HttpFailure as failure:
            self.close_connection = self.close_connection or failure.hang_up
            status, payload, headers = failure.status, failure_body(failure), failure.headers
        except BackendError as exc:
            status, payload = HTTPStatus.SERVICE_UNAVAILABLE, {"status": "failed", "error": str(exc)}
        except Exception:  # a bug: answered and logged, where it would leave the client hanging
            log.exception("HTTP %s %.200s failed", self.command, self.path)
            status, payload = HTTPStatus.INTERNAL_SERVER_ERROR, {"status": "failed", "error": "internal "
                                                                 "error (the scheduler's log says more)"}
        finally:
            self.give_back_body()
        if isinstance(payload, Document):
            self.send_body(status, payload.content_type, payload.data, {**payload.headers, **headers})
        else:
            self.send_json(status, payload, headers)

    def _in_a_slot(self, serve: Callable[[bytearray | None], Reply], body: bytearray | None) -> Reply:
        if not self.api.slots.acquire(blocking=False):
            raise HttpFailure(HTTPStatus.SERVICE_UNAVAILABLE,
                              f"busy: {MAX_CONCURRENT_REQUESTS} requests in progress; try again")
        try:
            return serve(body)
        finally:
            self.api.slots.release()

    def _check_token(self) -> None:
        token = self.api.token
        if token is None:
            return
        given = self.headers.get("Authorization", "")
        if not (given.startswith("Bearer ") and hmac.compare_digest(given[7:].encode(), token.encode())):
            # a stranger's body is not worth reading
            raise HttpFailure(HTTPStatus.UNAUTHORIZED, "missing or wrong token (Authorization: Bearer TOKEN)",
                              hang_up=True, headers={"WWW-Authenticate": "Bearer"})

    def _no_route(self, body: bytearray | None) -> Reply:
        raise HttpFailure(HTTPStatus.NOT_FOUND, f"no route {self.command} {self.path}; {self.routes}")

    def _wrong_method(self, allowed: str, body: bytearray | None) -> Reply:
        raise HttpFailure(HTTPStatus.METHOD_NOT_ALLOWED, f"{self.command} is not served on {self.path}, "
                          f"only {allowed}; {self.routes}", headers={"Allow": allowed})

    def _state(self, body: bytearray | None) -> Reply:
        assert self.api.telemetry is not None, "routed only with telemetry"
        return HTTPStatus.OK, self.api.on_loop(self.api.telemetry.dashboard_state)

    def _metrics(self, body: bytearray | None) -> Reply:
        telemetry = self.api.telemetry
        assert telemetry is not None, "routed only with telemetry"
        text = self.api.on_loop(lambda: exposition(telemetry.families()))
        return HTTPStatus.OK, Document(CONTENT_TYPE, text, {"Cache-Control": "no-cache"})

    def _cancel(self, job_id: str, data: bytearray | None) -> Reply:
        if data and _parse_json(data) != {}:
            raise HttpFailure(HTTPStatus.BAD_REQUEST, "a cancel takes no body, or {}")
        try:
            count = self.api.call(_cancel_job(self.api.service, job_id))
        except BadRequest as exc:
            raise HttpFailure(HTTPStatus.NOT_FOUND, str(exc)) from None
        if count is None:
            return HTTPStatus.OK, {"status": "ok", "already": "finished"}
        log.info("job %s: cancelled over HTTP, %d task(s)", job_id, count)
        return HTTPStatus.OK, {"status": "ok", "cancelled": count}

    def _submit(self, data: bytearray | None) -> Reply:
        if data is None:
            raise HttpFailure(HTTPStatus.LENGTH_REQUIRED, "a request body needs a Content-Length")
        body = _parse_json(data)
        if not isinstance(body, dict) or not isinstance(body.get("tasks"), list):
            raise HttpFailure(HTTPStatus.BAD_REQUEST, 'the body must be {"count": N, "tasks": [...]}')
        count, tasks = body.get("count"), body["tasks"]
        if type(count) is not int:
            raise HttpFailure(HTTPStatus.BAD_REQUEST, '"count" is required: the number of tasks sent, a '
                              'whole number (it guards against a body cut short)')
        if count != len(tasks):
            raise HttpFailure(HTTPStatus.BAD_REQUEST, f"count is {count} but {len(tasks)} tasks were sent")
        try:
            cursor = self.api.call(self.api.service.submit_job(tasks))
        except BadRequest as exc:
            raise HttpFailure(_STATUS_OF_CODE.get(exc.code, HTTPStatus.BAD_REQUEST), str(exc)) from None
        log.info("job %s: %d tasks submitted over HTTP", cursor, count)
        return HTTPStatus.OK, {"status": "ok", "cursor": cursor}

    def _result(self, cursor: str, query: dict[str, list[str]]) -> Reply:
        offset, limit = _query_number(query, "offset", 0, 0), _query_number(query, "limit", None, 1)
        report = self.api.call(self.api.service.job_report(cursor))
        if report is None:
            raise HttpFailure(HTTPStatus.NOT_FOUND, f"no job with cursor {cursor[:100]!r} (never submitted, "
                              "or its results expired)")
        counts, tasks, batches = report
        if tasks is None:
            return HTTPStatus.OK, {"status": "not completed", "tasks": [], **counts}
        end = len(tasks) if limit is None else min(len(tasks), offset + limit)
        page = {} if offset == 0 and end == len(tasks) else \
            {"offset": offset, "next_offset": end if end < len(tasks) else None}
        return HTTPStatus.OK, {"status": "completed", "tasks": task_reports(tasks, batches, offset, end),
                               **counts, **page}


class _MetricsHandler(_Handler):
    """The --metrics-port server's one route, without a token (the API's port asks for one)."""

    routes = "this port serves GET /metrics only"

    def _route(self, path: str, query: str) -> Route:
        if path == "/metrics":
            return "GET", self._metrics, True
        return self.command, self._no_route, True


async def _cancel_job(service: JobService, job_id: str) -> int | None:
    """service.cancel_job of the job ``job_id`` names (BadRequest if none), on the scheduler's loop."""
    return await service.cancel_job(service.known_job(job_id))


def _page(name: str, content_type: str) -> Reply:
    """A file of the dashboard's page, read at each request (they are small, and loaded once a visit)."""
    try:
        data = (importlib.resources.files("cloudkon") / "dashboard" / name).read_bytes()
    except OSError:
        raise HttpFailure(HTTPStatus.NOT_FOUND, f"the dashboard's {name} is not installed") from None
    return HTTPStatus.OK, Document(content_type, data, _PAGE_HEADERS)


def _parse_json(data: bytearray) -> Any:
    try:
        return protocol.parse_json(data)
    except ValueError as exc:
        raise HttpFailure(HTTPStatus.BAD_REQUEST, f"the body is not JSON: {exc}") from None


def _query_number(query: dict[str, list[str]], name: str, default: int | None, least: int) -> int | None:
    values = query.get(name)
    if not values:
        return default
    if len(values) > 1:
        raise HttpFailure(HTTPStatus.BAD_REQUEST, f"{name} must be given once")
    return whole_number(values[0], name, least)


def task_reports(tasks: list[str], batches: list[ResultBatch], start: int, end: int) -> list[dict[str, Any]]:
    """One object for each task from ``start`` to ``end`` (not included), in submission order."""
    reports: list[dict[str, Any]] = [{"id": i, "command": tasks[i]} for i in range(start, end)]
    for batch in batches:
        worker = batch.worker
        for task_id, code, output, elapsed, error in zip(batch.ids, batch.exit_codes, batch.outputs,
                                                         batch.elapsed_us, batch.errors, strict=True):
            if not start <= task_id < end:
                continue
            reports[task_id - start] = task_record(task_id, tasks[task_id], code, output, elapsed, worker,
                                                   error, status_key="result")
    return reports
