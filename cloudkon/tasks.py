"""Tasks: what a workload line means, and the data that carries tasks and their results.

Owns the workload format (one task per line: reading, decoding, splitting), the data that
travels between the scheduler and the workers (``Bundle`` of tasks in, ``ResultBatch`` out),
what a result says of its task (success, failed, cancelled) and the limits of a task (its
command's length, its timeout, the output it keeps).  It runs nothing (processes.py runs one
task, runner.py a bundle) and knows nothing of queues, sockets or bytes: protocol.py turns
these objects into frames.

Task semantics:
  ``sleep N`` (N a whole number) sleeps N milliseconds inside the worker, with no
  process spawned: the CloudKon benchmark task.  Any other line runs as
  ``/bin/sh -c LINE`` in its own process group (processes.py).  A line starting with
  ``{"`` is a job description with files, staged by the client and run in a sandbox
  (jdl.py, sandbox.py).  Exit status 0 is success.  ``exit_code`` is None when no
  process ran to completion (timeout, signal, spawn failure, cancellation), and
  ``error`` then says why; the error CANCELLED marks a task of a cancelled job, whose
  status is ``cancelled`` rather than ``failed``.
"""

from __future__ import annotations

import codecs
from dataclasses import dataclass, field
from typing import Any

from cloudkon.errors import WorkloadError

# Output kept per task.  Large enough for a useful log tail, small enough that a
# bundle of chatty tasks still fits comfortably in one frame.
OUTPUT_CAP_BYTES = 64 * 1024

# Linux refuses a single exec argument of 128 KiB or more (MAX_ARG_STRLEN), and a
# shell command is one argument of /bin/sh -c; reject longer lines up front.
MAX_COMMAND_BYTES = 128 * 1024 - 1

# The ``error`` of a task whose job was cancelled before it ran or while it ran.
CANCELLED = "cancelled"

# Longest task timeout a job may ask for (30 days), on the command line, in a job description or
# in a message: a longer one is a mistake (1e308, or milliseconds taken for seconds), and a
# deadline past every clock's range breaks the worker's timers.
MAX_TASK_TIMEOUT_SECONDS = 30 * 86400.0

_SLEEP_PREFIX = "sleep "


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
        if self.errors.count(None) == len(self.errors):  # the usual batch: counted at C speed
            return len(self.ids) - self.exit_codes.count(0)
        pairs = zip(self.exit_codes, self.errors, strict=True)
        return len(self.ids) - sum(1 for code, error in pairs if is_success(code, error))

    def cancelled_count(self) -> int:
        # The usual batch has no error at all: told at C speed (comparing None with a string is slow).
        if self.errors.count(None) == len(self.errors):
            return 0
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


def first_output_line(output: str) -> str:
    """The first line of a task's output with something in it, stripped ("" if none): what a failure
    is shown and grouped by (the dashboard, client.py --summary).  Looks at the first 4 KiB only."""
    return next((line.strip() for line in output[:4096].splitlines() if line.strip()), "")


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
    # The rule of task_line_numbers, written out: this runs over every line of a large workload.
    tasks = [line for line in map(str.strip, text.split("\n")) if line and line[0] != "#"]
    if not tasks:
        raise WorkloadError("no tasks (only blank lines and # comments)", path)
    position = first_too_long(tasks)
    if position is not None:
        raise WorkloadError(f"task longer than {MAX_COMMAND_BYTES} bytes", path,
                            task_line_numbers(text)[position])
    return tasks


def task_line_numbers(text: str) -> list[int]:
    """The line number (from 1) of each task of a workload's text, in the order workload_tasks
    returns them."""
    return [number for number, line in enumerate(map(str.strip, text.split("\n")), 1)
            if line and line[0] != "#"]


def first_too_long(commands: list[str]) -> int | None:
    """The position of the first command over MAX_COMMAND_BYTES, or None if none is."""
    # A character is at most 4 bytes: only a command this long can be over the limit (a quick
    # look at the lengths first, as tasks arrive by the million).
    if not commands or max(map(len, commands)) * 4 <= MAX_COMMAND_BYTES:
        return None
    return next((position for position, command in enumerate(commands)
                 if len(command.encode()) > MAX_COMMAND_BYTES), None)


def native_sleep_ms(command: str) -> int | None:
    """N for a ``sleep N`` task, else None (the line is a shell command)."""
    if not command.startswith(_SLEEP_PREFIX):
        return None
    arg = command[len(_SLEEP_PREFIX):]
    if arg.isascii() and arg.isdigit():
        return int(arg)
    return None


def check_task_timeout(value: object) -> float:
    """``value`` as a task timeout in seconds: positive, finite and at most MAX_TASK_TIMEOUT_SECONDS.

    Raises ValueError saying what is wrong otherwise (NaN and infinity included)."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not number or not 0 < value <= MAX_TASK_TIMEOUT_SECONDS:
        raise ValueError(f"a task timeout must be a number of seconds above 0 and at most "
                         f"{MAX_TASK_TIMEOUT_SECONDS:.0f} (30 days), not {value!r}")
    return float(value)
