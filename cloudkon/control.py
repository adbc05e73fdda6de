"""The control channel: a scheduler's word to every remote worker, and durable cancels.

Owns the SNS topic of a fleet's control messages and each worker's own small SQS queue
subscribed to it::

    scheduler --publish--> SNS topic --+--> worker queue cloudkon-control-<identity> --> worker 1
                                       +--> worker queue cloudkon-control-<identity> --> worker 2

Messages are protocol bodies: ``cancel`` (a job), ``drain`` (finish what you hold, take
nothing new, exit) and ``shutdown`` (stop now; the request queue redelivers what was
held), sealed with the publisher's key (signing.py): a worker ignores, with a log
line, any it cannot verify, so whoever may publish to the topic or send to a worker's
queue cannot stop the fleet without the key.  SNS is fast but not durable for a
worker that is not subscribed yet or lost its queue, so a cancel is first marked in
the claim table (claims.py); a worker reads that mark before it runs a bundle and
again while it runs one.

The subscriptions also tell a scheduler who is there: each worker records its thread
count in the claim table by its control queue (claims.py), and ``ControlTopic.slots``
adds up those of the workers subscribed (one listing, one batch read per 100 workers),
so that bundles are sized and kept in flight for the workers that are there.

A drain or shutdown must not trust the subscriptions alone: a topic deleted (and made
again by the next publisher) has none.  The workers of a topic are the control queues
that exist and whose policy lets that topic write to them (``ControlTopic.registered``):
a worker makes its queue at start and deletes it when it leaves, and its queue outlives
the topic.  One whose subscription is gone gets the message in its queue directly, and
resubscribes by itself within SUBSCRIPTION_CHECK_SECONDS (``ControlQueue.receive``).

AWS behaviour relied on: CreateTopic with an existing name returns that topic; an SQS
queue accepts SNS deliveries only if its policy allows the topic; with
RawMessageDelivery the message arrives as published.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
from typing import Any

from cloudkon import aws, protocol
from cloudkon.claims import read_slots
from cloudkon.defaults import DEFAULT_WORKER_THREADS
from cloudkon.errors import BackendError, QueueGone, ResourceNotFound
from cloudkon.signing import Keyring, Signer
from cloudkon.sqsmessages import Refused, take_sealed

log = logging.getLogger("cloudkon.control")

CONTROL_QUEUE_PREFIX = "cloudkon-control-"
# A busy worker takes a control message within a second, an idle one within one long poll (it
# polls its control queue in turn with the request queue, to halve what idling costs); one whose
# queue still holds the message after this long is gone without cleaning up.
UNTAKEN_SECONDS = aws.SQS_MAX_WAIT_SECONDS + 10.0
# A worker checks this often that its subscription still exists (the topic may have been deleted):
# a call every 5 minutes, a fifteenth of what an idle worker's polls cost.  Until it subscribes
# again it misses broadcast cancels only (it reads a running job's durable mark every third of
# its lease), as drain and shutdown reach it in its queue directly.
SUBSCRIPTION_CHECK_SECONDS = 300.0


def queue_name(identity: str) -> str:
    """The control queue of the worker ``identity``: readable, and unique even when shortened."""
    safe = re.sub(r"[^A-Za-z0-9_-]", "-", identity)[:50]
    return f"{CONTROL_QUEUE_PREFIX}{safe}-{hashlib.sha256(identity.encode()).hexdigest()[:8]}"


def ensure_topic(sns: Any, name: str) -> str:
    """The ARN of topic ``name``, created if missing."""
    with aws.aws_errors(f"finding topic {name}"):
        return sns.create_topic(Name=name)["TopicArn"]


class ControlTopic:
    """The scheduler's side: publish control messages to every subscribed worker."""

    def __init__(self, name: str, signer: Signer) -> None:
        self.name = name
        self._signer = signer
        self.sns = aws.client("sns")
        self.arn = ensure_topic(self.sns, name)

    def _seal(self, message: dict[str, Any]) -> str:
        """``message`` as workers read it, from the topic or sent to their queues alike (raw delivery)."""
        return self._signer.sign(protocol.encode_body(message).decode("ascii"))

    def publish(self, message: dict[str, Any]) -> None:
        """Send ``message`` to every worker; a subscription whose queue is gone is removed first."""
        body = self._seal(message)
        try:
            with aws.aws_errors(f"publishing {message['type']} on {self.name}"):
                self.sns.publish(TopicArn=self.arn, Message=body)
        except QueueGone:
            if not self.prune():
                raise
            with aws.aws_errors(f"publishing {message['type']} on {self.name}"):
                self.sns.publish(TopicArn=self.arn, Message=body)

    def subscribers(self) -> list[dict[str, Any]]:
        with aws.aws_errors(f"listing the subscriptions of {self.name}"):
            pages = self.sns.get_paginator("list_subscriptions_by_topic").paginate(TopicArn=self.arn)
            return [sub for page in pages for sub in page["Subscriptions"]]

    def slots(self, dynamodb: Any, claim_table: str) -> int:
        """Bundles the workers subscribed now run at once: the sum of their thread counts."""
        names = [_queue_of(sub) for sub in self.subscribers()
                 if sub["Protocol"] == "sqs" and CONTROL_QUEUE_PREFIX in sub["Endpoint"]]
        threads = read_slots(dynamodb, claim_table, names)
        # A worker that recorded no thread count (yet) is taken to run worker.py's default.
        return sum(threads.get(name, DEFAULT_WORKER_THREADS) for name in names)

    def prune(self) -> int:
        """Unsubscribe the queues that no longer exist (workers killed before they cleaned up)."""
        sqs = aws.client("sqs")
        pruned = 0
        for subscription in self.subscribers():
            if aws.queue_url(sqs, _queue_of(subscription)) is None:
                with aws.aws_errors("removing a stale subscription"):
                    self.sns.unsubscribe(SubscriptionArn=subscription["SubscriptionArn"])
                pruned += 1
        if pruned:
            log.info("removed %d subscription(s) of workers gone without cleaning up", pruned)
        return pruned

    def registered(self, sqs: Any) -> dict[str, str]:
        """The control queues of this topic's workers, name -> URL: every worker that runs, whether
        its subscription still exists or not (one listing, one read per control queue)."""
        found = {}
        for name, url in _control_queues(sqs).items():
            try:
                with aws.aws_errors(f"reading the policy of queue {name}"):
                    policy = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["Policy"])[
                        "Attributes"].get("Policy", "{}")
            except QueueGone:  # its worker left meanwhile
                continue
            if _admits(policy, self.arn):
                found[name] = url
        return found

    def stop_workers(self, how: str, timeout: float, poll_seconds: float = 1.0) -> bool:
        """Tell every registered worker to ``how`` (drain or shutdown), then wait until each has
        left; False on timeout.

        A worker leaves by deleting its control queue.  One whose subscription is gone gets the
        message in its queue directly.  One killed without cleaning up leaves a queue that never
        takes the message: after UNTAKEN_SECONDS it is deleted and no longer waited for.
        """
        self.prune()
        sqs = aws.client("sqs")
        waiting = self.registered(sqs)
        subscriptions = {_queue_of(sub): sub["SubscriptionArn"] for sub in self.subscribers()}
        body = self._seal({"type": how})
        self.publish({"type": how})
        unsubscribed = [name for name in waiting if name not in subscriptions]
        for name in unsubscribed:
            try:
                aws.send_messages(sqs, waiting[name], [body])
            except QueueGone:
                pass  # its worker left meanwhile
        if unsubscribed:
            log.warning("%d worker(s) not subscribed to %s (was it deleted?): %s sent to their queues",
                        len(unsubscribed), self.name, how)
        published = time.monotonic()
        while True:
            present = _control_queues(sqs)
            waiting = {name: url for name, url in waiting.items() if name in present}
            if time.monotonic() - published > UNTAKEN_SECONDS:
                for name in list(waiting):
                    if self._untaken(sqs, name):
                        log.warning("%s did not take the %s message in %g s: its worker is gone; "
                                    "removing the queue", name, how, UNTAKEN_SECONDS)
                        self._forget(sqs, subscriptions.get(name), name)
                        del waiting[name]
            if not waiting:
                log.info("every worker has left (%s)", how)
                return True
            if time.monotonic() - published >= timeout:
                log.error("%d worker(s) still registered after %g s", len(waiting), timeout)
                return False
            log.info("%s: waiting for %d worker(s) to leave", how, len(waiting))
            time.sleep(poll_seconds)

    @staticmethod
    def _untaken(sqs: Any, name: str) -> bool:
        """True if queue ``name`` still holds a message (False if it is gone).

        A live worker deletes a control message as soon as it receives it; a message
        received but never deleted (by a long poll its dead worker left open) counts too.
        """
        url = aws.queue_url(sqs, name)
        try:
            if url is None:
                return False
            with aws.aws_errors(f"reading queue {name}"):
                attributes = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=[
                    "ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"])["Attributes"]
        except QueueGone:  # deleted meanwhile
            return False
        return sum(int(count) for count in attributes.values()) > 0

    def _forget(self, sqs: Any, subscription: str | None, name: str) -> None:
        delete_queue(sqs, name)
        if subscription is not None:
            with aws.aws_errors("removing a stale subscription"):
                self.sns.unsubscribe(SubscriptionArn=subscription)

    def remove(self) -> None:
        """Delete the topic and the control queues of its workers left behind (cleanup)."""
        sqs = aws.client("sqs")
        for subscription in self.subscribers():
            delete_queue(sqs, _queue_of(subscription))
        with aws.aws_errors(f"deleting topic {self.name}"):
            self.sns.delete_topic(TopicArn=self.arn)
        log.info("deleted topic %s", self.arn)


