"""A finished job's results as tables a person reads in an 80-column terminal.

Owns ``JobReport``: the totals (succeeded, failed, cancelled; the wall time when known, the
task time summed), the slowest tasks, the failures grouped by what failed (exit code or error)
and the first line of their output, and the time per worker; gathered from result records
(``results.task_record``'s) one at a time and rendered as plain text.  The records are the
client's at the end of a run (``client.py --summary``) or a results file's (``--report FILE``):
also owned here is reading a results file back, JSONL or the CSV of ``--format csv``, from a
path or standard input, each record checked and a bad one named by its line.

Memory does not grow with the job: the ``top`` slowest tasks are kept in a heap, at most
MAX_GROUPS failure groups and MAX_WORKERS workers are told apart (any more are counted
together), every text kept is cut to KEPT_CHARS, and a file is read a record at a time (a line,
or a CSV field, of at most MAX_LINE_BYTES).  About ``top`` + 11,000 entries of a few hundred
bytes, a few MiB, for a results file of any length.
"""

from __future__ import annotations

import codecs
import csv
import heapq
import io
import json
import math
import re
import sys
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from itertools import chain
from typing import IO, Any

from cloudkon.errors import ResultsFileError
from cloudkon.protocol import parse_json
from cloudkon.results import CSV_COLUMNS, record_from_csv
from cloudkon.tasks import first_output_line

TOP = 10  # rows of each table (--top)
EXAMPLES = 3  # task ids shown for a failure group
MAX_GROUPS = 1000
MAX_WORKERS = 10_000
KEPT_CHARS = 200  # of a command, an error, a first output line: more would not fit a line anyway
MAX_LINE_BYTES = 16 * 1024 * 1024  # a record is at most ~1 MiB (128 KiB command, 64 KiB output, escaped)
WIDTH = 80

STATUSES = ("success", "failed", "cancelled")
OTHER_GROUP = ("(others)", f"(failures past the first {MAX_GROUPS} groups)")
OTHER_WORKERS = "(other workers)"
NO_WORKER = "(no worker)"  # cancelled before starting, failed at shutdown, its worker died

# A record's fields and their JSON types, exactly (not bool for int); those it may lack read as null.
_FIELD_TYPES: dict[str, tuple[type, ...]] = {
    "id": (int,), "command": (str,), "status": (str,), "exit_code": (int, type(None)), "output": (str,),
    "elapsed_ms": (float, int), "worker": (str, type(None)), "source": (str, type(None)),
    "error": (str, type(None))}
_REQUIRED_FIELDS = ("id", "command", "status", "exit_code", "output", "elapsed_ms", "worker")
_CSV_REQUIRED = set(CSV_COLUMNS) - {"source", "outputs"}  # the columns --format csv always writes

# Characters that would move the cursor or recolour the terminal, shown as \xNN instead.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


@dataclass(slots=True)
class _Tally:
    """Tasks counted under one key (a worker, a failure group), their time and their first ids."""

    tasks: int = 0
    busy_ms: float = 0.0
    examples: list[int] = field(default_factory=list)


