"""The scheduler: its command line, its TCP server, and its shutdown.

Owns the process a user starts: options, the listening socket, client connections
and what they ask for, signals.  Tasks go to the Dispatcher (jobs.py), which feeds
the one backend chosen here; results stream back to the connection that submitted
them, and stay (for ``--result-ttl`` seconds) to be fetched by the job's id, its
cursor.  With a job store (jobstore.py) jobs survive the scheduler: a restart on
the same store runs what had no result yet.

Threads: the asyncio event loop runs connections and the Dispatcher; one more thread
sits in ``backend.receive`` and hands result batches to the loop; the journal's
thread writes the store; the HTTP API (httpapi.py) has threads of its own.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import hmac
import ipaddress
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from cloudkon import protocol
from cloudkon.backend import Backend
from cloudkon.errors import BackendError, BadRequest, CloudKonError, ConfigError, ProtocolError
from cloudkon.httpapi import HttpApi, JobReport
from cloudkon.jobs import Dispatcher, Job, held_bytes
from cloudkon.jobstore import (
    JobFinished,
    JobOpened,
    JobStore,
    Journal,
    ResultsAdded,
    SQLiteJobStore,
    TasksAdded,
)
from cloudkon.options import add_remote_arguments, require_boto3, task_timeout_argument
from cloudkon.repeats import Outage
from cloudkon.tasks import MAX_COMMAND_BYTES, ResultBatch

log = logging.getLogger("cloudkon.scheduler")

DEFAULT_PORT = 9000
DEFAULT_RESULT_TTL_SECONDS = 86400.0
DEFAULT_GRACE_SECONDS = 30.0
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
# Tasks in one job: bounds the memory one client can make the scheduler hold.
MAX_JOB_TASKS = 10_000_000
# Tasks held in memory at once over every job, weighed by jobs.held_bytes (--max-held-bytes).
DEFAULT_MAX_HELD_BYTES = 1024 ** 3
# Jobs a list_jobs answers with unless it asks for another limit (the newest ones).
DEFAULT_LISTED_JOBS = 1000
# How long the receiving thread waits in backend.receive while bundles are out, and how often
# it checks for shutdown during a longer wait (Backend.idle_receive_seconds).
RECEIVE_POLL_SECONDS = 1.0
# Receiving results that fails (AWS unreachable, no file descriptors left) is retried after a
# pause that doubles up to the second figure, jittered; the scheduler serves on meanwhile.
RECEIVE_RETRY_SECONDS = (0.1, 5.0)
# The same unexpected error of the event loop (accept failing for want of file descriptors,
# say) is logged at most once in this long.
LOOP_ERROR_LOG_SECONDS = 10.0
EXPIRY_CHECK_SECONDS = 10.0


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
        log.warning("%s: disconnected: %s", _format_address(*self.address[:2]), reason)
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
                if isinstance(item, asyncio.Future):
                    item = await item
                if callable(item):
                    item()
                    continue
                self.writer.write(item)
                await self.writer.drain()
                self.queued_bytes -= len(item)
                if self.queued_bytes <= OUTBOX_PAUSE_BYTES:
                    self._room.set()
        except (ConnectionError, OSError):
            pass
        finally:
            self.closed = True
            self._room.set()
            self.writer.close()


class Scheduler:
    """Serves clients over TCP and runs their jobs on one backend."""

    def __init__(self, backend: Backend, token: str | None = None,
                 result_ttl: float = DEFAULT_RESULT_TTL_SECONDS,
                 task_timeout: float | None = None, grace: float = DEFAULT_GRACE_SECONDS,
                 fleet: Any = None, scale_interval: float = 5.0, journal: Journal | None = None,
                 first_bundle: int = 0, max_held_bytes: int = DEFAULT_MAX_HELD_BYTES) -> None:
        self.backend = backend
        self._max_held_bytes = max_held_bytes
        self.fleet = fleet  # provisioning.Fleet in remote mode with --provision
        self.journal = journal
        self._scale_interval = scale_interval
        self.dispatcher = Dispatcher(backend, self._on_results, self._on_finished, first_bundle)
        self._token = token
        self._result_ttl = result_ttl
        self._task_timeout = task_timeout
        self._grace = grace
        self._peers: set[_Peer] = set()
        self._subscribers: dict[str, _Peer] = {}
        self._callbacks: dict[str, tuple[str, int, str]] = {}
        self._fetchers: dict[str, list[asyncio.Future[None]]] = {}
        self._signals = 0
        self._stopping = False

    # --- running ------------------------------------------------------------------

    async def serve(self, host: str, port: int, parent_pid: int | None = None,
                    http_port: int | None = None) -> int:
        """Serve until a signal (or the parent's exit) ends it; the exit code."""
        loop = asyncio.get_running_loop()
        self._shutdown = asyncio.Event()
        self._force = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self._on_signal)
        self._loop_errors: dict[str, float] = {}
        loop.set_exception_handler(self._on_loop_error)
        if self.journal is not None:
            await self._restore_jobs()
        server = await asyncio.start_server(self._serve_peer, host, port)
        bound = server.sockets[0].getsockname()
        http = None
        if http_port is not None:
            try:
                http = HttpApi(host, http_port, self._token, self, loop)
            except OSError as exc:
                server.close()
                raise OSError(exc.errno, f"HTTP API on port {http_port}: {exc.strerror}") from exc
            http.start()
        print(f"listening on {_format_address(bound[0], bound[1])}", flush=True)
        if http is not None:
            print(f"HTTP API on http://{_format_address(*http.address)}", flush=True)
        log.info("%s", self.backend.describe())
        stop_receiving = threading.Event()
        receiver = threading.Thread(target=self._receive_loop, args=(loop, stop_receiving),
                                    name="cloudkon-receive", daemon=True)
        receiver.start()
        if self.fleet is not None:
            threading.Thread(target=self._scale_loop, args=(stop_receiving,), name="cloudkon-scale",
                             daemon=True).start()
        housekeeping = asyncio.create_task(self._housekeeping(parent_pid))
        await self._shutdown.wait()
        server.close()
        if http is not None:
            await loop.run_in_executor(None, http.close)
        housekeeping.cancel()
        finished = await self._drain()
        stop_receiving.set()
        self.backend.wake()
        await loop.run_in_executor(None, receiver.join)
        await loop.run_in_executor(None, self.backend.close, finished)
        return 0

    async def _restore_jobs(self) -> None:
        store = self.journal.store
        jobs = await asyncio.wrap_future(self.journal.call(store.load, time.time() - self._result_ttl))
        unfinished = [job for job in jobs if job.finished_at is None]
        for job in jobs:
            self.dispatcher.restore(job)
        if jobs:
            log.info("job store: %d finished job(s) kept, %d unfinished resumed with %d task(s) to run",
                     len(jobs) - len(unfinished), len(unfinished),
                     sum(job.total - job.done_count for job in unfinished))

    def _on_signal(self) -> None:
        # Runs in the event loop: only set flags, the main coroutine does the work.
        self._signals += 1
        if self._signals == 1:
            log.info("shutting down: finishing tasks in flight (signal again to stop now)")
            self._shutdown.set()
        else:
            log.warning("stopping now")
            self._force.set()

    async def _drain(self) -> bool:
        """Stop intake, let in-flight bundles finish, flush every client.

        Without a job store, the tasks that cannot finish are reported failed; with one,
        they stay in the store for the next start.  True if everything in flight finished.
        """
        self._stopping = True
        durable = self.journal is not None and self.journal.store.durable
        store = f"its job store ({self.journal.store.describe()})" if durable else ""  # type: ignore[union-attr]
        kept = f" (the tasks received are kept in {store} and run when it starts again)" if durable else ""
        for peer in self._peers:
            for job in list(peer.open_jobs.values()):
                peer.send(protocol.encode(protocol.error_message(
                    "shutting_down", f"scheduler is shutting down; job {job.id} was not accepted{kept}")))
                del peer.open_jobs[job.id]
                self.dispatcher.close_job(job)
        if durable:
            self.dispatcher.hold()
        else:
            self.dispatcher.fail_undispatched("scheduler shut down before this task started")
        deadline = time.monotonic() + self._grace
        while not self.dispatcher.idle and not self._force.is_set() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        finished = self.dispatcher.idle
        if not finished and not durable:
            self.dispatcher.fail_in_flight("scheduler stopped before this task finished")
        for job_id, peer in list(self._subscribers.items()):  # only with a durable store: jobs unfinished
            peer.send(protocol.encode(protocol.error_message(
                "shutting_down", f"scheduler is shutting down; job {job_id} is kept in {store} and resumes "
                f"when the scheduler starts again on it (then fetch it with --cursor {job_id})")))
        await asyncio.gather(*(peer.close() for peer in list(self._peers)))
        unfinished = [job for job in self.dispatcher.jobs.values() if not job.finished]
        if unfinished:
            log.info("stopped: %d unfinished job(s) with %d task(s) to run, kept in %s", len(unfinished),
                     sum(job.total - job.done_count for job in unfinished), store)
        else:
            log.info("stopped: every job finished%s", "" if finished else " (what was in flight failed)")
        return finished

    def _receive_loop(self, loop: asyncio.AbstractEventLoop, stop: threading.Event) -> None:
        outage = Outage("receiving results", RECEIVE_RETRY_SECONDS, log)
        idle_wait = self.backend.idle_receive_seconds  # no bundle out: no result expected
        while not stop.is_set():
            try:
                batches = self._receive(RECEIVE_POLL_SECONDS if self.dispatcher.bundles_in_flight
                                        else idle_wait, stop)
            except Exception as exc:  # this thread must not die (every result comes through it),
                stop.wait(outage.failed(exc))  # nor the scheduler end: AWS unreachable for a while passes
                continue
            outage.ended()
            if batches:
                loop.call_soon_threadsafe(self.dispatcher.handle_results, batches)

    def _receive(self, wait: float, stop: threading.Event) -> list[ResultBatch]:
        """``backend.receive(wait)``; a wait longer than RECEIVE_POLL_SECONDS runs in a thread of its
        own, given up (nothing received) once ``stop`` is set: a shutdown does not wait out a long poll."""
        if wait <= RECEIVE_POLL_SECONDS:
            return self.backend.receive(wait)
        poll: concurrent.futures.Future[list[ResultBatch]] = concurrent.futures.Future()

        def long_poll() -> None:
            try:
                poll.set_result(self.backend.receive(wait))
            except BaseException as exc:  # handed to the receiving thread, which handles it
                poll.set_exception(exc)

        threading.Thread(target=long_poll, name="cloudkon-long-poll", daemon=True).start()
        while not stop.is_set():
            if concurrent.futures.wait([poll], RECEIVE_POLL_SECONDS).done:
                return poll.result()
        return []  # the backend closes next: what the poll brings then stays on its queue

    def _scale_loop(self, stop: threading.Event) -> None:
        """Provisioning: every few seconds, size the fleet to the bundles in flight."""
        while not stop.wait(self._scale_interval):
            try:
                self.fleet.scale(self.dispatcher.bundles_in_flight)
            except BackendError as exc:
                log.error("provisioning: %s", exc)
            except Exception:  # the next round may work: this thread must not die
                log.exception("provisioning failed")

    def _on_loop_error(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        """The event loop's unexpected errors, each kind logged at most once per LOOP_ERROR_LOG_SECONDS."""
        kind = context.get("message", "")
        now = time.monotonic()
        if now - self._loop_errors.get(kind, -LOOP_ERROR_LOG_SECONDS) < LOOP_ERROR_LOG_SECONDS:
            return
        first = kind not in self._loop_errors
        self._loop_errors[kind] = now
        exc = context.get("exception")
        log.error("%s%s%s", kind, f": {exc!r}" if exc else "",
                  "" if first else f" (again; logged at most every {LOOP_ERROR_LOG_SECONDS:g} s)",
                  exc_info=exc if first else None)

    async def _housekeeping(self, parent_pid: int | None) -> None:
        """Expire unclaimed results; stop if the parent that started us is gone."""
        last_expiry = time.monotonic()
        expiry_check = min(EXPIRY_CHECK_SECONDS, max(self._result_ttl / 2, 0.5))
        while True:
            await asyncio.sleep(0.5)
            if parent_pid is not None and os.getppid() != parent_pid:
                log.warning("parent process %d is gone: stopping", parent_pid)
                self._force.set()
                self._shutdown.set()
            if time.monotonic() - last_expiry >= expiry_check:
                last_expiry = time.monotonic()
                self._expire_results()

    def _expire_results(self) -> None:
        now = time.time()
        expired = [job for job in self.dispatcher.jobs.values()
                   if job.finished_at is not None and now - job.finished_at > self._result_ttl]
        for job in expired:
            log.info("job %s: results expired", job.id)
            self._forget(job)
        if expired and self.journal is not None:
            removal = self.journal.call(self.journal.store.remove, [job.id for job in expired])
            removal.add_done_callback(_log_failure)

    # --- connections --------------------------------------------------------------

    async def _serve_peer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = _Peer(writer)
        if len(self._peers) >= MAX_CONNECTIONS:
            log.warning("%s: refused: %d connections already", _format_address(*peer.address[:2]),
                        MAX_CONNECTIONS)
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
            welcome = {"type": "welcome", "version": protocol.PROTOCOL_VERSION,
                       "backend": self.backend.name, "workers": self.backend.workers(),
                       "keeps_results": self.journal is not None,
                       "durable": self.journal is not None and self.journal.store.durable}
            if self.backend.staging is not None:
                welcome["staging"] = self.backend.staging
            peer.send(protocol.encode(welcome))
            while (message := await self._next_request(peer, reader)) is not None:
                self._handle(peer, message)
        except ProtocolError as exc:
            code = exc.code if isinstance(exc, BadRequest) else type(exc).__name__
            log.warning("%s: %s", _format_address(*peer.address[:2]), exc)
            for job in peer.open_jobs.values():  # refused with it: the client knows, nothing of it runs
                self.dispatcher.cancel(job)
            peer.send(protocol.encode(protocol.error_message(code, str(exc))))
        except asyncio.TimeoutError:
            log.warning("%s: no hello within %g s", _format_address(*peer.address[:2]),
                        HELLO_TIMEOUT_SECONDS)
        except (ConnectionError, OSError):
            pass
        finally:
            for job in list(peer.open_jobs.values()):  # gone mid-submission: run what it sent
                self.dispatcher.close_job(job)
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
            log.info("%s: closed after %g s idle", _format_address(*peer.address[:2]), IDLE_TIMEOUT_SECONDS)
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

    def _handle(self, peer: _Peer, message: dict[str, Any]) -> None:
        kind = message["type"]
        if kind == "job_open":
            if len(peer.open_jobs) >= MAX_OPEN_JOBS_PER_CONNECTION:
                raise BadRequest("too_many_jobs", f"a connection may have at most "
                                 f"{MAX_OPEN_JOBS_PER_CONNECTION} jobs open at once")
            self._open_job(peer, message)
        elif kind == "tasks":
            self.add_tasks(self._open_job_of(peer, message["job"]), message["tasks"])
        elif kind == "job_close":
            job = self._open_job_of(peer, message["job"])
            if job.total == 0:
                raise BadRequest("empty_job", f"job {job.id}: a job needs at least one task")
            if message["count"] != job.total:
                raise BadRequest("count_mismatch", f"job {job.id}: client sent {message['count']} "
                                 f"tasks, scheduler received {job.total}")
            del peer.open_jobs[job.id]
            peer.send(self._once_written({"type": "job_accepted", "job": job.id, "count": job.total}))
            self.dispatcher.close_job(job)
        elif kind == "fetch":
            job = self._known_job(message["job"])
            peer.start(self._send_when_finished(peer, job, message.get("commands") is True))
        elif kind == "cancel":
            peer.start(self._answer_cancel(peer, self._known_job(message["job"])))
        elif kind == "list_jobs":
            limit = message.get("limit", DEFAULT_LISTED_JOBS)
            if type(limit) is not int or limit < 1:
                raise BadRequest("bad_request", "limit must be a positive integer")
            peer.send(protocol.encode({"type": "jobs", "jobs": self.job_list(limit)}))
        else:
            raise BadRequest("bad_request", f"a client does not send {kind!r}")

    def _known_job(self, job_id: str) -> Job:
        job = self.dispatcher.jobs.get(job_id)
        if job is None:
            raise BadRequest("unknown_job", f"no job {job_id!r} (never submitted, or its results expired"
                             f"{'' if self.journal else ' or were delivered'})")
        return job

    async def cancel_job(self, job: Job) -> int | None:
        """Cancel a job: how many of its tasks are cancelled (0 if it was cancelled before), or None
        if it had finished already.

        The backend hears of it first (a remote one records it durably), then every task
        without a result gets the result cancelled; the answer waits for the job store.
        """
        if job.finished and not job.cancelled:
            return None
        if job.cancelled:
            return 0  # by an earlier cancel: nothing more to stop
        job.cancelling = True  # no more of its bundles while the backend is told
        try:
            await asyncio.get_running_loop().run_in_executor(None, self.backend.cancel, job.id)
        except BackendError:
            job.cancelling = job.cancelled
            self.dispatcher.pump()
            raise
        if job.finished and not job.cancelled:  # it finished while the backend was told
            if not job.cancelled_count:
                return None
            # By this cancel: the backend reported the tasks it held cancelled, and they were
            # the last ones (a local backend answers for the bundles it has not handed out).
            job.cancelled = True
            return job.cancelled_count
        self.dispatcher.cancel(job)
        await self.written()
        # Not what dispatcher.cancel counted: the backend may have reported some queued tasks
        # cancelled already, while it was being told.
        return job.cancelled_count

    async def _answer_cancel(self, peer: _Peer, job: Job) -> None:
        try:
            count = await self.cancel_job(job)
        except CloudKonError as exc:
            log.error("job %s: cancel failed: %s", job.id, exc)
            peer.send(protocol.encode(protocol.error_message("cancel_failed", f"job {job.id}: {exc}")))
            return
        peer.send(protocol.encode({"type": "cancelled", "job": job.id, "count": count or 0,
                                   "state": job.state()}))

    def job_list(self, limit: int) -> list[dict[str, Any]]:
        """The newest ``limit`` jobs this scheduler holds, oldest first, with their task counts."""
        jobs = sorted(self.dispatcher.jobs.values(), key=lambda job: job.created_at)[-limit:]
        return [{"job": job.id, "state": job.state(), **job.counts(), "created_at": job.created_at,
                 "finished_at": job.finished_at} for job in jobs]

    def open_job(self, timeout: object = None) -> Job:
        """A new job, recorded in the store; BadRequest if none can be opened."""
        if self._stopping:
            raise BadRequest("shutting_down", "scheduler is shutting down")
        if timeout is None:
            timeout = self._task_timeout
        else:
            try:
                timeout = protocol.check_task_timeout(timeout)
            except ValueError as exc:
                raise BadRequest("bad_request", str(exc)) from None
        job = self.dispatcher.open_job(timeout)
        if self.journal is not None:
            self.journal.record(JobOpened(job.id, job.created_at, job.timeout))
        return job

    def add_tasks(self, job: Job, tasks: list[Any]) -> None:
        """Check and add tasks to an open job, recording them in the store."""
        check_tasks(tasks, job.total)
        self._check_room(tasks)
        self._add_checked_tasks(job, tasks)

    def _check_room(self, tasks: list[str]) -> None:
        """BadRequest if holding ``tasks`` too would take the scheduler past --max-held-bytes."""
        if self.dispatcher.held_bytes + held_bytes(tasks) > self._max_held_bytes:
            raise BadRequest("too_large", f"the scheduler holds {self.dispatcher.held_bytes >> 20} MiB "
                             f"of tasks and takes no more than {self._max_held_bytes >> 20} MiB "
                             "(--max-held-bytes): submit again once jobs have finished")

    def _add_checked_tasks(self, job: Job, tasks: list[str]) -> None:
        if self.journal is not None and tasks:
            self.journal.record(TasksAdded(job.id, job.total, tasks))
        self.dispatcher.add_tasks(job, tasks)

    async def submit_job(self, tasks: list[Any]) -> str:
        """A whole job at once (the HTTP API): its cursor, once its tasks are stored."""
        if not tasks:
            raise BadRequest("empty_job", "a job needs at least one task")
        check_tasks(tasks, 0)  # before the job exists: a refused submission leaves nothing behind
        self._check_room(tasks)
        job = self.open_job()
        self._add_checked_tasks(job, tasks)
        self.dispatcher.close_job(job)
        await self.written()
        return job.id

    async def job_report(self, cursor: str) -> JobReport | None:
        job = self.dispatcher.jobs.get(cursor)
        if job is None:
            return None
        counts = {"total": job.total, "done": job.done_count, "failed": job.failed_count}
        if not job.finished:
            return counts, None, []
        tasks, results = await self.read_job(job, commands=True)
        return counts, tasks, results

    async def written(self) -> None:
        """Once everything recorded so far is in the store (at once without one)."""
        if self.journal is not None:
            await asyncio.wrap_future(self.journal.written())

    def _once_written(self, message: dict[str, Any]) -> Outgoing:
        """``message``, held back until what it promises (a job's tasks or results) is in the store."""
        frame = protocol.encode(message)
        if self.journal is None:
            return frame

        async def once_written() -> bytes:
            try:
                await self.written()
            except BackendError as exc:
                return protocol.encode(protocol.error_message("store_failed", str(exc)))
            return frame
        return asyncio.ensure_future(once_written())

    def _open_job(self, peer: _Peer, message: dict[str, Any]) -> None:
        callback = message.get("callback")
        if callback is not None and not _valid_callback(callback):
            raise BadRequest("bad_request", "callback must be {\"port\": 1-65535, \"nonce\": string}")
        job = self.open_job(message.get("timeout"))
        peer.open_jobs[job.id] = job
        if message.get("stream", True):
            self._subscribers[job.id] = peer
            peer.streaming.add(job.id)
        if callback is not None:
            self._callbacks[job.id] = (peer.address[0], callback["port"], callback["nonce"])
        peer.send(protocol.encode({"type": "job_opened", "job": job.id}))
        log.info("job %s opened by %s", job.id, _format_address(*peer.address[:2]))

    @staticmethod
    def _open_job_of(peer: _Peer, job_id: str) -> Job:
        job = peer.open_jobs.get(job_id)
        if job is None:
            raise BadRequest("unknown_job", f"no open job {job_id!r} on this connection")
        return job

    # --- results ------------------------------------------------------------------

    def _on_results(self, job: Job, batch: ResultBatch) -> None:
        if self.journal is not None:
            self.journal.record(ResultsAdded(job.id, batch))
        peer = self._subscribers.get(job.id)
        if peer is not None:
            peer.send(protocol.encode(protocol.results_message(batch)))

    def _on_finished(self, job: Job) -> None:
        if self.journal is not None:
            self.journal.record(JobFinished(job.id, job.total, job.finished_at, job.succeeded_count,
                                            job.failed_count, job.cancelled_count))
            self.dispatcher.release(job)  # the store has it all, and fetches read it from there
        peer = self._unsubscribe(job.id)
        if peer is not None:
            peer.send(self._once_written(_done_message(job)))
            if self.journal is None:
                peer.send(lambda: self._forget(job))  # delivered: nothing left to keep
        for waiter in self._fetchers.pop(job.id, []):
            if not waiter.done():
                waiter.set_result(None)
        callback = self._callbacks.pop(job.id, None)
        if callback is not None:
            asyncio.get_running_loop().create_task(self._call_back(job, *callback))

    async def wait_finished(self, job: Job) -> None:
        if not job.finished:
            waiter = asyncio.get_running_loop().create_future()
            self._fetchers.setdefault(job.id, []).append(waiter)
            await waiter

    async def read_job(self, job: Job, commands: bool) -> tuple[list[str], list[ResultBatch]]:
        """A finished job's tasks (if ``commands``) and results, from memory or the store."""
        if self.journal is None:
            return (job.commands if commands else []), job.results or []
        store = self.journal.store
        results = await asyncio.wrap_future(self.journal.call(store.read_results, job.id))
        tasks = await asyncio.wrap_future(self.journal.call(store.read_commands, job.id)) if commands else []
        return tasks, results

    async def _send_when_finished(self, peer: _Peer, job: Job, commands: bool) -> None:
        await self.wait_finished(job)
        async with peer.answering:
            await self._send_job(peer, job, commands)

    async def _send_job(self, peer: _Peer, job: Job, commands: bool) -> None:
        if peer.closed:
            return
        try:
            tasks, results = await self.read_job(job, commands)
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
        peer.send(protocol.encode(_done_message(job)))
        if self.journal is None:
            peer.send(lambda: self._forget(job))

    async def _call_back(self, job: Job, host: str, port: int, nonce: str) -> None:
        """Tell a client listening at host:port that its job is ready to fetch."""
        try:
            _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 10)
            writer.write(protocol.encode({"type": "ready", "job": job.id, "nonce": nonce}))
            await writer.drain()
            writer.close()
        except (OSError, asyncio.TimeoutError) as exc:
            log.warning("job %s: could not call back %s: %s (results kept %g s for fetch)",
                        job.id, _format_address(host, port), exc, self._result_ttl)

    def _forget(self, job: Job) -> None:
        self.dispatcher.forget(job)
        self._unsubscribe(job.id)
        self._callbacks.pop(job.id, None)

    def _unsubscribe(self, job_id: str) -> _Peer | None:
        """Stop streaming a job's results; the connection they went to, if any."""
        peer = self._subscribers.pop(job_id, None)
        if peer is not None:
            peer.streaming.discard(job_id)
        return peer


