"""What the job service keeps of its jobs beyond memory: all of it in a job store, or nothing.

Owns the one choice the service would otherwise make in a dozen places (``--no-state`` or
not): ``StoreKeeper`` hands every record to the job store's journal (jobstore.py), so jobs
survive a restart and a finished job's results stay until they expire, read back from the
store; ``MemoryKeeper`` keeps nothing, a job's tasks and results stay in memory (jobs.Job)
and go once a client has had them.  Both are used from the scheduler's event loop.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
from abc import ABC, abstractmethod
from typing import Any

from cloudkon.jobs import Job
from cloudkon.jobstore import Record
from cloudkon.journal import Journal
from cloudkon.tasks import ResultBatch

log = logging.getLogger("cloudkon.scheduler")


class Keeper(ABC):
    """What the service keeps of its jobs beyond memory."""

    keeps_results: bool  # a finished job stays until it expires (else until its results are delivered)
    durable: bool  # jobs outlive the scheduler: a restart on the same store resumes them

    @abstractmethod
    def describe(self) -> str:
        """Where jobs are kept, for the log and for a client told how to come back."""

    @abstractmethod
    def start(self) -> int:
        """Count one more scheduler start (blocking; 0 when nothing is kept)."""

    @abstractmethod
    def record(self, record: Record) -> None:
        """Keep ``record`` (never blocks)."""

    @abstractmethod
    async def written(self) -> None:
        """Once everything recorded so far is kept."""

    @abstractmethod
    async def load(self, finished_since: float) -> list[Job]:
        """The jobs kept from an earlier start, but those finished before ``finished_since``."""

    @abstractmethod
    async def read(self, job: Job, commands: bool) -> tuple[list[str], list[ResultBatch]]:
        """A finished job's tasks (if ``commands``) and results."""

    @abstractmethod
    def remove(self, job_ids: list[str]) -> None:
        """Drop these (expired) jobs, without waiting."""

    @abstractmethod
    def close(self) -> None:
        """Write what is recorded and let the store go."""


class StoreKeeper(Keeper):
    """Keeps every job in a job store, through its journal (jobstore.py)."""

    keeps_results = True

    def __init__(self, journal: Journal) -> None:
        self._journal = journal
        self._store = journal.store
        self.durable = journal.store.durable

    def describe(self) -> str:
        return self._store.describe()

    def start(self) -> int:
        return self._journal.call(self._store.start).result()

    def record(self, record: Record) -> None:
        self._journal.record(record)

    async def written(self) -> None:
        await asyncio.wrap_future(self._journal.written())

    async def load(self, finished_since: float) -> list[Job]:
        return await asyncio.wrap_future(self._journal.call(self._store.load, finished_since))

    async def read(self, job: Job, commands: bool) -> tuple[list[str], list[ResultBatch]]:
        results = await asyncio.wrap_future(self._journal.call(self._store.read_results, job.id))
        tasks = await asyncio.wrap_future(self._journal.call(self._store.read_commands, job.id)) \
            if commands else []
        return tasks, results

    def remove(self, job_ids: list[str]) -> None:
        self._journal.call(self._store.remove, job_ids).add_done_callback(_log_failure)

    def close(self) -> None:
        self._journal.close()


class MemoryKeeper(Keeper):
    """Keeps nothing (--no-state): a job's tasks and results are in memory until delivered."""

    keeps_results = False
    durable = False

    def describe(self) -> str:
        return "memory only"

    def start(self) -> int:
        return 0

    def record(self, record: Record) -> None:
        return None

    async def written(self) -> None:
        return None

    async def load(self, finished_since: float) -> list[Job]:
        return []

    async def read(self, job: Job, commands: bool) -> tuple[list[str], list[ResultBatch]]:
        return (job.commands if commands else []), job.results or []

    def remove(self, job_ids: list[str]) -> None:
        return None

    def close(self) -> None:
        return None


def _log_failure(future: concurrent.futures.Future[Any]) -> None:
    if future.exception() is not None:
        log.error("%s", future.exception())
