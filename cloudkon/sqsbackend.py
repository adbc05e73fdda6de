"""SQSBackend: bundles go to remote workers through Amazon SQS.

Owns the scheduler's side of remote mode and the shape of its messages::

    submit(bundle) -> sender thread -> request queue (shared by every scheduler and worker)
                                           |  worker.py: claim in DynamoDB, run, report
    receive() <- long poll <- response queue (one per scheduler) <-+

A request message is a protocol ``bundle`` plus ``reply_to`` (the response queue's
URL), sealed with this scheduler's key (signing.py: workers refuse any other); a
response message is a protocol ``results`` with its ``bundle``, sealed by the worker
with a key of the fleet (signing.py says which).  Both are kept within
MAX_SQS_MESSAGE_BYTES here, whatever the emulator accepts: a bundle that encodes too
large (seal included) is split, a result whose output alone is too large is trimmed.
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

from cloudkon import aws, protocol
from cloudkon.aws import MAX_SQS_MESSAGE_BYTES, aws_errors
from cloudkon.backend import Backend
from cloudkon.control import DEFAULT_CONTROL_TOPIC, ControlTopic, mark_cancelled
from cloudkon.errors import BackendError, FrameTooLarge, MalformedMessage, RefusedMessage
from cloudkon.repeats import Outage, ThrottledLog
from cloudkon.signing import SEAL_BYTES, Keyring, Signer
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
_TRIMMED = "\n[cloudkon: output trimmed to fit an SQS message]"


def claim_key(bundle: Bundle) -> str:
    """The claim table's key for ``bundle`` (a part of one, if it was split to fit messages)."""
    return f"{bundle.job}:{bundle.bundle}:{bundle.ids[0] if bundle.ids else 0}"


@dataclasses.dataclass
class _Out:
    """A bundle sent and not heard of whole: its tasks without news, and when it was last heard of."""

    bundle: Bundle
    due: set[int]
    heard: float


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


def response_bodies(batch: ResultBatch, limit: int = MAX_SQS_MESSAGE_BYTES - SEAL_BYTES) -> list[str]:
    """Message bodies carrying ``batch``, split in halves until each fits (with room for the
    seal); an output too large to fit even alone is trimmed (and says so)."""
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


