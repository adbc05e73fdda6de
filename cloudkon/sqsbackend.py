"""SQSBackend: bundles go to remote workers through Amazon SQS.

Owns the scheduler's side of remote mode (what its messages hold, and their size rule, are
sqsmessages.py's)::

    submit(bundle) -> sender thread -> request queue (shared by every scheduler and worker)
                                           |  worker.py: claim in DynamoDB, run, report
    receive() <- long poll <- response queue (one per scheduler) <-+

A request message is a protocol ``bundle`` plus ``reply_to`` (the response queue's
URL), sealed with this scheduler's key (signing.py: workers refuse any other); a
response message is a protocol ``results`` with its ``bundle``, sealed by the worker
with a key of the fleet (signing.py says which).  A bundle that encodes too large for
one message (seal included) is split; a single task still too large fails.
A response message is checked whole (seal, shape, every column) before any of it is
handed to the scheduler; one that is no signed result batch (a stray or forged
message, a damaged one) is moved to ``<response queue>-dead``, made at the first
need, and logged at a rate limit.  Response messages are deleted once the results
are handed to the scheduler.

The scheduler long-polls for SQS_MAX_WAIT_SECONDS when it expects no result
(``idle_receive_seconds``), so an idle scheduler makes three calls a minute; it
counts the workers' slots only while it expects results (it sizes bundles by them).
``cancel(job)`` marks the job cancelled in the claim table (durable: every worker
reads it before running a bundle), then tells the workers over the control topic
(control.py) so that running tasks stop at once.  A bundle not heard of for
OVERDUE_LEASES visibility timeouts (outstanding.py keeps count) is looked into by its claim.

AWS behaviour relied on: a long poll returns as soon as a message comes (and waits
SQS_MAX_WAIT_SECONDS at most); a receive, send or delete call takes at most SQS_MAX_BATCH
messages; a message received and not deleted comes back after the visibility timeout; a
queue or the claim table deleted by someone else is made again here when a call finds it gone.
"""

from __future__ import annotations

import logging
import math
import queue
import secrets
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from cloudkon import aws
from cloudkon.aws import MAX_SQS_MESSAGE_BYTES, aws_errors
from cloudkon.backend import Backend
from cloudkon.claims import claim_key, ensure_claim_table, mark_cancelled
from cloudkon.control import ControlTopic
from cloudkon.defaults import (
    DEFAULT_CLAIM_TABLE,
    DEFAULT_CONTROL_TOPIC,
    DEFAULT_REQUEST_QUEUE,
    DEFAULT_VISIBILITY_TIMEOUT,
)
from cloudkon.errors import BackendError, QueueGone, ResourceNotFound, TransientAWSError
from cloudkon.outstanding import Outstanding
from cloudkon.provisioning import Fleet
from cloudkon.repeats import Outage, ThrottledLog
from cloudkon.signing import Keyring, Signer
from cloudkon.sqsmessages import Refused, parse_response, request_bodies, take_sealed
from cloudkon.tasks import Bundle, ResultBatch, failed_batch

log = logging.getLogger("cloudkon.sqs")

# Slots assumed while no worker is subscribed to the control topic (bundles wait in the
# queue for workers still starting).
SLOTS_WITHOUT_WORKERS = 8
# SQS calls the scheduler makes at once when results or bundles pile up (a fleet of a
# thousand workers finishes a wave of bundles together; one call at a time takes ten
# messages per round trip).  The first receive of each round is a long poll alone; more
# follow, without waiting, only while every receive comes back full.
PARALLEL_SQS_CALLS = 8
# Result messages taken in one receive, at most: the dispatcher hears of them between rounds.
MAX_RECEIVED = 400

# How often the workers that are there are counted again (one listing, one batch read);
# every second while none is there.
SLOTS_REFRESH_SECONDS = 30.0
# Messages of the response queue moved aside (no signed result batch) are logged at once,
# then at most this often with how many came meanwhile: a flood must not flood the log.
SET_ASIDE_LOG_SECONDS = 60.0
# A bundle not heard of for this many leases (visibility timeouts) is looked into, at most
# once a lease: one claim read for up to a hundred such bundles, none for the others.  If a
# worker holds it (a long task) it waits on; if it ran but its results were lost (its
# response queue was gone) its tasks are queued again; if no worker has it (its message was
# lost with the request queue, or the claim table) it is sent again.
OVERDUE_LEASES = 3
# Overdue bundles looked into at once: BatchGetItem's limit (more wait for the next lease).
MAX_OVERDUE_LOOKED_INTO = 100
# SQS sends of bundles that fail while AWS is unreachable are tried again after a pause that
# doubles up to the second figure: the bundles wait, no task fails for an outage.
SEND_RETRY_SECONDS = (0.5, 5.0)


