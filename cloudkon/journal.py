"""The journal: a job store behind one thread, writing what the scheduler records, in order.

Owns when records reach the store (jobstore.py owns what they are and how a store keeps
them).  Off the hot path: the scheduler hands records to a ``Journal``, whose one thread
writes them in order, many per transaction (tasks as whole submission frames, results as
whole batches: about a thousand writes for a million tasks).  The scheduler waits for the
journal only where a promise depends on it: a job is accepted once its tasks are written.
Results are written within WRITE_DELAY_SECONDS; a scheduler killed before that runs those
tasks again after its restart (each task still gets exactly one result).

A store that fails to write (AWS unreachable, a disk full) is an outage, not an end: the
journal keeps the records it could not write, in order, tries again after a pause that
grows (``Outage``), and writes them once the store answers; what waits on them (a job's
acceptance, a fetch) waits as long.  It logs the outage once and its end once.  Past
MAX_UNWRITTEN_BYTES of records held, or CLOSE_RETRY_SECONDS after the scheduler asks it
to stop, it gives up: from then on nothing is written until a restart.
"""

from __future__ import annotations

import concurrent.futures
import logging
import queue
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from cloudkon.errors import BackendError
from cloudkon.jobs import TASK_OVERHEAD_BYTES, held_bytes
from cloudkon.jobstore import JobStore, Record, ResultsAdded, TasksAdded
from cloudkon.repeats import Outage

log = logging.getLogger("cloudkon.journal")

# How long the journal gathers records into one write: longer means fewer, larger
# transactions; it is also how much finished work a crash can make run again.
WRITE_DELAY_SECONDS = 0.05
# A store that fails is tried again after a pause that doubles from the first figure up to
# the second (jittered: schedulers that lost AWS together do not come back in step).  The
# cap is how late a store that answers again may be noticed.
STORE_RETRY_SECONDS = (0.5, 5.0)
# Records the journal holds for a store that fails, weighed as the bytes of their commands
# and outputs plus TASK_OVERHEAD_BYTES a task: a minute's outage of a busy scheduler, without
# letting a long one take its memory.  Past it the journal gives up (logged): later jobs are
# not durable until a restart.
MAX_UNWRITTEN_BYTES = 256 * 1024 * 1024
# At exit, a store that fails is tried this much longer; then its unwritten records are given
# up (their tasks run again at the next start).
CLOSE_RETRY_SECONDS = 10.0

_IDLE = object()  # the journal's queue went quiet while gathering records
# Failures of a store that may pass (AWS unreachable or throttling, a disk full or locked):
# retried.  Any other (a bug, a record the store cannot take) ends the store at once.
_PASSING_FAILURES = (BackendError, OSError, sqlite3.OperationalError)


class _Call:
    """A read (or, with no function, a barrier) for the journal thread, after every earlier record."""

    def __init__(self, function: Callable[..., Any] | None, args: tuple[Any, ...]) -> None:
        self.function, self.args = function, args
        self.future: concurrent.futures.Future[Any] = concurrent.futures.Future()


