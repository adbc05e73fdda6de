"""LocalBackend: bundles run by worker processes on this machine.

Owns the scheduler's side of the worker processes: starting them, feeding them bundles,
reading their results, stealing work for an idle one, and replacing any that die.  What
runs inside a worker is localprocess.py; what the backend knows of each worker, and the
prefetch and stealing rules on it, is localslots.py.  Data flow::

    submit(bundle) --> queue --+                       +--> bundle frames --> worker 0
      (any thread)    wakeup --+--> receive(timeout) --+--> bundle frames --> worker N-1
                               |    (one thread)       |
    <-- result batches --------+<-- results frames <---+  (and process sentinels)

Each worker has its own duplex pipe and holds at most PREFETCH_BUNDLES bundles (a
second one only behind a short one), so the backend always knows which tasks a worker
holds.  No worker idles while another holds tasks it has not started: when one has had
nothing for STEAL_AFTER_SECONDS and nothing is queued, the backend sends a ``hand_back``
frame to the worker holding the most unstarted tasks; it returns a bundle it has not
started at once, or ends the time box of the one it runs (runner.TimeBoxes: the rest goes
back at once as ``returned``, the task in hand runs on), and the dispatcher queues those
tasks first.  A box that runs out by itself does the same.  ``receive`` waits on the
pipes, the process sentinels and a wakeup pipe together (as concurrent.futures
does), so a worker killed with SIGKILL is noticed at once rather than hanging the
job.  A dead worker's tasks are re-queued; the one it was running (known from a
shared progress slot the worker writes before each task) is retried once, then
reported failed.  A replacement that cannot be started (no file descriptors left, say)
is tried again with a growing pause, never raised out of ``receive``; with no worker
alive for NO_WORKERS_FAIL_SECONDS, the queued tasks are reported failed rather than
held.  A worker exits when its scheduler dies (localprocess.py says how: a parent-death
signal would not do, as a worker's parent is the forkserver, which lives as long as any
worker does).  ``cancel(job)`` drops the job's queued bundles and sends a ``cancel``
frame to each worker holding one of its bundles: the worker kills the job's running
task and skips its other tasks.  Frames on the pipes are protocol.py's JSON: nothing is
pickled after start-up.
"""

from __future__ import annotations

import logging
import math
import multiprocessing
import multiprocessing.connection
import os
import queue
import socket
import sys
import threading
import time
from collections import deque
from multiprocessing.context import BaseContext
from typing import Any

from cloudkon import protocol
from cloudkon.backend import Backend
from cloudkon.errors import BackendError
from cloudkon.localprocess import NO_TASK, STOP_FRAME, worker_main
from cloudkon.localslots import HeldBundle, WorkerSlot
from cloudkon.tasks import CANCELLED, OUTPUT_CAP_BYTES, Bundle, ResultBatch, failed_batch

log = logging.getLogger("cloudkon.local")

# A worker steals only once it has had nothing for this long: between two bundles of a busy
# job it has nothing for a moment (its results go to the dispatcher, which then sends it the
# next), and taking another worker's queued bundle then would only send work round in circles.
STEAL_AFTER_SECONDS = 0.005

# Workers in a row that die before taking any work mean start-up itself is broken.
MAX_STARTUP_DEATHS = 5

# A worker that cannot be started (no file descriptors or memory left: usually passing) is
# tried again after this long, the pause doubling up to the maximum: soon enough to be back
# at work shortly after the shortage ends, rarely enough not to add to it.
RESTART_PAUSE_SECONDS = 0.5
MAX_RESTART_PAUSE_SECONDS = 10.0

# With no worker alive for this long, queued tasks are reported failed (saying why) rather
# than held: a client waits out a passing shortage, but not one that lasts.
NO_WORKERS_FAIL_SECONDS = 60.0


