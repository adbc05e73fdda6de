"""A local worker process: what runs inside each of LocalBackend's worker processes.

Owns the worker side of a pipe to the scheduler (localworkers.py owns the other)::

    pipe --> reader thread --+--> _Inbox --> main thread: run_bundle --+--> results frames --> pipe
             (_read_bundles)  |   (bundles not started)                 |
                              +--> cancel, hand_back                    +<-- TimeBoxes' thread
                                                                              (a box's tail)

A reader thread drains the pipe, so the scheduler's sends never wait for a bundle to
finish; the main thread runs one bundle at a time and writes, into a progress slot the
scheduler shares, which bundle and task it runs (so the scheduler knows what a dead
worker was running).  Frames are protocol.py's JSON; an empty frame (STOP_FRAME) asks
the worker to finish what it holds and exit.  A worker exits at once, taking its running
command's process group along, on SIGTERM, when its pipe breaks, on a frame it cannot
read (the scheduler replaces it), or when its scheduler's process ends (watched with a
pidfd, Linux: the pipe alone does not tell if another process holds its end open).
The fork server preloads this module, so that a replacement worker starts with its
imports done.
"""

from __future__ import annotations

import multiprocessing.connection
import os
import select
import signal
import socket
import threading
import traceback
from collections import deque
from collections.abc import Callable

from cloudkon import protocol
from cloudkon.errors import MalformedMessage
from cloudkon.processes import Cancellations, kill_running_tasks, reduce_timer_slack
from cloudkon.runner import TimeBoxes, run_bundle
from cloudkon.tasks import Bundle, ResultBatch, failed_batch

# The frame that stops a worker once it has run what it holds (no JSON body is empty).
STOP_FRAME = b""
# The progress slot's value while no bundle or task is running.
NO_TASK = -1


class _Inbox:
    """The bundles a worker process holds but has not started, in order.

    The scheduler may ask for one back (``hand_back``): a bundle queued behind a running
    one is withdrawn whole; any other (the one running, or the next about to) has its time
    box ended (TimeBoxes.end), which hands back what it has not started once its first
    task runs, so a bundle cannot bounce between workers unstarted.  Both under one lock
    with ``take``, so that a bundle is never both withdrawn and started.
    """

    def __init__(self, boxes: TimeBoxes) -> None:
        self._bundles: deque[Bundle | None] = deque()
        self._lock = threading.Condition()
        self._running = False
        self._boxes = boxes

    def put(self, bundle: Bundle | None) -> None:
        with self._lock:
            self._bundles.append(bundle)
            self._lock.notify()

    def take(self) -> Bundle | None:
        with self._lock:
            while not self._bundles:
                self._lock.wait()
            self._running = True
            return self._bundles.popleft()

    def finished(self) -> None:
        with self._lock:
            self._running = False

    def hand_back(self, job: str, number: int) -> Bundle | None:
        """The bundle ``number`` if it waits behind another, taken out; else None, its box ended."""
        with self._lock:
            for position, bundle in enumerate(self._bundles):
                if bundle is not None and bundle.bundle == number and (self._running or position):
                    del self._bundles[position]
                    return bundle
            self._boxes.end(job, number)
            return None


def worker_main(conn: multiprocessing.connection.Connection, progress: object,
                 output_cap: int, scheduler_pid: int) -> None:
    """A worker process: run bundles from ``conn`` and send back their results.

    A reader thread drains the pipe into an inbox, so the backend's sends never wait
    for a bundle to finish (and the two sides cannot deadlock on full pipes); it also
    answers hand-back requests for bundles not started, and TimeBoxes' thread hands back
    the rest of a bundle whose box runs out: three threads send.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the scheduler's to handle
    signal.signal(signal.SIGTERM, _stop_now)
    threading.Thread(target=_stop_with_scheduler, args=(scheduler_pid,), daemon=True).start()
    reduce_timer_slack()
    cancellations = Cancellations()
    worker = f"{socket.gethostname()}:{os.getpid()}"  # where each result ran, as the user sees it
    sending = threading.Lock()

    def send(batch: ResultBatch) -> None:
        batch.worker = worker
        frame = protocol.encode_body(protocol.results_message(batch))
        try:
            with sending:
                conn.send_bytes(frame)
        except OSError:  # the scheduler is gone (killed): nobody wants the result
            _stop_now()

    boxes = TimeBoxes(lambda bundle, ids: send(ResultBatch(bundle.job, bundle.bundle, returned=ids)))
    inbox = _Inbox(boxes)
    threading.Thread(target=_read_bundles, args=(conn, inbox, cancellations, send), daemon=True).start()

    def mark_running(task_id: int) -> None:
        progress[1] = task_id  # type: ignore[index]

    while (bundle := inbox.take()) is not None:
        progress[0] = bundle.bundle  # type: ignore[index]
        for batch in run_bundle(bundle, output_cap, mark_running, cancellations, boxes):
            send(batch)
        progress[1] = NO_TASK  # type: ignore[index]
        inbox.finished()


def _stop_with_scheduler(pid: int) -> None:
    """Exit once the scheduler process ``pid`` has ended (where pidfds exist: Linux 5.3 on)."""
    try:
        watch = os.pidfd_open(pid)
    except ProcessLookupError:
        _stop_now()  # gone already
    except (AttributeError, OSError):
        return  # no pidfds here: the pipe's end of file alone tells
    select.select([watch], [], [])  # readable once the process has ended
    _stop_now()


def _read_bundles(conn: multiprocessing.connection.Connection, inbox: _Inbox,
                  cancellations: Cancellations, send: Callable[[ResultBatch], None]) -> None:
    """The worker's reader thread: a worker without one would hold its bundles forever, so any
    failure here ends the process, which the backend notices (its sentinel) and replaces."""
    try:
        _read_frames(conn, inbox, cancellations, send)
    except (EOFError, OSError):
        _stop_now()  # the backend is gone: nobody wants what is running
    except Exception:  # a frame it cannot read: say so where the scheduler's log goes
        traceback.print_exc()
        _stop_now()


def _read_frames(conn: multiprocessing.connection.Connection, inbox: _Inbox,
                 cancellations: Cancellations, send: Callable[[ResultBatch], None]) -> None:
    while (data := conn.recv_bytes()) != STOP_FRAME:
        message = protocol.decode(data)
        if message["type"] == "cancel":
            cancellations.cancel(message["job"])
        elif message["type"] == "hand_back":
            withdrawn = inbox.hand_back(message["job"], message["bundle"])
            if withdrawn is not None:
                send(ResultBatch(withdrawn.job, withdrawn.bundle, returned=list(withdrawn.ids)))
        else:
            try:
                inbox.put(protocol.bundle_from_message(message))
            except MalformedMessage as exc:  # its tasks fail, not the worker: a new one would fail too
                send(failed_batch(message["job"], message["bundle"], message["ids"],
                                  f"the worker could not read this task's bundle: {exc}"))
    inbox.put(None)


def _stop_now(signum: int | None = None, frame: object = None) -> None:
    """Exit at once, taking the running command's process group along."""
    kill_running_tasks()
    os._exit(1)
