"""The HTTP API: submit a job and poll for its results with plain HTTP and JSON.

Owns the HTTP side of a scheduler started with ``--http-port``: routes, request
limits, authentication and the JSON shapes, documented in docs/openapi.json:

    POST /tasks/submit            {"count": 2, "tasks": ["sleep 10", "echo hi"]}
                                  -> {"status": "ok", "cursor": "..."}
    GET  /tasks/result/{cursor}   -> {"status": "completed", "tasks": [...]} once every
                                     task is done, {"status": "not completed", ...} before;
                                     ?offset=N&limit=M for a page of the tasks of a big job

Every refusal is JSON too, http.server's own (a malformed request line, an unknown
method) included.  The server is the standard library's threading HTTP server, one
thread per connection, hardened against slow and greedy clients: connections are
capped, a request must arrive within a deadline (a trickle cannot hold a connection),
a body is read outside the slots that answer requests (a slow upload holds no slot)
against a byte budget shared by all connections (memory stays bounded), and an answer
leaves in one write with TCP_NODELAY (no Nagle delay on a kept-alive connection).
Its threads hand every request to the scheduler's event loop (a ``JobService``), so
jobs submitted here are the same jobs as over the TCP protocol, with the same cursors
and the same store.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import errno
import functools
import hmac
import io
import json
import logging
import socket
import threading
import time
import urllib.parse
from collections.abc import Callable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Protocol

from cloudkon import protocol
from cloudkon.errors import BackendError, BadRequest
from cloudkon.tasks import ResultBatch, task_status

log = logging.getLogger("cloudkon.http")

# Largest request body accepted, checked against Content-Length before reading:
# about a million short tasks.
MAX_REQUEST_BYTES = 64 * 1024 * 1024
# Request bodies held at once by all connections, taken a chunk at a time before reading
# it: bounds memory when many clients upload at once (more wait for a 503 and try again).
MAX_BODY_BYTES_HELD = 4 * MAX_REQUEST_BYTES
# Request line and headers: ample for any client (http.server alone allows 100 lines of 64 KiB).
MAX_HEAD_BYTES = 64 * 1024
# Connections served at once, a thread each; more are answered 503 and closed at once.
MAX_CONNECTIONS = 128
# After accept fails for want of file descriptors, wait this long before the next try.
ACCEPT_RETRY_SECONDS = 1.0
# Requests answered at once (parsing a body, asking the scheduler); more are answered 503
# at once rather than queued.  A request takes its slot once its body has arrived.
MAX_CONCURRENT_REQUESTS = 8
# A connection (kept alive or new) on which no request starts within this is closed.
IDLE_SECONDS = 30
# From its first byte, a request's line, headers and body must arrive within this...
REQUEST_DEADLINE_SECONDS = 20
# ...plus a second for every this many bytes received: a big body over a slow link fits,
# a trickle (slow loris) does not.
MIN_UPLOAD_BYTES_PER_SECOND = 256 * 1024
# A client that takes none of its answer for this long is dropped.
SEND_TIMEOUT_SECONDS = 60
# Longest wait for the scheduler's answer (reading a big job's results from the store).
ANSWER_TIMEOUT_SECONDS = 300
# A Content-Length, offset or limit longer than this is refused before int() reads it.
MAX_NUMBER_DIGITS = 18

# A body is read, and taken from MAX_BODY_BYTES_HELD, this much at a time.
_BODY_CHUNK_BYTES = 1024 * 1024
# The answer's headers and a small body leave in one write (see _Handler.setup).
_ANSWER_BUFFER_BYTES = 64 * 1024
# A lone surrogate escape ("\ud800") is valid JSON but no valid text: a task holding one
# could not be stored or sent to a worker.  A pair is fine.
_RESULT_PREFIX = "/tasks/result/"
_ROUTES = "the API has POST /tasks/submit and GET /tasks/result/{cursor}"

# A job's counts ("total", "done", "failed"), tasks (None until it has finished) and results.
JobReport = tuple[dict[str, int], list[str] | None, list[ResultBatch]]
# An answer: its status and JSON body.
Reply = tuple[HTTPStatus, dict[str, Any]]

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
    """Raised inside a request to answer it with an HTTP error; ``hang_up`` when the
    connection cannot carry another request (its body is unread, or its bytes unknown)."""

    def __init__(self, status: HTTPStatus, error: str, hang_up: bool = False,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(error)
        self.status = status
        self.hang_up = hang_up
        self.headers = headers or {}


class _ByteBudget:
    """Bytes the server's threads may hold at once: taken before allocating, given back after."""

    def __init__(self, total: int) -> None:
        self._left = total
        self._lock = threading.Lock()

    def take(self, count: int) -> bool:
        with self._lock:
            if count > self._left:
                return False
            self._left -= count
            return True

    def give(self, count: int) -> None:
        with self._lock:
            self._left += count


