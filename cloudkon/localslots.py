"""What LocalBackend knows of each worker process: the bundles it holds, and the rules on them.

Owns the bookkeeping of one worker (a ``WorkerSlot``) and the policies that read it:
whether a worker may be handed another bundle now (prefetch, PREFETCH_BUNDLES behind a
short one only), how many of its tasks it has not started, and which of them may be
stolen for an idle worker.  localworkers.py owns the slots (starting, feeding, burying
their processes); bench/simulate.py runs these same rules on simulated workers.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.connection
import time
from dataclasses import dataclass, field
from typing import Any

from cloudkon.tasks import Bundle

# Bundles a worker holds at once: the one it runs and the next, so it never waits
# for the scheduler between bundles.  More would hurt balance at the end of a job.
PREFETCH_BUNDLES = 2

# ... but a next one only behind a bundle boxed to at most this long: behind a longer one
# the wait for the scheduler is negligible, and a bundle queued behind it could have
# gone to the next worker that frees up.
PREFETCH_BEHIND_SECONDS = 0.25


@dataclass
class HeldBundle:
    """A bundle a worker holds: the first ``reported`` of its tasks have results (a worker
    reports a bundle's tasks in order), those from ``cut`` on were handed back."""

    bundle: Bundle
    reported: int = 0
    cut: int = -1

    def __post_init__(self) -> None:
        self.cut = len(self.bundle.ids)

    @property
    def unreported(self) -> int:
        return self.cut - self.reported


@dataclass
class WorkerSlot:
    """One worker process and what the backend has handed it."""

    process: multiprocessing.Process
    conn: multiprocessing.connection.Connection
    progress: object  # RawArray('q', 2): [bundle number, task id] the worker is running
    held: dict[int, HeldBundle] = field(default_factory=dict)  # by bundle number, in the order handed out
    asked: set[int] = field(default_factory=set)  # bundles it was asked to hand back
    idle_since: float = 0.0  # when it last ran out of bundles (the longest idle is served first)
    took_work: bool = False
    dead: bool = False
    last_heard: float = field(default_factory=time.time)  # epoch seconds of its start or last results

    def state(self, host: str) -> dict[str, Any]:
        """What it is and does, as Backend.worker_states says (read from any thread: a snapshot)."""
        held = list(self.held.values())
        return {"id": f"{host}:{self.process.pid}", "kind": "process",
                "state": "dead" if self.dead else "busy" if held else "idle",
                "running": [f"job {h.bundle.job} bundle {h.bundle.bundle} ({h.unreported} "
                            f"task{'' if h.unreported == 1 else 's'})" for h in held],
                "last_heartbeat": self.last_heard}

    def unstarted(self) -> int:
        """Tasks it holds that it has not started (its first bundle's next task is running)."""
        return sum(held.unreported for held in self.held.values()) - (1 if self.held else 0)

    def stealable(self) -> int:
        """Its unstarted tasks, if its last bundle has not been asked for yet (once asked, its
        results may lag: they go out at its next flush, after the running task, so it may seem
        to hold tasks it has run or handed back)."""
        if not self.held or next(reversed(self.held)) in self.asked:
            return 0
        return self.unstarted()

    def takes_more(self) -> bool:
        """Whether it may be handed another bundle now."""
        if not self.held:
            return True
        return len(self.held) < PREFETCH_BUNDLES and all(
            held.bundle.budget is not None and held.bundle.budget <= PREFETCH_BEHIND_SECONDS
            for held in self.held.values())