class JobReport:
    """A job's results summed up as they are added; ``render`` makes the text."""

    def __init__(self, top: int = TOP) -> None:
        self.top = top
        self.counts = dict.fromkeys(STATUSES, 0)
        self.task_ms = 0.0
        # A heap of the slowest: (elapsed, -id, how many came before: never two alike, command, worker).
        self._slowest: list[tuple[float, int, int, str, str]] = []
        self._groups: dict[tuple[str, str], _Tally] = {}
        self._workers: dict[str, _Tally] = {}

    @classmethod
    def of(cls, records: Iterable[Mapping[str, Any]], top: int = TOP) -> JobReport:
        report = cls(top)
        for record in records:
            report.add(record)
        return report

    def add(self, record: Mapping[str, Any]) -> None:
        """Count one task's record (``results.task_record``'s keys)."""
        task_id, elapsed, status = record["id"], record["elapsed_ms"], record["status"]
        worker_name = _kept(record["worker"] or NO_WORKER)
        slowest = self._slowest
        if len(slowest) < self.top or (elapsed, -task_id) > slowest[0][:2]:  # among equals, the first
            entry = (elapsed, -task_id, -self.total, _kept(record["command"]), worker_name)
            (heapq.heappush if len(slowest) < self.top else heapq.heapreplace)(slowest, entry)
        self.counts[status] += 1
        self.task_ms += elapsed
        worker = _tally(self._workers, worker_name, OTHER_WORKERS, MAX_WORKERS)
        worker.tasks += 1
        worker.busy_ms += elapsed
        if status == "failed":
            error = record.get("error")
            reason = error if error is not None else f"exit {record['exit_code']}"
            key = (_kept(reason), _kept(first_output_line(record["output"])))
            group = _tally(self._groups, key, OTHER_GROUP, MAX_GROUPS)
            group.tasks += 1
            group.busy_ms += elapsed
            if len(group.examples) < EXAMPLES:
                group.examples.append(task_id)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def render(self, wall_seconds: float | None = None, width: int = WIDTH) -> str:
        """The report as lines of at most ``width`` characters (``wall_seconds``: the run's, if known)."""
        counts = self.counts
        lines = [f"{self.total} tasks: {counts['success']} succeeded, {counts['failed']} failed, "
                 f"{counts['cancelled']} cancelled"]
        task_time = f"task time {self.task_ms / 1000:.3f} s in all"
        if wall_seconds:
            lines.append(f"wall time {wall_seconds:.3f} s")
            task_time += f" ({self.task_ms / 1000 / wall_seconds:.2f} times the wall time)"
        lines += [task_time, ""]
        lines += self._slowest_table(width) + [""] + self._failures_table(width) + [""]
        lines += self._workers_table(width)
        return "\n".join(lines)

    def _slowest_table(self, width: int) -> list[str]:
        slowest = sorted(self._slowest, reverse=True)
        rows = [[str(-negative_id), _seconds(elapsed), _cut(worker, 24), command]
                for elapsed, negative_id, _, command, worker in slowest]
        title = f"Slowest tasks ({len(rows)} of {self.total})"
        return [title] + _table([("ID", ">"), ("ELAPSED", ">"), ("WORKER", "<"), ("COMMAND", "<")],
                                rows, width)

    def _failures_table(self, width: int) -> list[str]:
        failed = self.counts["failed"]
        if not failed:
            return ["Failures: none"]
        groups = sorted(self._groups.items(), key=lambda item: (-item[1].tasks, item[1].examples))
        rows = [[str(group.tasks), _cut(reason, 24),
                 ", ".join(map(str, group.examples)) + (", ..." if group.tasks > len(group.examples) else ""),
                 first_line or "(no output)"]
                for (reason, first_line), group in groups[:self.top]]
        # The headers say what makes a group: the same exit code (or error) and first output line.
        title = f"Failures: {_count(failed, 'task')} in {_count(len(groups), 'group')}"
        lines = [title] + _table([("COUNT", ">"), ("EXIT/ERROR", "<"), ("TASKS", "<"),
                                  ("FIRST OUTPUT LINE", "<")], rows, width)
        return lines + _left_out(groups[self.top:], "group")

    def _workers_table(self, width: int) -> list[str]:
        workers = sorted(self._workers.items(), key=lambda item: (-item[1].busy_ms, item[0]))
        task_ms = self.task_ms or 1.0  # a job of instant tasks: every share 0%
        rows = [[_cut(name, 40), str(tally.tasks), f"{tally.busy_ms / 1000:.3f}",
                 f"{100 * tally.busy_ms / task_ms:.1f}%"] for name, tally in workers[:self.top]]
        title = f"Time per worker ({_count(len(workers), 'worker')}; share of the task time)"
        lines = [title] + _table([("WORKER", "<"), ("TASKS", ">"), ("BUSY S", ">"), ("SHARE", ">")],
                                 rows, width)
        return lines + _left_out(workers[self.top:], "worker")


