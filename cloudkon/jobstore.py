"""The job store: jobs, their tasks and results, kept where a restarted scheduler finds them.

Owns the durable side of a job (the cursor a client can come back with): the records
a scheduler writes (``Record``), the ``JobStore`` interface, and how a scheduler reads its
unfinished jobs back after a crash.  Two stores share the interface: ``SQLiteJobStore``
(a file, local mode) and ``DynamoJobStore`` (a DynamoDB table, remote mode:
dynamostore.py, which alone loads boto3).  When records are written, and how a write that
fails is retried through an outage, is journal.py's.

A store file is its user's alone (0600, in a 0700 folder if the store makes it: commands
and outputs are private), is locked while a scheduler uses it (the lock is on the file
itself, so a symlink or another name for it finds it taken), and is read back row by row:
a job whose rows are not of the right shape is skipped and named in the log, the others
resume.
"""

from __future__ import annotations

import fcntl
import json
import logging
import math
import os
import sqlite3
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, NamedTuple

from cloudkon import protocol
from cloudkon.errors import ConfigError, ProtocolError
from cloudkon.jobs import Job
from cloudkon.tasks import ResultBatch

log = logging.getLogger("cloudkon.jobstore")

class JobOpened(NamedTuple):
    job: str
    created_at: float
    timeout: float | None


class TasksAdded(NamedTuple):
    job: str
    start: int  # id of the first task
    commands: list[str]


class ResultsAdded(NamedTuple):
    job: str
    batch: ResultBatch


class JobFinished(NamedTuple):
    job: str
    total: int
    finished_at: float
    succeeded: int
    failed: int  # cancelled tasks included
    cancelled: int = 0
    cost: dict[str, Any] | None = None  # its figures (costs.py), remote mode


Record = JobOpened | TasksAdded | ResultsAdded | JobFinished


class JobStore(ABC):
    """Where jobs outlive the scheduler process.  Used from one thread (the journal's)."""

    @abstractmethod
    def start(self) -> int:
        """Count one more scheduler start on this store and return the count."""

    @abstractmethod
    def load(self, finished_since: float) -> list[Job]:
        """The jobs not finished before ``finished_since`` (older ones are removed).

        Unfinished jobs come with their tasks and which of them have results; finished
        ones only with their counts (``Job.release``d).  A job whose submission was cut
        short is closed with the tasks it has.
        """

    @abstractmethod
    def write(self, records: list[Record]) -> None:
        """Apply ``records`` in order.  After a failure the same list comes again, until it is
        written: what of it was applied must not be applied twice."""

    @abstractmethod
    def read_commands(self, job_id: str) -> list[str]:
        """A job's tasks in submission order."""

    @abstractmethod
    def read_results(self, job_id: str) -> list[ResultBatch]:
        """Every result batch written for a job."""

    @abstractmethod
    def remove(self, job_ids: Iterable[str]) -> None:
        """Delete these jobs and everything of theirs."""

    # Jobs outlive the scheduler (a restart on the same store resumes them): not so in memory.
    durable: bool = True

    @abstractmethod
    def describe(self) -> str:
        """Where the jobs are, for the log and for a client told how to come back."""

    @abstractmethod
    def close(self) -> None:
        """Release the store's connection or file."""


def checked_job(job_id: str, build: Callable[[], Job]) -> Job | None:
    """The job ``build`` makes from its rows, or None (named in the log) if they are not of
    the right shape: one bad job must not stop the others from resuming, nor reach a worker."""
    try:
        return build()
    except (ValueError, TypeError, LookupError, ProtocolError) as exc:  # json's errors are ValueErrors
        log.error("job store: job %s skipped, its rows are not of the right shape: %s "
                  "(they are left in the store)", job_id, exc)
        return None


def restore_job(job_id: str, created_at: float, timeout: float | None, commands: list[str],
                batches: Iterable[ResultBatch]) -> Job:
    """A job rebuilt from what a store holds: results replayed, the rest to run.

    ValueError if a field is not of its type (the store was edited or damaged)."""
    _check_seconds("created_at", created_at)
    if timeout is not None:
        _check_seconds("timeout", timeout)
    if not isinstance(commands, list) or not all(isinstance(command, str) for command in commands):
        raise ValueError("its tasks are not strings")
    job = Job(job_id, timeout, created_at)
    job.results = None
    job.add_tasks(commands)
    for batch in batches:
        job.keep_new(batch)
    job.closed = True
    return job


