"""The HTTP API: submit a job and poll for its results with plain HTTP and JSON.

Owns the routes of a scheduler started with ``--http-port``, their authentication, the
requests answered at once and the JSON shapes, documented in docs/openapi.json:

    POST /tasks/submit            {"count": 2, "tasks": ["sleep 10", "echo hi"]}
                                  -> {"status": "ok", "cursor": "..."}
    GET  /tasks/result/{cursor}   -> {"status": "completed", "tasks": [...]} once every
                                     task is done, {"status": "not completed", ...} before;
                                     ?offset=N&limit=M for a page of the tasks of a big job

Every refusal is JSON too.  The server under the routes, hardened against slow and greedy
clients (connections capped, request deadlines, head and body limits, a byte budget for
bodies), is httpserver.py's; a body is read before its request takes one of the
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
import logging
import threading
import urllib.parse
from collections.abc import Callable
from http import HTTPStatus
from typing import Any

from cloudkon import protocol
from cloudkon.errors import BackendError, BadRequest
from cloudkon.httpserver import HttpFailure, JsonHandler, Server, failure_body, whole_number
from cloudkon.results import task_record
from cloudkon.service import JobService
from cloudkon.tasks import ResultBatch

log = logging.getLogger("cloudkon.http")

# Requests answered at once (parsing a body, asking the scheduler); more are answered 503
# at once rather than queued.  A request takes its slot once its body has arrived.
MAX_CONCURRENT_REQUESTS = 8
# Longest wait for the scheduler's answer (reading a big job's results from the store).
ANSWER_TIMEOUT_SECONDS = 300

_RESULT_PREFIX = "/tasks/result/"
_ROUTES = "the API has POST /tasks/submit and GET /tasks/result/{cursor}"

# An answer: its status and JSON body.
Reply = tuple[HTTPStatus, dict[str, Any]]

_STATUS_OF_CODE = {"too_large": HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                   "shutting_down": HTTPStatus.SERVICE_UNAVAILABLE}


class HttpApi:
    """The API's server on its own threads, forwarding to ``service`` on ``loop``."""

    def __init__(self, host: str, port: int, token: str | None, service: JobService,
                 loop: asyncio.AbstractEventLoop) -> None:
        self.token = token
        self.service = service
        self.loop = loop
        self.slots = threading.BoundedSemaphore(MAX_CONCURRENT_REQUESTS)
        handler = type("Handler", (_Handler,), {"api": self})
        self._server = Server((host, port), handler)
        self.address = self._server.server_address[:2]
        self._thread = threading.Thread(target=self._server.serve_forever, name="cloudkon-http",
                                        daemon=True)

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


class _Handler(JsonHandler):
    """The API's routes, answered on JsonHandler's requests."""

    api: HttpApi

    def _dispatch(self) -> None:
        path, _, query = self.path.partition("?")
        cursor = path.removeprefix(_RESULT_PREFIX)
        serve: Callable[[bytearray | None], Reply]
        if path == "/tasks/submit":
            method, serve = "POST", self._submit
        elif cursor != path and "/" not in cursor:
            method, serve = "GET", lambda body: self._result(cursor, urllib.parse.parse_qs(query))
        else:
            method, serve = self.command, self._no_route
        if self.command != method:
            serve = functools.partial(self._wrong_method, method)
        self._answer(serve)

    # Every method HTTP defines is answered here (404, or 405 on a known path); any other
    # is refused by http.server with a 501, through send_error.
    do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_TRACE = \
        do_CONNECT = _dispatch  # noqa: N815 (the names http.server calls)

    def _answer(self, serve: Callable[[bytearray | None], Reply]) -> None:
        headers: dict[str, str] = {}
        try:
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
        raise HttpFailure(HTTPStatus.NOT_FOUND, f"no route {self.command} {self.path}; {_ROUTES}")

    def _wrong_method(self, allowed: str, body: bytearray | None) -> Reply:
        raise HttpFailure(HTTPStatus.METHOD_NOT_ALLOWED, f"{self.command} is not served on {self.path}, "
                          f"only {allowed}; {_ROUTES}", headers={"Allow": allowed})

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
