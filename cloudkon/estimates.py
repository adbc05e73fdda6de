"""Task time estimates: how long a task will run, before it runs.

Owns what the scheduler knows of task durations, so that the bundle rule (backend.py)
can cut a job's next tasks into a bundle of about the right length however mixed the
durations are.  An estimate comes from, in order:

  1. the task itself: ``sleep N`` runs N milliseconds (tasks.native_sleep_ms);
  2. the same command seen before in this scheduler (the mean of its runs), then the
     same program (the line's first word: the longest of its recent runs, so that a
     program whose runs vary, say most of them instant and some 10 s, is not taken for
     its short ones: a bundle of them would run its first long one, and hold the rest
     of it, however long that takes);
  3. a high percentile of the job's own results so far (never the mean: the first
     results of a mixed job are its short tasks);
  4. nothing: an unknown task is taken to be long (UNKNOWN_TASK_SECONDS), so it goes
     out alone until something is known.

Wrong estimates cost little: a bundle is also time-boxed (runner.run_bundle hands back
what it has not started once its budget is spent).  Knows nothing of jobs' queues or
backends; jobs.py asks it.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any

from cloudkon.tasks import CANCELLED, ResultBatch, native_sleep_ms

# What a worker spends on a task beyond its own run (``sleep 0`` takes about 1.2 us in
# the worker's loop): enough that a bundle of instant tasks still has a length.
TASK_OVERHEAD_SECONDS = 2e-6

# An unknown task is assumed to be this long: long enough to go out in a bundle of its own.
UNKNOWN_TASK_SECONDS = math.inf

# Commands and programs remembered; past this, the oldest half is forgotten (a workload of
# a million distinct lines must not grow the scheduler by a million entries).  Commands longer
# than MAX_REMEMBERED_COMMAND characters are known by their program only (a line of a job
# description can be 128 KiB, and such lines rarely repeat): at most about 16 MiB of keys.
MAX_REMEMBERED = 65_536
MAX_REMEMBERED_COMMAND = 256
MAX_PROGRAMS = 4_096

# Recent runs kept per program, the longest of which is its estimate: enough that a program
# whose runs are mostly instant and 10% long is not taken for an instant one after a streak
# (the chance that 256 runs in a row are all short is 0.9 ** 256, about 2e-12).
PROGRAM_SAMPLE_SIZE = 256

# Results looked at per batch, its longest among them: enough to learn from, without a
# Python step per result on the hot path (a batch of `sleep 0` holds thousands).
SAMPLES_PER_BATCH = 16

# A job's own recent durations, for its high percentile.
JOB_SAMPLE_SIZE = 256
PERCENTILE = 0.9


def program_of(command: str) -> str:
    """The program a command line runs: its first word."""
    return command.split(None, 1)[0] if command else ""


class TaskTimes:
    """Durations seen per command and per program, across every job of a scheduler."""

    def __init__(self) -> None:
        self._by_command: dict[str, float] = {}
        self._by_program: dict[str, float] = {}  # the longest of the runs below
        self._program_runs: dict[str, deque[float]] = {}
        # Bumped whenever an estimate changes, so that jobs drop the estimates they cached.
        self.generation = 0

    def known(self, command: str) -> float | None:
        """Seconds ``command`` is expected to take, or None if nothing is known of it."""
        ms = native_sleep_ms(command)
        if ms is not None:
            return ms / 1000 + TASK_OVERHEAD_SECONDS
        seconds = self._by_command.get(command)
        if seconds is None:
            seconds = self._by_program.get(program_of(command)[:MAX_REMEMBERED_COMMAND])
        return seconds

    def learn(self, command: str, seconds: float) -> None:
        """Take one run of ``command`` into account (a ``sleep N`` teaches nothing new)."""
        if native_sleep_ms(command) is not None:
            return
        if len(command) <= MAX_REMEMBERED_COMMAND:
            previous = self._by_command.get(command)
            _remember(self._by_command, command, seconds if previous is None else (previous + seconds) / 2,
                      MAX_REMEMBERED)
        program = program_of(command)[:MAX_REMEMBERED_COMMAND]
        runs = self._program_runs.get(program)
        if runs is None:
            runs = deque(maxlen=PROGRAM_SAMPLE_SIZE)
            _remember(self._program_runs, program, runs, MAX_PROGRAMS)
        runs.append(seconds)
        # Erring long costs a bundle's overhead; erring short, a worker left idle (or, with the
        # time box, tasks handed back late).
        _remember(self._by_program, program, max(runs), MAX_PROGRAMS)
        self.generation += 1


class JobTimes:
    """One job's estimates: what TaskTimes knows, else the job's own high percentile."""

    def __init__(self, times: TaskTimes) -> None:
        self._times = times
        self._recent: deque[float] = deque(maxlen=JOB_SAMPLE_SIZE)
        self._fallback: float | None = UNKNOWN_TASK_SECONDS
        self._cache = _Cache(self._estimate)
        self._generation = times.generation

    def estimates(self, commands: Iterable[str]) -> list[float]:
        """Seconds each of ``commands`` is expected to take."""
        if self._generation != self._times.generation or len(self._cache) > MAX_REMEMBERED:
            self._cache.clear()
            self._generation = self._times.generation
        return list(map(self._cache.__getitem__, commands))

    def learn(self, commands: list[str], batch: ResultBatch) -> None:
        """Take a batch of results of this job (a sample of them, and its longest) into
        account; tasks that never ran (cancelled, failed to start, reported by the scheduler)
        teach nothing."""
        elapsed = batch.elapsed_us
        step = max(1, len(batch.ids) // SAMPLES_PER_BATCH)
        positions = range(0, len(batch.ids), step)
        longest = elapsed.index(max(elapsed)) if elapsed else 0
        for position in positions if longest in positions else [*positions, longest]:
            error, elapsed_us = batch.errors[position], batch.elapsed_us[position]
            if error is not None and (error == CANCELLED or not elapsed_us):
                continue
            self._recent.append(elapsed_us / 1e6)
            self._times.learn(commands[batch.ids[position]], elapsed_us / 1e6)
            self._fallback = None  # worked out again when next needed

    def _estimate(self, command: str) -> tuple[float, bool]:
        """(seconds, whether it may be cached): the job's fallback changes with every batch."""
        seconds = self._times.known(command)
        if seconds is not None:
            return seconds, True
        if self._fallback is None:
            self._fallback = percentile(self._recent)
        return self._fallback, False


def percentile(values: Iterable[float]) -> float:
    """The PERCENTILE-th of ``values`` (not empty)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(PERCENTILE * len(ordered)))]


class _Cache(dict):
    """command -> estimate, filled on a miss with what may be cached."""

    def __init__(self, estimate: Callable[[str], tuple[float, bool]]) -> None:
        super().__init__()
        self._estimate = estimate

    def __missing__(self, command: str) -> float:
        seconds, cacheable = self._estimate(command)
        if cacheable and len(command) <= MAX_REMEMBERED_COMMAND:
            self[command] = seconds
        return seconds


def _remember(table: dict[str, Any], key: str, value: Any, limit: int) -> None:
    if key not in table and len(table) >= limit:
        for old in list(table)[:limit // 2]:  # dicts keep insertion order: the oldest first
            del table[old]
    table[key] = value
