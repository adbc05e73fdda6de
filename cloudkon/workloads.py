"""A job's tasks and where each came from: several workload files, standard input, a JDL file.

Owns ``Workload``: the tasks of ``-w FILE... [-w -]`` in the order given, task ids continuing
across inputs, each with its source (``FILE:LINE``; ``-:LINE`` for standard input; the file name
alone for ``-j FILE.jdl``).  Files are read whole and checked before anything is submitted, with
tasks.py's rules (BOM, UTF-16, CRLF, blank lines and comments, a task's length) and jdl.py's for
job descriptions.  Standard input is streamed (``StdinTasks``): decoded and checked by the same
rules as its bytes arrive, its first task read before the job opens (so an empty input is refused
with nothing submitted), the rest handed out as they come; ``TaskSender`` sends them to the open
job from a thread of its own while the client's main flow collects the results.  Memory: every
task's command is held (the results file names it), plus 4 bytes a task for its line number: the
bound of a file read whole.  Relies on no AWS behaviour.
"""

from __future__ import annotations

import codecs
import logging
import os
import select
import threading
from array import array
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from itertools import chain

from cloudkon import protocol
from cloudkon.connection import SchedulerConnection
from cloudkon.errors import CloudKonError, WorkloadError
from cloudkon.jdl import JobSpec, is_job_description, read_jdl, workload_specs
from cloudkon.results import Results
from cloudkon.tasks import (
    MAX_COMMAND_BYTES,
    decode_workload,
    first_too_long,
    read_workload,
    task_line_numbers,
    workload_tasks,
)

log = logging.getLogger("cloudkon.client")

STDIN = "-"

# One read of standard input: a pipe gives what is there, up to this; its tasks go out together.
READ_BYTES = 64 * 1024

# A line of standard input not ended yet is held up to this (a task is at most MAX_COMMAND_BYTES, but
# white space around it is stripped): an input with no line end is refused rather than held whole.
MAX_LINE_BYTES = 1024 * 1024

_UTF32_MARKS = (codecs.BOM_UTF32_LE, codecs.BOM_UTF32_BE)
_UTF16_MARKS = (codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)


@dataclass
class _Source:
    """One input's part of the job: its name, its first task's id, each task's line (0: the whole file;
    a range for a file whose every line is a task, known without a pass over its lines)."""

    name: str
    first: int
    lines: array | range = field(default_factory=lambda: array("I"))


