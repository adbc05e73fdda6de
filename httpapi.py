"""The HTTP API: submit a job and poll for its results with plain HTTP and JSON.

Owns the HTTP side of a scheduler started with ``--http-port``: routes, request
limits, authentication and the JSON shapes, documented in docs/openapi.json:

    POST /tasks/submit            {"count": 2, "tasks": ["sleep 10", "echo hi"]}
                                  -> {"status": "ok", "cursor": "..."}
    GET  /tasks/result/{cursor}   -> {"status": "completed", "tasks": [...]} once every
                                     task is done, {"status": "not completed", ...} before;
                                     ?offset=N&limit=M for a page of the tasks of a big job

The server is the standard library's threading HTTP server; its threads hand every
request to the scheduler's event loop (a ``JobService``), so jobs submitted here are
the same jobs as over the TCP protocol, with the same cursors and the same store.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hmac
import json
import logging
import threading
import urllib.parse
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Protocol

from errors import BackendError, BadRequest
from tasks import ResultBatch, task_status

log = logging.getLogger("cloudkon.http")

# Largest request body accepted, checked against Content-Length before reading:
# about a million short tasks.
MAX_REQUEST_BYTES = 64 * 1024 * 1024
# Requests handled at once (each may hold a body of up to MAX_REQUEST_BYTES); more are
# answered 503 at once rather than queued.
MAX_CONCURRENT_REQUESTS = 8
# A client this slow to send its request (or silent on a kept-alive connection) is dropped.
SOCKET_TIMEOUT_SECONDS = 60
# Longest wait for the scheduler's answer (reading a big job's results from the store).
ANSWER_TIMEOUT_SECONDS = 300

# A job's counts ("total", "done", "failed"), tasks (None until it has finished) and results.
JobReport = tuple[dict[str, int], list[str] | None, list[ResultBatch]]

_STATUS_OF_CODE = {"too_large": HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                   "shutting_down": HTTPStatus.SERVICE_UNAVAILABLE}


class JobService(Protocol):
    """What the API needs of the scheduler (coroutines, run on its event loop)."""

    async def submit_job(self, tasks: list[Any]) -> str:
        """Run ``tasks`` as a new job once it is stored; its cursor.  BadRequest if refused."""

    async def job_report(self, cursor: str) -> JobReport | None:
        """A job's counts, and its tasks and results once it has finished (else None
        and []); None for an unknown cursor."""


class _Failure(Exception):
    """Raised inside a request to answer it with an HTTP error."""

    def __init__(self, status: HTTPStatus, error: str) -> None:
        super().__init__(error)
        self.status = status


class HttpApi:
    """The API's server on its own threads, forwarding to ``service`` on ``loop``."""

    def __init__(self, host: str, port: int, token: str | None, service: JobService,
                 loop: asyncio.AbstractEventLoop) -> None:
        self.token = token
        self.service = service
        self.loop = loop
        self.slots = threading.BoundedSemaphore(MAX_CONCURRENT_REQUESTS)
        handler = type("Handler", (_Handler,), {"api": self})
        self._server = ThreadingHTTPServer((host, port), handler)
        self._server.daemon_threads = True
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