def _control_queues(sqs: Any) -> dict[str, str]:
    """Every control queue of the account and region (of any topic), name -> URL."""
    with aws.aws_errors("listing the control queues"):
        pages = sqs.get_paginator("list_queues").paginate(QueueNamePrefix=CONTROL_QUEUE_PREFIX)
        return {url.rsplit("/", 1)[-1]: url for page in pages for url in page.get("QueueUrls", [])}


def _admits(policy: str, topic_arn: str) -> bool:
    """True if a control queue's ``policy`` (as ControlQueue.open writes it) lets ``topic_arn`` send."""
    try:
        statements = json.loads(policy).get("Statement", [])
        return any(statement.get("Condition", {}).get("ArnEquals", {}).get("aws:SourceArn") == topic_arn
                   for statement in statements)
    except (ValueError, AttributeError):  # not a policy of ours
        return False


def _queue_of(subscription: dict[str, Any]) -> str:
    """The name of the queue a subscription delivers to (its ARN ends with the name)."""
    return subscription["Endpoint"].rsplit(":", 1)[-1]


def delete_queue(sqs: Any, name: str) -> None:
    """Delete queue ``name`` if it exists."""
    url = aws.queue_url(sqs, name)
    if url is None:
        return
    try:
        with aws.aws_errors(f"deleting queue {name}"):
            sqs.delete_queue(QueueUrl=url)
        log.info("deleted queue %s", name)
    except QueueGone:
        pass  # deleted meanwhile


