"""The job service: what a client may ask of a scheduler, over TCP (server.py) or HTTP (httpapi.py).

Owns the jobs' life between the front ends and the Dispatcher (jobs.py): open a job,
add tasks to it, submit a whole one, report on it, cancel it, list them, read a finished
one's results; results recorded as they come and jobs finished, expired after
``--result-ttl``, restored from the job store at start and stopped at shutdown; and the
thread that brings result batches from the backend to the event loop.  It knows no
sockets: the TCP server hears of results and finished jobs through ``JobListener``.

What is kept beyond memory is its ``Keeper``'s business (keeper.py): a job store, so
that jobs survive a restart and results (and a finished job's cost figures) stay until they expire, or nothing
(``--no-state``), and a job is forgotten once its results have reached a client.

Runs on the scheduler's event loop, but for ``receive_results`` (a thread of its own).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
from typing import Any, Protocol

from cloudkon.backend import Backend
from cloudkon.costs import CostBook
from cloudkon.errors import BackendError, BadRequest
from cloudkon.jobs import Dispatcher, Job, held_bytes
from cloudkon.jobstore import FinishedJob, JobFinished, JobOpened, ResultsAdded, TasksAdded
from cloudkon.keeper import Keeper
from cloudkon.repeats import Outage
from cloudkon.tasks import MAX_COMMAND_BYTES, ResultBatch, check_task_timeout, first_too_long

log = logging.getLogger("cloudkon.scheduler")

DEFAULT_RESULT_TTL_SECONDS = 86400.0
# Tasks in one job: bounds the memory one client can make the scheduler hold.
MAX_JOB_TASKS = 10_000_000
# Tasks held in memory at once over every job, weighed by jobs.held_bytes (--max-held-bytes).
DEFAULT_MAX_HELD_BYTES = 1024 ** 3
# How long the receiving thread waits in backend.receive while bundles are out, and how often
# it checks for shutdown during a longer wait (Backend.idle_receive_seconds).
RECEIVE_POLL_SECONDS = 1.0
# Receiving results that fails (AWS unreachable, no file descriptors left) is retried after a
# pause that doubles up to the second figure, jittered; the scheduler serves on meanwhile.
RECEIVE_RETRY_SECONDS = (0.1, 5.0)

# A job's counts ("total", "done", "failed"; "cost" once finished, remote), tasks (None until it
# has finished) and results.
JobReport = tuple[dict[str, Any], list[str] | None, list[ResultBatch]]


class JobListener(Protocol):
    """What a front end hears of jobs as they run (the TCP server streams it to its clients)."""

    def job_results(self, job: Job, batch: ResultBatch) -> None:
        """New results of ``job``, recorded."""

    def job_finished(self, job: Job) -> None:
        """Every task of ``job`` has its result (recorded, maybe not yet written)."""


class JobService:
    """The jobs of one scheduler, run on one backend and kept by one Keeper."""

    def __init__(self, backend: Backend, keeper: Keeper, result_ttl: float = DEFAULT_RESULT_TTL_SECONDS,
                 task_timeout: float | None = None, max_held_bytes: int = DEFAULT_MAX_HELD_BYTES,
                 first_bundle: int = 0, costs: CostBook | None = None) -> None:
        self.backend = backend
        self.costs = costs  # what remote jobs and the fleet cost (None: local mode, nothing counted)
        self.keeper = keeper
        self.result_ttl = result_ttl
        self.dispatcher = Dispatcher(backend, self._on_results, self._on_finished, first_bundle)
        self._task_timeout = task_timeout
        self._max_held_bytes = max_held_bytes
        self._listeners: list[JobListener] = []
        self._fetchers: dict[str, list[asyncio.Future[None]]] = {}
        self._cancels: dict[str, asyncio.Future[None]] = {}  # by job: a cancel under way
        self._stopping = False

    def add_listener(self, listener: JobListener) -> None:
        self._listeners.append(listener)

    @property
    def kept_in(self) -> str:
        """Where unfinished jobs wait for the next start, for messages ('' if nowhere)."""
        return f"its job store ({self.keeper.describe()})" if self.keeper.durable else ""

    # --- requests -------------------------------------------------------------------

    def open_job(self, timeout: object = None) -> Job:
        """A new job, recorded; BadRequest if none can be opened."""
        if self._stopping:
            raise BadRequest("shutting_down", "scheduler is shutting down")
        if timeout is None:
            timeout = self._task_timeout
        else:
            try:
                timeout = check_task_timeout(timeout)
            except ValueError as exc:
                raise BadRequest("bad_request", str(exc)) from None
        job = self.dispatcher.open_job(timeout)
        self.keeper.record(JobOpened(job.id, job.created_at, job.timeout))
        if self.costs is not None:
            self.costs.opened(job.id, job.created_at)
        return job

    def add_tasks(self, job: Job, tasks: list[Any]) -> None:
        """Check and add tasks to an open job, recording them."""
        check_tasks(tasks, job.total)
        self._check_room(tasks)
        self._add_checked_tasks(job, tasks)

    def close_job(self, job: Job) -> None:
        """Every task of ``job`` has been added: it finishes once they have their results."""
        self.dispatcher.close_job(job)

    def refuse_job(self, job: Job) -> None:
        """A job whose submission was refused: none of its tasks runs (each gets the result cancelled)."""
        self.dispatcher.cancel(job)

    def _check_room(self, tasks: list[str]) -> None:
        """BadRequest if holding ``tasks`` too would take the scheduler past --max-held-bytes."""
        if self.dispatcher.held_bytes + held_bytes(tasks) > self._max_held_bytes:
            raise BadRequest("too_large", f"the scheduler holds {self.dispatcher.held_bytes >> 20} MiB "
                             f"of tasks and takes no more than {self._max_held_bytes >> 20} MiB "
                             "(--max-held-bytes): submit again once jobs have finished")

    def _add_checked_tasks(self, job: Job, tasks: list[str]) -> None:
        if tasks:
            self.keeper.record(TasksAdded(job.id, job.total, tasks))
        self.dispatcher.add_tasks(job, tasks)

    async def submit_job(self, tasks: list[Any]) -> str:
        """A whole job at once (the HTTP API): its cursor, once its tasks are kept."""
        if not tasks:
            raise BadRequest("empty_job", "a job needs at least one task")
        check_tasks(tasks, 0)  # before the job exists: a refused submission leaves nothing behind
        self._check_room(tasks)
        job = self.open_job()
        self._add_checked_tasks(job, tasks)
        self.dispatcher.close_job(job)
        await self.keeper.written()
        return job.id

    async def job_report(self, cursor: str) -> JobReport | None:
        """A job's counts, and its tasks and results once it has finished (else None and []);
        None for an unknown cursor."""
        job = self.dispatcher.jobs.get(cursor)
        if job is None:
            return None
        counts: dict[str, Any] = {"total": job.total, "done": job.done_count, "failed": job.failed_count}
        if not job.finished:
            return counts, None, []
        counts.update(self.job_cost(job))
        tasks, results = await self.read_job(job, commands=True)
        return counts, tasks, results

    def known_job(self, job_id: str) -> Job:
        """The job ``job_id`` names; BadRequest if none is held."""
        job = self.dispatcher.jobs.get(job_id)
        if job is None:
            raise BadRequest("unknown_job", f"no job {job_id[:100]!r} (never submitted, or its results "
                             f"expired{'' if self.keeper.keeps_results else ' or were delivered'})")
        return job

    async def cancel_job(self, job: Job) -> int | None:
        """Cancel a job: how many of its tasks are cancelled (0 if it was cancelled before, or by a
        cancel still under way, whose end this one waits for), or None if it had finished already.

        The backend hears of it first (a remote one records it durably), then every task
        without a result gets the result cancelled; the answer waits for the job store.
        """
        if job.finished and not job.cancelled:
            return None
        if job.cancelled:
            return 0  # by an earlier cancel: nothing more to stop
        under_way = self._cancels.get(job.id)
        if under_way is not None:  # its outcome is this one's too (its BackendError included)
            await asyncio.shield(under_way)
            return None if job.finished and not job.cancelled else 0
        done = self._cancels[job.id] = asyncio.get_running_loop().create_future()
        try:
            count = await self._cancel(job)
        except asyncio.CancelledError:  # the scheduler is stopping
            done.cancel()
            raise
        except Exception as exc:
            done.set_exception(exc)
            done.exception()  # retrieved: no one else may be waiting
            raise
        else:
            done.set_result(None)
            return count
        finally:
            del self._cancels[job.id]

    async def _cancel(self, job: Job) -> int | None:
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
        await self.keeper.written()
        # Not what dispatcher.cancel counted: the backend may have reported some queued tasks
        # cancelled already, while it was being told.
        return job.cancelled_count

    def list_jobs(self, limit: int) -> dict[str, Any]:
        """{"jobs": the newest ``limit`` jobs this scheduler holds, oldest first, with their task
        counts}, and in remote mode "fleet": the figures of everything since start (costs.py)."""
        jobs = sorted(self.dispatcher.jobs.values(), key=lambda job: job.created_at)[-limit:]
        fleet = {} if self.costs is None else {"fleet": self.costs.fleet_cost()}
        return {"jobs": [{"job": job.id, "state": job.state(), **job.counts(), "created_at": job.created_at,
                          "finished_at": job.finished_at, **self.job_cost(job)} for job in jobs], **fleet}

    def job_cost(self, job: Job) -> dict[str, Any]:
        """{"cost": its figures} for a finished remote job (costs.py; for one finished before a restart,
        those its job store kept), else {}."""
        cost = None if self.costs is None else self.costs.job_cost(job.id)
        if cost is None and isinstance(job, FinishedJob):
            cost = job.cost
        return {} if cost is None else {"cost": cost}

    async def wait_finished(self, job: Job) -> None:
        if not job.finished:
            waiter = asyncio.get_running_loop().create_future()
            self._fetchers.setdefault(job.id, []).append(waiter)
            await waiter

    async def read_job(self, job: Job, commands: bool) -> tuple[list[str], list[ResultBatch]]:
        """A finished job's tasks (if ``commands``) and results, from memory or the store."""
        return await self.keeper.read(job, commands)

    def delivered(self, job: Job) -> None:
        """A client has had every result of ``job``: without a store, nothing is left to keep it for."""
        if not self.keeper.keeps_results:
            self._forget(job)

    def _forget(self, job: Job) -> None:
        self.dispatcher.forget(job)
        if self.costs is not None:
            self.costs.forget(job.id)

    # --- results --------------------------------------------------------------------

    def _on_results(self, job: Job, batch: ResultBatch) -> None:
        self.keeper.record(ResultsAdded(job.id, batch))
        if self.costs is not None:
            self.costs.add(job.id, batch)
        for listener in self._listeners:
            listener.job_results(job, batch)

    def _on_finished(self, job: Job) -> None:
        if self.costs is not None:  # before the record (it keeps them) and the listeners (job_done)
            self.costs.finished(job.id, job.finished_at)
        self.keeper.record(JobFinished(job.id, job.total, job.finished_at, job.succeeded_count,
                                       job.failed_count, job.cancelled_count, self.job_cost(job).get("cost")))
        if self.keeper.keeps_results:
            self.dispatcher.release(job)  # the store has it all, and fetches read it from there
        for listener in self._listeners:
            listener.job_finished(job)
        for waiter in self._fetchers.pop(job.id, []):
            if not waiter.done():
                waiter.set_result(None)

    def receive_results(self, loop: asyncio.AbstractEventLoop, stop: threading.Event) -> None:
        """The receiving thread: hand the backend's result batches to the dispatcher on ``loop``
        until ``stop`` is set."""
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

    # --- start, expiry, stop ------------------------------------------------------------

    async def restore_jobs(self) -> None:
        """Take over the jobs kept from an earlier start: the unfinished ones run on."""
        jobs = await self.keeper.load(time.time() - self.result_ttl)
        unfinished = [job for job in jobs if job.finished_at is None]
        for job in jobs:
            self.dispatcher.restore(job)
        if jobs:
            log.info("job store: %d finished job(s) kept, %d unfinished resumed with %d task(s) to run",
                     len(jobs) - len(unfinished), len(unfinished),
                     sum(job.total - job.done_count for job in unfinished))

    def expire_results(self) -> None:
        """Forget the jobs that finished more than --result-ttl seconds ago."""
        now = time.time()
        expired = [job for job in self.dispatcher.jobs.values()
                   if job.finished_at is not None and now - job.finished_at > self.result_ttl]
        for job in expired:
            log.info("job %s: results expired", job.id)
            self._forget(job)
        if expired:
            self.keeper.remove([job.id for job in expired])

    async def drain(self, grace: float, force: asyncio.Event) -> bool:
        """Stop intake and let in-flight bundles finish (up to ``grace`` seconds, or until ``force``).

        Without a durable store, the tasks that cannot finish are reported failed; with one,
        they stay in the store for the next start.  True if everything in flight finished.
        """
        self._stopping = True
        durable = self.keeper.durable
        if durable:
            self.dispatcher.hold()
        else:
            self.dispatcher.fail_undispatched("scheduler shut down before this task started")
        deadline = time.monotonic() + grace
        while not self.dispatcher.idle and not force.is_set() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        finished = self.dispatcher.idle
        if not finished and not durable:
            self.dispatcher.fail_in_flight("scheduler stopped before this task finished")
        return finished

    def log_stopped(self, finished: bool) -> None:
        """Say what a stop left: jobs kept for the next start, or none."""
        unfinished = [job for job in self.dispatcher.jobs.values() if not job.finished]
        if unfinished:
            log.info("stopped: %d unfinished job(s) with %d task(s) to run, kept in %s", len(unfinished),
                     sum(job.total - job.done_count for job in unfinished), self.kept_in)
        else:
            log.info("stopped: every job finished%s", "" if finished else " (what was in flight failed)")


def check_tasks(tasks: list[Any], already: int) -> None:
    """BadRequest unless ``tasks`` may join a job of ``already`` tasks."""
    if not all(type(t) is str for t in tasks):
        raise BadRequest("bad_request", "tasks must be strings")
    if first_too_long(tasks) is not None:
        raise BadRequest("bad_request", f"a task is longer than {MAX_COMMAND_BYTES} bytes")
    if already + len(tasks) > MAX_JOB_TASKS:
        raise BadRequest("too_large", f"a job holds at most {MAX_JOB_TASKS} tasks")

