"""The control channel: a scheduler's word to every remote worker, and durable cancels.

Owns the SNS topic of a fleet's control messages, each worker's own small SQS queue
subscribed to it, and the cancellation marks in the claim table::

    scheduler --publish--> SNS topic --+--> worker queue cloudkon-control-<identity> --> worker 1
                                       +--> worker queue cloudkon-control-<identity> --> worker 2

Messages are protocol bodies: ``cancel`` (a job), ``drain`` (finish what you hold, take
nothing new, exit) and ``shutdown`` (stop now; the request queue redelivers what was
held).  SNS is fast but not durable for a worker that is not subscribed yet or lost
its queue, so a cancel is first written to the claim table under the job's id; a
worker reads that mark before it runs a bundle and again while it runs one.

AWS behaviour relied on: CreateTopic with an existing name returns that topic; an SQS
queue accepts SNS deliveries only if its policy allows the topic; with
RawMessageDelivery the message arrives as published.
"""

from __future__ import annotations

import json
import logging
import re
import time
from typing import Any

import aws
import protocol
from errors import BackendError, MalformedMessage

log = logging.getLogger("cloudkon.control")

DEFAULT_CONTROL_TOPIC = "cloudkon-control"
CONTROL_QUEUE_PREFIX = "cloudkon-control-"
# Cancellation marks outlive any bundle of their job that may still be queued.
CANCEL_RETENTION_SECONDS = 4 * 24 * 3600
_CANCELLED = "cancelled"


def ensure_topic(sns: Any, name: str) -> str:
    """The ARN of topic ``name``, created if missing."""
    with aws.aws_errors(f"finding topic {name}"):
        return sns.create_topic(Name=name)["TopicArn"]


def mark_cancelled(dynamodb: Any, claim_table: str, job: str) -> None:
    """Record durably that ``job`` is cancelled (its item in the claim table)."""
    with aws.aws_errors(f"recording the cancel of job {job}"):
        dynamodb.put_item(TableName=claim_table, Item={
            "claim": {"S": job}, "state": {"S": _CANCELLED},
            "expires_at": {"N": str(int(time.time() + CANCEL_RETENTION_SECONDS))}})


def cancelled_jobs(dynamodb: Any, claim_table: str, jobs: set[str]) -> set[str]:
    """Which of ``jobs`` are marked cancelled (strongly consistent: a cancel is never missed)."""
    found: set[str] = set()
    for job in jobs:
        with aws.aws_errors(f"reading the state of job {job}"):
            item = dynamodb.get_item(TableName=claim_table, Key={"claim": {"S": job}},
                                     ConsistentRead=True).get("Item", {})
        if item.get("state", {}).get("S") == _CANCELLED:
            found.add(job)
    return found


class ControlTopic:
    """The scheduler's side: publish control messages to every subscribed worker."""

    def __init__(self, name: str = DEFAULT_CONTROL_TOPIC) -> None:
        self.name = name
        self.sns = aws.client("sns")
        self.arn = ensure_topic(self.sns, name)

    def publish(self, message: dict[str, Any]) -> None:
        """Send ``message`` to every worker; a subscription whose queue is gone is removed first."""
        body = protocol.encode_body(message).decode("ascii")
        try:
            with aws.aws_errors(f"publishing {message['type']} on {self.name}"):
                self.sns.publish(TopicArn=self.arn, Message=body)
        except BackendError as exc:
            if not aws.is_missing_queue(exc) or not self.prune():
                raise
            with aws.aws_errors(f"publishing {message['type']} on {self.name}"):
                self.sns.publish(TopicArn=self.arn, Message=body)

    def subscribers(self) -> list[dict[str, Any]]:
        with aws.aws_errors(f"listing the subscriptions of {self.name}"):
            pages = self.sns.get_paginator("list_subscriptions_by_topic").paginate(TopicArn=self.arn)
            return [sub for page in pages for sub in page["Subscriptions"]]

    def prune(self) -> int:
        """Unsubscribe the queues that no longer exist (workers killed before they cleaned up)."""
        sqs = aws.client("sqs")
        pruned = 0
        for subscription in self.subscribers():
            name = subscription["Endpoint"].rsplit(":", 1)[-1]  # the queue's ARN ends with its name
            try:
                with aws.aws_errors(f"finding queue {name}"):
                    sqs.get_queue_url(QueueName=name)
            except BackendError as exc:
                if not aws.is_missing_queue(exc):
                    raise
                with aws.aws_errors("removing a stale subscription"):
                    self.sns.unsubscribe(SubscriptionArn=subscription["SubscriptionArn"])
                pruned += 1
        if pruned:
            log.info("removed %d subscription(s) of workers gone without cleaning up", pruned)
        return pruned

    def stop_workers(self, how: str, timeout: float, poll_seconds: float = 1.0) -> bool:
        """Publish ``drain`` or ``shutdown``, then wait until no worker is subscribed; False on timeout."""
        self.prune()
        self.publish({"type": how})
        deadline = time.monotonic() + timeout
        while True:
            left = len(self.subscribers())
            if not left:
                log.info("every worker has left (%s)", how)
                return True
            if time.monotonic() >= deadline:
                log.error("%d worker(s) still subscribed after %g s", left, timeout)
                return False
            log.info("%s: waiting for %d worker(s) to leave", how, left)
            time.sleep(poll_seconds)

    def remove(self) -> None:
        """Delete the topic and the control queues of its workers left behind (cleanup)."""
        sqs = aws.client("sqs")
        for subscription in self.subscribers():
            name = subscription["Endpoint"].rsplit(":", 1)[-1]
            try:
                with aws.aws_errors(f"deleting queue {name}"):
                    sqs.delete_queue(QueueUrl=sqs.get_queue_url(QueueName=name)["QueueUrl"])
                log.info("deleted queue %s", name)
            except BackendError as exc:
                if not aws.is_missing_queue(exc):
                    raise
        with aws.aws_errors(f"deleting topic {self.name}"):
            self.sns.delete_topic(TopicArn=self.arn)
        log.info("deleted topic %s", self.arn)


class ControlQueue:
    """A worker's side: its own queue, subscribed to the topic while the worker runs."""

    def __init__(self, sqs: Any, topic: str, identity: str) -> None:
        self.sqs = sqs
        self.sns = aws.client("sns")
        topic_arn = ensure_topic(self.sns, topic)
        safe = re.sub(r"[^A-Za-z0-9_-]", "-", identity)
        name = (CONTROL_QUEUE_PREFIX + safe)[:80]  # SQS queue names: 80 characters of these
        self.url = aws.ensure_queue(sqs, name)
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
        log.info("control messages on %s", self.url)

    def receive(self, wait_seconds: int) -> list[dict[str, Any]]:
        """Control messages that arrived within ``wait_seconds`` (deleted once read)."""
        messages = aws.receive_messages(self.sqs, self.url, aws.SQS_MAX_BATCH, wait_seconds)
        aws.delete_messages(self.sqs, self.url, [m["ReceiptHandle"] for m in messages])
        decoded = []
        for message in messages:
            try:
                decoded.append(protocol.decode(message["Body"].encode()))
            except MalformedMessage as exc:
                log.error("ignoring a malformed control message: %s", exc)
        return decoded

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
