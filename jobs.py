"""Jobs in a scheduler: their tasks, their results so far, and who runs next.

Owns the bookkeeping between the protocol and a backend: which tasks of which job
are still to be bundled, which bundles are out, which tasks have their result
(each task gets exactly one: later duplicates are dropped), and the fair share of
the backend between jobs (round robin, one bundle at a time, so a small job is not
stuck behind a million-task one).  Knows neither sockets nor which backend it feeds.

Runs in one thread (the scheduler's event loop); results reach it from the
backend's receiving thread through ``handle_results``.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections import deque
from collections.abc import Callable, Iterable

from backend import MAX_BUNDLE_COMMAND_BYTES, Backend, bundle_size
from tasks import CANCELLED, Bundle, ResultBatch, failed_batch

log = logging.getLogger("cloudkon.jobs")

# Tasks per batch of results the scheduler makes up itself (cancelled, failed at shutdown):
# a batch of a million would not fit in one frame to the client or one job-store record.
SYNTHETIC_BATCH_TASKS = 50_000


class Job:
    """One submission: its tasks (task id = position) and the results received.

    A job restored from a store after a restart may have results for tasks past
    ``next_task``: bundles skip them, so a task with a result never runs again.
    """

    def __init__(self, job_id: str, timeout: float | None, created_at: float | None = None) -> None:
        self.id = job_id
        self.timeout = timeout
        self.commands: list[str] = []
        self.total = 0
        self.closed = False  # every task has been submitted
        self.next_task = 0  # tasks before it are in a bundle or have a result
        self.undispatched = 0  # tasks in no bundle and without a result
        self.done = bytearray()  # 1 for each task with a result
        self.done_count = 0
        self.failed_count = 0  # results that are not a success, cancelled ones included
        self.cancelled_count = 0
        self.cancelling = False  # no more bundles: a cancel is on its way
        self.cancelled = False
        self.results: list[ResultBatch] | None = []  # None: a store keeps them instead
        self.elapsed_total_us = 0
        self.created_at = time.time() if created_at is None else created_at
        self.finished_at: float | None = None

    @property
    def finished(self) -> bool:
        return self.closed and self.done_count == self.total

    @property
    def succeeded_count(self) -> int:
        return self.done_count - self.failed_count

    def state(self) -> str:
        """open (tasks still arriving), running, finished or cancelled."""
        if self.cancelled:
            return "cancelled"
        if self.finished:
            return "finished"
        return "running" if self.closed else "open"

    def counts(self) -> dict[str, int]:
        """Its tasks by where they are: queued (in no bundle), running (in a bundle out), and done."""
        return {"total": self.total, "queued": self.undispatched,
                "running": self.total - self.done_count - self.undispatched,
                "succeeded": self.succeeded_count, "failed": self.failed_count - self.cancelled_count,
                "cancelled": self.cancelled_count}

    def avg_task_us(self) -> float | None:
        return self.elapsed_total_us / self.done_count if self.done_count else None

    def add_tasks(self, commands: list[str]) -> None:
        self.commands.extend(commands)
        self.done.extend(bytes(len(commands)))
        self.total += len(commands)
        self.undispatched += len(commands)

    def take_bundle(self, number: int, size: int) -> Bundle:
        """Up to ``size`` undispatched tasks in a row (fewer if they are long) as bundle ``number``."""
        start = self.done.find(0, self.next_task)
        stop = self.done.find(1, start, start + size)
        run_end = min(start + size, self.total) if stop < 0 else stop  # before a task with a result
        end = run_end
        commands = self.commands[start:end]
        if end - start > 1 and sum(map(len, commands)) > MAX_BUNDLE_COMMAND_BYTES:
            end = start + 1
            budget = len(commands[0])
            while end < run_end and budget + len(self.commands[end]) <= MAX_BUNDLE_COMMAND_BYTES:
                budget += len(self.commands[end])
                end += 1
            commands = self.commands[start:end]
        self.next_task = end
        self.undispatched -= end - start
        return Bundle(self.id, number, list(range(start, end)), commands, self.timeout)

    def keep_new(self, batch: ResultBatch) -> ResultBatch:
        """Record the results in ``batch`` that are new, and return just those."""
        done, total = self.done, self.total
        if self.finished:
            fresh = []
        else:
            fresh = [p for p, i in enumerate(batch.ids) if 0 <= i < total and not done[i]]
        if len(fresh) != len(batch.ids):
            batch = batch.select(fresh)
        for i in batch.ids:
            done[i] = 1
        if batch.ids and max(batch.ids) >= self.next_task:  # not from a bundle of ours: after a restart
            self.undispatched -= sum(1 for i in batch.ids if i >= self.next_task)
        self.done_count += len(batch)
        self.failed_count += batch.failed_count()
        self.cancelled_count += batch.cancelled_count()
        self.elapsed_total_us += sum(batch.elapsed_us)
        if batch.ids and self.results is not None:
            self.results.append(batch)
        return batch

    def release(self) -> None:
        """Drop what a finished job no longer needs in memory (its store keeps it)."""
        self.commands, self.done, self.results = [], bytearray(), None


class Dispatcher:
    """The jobs of one scheduler, fed to one backend fairly."""

    def __init__(self, backend: Backend,
                 on_results: Callable[[Job, ResultBatch], None],
                 on_finished: Callable[[Job], None], first_bundle: int = 0) -> None:
        self.backend = backend
        self.jobs: dict[str, Job] = {}
        self._on_results = on_results
        self._on_finished = on_finished
        self._ready: deque[Job] = deque()  # jobs with undispatched tasks, in turn order
        # bundle number -> (bundle, its tasks without a result from it); a result for a task
        # counts here even when another bundle delivered that task's result first.
        self._in_flight: dict[int, tuple[Bundle, set[int]]] = {}
        # Bundle numbers are never reused, even across restarts (remote claims are per number).
        self._next_bundle = first_bundle
        self._held = False  # shutting down: no more bundles

    @property
    def idle(self) -> bool:
        return not self._in_flight

    @property
    def bundles_in_flight(self) -> int:
        """Bundles submitted to the backend whose results are not all in (safe to read from any thread)."""
        return len(self._in_flight)

    def open_job(self, timeout: float | None = None) -> Job:
        job = Job(secrets.token_hex(8), timeout)
        self.jobs[job.id] = job
        return job

    def restore(self, job: Job) -> None:
        """Take over a job read back from a store; its tasks without a result run again."""
        self.jobs[job.id] = job
        if job.undispatched:
            self._ready.append(job)
        elif job.finished and job.finished_at is None:
            self._finish(job)
        self.pump()

    def add_tasks(self, job: Job, commands: list[str]) -> None:
        if not commands:
            return
        if job.cancelled:  # still arriving after a cancel: each gets its result at once
            first = job.total
            job.add_tasks(commands)
            job.next_task, job.undispatched = job.total, 0
            self.handle_results(_synthetic(job.id, None, list(range(first, job.total)), CANCELLED))
            return
        if job.undispatched == 0:
            self._ready.append(job)
        job.add_tasks(commands)
        self.pump()

    def cancel(self, job: Job) -> int:
        """Give every task of ``job`` still without a result the result CANCELLED; how many.

        The backend is told separately (Backend.cancel) to stop the ones it holds; what
        they report later is a duplicate and dropped.  A finished job is left alone (0).
        """
        if job.finished:
            return 0
        job.cancelled = job.cancelling = True
        pending = [i for i in range(job.total) if not job.done[i]]
        job.next_task, job.undispatched = job.total, 0
        for number in [n for n, (bundle, _) in self._in_flight.items() if bundle.job == job.id]:
            del self._in_flight[number]  # free for other jobs now; late replies are dropped
        log.info("job %s cancelled: %d task(s) without a result", job.id, len(pending))
        self.handle_results(_synthetic(job.id, None, pending, CANCELLED))
        return len(pending)

    def close_job(self, job: Job) -> None:
        job.closed = True
        if job.finished:
            self._finish(job)

    def forget(self, job: Job) -> None:
        self.jobs.pop(job.id, None)

    def pump(self) -> None:
        """Submit bundles, one job's at a time in turn, until the backend holds enough."""
        capacity = self.backend.capacity()
        while self._ready and len(self._in_flight) < capacity and not self._held:
            job = self._ready.popleft()
            if not job.undispatched or job.cancelling:  # results from an earlier start's bundles; a cancel
                continue
            size = bundle_size(job.avg_task_us(), job.undispatched, capacity,
                               self.backend.target_bundle_seconds)
            bundle = job.take_bundle(self._next_bundle, size)
            self._next_bundle += 1
            self._in_flight[bundle.bundle] = (bundle, set(bundle.ids))
            self.backend.submit(bundle)
            if job.undispatched:
                self._ready.append(job)

    def handle_results(self, batches: Iterable[ResultBatch]) -> None:
        for batch in batches:
            job = self.jobs.get(batch.job)
            fresh = job.keep_new(batch) if job is not None else batch
            if batch.bundle in self._in_flight:
                due = self._in_flight[batch.bundle][1]
                due.difference_update(batch.ids)
                if not due:
                    del self._in_flight[batch.bundle]
            if job is None or not fresh.ids:
                continue
            self._on_results(job, fresh)
            if job.finished:
                self._finish(job)
        self.pump()

    def hold(self) -> None:
        """Submit no more bundles (shutting down with a store that keeps the rest)."""
        self._held = True

    def fail_undispatched(self, reason: str) -> None:
        """Report every task not yet given to the backend as failed (shutting down)."""
        while self._ready:
            job = self._ready.popleft()
            ids = [i for i in range(job.next_task, job.total) if not job.done[i]]
            job.next_task, job.undispatched = job.total, 0
            self.handle_results(_synthetic(job.id, None, ids, reason))

    def fail_in_flight(self, reason: str) -> None:
        """Report every task the backend holds as failed (stopping without waiting)."""
        batches = []
        for bundle, _ in list(self._in_flight.values()):
            job = self.jobs.get(bundle.job)
            missing = [i for i in bundle.ids if job is not None and not job.finished and not job.done[i]]
            batches += _synthetic(bundle.job, bundle.bundle, missing, reason)
        self._in_flight.clear()
        self.handle_results(batches)

    def _finish(self, job: Job) -> None:
        job.finished_at = time.time()
        elapsed = job.finished_at - job.created_at
        counts = job.counts()
        log.info("job %s %s: %d tasks, %d failed, %d cancelled, %.2f s", job.id,
                 "cancelled" if job.cancelled else "finished", job.total, counts["failed"],
                 counts["cancelled"], elapsed)
        self._on_finished(job)


def _synthetic(job: str, bundle: int | None, ids: list[int], error: str) -> list[ResultBatch]:
    """Results saying tasks ``ids`` ended with ``error``, in batches of a size every carrier takes."""
    return [failed_batch(job, bundle, ids[start:start + SYNTHETIC_BATCH_TASKS], error)
            for start in range(0, len(ids), SYNTHETIC_BATCH_TASKS)] or [failed_batch(job, bundle, [], error)]
