"""Tasks: what a workload line means, and how one runs.

Owns the workload format (one task per line), the data that travels between the
scheduler and the workers (``Bundle`` of tasks in, ``ResultBatch`` out) and
``run_task``, the single place where a task is executed, shared by local worker
processes and remote EC2 workers.  It knows nothing of queues, sockets or bytes:
protocol.py turns these objects into frames.

Task semantics:
  ``sleep N`` (N a whole number) sleeps N milliseconds inside the worker, with no
  process spawned: the CloudKon benchmark task.  Any other line runs as
  ``/bin/sh -c LINE`` in its own process group, stdout and stderr captured together
  (the first ``output_cap`` bytes kept).  The task is that shell: its timeout covers
  the shell whatever it does with its output, and it ends when the shell exits; what
  it left running in its group is killed then, and a note at the end of the output
  says so (run_process).  A line starting with ``{"`` is a job
  description with files, staged by the client and run in a sandbox (sandbox.py).
  Exit status 0 is success.  ``exit_code``
  is None when no process ran to completion (timeout, signal, spawn failure,
  cancellation), and ``error`` then says why; the error CANCELLED marks a task of a
  cancelled job, whose status is ``cancelled`` rather than ``failed``.

A job can be cancelled while this process runs its tasks (``Cancellations``): the
tasks not started are skipped, a running shell command's process group is killed,
and a long ``sleep N`` wakes up early.
"""

from __future__ import annotations

import codecs
import ctypes
import logging
import math
import os
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from cloudkon.errors import WorkloadError
from cloudkon.jdl import is_job_description

# Output kept per task.  Large enough for a useful log tail, small enough that a
# bundle of chatty tasks still fits comfortably in one frame.
OUTPUT_CAP_BYTES = 64 * 1024

# Linux refuses a single exec argument of 128 KiB or more (MAX_ARG_STRLEN), and a
# shell command is one argument of /bin/sh -c; reject longer lines up front.
MAX_COMMAND_BYTES = 128 * 1024 - 1

# A worker sends the results it has at least this often, so the scheduler learns
# what finished (for progress, and for what to re-run if the worker dies).
RESULT_FLUSH_SECONDS = 0.05

# ... and as soon as it holds this much output, so a results frame stays far below
# the protocol's frame limit even after JSON escaping (at most 6 bytes per byte).
RESULT_FLUSH_OUTPUT_BYTES = 1024 * 1024

# The ``error`` of a task whose job was cancelled before it ran or while it ran.
CANCELLED = "cancelled"

# Once a task's process has exited (and what it left in its group is killed), output still in
# its pipe is read for at most this long: ample for the pipe's 64 KiB, bounded against a process
# that left the group (setsid) and holds the pipe open.
OUTPUT_DRAIN_SECONDS = 0.2
# Without pidfds (not Linux), how often a task's process is looked at for its exit.
EXIT_POLL_SECONDS = 0.02

# ``sleep N`` tasks at least this long wait on their job's cancellation instead of
# sleeping blindly; shorter ones are not worth the (small) extra cost per task.
INTERRUPTIBLE_SLEEP_MS = 100

_SLEEP_PREFIX = "sleep "
_PR_SET_TIMERSLACK = 29

# Process groups of the shell commands this process is running (one per thread), each
# with its job's cancellation event, so that a worker being stopped, or a job being
# cancelled, can take them down (each runs in its own session).
_running_groups: dict[int, threading.Event | None] = {}


@dataclass
class Bundle:
    """Tasks of one job sent to a worker together.

    ``bundle`` numbers the bundle within the scheduler, so results can be matched to it.
    ``budget`` is its time box: once the bundle has run this many seconds, the worker
    starts no more of its tasks and hands the rest back (None: run them all).
    """

    job: str
    bundle: int
    ids: list[int]
    commands: list[str]
    timeout: float | None = None
    budget: float | None = None