class HttpApi:
    """The API's server on its own threads, forwarding to ``service`` on ``loop``."""

    def __init__(self, host: str, port: int, token: str | None, service: JobService,
                 loop: asyncio.AbstractEventLoop) -> None:
        self.token = token
        self.service = service
        self.loop = loop
        self.slots = threading.BoundedSemaphore(MAX_CONCURRENT_REQUESTS)
        self.body_bytes = _ByteBudget(MAX_BODY_BYTES_HELD)
        handler = type("Handler", (_Handler,), {"api": self})
        self._server = _Server((host, port), handler)
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


class _Server(ThreadingHTTPServer):
    """http.server's threading server with at most MAX_CONNECTIONS connections at once."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler]) -> None:
        super().__init__(address, handler)
        self._connections = threading.BoundedSemaphore(MAX_CONNECTIONS)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._connections.acquire(blocking=False):
            _turn_away(request)
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:  # no thread started: nothing else gives the place back
            self._connections.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._connections.release()

    def get_request(self) -> tuple[socket.socket, Any]:
        try:
            return super().get_request()
        except OSError as exc:
            # Out of file descriptors (or buffers): the listening socket stays readable, so
            # returning at once would spin; pause, and say so once per pause at most.
            if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                log.error("HTTP API: cannot accept a connection: %s; trying again in %g s",
                          exc.strerror, ACCEPT_RETRY_SECONDS)
                time.sleep(ACCEPT_RETRY_SECONDS)
            raise

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client gone mid-request (reset, broken pipe) is no news; anything else is logged
        # by _Handler._answer before it gets here.
        log.debug("HTTP connection from %s ended in error", client_address, exc_info=True)


def _turn_away(sock: socket.socket) -> None:
    """Answer a connection over MAX_CONNECTIONS with a 503, without ever waiting on it
    (this runs on the thread that accepts connections)."""
    body = json.dumps({"status": "failed", "error": f"busy: {MAX_CONNECTIONS} connections are open; "
                       "try again"}).encode()
    head = (f"HTTP/1.1 503 {HTTPStatus.SERVICE_UNAVAILABLE.phrase}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
    sock.setblocking(False)
    with contextlib.suppress(OSError):
        sock.send(head + body)  # small: an empty send buffer takes it whole
        sock.recv(MAX_HEAD_BYTES)  # closing on unread bytes would reset the connection, answer and all


class _RequestReader(io.RawIOBase):
    """A connection's bytes as http.server reads them, within the current request's deadline
    (408) and, until its headers have ended, MAX_HEAD_BYTES (431)."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self.next_request()

    def next_request(self) -> None:
        """Start the clock for the next request: idle until its first byte."""
        self.first_byte_at: float | None = None
        self.received = 0
        self.in_head = True

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        room = len(buffer)
        if self.in_head:
            room = min(room, MAX_HEAD_BYTES - self.received)
            if room <= 0:
                raise _Failure(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, "the request line and headers "
                               f"are over {MAX_HEAD_BYTES} bytes", hang_up=True)
        self._sock.settimeout(self._time_left())
        try:
            count = self._sock.recv_into(buffer, room)
        except TimeoutError:
            raise self._too_slow() from None
        if self.first_byte_at is None:
            self.first_byte_at = time.monotonic()
        self.received += count
        return count

    def _time_left(self) -> float:
        if self.first_byte_at is None:
            return IDLE_SECONDS
        deadline = self.first_byte_at + REQUEST_DEADLINE_SECONDS + self.received / MIN_UPLOAD_BYTES_PER_SECOND
        left = deadline - time.monotonic()
        if left <= 0:
            raise self._too_slow()
        return left

    def _too_slow(self) -> _Failure:
        return _Failure(HTTPStatus.REQUEST_TIMEOUT, f"the request did not arrive in time: it has "
                        f"{REQUEST_DEADLINE_SECONDS} s from its first byte, plus 1 s for every "
                        f"{MIN_UPLOAD_BYTES_PER_SECOND} bytes sent", hang_up=True)


