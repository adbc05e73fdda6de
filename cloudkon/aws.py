"""AWS plumbing shared by the scheduler's SQS backend and the remote workers.

Owns the boto3 clients (with retries), the one place where boto errors become
ours (``aws_errors``: typed as errors.py's AWSError subclasses, so that no caller
reads AWS error codes), conditional writes whose refusal is an answer (``write_if``),
creating or reusing queues and tables, and packing messages into SQS batches.  What
the messages mean is sqsmessages'/sqsbackend's and remoteworker's business; what the
claim table holds is claims.py's.

AWS behaviour relied on:
  - boto3 finds credentials, region and endpoint by its standard chain
    (``AWS_REGION``/``AWS_DEFAULT_REGION``, profiles, ``AWS_ENDPOINT_URL``); there is
    no emulator switch here.
  - An SQS message body is at most 262,144 bytes (256 KiB: the classic limit, still
    the default of queues created elsewhere), and so is a whole SendMessageBatch;
    a batch holds at most 10 entries, as do ReceiveMessage and DeleteMessageBatch.
  - A received message stays invisible for the queue's visibility timeout, which
    ChangeMessageVisibility extends; a message not deleted in time is delivered
    again (SQS delivers at least once, so duplicates happen anyway).
  - DynamoDB conditional writes are atomic: of two workers claiming one bundle, one wins.
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import os
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Executor
from typing import Any

import boto3
import botocore.exceptions
from botocore.config import Config

from cloudkon.defaults import DEFAULT_VISIBILITY_TIMEOUT, RETENTION_SECONDS
from cloudkon.errors import (
    AlreadyExists,
    AWSError,
    BackendError,
    CapacityRefused,
    ConditionFailed,
    QueueGone,
    ResourceNotFound,
    TransientAWSError,
)

log = logging.getLogger("cloudkon.aws")

MAX_SQS_MESSAGE_BYTES = 262_144
SQS_MAX_BATCH = 10
# The longest long poll SQS allows.
SQS_MAX_WAIT_SECONDS = 20

RESPONSE_QUEUE_PREFIX = "cloudkon-responses-"
# Where workers put request messages they refuse (not signed by the fleet, or no valid bundle), next
# to the request queue; SQS moves there too a message received this many times and never deleted
# (a bundle that makes every worker fail): a few retries for a worker lost mid-bundle, not a
# redelivery every visibility timeout for the queue's whole retention.
DEAD_LETTER_SUFFIX = "-dead"
MAX_RECEIVES = 5
# SQS's limit on a queue name.
SQS_MAX_QUEUE_NAME = 80

_calls: collections.Counter[str] = collections.Counter()
_calls_lock = threading.Lock()

# A call waits this long for a connection, and this long for an answer once sent (past the
# longest long poll): an endpoint that takes connections and never answers (a network
# partition) costs a try this long, not boto's default of a minute for each.
CONNECT_TIMEOUT_SECONDS = 5
READ_TIMEOUT_SECONDS = SQS_MAX_WAIT_SECONDS + 10
_RETRIES = Config(retries={"max_attempts": 8, "mode": "standard"}, max_pool_connections=32,
                  connect_timeout=CONNECT_TIMEOUT_SECONDS, read_timeout=READ_TIMEOUT_SECONDS)


@contextlib.contextmanager
def aws_errors(action: str) -> Iterator[None]:
    """Turn any boto error raised inside into a BackendError saying what failed: the one place
    where boto's errors become ours, typed by what callers act on (errors.AWSError's subclasses)."""
    try:
        yield
    except botocore.exceptions.NoCredentialsError:
        raise BackendError(f"{action}: no AWS credentials found (set AWS_PROFILE, or "
                           "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or use an instance role)") from None
    except botocore.exceptions.NoRegionError:
        raise BackendError(f"{action}: no AWS region set (set AWS_REGION or AWS_DEFAULT_REGION)") from None
    except botocore.exceptions.ClientError as exc:
        error = exc.response.get("Error", {})
        code = error.get("Code")
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        raise _error_type(code or "", status)(
            f"{action}: {code or 'error'}: {error.get('Message', exc)}", code) from exc
    except (botocore.exceptions.ConnectionError, botocore.exceptions.HTTPClientError) as exc:
        # No answer from AWS (unreachable, reset, timed out): it may come back.
        raise TransientAWSError(f"{action}: {exc}") from exc
    except botocore.exceptions.BotoCoreError as exc:
        raise AWSError(f"{action}: {exc}") from exc


def _error_type(code: str, status: int) -> type[AWSError]:
    """The AWSError subclass for AWS error ``code`` answered with HTTP ``status``."""
    if code in _CAPACITY_CODES:  # before the status: EC2 answers some with a 500, yet they last
        return CapacityRefused
    if status >= 500 or "Throttl" in code or "QueueDeletedRecently" in code:
        return TransientAWSError
    if "NonExistentQueue" in code or code == "QueueDoesNotExist":
        return QueueGone
    return _ERROR_TYPES.get(code, AWSError)


# EC2's refusals to launch that another instance type, subnet or market may not meet (capacity.py).
_CAPACITY_CODES = frozenset((
    "InsufficientInstanceCapacity", "InsufficientCapacity", "InsufficientHostCapacity",
    "InsufficientFreeAddressesInSubnet", "InstanceLimitExceeded", "VcpuLimitExceeded", "Unsupported",
    "MaxSpotInstanceCountExceeded", "SpotMaxPriceTooLow", "InsufficientSpotCapacity"))

# The AWS error codes callers act on, by the error they become.
_ERROR_TYPES: dict[str, type[AWSError]] = {
    "ConditionalCheckFailedException": ConditionFailed,
    "ResourceNotFoundException": ResourceNotFound,  # DynamoDB: no such table
    "NotFound": ResourceNotFound,  # SNS: no such subscription
    "NoSuchBucket": ResourceNotFound,
    "NoSuchLifecycleConfiguration": ResourceNotFound,
    "ResourceInUseException": AlreadyExists,  # DynamoDB: the table exists (or is being made)
    "BucketAlreadyOwnedByYou": AlreadyExists,
    # SQS: made meanwhile by another process (a worker, another scheduler) with other attributes.
    "QueueAlreadyExists": AlreadyExists,
    "QueueNameExists": AlreadyExists,
}


def write_if(action: str, write: Callable[..., Any], **request: Any) -> bool:
    """``write(**request)``, a DynamoDB conditional write: True if it was made, False if its
    condition did not hold (another wrote first: for the caller, an answer, not a failure)."""
    try:
        with aws_errors(action):
            write(**request)
    except ConditionFailed:
        return False
    return True


def clients() -> tuple[Any, Any]:
    """(sqs, dynamodb) clients from boto3's standard configuration."""
    return client("sqs"), client("dynamodb")


