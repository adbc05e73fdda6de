"""The remote worker's machinery: take bundles from SQS, run them, send back their results.

worker.py is its command line (which loads this, and boto3, only once its options are read).
Owns what runs on each worker machine (an EC2 instance, or any host with AWS access):
the receive/claim/run/report/delete loop, the claim of each bundle in DynamoDB, the
extension of visibility and lease while a bundle runs, and the idle exit.

For each request message, in ``-t`` threads:
  0. check its seal (signing.py) and the whole bundle (check_bundle): a message not
     signed by a key of the fleet (its scheduler's, published in the claim table), or
     holding no valid bundle, is never run, but moved to the dead-letter queue
     ``<request queue>-dead`` with one log line (SQS moves there too a message
     received aws.MAX_RECEIVES times, by the request queue's redrive policy);
  1. claim ``job:bundle`` in DynamoDB with a conditional write.  The claim is a lease
     as long as the visibility timeout, renewed while the bundle runs; a bundle
     already ``done`` is a duplicate delivery (deleted unrun), one leased to a live
     worker is left alone (it comes back when the lease is over);
  2. run its tasks (tasks.run_bundle, exactly as local workers do) until its time box
     runs out;
  3. send the results, and the tasks not started (``returned``: the scheduler queues
     them again), to the message's ``reply_to`` queue;
  4. mark the claim ``done`` (if it still holds it), then delete the message.
A worker that dies mid-bundle stops renewing: its message reappears after the
visibility timeout, its lease has run out, and another worker runs the bundle.  One
paused past its lease and resumed finds the claim another's (at its next renewal, or
before it reports): it stops that bundle's tasks and sends nothing of it.  No task starts
on a lease the worker cannot vouch for: once the lease last written has under a third
left (its renewals failed, AWS being away), the next task waits for a renewal.

Control (control.py): the worker subscribes its own queue to the fleet's control
topic and obeys ``cancel`` (stop the job's tasks), ``drain`` (finish the bundles held,
take no new one, exit) and ``shutdown`` (stop now, handing the bundles held back to
the queue), when signed by a key of the fleet.  Before running a bundle, and while it
runs, it also reads the job's durable cancellation mark, so a cancel it never heard
still stops the job's tasks.  It long-polls its control queue all along (a cancel stops
tasks within a second) until it has run nothing for --economize-after; then it makes one
long poll at a time, on the request queue and its control queue in turn (3 ReceiveMessage
calls a minute, not 6; a drain reaches it within one long poll, 20 s).  Every
control.SUBSCRIPTION_CHECK_SECONDS it checks its subscription, and subscribes again if the
topic was deleted.
Its identity (logs, claims, control queue) is its EC2 instance id when IMDSv2 has one.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import math
import os
import re
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

from cloudkon import aws, protocol
from cloudkon.control import DEFAULT_CONTROL_TOPIC, ControlQueue, cancelled_jobs, record_slots
from cloudkon.errors import BackendError, CloudKonError, MalformedMessage, RefusedMessage
from cloudkon.provisioning import Instance, send_heartbeats
from cloudkon.repeats import Outage
from cloudkon.signing import Keyring
from cloudkon.sqsbackend import parse_request, response_bodies
from cloudkon.tasks import (
    CANCELLED,
    Bundle,
    Cancellations,
    ResultBatch,
    TimeBoxes,
    failed_batch,
    kill_running_tasks,
    run_bundle,
)

log = logging.getLogger("cloudkon.worker")

# Receives that fail in a row (after boto's own retries) before the worker gives up, unless
# the failure may pass by itself (AWS unreachable, throttling: aws.is_passing): an outage is
# waited out, however long, retried at RECEIVE_RETRY_SECONDS.
MAX_RECEIVE_FAILURES = 10
RECEIVE_RETRY_SECONDS = (0.5, 5.0)

# A duplicate of a bundle another worker runs comes back this often (at most) to see
# whether it is done yet, so that it is deleted soon after.
DUPLICATE_RECHECK_SECONDS = 10

# Claims outlive their bundle long enough to recognise a late duplicate delivery;
# DynamoDB's TTL deletes them after that.
CLAIM_RETENTION_SECONDS = 4 * 24 * 3600


# A job id as schedulers make them (jobs.py: 16 hex digits), with room to spare: it is part of a
# claim's key (DynamoDB: at most 2,048 bytes) and of log lines, and a ':' would break the key apart.
JOB_ID = re.compile(r"[0-9A-Za-z_-]{1,64}")
# Bundle numbers and task ids fit 64 bits, as the scheduler's do.
MAX_BUNDLE_NUMBER = 2**63 - 1
# A time box longer than this is no scheduler's (it boxes bundles at seconds to hours), and one
# past threading's timeout range would stop the thread that ends every box.
MAX_BUDGET_SECONDS = 10 * protocol.MAX_TASK_TIMEOUT_SECONDS


def check_bundle(bundle: Bundle) -> None:
    """MalformedMessage unless every field of ``bundle`` is one a scheduler could have sent, so that
    nothing of a bundle runs before all of it is known to be sound."""
    if not JOB_ID.fullmatch(bundle.job):
        raise MalformedMessage(f"bundle: job id {bundle.job[:80]!r} ({len(bundle.job)} characters) is "
                               "not 1 to 64 letters, digits, '-' or '_'")
    if not 0 <= bundle.bundle <= MAX_BUNDLE_NUMBER:
        raise MalformedMessage(f"bundle: number {bundle.bundle} is not between 0 and {MAX_BUNDLE_NUMBER}")
    if bundle.timeout is not None:
        try:
            protocol.check_task_timeout(bundle.timeout)
        except ValueError as exc:
            raise MalformedMessage(f"bundle: {exc}") from None
    if bundle.budget is not None and bundle.budget > MAX_BUDGET_SECONDS:
        raise MalformedMessage(f"bundle: a time box of {bundle.budget!r} s is over "
                               f"{MAX_BUDGET_SECONDS:.0f} s")


def claim_key(bundle: Bundle) -> str:
    """The claim of a bundle (one too large for one message travels as parts with its number:
    each is claimed)."""
    return f"{bundle.job}:{bundle.bundle}:{bundle.ids[0] if bundle.ids else 0}"


@dataclasses.dataclass
class _Running:
    """A bundle this worker runs: its claim, where its results go, and how to stop it alone."""

    job: str
    key: str
    reply_to: str
    # Its own, not the worker's: a lost lease stops this bundle, not the other bundles of its job.
    stop: Cancellations = dataclasses.field(default_factory=Cancellations)
    lost: bool = False  # another worker holds its claim now: nothing of it is sent


class _LeaseLost(Exception):
    """Raised before a task of a bundle whose claim another worker holds now: none starts."""


class Claims:
    """Leases on bundles in the DynamoDB claim table, so each bundle runs once."""

    def __init__(self, dynamodb: Any, table: str, owner: str, lease_seconds: int) -> None:
        self._dynamodb = dynamodb
        self._table = table
        self._owner = owner
        self._lease = lease_seconds
        self._leased_until: dict[str, float] = {}  # claim -> end of the lease this worker last wrote


    def claim(self, key: str) -> str:
        """'won' if this worker now holds ``key``; else 'done', or 'held:SECONDS' left on another's lease."""
        now = time.time()
        try:
            with aws.aws_errors("claiming a bundle"):
                self._dynamodb.put_item(
                    TableName=self._table,
                    Item={"claim": {"S": key}, "owner": {"S": self._owner}, "state": {"S": "running"},
                          "lease_until": {"N": f"{now + self._lease:.3f}"},
                          "expires_at": {"N": str(int(now + CLAIM_RETENTION_SECONDS))}},
                    ConditionExpression="attribute_not_exists(claim) OR "
                                        "(#state = :running AND lease_until < :now)",
                    ExpressionAttributeNames={"#state": "state"},
                    ExpressionAttributeValues={":running": {"S": "running"}, ":now": {"N": f"{now:.3f}"}})
            self._leased_until[key] = now + self._lease
            return "won"
        except BackendError as exc:
            if aws.error_code(exc) != "ConditionalCheckFailedException":
                raise
        with aws.aws_errors("reading a claim"):
            item = self._dynamodb.get_item(TableName=self._table, Key={"claim": {"S": key}},
                                           ConsistentRead=True).get("Item", {})
        if item.get("state", {}).get("S") == "done":
            return "done"
        return f"held:{max(1, int(float(item.get('lease_until', {}).get('N', now)) - now) + 1)}"

    def renew(self, key: str) -> bool:
        """Extend this worker's lease on ``key``; False if another worker holds the claim now (this
        one was paused past its lease, and the bundle went to that one)."""
        until = time.time() + self._lease
        try:
            with aws.aws_errors("renewing a claim"):
                self._dynamodb.update_item(
                    TableName=self._table, Key={"claim": {"S": key}},
                    UpdateExpression="SET lease_until = :until", ConditionExpression="#owner = :me",
                    ExpressionAttributeNames={"#owner": "owner"},
                    ExpressionAttributeValues={":until": {"N": f"{until:.3f}"}, ":me": {"S": self._owner}})
        except BackendError as exc:
            if aws.error_code(exc) != "ConditionalCheckFailedException":
                raise
            self._leased_until.pop(key, None)
            return False
        self._leased_until[key] = until
        return True

    def still_mine(self, key: str) -> bool:
        """True if this worker still holds ``key``: known without a call while a third of the lease is
        left (renewals keep two thirds, and the rest covers clock skew), else asked of the table."""
        return time.time() < self._leased_until.get(key, 0.0) - self._lease / 3 or self.renew(key)

    def release(self, key: str) -> None:
        """Give up a lease this worker holds, so another worker may run the bundle at once."""
        self._leased_until.pop(key, None)
        try:
            with aws.aws_errors("releasing a claim"):
                self._dynamodb.delete_item(
                    TableName=self._table, Key={"claim": {"S": key}},
                    ConditionExpression="#owner = :me AND #state = :running",
                    ExpressionAttributeNames={"#owner": "owner", "#state": "state"},
                    ExpressionAttributeValues={":me": {"S": self._owner}, ":running": {"S": "running"}})
        except BackendError as exc:
            if aws.error_code(exc) != "ConditionalCheckFailedException":
                raise

    def finish(self, key: str) -> bool:
        """Mark ``key`` done if this worker still holds it; False if another worker does."""
        self._leased_until.pop(key, None)
        try:
            with aws.aws_errors("marking a bundle done"):
                self._dynamodb.update_item(
                    TableName=self._table, Key={"claim": {"S": key}}, UpdateExpression="SET #state = :done",
                    ConditionExpression="#owner = :me",
                    ExpressionAttributeNames={"#state": "state", "#owner": "owner"},
                    ExpressionAttributeValues={":done": {"S": "done"}, ":me": {"S": self._owner}})
        except BackendError as exc:
            if aws.error_code(exc) != "ConditionalCheckFailedException":
                raise
            return False
        return True