class FinishedJob(Job):
    """A finished job read back from a store: its counts, and its cost figures (costs.py; None if
    it ran in local mode, or was stored before they were kept)."""

    def __init__(self, job_id: str, created_at: float, cost: dict[str, Any] | None) -> None:
        super().__init__(job_id, None, created_at)
        self.cost = cost


def finished_job(job_id: str, created_at: float, total: int, finished_at: float,
                 succeeded: int, failed: int, cancelled: int, cost: str | None = None) -> FinishedJob:
    """A finished job as the scheduler keeps it until its results expire: counts and cost only
    (``cost``: its figures, the JSON of a cost report).

    ValueError if a field is not of its type."""
    _check_seconds("created_at", created_at)
    _check_seconds("finished_at", finished_at)
    for name, count in (("total", total), ("succeeded", succeeded), ("failed", failed),
                        ("cancelled", cancelled)):
        if not isinstance(count, int) or isinstance(count, bool) or count < 0:
            raise ValueError(f"{name} is {count!r}, not a count")
    figures = None if cost is None else json.loads(cost)
    if figures is not None and not protocol.is_cost(figures):
        raise ValueError(f"cost is {cost!r}, not a cost report")
    job = FinishedJob(job_id, created_at, figures)
    job.release()
    job.total, job.closed, job.finished_at = total, True, finished_at
    job.done_count, job.failed_count = succeeded + failed, failed
    job.cancelled_count, job.cancelled = cancelled, cancelled > 0
    return job


def encode_cost(cost: dict[str, Any] | None) -> str | None:
    """A job's cost figures as a store keeps them (finished_job reads them back)."""
    return None if cost is None else json.dumps(cost)


def _check_seconds(name: str, value: object) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) \
            or value < 0:
        raise ValueError(f"{name} is {value!r}, not a number of seconds")


def encode_results(batch: ResultBatch) -> bytes:
    return protocol.encode_body(protocol.results_message(batch))


def decode_results(body: bytes) -> ResultBatch:
    return protocol.results_from_message(protocol.decode(body))


