"""SQSBackend: bundles go to remote workers through Amazon SQS.

Owns the scheduler's side of remote mode and the shape of its messages::

    submit(bundle) -> sender thread -> request queue (shared by every scheduler and worker)
                                           |  worker.py: claim in DynamoDB, run, report
    receive() <- long poll <- response queue (one per scheduler) <-+

A request message is a protocol ``bundle`` plus ``reply_to`` (the response queue's
URL), sealed with this scheduler's key (signing.py: workers refuse any other); a
response message is a protocol ``results`` with its ``bundle``.  Both are kept within
MAX_SQS_MESSAGE_BYTES here, whatever the emulator accepts: a bundle that encodes too
large (seal included) is split, a result whose output alone is too large is trimmed.
Response messages are deleted once the results are handed to the scheduler.
``cancel(job)`` marks the job cancelled in the claim table (durable: every worker
reads it before running a bundle), then tells the workers over the control topic
(control.py) so that running tasks stop at once.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import queue
import secrets
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import aws
import protocol
from aws import MAX_SQS_MESSAGE_BYTES, aws_errors
from backend import Backend
from control import DEFAULT_CONTROL_TOPIC, ControlTopic, mark_cancelled
from errors import BackendError, FrameTooLarge, MalformedMessage
from signing import SEAL_BYTES, Signer
from tasks import Bundle, ResultBatch, failed_batch

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
_TRIMMED = "\n[cloudkon: output trimmed to fit an SQS message]"


def request_body(bundle: Bundle, reply_to: str) -> str:
    return protocol.encode_body({**protocol.bundle_message(bundle), "reply_to": reply_to}).decode("ascii")


def _fits(encode: Callable[[], str], limit: int) -> str | None:
    """The encoded body if it is within ``limit`` bytes, else None."""
    try:
        body = encode()
    except FrameTooLarge:
        return None
    return body if len(body) <= limit else None


def parse_request(body: str) -> tuple[Bundle, str]:
    """(bundle, response queue URL) of a request message; MalformedMessage if it is not one."""
    message = protocol.decode(body.encode("utf-8"))
    if message["type"] != "bundle" or not isinstance(message.get("reply_to"), str):
        raise MalformedMessage("a request message is a bundle with a reply_to", body.encode()[:200])
    return protocol.bundle_from_message(message), message["reply_to"]


def request_bodies(bundle: Bundle, reply_to: str,
                   limit: int = MAX_SQS_MESSAGE_BYTES - SEAL_BYTES) -> tuple[list[str], list[Bundle]]:
    """Message bodies carrying ``bundle`` (split in halves until each fits, with room for
    the seal), and any single-task bundles too large for one message."""
    body = _fits(lambda: request_body(bundle, reply_to), limit)
    if body is not None:
        return [body], []
    if len(bundle.ids) == 1:
        return [], [bundle]
    half = len(bundle.ids) // 2
    bodies, too_large = [], []
    for part in (slice(0, half), slice(half, None)):
        more, rejected = request_bodies(dataclasses.replace(bundle, ids=bundle.ids[part],
                                                            commands=bundle.commands[part]), reply_to, limit)
        bodies += more
        too_large += rejected
    return bodies, too_large


def response_bodies(batch: ResultBatch, limit: int = MAX_SQS_MESSAGE_BYTES) -> list[str]:
    """Message bodies carrying ``batch``, split in halves until each fits; an output too
    large to fit even alone is trimmed (and says so)."""
    body = _fits(lambda: protocol.encode_body(protocol.results_message(batch)).decode("ascii"), limit)
    if body is not None:
        return [body]
    if len(batch.ids) == 1:
        output = batch.outputs[0]
        size = len(protocol.encode_body(protocol.results_message(batch)))
        keep = max(0, len(output) * limit // size - len(_TRIMMED) - 1024)
        return response_bodies(dataclasses.replace(batch, outputs=[output[:keep] + _TRIMMED]), limit)
    half = len(batch.ids) // 2
    first, rest = batch.select(list(range(half))), batch.select(list(range(half, len(batch.ids))))
    first.returned = batch.returned  # select keeps the worker; the tasks handed back go with one part
    return response_bodies(first, limit) + response_bodies(rest, limit)


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

    def __init__(self, request_queue: str = aws.DEFAULT_REQUEST_QUEUE, response_queue: str | None = None,
                 claim_table: str = aws.DEFAULT_CLAIM_TABLE, in_flight: int | None = None,
                 visibility_timeout: int = aws.DEFAULT_VISIBILITY_TIMEOUT,
                 control_topic: str = DEFAULT_CONTROL_TOPIC) -> None:
        self._sqs, self._dynamodb = aws.clients()
        self._claim_table = claim_table
        self._in_flight = in_flight
        self._slots = 0
        self._slots_counted = -math.inf
        self._request_url = aws.ensure_queue(self._sqs, request_queue, visibility_timeout)
        self._owns_response_queue = response_queue is None
        self.response_queue = response_queue or f"{aws.RESPONSE_QUEUE_PREFIX}{secrets.token_hex(6)}"
        response_queue = self.response_queue
        self._response_url = aws.ensure_queue(self._sqs, response_queue, visibility_timeout)
        aws.ensure_claim_table(self._dynamodb, claim_table)
        self._signer = Signer(self._dynamodb, claim_table)
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
        """The slots counted last (no AWS call: this runs on the scheduler's event loop)."""
        if self._in_flight is not None:
            return self._in_flight
        return self._slots or SLOTS_WITHOUT_WORKERS

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
        self._count_slots()
        results = _drain(self._undeliverable)
        messages = aws.receive_messages(self._sqs, self._response_url, aws.SQS_MAX_BATCH,
                                        0 if results else int(timeout))
        width, last = 1, messages
        while len(last) == width * aws.SQS_MAX_BATCH and len(messages) < MAX_RECEIVED:  # a backlog
            width = min(2 * width, PARALLEL_SQS_CALLS)
            more = [self._calls.submit(aws.receive_messages, self._sqs, self._response_url,
                                       aws.SQS_MAX_BATCH, 0) for _ in range(width)]
            last = [message for done in more for message in done.result()]
            messages += last
        for message in messages:
            try:
                results.append(protocol.results_from_message(protocol.decode(message["Body"].encode())))
            except MalformedMessage as exc:
                log.error("dropping a malformed message on the response queue: %s", exc)
        aws.delete_messages(self._sqs, self._response_url, [m["ReceiptHandle"] for m in messages],
                            self._calls)
        return results

    def cancel(self, job: str) -> None:
        mark_cancelled(self._dynamodb, self._claim_table, job)
        try:
            self._control.publish({"type": "cancel", "job": job})
        except BackendError as exc:  # workers still see the mark, at their next bundle or lease renewal
            log.warning("job %s: cancel not broadcast: %s", job, exc)

    def close(self, wait: bool = True) -> None:
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
        try:
            signed = [self._signer.sign(body) for body in bodies]  # may publish a new key: a call
            aws.send_messages(self._sqs, self._request_url, signed, self._calls)
        except BackendError as exc:
            log.error("%s", exc)
            for bundle in bundles:
                fail(failed_batch(bundle.job, bundle.bundle, bundle.ids, f"could not queue the task: {exc}"))

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
