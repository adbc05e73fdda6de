"""The HTTP server under the API: connections, request reading and byte budgets.

Owns what keeps the standard library's threading HTTP server (one thread per connection)
safe from slow and greedy clients, whatever the routes: connections are capped (more are
answered 503 at once), a request must arrive within a deadline (a trickle cannot hold a
connection), its line and headers within MAX_HEAD_BYTES, and its body, with a
Content-Length only, within MAX_REQUEST_BYTES, read a chunk at a time against a byte
budget shared by all connections (memory stays bounded).  Every answer, http.server's
own refusals included, is JSON and leaves in one write with TCP_NODELAY (no Nagle delay
on a kept-alive connection).  The routes, authentication and the API's JSON shapes are
httpapi.py's.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import logging
import socket
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

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
# A connection (kept alive or new) on which no request starts within this is closed.
IDLE_SECONDS = 30
# From its first byte, a request's line, headers and body must arrive within this...
REQUEST_DEADLINE_SECONDS = 20
# ...plus a second for every this many bytes received: a big body over a slow link fits,
# a trickle (slow loris) does not.
MIN_UPLOAD_BYTES_PER_SECOND = 256 * 1024
# A client that takes none of its answer for this long is dropped.
SEND_TIMEOUT_SECONDS = 60
# A Content-Length, offset or limit longer than this is refused before int() reads it.
MAX_NUMBER_DIGITS = 18

# A body is read, and taken from MAX_BODY_BYTES_HELD, this much at a time.
_BODY_CHUNK_BYTES = 1024 * 1024
# The answer's headers and a small body leave in one write (see JsonHandler.setup).
_ANSWER_BUFFER_BYTES = 64 * 1024


class HttpFailure(Exception):
    """Raised inside a request to answer it with an HTTP error; ``hang_up`` when the
    connection cannot carry another request (its body is unread, or its bytes unknown)."""

    def __init__(self, status: HTTPStatus, error: str, hang_up: bool = False,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(error)
        self.status = status
        self.hang_up = hang_up
        self.headers = headers or {}


class ByteBudget:
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


class Server(ThreadingHTTPServer):
    """http.server's threading server with at most MAX_CONNECTIONS connections at once, and
    the budget of MAX_BODY_BYTES_HELD their request bodies share."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler]) -> None:
        super().__init__(address, handler)
        self._connections = threading.BoundedSemaphore(MAX_CONNECTIONS)
        self.body_bytes = ByteBudget(MAX_BODY_BYTES_HELD)

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
        # by the API's handler (httpapi._Handler._answer) before it gets here.
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
                raise HttpFailure(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, "the request line and headers "
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

    def _too_slow(self) -> HttpFailure:
        return HttpFailure(HTTPStatus.REQUEST_TIMEOUT, f"the request did not arrive in time: it has "
                           f"{REQUEST_DEADLINE_SECONDS} s from its first byte, plus 1 s for every "
                           f"{MIN_UPLOAD_BYTES_PER_SECOND} bytes sent", hang_up=True)


class JsonHandler(BaseHTTPRequestHandler):
    """http.server's request handler reading requests within the limits above and answering
    in JSON; the routes are a subclass's (its ``do_*`` methods)."""

    server: Server
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
        self._held = 0  # bytes of this request's body taken from the server's budget

    def handle_one_request(self) -> None:
        self.reader.next_request()
        self.command = self.request_version = self.requestline = ""  # until this request's line is read
        try:
            super().handle_one_request()
        except HttpFailure as failure:  # from the reader, before the headers ended
            self.close_connection = True
            if self.reader.received:  # a connection that sent nothing is closed without a word
                self.send_json(failure.status, failure_body(failure), failure.headers)

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
        self.send_json(status, {"status": "failed", "error": message or status.phrase}, {})

    def send_json(self, status: HTTPStatus, payload: dict[str, Any], headers: dict[str, str]) -> None:
        self.send_body(status, "application/json", json.dumps(payload).encode(), headers)

    def send_body(self, status: HTTPStatus, content_type: str, data: bytes, headers: dict[str, str]) -> None:
        """An answer of any type (the dashboard's files, the metrics' text) in the same single write."""
        self.connection.settimeout(SEND_TIMEOUT_SECONDS)
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        for name, value in headers.items():
            self.send_header(name, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)
        self.wfile.flush()

    def receive_body(self) -> bytearray | None:
        """The request's body (None without a Content-Length), read a chunk at a time, each
        taken from the server's byte budget first."""
        if "Transfer-Encoding" in self.headers:
            raise HttpFailure(HTTPStatus.LENGTH_REQUIRED, "send the body with a Content-Length (chunked "
                              "transfer encoding is not supported)", hang_up=True)
        lengths = {value.strip() for value in self.headers.get_all("Content-Length", [])}
        if not lengths:
            return None
        if len(lengths) > 1:
            raise HttpFailure(HTTPStatus.BAD_REQUEST, "the request has Content-Length headers that differ",
                              hang_up=True)
        length = whole_number(lengths.pop(), "Content-Length", 0, hang_up=True)
        if length > MAX_REQUEST_BYTES:
            raise HttpFailure(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                              f"request body of {length} bytes is over the limit of {MAX_REQUEST_BYTES}",
                              hang_up=True)
        body = bytearray()
        while len(body) < length:
            chunk = min(_BODY_CHUNK_BYTES, length - len(body))
            if not self.server.body_bytes.take(chunk):
                raise HttpFailure(HTTPStatus.SERVICE_UNAVAILABLE, "busy: other requests' bodies fill the "
                                  f"{MAX_BODY_BYTES_HELD} bytes held at once; try again", hang_up=True)
            self._held += chunk
            data = self.rfile.read(chunk)
            if len(data) < chunk:
                raise HttpFailure(HTTPStatus.BAD_REQUEST, "the body ended before its Content-Length",
                                  hang_up=True)
            body += data
        return body

    def give_back_body(self) -> None:
        """Give the bytes of this request's body back to the server's budget."""
        self.server.body_bytes.give(self._held)
        self._held = 0

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (http.server's name)
        log.debug("%s %s", self.address_string(), format % args)


def failure_body(failure: HttpFailure) -> dict[str, Any]:
    """The JSON body of an answer that refuses a request."""
    return {"status": "failed", "error": str(failure)}


def whole_number(text: str, name: str, least: int, hang_up: bool = False) -> int:
    """``text`` as a whole number of at least ``least``, its digits counted before int() reads them."""
    if not (text.isascii() and text.isdigit() and len(text) <= MAX_NUMBER_DIGITS and int(text) >= least):
        raise HttpFailure(HTTPStatus.BAD_REQUEST, f"{name} must be a whole number, at least {least} and at "
                          f"most {MAX_NUMBER_DIGITS} digits long", hang_up=hang_up)
    return int(text)