def client(service: str, region: str | None = None, attempts: int | None = None) -> Any:
    """A boto3 client with retries (``attempts`` tries a call, if given) and call counting, from
    boto3's standard configuration."""
    config = _RETRIES if attempts is None else _RETRIES.merge(
        Config(retries={"total_max_attempts": attempts, "mode": "standard"}))
    with aws_errors(f"creating an AWS {service} client"):
        # boto3 reads AWS_DEFAULT_REGION; other AWS SDKs and the console's docs use AWS_REGION.
        session = boto3.session.Session(region_name=region or os.environ.get("AWS_REGION") or None)
        session.events.register("before-call", _count_call)
        return session.client(service, config=config)


def _count_call(model: Any, **_: Any) -> None:
    with _calls_lock:
        _calls[f"{model.service_model.service_name}.{model.name}"] += 1


def call_counts() -> dict[str, int]:
    """The AWS API calls this process has made so far, by ``service.Operation`` (costs.py prices them)."""
    with _calls_lock:
        return dict(_calls)


def log_api_calls() -> None:
    """Log how many AWS API calls this process made, by operation (what remote mode costs)."""
    counts = call_counts()
    detail = ", ".join(f"{name} {n}" for name, n in sorted(counts.items()))
    log.info("AWS API calls: %d (%s)", sum(counts.values()), detail or "none")


