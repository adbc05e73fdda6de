"""A job's results on the client's side: collected, shown as progress, written out.

Owns ``Results`` (every task's result, indexed by task id, filled as batches arrive),
``Progress`` (the done/total line on a terminal), the per-task result record (one
function: the lines of the client's results file and the tasks of the HTTP API's results
are both made by ``task_record``) and the results file's formats: JSONL (a record a line)
and CSV (``--format csv``: the same fields as columns, and ``record_from_csv`` reading a
row back).  Not the wire format (protocol.py turns messages into ``ResultBatch``), a
task's status rule (tasks.py) nor the report made of the records (report.py).
"""

from __future__ import annotations

import csv
import json
import sys
import time
from collections.abc import Iterable, Iterator
from itertools import repeat
from typing import Any, TextIO

from cloudkon.errors import MalformedMessage
from cloudkon.protocol import parse_json
from cloudkon.tasks import ResultBatch, task_status

PROGRESS_AFTER_SECONDS = 1.0
PROGRESS_EVERY_SECONDS = 0.25


def task_record(task_id: int, command: str, exit_code: int | None, output: str, elapsed_us: int,
                worker: str | None, error: str | None, status_key: str = "status",
                source: str | None = None) -> dict[str, Any]:
    """One task's result as a JSON object: a line of the results file, and (``status_key``
    "result") a task of the HTTP API's results.  Its keys' order is the output's.  ``source``:
    the workload file and line the task came from (workloads.py), when the client knows it."""
    record: dict[str, Any] = {"id": task_id, "command": command}
    if source is not None:
        record["source"] = source
    record.update({status_key: task_status(exit_code, error), "exit_code": exit_code, "output": output,
                   "elapsed_ms": elapsed_us / 1000, "worker": worker})
    if error is not None:
        record["error"] = error
    return record


class Results:
    """Every task's result, indexed by task id, filled as batches arrive."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.exit_codes: list[int | None] = [None] * total
        self.outputs: list[str] = [""] * total
        self.elapsed_us: list[int] = [0] * total
        self.errors: list[str | None] = [None] * total
        self.workers: list[str | None] = [None] * total  # where each ran (host:pid, a worker's identity)
        self._seen = bytearray(total)
        self.artifacts: dict[int, dict[str, Any]] = {}  # where a job description's outputs went
        self.received = 0
        self.failed = 0  # cancelled tasks included
        self.cancelled = 0
        self.cost: dict[str, Any] | None = None  # a remote job's figures (costs.py), from its job_done

    def add(self, batch: ResultBatch) -> None:
        seen, total = self._seen, self.total
        for task_id in batch.ids:
            if type(task_id) is not int or not 0 <= task_id < total or seen[task_id]:
                raise MalformedMessage(f"result for unknown or already reported task {task_id!r}")
            seen[task_id] = 1
        workers, worker = self.workers, batch.worker
        for task_id, code, output, elapsed, error in zip(
                batch.ids, batch.exit_codes, batch.outputs, batch.elapsed_us, batch.errors, strict=True):
            self.exit_codes[task_id] = code
            self.outputs[task_id] = output
            self.elapsed_us[task_id] = elapsed
            self.errors[task_id] = error
            workers[task_id] = worker
        if batch.artifacts is not None:
            self.artifacts.update((i, a) for i, a in zip(batch.ids, batch.artifacts, strict=True) if a)
        self.received += len(batch)
        self.failed += batch.failed_count()
        self.cancelled += batch.cancelled_count()

    def fail(self, task_id: int, error: str) -> None:
        """Turn a task's success into a failure the client found (its outputs did not arrive)."""
        if task_status(self.exit_codes[task_id], self.errors[task_id]) == "success":
            self.failed += 1
        self.exit_codes[task_id], self.errors[task_id] = None, error
        self.artifacts.pop(task_id, None)

    def grow(self, count: int) -> None:
        """Room for ``count`` more tasks: a workload streamed from standard input (workloads.py)
        grows its results as its tasks are sent, from another thread than the one adding results."""
        for column, empty in ((self.exit_codes, None), (self.outputs, ""), (self.elapsed_us, 0),
                              (self.errors, None), (self.workers, None)):
            column.extend([empty] * count)  # type: ignore[list-item]
        self._seen.extend(bytes(count))
        self.total += count  # last: add() checks a task id against it

    @property
    def complete(self) -> bool:
        return self.received == self.total

    def records(self, commands: list[str], sources: Iterable[str] | None = None) -> Iterator[dict[str, Any]]:
        """Each task's record (``task_record``, with the ``outputs`` of a job description that
        left some), in workload order; with its source, if ``sources`` says them."""
        each_source = iter(sources or repeat(None))
        for task_id, command in enumerate(commands):
            record = task_record(task_id, command, self.exit_codes[task_id], self.outputs[task_id],
                                 self.elapsed_us[task_id], self.workers[task_id], self.errors[task_id],
                                 source=next(each_source))
            if task_id in self.artifacts:
                record["outputs"] = self.artifacts[task_id]
            yield record


