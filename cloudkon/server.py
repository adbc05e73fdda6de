"""The scheduler's TCP server: client connections, their frames in and out, and their limits.

Owns what is particular to a connection: the hello (protocol version, token), the requests
it may make (protocol.py's messages) and the answers queued for it, bounded per connection
(open jobs, pending requests, queued bytes, idle time) and in number (MAX_CONNECTIONS); the
jobs it streams results to, and the call back to a client that asked to hear when its job is
ready.  What a request does is the job service's (service.py): the server is one of its front
ends, the HTTP API (httpapi.py) the other.  Runs on the scheduler's event loop, one coroutine
per connection plus one writing its answers, in order.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
from collections.abc import Callable, Coroutine
from typing import Any

from cloudkon import protocol
from cloudkon.errors import BackendError, BadRequest, CloudKonError, ProtocolError
from cloudkon.jobs import Job
from cloudkon.service import JobService
from cloudkon.tasks import ResultBatch

log = logging.getLogger("cloudkon.scheduler")

# A connection must say hello this soon, so idle sockets cannot pile up.
HELLO_TIMEOUT_SECONDS = 30.0
# Largest frame before hello: a stranger (no token yet) makes the scheduler hold no more.
MAX_HELLO_FRAME_BYTES = 64 * 1024
# Connections served at once; one more is told so and closed.
MAX_CONNECTIONS = 512
# A connection that holds nothing (no job open, none streaming to it, no request pending)
# and sends nothing for this long is closed.
IDLE_TIMEOUT_SECONDS = 900.0
# Jobs one connection may have open (submitting) at once.
MAX_OPEN_JOBS_PER_CONNECTION = 64
# Requests (fetch, cancel) one connection may have pending; past it, it is not read.
MAX_PENDING_REQUESTS = 64
# Answers queued for a connection: past the first, the scheduler stops reading its requests
# and fetches pause until it reads; past the second it is disconnected (its jobs run on).
OUTBOX_PAUSE_BYTES = 8 * 1024 * 1024
MAX_OUTBOX_BYTES = 256 * 1024 * 1024
# Jobs a list_jobs answers with unless it asks for another limit (the newest ones).
DEFAULT_LISTED_JOBS = 1000


# What a connection's outbox holds: a frame, an action, or a frame still to come.
Outgoing = bytes | Callable[[], None] | asyncio.Future


class _Peer:
    """One client connection and the frames queued for it, written in order.

    A callable in the queue runs once everything before it has been written; a
    future holds back what follows until it gives the frame to write.  The queue is
    bounded in bytes (OUTBOX_PAUSE_BYTES, MAX_OUTBOX_BYTES) so that a client that
    does not read cannot make the scheduler hold its answers without end.
    """

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self.writer = writer
        self.address = writer.get_extra_info("peername")
        self.open_jobs: dict[str, Job] = {}
        self.streaming: set[str] = set()  # jobs whose results go to this connection as they come
        self.requests: set[asyncio.Task[None]] = set()
        self.answering = asyncio.Lock()  # one fetch at a time reads a job's results for it
        self.queued_bytes = 0
        self.closed = False
        self._room = asyncio.Event()
        self._room.set()
        self._outbox: asyncio.Queue[Outgoing | None] = asyncio.Queue()
        self._writing = asyncio.create_task(self._write_loop())

    @property
    def idle(self) -> bool:
        """Nothing open, streaming or pending: the connection may be closed without loss."""
        return not (self.open_jobs or self.streaming or self.requests)

    @property
    def name(self) -> str:
        return format_address(*self.address[:2])

    def send(self, item: Outgoing) -> None:
        if self.closed:
            return
        if isinstance(item, bytes):
            self.queued_bytes += len(item)
            if self.queued_bytes > MAX_OUTBOX_BYTES:
                self._drop(f"{self.queued_bytes >> 20} MiB of answers it does not read")
                return
            if self.queued_bytes > OUTBOX_PAUSE_BYTES:
                self._room.clear()
        self._outbox.put_nowait(item)

    def start(self, request: Coroutine[Any, Any, None]) -> None:
        """Run ``request`` (a fetch, a cancel) for this connection, counted as pending."""
        task = asyncio.create_task(request)
        self.requests.add(task)
        task.add_done_callback(self.requests.discard)

    async def room(self) -> None:
        """Until the queue of answers is short enough to add more (at once if closed)."""
        await self._room.wait()

    async def ready_to_read(self) -> None:
        """Until the connection may send another request: it reads its answers, few pending."""
        while not self.closed and (not self._room.is_set() or len(self.requests) >= MAX_PENDING_REQUESTS):
            await self._room.wait()
            if len(self.requests) >= MAX_PENDING_REQUESTS:
                await asyncio.wait(set(self.requests), return_when=asyncio.FIRST_COMPLETED)

    def _drop(self, reason: str) -> None:
        log.warning("%s: disconnected: %s", self.name, reason)
        self.closed = True
        self._outbox = asyncio.Queue()  # frees what was queued
        self._room.set()
        self._writing.cancel()
        self.writer.transport.abort()

    async def close(self, timeout: float = 5.0) -> None:
        self._outbox.put_nowait(None)
        finished, _ = await asyncio.wait({self._writing}, timeout=timeout)
        if not finished:
            self._writing.cancel()

    async def _write_loop(self) -> None:
        try:
            while (item := await self._outbox.get()) is not None:
                counted = isinstance(item, bytes)  # a frame a future gives was not counted in send
                if isinstance(item, asyncio.Future):
                    item = await item
                if callable(item):
                    item()
                    continue
                self.writer.write(item)
                await self.writer.drain()
                if counted:
                    self.queued_bytes -= len(item)
                if self.queued_bytes <= OUTBOX_PAUSE_BYTES:
                    self._room.set()
        except (ConnectionError, OSError):
            pass
        finally:
            self.closed = True
            self._room.set()
            self.writer.close()


class Server:
    """Serves the job service to clients over TCP; hears of their jobs as a JobListener."""

    def __init__(self, service: JobService, token: str | None = None) -> None:
        self.service = service
        self._token = token
        self._peers: set[_Peer] = set()
        self._subscribers: dict[str, _Peer] = {}
        self._callbacks: dict[str, tuple[str, int, str]] = {}
        service.add_listener(self)

    async def listen(self, host: str, port: int) -> asyncio.Server:
        """Start accepting connections on host:port (0: a free port)."""
        return await asyncio.start_server(self._serve_peer, host, port)

    # --- connections --------------------------------------------------------------

    async def _serve_peer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = _Peer(writer)
        if len(self._peers) >= MAX_CONNECTIONS:
            log.warning("%s: refused: %d connections already", peer.name, MAX_CONNECTIONS)
            peer.send(protocol.encode(protocol.error_message(
                "too_many_connections", f"the scheduler serves at most {MAX_CONNECTIONS} connections")))
            await peer.close()
            return
        self._peers.add(peer)
        try:
            hello = await asyncio.wait_for(protocol.read_message(reader, MAX_HELLO_FRAME_BYTES),
                                           HELLO_TIMEOUT_SECONDS)
            if hello is None:
                return
            self._check_hello(hello)
            peer.send(protocol.encode(self._welcome()))
            while (message := await self._next_request(peer, reader)) is not None:
                self._handle(peer, message)
        except ProtocolError as exc:
            code = exc.code if isinstance(exc, BadRequest) else type(exc).__name__
            log.warning("%s: %s", peer.name, exc)
            for job in peer.open_jobs.values():  # refused with it: the client knows, nothing of it runs
                self.service.refuse_job(job)
            peer.send(protocol.encode(protocol.error_message(code, str(exc))))
        except asyncio.TimeoutError:
            log.warning("%s: no hello within %g s", peer.name, HELLO_TIMEOUT_SECONDS)
        except (ConnectionError, OSError):
            pass
        finally:
            for job in list(peer.open_jobs.values()):  # gone mid-submission: run what it sent
                self.service.close_job(job)
            for job_id in peer.streaming:
                del self._subscribers[job_id]
            peer.streaming.clear()
            self._peers.discard(peer)
            await peer.close()

    @staticmethod
    async def _next_request(peer: _Peer, reader: asyncio.StreamReader) -> dict[str, Any] | None:
        """The connection's next message once it may send one; None at its end (or idle too long)."""
        await peer.ready_to_read()
        if peer.closed:
            return None
        if not peer.idle:
            return await protocol.read_message(reader)
        try:
            return await asyncio.wait_for(protocol.read_message(reader), IDLE_TIMEOUT_SECONDS)
        except asyncio.TimeoutError:
            log.info("%s: closed after %g s idle", peer.name, IDLE_TIMEOUT_SECONDS)
            return None

    def _check_hello(self, message: dict[str, Any]) -> None:
        if message["type"] != "hello":
            raise BadRequest("bad_request", "the first message must be hello")
        if message["version"] != protocol.PROTOCOL_VERSION:
            raise BadRequest("unsupported_version",
                             f"this scheduler speaks protocol version {protocol.PROTOCOL_VERSION}")
        if self._token is not None:
            given = message.get("token")
            if not isinstance(given, str) or not hmac.compare_digest(given.encode(), self._token.encode()):
                raise BadRequest("unauthorized", "missing or wrong token")

    def _welcome(self) -> dict[str, Any]:
        backend, keeper = self.service.backend, self.service.keeper
        staging = {} if backend.staging is None else {"staging": backend.staging}
        return {"type": "welcome", "version": protocol.PROTOCOL_VERSION, "backend": backend.name,
                "workers": backend.workers(), "keeps_results": keeper.keeps_results,
                "durable": keeper.durable, **staging}

    def _handle(self, peer: _Peer, message: dict[str, Any]) -> None:
        kind = message["type"]
        if kind == "job_open":
            if len(peer.open_jobs) >= MAX_OPEN_JOBS_PER_CONNECTION:
                raise BadRequest("too_many_jobs", f"a connection may have at most "
                                 f"{MAX_OPEN_JOBS_PER_CONNECTION} jobs open at once")
            self._open_job(peer, message)
        elif kind == "tasks":
            self.service.add_tasks(self._open_job_of(peer, message["job"]), message["tasks"])
        elif kind == "job_close":
            job = self._open_job_of(peer, message["job"])
            if job.total == 0:
                raise BadRequest("empty_job", f"job {job.id}: a job needs at least one task")
            if message["count"] != job.total:
                raise BadRequest("count_mismatch", f"job {job.id}: client sent {message['count']} "
                                 f"tasks, scheduler received {job.total}")
            del peer.open_jobs[job.id]
            peer.send(self._once_written({"type": "job_accepted", "job": job.id, "count": job.total}))
            self.service.close_job(job)
        elif kind == "fetch":
            job = self.service.known_job(message["job"])
            peer.start(self._send_when_finished(peer, job, message.get("commands") is True))
        elif kind == "cancel":
            peer.start(self._answer_cancel(peer, self.service.known_job(message["job"])))
        elif kind == "list_jobs":
            limit = message.get("limit", DEFAULT_LISTED_JOBS)
            if type(limit) is not int or limit < 1:
                raise BadRequest("bad_request", "limit must be a positive integer")
            peer.send(protocol.encode({"type": "jobs", **self.service.list_jobs(limit)}))
        else:
            raise BadRequest("bad_request", f"a client does not send {kind!r}")

    def _open_job(self, peer: _Peer, message: dict[str, Any]) -> None:
        callback = message.get("callback")
        if callback is not None and not _valid_callback(callback):
            raise BadRequest("bad_request", "callback must be {\"port\": 1-65535, \"nonce\": string}")
        job = self.service.open_job(message.get("timeout"))
        peer.open_jobs[job.id] = job
        if message.get("stream", True):
            self._subscribers[job.id] = peer
            peer.streaming.add(job.id)
        if callback is not None:
            self._callbacks[job.id] = (peer.address[0], callback["port"], callback["nonce"])
        peer.send(protocol.encode({"type": "job_opened", "job": job.id}))
        log.info("job %s opened by %s", job.id, peer.name)

    @staticmethod
    def _open_job_of(peer: _Peer, job_id: str) -> Job:
        job = peer.open_jobs.get(job_id)
        if job is None:
            raise BadRequest("unknown_job", f"no open job {job_id!r} on this connection")
        return job

    def _once_written(self, message: dict[str, Any]) -> Outgoing:
        """``message``, held back until what it promises (a job's tasks or results) is kept."""
        frame = protocol.encode(message)

        async def once_written() -> bytes:
            try:
                await self.service.keeper.written()
            except BackendError as exc:
                return protocol.encode(protocol.error_message("store_failed", str(exc)))
            return frame
        return asyncio.ensure_future(once_written())

    async def _answer_cancel(self, peer: _Peer, job: Job) -> None:
        try:
            count = await self.service.cancel_job(job)
        except CloudKonError as exc:
            log.error("job %s: cancel failed: %s", job.id, exc)
            peer.send(protocol.encode(protocol.error_message("cancel_failed", f"job {job.id}: {exc}")))
            return
        peer.send(protocol.encode({"type": "cancelled", "job": job.id, "count": count or 0,
                                   "state": job.state()}))

    async def _send_when_finished(self, peer: _Peer, job: Job, commands: bool) -> None:
        await self.service.wait_finished(job)
        async with peer.answering:
            await self._send_job(peer, job, commands)

    async def _send_job(self, peer: _Peer, job: Job, commands: bool) -> None:
        if peer.closed:
            return
        try:
            tasks, results = await self.service.read_job(job, commands)
        except BackendError as exc:
            peer.send(protocol.encode(protocol.error_message("store_failed", str(exc))))
            return
        peer.send(protocol.encode({"type": "job_accepted", "job": job.id, "count": job.total}))
        for message in protocol.task_messages(job.id, tasks):
            await peer.room()  # a client that does not read makes its fetch wait, not the answer pile up
            peer.send(protocol.encode(message))
        for batch in results:
            await peer.room()
            peer.send(protocol.encode(protocol.results_message(batch)))
        peer.send(protocol.encode(_done_message(job, self.service.job_cost(job))))
        peer.send(lambda: self.service.delivered(job))

    # --- what the service tells (JobListener) -----------------------------------------

    def job_results(self, job: Job, batch: ResultBatch) -> None:
        peer = self._subscribers.get(job.id)
        if peer is not None:
            peer.send(protocol.encode(protocol.results_message(batch)))

    def job_finished(self, job: Job) -> None:
        peer = self._subscribers.pop(job.id, None)
        if peer is not None:
            peer.streaming.discard(job.id)
            peer.send(self._once_written(_done_message(job, self.service.job_cost(job))))
            peer.send(lambda: self.service.delivered(job))
        callback = self._callbacks.pop(job.id, None)
        if callback is not None:
            asyncio.get_running_loop().create_task(self._call_back(job, *callback))

    async def _call_back(self, job: Job, host: str, port: int, nonce: str) -> None:
        """Tell a client listening at host:port that its job is ready to fetch."""
        try:
            _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 10)
            writer.write(protocol.encode({"type": "ready", "job": job.id, "nonce": nonce}))
            await writer.drain()
            writer.close()
        except (OSError, asyncio.TimeoutError) as exc:
            log.warning("job %s: could not call back %s: %s (results kept %g s for fetch)",
                        job.id, format_address(host, port), exc, self.service.result_ttl)

    # --- shutdown -------------------------------------------------------------------

    def refuse_open_jobs(self) -> None:
        """Shutting down: end the submissions in progress, running what they sent."""
        kept_in = self.service.kept_in
        kept = f" (the tasks received are kept in {kept_in} and run when it starts again)" if kept_in else ""
        for peer in self._peers:
            for job in list(peer.open_jobs.values()):
                peer.send(protocol.encode(protocol.error_message(
                    "shutting_down", f"scheduler is shutting down; job {job.id} was not accepted{kept}")))
                del peer.open_jobs[job.id]
                self.service.close_job(job)

    async def close(self) -> None:
        """Tell the clients of jobs still running where they are kept, and close every connection."""
        for job_id, peer in list(self._subscribers.items()):  # only with a durable store: jobs unfinished
            peer.send(protocol.encode(protocol.error_message(
                "shutting_down", f"scheduler is shutting down; job {job_id} is kept in "
                f"{self.service.kept_in} and resumes when the scheduler starts again on it (then fetch "
                f"it with --cursor {job_id})")))
        await asyncio.gather(*(peer.close() for peer in list(self._peers)))


def _done_message(job: Job, cost: dict[str, Any]) -> dict[str, Any]:
    counts = job.counts()  # ``cost``: service.job_cost's
    return {"type": "job_done", "job": job.id, "total": job.total, "succeeded": counts["succeeded"],
            "failed": counts["failed"], "cancelled": counts["cancelled"], **cost}


def _valid_callback(callback: object) -> bool:
    return (isinstance(callback, dict) and isinstance(callback.get("nonce"), str)
            and len(callback["nonce"]) <= 256 and type(callback.get("port")) is int
            and 0 < callback["port"] < 65536)


def format_address(host: str, port: int) -> str:
    """host:port, the host in brackets if it is an IPv6 address."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