class Worker:
    """Runs bundles from the request queue in ``threads`` threads until stopped or idle."""

    def __init__(self, request_queue: str, claim_table: str, threads: int, idle_timeout: float | None,
                 visibility_timeout: int, identity: str, control_topic: str = DEFAULT_CONTROL_TOPIC,
                 instance: Instance | None = None, *, economize_after: float) -> None:
        self.sqs, self.dynamodb = aws.clients()
        self.economize_after = economize_after
        # Two threads may poll the control queue (see _follow_control): one outage told once.
        self._control_outage = Outage("reading the control queue", RECEIVE_RETRY_SECONDS, log)
        self.stopping = threading.Event()  # take no new bundle
        self.exiting = threading.Event()  # every bundle held is done: leases and heartbeats end
        if instance is not None:  # alive from now on, however long the set-up below takes
            threading.Thread(target=send_heartbeats, args=(instance, self.dynamodb, self.exiting),
                             name="cloudkon-heartbeat", daemon=True).start()
        self.request_url = aws.ensure_queue(self.sqs, request_queue, visibility_timeout)
        self.dead_letter_queue = aws.dead_letter_queue(request_queue)
        self._dead_letter_url: str | None = None  # made at the first refusal: none costs nothing
        aws.ensure_claim_table(self.dynamodb, claim_table)
        self.identity = identity
        self.instance = instance
        self.claim_table = claim_table
        self.claims = Claims(self.dynamodb, claim_table, self.identity, visibility_timeout)
        self.cancellations = Cancellations()
        self.boxes = TimeBoxes(self._hand_back_rest)
        self._running: dict[int, _Running] = {}  # id(bundle) -> the bundle's claim and stop, while it runs
        self.keyring = Keyring(self.dynamodb, claim_table)
        self.control = ControlQueue(self.sqs, control_topic, identity, self.keyring)
        record_slots(self.dynamodb, claim_table, identity, threads)  # schedulers size bundles by it
        self.leaving: str | None = None  # "drain" or "shutdown", once a control message says so
        self.threads = threads
        self.idle_timeout = idle_timeout
        self.visibility_timeout = visibility_timeout
        self._held: dict[str, tuple[str, str]] = {}  # message id -> (receipt handle, claim key)
        # Set while messages are held: the control thread long-polls the control queue then (a
        # cancel stops running tasks within a second) and until the worker economizes.
        self._busy = threading.Event()
        self._lock = threading.Lock()
        self._last_work = time.monotonic()

    def run(self) -> bool:
        """Receive and run bundles until a stop is requested or the worker has been idle too long.

        True if it stopped because it was idle.
        """
        log.info("worker %s: %d threads on %s", self.identity, self.threads, self.request_url)
        threading.Thread(target=self._keep_leases, name="cloudkon-leases", daemon=True).start()
        threading.Thread(target=self._follow_control, name="cloudkon-control", daemon=True).start()
        failures, outage = 0, Outage("receiving bundles", RECEIVE_RETRY_SECONDS, log)
        with concurrent.futures.ThreadPoolExecutor(self.threads) as pool:
            while not self.stopping.is_set():
                free = self.threads - len(self._held)
                if free <= 0:
                    time.sleep(0.05)
                    continue
                idle_left = self._idle_left()
                if idle_left is not None and idle_left <= 0:
                    if self._held:  # messages still being looked at: one may be a bundle to run
                        time.sleep(0.05)
                        continue
                    log.info("idle for %g s: exiting", self.idle_timeout)
                    return True
                try:
                    messages = aws.receive_messages(self.sqs, self.request_url, free, self._poll_seconds())
                    failures = 0
                    outage.ended()
                except BackendError as exc:
                    failures = 0 if aws.is_passing(exc) else failures + 1
                    if failures >= MAX_RECEIVE_FAILURES:
                        raise
                    self.stopping.wait(outage.failed(exc))
                    continue
                if self.stopping.is_set():  # a drain or a stop signal came during the long poll
                    if messages:
                        log.info("handing back %d message(s) of the last poll", len(messages))
                    self._hand_back([(message["ReceiptHandle"], "") for message in messages])
                    break
                wait = self._poll_seconds()
                if not messages and self._economizing() and wait:  # long idle: the control queue's turn
                    self._poll_control(wait)
                for message in messages:
                    with self._lock:
                        self._held[message["MessageId"]] = (message["ReceiptHandle"], "")
                        self._busy.set()
                    pool.submit(self._handle, message)
        return False

    def _economizing(self) -> bool:
        """Idle for ``economize_after`` seconds: one long poll at a time, the queues in turn."""
        return not self._busy.is_set() and time.monotonic() - self._last_work >= self.economize_after

    def _poll_seconds(self) -> int:
        """How long the next long poll may wait: SQS's longest, cut short by an idle exit due sooner."""
        idle_left = self._idle_left()
        if idle_left is None:
            return aws.SQS_MAX_WAIT_SECONDS
        return max(0, min(aws.SQS_MAX_WAIT_SECONDS, math.ceil(idle_left)))

    def _idle_left(self) -> float | None:
        """Seconds left before an idle exit, counted from the last bundle run: messages refused,
        skipped or deferred are no work, or one poison message redelivered would keep a fleet up."""
        if self.idle_timeout is None or self._running:
            return None
        return self._last_work + self.idle_timeout - time.monotonic()

    def _handle(self, message: dict[str, Any]) -> None:
        """Claim, run, report, delete one request message (never raises: a failure is logged)."""
        receipt = message["ReceiptHandle"]
        try:
            try:
                body = self.keyring.open(message["Body"])
            except RefusedMessage as exc:
                self._refuse(message, exc)
                return
            try:
                bundle, reply_to = parse_request(body)
                check_bundle(bundle)
            except MalformedMessage as exc:  # signed, yet no bundle: a scheduler's bug, kept for a look
                self._refuse(message, exc)
                return
            if self._cancelled(bundle.job):
                log.info("job %s is cancelled: skipping bundle %d", bundle.job, bundle.bundle)
                skipped = failed_batch(bundle.job, bundle.bundle, bundle.ids, CANCELLED)
                self._send(bundle.job, reply_to, [skipped])
                aws.delete_messages(self.sqs, self.request_url, [receipt])
                return
            key = claim_key(bundle)
            claim = self.claims.claim(key)
            if claim == "done":
                aws.delete_messages(self.sqs, self.request_url, [receipt])
            elif claim.startswith("held:"):  # look again once it is done or its lease is over
                defer = min(int(claim[5:]), DUPLICATE_RECHECK_SECONDS)
                with aws.aws_errors("deferring a bundle"):
                    self.sqs.change_message_visibility(QueueUrl=self.request_url, ReceiptHandle=receipt,
                                                       VisibilityTimeout=defer)
            else:
                self._run(message, bundle, reply_to, key)
        except CloudKonError as exc:
            log.error("bundle left for redelivery: %s", exc)
        except Exception:  # a worker thread must never die silently with a message in hand
            log.exception("bundle left for redelivery after an unexpected error")
        finally:
            with self._lock:
                self._held.pop(message["MessageId"], None)
                if not self._held:
                    self._busy.clear()

    def _run(self, message: dict[str, Any], bundle: Bundle, reply_to: str, key: str) -> None:
        """Run a bundle whose claim this worker won, send its results, mark it done, delete it."""
        running = _Running(bundle.job, key, reply_to)
        with self._lock:
            self._held[message["MessageId"]] = (message["ReceiptHandle"], key)
            self._running[id(bundle)] = running
        if self.cancellations.is_cancelled(bundle.job):  # heard since it was checked, before it was listed
            running.stop.cancel(bundle.job)
        def vouch_for_lease(_task: int) -> None:
            # Free while the lease written last has a third left; past that (the renewals failed:
            # AWS away, or this worker paused) it asks the table, and waits out an outage first.
            if not self._through_outages("renewing a lease before a task", self.claims.still_mine, key):
                raise _LeaseLost

        try:
            batches = list(run_bundle(bundle, before_task=vouch_for_lease, cancellations=running.stop,
                                      boxes=self.boxes))
        except _LeaseLost:  # taken over: the tasks it started ran, no other starts here
            self._lost(running)
            return
        finally:
            with self._lock:
                del self._running[id(bundle)]
            self._last_work = time.monotonic()  # real work: only this keeps an idle worker alive
        if self.leaving == "shutdown":  # its results are not sent: the bundle runs again elsewhere
            return
        # An outage now must not throw the work away: each step is tried again while AWS is away
        # (the lease thread keeps the lease meanwhile, or another worker takes the bundle over).
        if running.lost or not self._through_outages("checking a lease", self.claims.still_mine, key):
            self._lost(running)
            return
        self._through_outages("sending results", self._send, bundle.job, reply_to, batches)
        # False: taken over while its results went out.
        if not self._through_outages("marking a bundle done", self.claims.finish, key):
            self._lost(running)
            return
        with self._lock:  # done with: no lease renewal may race its delete (a warning about a receipt gone)
            self._held[message["MessageId"]] = (message["ReceiptHandle"], "")
        self._through_outages("deleting a bundle's message", aws.delete_messages, self.sqs, self.request_url,
                              [message["ReceiptHandle"]])

    def _through_outages(self, what: str, step: Callable[..., Any], *args: Any) -> Any:
        """``step(*args)``, tried again while it fails for a reason that passes (AWS unreachable,
        throttling) and the worker is not stopping at once; any other failure is raised."""
        outage = Outage(what, RECEIVE_RETRY_SECONDS, log)
        while True:
            try:
                result = step(*args)
            except BackendError as exc:
                if not aws.is_passing(exc) or self.leaving == "shutdown":
                    raise
                time.sleep(outage.failed(exc))
                continue
            outage.ended()
            return result

    def _lost(self, running: _Running) -> None:
        """A bundle whose claim another worker took (this one was paused past its lease, or could
        not renew it while AWS was away): stop its tasks at once, and send nothing of it; its
        message is that worker's to delete."""
        with self._lock:
            if running.lost:
                return
            running.lost = True
        log.warning("bundle %s: lost its lease to another worker (it ran out while this one was paused or "
                    "AWS was away): stopping its tasks, sending nothing of it", running.key)
        running.stop.cancel(running.job)

    def _refuse(self, message: dict[str, Any], reason: CloudKonError) -> None:
        """Move a request message the fleet did not sign, or that holds no valid bundle, to the
        dead-letter queue, unrun, and delete it (even if the move fails: it must not come back)."""
        try:
            if self._dead_letter_url is None:
                self._dead_letter_url = aws.ensure_queue(self.sqs, self.dead_letter_queue)
            aws.send_messages(self.sqs, self._dead_letter_url, [message["Body"]])
            outcome = f"moved to {self.dead_letter_queue}"
        except BackendError as exc:
            outcome = f"dropped, not moved to {self.dead_letter_queue}: {exc}"
        log.error("refused request message %s (%s): %s", message["MessageId"], reason, outcome)
        aws.delete_messages(self.sqs, self.request_url, [message["ReceiptHandle"]])

    def _send(self, job: str, reply_to: str, batches: Iterable[ResultBatch]) -> None:
        """Send results (once all are in: a bundle's results go in as few messages as fit),
        with the tasks a time-boxed bundle hands back."""
        whole = ResultBatch(job)
        for batch in batches:  # one batch per flush: sent as one, split only to fit a message
            whole.bundle = batch.bundle
            whole.extend(batch)
        whole.worker = self.identity
        bodies = [self.keyring.seal(body) for body in response_bodies(whole)]  # schedulers check the seal
        if self.leaving == "shutdown":
            return
        try:
            aws.send_messages(self.sqs, reply_to, bodies)
        except BackendError as exc:
            if not aws.is_missing_queue(exc):
                raise
            log.warning("job %s: its scheduler's queue is gone; results dropped", job)

    def _hand_back_rest(self, bundle: Bundle, ids: list[int]) -> None:
        """Send the tasks a bundle whose time box ran out will not start to its scheduler, now
        (TimeBoxes' thread); its last results say so again, so a failure here loses nothing."""
        with self._lock:
            running = self._running.get(id(bundle))  # None: it ended meanwhile, and said so
        if running is None or running.lost:
            return
        try:
            self._send(bundle.job, running.reply_to, [ResultBatch(bundle.job, bundle.bundle, returned=ids)])
        except BackendError as exc:
            log.warning("bundle %s: handing back %d task(s) early failed (its results will): %s",
                        running.key, len(ids), exc)

    def _cancelled(self, job: str) -> bool:
        """True if ``job`` is cancelled, by what this worker heard or by its durable mark."""
        if self.cancellations.is_cancelled(job):
            return True
        if cancelled_jobs(self.dynamodb, self.claim_table, {job}):
            self._cancel(job)
            return True
        return False

    def _cancel(self, job: str) -> None:
        """Stop ``job``'s running tasks, and remember it: its later bundles run nothing."""
        self.cancellations.cancel(job)
        with self._lock:
            stops = [running.stop for running in self._running.values() if running.job == job]
        for stop in stops:
            stop.cancel(job)

    def _follow_control(self) -> None:
        """Obey the control messages of the fleet's topic (runs in a thread for the worker's life;
        while the worker economizes, the main loop polls the control queue instead)."""
        while not self.exiting.is_set():
            if self._economizing():
                self._busy.wait(aws.SQS_MAX_WAIT_SECONDS)  # until work comes back
            else:
                self._poll_control(aws.SQS_MAX_WAIT_SECONDS)

    def _poll_control(self, wait_seconds: int) -> None:
        """One long poll of the control queue, and obey what it brings."""
        try:
            messages = self.control.receive(wait_seconds)
        except BackendError as exc:
            if self.exiting.is_set():
                return  # the control queue is being deleted
            time.sleep(self._control_outage.failed(exc))
            if aws.is_missing_queue(exc):  # deleted under us: without it, cancels go unheard
                self._reopen_control()
            return
        self._control_outage.ended()
        for message in messages:
            if message["type"] == "cancel":
                log.info("job %s cancelled: stopping its tasks", message["job"])
                self._cancel(message["job"])
            elif message["type"] == "drain":
                self._drain()
            elif message["type"] == "shutdown":
                self._shut_down()
            else:
                log.error("ignoring a control message of type %r", message["type"])

    def _reopen_control(self) -> None:
        try:
            self.control.open()
            log.info("control queue made again")
        except BackendError as exc:
            log.warning("%s", exc)

    def _drain(self) -> None:
        if self.stopping.is_set():
            return
        log.info("drain: finishing the bundles held, taking no new one")
        self.leaving = "drain"
        # The main thread sees it when its long poll ends (what that poll brings goes back to
        # the queue at once), then waits for the pool.
        self.stopping.set()

    def _shut_down(self) -> None:
        """Stop at once: hand the bundles held back to the queue, kill their tasks, exit."""
        log.warning("shutdown: stopping now; the bundles held go back to the queue")
        with self._lock:
            held = list(self._held.values())
            self.leaving = "shutdown"  # from now on no result is sent
        self.stopping.set()
        try:
            self._hand_back(held)
            kill_running_tasks()
            self.leave(retire=True)
        finally:
            os._exit(0)

    def _hand_back(self, held: list[tuple[str, str]]) -> None:
        for receipt, key in held:
            try:
                with aws.aws_errors("handing a bundle back"):
                    self.sqs.change_message_visibility(QueueUrl=self.request_url, ReceiptHandle=receipt,
                                                       VisibilityTimeout=0)
                if key:
                    self.claims.release(key)
            except BackendError as exc:
                log.warning("%s (it comes back after its visibility timeout)", exc)

    def leave(self, retire: bool) -> None:
        """Unsubscribe from control, log the API calls made, and (on EC2, if ``retire``) terminate."""
        self.stopping.set()
        self.exiting.set()
        self.control.close()
        aws.log_api_calls()  # now: the instance may be gone a moment after it retires
        if retire and self.instance is not None:
            self.instance.retire(self.dynamodb)

    def _keep_leases(self) -> None:
        """Extend visibility and lease of every running bundle, a third of the timeout ahead,
        and stop the tasks of any of their jobs marked cancelled meanwhile."""
        while not self.exiting.wait(self.visibility_timeout / 3):  # draining bundles keep theirs
            with self._lock:
                running = [(receipt, key) for receipt, key in self._held.values() if key]
            for receipt, key in running:
                try:
                    if not self.claims.renew(key):  # first: a receipt of a lost bundle is stale
                        with self._lock:
                            lost = [run for run in self._running.values() if run.key == key]
                        for run in lost:
                            self._lost(run)
                        continue
                    with aws.aws_errors("extending visibility"):
                        self.sqs.change_message_visibility(QueueUrl=self.request_url, ReceiptHandle=receipt,
                                                           VisibilityTimeout=self.visibility_timeout)
                except BackendError as exc:
                    with self._lock:
                        still_running = (receipt, key) in self._held.values()
                    if still_running:  # else it ended meanwhile and its message is deleted: no matter
                        log.warning("bundle %s: %s", key, exc)
            jobs = {key.split(":")[0] for _, key in running}
            try:
                cancelled = cancelled_jobs(self.dynamodb, self.claim_table,
                                           {job for job in jobs if not self.cancellations.is_cancelled(job)})
            except BackendError as exc:
                log.warning("%s", exc)
                continue
            for job in cancelled:
                log.info("job %s is marked cancelled: stopping its tasks", job)
                self._cancel(job)