class Journal:
    """A store behind one thread: records are written in order, many at a time.

    ``record`` never blocks.  ``written()`` and ``call()`` return futures that
    complete once everything recorded before them is in the store.  While the store
    fails, what is recorded waits in order (bounded by MAX_UNWRITTEN_BYTES) for it to
    answer again.
    """

    def __init__(self, store: JobStore, timed: Callable[[float], None] | None = None) -> None:
        """``timed`` hears how long each write took that succeeded (the metrics: telemetry.py)."""
        self.store = store
        self._timed = timed
        self._queue: queue.SimpleQueue[Record | _Call | None] = queue.SimpleQueue()
        self._failure: BaseException | None = None  # given up: nothing more is written
        self._outage = Outage("job store", STORE_RETRY_SECONDS, log, _PASSING_FAILURES)
        # Taken from the queue while the store failed, still to be handled in order.
        self._backlog: deque[Record | _Call | None] = deque()
        self._unwritten = 0  # what the backlog's records weigh (_weight)
        self._closing_since: float | None = None  # when close() was asked during an outage
        self._thread = threading.Thread(target=self._run, name="cloudkon-journal", daemon=True)
        self._thread.start()

    def record(self, record: Record) -> None:
        self._queue.put(record)

    def written(self) -> concurrent.futures.Future[Any]:
        return self.call(None)

    def call(self, function: Callable[..., Any] | None, *args: Any) -> concurrent.futures.Future[Any]:
        call = _Call(function, args)
        self._queue.put(call)
        return call.future

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join()
        self.store.close()

    def _run(self) -> None:
        while True:
            item = self._next()
            records: list[Record] = []
            deadline = time.monotonic() + WRITE_DELAY_SECONDS
            while isinstance(item, tuple):
                records.append(item)
                try:
                    item = self._next(max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    item = _IDLE
            if records:
                self._write(records)
            if item is None:
                return
            if isinstance(item, _Call):
                self._answer(item)

    def _next(self, timeout: float | None = None) -> Record | _Call | None:
        """The next item, from the backlog first; queue.Empty if none comes within ``timeout``."""
        if self._backlog:
            item = self._backlog.popleft()
            if isinstance(item, tuple):
                self._unwritten -= _weight(item)
            return item
        return self._queue.get(timeout=timeout)

    def _write(self, records: list[Record]) -> None:
        while self._failure is None:
            started = time.perf_counter()
            try:
                self.store.write(records)  # a store takes the same records again after a failure
            except _PASSING_FAILURES as exc:
                self._wait_out(exc)
                continue
            except Exception as exc:  # any: the thread must live on to answer every waiter
                self._give_up(exc, "an error that retrying does not mend")
                return
            if self._timed is not None:
                self._timed(time.perf_counter() - started)
            self._outage.ended()
            return

    def _wait_out(self, exc: BaseException) -> None:
        """Pause before the next try, keeping what is recorded meanwhile; give up past the limits."""
        deadline = time.monotonic() + self._outage.failed(exc)
        while (left := deadline - time.monotonic()) > 0:
            try:
                item = self._queue.get(timeout=left)
            except queue.Empty:
                break
            self._backlog.append(item)
            if item is None:
                self._closing_since = time.monotonic()
            elif isinstance(item, tuple):
                self._unwritten += _weight(item)
        if self._unwritten > MAX_UNWRITTEN_BYTES:
            self._give_up(exc, f"holding over {MAX_UNWRITTEN_BYTES >> 20} MiB of records for it "
                               "(MAX_UNWRITTEN_BYTES)")
        elif self._closing_since is not None and \
                time.monotonic() - self._closing_since >= CLOSE_RETRY_SECONDS:
            self._give_up(exc, f"failing {CLOSE_RETRY_SECONDS:g} s more at exit (CLOSE_RETRY_SECONDS)")

    def _give_up(self, exc: BaseException, why: str) -> None:
        held = sum(isinstance(item, tuple) for item in self._backlog)
        log.error("job store failed: %s; given up after %s: %d record(s) more not written, and jobs "
                  "from now on are not durable (a restart resumes the store)", exc, why, held)
        self._failure = exc

    def _answer(self, call: _Call) -> None:
        """Run a read for its caller: tried again through an outage, as writes are (a fetch waits
        for the store to answer rather than fail while AWS is away)."""
        while self._failure is None:
            try:
                result = call.function(*call.args) if call.function else None
            except _PASSING_FAILURES as exc:
                self._wait_out(exc)
                continue
            except Exception as exc:  # a corrupt row: the caller reports it
                call.future.set_exception(BackendError(f"job store: {exc}"))
                return
            self._outage.ended()
            call.future.set_result(result)
            return
        # What it would read or promise is incomplete.
        call.future.set_exception(BackendError(f"job store failed: {self._failure}"))


def _weight(record: Record) -> int:
    """What a record held for the store weighs, by the measure of MAX_UNWRITTEN_BYTES."""
    if isinstance(record, TasksAdded):
        return held_bytes(record.commands)
    if isinstance(record, ResultsAdded):
        return sum(map(len, record.batch.outputs)) + TASK_OVERHEAD_BYTES * len(record.batch.ids)
    return TASK_OVERHEAD_BYTES