class ControlQueue:
    """A worker's side: its own queue, subscribed to the topic while the worker runs."""

    def __init__(self, sqs: Any, topic: str, identity: str, keyring: Keyring) -> None:
        self.sqs = sqs
        self._keyring = keyring
        self.sns = aws.client("sns")
        self._topic = topic
        self._name = queue_name(identity)
        self.open()

    def open(self) -> None:
        """Create the queue and the topic, let the topic write to the queue, subscribe it (again, if
        either was deleted)."""
        sqs = self.sqs
        topic_arn = ensure_topic(self.sns, self._topic)
        self.url = aws.ensure_queue(sqs, self._name)
        with aws.aws_errors("subscribing to the control topic"):
            queue_arn = sqs.get_queue_attributes(QueueUrl=self.url, AttributeNames=["QueueArn"])[
                "Attributes"]["QueueArn"]
            sqs.set_queue_attributes(QueueUrl=self.url, Attributes={"Policy": json.dumps({
                "Version": "2012-10-17",
                "Statement": [{"Effect": "Allow", "Principal": {"Service": "sns.amazonaws.com"},
                               "Action": "sqs:SendMessage", "Resource": queue_arn,
                               "Condition": {"ArnEquals": {"aws:SourceArn": topic_arn}}}]})})
            self.subscription = self.sns.subscribe(
                TopicArn=topic_arn, Protocol="sqs", Endpoint=queue_arn,
                Attributes={"RawMessageDelivery": "true"}, ReturnSubscriptionArn=True)["SubscriptionArn"]
        self._next_check = time.monotonic() + SUBSCRIPTION_CHECK_SECONDS
        log.info("control messages on %s", self.url)

    def resubscribe_if_lost(self) -> bool:
        """Subscribe again if the subscription is gone (its topic was deleted); True if it was."""
        try:
            with aws.aws_errors("checking the subscription to the control topic"):
                self.sns.get_subscription_attributes(SubscriptionArn=self.subscription)
            return False
        except ResourceNotFound:
            pass
        log.warning("the subscription to control topic %s is gone: subscribing again", self._topic)
        self.open()
        return True

    def receive(self, wait_seconds: int) -> list[dict[str, Any]]:
        """Control messages that arrived within ``wait_seconds``, signed by the fleet (deleted once
        read; one whose key could not be read is left to come back); the subscription is checked
        first every SUBSCRIPTION_CHECK_SECONDS."""
        if time.monotonic() >= self._next_check:
            self._next_check = time.monotonic() + SUBSCRIPTION_CHECK_SECONDS
            self.resubscribe_if_lost()
        messages = aws.receive_messages(self.sqs, self.url, aws.SQS_MAX_BATCH, wait_seconds)
        return take_sealed(self.sqs, self.url, messages, self._keyring,
                           lambda body: protocol.decode(body.encode()), _ignore, "control message")

    def close(self) -> None:
        """Delete the queue and unsubscribe (each even if the other fails: the topic may be gone)."""
        for action, call in (("deleting the control queue", lambda: self.sqs.delete_queue(QueueUrl=self.url)),
                             ("leaving the control topic",
                              lambda: self.sns.unsubscribe(SubscriptionArn=self.subscription))):
            try:
                with aws.aws_errors(action):
                    call()
            except BackendError as exc:
                log.warning("%s", exc)


def _ignore(refused: list[Refused]) -> None:
    """Log control messages the fleet did not sign, or that hold no message (they are deleted)."""
    for message, reason in refused:
        log.error("ignoring control message %s: %s", message["MessageId"], reason)