def _left_out(rest: list[tuple[Any, _Tally]], noun: str) -> list[str]:
    """The line saying what a table cut at its ``top`` rows left out, if it did."""
    if not rest:
        return []
    tasks, busy_ms = sum(tally.tasks for _, tally in rest), sum(tally.busy_ms for _, tally in rest)
    return [f"  ... and {_count(len(rest), 'more ' + noun)} ({_count(tasks, 'task')}, "
            f"{busy_ms / 1000:.3f} s)"]


def _tally(table: dict[Any, _Tally], key: Any, overflow_key: Any, limit: int) -> _Tally:
    """``table``'s entry for ``key``, made if new; once ``limit`` keys are told apart, a new
    key's tasks go to ``overflow_key``'s (so that the table's memory is bounded)."""
    tally = table.get(key)
    if tally is None:
        tally = table.setdefault(key if len(table) < limit else overflow_key, _Tally())
    return tally


def _kept(text: str) -> str:
    """A text as the report keeps it: cut, its control characters made visible."""
    return _CONTROL.sub(lambda match: f"\\x{ord(match[0]):02x}", _cut(text, KEPT_CHARS))


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}{'s' * (number != 1)}"


def _cut(text: str, width: int) -> str:
    return text if len(text) <= width else text[:width - 3] + "..."


def _seconds(milliseconds: float) -> str:
    return f"{milliseconds / 1000:.3f} s"


def _table(columns: list[tuple[str, str]], rows: list[list[str]], width: int) -> list[str]:
    """Rows under their headers, indented and two spaces apart, each column ('<' or '>': its
    alignment) as wide as its widest cell; the last column at most what is left of ``width``, its
    cells cut to fit."""
    if not rows:
        return ["  (none)"]
    widths = [max([len(header), *(len(row[i]) for row in rows)]) for i, (header, _) in enumerate(columns)]
    left = width - 2 - sum(widths[:-1]) - 2 * (len(columns) - 1)
    widths[-1] = min(widths[-1], max(len(columns[-1][0]), left))
    lines = []
    for row in [[header for header, _ in columns], *rows]:
        cells = [f"{_cut(cell, w):{align}{w}}"
                 for cell, w, (_, align) in zip(row, widths, columns, strict=True)]
        lines.append(("  " + "  ".join(cells)).rstrip())
    return lines


def read_records(path: str) -> Iterator[dict[str, Any]]:
    """The records of a results file (``path``; '-': standard input), JSONL or --format csv (told
    apart by the first line), each checked; ResultsFileError names the line at fault."""
    stream: IO[bytes] = sys.stdin.buffer if path == "-" else open(path, "rb")
    try:
        number, first = 1, _read_line(stream, path, 1).removeprefix(codecs.BOM_UTF8)
        while first and not first.strip():  # blank lines before the first record
            number, first = number + 1, _read_line(stream, path, number + 1)
        if not first:
            raise ResultsFileError(f"{path}: no results in it (an empty file)")
        if first.lstrip().startswith(b"{"):
            yield from _jsonl_records(stream, path, number, first)
        else:
            yield from _csv_records(stream, path, number, first)
    finally:
        if stream is not sys.stdin.buffer:
            stream.close()


def _jsonl_records(stream: IO[bytes], path: str, number: int, first: bytes) -> Iterator[dict[str, Any]]:
    # The lambda reads ``number`` when called: the line after the one just counted.
    lines = chain([first], iter(lambda: _read_line(stream, path, number), b""))
    for line in lines:
        if line.strip():
            try:
                record = parse_json(line)  # nesting too deep is a ValueError there, not a RecursionError
            except UnicodeDecodeError:
                raise _bad(path, number, "not UTF-8") from None
            except ValueError as exc:
                raise _bad(path, number, f"not JSON ({exc})") from None
            yield _checked(record, path, number)
        number += 1