def _log_failure(future: concurrent.futures.Future[Any]) -> None:
    if future.exception() is not None:
        log.error("%s", future.exception())


def check_tasks(tasks: list[Any], already: int) -> None:
    """BadRequest unless ``tasks`` may join a job of ``already`` tasks."""
    if not all(type(t) is str for t in tasks):
        raise BadRequest("bad_request", "tasks must be strings")
    if tasks and max(map(len, tasks)) * 4 > MAX_COMMAND_BYTES and \
            max(len(t.encode()) for t in tasks) > MAX_COMMAND_BYTES:
        raise BadRequest("bad_request", f"a task is longer than {MAX_COMMAND_BYTES} bytes")
    if already + len(tasks) > MAX_JOB_TASKS:
        raise BadRequest("too_large", f"a job holds at most {MAX_JOB_TASKS} tasks")


def _done_message(job: Job) -> dict[str, Any]:
    counts = job.counts()
    return {"type": "job_done", "job": job.id, "total": job.total, "succeeded": counts["succeeded"],
            "failed": counts["failed"], "cancelled": counts["cancelled"]}


def _valid_callback(callback: object) -> bool:
    return (isinstance(callback, dict) and isinstance(callback.get("nonce"), str)
            and len(callback["nonce"]) <= 256 and type(callback.get("port")) is int
            and 0 < callback["port"] < 65536)