@dataclass
class ResultBatch:
    """Results of some tasks of one job, as parallel columns (cheap to build and encode).

    Task ``ids[i]`` ended with ``exit_codes[i]`` after ``elapsed_us[i]`` microseconds,
    printed ``outputs[i]``; ``errors[i]`` is the framework's reason when no process ran
    to completion, else None.  ``artifacts`` (None unless some task has one) says where a
    job description's output sandbox went (sandbox.py).  ``worker`` names where the
    batch ran (host:pid, or a remote worker's identity); ``returned`` lists tasks of the
    bundle handed back unstarted (its time box ran out, or the scheduler asked for them):
    they have no result here and are to be run again elsewhere.
    """

    job: str
    bundle: int | None = None
    ids: list[int] = field(default_factory=list)
    exit_codes: list[int | None] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)
    elapsed_us: list[int] = field(default_factory=list)
    errors: list[str | None] = field(default_factory=list)
    artifacts: list[dict[str, Any] | None] | None = None
    worker: str | None = None
    returned: list[int] = field(default_factory=list)

    def add(self, task_id: int, exit_code: int | None, output: str, elapsed_us: int,
            error: str | None, artifact: dict[str, Any] | None = None) -> None:
        self.ids.append(task_id)
        self.exit_codes.append(exit_code)
        self.outputs.append(output)
        self.elapsed_us.append(elapsed_us)
        self.errors.append(error)
        if artifact is not None or self.artifacts is not None:
            if self.artifacts is None:
                self.artifacts = [None] * (len(self.ids) - 1)
            self.artifacts.append(artifact)

    def extend(self, other: ResultBatch) -> None:
        """Append the rows of ``other`` (a later batch of the same bundle), and what it returned."""
        if other.artifacts is not None and self.artifacts is None:
            self.artifacts = [None] * len(self.ids)
        self.ids += other.ids
        self.exit_codes += other.exit_codes
        self.outputs += other.outputs
        self.elapsed_us += other.elapsed_us
        self.errors += other.errors
        if self.artifacts is not None:
            self.artifacts += other.artifacts if other.artifacts is not None else [None] * len(other.ids)
        self.returned += other.returned

    def select(self, positions: list[int]) -> ResultBatch:
        """A batch of the rows at ``positions``."""
        return ResultBatch(
            self.job, self.bundle,
            [self.ids[p] for p in positions],
            [self.exit_codes[p] for p in positions],
            [self.outputs[p] for p in positions],
            [self.elapsed_us[p] for p in positions],
            [self.errors[p] for p in positions],
            None if self.artifacts is None else [self.artifacts[p] for p in positions],
            self.worker,
        )

    def failed_count(self) -> int:
        """Tasks that did not succeed, cancelled ones included."""
        pairs = zip(self.exit_codes, self.errors, strict=True)
        return len(self.ids) - sum(1 for code, error in pairs if is_success(code, error))

    def cancelled_count(self) -> int:
        return self.errors.count(CANCELLED)

    def __len__(self) -> int:
        return len(self.ids)


def is_success(exit_code: int | None, error: str | None) -> bool:
    return exit_code == 0 and error is None


def task_status(exit_code: int | None, error: str | None) -> str:
    """``success``, ``failed`` or ``cancelled``: what a result says of its task."""
    if error == CANCELLED:
        return "cancelled"
    return "success" if is_success(exit_code, error) else "failed"


def failed_batch(job: str, bundle: int | None, ids: list[int], error: str) -> ResultBatch:
    """Results saying that tasks ``ids`` failed without running to completion."""
    n = len(ids)
    return ResultBatch(job, bundle, list(ids), [None] * n, [""] * n, [0] * n, [error] * n)


def read_workload(path: str) -> bytes:
    """A workload file's bytes; WorkloadError if it cannot be read."""
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        raise WorkloadError(f"cannot read workload: {exc.strerror or exc}", path) from exc


def parse_workload(path: str) -> list[str]:
    """The tasks of a workload file: its lines, stripped, minus blanks and ``#`` comments.

    Raises WorkloadError (naming the line where there is one) for a missing or
    unreadable file, bytes that are not UTF-8, an over-long line, or no task at all.
    """
    return parse_workload_bytes(read_workload(path), path)


