"""Jobs in a scheduler: their tasks, their results so far, and who runs next.

Owns the bookkeeping between the job service and a backend: which tasks of which job are
still to be bundled, which bundles are out, which tasks have their result (each task gets
exactly one: later duplicates are dropped), and the fair share of the backend between jobs
(round robin, one bundle at a time, so a small job is not stuck behind a million-task one).
Knows neither sockets nor which backend it feeds.

A bundle is a time-boxed lease on a run of a job's tasks, cut by the estimates of those
tasks (estimates.py, backend.plan_bundle).  Tasks a worker hands back unstarted (its time
box ran out, or the backend took them for an idle worker) go to the front of their job's
queue, and the job to the front of the turn order, so that the next free worker takes
them.  Only the bundle that holds a task may hand it back: a duplicate delivery of an old
bundle cannot queue a task twice.

Runs in one thread (the scheduler's event loop); results reach it from the backend's
receiving thread through ``handle_results``.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections import deque
from collections.abc import Callable, Iterable
from functools import partial
from itertools import islice

from cloudkon.backend import MAX_BUNDLE_TASKS, Backend, commands_that_fit, plan_bundle
from cloudkon.estimates import JobTimes, TaskTimes
from cloudkon.repeats import ThrottledLog
from cloudkon.tasks import CANCELLED, Bundle, ResultBatch, failed_batch

log = logging.getLogger("cloudkon.jobs")

# Tasks whose estimates are looked at first when cutting a bundle; eight times more each
# round while they all fit (a bundle of long tasks needs only its first few looked at).
FIRST_LOOK_TASKS = 16
# Tasks per batch of results the scheduler makes up itself (cancelled, failed at shutdown):
# a batch of a million would not fit in one frame to the client or one job-store record.
SYNTHETIC_BATCH_TASKS = 50_000
# Results dropped (duplicates, for unknown jobs or tasks) are logged at most this often, with a count.
DROPPED_LOG_SECONDS = 60.0
# What a task held in memory counts beyond its command's length (its string, id and result
# bookkeeping), so that a limit on held bytes bounds memory for short commands too.
TASK_OVERHEAD_BYTES = 64


class Job:
    """One submission: its tasks (task id = position) and the results received.

    A job restored from a store after a restart may have results for tasks past
    ``next_task``: bundles skip them, so a task with a result never runs again.
    """

    def __init__(self, job_id: str, timeout: float | None, created_at: float | None = None) -> None:
        self.id = job_id
        self.timeout = timeout
        self.commands: list[str] = []
        self.held_bytes = 0  # what its commands weigh in memory (TASK_OVERHEAD_BYTES each included)
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
        # Tasks handed back unstarted, to run before the rest (ids leave the set once taken
        # again or given a result; the deque keeps their order and may hold stale ids).
        self.returned: deque[int] = deque()
        self.returned_set: set[int] = set()
        self.times: JobTimes | None = None  # set by the dispatcher that runs the job
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
        if self.cancelled or self.finished:
            return "cancelled" if self.cancelled else "finished"
        return "running" if self.closed else "open"

    def counts(self) -> dict[str, int]:
        """Its tasks by where they are: queued (in no bundle), running (in a bundle out), and done."""
        return {"total": self.total, "queued": self.undispatched,
                "running": self.total - self.done_count - self.undispatched,
                "succeeded": self.succeeded_count, "failed": self.failed_count - self.cancelled_count,
                "cancelled": self.cancelled_count}

    def add_tasks(self, commands: list[str]) -> int:
        """Add tasks to the job; what they weigh held in memory (held_bytes)."""
        weight = held_bytes(commands)
        self.commands.extend(commands)
        self.held_bytes += weight
        self.done.extend(bytes(len(commands)))
        self.total += len(commands)
        self.undispatched += len(commands)
        return weight

    def take_bundle(self, number: int, target_seconds: float, slots: int, margin_seconds: float) -> Bundle:
        """The job's next tasks as bundle ``number``: handed-back ones first, then the next
        run of tasks without a result; about ``target_seconds`` of them by their estimates."""
        assert self.times is not None, "a job is bundled by the dispatcher that holds it"
        # What is left of the job, spread over every slot: the same share for each bundle cut
        # now, however many are cut in a row.
        even_share = -(-(self.total - self.done_count) // max(slots, 1))
        look = FIRST_LOOK_TASKS
        while True:
            ids = self._next_ids(look)
            commands = [self.commands[i] for i in ids]
            count, budget = plan_bundle(self.times.estimates(commands), target_seconds, even_share,
                                        margin_seconds)
            if count < len(ids) or len(ids) < look or look >= MAX_BUNDLE_TASKS:
                break
            look = min(look * 8, MAX_BUNDLE_TASKS)
        count = commands_that_fit(commands[:count])
        ids, commands = ids[:count], commands[:count]
        self._take(ids)
        return Bundle(self.id, number, ids, commands, self.timeout, budget)

    def _next_ids(self, limit: int) -> list[int]:
        """Up to ``limit`` of the tasks to bundle next, in order: handed-back ones, else a run."""
        if self.returned_set:
            return list(islice((i for i in self.returned if i in self.returned_set), limit))
        start = self.done.find(0, self.next_task)
        stop = self.done.find(1, start, start + limit)  # a run stops before a task with a result
        return list(range(start, min(start + limit, self.total) if stop < 0 else stop))

    def _take(self, ids: list[int]) -> None:
        if self.returned_set:
            taken = set(ids)
            self.returned_set -= taken
            while taken:
                taken.discard(self.returned.popleft())
            if not self.returned_set:
                self.returned.clear()
        else:
            self.next_task = ids[-1] + 1
        self.undispatched -= len(ids)

    def give_back(self, ids: list[int]) -> int:
        """Queue handed-back tasks ahead of the rest (those without a result); how many."""
        back = [i for i in ids if not self.done[i] and i not in self.returned_set]
        self.returned.extendleft(reversed(back))
        self.returned_set.update(back)
        self.undispatched += len(back)
        return len(back)

    def keep_new(self, batch: ResultBatch) -> ResultBatch:
        """Record the results in ``batch`` that are new, and return just those (without the
        tasks it handed back: those are the dispatcher's business, not its clients')."""
        done, total = self.done, self.total
        fresh = [] if self.finished else \
            [p for p, i in enumerate(batch.ids) if 0 <= i < total and not done[i]]
        if len(fresh) != len(batch.ids) or batch.returned:
            batch = batch.select(fresh)
        for i in batch.ids:
            done[i] = 1
        if batch.ids and max(batch.ids) >= self.next_task:  # not from a bundle of ours: after a restart
            self.undispatched -= sum(1 for i in batch.ids if i >= self.next_task)
        if self.returned_set:  # a duplicate's result for a task that was handed back meanwhile
            queued = self.returned_set.intersection(batch.ids)
            self.returned_set -= queued
            self.undispatched -= len(queued)
        self.done_count += len(batch)
        self.failed_count += batch.failed_count()
        self.cancelled_count += batch.cancelled_count()
        if self.times is not None and batch.ids:
            self.times.learn(self.commands, batch)
        if batch.ids and self.results is not None:
            self.results.append(batch)
        return batch

    def release(self) -> None:
        """Drop what a finished job no longer needs in memory (its store keeps it)."""
        self.commands, self.done, self.results, self.times, self.held_bytes = [], bytearray(), None, None, 0

    def unqueue(self, in_flight: bool = True) -> list[int]:
        """Empty the job's queue (no more of its tasks will be bundled): the ids of its tasks
        without a result, those in bundles out included if ``in_flight``."""
        first = 0 if in_flight else self.next_task
        queued = [] if in_flight else [i for i in self.returned if i in self.returned_set]
        pending = queued + [i for i in range(first, self.total) if not self.done[i]]
        self.next_task, self.undispatched = self.total, 0
        self.returned, self.returned_set = deque(), set()
        return pending


class Dispatcher:
    """The jobs of one scheduler, fed to one backend fairly."""

    def __init__(self, backend: Backend, on_results: Callable[[Job, ResultBatch], None],
                 on_finished: Callable[[Job], None], first_bundle: int = 0) -> None:
        self.backend = backend
        self.jobs: dict[str, Job] = {}
        self.task_times = TaskTimes()
        self._on_results = on_results
        self._on_finished = on_finished
        self._ready: deque[Job] = deque()  # jobs with undispatched tasks, in turn order
        # bundle number -> (bundle, its tasks without a result from it); a result for a task
        # counts here even when another bundle delivered that task's result first.
        self._in_flight: dict[int, tuple[Bundle, set[int]]] = {}
        # Bundle numbers are never reused, even across restarts (remote claims are per number).
        self._next_bundle = first_bundle
        self._held = False  # shutting down: no more bundles
        # Shutting down without a store: why a task that is not run now never will be.
        self._unrun_reason: str | None = None
        dropped = partial(ThrottledLog, log, seconds=DROPPED_LOG_SECONDS)
        self._unknown_job = dropped(logging.INFO, "results for no job held here, dropped")
        self._beyond_job = dropped(logging.WARNING, "results for no task of their job, dropped")
        self._duplicates = dropped(logging.INFO, "results for tasks that had one, dropped")
        self.held_bytes = 0  # of every job's commands held in memory (Job.held_bytes)

    @property
    def idle(self) -> bool:
        return not self._in_flight

    @property
    def bundles_in_flight(self) -> int:
        """Bundles submitted to the backend whose results are not all in (safe to read from any thread)."""
        return len(self._in_flight)

    def open_job(self, timeout: float | None = None) -> Job:
        job = Job(secrets.token_hex(8), timeout)
        job.times = JobTimes(self.task_times)
        self.jobs[job.id] = job
        return job

    def restore(self, job: Job) -> None:
        """Take over a job read back from a store; its tasks without a result run again."""
        self.jobs[job.id] = job
        job.held_bytes = held_bytes(job.commands)
        self.held_bytes += job.held_bytes
        job.times = JobTimes(self.task_times)
        if job.undispatched:
            self._ready.append(job)
        elif job.finished and job.finished_at is None:
            self._finish(job)
        self.pump()

    def add_tasks(self, job: Job, commands: list[str]) -> None:
        if not commands:
            return
        first, queued = job.total, job.undispatched > 0
        self.held_bytes += job.add_tasks(commands)
        if job.cancelled:  # still arriving after a cancel: each gets its result at once
            job.next_task, job.undispatched = job.total, 0
            self.handle_results(_synthetic(job.id, None, list(range(first, job.total)), CANCELLED))
            return
        if not queued:  # it had no turn: it takes one now
            self._ready.append(job)
        self.pump()

    def cancel(self, job: Job) -> int:
        """Give every task of ``job`` still without a result the result CANCELLED; how many.

        The backend is told separately (Backend.cancel) to stop the ones it holds; what they
        report later is a duplicate and dropped.  A finished job is left alone (0)."""
        if job.finished:
            return 0
        job.cancelled = job.cancelling = True
        pending = job.unqueue()
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
        if self.jobs.pop(job.id, None) is not None:
            self.held_bytes -= job.held_bytes

    def release(self, job: Job) -> None:
        """Drop a finished job's commands and results from memory (a store keeps them)."""
        self.held_bytes -= job.held_bytes
        job.release()

    def pump(self) -> None:
        """Submit bundles, one job's at a time in turn, until the backend holds enough."""
        capacity, slots = self.backend.capacity(), self.backend.workers()
        while self._ready and len(self._in_flight) < capacity and not self._held:
            job = self._ready.popleft()
            if not job.undispatched or job.cancelling:  # results from an earlier start's bundles; a cancel
                continue
            bundle = job.take_bundle(self._next_bundle, self.backend.target_bundle_seconds, slots,
                                     self.backend.time_box_margin)
            self._next_bundle += 1
            self._in_flight[bundle.bundle] = (bundle, set(bundle.ids))
            self.backend.submit(bundle)
            if job.undispatched:
                self._ready.append(job)

    def handle_results(self, batches: Iterable[ResultBatch]) -> None:
        for batch in batches:
            job = self.jobs.get(batch.job)
            fresh = job.keep_new(batch) if job is not None else batch
            if job is None or len(fresh.ids) < len(batch.ids):
                self._count_dropped(job, batch, len(batch.ids) - len(fresh.ids))
            in_flight = self._in_flight.get(batch.bundle)  # type: ignore[arg-type]
            if in_flight is not None and in_flight[0].job == batch.job:
                due = in_flight[1]
                due.difference_update(batch.ids)
                if batch.returned:
                    self._take_back(job, due, batch.returned)
                if not due:
                    del self._in_flight[batch.bundle]
            if job is None or not fresh.ids:
                continue
            self._on_results(job, fresh)
            if job.finished:
                self._finish(job)
        self.pump()

    def _count_dropped(self, job: Job | None, batch: ResultBatch, dropped: int) -> None:
        """Log (throttled) results not recorded: for no job held, no task of the job, or a task that
        had its result (a duplicate delivery, a late reply after a cancel)."""
        if job is None:
            if batch.ids:
                self._unknown_job.add(len(batch.ids), f"job {batch.job[:64]!r}")
            return
        beyond = sum(1 for i in batch.ids if not 0 <= i < job.total)
        if beyond:
            self._beyond_job.add(beyond, f"job {job.id}, {job.total} tasks")
        if dropped > beyond:
            self._duplicates.add(dropped - beyond, f"job {job.id}")

    def _take_back(self, job: Job | None, due: set[int], returned: list[int]) -> None:
        """Queue again the tasks a bundle handed back, if that bundle still holds them."""
        held = [i for i in returned if i in due]
        due.difference_update(held)
        if job is None or not held:  # queued even while a cancel is told: it may fail (then they run)
            return
        if self._unrun_reason is not None:  # nothing runs any more: it gets its result now
            self.handle_results(_synthetic(job.id, None, [i for i in held if not job.done[i]],
                                           self._unrun_reason))
            return
        if job.give_back(held):
            if job in self._ready:
                self._ready.remove(job)
            self._ready.appendleft(job)  # the next free worker takes them

    def hold(self) -> None:
        """Submit no more bundles (shutting down with a store that keeps the rest)."""
        self._held = True

    def fail_undispatched(self, reason: str) -> None:
        """Report every task not yet given to the backend as failed, and any a bundle hands
        back from now on (shutting down without a store); submit no more bundles."""
        self._held = True
        self._unrun_reason = reason
        while self._ready:
            job = self._ready.popleft()
            self.handle_results(_synthetic(job.id, None, job.unqueue(in_flight=False), reason))

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
        counts = job.counts()
        log.info("job %s %s: %d tasks, %d failed, %d cancelled, %.2f s", job.id,
                 "cancelled" if job.cancelled else "finished", job.total, counts["failed"],
                 counts["cancelled"], job.finished_at - job.created_at)
        self._on_finished(job)


def held_bytes(commands: list[str]) -> int:
    """What ``commands`` weigh held in memory, by the measure of Job.held_bytes."""
    return sum(map(len, commands)) + TASK_OVERHEAD_BYTES * len(commands)


def _synthetic(job: str, bundle: int | None, ids: list[int], error: str) -> list[ResultBatch]:
    """Results saying tasks ``ids`` ended with ``error``, in batches of a size every carrier takes."""
    return [failed_batch(job, bundle, ids[start:start + SYNTHETIC_BATCH_TASKS], error)
            for start in range(0, len(ids), SYNTHETIC_BATCH_TASKS)] or [failed_batch(job, bundle, [], error)]