class StdinTasks:
    """Standard input's tasks as its bytes arrive, decoded and checked as a file's are.

    ``read()`` blocks for one read of the descriptor (or ``stop()``, from another thread)."""

    def __init__(self, fd: int = 0) -> None:
        self.fd = fd
        self.line = 0  # lines ended so far
        self._head: bytes | None = b""  # the first bytes, until they say the encoding (then None)
        self._pending = b""  # UTF-8: the bytes of a line not ended yet
        self._decoder: codecs.IncrementalDecoder | None = None  # UTF-16 (its byte order mark said so)
        self._text = ""  # UTF-16: the text of a line not ended yet
        self._stop_r, self._stop_w = os.pipe()
        self._closing = threading.Lock()  # stop() comes from another thread: never on a closed pipe
        self.ended = self.closed = False

    def stop(self) -> None:
        """End the input at its next read, as if it had ended there."""
        with self._closing:
            if not (self.ended or self.closed):
                os.write(self._stop_w, b"x")

    def close(self) -> None:
        with self._closing:
            if not self.closed:
                self.closed = True
                os.close(self._stop_r)
                os.close(self._stop_w)

    def read(self) -> list[tuple[int, str]]:
        """The tasks (line number, task) of the next read, maybe none; ``ended`` once it is all read."""
        ready, _, _ = select.select([self.fd, self._stop_r], [], [])
        if self._stop_r in ready:  # stopped: a line not ended yet is dropped with the rest
            self.ended = True
            return []
        data = os.read(self.fd, READ_BYTES)
        if not data:
            self.ended = True
        if self._head is not None:
            known = self._after_head(data)
            if known is None:
                return []
            data = known
        lines = self._utf16_lines(data) if self._decoder is not None else self._utf8_lines(data)
        return self._tasks(lines)

    def _after_head(self, data: bytes) -> bytes | None:
        """The bytes read so far once they tell the encoding (a byte order mark is up to 4 bytes;
        a UTF-8 one dropped), or None until they do."""
        assert self._head is not None
        head = self._head + data
        could_be_mark = any(mark.startswith(head) for mark in (*_UTF32_MARKS, *_UTF16_MARKS, codecs.BOM_UTF8))
        if could_be_mark and len(head) < 4 and not self.ended:
            self._head = head
            return None
        if head.startswith(_UTF32_MARKS):
            raise WorkloadError("UTF-32 text: save it as UTF-8", STDIN)
        self._head = None
        if head.startswith(_UTF16_MARKS):
            self._decoder = codecs.getincrementaldecoder("utf-16")()
            return head
        return head.removeprefix(codecs.BOM_UTF8)

    def _utf8_lines(self, data: bytes) -> list[str]:
        pending = self._pending + data
        *ended, self._pending = pending.split(b"\n")
        self._check_unended(len(self._pending), len(ended))
        if self.ended and self._pending:
            ended.append(self._pending)
        lines = []
        for number, raw in enumerate(ended, self.line + 1):
            try:
                lines.append(raw.decode("utf-8"))
            except UnicodeDecodeError as exc:
                raise WorkloadError(f"not UTF-8 (byte 0x{raw[exc.start]:02x})", STDIN, number) from None
        return lines

    def _utf16_lines(self, data: bytes) -> list[str]:
        *ended, self._text = (self._text + self._decode16(data)).split("\n")
        self._check_unended(len(self._text) * 2, len(ended))
        if self.ended and self._text:
            ended.append(self._text)
        return ended

    def _check_unended(self, size: int, ended: int) -> None:
        """WorkloadError if the line not ended yet (after ``ended`` lines of this read) is too long."""
        if size > MAX_LINE_BYTES:
            raise WorkloadError(f"a line over {MAX_LINE_BYTES >> 20} MiB (a task is at most "
                                f"{MAX_COMMAND_BYTES} bytes)", STDIN, self.line + ended + 1)

    def _decode16(self, data: bytes) -> str:
        assert self._decoder is not None
        try:
            return self._decoder.decode(data, final=self.ended)
        except UnicodeDecodeError:
            raise WorkloadError("not valid UTF-16: save it as UTF-8", STDIN, self.line + 1) from None

    def _tasks(self, lines: list[str]) -> list[tuple[int, str]]:
        """Tasks of these lines, by tasks.py's rules (a line stripped; blanks and # comments skipped)."""
        tasks = []
        for number, line in enumerate(map(str.strip, lines), self.line + 1):
            if "\0" in line:
                raise WorkloadError("a NUL character (UTF-16 saved without a byte order mark? save it "
                                    "as UTF-8)", STDIN, number)
            if line and line[0] != "#":
                tasks.append((number, line))
        self.line += len(lines)
        position = first_too_long([task for _, task in tasks])
        if position is not None:
            raise WorkloadError(f"task longer than {MAX_COMMAND_BYTES} bytes", STDIN, tasks[position][0])
        described = next((number for number, task in tasks if is_job_description(task)), None)
        if described is not None:  # staged when the job opens: they come from files (docs/jobs.md)
            raise WorkloadError("a job description: those are read from workload files, not from "
                                "standard input", STDIN, described)
        return tasks


class Workload:
    """A job's tasks (``commands``, by task id), its job descriptions (``specs``) and their sources.

    Without standard input among the paths every task is known once it is built; with it
    (``streaming``), ``chunks()`` hands out the tasks in order as they are read."""

    def __init__(self, paths: list[str], stdin_fd: int = 0) -> None:
        if paths.count(STDIN) > 1:
            raise WorkloadError("standard input ('-') may be given once")
        self.commands: list[str] = []
        self.specs: dict[int, JobSpec] = {}
        self._sources: list[_Source] = []
        # Every file read and checked now, before anything is submitted; None stands for stdin.
        self._inputs = [None if path == STDIN else _read_file(path) for path in paths]
        self.stdin = StdinTasks(stdin_fd) if STDIN in paths else None
        self._head: list[tuple[int, str]] = []
        if self.stdin is None:
            for item in self._inputs:
                self._add_file(*item)  # type: ignore[misc]
            return
        if any(item[3] for item in self._inputs if item is not None):
            raise WorkloadError("job descriptions go in a job that does not read standard input ('-')")
        try:
            while not self._head and not self.stdin.ended:
                self._head = self.stdin.read()
        except BaseException:
            self.stdin.close()
            raise
        if not self._head:
            self.stdin.close()
            raise WorkloadError("no tasks on standard input (it was empty, or only blank lines and "
                                "# comments)", STDIN)

    @classmethod
    def job_description(cls, path: str) -> Workload:
        """The one task of ``-j FILE.jdl``."""
        workload = cls([])
        workload.specs[0] = read_jdl(path)
        workload._extend(path, [f"# job description {path}"], [0])
        return workload

    @property
    def streaming(self) -> bool:
        return self.stdin is not None

    def chunks(self) -> Iterator[list[str]]:
        """A streamed workload's tasks in order, as they are read: the lists handed out are in
        ``commands`` already, each task with its source.  WorkloadError names a bad line."""
        assert self.stdin is not None, "only a workload that reads standard input streams"
        try:
            for item in self._inputs:
                if item is not None:
                    yield self._add_file(*item)
                    continue
                tasks = self._head
                while True:
                    if tasks:
                        yield self._extend(STDIN, [task for _, task in tasks],
                                           [number for number, _ in tasks])
                    if self.stdin.ended:
                        break
                    tasks = self.stdin.read()
        finally:
            self.stdin.close()

    def read_all(self) -> None:
        """Read standard input to its end now, for a job submitted whole (``-l`` hangs up once it is)."""
        for _ in self.chunks():
            pass
        self.stdin = None

    def stop(self) -> None:
        """Standard input is read no further: the job ends with the tasks read (Ctrl-C, cancelled)."""
        if self.stdin is not None:
            self.stdin.stop()

    def sources(self) -> Iterator[str]:
        """Each task's source, in task id order."""
        return chain.from_iterable(
            (f"{source.name}:{line}" if line else source.name for line in source.lines)
            for source in self._sources)

    def _add_file(self, path: str, tasks: list[str], numbers: list[int] | range,
                  specs: dict[int, JobSpec]) -> list[str]:
        first = len(self.commands)
        self.specs.update((first + position, spec) for position, spec in specs.items())
        return self._extend(path, tasks, numbers)

    def _extend(self, name: str, tasks: list[str], numbers: list[int] | range) -> list[str]:
        if name != STDIN or not self._sources or self._sources[-1].name != STDIN:  # stdin: one, growing
            self._sources.append(_Source(name, len(self.commands)))
        if isinstance(numbers, range):  # a file's, whole
            self._sources[-1].lines = numbers
        else:
            self._sources[-1].lines.extend(numbers)  # type: ignore[union-attr]  (stdin's array)
        self.commands.extend(tasks)
        return tasks


