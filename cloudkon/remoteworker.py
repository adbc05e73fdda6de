"""The remote worker's machinery: take bundles from SQS, run them, send back their results.

worker.py is its command line (which loads this, and boto3, only once its options are read).
Owns what runs on each worker machine (an EC2 instance, or any host with AWS access):
the receiving loop, the worker's threads and how they stop, obeying the control channel,
and the idle exit.  What is done with each message is remotebundles.py's; what the
worker holds and the leases it keeps, holdings.py's; the claims, claims.py's.

For each request message, in ``-t`` threads (remotebundles.py):
  0. check its seal (signing.py) and the whole bundle (check_bundle): a message not
     signed by a key of the fleet (its scheduler's, published in the claim table), or
     holding no valid bundle, is never run, but moved to the dead-letter queue
     ``<request queue>-dead`` with one log line (SQS moves there too a message
     received aws.MAX_RECEIVES times, by the request queue's redrive policy);
  1. claim the bundle in DynamoDB with a conditional write (claims.py).  The claim is a lease
     as long as the visibility timeout, renewed while the bundle runs; a bundle
     already ``done`` is a duplicate delivery (deleted unrun), one leased to a live
     worker is left alone (it comes back when the lease is over);
  2. run its tasks (runner.run_bundle, exactly as local workers do) until its time box
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

Threads: a receiving thread long-polls the request queue and hands each message to a
pool of ``-t`` threads; a control thread, a lease thread and, on EC2, a heartbeat thread
and a thread watching a spot instance's interruption notice (spotwatch.py: it leaves as on a
``shutdown``) run beside them.  The main thread (``run``) only acts on stop requests, which signal
handlers (``request_stop``) and the control thread only flag: the first takes no new
bundle, finishes and reports those held, and hands back what the poll in flight brings;
the next (or one during a drain) kills the running tasks and exits 1 at once; a
``shutdown`` hands back the bundles held, kills their tasks, retires and exits 0.
"""

from __future__ import annotations

import concurrent.futures
import logging
import math
import os
import threading
import time

from cloudkon import aws
from cloudkon.claims import Claims, ensure_claim_table, record_slots
from cloudkon.control import ControlQueue, queue_name
from cloudkon.defaults import DEFAULT_CONTROL_TOPIC
from cloudkon.errors import BackendError, CloudKonError, QueueGone, TransientAWSError
from cloudkon.fleetpolicy import retire_at
from cloudkon.holdings import Holdings
from cloudkon.processes import kill_running_tasks
from cloudkon.remotebundles import RETRY_SECONDS, BundleHandler
from cloudkon.repeats import Outage
from cloudkon.signing import Keyring
from cloudkon.spotwatch import watch_interruption
from cloudkon.workerinstance import Instance, send_heartbeats

log = logging.getLogger("cloudkon.worker")

# Receives that fail in a row (after boto's own retries) before the worker gives up, unless
# the failure may pass by itself (AWS unreachable, throttling: errors.TransientAWSError): an
# outage is waited out, however long, retried at remotebundles.RETRY_SECONDS.
MAX_RECEIVE_FAILURES = 10

# The main thread looks at the stop requests this often: the latency of a second signal.
STOP_CHECK_SECONDS = 0.1