def parse_response(body: str) -> ResultBatch:
    """The result batch of an (unsealed) response message; MalformedMessage unless it is one
    whole valid batch: nothing of it may be recorded before all of it is checked."""
    data = body.encode("utf-8", "surrogatepass")
    message = protocol.decode(data)
    if message["type"] != "results":
        raise MalformedMessage(f"a response message holds results, not {message['type']!r}", data)
    batch = protocol.results_from_message(message)
    if len(set(batch.ids)) != len(batch.ids):  # one task counted twice would end its job early
        raise MalformedMessage("results: a task id appears twice", data)
    return batch


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

    def __init__(self, request_queue: str = aws.DEFAULT_REQUEST_QUEUE, response_queue: str | None = None,
                 claim_table: str = aws.DEFAULT_CLAIM_TABLE, in_flight: int | None = None,
                 visibility_timeout: int = aws.DEFAULT_VISIBILITY_TIMEOUT,
                 control_topic: str = DEFAULT_CONTROL_TOPIC) -> None:
        self._sqs, self._dynamodb = aws.clients()
        self._claim_table = claim_table
        self._in_flight = in_flight
        self._slots = 0
        self._slots_counted = -math.inf
        self._request_queue, self._visibility_timeout = request_queue, visibility_timeout
        self._make_request_queue()
        self._out: dict[tuple[str, int | None], _Out] = {}  # (job, bundle number) -> bundle sent
        self._out_lock = threading.Lock()  # the sending and the receiving threads share it
        self._overdue_checked = time.monotonic()
        self._send_outage = Outage("sending bundles", SEND_RETRY_SECONDS, log)
        self._owns_response_queue = response_queue is None
        self.response_queue = response_queue or f"{aws.RESPONSE_QUEUE_PREFIX}{secrets.token_hex(6)}"
        response_queue = self.response_queue
        self._response_url = aws.ensure_queue(self._sqs, response_queue, visibility_timeout)
        self._dead_letter_queue = aws.dead_letter_queue(response_queue)
        self._dead_letter_url: str | None = None  # made at the first message set aside
        self._set_aside = ThrottledLog(log, logging.ERROR, f"messages of {response_queue} that are no "
                                       "signed result batch, set aside", SET_ASIDE_LOG_SECONDS)
        self._closed = threading.Event()
        aws.ensure_claim_table(self._dynamodb, claim_table)
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
        """The slots counted last (no AWS call: this runs on the scheduler's event loop)."""
        if self._in_flight is not None:
            return self._in_flight
        return self._slots or SLOTS_WITHOUT_WORKERS

    def describe(self) -> str:
        if self._in_flight is not None:
            return f"sqs backend: {self._in_flight} bundles kept in flight (--in-flight)"
        return ("sqs backend: bundles kept in flight follow the thread counts of the workers subscribed "
                f"to the control topic ({self._slots or 'none yet'})")

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
        except BackendError as exc:
            if not aws.is_missing_queue(exc):
                raise
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
        self._hear(results)
        return results + self._overdue()

    def _hear(self, batches: list[ResultBatch]) -> None:
        """Note the tasks of bundles sent that have news (a result, or handed back)."""
        now = time.monotonic()
        with self._out_lock:
            for batch in batches:
                out = self._out.get((batch.job, batch.bundle))
                if out is not None:
                    out.due.difference_update(batch.ids)
                    out.due.difference_update(batch.returned)
                    out.heard = now
                    if not out.due:
                        del self._out[(batch.job, batch.bundle)]

    def _overdue(self) -> list[ResultBatch]:
        """Look into bundles not heard of for OVERDUE_LEASES leases (once a lease): send again those
        no worker has; the tasks of those that ran but whose results were lost, handed back."""
        now = time.monotonic()
        if now - self._overdue_checked < self._visibility_timeout:
            return []
        self._overdue_checked = now
        with self._out_lock:
            late = [out for out in self._out.values()
                    if now - out.heard > OVERDUE_LEASES * self._visibility_timeout][:MAX_OVERDUE_LOOKED_INTO]
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
                with self._out_lock:
                    self._out.pop((bundle.job, bundle.bundle), None)
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
        except BackendError as exc:
            if aws.error_code(exc) != "ResourceNotFoundException":
                raise
            log.warning("claim table %s is gone (no worker can claim a bundle): creating it again, with a "
                        "new signing key", self._claim_table)
            aws.ensure_claim_table(self._dynamodb, self._claim_table)
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
        try:
            self._keyring.read(message["Body"] for message in messages)
        except BackendError as exc:
            log.warning("results left on the queue for now: %s", exc)
            return []
        batches, accepted, refused = [], [], []
        for message in messages:
            try:
                batches.append(parse_response(self._keyring.open(message["Body"])))
                accepted.append(message["ReceiptHandle"])
            except BackendError as exc:
                log.warning("a result left on the queue for now: %s", exc)
            except (RefusedMessage, MalformedMessage) as exc:
                refused.append((message, str(exc)))
            except Exception as exc:  # a message that breaks the parser must not come back forever
                log.exception("a response message could not be read")
                refused.append((message, repr(exc)))
        if refused:
            self._move_aside(refused)
        aws.delete_messages(self._sqs, self._response_url,
                            accepted + [message["ReceiptHandle"] for message, _ in refused], self._calls)
        return batches

    def _move_aside(self, refused: list[tuple[dict[str, Any], str]]) -> None:
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
        with self._out_lock:  # its bundles are not waited for any more
            for key in [key for key in self._out if key[0] == job]:
                del self._out[key]
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
                if self._closed.is_set() or not (aws.is_passing(exc) or aws.is_missing_queue(exc)):
                    log.error("%s", exc)
                    for bundle in bundles:
                        fail(failed_batch(bundle.job, bundle.bundle, bundle.ids,
                                          f"could not queue the task: {exc}"))
                    return
                self._closed.wait(self._send_outage.failed(exc))  # the bundles wait for AWS
        self._send_outage.ended()
        now = time.monotonic()
        with self._out_lock:
            for bundle in bundles:
                out = self._out.setdefault((bundle.job, bundle.bundle), _Out(bundle, set(bundle.ids), now))
                out.heard = now  # sent again: its lease starts again

    def _send_bodies(self, bodies: list[str]) -> None:
        signed = [self._signer.sign(body) for body in bodies]  # may publish a new key: a call
        try:
            aws.send_messages(self._sqs, self._request_url, signed, self._calls)
        except BackendError as exc:
            if not aws.is_missing_queue(exc):
                raise
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
