"""The bundle runner: a bundle's tasks in order, within its time box, results in batches.

Owns ``run_bundle`` (shared by local worker processes and remote EC2 workers), how often
results are flushed, and the time boxes (``TimeBoxes``): a bundle is a time-boxed lease,
and once its box runs out the tasks it has not started go back to the scheduler
(hand-back).  Each task runs through processes.run_task, or sandbox.run_job for a job
description (``{"...``).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from cloudkon.jdl import is_job_description
from cloudkon.processes import Cancellations, run_task
from cloudkon.sandbox import run_job
from cloudkon.tasks import CANCELLED, OUTPUT_CAP_BYTES, Bundle, ResultBatch

# A worker sends the results it has at least this often, so the scheduler learns
# what finished (for progress, and for what to re-run if the worker dies).
RESULT_FLUSH_SECONDS = 0.05

# ... and as soon as it holds this much output, so a results frame stays far below
# the protocol's frame limit even after JSON escaping (at most 6 bytes per byte).
RESULT_FLUSH_OUTPUT_BYTES = 1024 * 1024


class _Box:
    """A running bundle's time box, shared by the thread running it and TimeBoxes' thread.

    The runner stores the position it is about to start in ``started``, then reads
    ``ended``; TimeBoxes sets ``ended`` and reads ``started`` under ``lock``, and the
    runner takes the lock to read ``cut`` once it sees ``ended``.  So a task is either
    started (and ``cut`` is past it) or handed back, never both.
    """

    __slots__ = ("bundle", "ends_at", "lock", "started", "ended", "cut")  # read and written per task

    def __init__(self, bundle: Bundle, ends_at: float) -> None:
        self.bundle = bundle
        self.ends_at = ends_at
        self.lock = threading.Lock()
        self.started = 0
        self.ended = False
        self.cut = len(bundle.ids)

    def end(self) -> list[int]:
        """End the box now: the tasks after the one running (or about to start), to hand back."""
        with self.lock:
            if self.ended:
                return []
            self.ended = True
            self.cut = min(self.cut, self.started + 1)  # the first task of a bundle always runs
            return self.bundle.ids[self.cut:]

    def stops_before(self, position: int) -> bool:
        with self.lock:
            return position >= self.cut


class TimeBoxes:
    """The time boxes of the bundles a worker process runs, ended on time by a thread.

    A box that runs out while a task runs does not wait for that task: the tasks the
    bundle has not started go back at once (``hand_back(bundle, ids)``, from this
    class's thread), and the runner stops before the next one.  ``end(number)`` ends a
    box now, for the scheduler that wants the tasks for an idle worker; asked before the
    bundle starts, it ends the box as soon as the first task has started.
    """

    def __init__(self, hand_back: Callable[[Bundle, list[int]], None]) -> None:
        self._hand_back = hand_back
        # By the bundle object: bundle numbers are a scheduler's own (several share a remote
        # worker), and a bundle split over several messages runs as parts with one number.
        self._boxes: dict[int, _Box] = {}
        self._asked: set[tuple[str, int]] = set()  # (job, bundle) asked for before it started
        self._changed = threading.Condition()
        # When the thread looks next: a box that runs out later needs no wake-up (bundles of a
        # few milliseconds open a box each; waking the thread for each costs a busy machine).
        self._looks_at = math.inf
        threading.Thread(target=self._watch, name="cloudkon-time-boxes", daemon=True).start()

    @contextmanager
    def open(self, bundle: Bundle) -> Iterator[_Box]:
        """The bundle's box while it runs (one that never runs out without a budget: it can
        still be ended, for an idle worker)."""
        with self._changed:
            asked = (bundle.job, bundle.bundle) in self._asked
            self._asked.clear()  # asked for the bundle about to run, or for ones long gone
            budget = math.inf if bundle.budget is None else bundle.budget
            box = _Box(bundle, time.monotonic() + (0 if asked else budget))
            self._boxes[id(bundle)] = box
            if box.ends_at < self._looks_at:
                self._changed.notify()
        try:
            yield box
        finally:
            with self._changed:
                del self._boxes[id(bundle)]

    def end(self, job: str, number: int) -> None:
        """End the box of ``job``'s bundle ``number`` now (or as soon as it starts)."""
        with self._changed:
            boxes = [box for box in self._boxes.values()
                     if box.bundle.bundle == number and box.bundle.job == job]
            if not boxes:
                self._asked.add((job, number))
                return
            for box in boxes:
                box.ends_at = 0.0
            self._changed.notify()

    def _watch(self) -> None:
        while True:
            with self._changed:
                now = time.monotonic()
                due = [box for box in self._boxes.values() if box.ends_at <= now and not box.ended]
                if not due:
                    self._looks_at = min((box.ends_at for box in self._boxes.values() if not box.ended),
                                         default=math.inf)
                    self._changed.wait(None if math.isinf(self._looks_at) else self._looks_at - now)
                    self._looks_at = -math.inf  # awake: every change is seen on the next look
                    continue
            for box in due:
                rest = box.end()
                if rest:
                    try:
                        self._hand_back(box.bundle, rest)
                    except Exception:  # noqa: BLE001 - the runner still stops; the tasks are re-run
                        logging.getLogger("cloudkon.runner").exception("handing back tasks failed")