def _csv_records(stream: IO[bytes], path: str, number: int, first: bytes) -> Iterator[dict[str, Any]]:
    try:
        header = next(csv.reader([first.decode("utf-8")]))
    except (UnicodeDecodeError, csv.Error, StopIteration):
        header = []
    if not _CSV_REQUIRED <= set(header) <= set(CSV_COLUMNS):
        raise _bad(path, number, "not a results file: neither a JSON object (a line of JSONL results) "
                                 "nor the header of --format csv")
    lines = _RecordLines(io.TextIOWrapper(stream, encoding="utf-8", newline=""))
    previous_limit = csv.field_size_limit(MAX_LINE_BYTES)  # its default, 128 KiB, is a command's size
    reader = csv.reader(lines, strict=True)  # strict: a quote left open at the end is an error
    try:
        while True:
            start = number + reader.line_num + 1  # a record may span lines: where it starts
            lines.taken = 0
            try:
                row = next(reader)
            except StopIteration:
                return
            except _RecordTooLong:
                raise _bad(path, start, f"a record longer than {MAX_LINE_BYTES // (1024 * 1024)} MiB: "
                                        "not a results record") from None
            except UnicodeDecodeError:
                raise _bad(path, start, "not UTF-8") from None
            except csv.Error as exc:
                raise _bad(path, start, f"not CSV ({exc})") from None
            if not row:
                continue
            if len(row) != len(header):
                raise _bad(path, start, f"{len(row)} cells under a header of {len(header)}")
            try:
                record = record_from_csv(dict(zip(header, row, strict=True)))
            except ValueError as exc:
                raise _bad(path, start, f"not a results record ({exc})") from None
            yield _checked(record, path, start)
    finally:
        csv.field_size_limit(previous_limit)
        lines.text.detach()  # closing the wrapper would close the stream: standard input, say


class _RecordTooLong(Exception):
    pass


class _RecordLines:
    """The lines of a CSV file for csv.reader, no record's longer than MAX_LINE_BYTES characters in
    all: csv.reader builds a whole row before its cells can be counted (a line of 600 MB of commas
    would be a list of 600 million cells), and its field size limit bounds each cell only."""

    def __init__(self, text: io.TextIOWrapper) -> None:
        self.text = text
        self.taken = 0  # characters of the record being read (the reader's caller resets it)

    def __iter__(self) -> _RecordLines:
        return self

    def __next__(self) -> str:
        line = self.text.readline(MAX_LINE_BYTES - self.taken + 1)
        if not line:
            raise StopIteration
        self.taken += len(line)
        if self.taken > MAX_LINE_BYTES:
            raise _RecordTooLong
        return line


def _read_line(stream: IO[bytes], path: str, number: int) -> bytes:
    line = stream.readline(MAX_LINE_BYTES)
    if len(line) == MAX_LINE_BYTES and not line.endswith(b"\n"):
        raise _bad(path, number, f"longer than {MAX_LINE_BYTES // (1024 * 1024)} MiB: not a results record")
    return line


def _checked(record: Any, path: str, number: int) -> dict[str, Any]:
    """``record`` if it is a task's result as the client writes it; else ResultsFileError."""
    if type(record) is not dict:
        raise _bad(path, number, "not a results record (not a JSON object)")
    missing = [key for key in _REQUIRED_FIELDS if key not in record]
    if missing:
        raise _bad(path, number, f"not a results record (no {', '.join(map(repr, missing))})")
    for key, types in _FIELD_TYPES.items():  # type(), not isinstance: a bool is no id
        if type(record.get(key)) not in types:
            raise _bad(path, number, f"not a results record ({key!r} is {json.dumps(record[key])[:40]})")
    if record["status"] not in STATUSES:
        raise _bad(path, number, f"not a results record (status {record['status']!r:.40})")
    if not (math.isfinite(record["elapsed_ms"]) and record["elapsed_ms"] >= 0):
        raise _bad(path, number, f"not a results record (elapsed_ms {record['elapsed_ms']})")
    return record


def _bad(path: str, number: int, reason: str) -> ResultsFileError:
    return ResultsFileError(f"{path}:{number}: {reason}")