def _read_file(path: str) -> tuple[str, list[str], list[int] | range, dict[int, JobSpec]]:
    """A workload file's tasks, their line numbers and job descriptions (by position in the file)."""
    text = decode_workload(read_workload(path), path)
    tasks = workload_tasks(text, path)
    # Most files are a task a line: their numbers are 1..n, with no pass over a million lines.
    lines = text.count("\n") + (not text.endswith("\n"))
    numbers = range(1, len(tasks) + 1) if len(tasks) == lines else task_line_numbers(text)
    return path, tasks, numbers, workload_specs(path, text, tasks)


class TaskSender:
    """Sends a streamed workload's tasks to its open job from a thread of its own, while the main
    flow collects the results (the scheduler stops reading a client that does not read its answers).

    ``results`` grows before each task is sent, so a result never arrives for a task it lacks;
    ``job_close`` says the count at the end of the input.  A bad line on standard input, found
    after tasks went out, calls ``cancel`` and ends the job with what was sent: ``finish()``
    raises it once the results are in."""

    def __init__(self, conn: SchedulerConnection, job: str, workload: Workload, results: Results,
                 cancel: Callable[[], object]) -> None:
        self.conn, self.job, self.workload, self.results, self._cancel = conn, job, workload, results, cancel
        self.error: CloudKonError | None = None
        self._thread = threading.Thread(target=self._run, name="cloudkon-sender", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        sent = 0
        try:
            for chunk in self.workload.chunks():
                self.results.grow(len(chunk))
                for message in protocol.task_messages(self.job, chunk):
                    self.conn.send(message)
                sent += len(chunk)
        except WorkloadError as exc:
            self.error = self._cancelled(exc)
        except (CloudKonError, OSError) as exc:  # the connection broke: the main flow hears of it too
            self.error = exc if isinstance(exc, CloudKonError) else CloudKonError(f"sending tasks: {exc}")
            return
        try:
            self.conn.send({"type": "job_close", "job": self.job, "count": sent})
        except OSError as exc:
            self.error = self.error or CloudKonError(f"closing job {self.job}: {exc}")

    def _cancelled(self, exc: WorkloadError) -> CloudKonError:
        try:
            self._cancel()
        except (CloudKonError, OSError) as failure:
            return CloudKonError(f"{exc}; job {self.job} could not be cancelled ({failure}): the tasks "
                                 "before this line run")
        return CloudKonError(f"{exc}; job {self.job} was cancelled (the tasks before this line had been "
                             "submitted)")

    def stop(self) -> None:
        """Read no more: the job is closed with the tasks sent."""
        self.workload.stop()

    def finish(self) -> None:
        """Once the job is done: raise what went wrong while sending, if anything did."""
        self._thread.join()
        if self.error is not None:
            raise self.error


def submit_workload(conn: SchedulerConnection, workload: Workload, timeout: float | None,
                    prepare: Callable[[str], list[str]] | None,
                    cancel: Callable[[str], object]) -> tuple[str, Results, TaskSender | None]:
    """Submit ``workload`` on ``conn``: the job's id, its results to fill, and, streamed, its sender
    (the job open, its tasks going out as they are read; ``cancel(job)`` on a bad line)."""
    if not workload.streaming:
        job = conn.submit(workload.commands, timeout, prepare=prepare)
        return job, Results(len(workload.commands)), None
    job = conn.open_job(timeout)
    results = Results(0)
    return job, results, TaskSender(conn, job, workload, results, lambda: cancel(job))