class LocalBackend(Backend):
    """Runs bundles in ``workers`` local processes."""

    name = "local"
    target_bundle_seconds = 0.02  # a bundle costs ~0.1 ms of encoding and IPC here
    # Twice the target: a hand-back costs a round trip to the scheduler, and stealing catches
    # a bundle whose box is too generous.
    time_box_margin = 0.04

    def __init__(self, workers: int, output_cap: int = OUTPUT_CAP_BYTES) -> None:
        if workers < 1:
            raise BackendError("a local backend needs at least one worker")
        methods = multiprocessing.get_all_start_methods()
        # Workers started later (replacements) come from a fork server: this process has threads
        # by then, and forking a process with threads may copy a lock some other thread holds.
        self._context = multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")
        if "forkserver" in methods:
            self._context.set_forkserver_preload(["cloudkon.localprocess"])
        # The first ones, while this process has one thread (Linux), are forked from it at once: a
        # fork server takes a new interpreter and ~0.12 s to start, most of a short run's time.
        first = self._context
        if sys.platform == "linux" and threading.active_count() == 1:
            first = multiprocessing.get_context("fork")
        self._output_cap = output_cap
        # Job files are read and written where the client has them: the same machine only.
        self.staging = f"local:{socket.gethostname()}"
        self._queue: deque[Bundle] = deque()
        self._queue_lock = threading.Lock()  # submit appends from another thread than a cancel's filter
        self._cancels: queue.SimpleQueue[str] = queue.SimpleQueue()
        self._wakeup_read, self._wakeup_write = os.pipe()
        os.set_blocking(self._wakeup_write, False)
        self._deaths: dict[tuple[str, int], int] = {}
        self._startup_deaths = 0
        self._closed = False
        self._restart_pause = RESTART_PAUSE_SECONDS
        self._restart_at = 0.0  # monotonic time of the next try to start dead workers' replacements
        self._start_failure: str | None = None  # why the last try failed (logged once)
        self._no_workers_since: float | None = None
        try:
            self._slots = [self._start_worker(first) for _ in range(workers)]
        except OSError as exc:
            raise BackendError(f"cannot start worker processes: {exc}") from exc

    def workers(self) -> int:
        return len(self._slots)

    def describe(self) -> str:
        return f"local backend: {self.workers()} worker processes"

    def worker_states(self) -> list[dict[str, Any]]:
        host = socket.gethostname()
        return [slot.state(host) for slot in list(self._slots)]

    def submit(self, bundle: Bundle) -> None:
        with self._queue_lock:
            self._queue.append(bundle)
        self.wake()

    def cancel(self, job: str) -> None:
        self._cancels.put(job)
        self.wake()

    def receive(self, timeout: float) -> list[ResultBatch]:
        results: list[ResultBatch] = []
        self._apply_cancels(results)
        restart_again = self._replace_dead(results)
        self._hand_out()
        steal_again = self._steal_for_idle()
        live = [slot for slot in self._slots if not slot.dead]
        by_fd = {slot.conn: slot for slot in live}
        by_sentinel = {slot.process.sentinel: slot for slot in live}
        ready = multiprocessing.connection.wait(
            [self._wakeup_read, *by_fd, *by_sentinel], min(timeout, steal_again, restart_again))
        for obj in ready:
            if obj == self._wakeup_read:
                os.read(self._wakeup_read, 4096)
                self._apply_cancels(results)
            elif obj in by_fd:
                self._read_results(by_fd[obj], results)
            else:
                self._read_results(by_sentinel[obj], results)
                self._bury(by_sentinel[obj], results)
        self._hand_out()
        return results

    def close(self, wait: bool = True) -> None:
        if self._closed:
            return
        self._closed = True
        self._slots = [slot for slot in self._slots if not slot.dead]
        for slot in self._slots:
            try:
                if wait:
                    slot.conn.send_bytes(STOP_FRAME)
                else:
                    slot.process.terminate()
            except OSError:
                pass
        for slot in self._slots:
            slot.process.join(None if wait else 5)
            if slot.process.is_alive():
                slot.process.kill()
                slot.process.join()
            slot.conn.close()
        os.close(self._wakeup_read)
        os.close(self._wakeup_write)

    def wake(self) -> None:
        try:
            os.write(self._wakeup_write, b"x")
        except BlockingIOError:
            pass  # the pipe is full of wakeups already

    # --- internals (called from the receiving thread only) ------------------------

    def _start_worker(self, context: BaseContext | None = None) -> WorkerSlot:
        """A new worker process, started by ``context`` (by default the fork server); OSError if
        one cannot be started (nothing is left open then)."""
        context = context or self._context
        parent_end, child_end = context.Pipe(duplex=True)
        try:
            progress = context.RawArray("q", [NO_TASK, NO_TASK])
            process = context.Process(
                target=worker_main, args=(child_end, progress, self._output_cap, os.getpid()),
                name="cloudkon-worker", daemon=True)
            process.start()
        except BaseException:
            parent_end.close()
            raise
        finally:
            child_end.close()
        return WorkerSlot(process, parent_end, progress)

    def _replace_dead(self, results: list[ResultBatch]) -> float:
        """Start workers in place of dead ones when it is time to try; with none alive for
        NO_WORKERS_FAIL_SECONDS, report the queued tasks failed.  Seconds until the next try."""
        if self._closed or not any(slot.dead for slot in self._slots):
            return math.inf
        now = time.monotonic()
        if now >= self._restart_at:
            self._try_restart(now)
        if self._start_failure is None:
            return math.inf
        self._fail_queued_if_no_workers(now, results)
        return max(0.0, self._restart_at - now)

    def _try_restart(self, now: float) -> None:
        try:
            for index, slot in enumerate(self._slots):
                if slot.dead:
                    self._slots[index] = self._start_worker()
        except OSError as exc:
            if self._start_failure is None:  # once: it may fail for a long time
                log.error("cannot start a worker process: %s; trying again, every %g s at most",
                          exc, MAX_RESTART_PAUSE_SECONDS)
            self._start_failure = str(exc)
            self._restart_at = now + self._restart_pause
            self._restart_pause = min(2 * self._restart_pause, MAX_RESTART_PAUSE_SECONDS)
            return
        if self._start_failure is not None:
            log.warning("worker processes start again")
        self._start_failure, self._no_workers_since = None, None
        self._restart_pause = RESTART_PAUSE_SECONDS

    def _fail_queued_if_no_workers(self, now: float, results: list[ResultBatch]) -> None:
        if any(not slot.dead for slot in self._slots):
            self._no_workers_since = None
            return
        if self._no_workers_since is None:
            self._no_workers_since = now
        if now - self._no_workers_since < NO_WORKERS_FAIL_SECONDS:
            return
        with self._queue_lock:
            dropped, self._queue = list(self._queue), deque()
        error = (f"no worker process could be started for {NO_WORKERS_FAIL_SECONDS:g} s "
                 f"({self._start_failure})")
        results += [failed_batch(bundle.job, bundle.bundle, bundle.ids, error) for bundle in dropped]

    def _apply_cancels(self, results: list[ResultBatch]) -> None:
        """Drop cancelled jobs' queued bundles (reporting them), and tell their workers."""
        while True:
            try:
                job = self._cancels.get_nowait()
            except queue.Empty:
                return
            with self._queue_lock:
                dropped = [b for b in self._queue if b.job == job]
                if dropped:
                    self._queue = deque(b for b in self._queue if b.job != job)
            results += [failed_batch(job, bundle.bundle, bundle.ids, CANCELLED) for bundle in dropped]
            frame = protocol.encode_body({"type": "cancel", "job": job})
            for slot in self._slots:
                if not slot.dead and any(held.bundle.job == job for held in slot.held.values()):
                    try:
                        slot.conn.send_bytes(frame)
                    except OSError:
                        pass  # the worker is dying; its sentinel will fire

    def _hand_out(self) -> None:
        """Give queued bundles to the live workers holding the fewest."""
        while self._queue:
            slot = min((s for s in self._slots if not s.dead and s.takes_more()),
                       key=lambda s: (len(s.held), s.idle_since), default=None)
            if slot is None:
                return
            bundle = self._queue.popleft()
            if not self._send(slot, protocol.bundle_message(bundle)):
                self._queue.appendleft(bundle)
                return
            slot.held[bundle.bundle] = HeldBundle(bundle)
            slot.took_work = True

    def _steal_for_idle(self) -> float:
        """With a worker idle (for STEAL_AFTER_SECONDS) and nothing queued, ask the worker
        holding the most unstarted tasks to hand back its last bundle (queued: all of it;
        running: what it has not started).  Seconds until it is worth looking again."""
        idle = [slot.idle_since for slot in self._slots if not slot.held and not slot.dead]
        if self._queue or not idle:
            return math.inf
        wait = min(idle) + STEAL_AFTER_SECONDS - time.monotonic()
        if wait > 0:
            return wait
        victim = max((s for s in self._slots if not s.dead), key=WorkerSlot.stealable)
        if victim.stealable() <= 0:
            return math.inf
        number = next(reversed(victim.held))
        if self._send(victim, {"type": "hand_back", "job": victim.held[number].bundle.job, "bundle": number}):
            victim.asked.add(number)
        return math.inf

    @staticmethod
    def _send(slot: WorkerSlot, message: dict) -> bool:
        try:
            slot.conn.send_bytes(protocol.encode_body(message))
            return True
        except OSError:
            return False  # the worker is dying; its sentinel will fire

    def _read_results(self, slot: WorkerSlot, results: list[ResultBatch]) -> None:
        try:
            while not slot.dead and slot.conn.poll():
                batch = protocol.results_from_message(protocol.decode(slot.conn.recv_bytes()))
                self._record(slot, batch)
                results.append(batch)
            slot.last_heard = time.time()
        except (EOFError, OSError):
            self._bury(slot, results)

    @staticmethod
    def _record(slot: WorkerSlot, batch: ResultBatch) -> None:
        held = slot.held.get(batch.bundle)  # type: ignore[arg-type]
        if held is None:
            return
        held.reported += len(batch)
        if batch.returned:  # always a tail of the bundle
            held.cut = min(held.cut, len(held.bundle.ids) - len(batch.returned))
        if held.unreported <= 0:
            del slot.held[batch.bundle]  # type: ignore[arg-type]
            slot.asked.discard(batch.bundle)  # type: ignore[arg-type]
            if not slot.held:
                slot.idle_since = time.monotonic()

    def _bury(self, slot: WorkerSlot, results: list[ResultBatch]) -> None:
        """Re-queue (or fail) what a dead worker held, and start its replacement."""
        if slot.dead:
            return
        slot.dead = True
        slot.process.join(5)
        reason = f"worker process {slot.process.pid} died (exit code {slot.process.exitcode})"
        slot.conn.close()
        running_bundle, running_task = slot.progress[0], slot.progress[1]  # type: ignore[index]
        for held in reversed(slot.held.values()):
            bundle = held.bundle
            ids, commands = bundle.ids[held.reported:held.cut], bundle.commands[held.reported:held.cut]
            if bundle.bundle == running_bundle and running_task in ids:
                index = ids.index(running_task)
                if self._died_running(bundle.job, running_task):
                    results.append(failed_batch(
                        bundle.job, bundle.bundle, [running_task],
                        f"{reason} while running this task, twice; not retried again"))
                    del ids[index], commands[index]
            if ids:
                self._queue.appendleft(Bundle(bundle.job, bundle.bundle, ids, commands, bundle.timeout,
                                              bundle.budget))
        log.warning("%s holding %d bundle(s); re-queued its tasks", reason, len(slot.held))
        self._startup_deaths = 0 if slot.took_work else self._startup_deaths + 1
        if self._closed:
            return
        if self._startup_deaths >= MAX_STARTUP_DEATHS:
            raise BackendError(f"{MAX_STARTUP_DEATHS} worker processes in a row died at start-up")
        self._replace_dead(results)

    def _died_running(self, job: str, task_id: int) -> bool:
        """Count a death against the task; True once it has killed its worker twice."""
        key = (job, task_id)
        self._deaths[key] = self._deaths.get(key, 0) + 1
        if self._deaths[key] >= 2:
            del self._deaths[key]
            return True
        return False
