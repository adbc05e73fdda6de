"""Task time estimates: how long a task will run, before it runs.

Owns what the scheduler knows of task durations, so that the bundle rule (backend.py)
can cut a job's next tasks into a bundle of about the right length however mixed the
durations are.  An estimate comes from, in order:

  1. the task itself: ``sleep N`` runs N milliseconds (tasks.native_sleep_ms);
  2. the same command seen before in this scheduler, then the same program (the
     line's first word), weighted towards the longer runs so that a program whose
     runs vary is not taken for its short ones;
  3. a high percentile of the job's own results so far (never the mean: the first
     results of a mixed job are its short tasks);
  4. nothing: an unknown task is taken to be long (UNKNOWN_TASK_SECONDS), so it goes
     out alone until something is known.

Wrong estimates cost little: a bundle is also time-boxed (tasks.run_bundle hands back
what it has not started once its budget is spent).  Knows nothing of jobs' queues or
backends; jobs.py asks it.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Iterable

from tasks import CANCELLED, ResultBatch, native_sleep_ms

# What a worker spends on a task beyond its own run (``sleep 0`` takes about 1.2 us in
# the worker's loop): enough that a bundle of instant tasks still has a length.
TASK_OVERHEAD_SECONDS = 2e-6

# An unknown task is assumed to be this long: long enough to go out in a bundle of its own.
UNKNOWN_TASK_SECONDS = math.inf

# Commands and programs remembered; past this, the oldest half is forgotten (a workload of
# a million distinct lines must not grow the scheduler by a million entries).
MAX_REMEMBERED = 65_536

# Results looked at per batch: enough to learn from, without a Python step per result on
# the hot path (a batch of `sleep 0` holds thousands).
SAMPLES_PER_BATCH = 16

# A job's own recent durations, for its high percentile.
JOB_SAMPLE_SIZE = 256
JOB_PERCENTILE = 0.9


def program_of(command: str) -> str:
    """The program a command line runs: its first word."""
    return command.split(None, 1)[0] if command else ""


class TaskTimes:
    """Durations seen per command and per program, across every job of a scheduler."""

    def __init__(self) -> None:
        self._by_command: dict[str, float] = {}
        self._by_program: dict[str, float] = {}
        # Bumped whenever an estimate changes, so that jobs drop the estimates they cached.
        self.generation = 0

    def known(self, command: str) -> float | None:
        """Seconds ``command`` is expected to take, or None if nothing is known of it."""
        ms = native_sleep_ms(command)
        if ms is not None:
            return ms / 1000 + TASK_OVERHEAD_SECONDS
        seconds = self._by_command.get(command)
        if seconds is None:
            seconds = self._by_program.get(program_of(command))
        return seconds

    def learn(self, command: str, seconds: float) -> None:
        """Take one run of ``command`` into account (a ``sleep N`` teaches nothing new)."""
        if native_sleep_ms(command) is not None:
            return
        previous = self._by_command.get(command)
        _remember(self._by_command, command, seconds if previous is None else (previous + seconds) / 2)
        program = program_of(command)
        previous = self._by_program.get(program)
        # Up at once to a longer run, down slowly: erring long costs a bundle, erring short a worker.
        _remember(self._by_program, program,
                  seconds if previous is None else max(seconds, 0.8 * previous + 0.2 * seconds))
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
        """Take a batch of results of this job (a sample of them) into account; tasks that
        never ran (cancelled, failed to start, reported by the scheduler) teach nothing."""
        step = max(1, len(batch.ids) // SAMPLES_PER_BATCH)
        for position in range(0, len(batch.ids), step):
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
            ordered = sorted(self._recent)
            self._fallback = ordered[min(len(ordered) - 1, int(JOB_PERCENTILE * len(ordered)))]
        return self._fallback, False


class _Cache(dict):
    """command -> estimate, filled on a miss with what may be cached."""

    def __init__(self, estimate: Callable[[str], tuple[float, bool]]) -> None:
        super().__init__()
        self._estimate = estimate

    def __missing__(self, command: str) -> float:
        seconds, cacheable = self._estimate(command)
        if cacheable:
            self[command] = seconds
        return seconds


def _remember(table: dict[str, float], key: str, seconds: float) -> None:
    if key not in table and len(table) >= MAX_REMEMBERED:
        for old in list(table)[:MAX_REMEMBERED // 2]:  # dicts keep insertion order: the oldest first
            del table[old]
    table[key] = seconds
