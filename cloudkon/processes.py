"""Processes: how one task runs in this process, and how it is stopped.

Owns running one task (``run_task``) and one process (``run_process``, which sandbox.py
builds on for the steps of a job description): process groups, deadlines, output caps,
and cancellation (``Cancellations``), shared by local worker processes and remote EC2
workers.  What a task is and what its result holds is tasks.py's; running a bundle of
tasks is runner.py's.

A shell command runs as ``/bin/sh -c LINE`` in its own process group, stdout and stderr
captured together (the first ``output_cap`` bytes kept).  The task is that shell: its
timeout covers the shell whatever it does with its output, and it ends when the shell
exits; what it left running in its group is killed then, and a note at the end of the
output says so (run_process).

A job can be cancelled while this process runs its tasks (``Cancellations``): a running
shell command's process group is killed, a long ``sleep N`` wakes up early, and a task
that did not succeed then reports CANCELLED (``cancel_overrides``).
"""

from __future__ import annotations

import ctypes
import math
import os
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from cloudkon.tasks import CANCELLED, OUTPUT_CAP_BYTES, is_success, native_sleep_ms

# Once a task's process has exited (and what it left in its group is killed), output still in
# its pipe is read for at most this long: ample for the pipe's 64 KiB, bounded against a process
# that left the group (setsid) and holds the pipe open.
OUTPUT_DRAIN_SECONDS = 0.2
# Without pidfds (not Linux), how often a task's process is looked at for its exit.
EXIT_POLL_SECONDS = 0.02

# ``sleep N`` tasks at least this long wait on their job's cancellation instead of
# sleeping blindly; shorter ones are not worth the (small) extra cost per task.
INTERRUPTIBLE_SLEEP_MS = 100

_PR_SET_TIMERSLACK = 29

# Process groups of the shell commands this process is running (one per thread), each
# with its job's cancellation event, so that a worker being stopped, or a job being
# cancelled, can take them down (each runs in its own session).
_running_groups: dict[int, threading.Event | None] = {}


def reduce_timer_slack() -> None:
    """Make sleeps of a millisecond precise in this process (Linux only; else no-op).

    The default 50 us timer slack adds ~8% to a 1 ms ``sleep`` task; 1 ns makes it ~3%.
    """
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None).prctl(_PR_SET_TIMERSLACK, 1, 0, 0, 0)
        except (OSError, AttributeError):
            pass


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
    exit_code, error = cancel_overrides(exit_code, error, cancelled)
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
        return None, timeout_error(timeout)
    return 0, None


def timeout_error(timeout: float) -> str:
    """The error of a task that ran out of its ``timeout``."""
    return f"timed out after {timeout:g} s"


def cancel_overrides(exit_code: int | None, error: str | None,
                     cancelled: threading.Event | None) -> tuple[int | None, str | None]:
    """``(exit_code, error)`` of a task that ended, unless its job was cancelled and it did not
    succeed: then it was cancelled (its failure is most likely the kill), ``(None, CANCELLED)``."""
    if cancelled is not None and cancelled.is_set() and not is_success(exit_code, error):
        return None, CANCELLED
    return exit_code, error


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
    if cancelled is not None and cancelled.is_set():  # its job was cancelled since the bundle last looked
        return None, "", CANCELLED
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
        return None, output.text(), timeout_error(timeout)  # type: ignore[arg-type]
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
