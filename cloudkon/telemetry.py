"""The scheduler's figures: what its Prometheus metrics (metrics.py) and its dashboard show.

Owns ``Telemetry``, a listener of the job service (service.JobListener) that counts each
result batch as it is recorded: tasks by how they ended, how long they ran, tasks finished per
THROUGHPUT_BUCKET_SECONDS, each job's recent progress and first failures; and the fleet's size
at each scaling pass.  The job store's write times are a histogram of their own
(store_write_seconds), which the journal feeds from its thread.  What is a
state rather than an event (tasks queued and running, bundles out, workers, the fleet's
instances, AWS requests) is read when scraped.  Counting is per batch, with C-speed list
operations: no Python step per task on the hot path (a batch of a thousand ``sleep 0`` costs a
few microseconds).

``families()`` gives the metrics, ``dashboard_state()`` the dashboard's JSON (the contract in
docs/openapi.json, DashboardState).  Runs on the event loop (the HTTP threads ask through it),
but for ``fleet_scanned`` (the scaling thread).
"""

from __future__ import annotations

import heapq
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from typing import Any

from cloudkon.jobs import Job
from cloudkon.metrics import Counter, Family, Gauge, Histogram, ScrapedCounter
from cloudkon.service import JobService
from cloudkon.tasks import CANCELLED, ResultBatch, first_output_line, is_success

# Task durations: from instant tasks to the ten minutes past which a task is "long".
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
# Job-store writes: a local SQLite commit takes a millisecond, a DynamoDB batch tens.
STORE_WRITE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
# Tasks finished are counted per this many seconds, over the last THROUGHPUT_SECONDS.
THROUGHPUT_BUCKET_SECONDS = 5
THROUGHPUT_SECONDS = 600
# A job's rate is over its last this many seconds (its lifetime, if shorter).
RATE_WINDOW_SECONDS = 60.0
# Jobs the dashboard lists (newest first), failures it shows of each, characters of their output.
DASHBOARD_JOBS = 100
FAILURES_SHOWN = 5
FIRST_LINE_CHARS = 200
# Jobs whose progress and failures are kept (the oldest are dropped): what the dashboard lists, and more.
JOBS_FOLLOWED = 4 * DASHBOARD_JOBS
# The fleet's size: a point per scaling pass, the last hour's, at most this many (an hour of the
# default 5 s passes).
FLEET_SIZE_SECONDS = 3600.0
FLEET_SIZE_POINTS = 720
# Workers whose last results are remembered (the least recently heard of are dropped).
WORKERS_FOLLOWED = 10_000
# Workers' states (Backend.worker_states) that are a worker taking tasks.
ALIVE_STATES = ("busy", "idle", "running")