def parse_workload_bytes(data: bytes, path: str = "<workload>") -> list[str]:
    return workload_tasks(decode_workload(data, path), path)


# Byte order marks an editor may write at the start of a file, and the text they announce.
_UTF32_MARKS = (codecs.BOM_UTF32_LE, codecs.BOM_UTF32_BE)
_UTF16_MARKS = (codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)


def decode_workload(data: bytes, path: str = "<workload>") -> str:
    """A workload file's text: UTF-8 (a byte order mark is dropped) or UTF-16 with its mark.

    WorkloadError names the line for bytes that are not UTF-8, and for a NUL byte (no task
    can hold one: it is most often UTF-16 saved without its mark)."""
    if data.startswith(_UTF32_MARKS):
        raise WorkloadError("UTF-32 text: save it as UTF-8", path)
    if data.startswith(_UTF16_MARKS):
        try:
            text = data.decode("utf-16")
        except UnicodeDecodeError as exc:
            raise WorkloadError(f"not valid UTF-16 (byte {exc.start}): save it as UTF-8", path) from None
    else:
        try:
            text = data.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            line = data.count(b"\n", 0, exc.start) + 1
            raise WorkloadError(f"not UTF-8 (byte 0x{data[exc.start]:02x})", path, line) from None
    if "\0" in text:
        line = text.count("\n", 0, text.index("\0")) + 1
        raise WorkloadError("a NUL character (UTF-16 saved without a byte order mark? save it as UTF-8)",
                            path, line)
    return text


def workload_tasks(text: str, path: str = "<workload>") -> list[str]:
    """The tasks of a workload's text: its lines, stripped, minus blanks and ``#`` comments."""
    lines = text.split("\n")
    tasks = [line for line in map(str.strip, lines) if line and line[0] != "#"]
    if not tasks:
        raise WorkloadError("no tasks (only blank lines and # comments)", path)
    # A character is at most 4 bytes: only a line this long can be over the limit.
    if max(map(len, tasks)) * 4 > MAX_COMMAND_BYTES:
        for number, line in enumerate(map(str.strip, lines), 1):
            if line[:1] != "#" and len(line.encode()) > MAX_COMMAND_BYTES:
                raise WorkloadError(f"task longer than {MAX_COMMAND_BYTES} bytes", path, number)
    return tasks


def reduce_timer_slack() -> None:
    """Make sleeps of a millisecond precise in this process (Linux only; else no-op).

    The default 50 us timer slack adds ~8% to a 1 ms ``sleep`` task; 1 ns makes it ~3%.
    """
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None).prctl(_PR_SET_TIMERSLACK, 1, 0, 0, 0)
        except (OSError, AttributeError):
            pass


def native_sleep_ms(command: str) -> int | None:
    """N for a ``sleep N`` task, else None (the line is a shell command)."""
    if not command.startswith(_SLEEP_PREFIX):
        return None
    arg = command[len(_SLEEP_PREFIX):]
    if arg.isascii() and arg.isdigit():
        return int(arg)
    return None


class Cancellations:
    """The cancelled jobs this process has heard of, and an event per job it is running.

    ``cancel`` may come from any thread: it sets the job's event (a running bundle
    skips the rest of its tasks, a long sleep wakes) and kills the job's running shell
    commands.  A cancelled job is remembered, so its later bundles run no task.
    """

    def __init__(self) -> None:
        self._events: dict[str, threading.Event] = {}
        self._running: dict[str, int] = {}  # job -> bundles running now
        self._lock = threading.Lock()

    def cancel(self, job: str) -> None:
        with self._lock:  # set under the lock: a bundle ending now must not forget the event
            event = self._events.setdefault(job, threading.Event())
            event.set()
        for group, cancelled in list(_running_groups.items()):
            if cancelled is event:
                _kill_group(group)

    def is_cancelled(self, job: str) -> bool:
        event = self._events.get(job)
        return event is not None and event.is_set()

    @contextmanager
    def running(self, job: str) -> Iterator[threading.Event]:
        """The job's cancellation event, while one of its bundles runs."""
        with self._lock:
            event = self._events.setdefault(job, threading.Event())
            self._running[job] = self._running.get(job, 0) + 1
        try:
            yield event
        finally:
            with self._lock:
                self._running[job] -= 1
                if not self._running[job]:
                    del self._running[job]
                    if not event.is_set():  # only cancelled jobs need remembering
                        del self._events[job]