class Worker:
    """Runs bundles from the request queue in ``threads`` threads until stopped or idle."""

    def __init__(self, request_queue: str, claim_table: str, threads: int, idle_timeout: float | None,
                 visibility_timeout: int, identity: str, control_topic: str = DEFAULT_CONTROL_TOPIC,
                 instance: Instance | None = None, *, economize_after: float) -> None:
        self.sqs, self.dynamodb = aws.clients()
        self.economize_after = economize_after
        # Two threads may poll the control queue (see _follow_control): one outage told once.
        self._control_outage = Outage("reading the control queue", RETRY_SECONDS, log)
        self.stopping = threading.Event()  # take no new bundle
        self.exiting = threading.Event()  # every bundle held is done: leases and heartbeats end
        # Stop requests, only flagged where they come from (signal handlers, the control thread):
        # the main thread acts on them (run).
        self._stop_asked = threading.Event()
        self._kill_asked = threading.Event()
        self._shutdown_asked = threading.Event()
        self._stop_told = False  # the main thread's own: it logged the first stop signal
        if instance is not None:  # alive from now on, however long the set-up below takes
            threading.Thread(target=send_heartbeats, args=(instance, self.dynamodb, self.exiting),
                             name="cloudkon-heartbeat", daemon=True).start()
        self.request_url = aws.ensure_queue(self.sqs, request_queue, visibility_timeout)
        ensure_claim_table(self.dynamodb, claim_table)
        self.identity = identity
        self.instance = instance
        claims = Claims(self.dynamodb, claim_table, self.identity, visibility_timeout)
        self.held = Holdings(self.sqs, self.request_url, claims, visibility_timeout)
        keyring = Keyring(self.dynamodb, claim_table)
        self.handler = BundleHandler(self.sqs, self.dynamodb, request_queue, self.request_url, claim_table,
                                     claims, self.held, keyring, identity)
        self.control = ControlQueue(self.sqs, control_topic, identity, keyring)
        # Schedulers size bundles by it.
        record_slots(self.dynamodb, claim_table, queue_name(identity), threads)
        self.threads = threads
        self.idle_timeout = idle_timeout

    def request_stop(self) -> None:
        """What a stop signal asks (its handler calls this: it only sets flags, as logging or an AWS
        call there could wait forever on a lock the interrupted code holds): the first, to take no
        new bundle; the next, or one while the worker drains already, to stop at once."""
        if self._stop_asked.is_set() or self.stopping.is_set():
            self._kill_asked.set()
        else:  # at once: the receiving thread must hand back what the poll in flight brings
            self._stop_asked.set()
            self.stopping.set()

    def run(self) -> int:
        """Receive and run bundles until a stop is requested or the worker has been idle too long,
        then leave; the calling (main) thread acts on the stop requests meanwhile, until the end.

        The exit status: 0, or 1 if the worker failed.
        """
        log.info("worker %s: %d threads on %s", self.identity, self.threads, self.request_url)
        threading.Thread(target=self.held.keep_leases, args=(self.exiting, self.handler.marked_cancelled),
                         name="cloudkon-leases", daemon=True).start()
        threading.Thread(target=self._follow_control, name="cloudkon-control", daemon=True).start()
        if self.instance is not None:  # on a spot instance, leave on its interruption notice
            threading.Thread(target=watch_interruption, args=(self._stop_now, self.exiting),
                             name="cloudkon-spot", daemon=True).start()
        done: concurrent.futures.Future[int] = concurrent.futures.Future()
        threading.Thread(target=self._receive_then_leave, args=(done,), name="cloudkon-receive",
                         daemon=True).start()
        while True:
            try:
                return done.result(STOP_CHECK_SECONDS)
            except concurrent.futures.TimeoutError:
                self._act_on_stop_requests()

    def _act_on_stop_requests(self) -> None:
        """Do what the flags set since the last look ask (in the main thread)."""
        if self._kill_asked.is_set():
            kill_running_tasks()
            try:
                self.control.close()  # best effort: no queue left behind
            finally:
                os._exit(1)
        if self._shutdown_asked.is_set():
            self._shut_down()
        if self._stop_asked.is_set() and not self._stop_told:
            # The long poll in flight is not left: what SQS gives it would wait out the visibility
            # timeout; it is handed back when the poll ends.
            log.info("stopping: finishing the bundles held, handing back what the poll in flight "
                     "brings, within %d s (signal again to stop now)", aws.SQS_MAX_WAIT_SECONDS)
            self._stop_told = True

    def _receive_then_leave(self, done: concurrent.futures.Future[int]) -> None:
        """Receive until stopped or idle, then leave (retiring if idle or drained): the exit status
        in ``done``, or what went wrong, for the main thread to raise."""
        try:
            done.set_result(self._receive_and_leave())
        except BaseException as exc:
            done.set_exception(exc)

    def _receive_and_leave(self) -> int:
        status = 0
        try:
            idle = self._receive()
        except CloudKonError as exc:
            log.error("%s", exc)
            idle, status = False, 1
        except Exception:  # whatever went wrong, leave no control queue behind
            log.exception("worker failed")
            idle, status = False, 1
        try:
            self.leave(retire=idle or self.held.leaving == "drain")
        except CloudKonError as exc:
            log.error("%s", exc)
            return 1
        return status

    def _receive(self) -> bool:
        """Hand what the request queue brings to the pool until a stop is requested or the worker
        has been idle too long (True then); wait for the pool to finish."""
        failures, outage = 0, Outage("receiving bundles", RETRY_SECONDS, log)
        with concurrent.futures.ThreadPoolExecutor(self.threads) as pool:
            while not self.stopping.is_set():
                free = self.threads - self.held.count()
                if free <= 0:
                    time.sleep(0.05)
                    continue
                idle_left = self._idle_left()
                if idle_left is not None and idle_left <= 0:
                    if self.held.count():  # messages still being looked at: one may be a bundle to run
                        time.sleep(0.05)
                        continue
                    log.info("idle for %g s: exiting", self.idle_timeout)
                    return True
                try:
                    messages = aws.receive_messages(self.sqs, self.request_url, free, self._poll_seconds())
                    failures = 0
                    outage.ended()
                except BackendError as exc:
                    failures = 0 if isinstance(exc, TransientAWSError) else failures + 1
                    if failures >= MAX_RECEIVE_FAILURES:
                        raise
                    self.stopping.wait(outage.failed(exc))
                    continue
                if self.stopping.is_set():  # a drain or a stop signal came during the long poll
                    if messages:
                        log.info("handing back %d message(s) of the last poll", len(messages))
                    self.held.hand_back([(message["ReceiptHandle"], "") for message in messages])
                    break
                wait = self._poll_seconds()
                if not messages and self._economizing() and wait:  # long idle: the control queue's turn
                    self._poll_control(wait)
                for message in messages:
                    if self.held.receive(message):  # not one whose bundle runs here already
                        pool.submit(self.handler.handle, message)
        return False

    def _economizing(self) -> bool:
        """Idle for ``economize_after`` seconds: one long poll at a time, the queues in turn."""
        return not self.held.busy.is_set() and time.monotonic() - self.held.last_work >= self.economize_after

    def _poll_seconds(self) -> int:
        """How long the next long poll may wait: SQS's longest, cut short by an idle exit due sooner.
        While a bundle runs, by the exit that would be due were it to end now: a poll cannot be cut
        short, so a worker whose last bundle ends mid-poll would otherwise stay up to a whole long
        poll (20 s paid) past its keep time; at least a second then, not a loop of empty polls."""
        if self.idle_timeout is None:
            return aws.SQS_MAX_WAIT_SECONDS
        now = time.monotonic()
        running = self.held.runs_any()
        left = self._idle_exit(now if running else self.held.last_work, self.idle_timeout) - now
        return max(1 if running else 0, min(aws.SQS_MAX_WAIT_SECONDS, math.ceil(left)))

    def _idle_left(self) -> float | None:
        """Seconds left before an idle exit, counted from the last bundle run: messages refused,
        skipped or deferred are no work, or one poison message redelivered would keep a fleet up."""
        if self.idle_timeout is None or self.held.runs_any():
            return None
        return self._idle_exit(self.held.last_work, self.idle_timeout) - time.monotonic()

    def _idle_exit(self, last_work: float, idle_timeout: float) -> float:
        """When an idle worker whose last work ended at ``last_work`` (monotonic) leaves."""
        # An EC2 worker follows the fleet's policy (fleetpolicy): the keep time its scheduler set,
        # and never before its billed minimum ends.
        keep, paid_until = (idle_timeout, 0.0) if self.instance is None else \
            self.instance.idle_rule(idle_timeout)
        return retire_at(last_work, keep, paid_until)

    def _follow_control(self) -> None:
        """Obey the control messages of the fleet's topic (runs in a thread for the worker's life;
        while the worker economizes, the receiving thread polls the control queue instead)."""
        while not self.exiting.is_set():
            if self._economizing():
                self.held.busy.wait(aws.SQS_MAX_WAIT_SECONDS)  # until work comes back
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
            if isinstance(exc, QueueGone):  # deleted under us: without it, cancels go unheard
                self._reopen_control()
            return
        self._control_outage.ended()
        for message in messages:
            if message["type"] == "cancel":
                log.info("job %s cancelled: stopping its tasks", message["job"])
                self.held.cancel(message["job"])
            elif message["type"] == "drain":
                self._drain()
            elif message["type"] == "shutdown":
                self._stop_now("shutdown: stopping now; the bundles held go back to the queue")
            else:
                log.error("ignoring a control message of type %r", message["type"])

    def _stop_now(self, why: str) -> None:
        """Leave at once (a shutdown, a spot interruption notice): no result is sent from now on; the
        main thread hands the bundles held back, kills their tasks and retires."""
        log.warning("%s", why)
        self.held.leave("shutdown")
        self.stopping.set()
        self._shutdown_asked.set()

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
        self.held.leave("drain")
        # The receiving thread sees it when its long poll ends (what that poll brings goes back to
        # the queue at once), then waits for the pool.
        self.stopping.set()

    def _shut_down(self) -> None:
        """Stop at once (in the main thread): hand the bundles held back to the queue, kill their
        tasks, retire, exit."""
        try:
            held = self.held.leave("shutdown")
            log.info("handing back %d message(s) held", len(held))
            self.held.hand_back(held)
            kill_running_tasks()
            self.leave(retire=True)
        finally:
            os._exit(0)

    def leave(self, retire: bool) -> None:
        """Unsubscribe from control, log the API calls made, and (on EC2, if ``retire``) terminate."""
        self.stopping.set()
        self.exiting.set()
        self.control.close()
        aws.log_api_calls()  # now: the instance may be gone a moment after it retires
        if retire and self.instance is not None:
            self.instance.retire(self.dynamodb)