class _Followed:
    """What the dashboard shows of one job beyond its counts: progress marks and first failures."""

    def __init__(self) -> None:
        # (time of the first batch of a THROUGHPUT_BUCKET_SECONDS bucket, tasks done before it)
        self.marks: deque[tuple[float, int]] = deque(
            maxlen=int(RATE_WINDOW_SECONDS // THROUGHPUT_BUCKET_SECONDS) + 2)
        self.failures: list[dict[str, Any]] = []


def store_write_seconds() -> Histogram:
    """The job store's write times, made before the store (its journal reports to it) and the
    Telemetry that shows it."""
    return Histogram("cloudkon_job_store_write_seconds", "How long each write of records to the job "
                     "store took (writes that failed not included)", STORE_WRITE_BUCKETS)


class Telemetry:
    """The figures of one scheduler (its job service, backend and, remote, its AWS calls and fleet)."""

    def __init__(self, service: JobService, store_writes: Histogram,
                 aws_calls: Callable[[], dict[str, int]] | None = None, fleet: Any = None) -> None:
        self.service = service
        self.store_writes = store_writes
        self._aws_calls = aws_calls
        self._fleet = fleet  # provisioning.Fleet, or None
        self.finished = Counter("cloudkon_tasks_finished_total", "Tasks given their result by this scheduler "
                                "process, by how they ended (failed: cancelled ones not included)", ["state"])
        self.durations = Histogram("cloudkon_task_duration_seconds", "How long tasks ran, from their "
                                   "results (cancelled ones not included)", DURATION_BUCKETS, scale=1e6)
        for state in ("succeeded", "failed", "cancelled"):  # each shown from the start, at 0
            self.finished.inc(0, (state,))
        self._throughput: deque[list[int]] = deque(maxlen=THROUGHPUT_SECONDS // THROUGHPUT_BUCKET_SECONDS)
        self._followed: OrderedDict[str, _Followed] = OrderedDict()
        self._fleet_size: deque[tuple[float, int]] = deque(maxlen=FLEET_SIZE_POINTS)
        # Each worker's last result batch: (job, tasks in it, epoch seconds).  A remote scheduler
        # does not know which instance holds which bundle: this is what it knows of each one's work.
        self._last_results: OrderedDict[str, tuple[str, int, float]] = OrderedDict()

    # --- events ----------------------------------------------------------------------------

    def job_results(self, job: Job, batch: ResultBatch) -> None:
        count = len(batch.ids)
        cancelled = batch.cancelled_count()
        failed = batch.failed_count() - cancelled
        self.finished.inc(count - failed - cancelled, ("succeeded",))
        if failed:
            self.finished.inc(failed, ("failed",))
        if cancelled:
            self.finished.inc(cancelled, ("cancelled",))
        ran = batch.elapsed_us if not cancelled else \
            [us for us, error in zip(batch.elapsed_us, batch.errors, strict=True) if error != CANCELLED]
        self.durations.observe_many(ran)
        now = time.time()
        bucket = int(now) - int(now) % THROUGHPUT_BUCKET_SECONDS
        if self._throughput and self._throughput[-1][0] == bucket:
            self._throughput[-1][1] += len(ran)
        else:
            self._throughput.append([bucket, len(ran)])
        if batch.worker is not None:
            self._last_results[batch.worker] = (job.id, count, now)
            self._last_results.move_to_end(batch.worker)
            if len(self._last_results) > WORKERS_FOLLOWED:
                self._last_results.popitem(last=False)
        followed = self._follow(job.id)
        if not followed.marks or followed.marks[-1][0] < bucket:
            followed.marks.append((now, job.done_count - count))
        if failed and len(followed.failures) < FAILURES_SHOWN:
            followed.failures += _failures(job, batch, FAILURES_SHOWN - len(followed.failures))

    def job_finished(self, job: Job) -> None:
        return None  # its counts say it all

    def fleet_scanned(self) -> None:
        """A scaling pass has looked at the fleet (the scaling thread): one more point of its size."""
        if self._fleet is not None:  # its instances up (pending or running) are the workers listed
            self._fleet_size.append((time.time(), len(self.service.backend.worker_states())))

    def _follow(self, job_id: str) -> _Followed:
        followed = self._followed.get(job_id)
        if followed is None:
            followed = self._followed[job_id] = _Followed()
            if len(self._followed) > JOBS_FOLLOWED:
                self._followed.popitem(last=False)
        return followed

    # --- metrics ----------------------------------------------------------------------------

    def families(self) -> list[Family]:
        """Every metric, its state read now."""
        dispatcher, backend = self.service.dispatcher, self.service.backend
        unfinished = [job for job in dispatcher.jobs.values() if not job.finished]
        queued = sum(job.undispatched for job in unfinished)
        without_result = sum(job.total - job.done_count for job in unfinished)
        finished = self.finished.total()
        jobs_by_state: dict[tuple[str, ...], float] = {(state,): 0 for state in
                                                       ("open", "running", "finished", "cancelled")}
        for job in dispatcher.jobs.values():
            jobs_by_state[(job.state(),)] += 1
        workers = backend.worker_states()
        families: list[Family] = [
            ScrapedCounter("cloudkon_tasks_submitted_total", "Tasks taken by this scheduler process "
                           "(submitted, or resumed from the job store at start)",
                           lambda: finished + without_result),
            self.finished,
            Gauge("cloudkon_tasks_queued", "Tasks waiting for a worker (in no bundle out)", lambda: queued),
            Gauge("cloudkon_tasks_running", "Tasks in bundles out to workers, without a result yet",
                  lambda: without_result - queued),
            self.durations,
            Gauge("cloudkon_jobs", "Jobs held, by state", lambda: jobs_by_state, ["state"]),
            Gauge("cloudkon_bundles_in_flight", "Bundles out to workers whose results are not all in",
                  lambda: dispatcher.bundles_in_flight),
            Gauge("cloudkon_workers_alive", "Workers taking tasks: local worker processes, or a fleet's "
                  "instances that have sent a heartbeat",
                  lambda: sum(1 for worker in workers if worker["state"] in ALIVE_STATES)),
            Gauge("cloudkon_task_slots", "Tasks the backend runs at once, as far as it knows",
                  backend.workers),
            self.store_writes,
        ]
        if self._fleet is not None:
            families.append(Gauge("cloudkon_fleet_instances", "The fleet's instances at the last scaling "
                                  "pass, by EC2 state", self._instances_by_state, ["state"]))
        if self._aws_calls is not None:
            aws_calls = self._aws_calls
            families.append(ScrapedCounter(
                "cloudkon_aws_requests_total", "AWS requests this scheduler process made",
                lambda: {tuple(name.partition(".")[::2]): n for name, n in aws_calls().items()},
                ["service", "operation"]))
        return families

    def _instances_by_state(self) -> dict[tuple[str, ...], float]:
        counts: dict[tuple[str, ...], float] = {}
        for instance in self._fleet.instances_seen():
            counts[(instance["state"],)] = counts.get((instance["state"],), 0) + 1
        return counts

    # --- the dashboard ----------------------------------------------------------------------

    def dashboard_state(self) -> dict[str, Any]:
        """The dashboard's whole state (docs/openapi.json, DashboardState)."""
        now = time.time()
        service = self.service
        jobs = heapq.nlargest(DASHBOARD_JOBS, service.dispatcher.jobs.values(),
                              key=lambda job: job.created_at)
        fleet = None
        if self._fleet is not None:
            fleet = {"size": [[at, size] for at, size in list(self._fleet_size)
                              if at >= now - FLEET_SIZE_SECONDS],
                     "by_state": {state: n for (state,), n in self._instances_by_state().items()},
                     "cost": None if service.costs is None else service.costs.fleet_cost()}
        return {"mode": "local" if service.backend.name == "local" else "remote", "now": now,
                "backend": service.backend.describe(),
                "jobs": [self._job_state(job, now) for job in jobs],
                "workers": [self._worker_state(worker) for worker in service.backend.worker_states()],
                "throughput": self._throughput_points(now), "fleet": fleet}

    def _worker_state(self, worker: dict[str, Any]) -> dict[str, Any]:
        """A worker as the backend sees it, and its last results as this scheduler received them."""
        last = self._last_results.get(worker["id"])
        return {**worker, "last_results": None if last is None else
                {"job": last[0], "tasks": last[1], "at": last[2]}}

    def _job_state(self, job: Job, now: float) -> dict[str, Any]:
        counts = job.counts()
        followed = self._followed.get(job.id)
        rate = self._rate(job, followed, now)
        remaining = job.total - job.done_count
        eta = remaining / rate if rate and not job.finished else None
        return {"id": job.id, "state": job.state(), "total": job.total, "done": job.done_count,
                "failed": counts["failed"], "cancelled": counts["cancelled"], "queued": counts["queued"],
                "running": counts["running"], "created_at": job.created_at, "finished_at": job.finished_at,
                "rate": rate, "eta_seconds": eta,
                "failures": [] if followed is None else list(followed.failures),
                **(self.service.job_cost(job) if job.finished else {})}

    @staticmethod
    def _rate(job: Job, followed: _Followed | None, now: float) -> float:
        """Tasks done per second over the job's last RATE_WINDOW_SECONDS (its lifetime, if shorter;
        up to its end, once finished), to a bucket's precision."""
        end = job.finished_at or now
        start = max(end - RATE_WINDOW_SECONDS, job.created_at)
        if followed is None or end <= start:
            return 0.0
        done_at_start = next((done for at, done in followed.marks if at >= start), job.done_count)
        return round((job.done_count - done_at_start) / (end - start), 3)

    def _throughput_points(self, now: float) -> list[list[int]]:
        """[bucket start, tasks finished in it] for each bucket of the last THROUGHPUT_SECONDS, oldest
        first."""
        counted = {at: n for at, n in list(self._throughput)}
        last = int(now) - int(now) % THROUGHPUT_BUCKET_SECONDS
        starts = [last - k * THROUGHPUT_BUCKET_SECONDS
                  for k in reversed(range(THROUGHPUT_SECONDS // THROUGHPUT_BUCKET_SECONDS))]
        return [[at, counted.get(at, 0)] for at in starts]


def _failures(job: Job, batch: ResultBatch, limit: int) -> list[dict[str, Any]]:
    """Up to ``limit`` of the tasks in ``batch`` that failed (cancelled ones not counted), as the
    dashboard shows them."""
    found = []
    for task_id, code, output, error in zip(batch.ids, batch.exit_codes, batch.outputs, batch.errors,
                                            strict=True):
        if error == CANCELLED or is_success(code, error):
            continue
        command = job.commands[task_id] if task_id < len(job.commands) else None
        # Cut as the first line is: a command may be 128 KiB, and the state is fetched every 2 s.
        found.append({"id": task_id, "command": None if command is None else command[:FIRST_LINE_CHARS],
                      "exit_code": code, "error": None if error is None else error[:FIRST_LINE_CHARS],
                      "first_line": first_output_line(output)[:FIRST_LINE_CHARS]})
        if len(found) == limit:
            break
    return found