def run_task(command: str, timeout: float | None = None, output_cap: int = OUTPUT_CAP_BYTES,
             cancelled: threading.Event | None = None) -> tuple[int | None, str, int, str | None]:
    """Run one task: ``(exit_code, output, elapsed_us, error)``.

    Once ``cancelled`` is set the task stops (a shell command's process group is
    killed) and a task that did not succeed reports the error CANCELLED.
    """
    start = time.perf_counter_ns()
    ms = native_sleep_ms(command)
    if ms is not None:
        if ms == 0:  # the benchmark task, by the million: nothing more to do
            return 0, "", (time.perf_counter_ns() - start) // 1000, None
        exit_code, error = _sleep(ms, timeout, cancelled)
        return exit_code, "", (time.perf_counter_ns() - start) // 1000, error
    exit_code, output, error = _run_shell(command, timeout, output_cap, cancelled)
    if cancelled is not None and cancelled.is_set() and not is_success(exit_code, error):
        exit_code, error = None, CANCELLED
    return exit_code, output, (time.perf_counter_ns() - start) // 1000, error


def _sleep(ms: int, timeout: float | None,
           cancelled: threading.Event | None) -> tuple[int | None, str | None]:
    seconds = ms / 1000 if timeout is None else min(ms / 1000, timeout)
    if cancelled is not None and ms >= INTERRUPTIBLE_SLEEP_MS:
        if cancelled.wait(seconds):
            return None, CANCELLED
    elif seconds:
        time.sleep(seconds)
    if timeout is not None and ms > timeout * 1000:
        return None, _timed_out(timeout)
    return 0, None


class _Box:
    """A running bundle's time box, shared by the thread running it and TimeBoxes' thread.

    The runner stores the position it is about to start in ``started``, then reads
    ``ended``; TimeBoxes sets ``ended`` and reads ``started`` under ``lock``, and the
    runner takes the lock to read ``cut`` once it sees ``ended``.  So a task is either
    started (and ``cut`` is past it) or handed back, never both.
    """

    __slots__ = ("bundle", "ends_at", "lock", "started", "ended", "cut")  # read and written per task

    def __init__(self, bundle: Bundle, ends_at: float) -> None:
        self.bundle = bundle
        self.ends_at = ends_at
        self.lock = threading.Lock()
        self.started = 0
        self.ended = False
        self.cut = len(bundle.ids)

    def end(self) -> list[int]:
        """End the box now: the tasks after the one running (or about to start), to hand back."""
        with self.lock:
            if self.ended:
                return []
            self.ended = True
            self.cut = min(self.cut, self.started + 1)  # the first task of a bundle always runs
            return self.bundle.ids[self.cut:]

    def stops_before(self, position: int) -> bool:
        with self.lock:
            return position >= self.cut