class _Handler(BaseHTTPRequestHandler):
    api: HttpApi
    protocol_version = "HTTP/1.1"
    server_version = "CloudKon"
    timeout = SOCKET_TIMEOUT_SECONDS

    def do_POST(self) -> None:  # noqa: N802 (the name http.server calls)
        self._answer(self._submit if self.path == "/tasks/submit" else self._no_route)

    def do_GET(self) -> None:  # noqa: N802
        prefix = "/tasks/result/"
        path, _, query = self.path.partition("?")
        if path.startswith(prefix) and "/" not in path[len(prefix):]:
            self._answer(lambda: self._result(path[len(prefix):], urllib.parse.parse_qs(query)))
        else:
            self._answer(self._no_route)

    def _method_not_allowed(self) -> None:
        self._answer(self._no_method)

    do_PUT = do_DELETE = do_PATCH = _method_not_allowed  # noqa: N815

    def _answer(self, route: Any) -> None:
        slot = self.api.slots.acquire(blocking=False)
        try:
            if not slot:
                self.close_connection = True  # its body, if any, is left unread
                raise _Failure(HTTPStatus.SERVICE_UNAVAILABLE,
                               f"busy: {MAX_CONCURRENT_REQUESTS} requests in progress; try again")
            self._check_token()
            status, body = route()
        except _Failure as failure:
            status, body = failure.status, {"status": "failed", "error": str(failure)}
        except BackendError as exc:
            status, body = HTTPStatus.SERVICE_UNAVAILABLE, {"status": "failed", "error": str(exc)}
        finally:
            if slot:
                self.api.slots.release()
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if status == HTTPStatus.UNAUTHORIZED:
            self.send_header("WWW-Authenticate", "Bearer")
        self.end_headers()
        self.wfile.write(data)

    def _check_token(self) -> None:
        token = self.api.token
        if token is None:
            return
        given = self.headers.get("Authorization", "")
        if not (given.startswith("Bearer ") and hmac.compare_digest(given[7:].encode(), token.encode())):
            self.close_connection = True  # a stranger's body is not worth reading
            raise _Failure(HTTPStatus.UNAUTHORIZED, "missing or wrong token (Authorization: Bearer TOKEN)")

    def _no_route(self) -> tuple[HTTPStatus, dict[str, Any]]:
        self._discard_body()
        raise _Failure(HTTPStatus.NOT_FOUND, f"no route {self.command} {self.path}; the API has "
                       "POST /tasks/submit and GET /tasks/result/{cursor}")

    def _no_method(self) -> tuple[HTTPStatus, dict[str, Any]]:
        self._discard_body()
        raise _Failure(HTTPStatus.METHOD_NOT_ALLOWED, f"{self.command} is not served here; the API "
                       "has POST /tasks/submit and GET /tasks/result/{cursor}")

    def _submit(self) -> tuple[HTTPStatus, dict[str, Any]]:
        body = self._read_json()
        if not isinstance(body, dict) or not isinstance(body.get("tasks"), list):
            raise _Failure(HTTPStatus.BAD_REQUEST, 'the body must be {"count": N, "tasks": [...]}')
        count, tasks = body.get("count"), body["tasks"]
        if type(count) is not int or count != len(tasks):
            raise _Failure(HTTPStatus.BAD_REQUEST, f"count is {count!r} but {len(tasks)} tasks were sent")
        try:
            cursor = self.api.call(self.api.service.submit_job(tasks))
        except BadRequest as exc:
            raise _Failure(_STATUS_OF_CODE.get(exc.code, HTTPStatus.BAD_REQUEST), str(exc)) from None
        log.info("job %s: %d tasks submitted over HTTP", cursor, count)
        return HTTPStatus.OK, {"status": "ok", "cursor": cursor}

    def _result(self, cursor: str, query: dict[str, list[str]]) -> tuple[HTTPStatus, dict[str, Any]]:
        offset, limit = _query_number(query, "offset", 0), _query_number(query, "limit", None)
        report = self.api.call(self.api.service.job_report(cursor))
        if report is None:
            raise _Failure(HTTPStatus.NOT_FOUND, f"no job with cursor {cursor!r} (never submitted, "
                           "or its results expired)")
        counts, tasks, batches = report
        if tasks is None:
            return HTTPStatus.OK, {"status": "not completed", "tasks": [], **counts}
        end = len(tasks) if limit is None else min(len(tasks), offset + limit)
        page = {} if offset == 0 and end == len(tasks) else \
            {"offset": offset, "next_offset": end if end < len(tasks) else None}
        return HTTPStatus.OK, {"status": "completed", "tasks": task_reports(tasks, batches, offset, end),
                               **counts, **page}

    def _read_json(self) -> Any:
        length = self.headers.get("Content-Length")
        if length is None or not (length.isascii() and length.isdigit()):
            raise _Failure(HTTPStatus.LENGTH_REQUIRED, "a request body needs a Content-Length")
        if int(length) > MAX_REQUEST_BYTES:
            self.close_connection = True  # the body is left unread
            raise _Failure(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                           f"request body of {length} bytes is over the limit of {MAX_REQUEST_BYTES}")
        data = self.rfile.read(int(length))
        try:
            return json.loads(data)
        except (UnicodeDecodeError, ValueError) as exc:
            raise _Failure(HTTPStatus.BAD_REQUEST, f"the body is not JSON: {exc}") from None
        except RecursionError:
            raise _Failure(HTTPStatus.BAD_REQUEST, "the body is JSON nested too deeply") from None

    def _discard_body(self) -> None:
        length = self.headers.get("Content-Length", "0")
        if length.isascii() and length.isdigit() and int(length) <= MAX_REQUEST_BYTES:
            self.rfile.read(int(length))
        else:
            self.close_connection = True

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (http.server's name)
        log.debug("%s %s", self.address_string(), format % args)


def _query_number(query: dict[str, list[str]], name: str, default: int | None) -> int | None:
    values = query.get(name)
    if not values:
        return default
    if len(values) > 1 or not (values[0].isascii() and values[0].isdigit()):
        raise _Failure(HTTPStatus.BAD_REQUEST, f"{name} must be one whole number")
    return int(values[0])


def task_reports(tasks: list[str], batches: list[ResultBatch], start: int, end: int) -> list[dict[str, Any]]:
    """One object for each task from ``start`` to ``end`` (not included), in submission order."""
    reports: list[dict[str, Any]] = [{"id": i, "command": tasks[i]} for i in range(start, end)]
    for batch in batches:
        worker = batch.worker
        for task_id, code, output, elapsed, error in zip(batch.ids, batch.exit_codes, batch.outputs,
                                                         batch.elapsed_us, batch.errors, strict=True):
            if not start <= task_id < end:
                continue
            report = reports[task_id - start]
            report.update(result=task_status(code, error), exit_code=code,
                          output=output, elapsed_ms=elapsed / 1000, worker=worker)
            if error is not None:
                report["error"] = error
    return reports