def queue_url(sqs: Any, name: str) -> str | None:
    """The URL of queue ``name``, None if there is no such queue."""
    try:
        with aws_errors(f"finding queue {name}"):
            return sqs.get_queue_url(QueueName=name)["QueueUrl"]
    except QueueGone:
        return None


def ensure_queue(sqs: Any, name: str, visibility_timeout: int = DEFAULT_VISIBILITY_TIMEOUT) -> str:
    """The URL of queue ``name``, created if missing (an existing queue keeps its settings)."""
    url = queue_url(sqs, name)
    if url is not None:
        return url
    return _create_queue(sqs, name, {"VisibilityTimeout": str(visibility_timeout),
                                     "MessageRetentionPeriod": str(RETENTION_SECONDS)})


def _create_queue(sqs: Any, name: str, attributes: dict[str, str]) -> str:
    """Create queue ``name``; if another process made it meanwhile (with attributes of its own:
    SQS then refuses ours), the URL of theirs: the first one made keeps its settings."""
    log.info("creating queue %s", name)
    try:
        with aws_errors(f"creating queue {name}"):
            return sqs.create_queue(QueueName=name, Attributes=attributes)["QueueUrl"]
    except AlreadyExists:
        with aws_errors(f"finding queue {name}"):
            return sqs.get_queue_url(QueueName=name)["QueueUrl"]


def ensure_request_queue(sqs: Any, name: str, visibility_timeout: int = DEFAULT_VISIBILITY_TIMEOUT) -> str:
    """The URL of request queue ``name``, created if missing, with a redrive policy to its dead-letter
    queue (given to an existing queue that has none: one read at start)."""
    url = queue_url(sqs, name)
    with aws_errors(f"finding queue {name}"):
        if url is not None and "RedrivePolicy" in sqs.get_queue_attributes(
                QueueUrl=url, AttributeNames=["RedrivePolicy"]).get("Attributes", {}):
            return url
        dead = dead_letter_queue(name)
        dead_arn = sqs.get_queue_attributes(QueueUrl=ensure_queue(sqs, dead), AttributeNames=["QueueArn"])[
            "Attributes"]["QueueArn"]
        redrive = json.dumps({"maxReceiveCount": MAX_RECEIVES, "deadLetterTargetArn": dead_arn})
        if url is not None:
            sqs.set_queue_attributes(QueueUrl=url, Attributes={"RedrivePolicy": redrive})
            log.info("queue %s: messages received %d times go to %s", name, MAX_RECEIVES, dead)
            return url
    return _create_queue(sqs, name, {"VisibilityTimeout": str(visibility_timeout),
                                     "MessageRetentionPeriod": str(RETENTION_SECONDS),
                                     "RedrivePolicy": redrive})


def dead_letter_queue(request_queue: str) -> str:
    """The name of the queue where refused messages of ``request_queue`` go."""
    return request_queue[:SQS_MAX_QUEUE_NAME - len(DEAD_LETTER_SUFFIX)] + DEAD_LETTER_SUFFIX


def ensure_table(dynamodb: Any, name: str, keys: list[tuple[str, str]],
                 ttl_attribute: str | None = None) -> None:
    """Create an on-demand table with string ``keys`` [(attribute, HASH|RANGE)] if it is missing."""
    try:
        with aws_errors(f"finding table {name}"):
            dynamodb.describe_table(TableName=name)
        return
    except ResourceNotFound:
        pass
    log.info("creating table %s", name)
    try:
        with aws_errors(f"creating table {name}"):
            dynamodb.create_table(
                TableName=name, BillingMode="PAY_PER_REQUEST",
                AttributeDefinitions=[{"AttributeName": key, "AttributeType": "S"} for key, _ in keys],
                KeySchema=[{"AttributeName": key, "KeyType": kind} for key, kind in keys])
    except AlreadyExists:
        pass  # another scheduler or worker created it meanwhile
    with aws_errors(f"creating table {name}"):
        dynamodb.get_waiter("table_exists").wait(TableName=name)
        if ttl_attribute:
            dynamodb.update_time_to_live(TableName=name, TimeToLiveSpecification={
                "Enabled": True, "AttributeName": ttl_attribute})