def _format_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def is_loopback(host: str) -> bool:
    """True if every address ``host`` names is a loopback address."""
    try:
        infos = socket.getaddrinfo(host, None)
    except socket.gaierror:
        return False
    return all(ipaddress.ip_address(info[4][0]).is_loopback for info in infos)


# --- command line -------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="scheduler.py", description="Run CloudKon tasks sent by clients on worker processes.",
        epilog="Prints 'listening on HOST:PORT' on stdout when ready; logs go to stderr. "
               "SIGINT/SIGTERM: stop taking jobs, finish tasks in flight (the rest stay in the job "
               "store for the next start; with --no-state they are reported failed), exit 0; a second "
               "one stops at once.")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--local", type=int, metavar="N", default=None,
                      help="run tasks in N local worker processes (the default, with N = the CPU count)")
    mode.add_argument("--remote", action="store_true",
                      help="run tasks on remote workers (worker.py) through SQS, with a DynamoDB claim table")
    add_remote_arguments(parser)
    commands = parser.add_argument_group("fleet commands (remote mode; each does its work and exits)")
    commands.add_argument("--cleanup", action="store_true",
                          help="terminate every instance of the fleet, delete its queues, tables, control "
                               "topic and any worker control queues left behind, and exit")
    commands.add_argument("--drain", action="store_true",
                          help="tell every worker (over the control topic) to finish the bundles it holds, "
                               "take no new one and exit; wait until they have (up to --grace seconds)")
    commands.add_argument("--shutdown", action="store_true",
                          help="tell every worker to stop now, handing the bundles it holds back to the "
                               "request queue; wait until they have exited (up to --grace seconds)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT,
                        help=f"TCP port (default: {DEFAULT_PORT}; 0 picks a free one)")
    parser.add_argument("--http-port", type=int, metavar="PORT",
                        help="also serve the HTTP API (POST /tasks/submit, GET /tasks/result/CURSOR; "
                             "docs/openapi.json) on this port of --host (0 picks a free one)")
    parser.add_argument("--token", default=os.environ.get("CLOUDKON_TOKEN"),
                        help="secret every client must present (default: $CLOUDKON_TOKEN); "
                             "required to listen on a non-loopback address")
    parser.add_argument("--task-timeout", type=task_timeout_argument, metavar="SECONDS", default=None,
                        help="kill a task's process group after this long (default: no limit; at most "
                             f"{protocol.MAX_TASK_TIMEOUT_SECONDS:.0f}, 30 days)")
    parser.add_argument("--result-ttl", type=float, metavar="SECONDS", default=DEFAULT_RESULT_TTL_SECONDS,
                        help="keep a finished job and its results this long "
                             f"(default: {DEFAULT_RESULT_TTL_SECONDS:g}, a day)")
    state = parser.add_argument_group("job store (jobs survive a restart on the same store)")
    state.add_argument("--state", metavar="PATH|NAME",
                       help="local mode: SQLite file of jobs and results (default: "
                            "$XDG_DATA_HOME/cloudkon/jobs.sqlite; ':memory:' keeps them in memory); "
                            "remote mode: this scheduler's name in the jobs table, also naming its "
                            "response queue (default: a new random name, logged at start)")
    state.add_argument("--jobs-table", default="cloudkon-jobs",
                       help="remote mode: DynamoDB table of jobs and results (default: cloudkon-jobs)")
    state.add_argument("--no-state", action="store_true",
                       help="keep jobs in memory only: results are dropped once delivered")
    parser.add_argument("--max-held-bytes", type=int, metavar="BYTES", default=DEFAULT_MAX_HELD_BYTES,
                        help="tasks the scheduler holds in memory at once, over every job, weighed as their "
                             "commands' bytes plus 64 each; a submission past it is refused (default: "
                             f"{DEFAULT_MAX_HELD_BYTES >> 30} GiB)")
    parser.add_argument("--grace", type=float, metavar="SECONDS", default=DEFAULT_GRACE_SECONDS,
                        help="on shutdown, wait this long for tasks in flight before failing them "
                             f"(default: {DEFAULT_GRACE_SECONDS:g})")
    parser.add_argument("-q", "--quiet", action="store_true", help="log only warnings and errors")
    parser.add_argument("--exit-with-parent", type=int, default=None, help=argparse.SUPPRESS)
    return parser