def run_bundle(bundle: Bundle, output_cap: int = OUTPUT_CAP_BYTES,
               before_task: Callable[[int], None] | None = None,
               cancellations: Cancellations | None = None,
               boxes: TimeBoxes | None = None) -> Iterator[ResultBatch]:
    """Run a bundle's tasks in order, yielding their results in batches.

    A batch is yielded every RESULT_FLUSH_SECONDS, or once it holds
    RESULT_FLUSH_OUTPUT_BYTES of output, and at the end.  ``before_task(task_id)``
    is called before each task starts; an exception it raises ends the bundle there (the
    remote worker's lease fence: no task starts on a lease it cannot vouch for).  Once the
    bundle's job is in ``cancellations``, the running task stops and the rest report
    CANCELLED without running.

    The bundle is a time-boxed lease: once it has run ``bundle.budget`` seconds no more
    of its tasks start.  With ``boxes``, the box ends on time even while a task runs,
    and the rest goes back through ``boxes``; without, it is looked at after each flush,
    or each task once the box has run out, and the last batch lists the unstarted rest
    in ``returned``.  A task that started is never handed back, and the first task of a
    bundle always runs (so that each hand-back makes progress).
    """
    if cancellations is None:
        yield from _run_boxed(bundle, output_cap, before_task, None, boxes)
        return
    with cancellations.running(bundle.job) as cancelled:
        yield from _run_boxed(bundle, output_cap, before_task, cancelled, boxes)


def _run_boxed(bundle: Bundle, output_cap: int, before_task: Callable[[int], None] | None,
               cancelled: threading.Event | None, boxes: TimeBoxes | None) -> Iterator[ResultBatch]:
    if boxes is None:
        yield from _run_bundle(bundle, output_cap, before_task, cancelled, None)
        return
    with boxes.open(bundle) as box:
        yield from _run_bundle(bundle, output_cap, before_task, cancelled, box)


def _run_bundle(bundle: Bundle, output_cap: int, before_task: Callable[[int], None] | None,
                cancelled: threading.Event | None, box: _Box | None) -> Iterator[ResultBatch]:
    # A hot loop (a million `sleep 0` tasks): names bound once, the common case first, and
    # one clock reading per task, against the next time anything is to be looked at.
    batch = ResultBatch(bundle.job, bundle.bundle)
    output_bytes = 0
    now = time.monotonic()
    flush_at = now + RESULT_FLUSH_SECONDS
    # Without a watched box, its end is looked at here; with one, TimeBoxes ends it.
    box_ends = math.inf if bundle.budget is None or box is not None else now + bundle.budget
    look_at = min(flush_at, box_ends)
    timeout = bundle.timeout
    ids = bundle.ids
    look = True
    for position, (task_id, command) in enumerate(zip(ids, bundle.commands, strict=True)):
        if look:
            look = False
            if cancelled is not None and cancelled.is_set():
                for skipped in ids[position:None if box is None else box.cut]:  # not those handed back
                    batch.add(skipped, None, "", 0, CANCELLED)
                break
            if position and now >= box_ends:
                batch.returned = ids[position:]
                break
        if box is not None:
            box.started = position
            if box.ended and box.stops_before(position):
                # Handed back already; said again here, in case that went astray (a duplicate
                # hand-back is ignored: only the bundle that still holds a task gives it back).
                batch.returned = ids[position:]
                break
        if before_task is not None:
            before_task(task_id)
        if command[:1] != "{" or not is_job_description(command):
            exit_code, output, elapsed_us, error = run_task(command, timeout, output_cap, cancelled)
            batch.add(task_id, exit_code, output, elapsed_us, error)
        else:
            exit_code, output, elapsed_us, error, artifact = run_job(command, timeout, output_cap, cancelled)
            batch.add(task_id, exit_code, output, elapsed_us, error, artifact)
        output_bytes += len(output)
        now = time.monotonic()
        if now >= look_at or output_bytes >= RESULT_FLUSH_OUTPUT_BYTES:
            look = True
            if now >= flush_at or output_bytes >= RESULT_FLUSH_OUTPUT_BYTES:
                yield batch
                batch = ResultBatch(bundle.job, bundle.bundle)
                output_bytes = 0
                now = time.monotonic()
                flush_at = now + RESULT_FLUSH_SECONDS
            look_at = min(flush_at, box_ends)
    if batch.ids or batch.returned:
        yield batch