def send_messages(sqs: Any, queue_url: str, bodies: list[str], calls: Executor | None = None) -> None:
    """Send message bodies (each already within MAX_SQS_MESSAGE_BYTES) in as few batches as fit,
    the batches at once through ``calls`` if given."""
    _each(calls, _send_batch, sqs, queue_url, list(_batches(bodies)))


def _each(calls: Executor | None, call: Callable[[Any, str, list[str]], None], sqs: Any, queue_url: str,
          parts: list[list[str]]) -> None:
    """``call(sqs, queue_url, part)`` for each part: one after another, or at once through ``calls``."""
    if calls is None or len(parts) < 2:
        for part in parts:
            call(sqs, queue_url, part)
        return
    for done in [calls.submit(call, sqs, queue_url, part) for part in parts]:
        done.result()


def _send_batch(sqs: Any, queue_url: str, batch: list[str]) -> None:
    entries = [{"Id": str(i), "MessageBody": body} for i, body in enumerate(batch)]
    with aws_errors("sending to SQS"):
        failed = sqs.send_message_batch(QueueUrl=queue_url, Entries=entries).get("Failed", [])
        if failed:  # throttled or internal errors: once more, only those
            retry = [entries[int(f["Id"])] for f in failed]
            failed = sqs.send_message_batch(QueueUrl=queue_url, Entries=retry).get("Failed", [])
    if failed:
        raise BackendError(f"sending to SQS: {len(failed)} messages refused: {failed[0].get('Message')}")


def _batches(bodies: list[str]) -> Iterator[list[str]]:
    batch: list[str] = []
    size = 0
    for body in bodies:
        if len(body) > MAX_SQS_MESSAGE_BYTES:
            raise BackendError(f"an SQS message of {len(body)} bytes is over {MAX_SQS_MESSAGE_BYTES}")
        if batch and (len(batch) == SQS_MAX_BATCH or size + len(body) > MAX_SQS_MESSAGE_BYTES):
            yield batch
            batch, size = [], 0
        batch.append(body)
        size += len(body)
    if batch:
        yield batch


def receive_messages(sqs: Any, queue_url: str, max_messages: int, wait_seconds: int) -> list[dict]:
    with aws_errors("receiving from SQS"):
        return sqs.receive_message(
            QueueUrl=queue_url, MaxNumberOfMessages=max(1, min(max_messages, SQS_MAX_BATCH)),
            WaitTimeSeconds=max(0, min(wait_seconds, SQS_MAX_WAIT_SECONDS))).get("Messages", [])


def delete_messages(sqs: Any, queue_url: str, receipt_handles: list[str],
                    calls: Executor | None = None) -> None:
    """Delete messages, ten to a call, the calls at once through ``calls`` if given."""
    _each(calls, _delete_batch, sqs, queue_url, [receipt_handles[start:start + SQS_MAX_BATCH]
                                                 for start in range(0, len(receipt_handles), SQS_MAX_BATCH)])


def _delete_batch(sqs: Any, queue_url: str, receipt_handles: list[str]) -> None:
    entries = [{"Id": str(i), "ReceiptHandle": handle} for i, handle in enumerate(receipt_handles)]
    with aws_errors("deleting from SQS"):
        failed = sqs.delete_message_batch(QueueUrl=queue_url, Entries=entries).get("Failed", [])
    for failure in failed:  # a stale receipt: the message comes back and is skipped as done
        log.warning("could not delete a message: %s", failure.get("Message"))