class TimeBoxes:
    """The time boxes of the bundles a worker process runs, ended on time by a thread.

    A box that runs out while a task runs does not wait for that task: the tasks the
    bundle has not started go back at once (``hand_back(bundle, ids)``, from this
    class's thread), and the runner stops before the next one.  ``end(number)`` ends a
    box now, for the scheduler that wants the tasks for an idle worker; asked before the
    bundle starts, it ends the box as soon as the first task has started.
    """

    def __init__(self, hand_back: Callable[[Bundle, list[int]], None]) -> None:
        self._hand_back = hand_back
        # By the bundle object: bundle numbers are a scheduler's own (several share a remote
        # worker), and a bundle split over several messages runs as parts with one number.
        self._boxes: dict[int, _Box] = {}
        self._asked: set[tuple[str, int]] = set()  # (job, bundle) asked for before it started
        self._changed = threading.Condition()
        # When the thread looks next: a box that runs out later needs no wake-up (bundles of a
        # few milliseconds open a box each; waking the thread for each costs a busy machine).
        self._looks_at = math.inf
        threading.Thread(target=self._watch, name="cloudkon-time-boxes", daemon=True).start()

    @contextmanager
    def open(self, bundle: Bundle) -> Iterator[_Box]:
        """The bundle's box while it runs (one that never runs out without a budget: it can
        still be ended, for an idle worker)."""
        with self._changed:
            asked = (bundle.job, bundle.bundle) in self._asked
            self._asked.clear()  # asked for the bundle about to run, or for ones long gone
            budget = math.inf if bundle.budget is None else bundle.budget
            box = _Box(bundle, time.monotonic() + (0 if asked else budget))
            self._boxes[id(bundle)] = box
            if box.ends_at < self._looks_at:
                self._changed.notify()
        try:
            yield box
        finally:
            with self._changed:
                del self._boxes[id(bundle)]

    def end(self, job: str, number: int) -> None:
        """End the box of ``job``'s bundle ``number`` now (or as soon as it starts)."""
        with self._changed:
            boxes = [box for box in self._boxes.values()
                     if box.bundle.bundle == number and box.bundle.job == job]
            if not boxes:
                self._asked.add((job, number))
                return
            for box in boxes:
                box.ends_at = 0.0
            self._changed.notify()

    def _watch(self) -> None:
        while True:
            with self._changed:
                now = time.monotonic()
                due = [box for box in self._boxes.values() if box.ends_at <= now and not box.ended]
                if not due:
                    self._looks_at = min((box.ends_at for box in self._boxes.values() if not box.ended),
                                         default=math.inf)
                    self._changed.wait(None if math.isinf(self._looks_at) else self._looks_at - now)
                    self._looks_at = -math.inf  # awake: every change is seen on the next look
                    continue
            for box in due:
                rest = box.end()
                if rest:
                    try:
                        self._hand_back(box.bundle, rest)
                    except Exception:  # noqa: BLE001 - the runner still stops; the tasks are re-run
                        logging.getLogger("cloudkon.tasks").exception("handing back tasks failed")


def run_bundle(bundle: Bundle, output_cap: int = OUTPUT_CAP_BYTES,
               before_task: Callable[[int], None] | None = None,
               cancellations: Cancellations | None = None,
               boxes: TimeBoxes | None = None) -> Iterator[ResultBatch]:
    """Run a bundle's tasks in order, yielding their results in batches.

    A batch is yielded every RESULT_FLUSH_SECONDS, or once it holds
    RESULT_FLUSH_OUTPUT_BYTES of output, and at the end.  ``before_task(task_id)``
    is called before each task starts; an exception it raises ends the bundle there (the
    remote worker's lease fence: no task starts on a lease it cannot vouch for).  Once the
    bundle's job is in ``cancellations``, the running task stops and the rest report
    CANCELLED without running.

    The bundle is a time-boxed lease: once it has run ``bundle.budget`` seconds no more
    of its tasks start.  With ``boxes``, the box ends on time even while a task runs,
    and the rest goes back through ``boxes``; without, it is looked at after each flush,
    or each task once the box has run out, and the last batch lists the unstarted rest
    in ``returned``.  A task that started is never handed back, and the first task of a
    bundle always runs (so that each hand-back makes progress).
    """
    if cancellations is None:
        yield from _run_boxed(bundle, output_cap, before_task, None, boxes)
        return
    with cancellations.running(bundle.job) as cancelled:
        yield from _run_boxed(bundle, output_cap, before_task, cancelled, boxes)


def _run_boxed(bundle: Bundle, output_cap: int, before_task: Callable[[int], None] | None,
               cancelled: threading.Event | None, boxes: TimeBoxes | None) -> Iterator[ResultBatch]:
    if boxes is None:
        yield from _run_bundle(bundle, output_cap, before_task, cancelled, None)
        return
    with boxes.open(bundle) as box:
        yield from _run_bundle(bundle, output_cap, before_task, cancelled, box)