def create_backend(args: argparse.Namespace) -> Backend:
    if args.remote:
        if args.in_flight is not None and args.in_flight < 1:
            raise ConfigError("--in-flight needs at least 1")
        from cloudkon.aws import RESPONSE_QUEUE_PREFIX
        from cloudkon.sqsbackend import SQSBackend  # boto3 is loaded in remote mode only
        response_queue = args.response_queue
        if response_queue is None and args.state and not args.no_state:
            response_queue = f"{RESPONSE_QUEUE_PREFIX}{args.state}"  # a restart finds results sent meanwhile
        in_flight = args.in_flight
        if in_flight is None and args.provision:  # the fleet grows to what its bundles keep busy
            in_flight = args.max_workers * args.worker_threads
        options = {"request_queue": args.request_queue, "response_queue": response_queue,
                   "claim_table": args.table, "in_flight": in_flight,
                   "visibility_timeout": args.visibility_timeout, "control_topic": args.control_topic}
        backend = SQSBackend(**{name: value for name, value in options.items() if value is not None})
        try:
            backend.staging = staging_area(args)
        except CloudKonError:
            backend.close(wait=False)
            raise
        return backend
    from cloudkon.localworkers import LocalBackend
    workers = args.local if args.local is not None else (os.cpu_count() or 1)
    if workers < 1:
        raise ConfigError("--local needs at least 1 worker")
    return LocalBackend(workers)