class _Handler(BaseHTTPRequestHandler):
    api: HttpApi
    protocol_version = "HTTP/1.1"
    server_version = "CloudKon"
    # Every answer carries its status line and headers: with http.server's default (HTTP/0.9)
    # a request line it could not read was answered with a bare body.
    default_request_version = "HTTP/1.1"

    def setup(self) -> None:
        self.connection = self.request
        # An answer is written once, when complete (a buffered wfile, flushed per answer), and
        # leaves at once: with Nagle's algorithm a kept-alive client's delayed ACK held the
        # tail of every answer back 40 ms.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, True)
        self.reader = _RequestReader(self.connection)
        self.rfile = io.BufferedReader(self.reader)
        self.wfile = self.connection.makefile("wb", _ANSWER_BUFFER_BYTES)
        self._held = 0  # bytes of this request's body taken from the api's budget

    def handle_one_request(self) -> None:
        self.reader.next_request()
        self.command = self.request_version = self.requestline = ""  # until this request's line is read
        try:
            super().handle_one_request()
        except _Failure as failure:  # from the reader, before the headers ended
            self.close_connection = True
            if self.reader.received:  # a connection that sent nothing is closed without a word
                self._send_json(failure.status, _failure_body(failure), failure.headers)

    def parse_request(self) -> bool:
        parsed = super().parse_request()
        self.reader.in_head = False
        return parsed

    def handle_expect_100(self) -> bool:
        super().handle_expect_100()
        self.wfile.flush()  # the client waits for it before sending the body
        return True

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """http.server's own refusals (a malformed request line, too many headers, an unknown
        method), in the API's JSON."""
        self.log_error("code %d, message %s", code, message)
        self.close_connection = True
        status = HTTPStatus(code)
        self._send_json(status, {"status": "failed", "error": message or status.phrase}, {})

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
            body = self._receive_body()
            status, payload = self._in_a_slot(serve, body)
        except _Failure as failure:
            self.close_connection = self.close_connection or failure.hang_up
            status, payload, headers = failure.status, _failure_body(failure), failure.headers
        except BackendError as exc:
            status, payload = HTTPStatus.SERVICE_UNAVAILABLE, {"status": "failed", "error": str(exc)}
        except Exception:  # a bug: answered and logged, where it would leave the client hanging
            log.exception("HTTP %s %.200s failed", self.command, self.path)
            status, payload = HTTPStatus.INTERNAL_SERVER_ERROR, {"status": "failed", "error": "internal "
                                                                 "error (the scheduler's log says more)"}
        finally:
            self.api.body_bytes.give(self._held)
            self._held = 0
        self._send_json(status, payload, headers)

    def _in_a_slot(self, serve: Callable[[bytearray | None], Reply], body: bytearray | None) -> Reply:
        if not self.api.slots.acquire(blocking=False):
            raise _Failure(HTTPStatus.SERVICE_UNAVAILABLE,
                           f"busy: {MAX_CONCURRENT_REQUESTS} requests in progress; try again")
        try:
            return serve(body)
        finally:
            self.api.slots.release()

    def _send_json(self, status: HTTPStatus, payload: dict[str, Any], headers: dict[str, str]) -> None:
        data = json.dumps(payload).encode()
        self.connection.settimeout(SEND_TIMEOUT_SECONDS)
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for name, value in headers.items():
            self.send_header(name, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)
        self.wfile.flush()

    def _check_token(self) -> None:
        token = self.api.token
        if token is None:
            return
        given = self.headers.get("Authorization", "")
        if not (given.startswith("Bearer ") and hmac.compare_digest(given[7:].encode(), token.encode())):
            # a stranger's body is not worth reading
            raise _Failure(HTTPStatus.UNAUTHORIZED, "missing or wrong token (Authorization: Bearer TOKEN)",
                           hang_up=True, headers={"WWW-Authenticate": "Bearer"})

    def _receive_body(self) -> bytearray | None:
        """The request's body (None without a Content-Length), read a chunk at a time, each
        taken from the api's byte budget first."""
        if "Transfer-Encoding" in self.headers:
            raise _Failure(HTTPStatus.LENGTH_REQUIRED, "send the body with a Content-Length (chunked "
                           "transfer encoding is not supported)", hang_up=True)
        lengths = {value.strip() for value in self.headers.get_all("Content-Length", [])}
        if not lengths:
            return None
        if len(lengths) > 1:
            raise _Failure(HTTPStatus.BAD_REQUEST, "the request has Content-Length headers that differ",
                           hang_up=True)
        length = _whole_number(lengths.pop(), "Content-Length", 0, hang_up=True)
        if length > MAX_REQUEST_BYTES:
            raise _Failure(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                           f"request body of {length} bytes is over the limit of {MAX_REQUEST_BYTES}",
                           hang_up=True)
        body = bytearray()
        while len(body) < length:
            chunk = min(_BODY_CHUNK_BYTES, length - len(body))
            if not self.api.body_bytes.take(chunk):
                raise _Failure(HTTPStatus.SERVICE_UNAVAILABLE, "busy: other requests' bodies fill the "
                               f"{MAX_BODY_BYTES_HELD} bytes held at once; try again", hang_up=True)
            self._held += chunk
            data = self.rfile.read(chunk)
            if len(data) < chunk:
                raise _Failure(HTTPStatus.BAD_REQUEST, "the body ended before its Content-Length",
                               hang_up=True)
            body += data
        return body

    def _no_route(self, body: bytearray | None) -> Reply:
        raise _Failure(HTTPStatus.NOT_FOUND, f"no route {self.command} {self.path}; {_ROUTES}")

    def _wrong_method(self, allowed: str, body: bytearray | None) -> Reply:
        raise _Failure(HTTPStatus.METHOD_NOT_ALLOWED, f"{self.command} is not served on {self.path}, "
                       f"only {allowed}; {_ROUTES}", headers={"Allow": allowed})

    def _submit(self, data: bytearray | None) -> Reply:
        if data is None:
            raise _Failure(HTTPStatus.LENGTH_REQUIRED, "a request body needs a Content-Length")
        body = _parse_json(data)
        if not isinstance(body, dict) or not isinstance(body.get("tasks"), list):
            raise _Failure(HTTPStatus.BAD_REQUEST, 'the body must be {"count": N, "tasks": [...]}')
        count, tasks = body.get("count"), body["tasks"]
        if type(count) is not int:
            raise _Failure(HTTPStatus.BAD_REQUEST, '"count" is required: the number of tasks sent, a '
                           'whole number (it guards against a body cut short)')
        if count != len(tasks):
            raise _Failure(HTTPStatus.BAD_REQUEST, f"count is {count} but {len(tasks)} tasks were sent")
        try:
            cursor = self.api.call(self.api.service.submit_job(tasks))
        except BadRequest as exc:
            raise _Failure(_STATUS_OF_CODE.get(exc.code, HTTPStatus.BAD_REQUEST), str(exc)) from None
        log.info("job %s: %d tasks submitted over HTTP", cursor, count)
        return HTTPStatus.OK, {"status": "ok", "cursor": cursor}

    def _result(self, cursor: str, query: dict[str, list[str]]) -> Reply:
        offset, limit = _query_number(query, "offset", 0, 0), _query_number(query, "limit", None, 1)
        report = self.api.call(self.api.service.job_report(cursor))
        if report is None:
            raise _Failure(HTTPStatus.NOT_FOUND, f"no job with cursor {cursor[:100]!r} (never submitted, "
                           "or its results expired)")
        counts, tasks, batches = report
        if tasks is None:
            return HTTPStatus.OK, {"status": "not completed", "tasks": [], **counts}
        end = len(tasks) if limit is None else min(len(tasks), offset + limit)
        page = {} if offset == 0 and end == len(tasks) else \
            {"offset": offset, "next_offset": end if end < len(tasks) else None}
        return HTTPStatus.OK, {"status": "completed", "tasks": task_reports(tasks, batches, offset, end),
                               **counts, **page}

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (http.server's name)
        log.debug("%s %s", self.address_string(), format % args)


def _failure_body(failure: _Failure) -> dict[str, Any]:
    return {"status": "failed", "error": str(failure)}


def _parse_json(data: bytearray) -> Any:
    try:
        return protocol.parse_json(data)
    except ValueError as exc:
        raise _Failure(HTTPStatus.BAD_REQUEST, f"the body is not JSON: {exc}") from None


def _whole_number(text: str, name: str, least: int, hang_up: bool = False) -> int:
    """``text`` as a whole number of at least ``least``, its digits counted before int() reads them."""
    if not (text.isascii() and text.isdigit() and len(text) <= MAX_NUMBER_DIGITS and int(text) >= least):
        raise _Failure(HTTPStatus.BAD_REQUEST, f"{name} must be a whole number, at least {least} and at "
                       f"most {MAX_NUMBER_DIGITS} digits long", hang_up=hang_up)
    return int(text)


def _query_number(query: dict[str, list[str]], name: str, default: int | None, least: int) -> int | None:
    values = query.get(name)
    if not values:
        return default
    if len(values) > 1:
        raise _Failure(HTTPStatus.BAD_REQUEST, f"{name} must be given once")
    return _whole_number(values[0], name, least)


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
