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
  (the first ``output_cap`` bytes kept).  Exit status 0 is success.  ``exit_code``
  is None when no process ran to completion (timeout, signal, spawn failure), and
  ``error`` then says why.
"""

from __future__ import annotations

import ctypes
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from errors import WorkloadError

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

_SLEEP_PREFIX = "sleep "
_PR_SET_TIMERSLACK = 29

# Process groups of the shell commands this process is running (one per thread), so
# that a worker being stopped can take them down with it (each runs in its own session).
_running_groups: set[int] = set()


@dataclass
class Bundle:
    """Tasks of one job sent to a worker together.

    ``bundle`` numbers the bundle within the scheduler, so results can be matched to it.
    """

    job: str
    bundle: int
    ids: list[int]
    commands: list[str]
    timeout: float | None = None


@dataclass
class ResultBatch:
    """Results of some tasks of one job, as parallel columns (cheap to build and encode).

    Task ``ids[i]`` ended with ``exit_codes[i]`` after ``elapsed_us[i]`` microseconds,
    printed ``outputs[i]``; ``errors[i]`` is the framework's reason when no process ran
    to completion, else None.
    """

    job: str
    bundle: int | None = None
    ids: list[int] = field(default_factory=list)
    exit_codes: list[int | None] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)
    elapsed_us: list[int] = field(default_factory=list)
    errors: list[str | None] = field(default_factory=list)

    def add(self, task_id: int, exit_code: int | None, output: str, elapsed_us: int,
            error: str | None) -> None:
        self.ids.append(task_id)
        self.exit_codes.append(exit_code)
        self.outputs.append(output)
        self.elapsed_us.append(elapsed_us)
        self.errors.append(error)

    def select(self, positions: list[int]) -> ResultBatch:
        """A batch of the rows at ``positions``."""
        return ResultBatch(
            self.job, self.bundle,
            [self.ids[p] for p in positions],
            [self.exit_codes[p] for p in positions],
            [self.outputs[p] for p in positions],
            [self.elapsed_us[p] for p in positions],
            [self.errors[p] for p in positions],
        )

    def failed_count(self) -> int:
        pairs = zip(self.exit_codes, self.errors, strict=True)
        return len(self.ids) - sum(1 for code, error in pairs if is_success(code, error))

    def __len__(self) -> int:
        return len(self.ids)


def is_success(exit_code: int | None, error: str | None) -> bool:
    return exit_code == 0 and error is None


def failed_batch(job: str, bundle: int | None, ids: list[int], error: str) -> ResultBatch:
    """Results saying that tasks ``ids`` failed without running to completion."""
    n = len(ids)
    return ResultBatch(job, bundle, list(ids), [None] * n, [""] * n, [0] * n, [error] * n)


def parse_workload(path: str) -> list[str]:
    """The tasks of a workload file: its lines, stripped, minus blanks and ``#`` comments.

    Raises WorkloadError (naming the line where there is one) for a missing or
    unreadable file, bytes that are not UTF-8, an over-long line, or no task at all.
    """
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise WorkloadError(f"cannot read workload: {exc.strerror or exc}", path) from exc
    return parse_workload_bytes(data, path)


def parse_workload_bytes(data: bytes, path: str = "<workload>") -> list[str]:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise WorkloadError(f"not UTF-8 (byte 0x{data[exc.start]:02x})", path, line) from None
    lines = text.split("\n")
    tasks = [line for line in map(str.strip, lines) if line and line[0] != "#"]
    if not tasks:
        raise WorkloadError("no tasks (only blank lines and # comments)", path)
    # A character is at most 4 bytes: only a line this long can be over the limit.
    if max(map(len, tasks)) * 4 > MAX_COMMAND_BYTES:
        for number, line in enumerate(lines, 1):
            if len(line.strip().encode()) > MAX_COMMAND_BYTES:
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


def run_task(command: str, timeout: float | None = None,
             output_cap: int = OUTPUT_CAP_BYTES) -> tuple[int | None, str, int, str | None]:
    """Run one task: ``(exit_code, output, elapsed_us, error)``."""
    start = time.perf_counter_ns()
    ms = native_sleep_ms(command)
    if ms is not None:
        if timeout is not None and ms > timeout * 1000:
            time.sleep(timeout)
            return None, "", (time.perf_counter_ns() - start) // 1000, _timed_out(timeout)
        if ms:
            time.sleep(ms / 1000)
        return 0, "", (time.perf_counter_ns() - start) // 1000, None
    exit_code, output, error = _run_shell(command, timeout, output_cap)
    return exit_code, output, (time.perf_counter_ns() - start) // 1000, error


def run_bundle(bundle: Bundle, output_cap: int = OUTPUT_CAP_BYTES,
               on_task_start: Callable[[int], None] | None = None) -> Iterator[ResultBatch]:
    """Run a bundle's tasks in order, yielding their results in batches.

    A batch is yielded every RESULT_FLUSH_SECONDS, or once it holds
    RESULT_FLUSH_OUTPUT_BYTES of output, and at the end.  ``on_task_start(task_id)``
    is called before each task (the local backend uses it to know which task a
    worker that died was running).
    """
    batch = ResultBatch(bundle.job, bundle.bundle)
    output_bytes = 0
    flush_at = time.monotonic() + RESULT_FLUSH_SECONDS
    for task_id, command in zip(bundle.ids, bundle.commands, strict=True):
        if on_task_start is not None:
            on_task_start(task_id)
        exit_code, output, elapsed_us, error = run_task(command, bundle.timeout, output_cap)
        batch.add(task_id, exit_code, output, elapsed_us, error)
        if output:
            output_bytes += len(output)
        if output_bytes >= RESULT_FLUSH_OUTPUT_BYTES or time.monotonic() >= flush_at:
            yield batch
            batch = ResultBatch(bundle.job, bundle.bundle)
            output_bytes = 0
            flush_at = time.monotonic() + RESULT_FLUSH_SECONDS
    if batch.ids:
        yield batch


def _timed_out(timeout: float) -> str:
    return f"timed out after {timeout:g} s"


def _run_shell(command: str, timeout: float | None,
               output_cap: int) -> tuple[int | None, str, str | None]:
    try:
        proc = subprocess.Popen(
            ["/bin/sh", "-c", command], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, start_new_session=True,
        )
    except (OSError, ValueError) as exc:
        return None, "", f"could not start /bin/sh: {exc}"
    _running_groups.add(proc.pid)
    deadline = None if timeout is None else time.monotonic() + timeout
    try:
        with proc:
            kept, dropped, timed_out = _read_capped(proc, output_cap, deadline)
            if timed_out:
                _kill_group(proc.pid)
            returncode = proc.wait()
    finally:
        _running_groups.discard(proc.pid)
    output = kept.decode("utf-8", "replace")
    if dropped:
        output += f"\n[cloudkon: output truncated, {dropped} more bytes not kept]"
    if timed_out:
        return None, output, _timed_out(timeout)  # type: ignore[arg-type]
    if returncode < 0:
        return None, output, f"killed by signal {-returncode} ({signal.Signals(-returncode).name})"
    return returncode, output, None


def _read_capped(proc: subprocess.Popen, cap: int,
                 deadline: float | None) -> tuple[bytes, int, bool]:
    """Read a process's output until EOF or the deadline: (first ``cap`` bytes, bytes dropped, timed out)."""
    fd = proc.stdout.fileno()  # type: ignore[union-attr]
    kept = bytearray()
    dropped = 0
    while True:
        if deadline is not None:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
                return bytes(kept), dropped, True
        chunk = os.read(fd, 65536)
        if not chunk:
            return bytes(kept), dropped, False
        room = cap - len(kept)
        if room > 0:
            kept += chunk[:room]
        dropped += max(0, len(chunk) - max(room, 0))


def kill_running_tasks() -> None:
    """Kill the process groups of the shell commands this process is running."""
    for group in list(_running_groups):
        _kill_group(group)


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
