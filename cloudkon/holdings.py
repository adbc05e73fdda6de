"""What a remote worker holds: its request messages and running bundles, and their leases.

Owns the state that the worker's threads share, under one lock: the receiving thread
holds a message from the moment a poll brings it, a pool thread runs its bundle, the
control thread cancels jobs and hands everything back on ``shutdown``, and the lease
thread (``keep_leases``) extends, every third of the visibility timeout, the message's
visibility and the bundle's claim (claims.py), and stops the tasks of any job marked
cancelled meanwhile.  A bundle whose claim another worker took (this one was paused
past its lease, or could not renew it while AWS was away) is *lost*: its tasks stop
and nothing of it is sent.

AWS behaviour relied on: ChangeMessageVisibility extends the invisibility of a message
held, and a visibility timeout of 0 hands it back to the queue at once; a receipt
handle goes stale once the message is received again by another worker.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from cloudkon import aws
from cloudkon.claims import Claims, job_of
from cloudkon.errors import BackendError
from cloudkon.processes import Cancellations

log = logging.getLogger("cloudkon.worker")


@dataclasses.dataclass
class Running:
    """A bundle this worker runs: its claim, where its results go, and how to stop it alone."""

    job: str
    key: str
    reply_to: str
    # Its own, not the worker's: a lost lease stops this bundle, not the other bundles of its job.
    stop: Cancellations = dataclasses.field(default_factory=Cancellations)
    lost: bool = False  # another worker holds its claim now: nothing of it is sent


class Holdings:
    """The request messages a worker holds and the bundles it runs, shared by its threads."""

    def __init__(self, sqs: Any, request_url: str, claims: Claims, visibility_timeout: int) -> None:
        self._sqs = sqs
        self._request_url = request_url
        self._claims = claims
        self._visibility_timeout = visibility_timeout
        self.cancellations = Cancellations()  # the jobs this worker heard are cancelled
        self._held: dict[str, tuple[str, str]] = {}  # message id -> (receipt handle, claim key)
        self._running: dict[int, Running] = {}  # id(bundle) -> the bundle's claim and stop, while it runs
        self._lock = threading.Lock()
        # Set while messages are held: the control thread long-polls the control queue then (a
        # cancel stops running tasks within a second) and until the worker economizes.
        self.busy = threading.Event()
        self.leaving: str | None = None  # "drain" or "shutdown", once a control message says so
        self.last_work = time.monotonic()  # when a bundle last ended

    def count(self) -> int:
        """Messages held now."""
        with self._lock:
            return len(self._held)

    def runs_claim(self, key: str) -> bool:
        """True if a bundle of claim ``key`` runs here now: another message of it (a re-send by the
        scheduler, or its first message delivered again) is not run a second time here."""
        with self._lock:
            return any(running.key == key for running in self._running.values())

    def runs_any(self) -> bool:
        with self._lock:
            return bool(self._running)

    def receive(self, message: dict[str, Any]) -> bool:
        """Hold ``message``, just received; False if this worker holds it already: SQS delivered it
        again while its bundle ran here (its visibility ran out while AWS was away or the worker was
        paused), and the lease that lapsed with it is this worker's to renew.  Then only its newest
        receipt is kept (SQS deletes a message received again by that receipt only); its bundle must
        not run a second time here."""
        with self._lock:
            _, key = self._held.get(message["MessageId"], (None, None))
            self._held[message["MessageId"]] = (message["ReceiptHandle"], key or "")
            self.busy.set()
        return key is None

    def receipt(self, message: dict[str, Any]) -> str:
        """The newest receipt of a message held (a redelivery replaced the first)."""
        with self._lock:
            return self._held.get(message["MessageId"], (message["ReceiptHandle"], ""))[0]

    def done_with(self, message: dict[str, Any]) -> None:
        """Its bundle done, stop keeping its lease (no renewal may race its delete: a warning about
        a receipt gone)."""
        with self._lock:
            self._held[message["MessageId"]] = (self._held.get(message["MessageId"],
                                                               (message["ReceiptHandle"], ""))[0], "")

    def drop(self, message: dict[str, Any]) -> None:
        """``message`` is dealt with (deleted, deferred or left for redelivery)."""
        with self._lock:
            self._held.pop(message["MessageId"], None)
            if not self._held:
                self.busy.clear()

    def start(self, message: dict[str, Any], bundle: object, running: Running) -> None:
        """``bundle`` of ``message`` runs now, its claim won: its lease is kept from now on."""
        with self._lock:
            receipt = self._held.get(message["MessageId"], (message["ReceiptHandle"], ""))[0]
            self._held[message["MessageId"]] = (receipt, running.key)
            self._running[id(bundle)] = running
        if self.cancellations.is_cancelled(running.job):  # heard since it was checked, before it was listed
            running.stop.cancel(running.job)

    def end(self, bundle: object) -> None:
        with self._lock:
            del self._running[id(bundle)]
            self.last_work = time.monotonic()  # real work: only this keeps an idle worker alive

    def running(self, bundle: object) -> Running | None:
        """The bundle's claim and stop while it runs, None once it ended."""
        with self._lock:
            return self._running.get(id(bundle))

    def leave(self, how: str) -> list[tuple[str, str]]:
        """Record why the worker leaves (``drain``, ``shutdown``); the messages held now."""
        with self._lock:
            self.leaving = how
            return list(self._held.values())

    def cancel(self, job: str) -> None:
        """Stop ``job``'s running tasks, and remember it: its later bundles run nothing."""
        self.cancellations.cancel(job)
        with self._lock:
            stops = [running.stop for running in self._running.values() if running.job == job]
        for stop in stops:
            stop.cancel(job)

    def lose(self, running: Running) -> None:
        """A bundle whose claim another worker took: stop its tasks at once, and send nothing of it;
        its message is that worker's to delete."""
        with self._lock:
            if running.lost:
                return
            running.lost = True
        log.warning("bundle %s: lost its lease to another worker (it ran out while this one was paused or "
                    "AWS was away): stopping its tasks, sending nothing of it", running.key)
        running.stop.cancel(running.job)

    def hand_back(self, held: list[tuple[str, str]]) -> None:
        """Give messages (receipt, claim key) back to the queue at once, their claims released."""
        for receipt, key in held:
            try:
                with aws.aws_errors("handing a bundle back"):
                    self._sqs.change_message_visibility(QueueUrl=self._request_url, ReceiptHandle=receipt,
                                                        VisibilityTimeout=0)
                if key:
                    self._claims.release(key)
            except BackendError as exc:
                log.warning("%s (it comes back after its visibility timeout)", exc)

    def keep_leases(self, exiting: threading.Event, marked_cancelled: Callable[[set[str]], set[str]]) -> None:
        """Extend visibility and lease of every running bundle, a third of the timeout ahead, and stop
        the tasks of any of their jobs ``marked_cancelled`` meanwhile, until ``exiting`` (a thread)."""
        while not exiting.wait(self._visibility_timeout / 3):  # draining bundles keep theirs
            with self._lock:
                leased = [(receipt, key) for receipt, key in self._held.values() if key]
            for receipt, key in leased:
                self._extend(receipt, key)
            jobs = {job_of(key) for _, key in leased}
            try:
                cancelled = marked_cancelled({job for job in jobs
                                              if not self.cancellations.is_cancelled(job)})
            except BackendError as exc:
                log.warning("%s", exc)
                continue
            for job in cancelled:
                log.info("job %s is marked cancelled: stopping its tasks", job)
                self.cancel(job)

    def _extend(self, receipt: str, key: str) -> None:
        """Renew the claim ``key`` (first: a receipt of a lost bundle is stale), then its message's
        visibility; a claim another worker holds now loses its bundle."""
        try:
            if not self._claims.renew(key):
                with self._lock:
                    lost = [run for run in self._running.values() if run.key == key]
                for run in lost:
                    self.lose(run)
                return
            with aws.aws_errors("extending visibility"):
                self._sqs.change_message_visibility(QueueUrl=self._request_url, ReceiptHandle=receipt,
                                                    VisibilityTimeout=self._visibility_timeout)
        except BackendError as exc:
            with self._lock:
                still_running = (receipt, key) in self._held.values()
            if still_running:  # else it ended meanwhile and its message is deleted: no matter
                log.warning("bundle %s: %s", key, exc)