def _run_bundle(bundle: Bundle, output_cap: int, before_task: Callable[[int], None] | None,
                cancelled: threading.Event | None, box: _Box | None) -> Iterator[ResultBatch]:
    # A hot loop (a million `sleep 0` tasks): names bound once, the common case first, and
    # one clock reading per task, against the next time anything is to be looked at.
    batch = ResultBatch(bundle.job, bundle.bundle)
    output_bytes = 0
    now = time.monotonic()
    flush_at = now + RESULT_FLUSH_SECONDS
    # Without a watched box, its end is looked at here; with one, TimeBoxes ends it.
    box_ends = math.inf if bundle.budget is None or box is not None else now + bundle.budget
    look_at = min(flush_at, box_ends)
    timeout = bundle.timeout
    ids = bundle.ids
    look = True
    for position, (task_id, command) in enumerate(zip(ids, bundle.commands, strict=True)):
        if look:
            look = False
            if cancelled is not None and cancelled.is_set():
                for skipped in ids[position:None if box is None else box.cut]:  # not those handed back
                    batch.add(skipped, None, "", 0, CANCELLED)
                break
            if position and now >= box_ends:
                batch.returned = ids[position:]
                break
        if box is not None:
            box.started = position
            if box.ended and box.stops_before(position):
                # Handed back already; said again here, in case that went astray (a duplicate
                # hand-back is ignored: only the bundle that still holds a task gives it back).
                batch.returned = ids[position:]
                break
        if before_task is not None:
            before_task(task_id)
        if command[:1] != "{" or not is_job_description(command):
            exit_code, output, elapsed_us, error = run_task(command, timeout, output_cap, cancelled)
            batch.add(task_id, exit_code, output, elapsed_us, error)
        else:
            from cloudkon.sandbox import (
                run_job,  # sandbox.py builds on this module: imported when first needed
            )
            exit_code, output, elapsed_us, error, artifact = run_job(command, timeout, output_cap, cancelled)
            batch.add(task_id, exit_code, output, elapsed_us, error, artifact)
        output_bytes += len(output)
        now = time.monotonic()
        if now >= look_at or output_bytes >= RESULT_FLUSH_OUTPUT_BYTES:
            look = True
            if now >= flush_at or output_bytes >= RESULT_FLUSH_OUTPUT_BYTES:
                yield batch
                batch = ResultBatch(bundle.job, bundle.bundle)
                output_bytes = 0
                now = time.monotonic()
                flush_at = now + RESULT_FLUSH_SECONDS
            look_at = min(flush_at, box_ends)
    if batch.ids or batch.returned:
        yield batch


def _timed_out(timeout: float) -> str:
    return f"timed out after {timeout:g} s"


def _run_shell(command: str, timeout: float | None, output_cap: int,
               cancelled: threading.Event | None) -> tuple[int | None, str, str | None]:
    return run_process(["/bin/sh", "-c", command], timeout, output_cap, cancelled)


def run_process(argv: list[str], timeout: float | None, output_cap: int,
                cancelled: threading.Event | None, cwd: str | None = None,
                env: dict[str, str] | None = None) -> tuple[int | None, str, str | None]:
    """Run ``argv`` in its own process group: ``(exit_code, output, error)``, as run_task reports them.

    The task is that process: it ends when the process exits (or is killed at the deadline),
    whoever else holds its output pipe.  Then what it left running in its group is killed, and
    output still in the pipe is read for at most OUTPUT_DRAIN_SECONDS; notes at the end of the
    output say when either happened.
    """
    try:
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            start_new_session=True, cwd=cwd, env=env,
        )
    except (OSError, ValueError) as exc:
        return None, "", f"could not start {argv[0]}: {exc}"
    _running_groups[proc.pid] = cancelled
    if cancelled is not None and cancelled.is_set():  # cancelled while it was starting
        _kill_group(proc.pid)
    deadline = None if timeout is None else time.monotonic() + timeout
    output = _CappedOutput(output_cap)
    try:
        with proc:
            try:
                timed_out = not _read_until_exit(proc, output, deadline)
            except OSError as exc:  # no descriptor left to watch it with (EMFILE): the task cannot run
                _kill_group(proc.pid)
                return None, output.text(), f"could not watch {argv[0]}: {exc}"
            if timed_out:
                _kill_group(proc.pid)
            returncode = proc.wait()
            # Reaped: a process still in the group is one the task left behind (unless the
            # group was killed already, and its processes are still dying).
            ended_by_us = timed_out or (cancelled is not None and cancelled.is_set())
            if _kill_group(proc.pid) and not ended_by_us:
                output.note("killed what the task left running in its process group")
            if not _drain(proc.stdout.fileno(), output):  # type: ignore[union-attr]
                output.note("stopped reading: a process outside the task's group holds its output")
    finally:
        _running_groups.pop(proc.pid, None)
    if timed_out:
        return None, output.text(), _timed_out(timeout)  # type: ignore[arg-type]
    if returncode < 0:
        return None, output.text(), f"killed by signal {-returncode} ({signal.Signals(-returncode).name})"
    return returncode, output.text(), None