class SQSBackend(Backend):
    """Queues bundles on SQS for remote workers and collects their results.

    Keeps one bundle in flight per slot (a worker thread), and sizes a job's last bundles
    to spread over every slot: the slots are ``in_flight`` if given (``--in-flight``, or a
    fleet's full size), else those of the workers subscribed to the control topic now.
    """

    name = "sqs"
    # A bundle costs about five API calls (send, receive, claim, cancel check, result,
    # done, delete: some batched) and tens of milliseconds: 5 s of work keeps that near 1%
    # of the time and at 0.01 calls per task for 10 ms tasks.  Jobs behind a big one wait
    # about this long for their turn.
    target_bundle_seconds = 5.0
    # A quarter of the target, not the target: there is no stealing remotely, so a bundle of
    # tasks taken for instant ones that meets a long one must give up the rest soon.
    time_box_margin = 1.25
    # The scheduler's wait for results while none is expected (no bundle out): one long poll,
    # SQS's longest, so an idle scheduler makes three calls a minute; it returns at once when
    # a message comes, and the scheduler does not wait it out to stop.
    idle_receive_seconds: float = aws.SQS_MAX_WAIT_SECONDS

    def __init__(self, request_queue: str = DEFAULT_REQUEST_QUEUE, response_queue: str | None = None,
                 claim_table: str = DEFAULT_CLAIM_TABLE, in_flight: int | None = None,
                 visibility_timeout: int = DEFAULT_VISIBILITY_TIMEOUT,
                 control_topic: str = DEFAULT_CONTROL_TOPIC, staging: str | None = None,
                 delete_response_queue: bool | None = None, fleet: Fleet | None = None) -> None:
        """``staging``: where clients stage job files (Backend.staging).  The response queue is
        deleted at close if ``delete_response_queue`` (by default, if its name is made up here).
        ``fleet``: the provisioned fleet whose instances are the workers listed (worker_states)."""
        self.staging = staging
        self._fleet = fleet
        self._sqs, self._dynamodb = aws.clients()
        self._claim_table = claim_table
        self._in_flight = in_flight
        self._slots = 0
        self._slots_counted = -math.inf
        self._request_queue, self._visibility_timeout = request_queue, visibility_timeout
        self._make_request_queue()
        self._out = Outstanding()  # the sending and the receiving threads share it
        self._overdue_checked = time.monotonic()
        self._send_outage = Outage("sending bundles", SEND_RETRY_SECONDS, log)
        self._owns_response_queue = response_queue is None if delete_response_queue is None \
            else delete_response_queue
        self.response_queue = response_queue or f"{aws.RESPONSE_QUEUE_PREFIX}{secrets.token_hex(6)}"
        response_queue = self.response_queue
        self._response_url = aws.ensure_queue(self._sqs, response_queue, visibility_timeout)
        self._dead_letter_queue = aws.dead_letter_queue(response_queue)
        self._dead_letter_url: str | None = None  # made at the first message set aside
        self._set_aside = ThrottledLog(log, logging.ERROR, f"messages of {response_queue} that are no "
                                       "signed result batch, set aside", SET_ASIDE_LOG_SECONDS)
        self._closed = threading.Event()
        ensure_claim_table(self._dynamodb, claim_table)
        self._signer = Signer(self._dynamodb, claim_table)
        self._keyring = Keyring(self._dynamodb, claim_table)  # checks the workers' seals on results
        self._signer.key()  # now: a missing permission stops the start, not every send
        self._control = ControlTopic(control_topic, self._signer)
        self._count_slots()  # before the first job: sized for the workers already there
        self._calls = ThreadPoolExecutor(PARALLEL_SQS_CALLS, thread_name_prefix="cloudkon-sqs")
        self._outbox: queue.SimpleQueue[Bundle | None] = queue.SimpleQueue()
        self._undeliverable: queue.SimpleQueue[ResultBatch] = queue.SimpleQueue()
        self._sender = threading.Thread(target=self._send_loop, name="cloudkon-sqs-send", daemon=True)
        self._sender.start()
        log.info("requests on %s, results on %s", self._request_url, self._response_url)

    def workers(self) -> int:
        """The slots (Backend.workers): --in-flight if given, else the worker threads counted last
        (no AWS call: this runs on the scheduler's event loop)."""
        if self._in_flight is not None:
            return self._in_flight
        return self._slots or SLOTS_WITHOUT_WORKERS

    def describe(self) -> str:
        if self._in_flight is not None:
            return f"sqs backend: {self._in_flight} bundles kept in flight (--in-flight)"
        return ("sqs backend: bundles kept in flight follow the thread counts of the workers subscribed "
                f"to the control topic ({self._slots or 'none yet'})")

    def worker_states(self) -> list[dict[str, Any]]:
        """The fleet's instances up at its last scaling pass (none without a fleet: a worker started by
        hand registers nowhere); which bundles each holds is not known here."""
        if self._fleet is None:
            return []
        return [{"id": seen["id"], "kind": "instance",
                 "state": "running" if seen["last_heartbeat"] else "booting",
                 "running": [], "last_heartbeat": seen["last_heartbeat"]}
                for seen in self._fleet.instances_seen() if seen["state"] in ("pending", "running")]

    def _count_slots(self) -> None:
        """Count the workers' slots again if it is time (from the receiving thread)."""
        now = time.monotonic()
        if self._in_flight is not None or now - self._slots_counted < (
                SLOTS_REFRESH_SECONDS if self._slots else 1.0):
            return
        self._slots_counted = now
        try:
            slots = self._control.slots(self._dynamodb, self._claim_table)
        except BackendError as exc:
            log.warning("counting the workers: %s", exc)
            return
        if slots != self._slots:
            log.info("workers subscribed run %d bundle(s) at once", slots)
        self._slots = slots

    def capacity(self) -> int:
        return self.workers()

    def submit(self, bundle: Bundle) -> None:
        self._outbox.put(bundle)

    def receive(self, timeout: float) -> list[ResultBatch]:
        if timeout < self.idle_receive_seconds:  # results are expected: bundles are sized by the slots
            self._count_slots()
        results = _drain(self._undeliverable)
        try:
            messages = aws.receive_messages(self._sqs, self._response_url, aws.SQS_MAX_BATCH,
                                            0 if results else int(timeout))
        except QueueGone:
            log.warning("response queue %s is gone: creating it again (results sent meanwhile are lost: "
                        "their bundles run again)", self.response_queue)
            self._response_url = aws.ensure_queue(self._sqs, self.response_queue, self._visibility_timeout)
            messages = []
        width, last = 1, messages
        while len(last) == width * aws.SQS_MAX_BATCH and len(messages) < MAX_RECEIVED:  # a backlog
            width = min(2 * width, PARALLEL_SQS_CALLS)
            more = [self._calls.submit(aws.receive_messages, self._sqs, self._response_url,
                                       aws.SQS_MAX_BATCH, 0) for _ in range(width)]
            last = [message for done in more for message in done.result()]
            messages += last
        if self._closed.is_set():  # a long poll that outlived the scheduler: left on the queue
            return []
        results += self._accept(messages)
        self._out.hear(results)
        return results + self._overdue()

    def _overdue(self) -> list[ResultBatch]:
        """Look into bundles not heard of for OVERDUE_LEASES leases (once a lease): send again those
        no worker has; the tasks of those that ran but whose results were lost, handed back."""
        now = time.monotonic()
        if now - self._overdue_checked < self._visibility_timeout:
            return []
        self._overdue_checked = now
        late = self._out.late(OVERDUE_LEASES * self._visibility_timeout, MAX_OVERDUE_LOOKED_INTO)
        if not late:
            return []
        claims = self._read_claims([claim_key(out.bundle) for out in late])
        handed_back, resend = [], []
        for out in late:
            claim = claims.get(claim_key(out.bundle), {})
            state, bundle = claim.get("state", {}).get("S"), out.bundle
            what = f"bundle {bundle.bundle} of job {bundle.job}: no news for {now - out.heard:.0f} s"
            if state == "running" and float(claim.get("lease_until", {}).get("N", 0)) > time.time():
                out.heard = now  # a worker runs it and renews its lease (a long task)
            elif state == "done":
                log.warning("%s, and it ran: its results were lost; its %d task(s) queued again", what,
                            len(out.due))
                handed_back.append(ResultBatch(bundle.job, bundle.bundle, returned=sorted(out.due)))
                self._out.drop(bundle)
            else:
                log.warning("%s, and no worker holds it: sent again", what)
                out.heard = now
                resend.append(bundle)
        if resend:
            self._make_request_queue()  # its messages may have gone with it
            for bundle in resend:
                self._outbox.put(bundle)
        return handed_back

    def _read_claims(self, keys: list[str]) -> dict[str, dict[str, Any]]:
        """The claims of ``keys`` found (one read); none if the claim table is gone (made again)."""
        request = {self._claim_table: {"Keys": [{"claim": {"S": key}} for key in set(keys)],
                                       "ConsistentRead": True}}
        try:
            with aws_errors(f"reading claims in {self._claim_table}"):
                found = self._dynamodb.batch_get_item(RequestItems=request)
        except ResourceNotFound:
            log.warning("claim table %s is gone (no worker can claim a bundle): creating it again, with a "
                        "new signing key", self._claim_table)
            ensure_claim_table(self._dynamodb, self._claim_table)
            self._signer.republish()  # the old key went with the table; the control topic signs with it too
            return {}
        return {item["claim"]["S"]: item for item in found.get("Responses", {}).get(self._claim_table, [])}

    def _make_request_queue(self) -> str:
        """The request queue's URL, the queue made again if it is gone."""
        self._request_url = aws.ensure_request_queue(self._sqs, self._request_queue, self._visibility_timeout)
        return self._request_url

    def _accept(self, messages: list[dict[str, Any]]) -> list[ResultBatch]:
        """The result batches of ``messages``, each checked whole; messages that hold none are
        moved aside.  Both are deleted; a message whose key could not be read stays on the
        queue (it comes back after the visibility timeout)."""
        # Every key the messages name, in one read first: a flood naming made-up keys costs one
        # read per hundred, not a spaced lookup each.
        try:
            self._keyring.read(message["Body"] for message in messages)
        except BackendError as exc:
            log.warning("results left on the queue for now: %s", exc)
            return []
        return take_sealed(self._sqs, self._response_url, messages, self._keyring, parse_response,
                           self._move_aside, "response message", self._calls)

    def _move_aside(self, refused: list[Refused]) -> None:
        """Send messages that are no signed result batch to the dead-letter queue (the caller
        deletes them even if this fails: they must not come back)."""
        try:
            if self._dead_letter_url is None:
                self._dead_letter_url = aws.ensure_queue(self._sqs, self._dead_letter_queue)
            aws.send_messages(self._sqs, self._dead_letter_url, [message["Body"] for message, _ in refused],
                              self._calls)
            outcome = f"moved to {self._dead_letter_queue}"
        except BackendError as exc:
            outcome = f"dropped, not moved to {self._dead_letter_queue}: {exc}"
        self._set_aside.add(len(refused), f"{refused[-1][1]}; {outcome}")

    def cancel(self, job: str) -> None:
        self._out.drop_job(job)  # its bundles are not waited for any more
        mark_cancelled(self._dynamodb, self._claim_table, job)
        try:
            self._control.publish({"type": "cancel", "job": job})
        except BackendError as exc:  # workers still see the mark, at their next bundle or lease renewal
            log.warning("job %s: cancel not broadcast: %s", job, exc)

    def close(self, wait: bool = True) -> None:
        self._closed.set()
        self._set_aside.flush()
        self._outbox.put(None)
        self._sender.join(30 if wait else 5)
        self._calls.shutdown(wait=False)
        if self._owns_response_queue:
            try:
                with aws_errors("deleting the response queue"):
                    self._sqs.delete_queue(QueueUrl=self._response_url)
            except BackendError as exc:
                log.warning("%s", exc)
        aws.log_api_calls()

    def _send_loop(self) -> None:
        """Send what is submitted, ten bundles to a call when that many are waiting."""
        while (bundle := self._outbox.get()) is not None:
            waiting = [bundle, *_drain(self._outbox, until_none=True)]
            stop = waiting[-1] is None
            self._send([b for b in waiting if b is not None], self._fail_later)
            if stop:
                return

    def _send(self, bundles: list[Bundle], fail: Callable[[ResultBatch], None]) -> None:
        bodies: list[str] = []
        for bundle in bundles:
            fitting, too_large = request_bodies(bundle, self._response_url)
            bodies += fitting
            for alone in too_large:
                fail(failed_batch(alone.job, alone.bundle, alone.ids,
                                  f"task too large for an SQS message ({MAX_SQS_MESSAGE_BYTES} bytes)"))
        while True:
            try:
                self._send_bodies(bodies)
                break
            except BackendError as exc:
                if self._closed.is_set() or not isinstance(exc, (TransientAWSError, QueueGone)):
                    log.error("%s", exc)
                    for bundle in bundles:
                        fail(failed_batch(bundle.job, bundle.bundle, bundle.ids,
                                          f"could not queue the task: {exc}"))
                    return
                self._closed.wait(self._send_outage.failed(exc))  # the bundles wait for AWS
        self._send_outage.ended()
        self._out.sent(bundles)

    def _send_bodies(self, bodies: list[str]) -> None:
        signed = [self._signer.sign(body) for body in bodies]  # may publish a new key: a call
        try:
            aws.send_messages(self._sqs, self._request_url, signed, self._calls)
        except QueueGone:
            log.warning("request queue %s is gone: creating it again", self._request_queue)
            aws.send_messages(self._sqs, self._make_request_queue(), signed, self._calls)

    def _fail_later(self, batch: ResultBatch) -> None:
        self._undeliverable.put(batch)


def _drain(source: queue.SimpleQueue, until_none: bool = False) -> list[Any]:
    """Everything waiting in ``source`` now (up to and including a None, if ``until_none``)."""
    items = []
    while True:
        try:
            item = source.get_nowait()
        except queue.Empty:
            return items
        items.append(item)
        if item is None and until_none:
            return items