def staging_area(args: argparse.Namespace) -> str:
    """The s3:// prefix where clients stage job files, its bucket made ready (remote mode)."""
    from cloudkon.s3staging import DEFAULT_RETENTION_DAYS, ensure_bucket
    retention = DEFAULT_RETENTION_DAYS if args.retention_days is None else args.retention_days
    if retention < 1:
        raise ConfigError("--retention-days needs at least 1")
    bucket, prefix = staging_bucket(args)
    ensure_bucket(bucket, prefix, retention)
    return f"s3://{bucket}/{prefix}"


def staging_bucket(args: argparse.Namespace) -> tuple[str, str]:
    """The bucket and key prefix of job files (--bucket, --staging-prefix)."""
    from cloudkon.s3staging import DEFAULT_PREFIX, default_bucket
    prefix = (args.staging_prefix or DEFAULT_PREFIX).strip("/")
    if not prefix:
        raise ConfigError("--staging-prefix needs at least one character besides '/'")
    return args.bucket or default_bucket(), prefix


def default_state_path() -> Path:
    data_home = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(data_home) / "cloudkon" / "jobs.sqlite"


def create_journal(args: argparse.Namespace, backend: Backend) -> Journal | None:
    """The job store chosen by --state / --no-state / --jobs-table, behind its journal."""
    if args.no_state:
        return None
    if args.remote:
        from cloudkon.aws import RESPONSE_QUEUE_PREFIX
        from cloudkon.dynamostore import DynamoJobStore  # boto3 is loaded in remote mode only
        # Without --state, the name of the response queue SQSBackend made up: a restart
        # with --state NAME then finds the results that kept arriving there.
        name = args.state or backend.response_queue.removeprefix(RESPONSE_QUEUE_PREFIX)
        store: JobStore = DynamoJobStore(args.jobs_table, name, args.result_ttl)
    else:
        store = SQLiteJobStore(args.state or str(default_state_path()))
    log.info("job store: %s", store.describe())
    return Journal(store)


