"""A job's results on the client's side: collected, shown as progress, written out.

Owns ``Results`` (every task's result, indexed by task id, filled as batches arrive),
``Progress`` (the done/total line on a terminal), the per-task result record (one
function: the lines of the client's JSONL file and the tasks of the HTTP API's results
are both made by ``task_record``) and writing the JSONL file.  Not the wire format
(protocol.py turns messages into ``ResultBatch``) nor a task's status rule (tasks.py).
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterable
from itertools import repeat
from typing import Any, TextIO

from cloudkon.errors import MalformedMessage
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

    def write_jsonl(self, commands: list[str], out: TextIO, sources: Iterable[str] | None = None) -> None:
        """One JSON object per task, in workload order (with its source, if ``sources`` says them)."""
        dumps, each_source = json.dumps, iter(sources or repeat(None))
        for task_id, command in enumerate(commands):
            record = task_record(task_id, command, self.exit_codes[task_id], self.outputs[task_id],
                                 self.elapsed_us[task_id], self.workers[task_id], self.errors[task_id],
                                 source=next(each_source))
            if task_id in self.artifacts:
                record["outputs"] = self.artifacts[task_id]
            out.write(dumps(record))
            out.write("\n")


def write_results(results: Results, commands: list[str], path: str,
                  sources: Iterable[str] | None = None) -> None:
    """The results file at ``path`` ('-': stdout)."""
    if path == "-":
        results.write_jsonl(commands, sys.stdout, sources)
        return
    with open(path, "w", encoding="utf-8") as out:
        results.write_jsonl(commands, out, sources)


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
