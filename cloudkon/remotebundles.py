"""One request message on a remote worker: check, claim, run, report, delete.

Owns what a thread of the worker's pool does with a message (remoteworker.py receives
them; its docstring tells how leases, lost leases and the control channel fit in):
  0. check its seal (signing.py) and the whole bundle (check_bundle): a message not
     signed by a key of the fleet, or holding no valid bundle, is never run, but moved
     to the dead-letter queue ``<request queue>-dead`` with one log line;
  1. skip a bundle of a job cancelled (heard over the control channel, or marked in the
     claim table), and claim the others (claims.py): a bundle already ``done`` is a
     duplicate delivery (deleted unrun), one leased to a live worker is deferred until
     it is done or its lease is over;
  2. run its tasks (runner.run_bundle) until its time box runs out, vouching for the
     lease before each task;
  3. send the results, and the tasks not started, to the message's ``reply_to`` queue,
     sealed with a key of the fleet;
  4. mark the claim ``done`` (if it still holds it), then delete the message.
Each step after the run is tried again while AWS is away (errors.TransientAWSError):
an outage must not throw the work away.

AWS behaviour relied on: a message whose visibility is changed comes back after that
many seconds; a response queue deleted by its scheduler refuses sends (QueueGone).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

from cloudkon import aws
from cloudkon.claims import JOB_ID, Claims, cancelled_jobs, claim_key
from cloudkon.errors import (
    BackendError,
    CloudKonError,
    MalformedMessage,
    QueueGone,
    RefusedMessage,
    TransientAWSError,
)
from cloudkon.holdings import Holdings, Running
from cloudkon.repeats import Outage
from cloudkon.runner import TimeBoxes, run_bundle
from cloudkon.signing import Keyring
from cloudkon.sqsmessages import parse_request, response_bodies
from cloudkon.tasks import (
    CANCELLED,
    MAX_TASK_TIMEOUT_SECONDS,
    Bundle,
    ResultBatch,
    check_task_timeout,
    failed_batch,
)

log = logging.getLogger("cloudkon.worker")

# A step that fails while AWS is away is tried again after a pause that doubles from the first
# figure up to the second: soon after a blip, and a few calls a minute through a long outage.
RETRY_SECONDS = (0.5, 5.0)

# A duplicate of a bundle another worker runs comes back this often (at most) to see
# whether it is done yet, so that it is deleted soon after.
DUPLICATE_RECHECK_SECONDS = 10

# Bundle numbers and task ids fit 64 bits, as the scheduler's do.
MAX_BUNDLE_NUMBER = 2**63 - 1
# A time box longer than this is no scheduler's (it boxes bundles at seconds to hours), and one
# past threading's timeout range would stop the thread that ends every box.
MAX_BUDGET_SECONDS = 10 * MAX_TASK_TIMEOUT_SECONDS


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
            check_task_timeout(bundle.timeout)
        except ValueError as exc:
            raise MalformedMessage(f"bundle: {exc}") from None
    if bundle.budget is not None and bundle.budget > MAX_BUDGET_SECONDS:
        raise MalformedMessage(f"bundle: a time box of {bundle.budget!r} s is over "
                               f"{MAX_BUDGET_SECONDS:.0f} s")


class _LeaseLost(Exception):
    """Raised before a task of a bundle whose claim another worker holds now: none starts."""


class BundleHandler:
    """Deals with request messages, each in a thread of the worker's pool (``handle``)."""

    def __init__(self, sqs: Any, dynamodb: Any, request_queue: str, request_url: str, claim_table: str,
                 claims: Claims, held: Holdings, keyring: Keyring, identity: str) -> None:
        self.sqs = sqs
        self.dynamodb = dynamodb
        self.request_url = request_url
        self.dead_letter_queue = aws.dead_letter_queue(request_queue)
        self._dead_letter_url: str | None = None  # made at the first refusal: none costs nothing
        self.claim_table = claim_table
        self.claims = claims
        self.held = held
        self.keyring = keyring
        self.identity = identity
        self.boxes = TimeBoxes(self.hand_back_rest)

    def handle(self, message: dict[str, Any]) -> None:
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
            # Its bundle runs here already (the claim is this worker's): looked at again later.
            running_here = self.held.runs_claim(key)
            claim = f"held:{DUPLICATE_RECHECK_SECONDS}" if running_here else self.claims.claim(key)
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
            self.held.drop(message)

    def _run(self, message: dict[str, Any], bundle: Bundle, reply_to: str, key: str) -> None:
        """Run a bundle whose claim this worker won, send its results, mark it done, delete it."""
        running = Running(bundle.job, key, reply_to)
        self.held.start(message, bundle, running)

        def vouch_for_lease(_task: int) -> None:
            # Free while the lease written last has a third left; past that (the renewals failed:
            # AWS away, or this worker paused) it asks the table, and waits out an outage first.
            if not self._through_outages("renewing a lease before a task", self.claims.still_mine, key):
                raise _LeaseLost

        try:
            batches = list(run_bundle(bundle, before_task=vouch_for_lease, cancellations=running.stop,
                                      boxes=self.boxes))
        except _LeaseLost:  # taken over: the tasks it started ran, no other starts here
            self.held.lose(running)
            return
        finally:
            self.held.end(bundle)
        if self.held.leaving == "shutdown":  # its results are not sent: the bundle runs again elsewhere
            return
        # An outage now must not throw the work away: each step is tried again while AWS is away
        # (the lease thread keeps the lease meanwhile, or another worker takes the bundle over).
        if running.lost or not self._through_outages("checking a lease", self.claims.still_mine, key):
            self.held.lose(running)
            return
        self._through_outages("sending results", self._send, bundle.job, reply_to, batches)
        # False: taken over while its results went out.
        if not self._through_outages("marking a bundle done", self.claims.finish, key):
            self.held.lose(running)
            return
        self.held.done_with(message)  # its lease is no longer kept
        self._through_outages("deleting a bundle's message", aws.delete_messages, self.sqs, self.request_url,
                              [self.held.receipt(message)])

    def _through_outages(self, what: str, step: Callable[..., Any], *args: Any) -> Any:
        """``step(*args)``, tried again while it fails for a reason that passes (AWS unreachable,
        throttling) and the worker is not stopping at once; any other failure is raised."""
        outage = Outage(what, RETRY_SECONDS, log)
        while True:
            try:
                result = step(*args)
            except TransientAWSError as exc:
                if self.held.leaving == "shutdown":
                    raise
                time.sleep(outage.failed(exc))
                continue
            outage.ended()
            return result

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
        if self.held.leaving == "shutdown":
            return
        try:
            aws.send_messages(self.sqs, reply_to, bodies)
        except QueueGone:
            log.warning("job %s: its scheduler's queue is gone; results dropped", job)

    def hand_back_rest(self, bundle: Bundle, ids: list[int]) -> None:
        """Send the tasks a bundle whose time box ran out will not start to its scheduler, now
        (TimeBoxes' thread); its last results say so again, so a failure here loses nothing."""
        running = self.held.running(bundle)  # None: it ended meanwhile, and said so
        if running is None or running.lost:
            return
        try:
            self._send(bundle.job, running.reply_to, [ResultBatch(bundle.job, bundle.bundle, returned=ids)])
        except BackendError as exc:
            log.warning("bundle %s: handing back %d task(s) early failed (its results will): %s",
                        running.key, len(ids), exc)

    def _cancelled(self, job: str) -> bool:
        """True if ``job`` is cancelled, by what this worker heard or by its durable mark."""
        if self.held.cancellations.is_cancelled(job):
            return True
        if self.marked_cancelled({job}):
            self.held.cancel(job)
            return True
        return False

    def marked_cancelled(self, jobs: set[str]) -> set[str]:
        """Which of ``jobs`` have a durable cancel mark."""
        return cancelled_jobs(self.dynamodb, self.claim_table, jobs)