def create_fleet(args: argparse.Namespace) -> Any:
    """The provisioning.Fleet for --provision or --cleanup, else None."""
    if not (args.provision or args.cleanup):
        return None
    if not args.remote:
        raise ConfigError("--provision and --cleanup go with --remote")
    if args.provision and not args.ami:
        raise ConfigError("--provision needs --ami (an image made with ami_setup.sh)")
    from cloudkon.provisioning import Fleet, LaunchOptions, WorkerSettings
    settings = WorkerSettings(fleet=args.fleet, fleet_table=args.fleet_table, threads=args.worker_threads,
                              idle_timeout=args.worker_idle_timeout, heartbeat_seconds=args.heartbeat_seconds)
    for name, value in (("request_queue", args.request_queue), ("claim_table", args.table),
                        ("visibility_timeout", args.visibility_timeout),
                        ("control_topic", args.control_topic)):
        if value is not None:
            setattr(settings, name, value)
    launch = LaunchOptions(args.ami, args.instance_type, args.key_name, args.subnet, args.security_group,
                           args.instance_profile) if args.provision else None
    return Fleet(settings, launch, args.max_workers, args.heartbeat_timeout, args.boot_timeout,
                 make_registry=not args.cleanup)


def run_fleet_command(args: argparse.Namespace) -> int:
    """--drain or --shutdown (0 once every worker has left, 1 on timeout) or --cleanup (0)."""
    if not args.remote:
        raise ConfigError("--drain, --shutdown and --cleanup go with --remote")
    if args.drain + args.shutdown + args.cleanup > 1:
        raise ConfigError("--drain, --shutdown and --cleanup are separate commands: one at a time")
    from cloudkon import aws  # boto3 is loaded in remote mode only
    from cloudkon.control import DEFAULT_CONTROL_TOPIC, ControlTopic
    from cloudkon.signing import Signer
    try:  # drain and shutdown are signed with a key of this command's own, written at first use
        topic = ControlTopic(args.control_topic or DEFAULT_CONTROL_TOPIC,
                             Signer(aws.client("dynamodb"), args.table or aws.DEFAULT_CLAIM_TABLE))
        if args.drain or args.shutdown:
            return 0 if topic.stop_workers("drain" if args.drain else "shutdown", args.grace) else 1
        fleet = create_fleet(args)
        fleet.cleanup()
        fleet.remove_resources()
        topic.remove()
        from cloudkon.s3staging import remove_staging
        remove_staging(*staging_bucket(args))
        return 0
    finally:
        aws.log_api_calls()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO,
        format="%(asctime)s scheduler %(levelname)s %(message)s", stream=sys.stderr)
    logging.getLogger("botocore").setLevel(logging.WARNING)  # its INFO lines are noise here
    try:
        for flag, port in (("--port", args.port), ("--http-port", args.http_port)):
            if port is not None and not 0 <= port < 65536:
                raise ConfigError(f"{flag} {port} is not a TCP port")
        if not args.token and not is_loopback(args.host):
            raise ConfigError(f"refusing to listen on {args.host} without --token "
                              "(or $CLOUDKON_TOKEN): anyone who can reach it could run commands")
        if args.remote:
            require_boto3()
        if args.drain or args.shutdown or args.cleanup:
            return run_fleet_command(args)
        fleet = create_fleet(args)
        backend = create_backend(args)
        journal = create_journal(args, backend)
        # Bundle numbers of each start are apart, so a restart never reuses one (remote
        # claims are per job and bundle number).
        first_bundle = journal.call(journal.store.start).result() << 32 if journal else 0
    except CloudKonError as exc:
        if "backend" in locals():
            backend.close(wait=False)
        print(f"scheduler.py: error: {exc}", file=sys.stderr)
        return 2
    scheduler = Scheduler(backend, args.token or None, args.result_ttl, args.task_timeout, args.grace,
                          fleet, args.scale_interval, journal, first_bundle, args.max_held_bytes)
    try:
        return asyncio.run(scheduler.serve(args.host, args.port, args.exit_with_parent, args.http_port))
    except OSError as exc:
        backend.close(wait=False)
        print(f"scheduler.py: error: cannot listen on {args.host}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    except CloudKonError as exc:  # the job store could not be read back
        backend.close(wait=False)
        print(f"scheduler.py: error: {exc}", file=sys.stderr)
        return 2
    finally:
        if journal is not None:
            journal.close()


if __name__ == "__main__":
    sys.exit(main())