# The columns of --format csv, in order: the output last, being the longest.  ``source`` is left
# out when the client does not know it (--cursor), ``outputs`` (a JSON object) when no job
# description left any.  An empty cell is a null: no exit code, no worker, no error.
CSV_COLUMNS = ("id", "command", "source", "status", "exit_code", "elapsed_ms", "worker", "error", "output",
               "outputs")


def write_jsonl(records: Iterable[dict[str, Any]], out: TextIO) -> None:
    """One JSON object a line."""
    dumps = json.dumps
    for record in records:
        out.write(dumps(record))
        out.write("\n")


def write_csv(records: Iterable[dict[str, Any]], out: TextIO, columns: tuple[str, ...]) -> None:
    """A header, then a row a record; quoted as RFC 4180 says (the csv module's default dialect,
    CRLF row ends), so that any output (newlines, commas, quotes) reads back whole."""
    writer = csv.writer(out)
    writer.writerow(columns)
    for record in records:
        writer.writerow(_csv_cell(record.get(column)) for column in columns)


def _csv_cell(value: Any) -> str:
    if value is None:
        return ""
    return json.dumps(value) if isinstance(value, dict) else str(value)  # str(float) is JSON's repr too


def record_from_csv(row: dict[str, str]) -> dict[str, Any]:
    """A row of --format csv (by column) as the record it was written from; ValueError if a
    number is not one."""
    record: dict[str, Any] = {column: row[column] for column in CSV_COLUMNS if row.get(column)}
    record["id"] = int(row["id"])
    record["exit_code"] = int(row["exit_code"]) if row.get("exit_code") else None
    record["elapsed_ms"] = float(row["elapsed_ms"])
    record["worker"] = row.get("worker") or None
    record.setdefault("command", "")
    record.setdefault("output", "")
    if "outputs" in record:
        record["outputs"] = parse_json(record["outputs"].encode())
    return record


RESULT_FORMATS = ("jsonl", "csv")


def write_results(results: Results, commands: list[str], path: str, sources: Iterable[str] | None = None,
                  file_format: str = "jsonl") -> None:
    """The results file at ``path`` ('-': stdout), in one of RESULT_FORMATS."""
    def write(out: TextIO) -> None:
        records = results.records(commands, sources)
        if file_format == "csv":
            write_csv(records, out, tuple(c for c in CSV_COLUMNS if (c != "source" or sources is not None)
                                          and (c != "outputs" or results.artifacts)))
        else:
            write_jsonl(records, out)

    if path == "-":
        write(sys.stdout)
        return
    # newline="": the csv module writes its own row ends, and a CR inside an output stays one.
    with open(path, "w", encoding="utf-8", newline="") as out:
        write(out)


class Progress:
    """A done/total, rate and ETA line on stderr, for runs over a second on a terminal."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.start = time.monotonic()
        self._next = self.start + PROGRESS_AFTER_SECONDS
        self._shown = False

    def __call__(self, results: Results) -> None:
        now = time.monotonic()
        if not self.enabled or now < self._next:
            return
        self._next = now + PROGRESS_EVERY_SECONDS
        rate = results.received / (now - self.start)
        eta = (results.total - results.received) / rate if rate else float("inf")
        cancelled = f"  cancelled {results.cancelled}" if results.cancelled else ""
        sys.stderr.write(f"\r{results.received}/{results.total} tasks  {rate:,.0f}/s  "
                         f"ETA {eta:,.0f} s  failed {results.failed - results.cancelled}{cancelled}   ")
        sys.stderr.flush()
        self._shown = True

    def clear(self) -> None:
        if self._shown:
            sys.stderr.write("\r\x1b[K")
            sys.stderr.flush()
