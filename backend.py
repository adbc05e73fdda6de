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
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from types import TracebackType

from tasks import Bundle, ResultBatch

# Upper bound on tasks per bundle, for tasks that take no time at all (``sleep 0``).
MAX_BUNDLE_TASKS = 4096

# Upper bound on command bytes per bundle (a single longer command still goes alone),
# so that bundles stay small on the pipe to a worker and inside one SQS message.
MAX_BUNDLE_COMMAND_BYTES = 128 * 1024


def bundle_size(avg_task_us: float | None, undispatched: int, slots: int,
                target_seconds: float) -> int:
    """How many tasks of a job to put in its next bundle.

    One task while nothing is known of the job's task times (they may be long); then
    ``target_seconds`` worth.  Never more than an even share of what is left over the
    ``slots`` bundles the backend holds, so that bundles shrink as a job ends and its
    last tasks spread over every worker; but never under an eighth of the target,
    where the bundle's own cost would outweigh the balance gained.
    """
    if avg_task_us is None:
        return 1
    by_time = int(target_seconds * 1e6 / max(avg_task_us, 1.0))
    even_share = max(-(-undispatched // max(slots, 1)), by_time // 8)
    return max(1, min(by_time, even_share, MAX_BUNDLE_TASKS))


class Backend(ABC):
    """Runs bundles of tasks on workers and reports their results."""

    name: str = "backend"
    # Where clients stage the files of job descriptions (sandbox.py): an s3:// prefix, or
    # local:HOST when the workers read and write the files in place on that host.
    staging: str | None = None
    # Work per bundle, by the job's average task time so far: long enough that the
    # per-bundle cost stays near 1%, short enough that a job submitted behind a big
    # one waits about this long at most.
    target_bundle_seconds: float = 0.02

    @abstractmethod
    def workers(self) -> int:
        """How many tasks can run at once (for bundle sizing)."""

    def capacity(self) -> int:
        """How many bundles to keep submitted and unfinished so that no worker waits."""
        return 2 * self.workers()

    @abstractmethod
    def submit(self, bundle: Bundle) -> None:
        """Queue a bundle for a worker."""

    @abstractmethod
    def receive(self, timeout: float) -> list[ResultBatch]:
        """Result batches that arrived within ``timeout`` seconds (empty list if none)."""

    @abstractmethod
    def cancel(self, job: str) -> None:
        """Stop the tasks of ``job``: drop the queued ones, stop the running ones."""

    @abstractmethod
    def close(self, wait: bool = True) -> None:
        """Stop the workers: after the bundles they hold if ``wait``, else at once."""

    def __enter__(self) -> Backend:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close(wait=exc_type is None)