class SQLiteJobStore(JobStore):
    """Jobs in an SQLite file (or ``:memory:``), written ahead (WAL) so a write is cheap."""

    _SCHEMA = """
        CREATE TABLE IF NOT EXISTS starts (n INTEGER PRIMARY KEY AUTOINCREMENT, at REAL);
        CREATE TABLE IF NOT EXISTS jobs (id TEXT PRIMARY KEY, created_at REAL, timeout REAL,
            total INTEGER, finished_at REAL, succeeded INTEGER, failed INTEGER, cancelled INTEGER, cost TEXT);
        CREATE TABLE IF NOT EXISTS tasks (job TEXT, start INTEGER, commands TEXT,
            PRIMARY KEY (job, start));
        CREATE TABLE IF NOT EXISTS results (n INTEGER PRIMARY KEY AUTOINCREMENT, job TEXT, batch BLOB);
        CREATE INDEX IF NOT EXISTS results_by_job ON results (job);
    """

    # Columns added to the jobs table since its first version: a store made before gets them.
    _ADDED_COLUMNS = {"cancelled": "INTEGER", "cost": "TEXT"}

    def __init__(self, path: str) -> None:
        self.path = path
        self.durable = path != ":memory:"
        self._lock = None if not self.durable else _open_locked(Path(path))
        try:
            # Opened here, used by the journal thread only.
            self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
            # A crashed process loses nothing a commit returned for; only a power cut
            # could lose the last commits (synchronous=NORMAL), and they would run again.
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(self._SCHEMA)
            columns = {row[1] for row in self._db.execute("PRAGMA table_info(jobs)")}
            for column, kind in self._ADDED_COLUMNS.items():
                if column not in columns:
                    self._db.execute(f"ALTER TABLE jobs ADD COLUMN {column} {kind}")
        except sqlite3.Error as exc:
            if self._lock is not None:
                os.close(self._lock)  # free for a retry in this process
            raise ConfigError(f"cannot use {path} as the job store: {exc}") from exc

    def start(self) -> int:
        with self._db:
            return self._db.execute("INSERT INTO starts (at) VALUES (?)", (time.time(),)).lastrowid

    def load(self, finished_since: float) -> list[Job]:
        db = self._db
        expired = [row[0] for row in db.execute(
            "SELECT id FROM jobs WHERE finished_at < ?", (finished_since,))]
        self.remove(expired)
        rows = db.execute("SELECT id, created_at, timeout, total, finished_at, succeeded, failed, cancelled, "
                          "cost FROM jobs ORDER BY created_at").fetchall()
        jobs = [checked_job(row[0], lambda row=row: self._job(*row)) for row in rows]
        return [job for job in jobs if job is not None]

    def _job(self, job_id: str, created_at: float, timeout: float | None, total: int | None,
             finished_at: float | None, succeeded: int | None, failed: int | None,
             cancelled: int | None, cost: str | None) -> Job:
        if finished_at is not None:
            return finished_job(job_id, created_at, total, finished_at, succeeded, failed, cancelled or 0,
                                cost)
        return restore_job(job_id, created_at, timeout, self.read_commands(job_id), self.read_results(job_id))

    def write(self, records: list[Record]) -> None:
        db = self._db
        with db:
            db.execute("BEGIN")
            for record in records:
                if isinstance(record, ResultsAdded):
                    db.execute("INSERT INTO results (job, batch) VALUES (?, ?)",
                               (record.job, encode_results(record.batch)))
                elif isinstance(record, TasksAdded):
                    db.execute("INSERT OR REPLACE INTO tasks VALUES (?, ?, ?)",
                               (record.job, record.start, json.dumps(record.commands)))
                elif isinstance(record, JobOpened):
                    db.execute("INSERT OR REPLACE INTO jobs (id, created_at, timeout) VALUES (?, ?, ?)",
                               (record.job, record.created_at, record.timeout))
                else:
                    db.execute("UPDATE jobs SET total = ?, finished_at = ?, succeeded = ?, failed = ?, "
                               "cancelled = ?, cost = ? WHERE id = ?",
                               (record.total, record.finished_at, record.succeeded, record.failed,
                                record.cancelled, encode_cost(record.cost), record.job))

    def read_commands(self, job_id: str) -> list[str]:
        commands: list[str] = []
        for (chunk,) in self._db.execute("SELECT commands FROM tasks WHERE job = ? ORDER BY start",
                                         (job_id,)):
            commands.extend(json.loads(chunk))
        return commands

    def read_results(self, job_id: str) -> list[ResultBatch]:
        return [decode_results(body) for (body,) in self._db.execute(
            "SELECT batch FROM results WHERE job = ? ORDER BY n", (job_id,))]

    def remove(self, job_ids: Iterable[str]) -> None:
        rows = [(job_id,) for job_id in job_ids]
        if not rows:
            return
        with self._db:
            self._db.execute("BEGIN")
            for table, column in (("jobs", "id"), ("tasks", "job"), ("results", "job")):
                self._db.executemany(f"DELETE FROM {table} WHERE {column} = ?", rows)

    def describe(self) -> str:
        return f"SQLite {self.path}"

    def close(self) -> None:
        self._db.close()
        if self._lock is not None:
            os.close(self._lock)


def _open_locked(path: Path) -> int:
    """The store file, opened (created 0600 if new, in a new folder 0700) and exclusively locked.

    The lock is on the file itself, not on a name: two schedulers on one store would run
    its jobs twice, whatever names they reach it by.  SQLite locks with fcntl, flock is
    apart from that (on Linux, but for NFS).  A file that exists but is empty is refused:
    it is not a store, and taking it for a new one would hide the loss of one.
    """
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)  # an existing folder is left as it is
        try:
            fd, new = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600), True
        except FileExistsError:
            fd, new = os.open(path, os.O_RDWR), False
    except OSError as exc:
        raise ConfigError(f"cannot use {path} as the job store: {exc.strerror or exc}") from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        real = os.path.realpath(path)
        also = f" (which is {real})" if real != os.path.abspath(path) else ""
        raise ConfigError(f"job store {path}{also} is in use by another scheduler "
                          "(give this one its own --state)") from None
    if not new and os.fstat(fd).st_size == 0:
        os.close(fd)
        raise ConfigError(f"job store {path} is an empty file, not a job store "
                          "(remove it to start a new store, or give another --state)")
    return fd
