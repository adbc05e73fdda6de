"""The backend interface: what the scheduler needs from whatever runs the tasks.

Owns the ``Backend`` contract and the bundling rule shared by every backend.  The
scheduler's job bookkeeping (jobs.py) talks only to this interface, so the
protocol, the client and the jobs never know whether tasks run in local worker
processes (localworkers.py) or on EC2 workers fed through SQS.

Contract, as the contract tests check it for every backend:
  - ``submit(bundle)`` queues a bundle; it never blocks on a worker.
  - ``receive(timeout)`` returns the result batches that arrived, an empty list on
    timeout; it never blocks longer than ``timeout``.  It is called from one thread.
  - Every task of every submitted bundle gets results carrying the bundle's number,
    possibly spread over several batches (and, for remote backends, possibly more
    than once: the caller keeps the first).  A task whose worker died is re-run or
    reported failed, never lost.
  - ``cancel(job)`` stops a job's work: its queued tasks never start, its running
    ones are stopped within seconds.  Whatever the backend still reports for them is
    dropped: the dispatcher gives each of them the result cancelled at once.  It may
    block briefly (a remote backend records the cancel durably before it returns) and
    may be called from any thread.
  - ``close(wait=True)`` lets workers finish what they hold; ``wait=False`` stops them now.
  - ``worker_states()`` lists the workers (local: each process; remote: the fleet's instances,
    none without a fleet), from any thread.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from bisect import bisect_right
from itertools import accumulate
from typing import Any

from cloudkon.tasks import Bundle, ResultBatch

# Upper bound on tasks per bundle, for tasks that take no time at all (``sleep 0``).
MAX_BUNDLE_TASKS = 4096

# Upper bound on command bytes per bundle (a single longer command still goes alone),
# so that bundles stay small on the pipe to a worker and inside one SQS message.
MAX_BUNDLE_COMMAND_BYTES = 128 * 1024


# A bundle's time box is this many times its estimated length, plus its backend's
# ``time_box_margin``: room for estimates that are a little off, a stop for those that are
# far off.
TIME_BOX_SLACK = 2.0

# "About the target": 20 tasks of 1 ms (and a few microseconds of overhead each) make a
# 20 ms bundle.
TARGET_TOLERANCE = 1.01


def plan_bundle(times: list[float], target_seconds: float, even_share: int,
                margin_seconds: float) -> tuple[int, float | None]:
    """How many of a job's next tasks (expected to take ``times`` seconds each) make its
    next bundle, and the bundle's time box in seconds (None: no box).

    As many as fit in ``target_seconds`` (at least one, however long); never more than
    ``even_share`` (what is left of the job over the slots that run it, so that a job's
    last tasks spread over every worker, even when their estimates are wrong: balance
    before the cost of more bundles).
    """
    total = list(accumulate(times))
    count = min(max(1, bisect_right(total, target_seconds * TARGET_TOLERANCE)), max(1, even_share))
    expected = total[count - 1]
    if math.isinf(expected):
        return count, None
    return count, TIME_BOX_SLACK * expected + margin_seconds


def commands_that_fit(commands: list[str]) -> int:
    """How many of ``commands``, from the first, fit in MAX_BUNDLE_COMMAND_BYTES (at least one)."""
    if sum(map(len, commands)) <= MAX_BUNDLE_COMMAND_BYTES:
        return len(commands)
    count, size = 1, len(commands[0])
    while count < len(commands) and size + len(commands[count]) <= MAX_BUNDLE_COMMAND_BYTES:
        size += len(commands[count])
        count += 1
    return count


class Backend(ABC):
    """Runs bundles of tasks on workers and reports their results."""

    name: str = "backend"
    # Where clients stage the files of job descriptions (sandbox.py): an s3:// prefix, or
    # local:HOST when the workers read and write the files in place on that host.  Each backend
    # sets it once, in its constructor (a remote one is given it); the scheduler only reads it.
    staging: str | None = None
    # Work per bundle, by the estimates of its tasks (estimates.py): long enough that the
    # per-bundle cost stays near 1%, short enough that a job submitted behind a big
    # one waits about this long at most.
    target_bundle_seconds: float = 0.02
    # Added to twice a bundle's estimated length for its time box (backend.plan_bundle).
    time_box_margin: float = 0.04
    # How long a receive waits while no bundle is out (no result expected): a remote backend
    # long-polls, so that an idle scheduler makes a few calls a minute.
    idle_receive_seconds: float = 1.0

    @abstractmethod
    def workers(self) -> int:
        """The slots: how many tasks run at once, as far as the backend knows; a job's last bundles
        are spread over this many.  Local: the worker processes.  SQS: the threads of the workers
        subscribed, unless the user set --in-flight (then that), SLOTS_WITHOUT_WORKERS before any
        worker has said."""

    def describe(self) -> str:
        """What runs the tasks, for the log."""
        return f"{self.name} backend: {self.workers()} tasks at once"

    def capacity(self) -> int:
        """How many bundles to keep submitted and unfinished so that no worker waits."""
        return 2 * self.workers()

    @abstractmethod
    def submit(self, bundle: Bundle) -> None:
        """Queue a bundle for a worker."""

    @abstractmethod
    def receive(self, timeout: float) -> list[ResultBatch]:
        """Result batches that arrived within ``timeout`` seconds (empty list if none)."""

    def wake(self) -> None:
        """Make a ``receive`` in progress return soon (any thread; the scheduler is stopping).
        By default nothing: it returns within its timeout."""
        return None

    def worker_states(self) -> list[dict[str, Any]]:
        """What each worker is and does, for the dashboard (any thread): ``id``, ``kind`` ("process"
        or "instance"), ``state``, ``running`` (the bundles it holds, in words) and ``last_heartbeat``
        (epoch seconds of its last sign of life; None before the first).  A worker taking tasks is
        "busy" or "idle" (local), or "running" (an instance that has sent a heartbeat).  By default
        none is known."""
        return []

    @abstractmethod
    def cancel(self, job: str) -> None:
        """Stop the tasks of ``job``: drop the queued ones, stop the running ones."""

    @abstractmethod
    def close(self, wait: bool = True) -> None:
        """Stop the workers: after the bundles they hold if ``wait``, else at once."""