class _CappedOutput:
    """The first ``cap`` bytes a process wrote, a count of the rest, and the framework's notes on it."""

    __slots__ = ("cap", "kept", "dropped", "notes")

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.kept = bytearray()
        self.dropped = 0
        self.notes: list[str] = []

    def add(self, chunk: bytes) -> None:
        room = self.cap - len(self.kept)
        if room > 0:
            self.kept += chunk[:room]
        self.dropped += max(0, len(chunk) - max(room, 0))

    def note(self, text: str) -> None:
        self.notes.append(text)

    def text(self) -> str:
        notes = self.notes if not self.dropped else [f"output truncated, {self.dropped} more bytes not kept",
                                                     *self.notes]
        return self.kept.decode("utf-8", "replace") + "".join(f"\n[cloudkon: {note}]" for note in notes)


def _read_until_exit(proc: subprocess.Popen, output: _CappedOutput, deadline: float | None) -> bool:
    """Read the process's output until it exits: False if the deadline comes first.

    Waits on the process itself (a pidfd, Linux 5.3+), not on the end of its output: a process
    may close its output and run on, or leave a child holding it and exit.
    """
    pipe = proc.stdout.fileno()  # type: ignore[union-attr]
    # Where there are no pidfds (not Linux), look at the process every EXIT_POLL_SECONDS instead.
    exited = os.pidfd_open(proc.pid) if hasattr(os, "pidfd_open") else None
    try:
        watched = select.poll()
        if exited is not None:
            watched.register(exited, select.POLLIN)  # first: once it is, what is in the pipe is for _drain
        watched.register(pipe, select.POLLIN)
        while True:
            wait_ms = None if exited is not None else EXIT_POLL_SECONDS * 1000
            if deadline is not None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                wait_ms = min(math.ceil(remaining * 1000), wait_ms or math.inf)
            ready = watched.poll(wait_ms)
            if exited is None and proc.poll() is not None:
                return True
            for fd, _ in ready:
                if fd == exited:
                    return True
                chunk = os.read(pipe, 65536)
                if chunk:
                    output.add(chunk)
                else:  # the process closed its output: wait for its exit alone
                    watched.unregister(pipe)
    finally:
        if exited is not None:
            os.close(exited)


def _drain(pipe: int, output: _CappedOutput) -> bool:
    """Read what is left in the pipe of a process that ended: False if it is still open after
    OUTPUT_DRAIN_SECONDS (held by a process that left the group, which we cannot kill)."""
    ends = time.monotonic() + OUTPUT_DRAIN_SECONDS
    watched = select.poll()  # not select(): a worker with many connections has descriptors over 1023
    watched.register(pipe, select.POLLIN)
    while True:
        remaining = ends - time.monotonic()
        if remaining <= 0 or not watched.poll(math.ceil(remaining * 1000)):
            return False
        chunk = os.read(pipe, 65536)
        if not chunk:
            return True
        output.add(chunk)


def kill_running_tasks() -> None:
    """Kill the process groups of the shell commands this process is running."""
    for group in list(_running_groups):
        _kill_group(group)


def _kill_group(pgid: int) -> bool:
    """SIGKILL every process in the group: False if there was none."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        return False
    return True
