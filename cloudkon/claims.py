"""The claim table: bundle claims and their leases, cancel marks, the workers' thread counts.

Owns the layout of the DynamoDB table shared by a fleet's schedulers and workers (key
``claim``, a string; every item expires by ``expires_at``, kept defaults.RETENTION_SECONDS,
as long as a message may still come).  Its items, by key:

  ``<job>:<bundle>:<first task>``  a bundle's claim (``claim_key``): ``owner``, ``state``
                                   (``running`` or ``done``) and, while it runs, the end of
                                   its lease ``lease_until``, renewed by its owner (``Claims``);
  ``cancel#<job>``                 the job is cancelled (``mark_cancelled``, ``cancelled_jobs``);
  ``slots:<control queue>``        a worker's thread count (``record_slots``, ``read_slots``);
  ``signing-key:<id>``             a scheduler's signing key (signing.py's items).

Job ids are JOB_ID (no ``:`` nor ``#``), so no bundle claim's key begins like another
kind's.  Cancel marks written by the code before ``cancel#`` (under the bare job id) are
not read: such a cancel still reaches the workers subscribed through the control topic,
but not one that never heard the broadcast (the mark was its second chance).

AWS behaviour relied on: conditional writes are atomic (of two workers claiming one
bundle, one wins); strongly consistent reads see the last write; TTL deletes an
item some time after its ``expires_at`` (up to days: nothing here relies on when).
"""

from __future__ import annotations

import re
import time
from typing import Any

from cloudkon import aws
from cloudkon.defaults import RETENTION_SECONDS
from cloudkon.tasks import Bundle

# A job id as schedulers make them (jobs.py: 16 hex digits), with room to spare: it is part of a
# claim's key (DynamoDB: at most 2,048 bytes) and of log lines, and a ':' or '#' would mix key kinds.
JOB_ID = re.compile(r"[0-9A-Za-z_-]{1,64}")
_CANCEL_PREFIX = "cancel#"
_CANCELLED = "cancelled"
_SLOTS_PREFIX = "slots:"
# DynamoDB's limit of keys per BatchGetItem.
_BATCH_GET_KEYS = 100


def ensure_claim_table(dynamodb: Any, name: str) -> None:
    """The claim table ``name``, created if missing: key ``claim``; items expire by ``expires_at``."""
    aws.ensure_table(dynamodb, name, [("claim", "HASH")], ttl_attribute="expires_at")


def claim_key(bundle: Bundle) -> str:
    """The claim of ``bundle`` (one too large for one message travels as parts with its number:
    each is claimed)."""
    return f"{bundle.job}:{bundle.bundle}:{bundle.ids[0] if bundle.ids else 0}"


def job_of(key: str) -> str:
    """The job of the bundle claimed as ``key``."""
    return key.split(":", 1)[0]


def _expires_at() -> dict[str, str]:
    return {"N": str(int(time.time() + RETENTION_SECONDS))}


class Claims:
    """A worker's leases on bundles, so that each bundle runs once."""

    def __init__(self, dynamodb: Any, table: str, owner: str, lease_seconds: int) -> None:
        self._dynamodb = dynamodb
        self._table = table
        self._owner = owner
        self._lease = lease_seconds
        self._leased_until: dict[str, float] = {}  # claim -> end of the lease this worker last wrote

    def claim(self, key: str) -> str:
        """'won' if this worker now holds ``key``; else 'done', or 'held:SECONDS' left on another's lease."""
        now = time.time()
        if aws.write_if(
                "claiming a bundle", self._dynamodb.put_item, TableName=self._table,
                Item={"claim": {"S": key}, "owner": {"S": self._owner}, "state": {"S": "running"},
                      "lease_until": {"N": f"{now + self._lease:.3f}"}, "expires_at": _expires_at()},
                ConditionExpression="attribute_not_exists(claim) OR "
                                    "(#state = :running AND lease_until < :now)",
                ExpressionAttributeNames={"#state": "state"},
                ExpressionAttributeValues={":running": {"S": "running"}, ":now": {"N": f"{now:.3f}"}}):
            self._leased_until[key] = now + self._lease
            return "won"
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
        if not aws.write_if(
                "renewing a claim", self._dynamodb.update_item, TableName=self._table,
                Key={"claim": {"S": key}},
                UpdateExpression="SET lease_until = :until", ConditionExpression="#owner = :me",
                ExpressionAttributeNames={"#owner": "owner"},
                ExpressionAttributeValues={":until": {"N": f"{until:.3f}"}, ":me": {"S": self._owner}}):
            self._leased_until.pop(key, None)
            return False
        self._leased_until[key] = until
        return True

    def still_mine(self, key: str) -> bool:
        """True if this worker still holds ``key``: known without a call while a third of the lease is
        left (renewals keep two thirds, and the rest covers clock skew), else asked of the table."""
        return time.time() < self._leased_until.get(key, 0.0) - self._lease / 3 or self.renew(key)

    def release(self, key: str) -> None:
        """Give up a lease this worker holds, so another worker may run the bundle at once (no matter
        if it holds it no longer)."""
        self._leased_until.pop(key, None)
        aws.write_if("releasing a claim", self._dynamodb.delete_item, TableName=self._table,
                     Key={"claim": {"S": key}}, ConditionExpression="#owner = :me AND #state = :running",
                     ExpressionAttributeNames={"#owner": "owner", "#state": "state"},
                     ExpressionAttributeValues={":me": {"S": self._owner}, ":running": {"S": "running"}})

    def finish(self, key: str) -> bool:
        """Mark ``key`` done if this worker still holds it; False if another worker does."""
        self._leased_until.pop(key, None)
        return aws.write_if(
            "marking a bundle done", self._dynamodb.update_item, TableName=self._table,
            Key={"claim": {"S": key}}, UpdateExpression="SET #state = :done",
            ConditionExpression="#owner = :me",
            ExpressionAttributeNames={"#state": "state", "#owner": "owner"},
            ExpressionAttributeValues={":done": {"S": "done"}, ":me": {"S": self._owner}})


def mark_cancelled(dynamodb: Any, claim_table: str, job: str) -> None:
    """Record durably that ``job`` is cancelled."""
    with aws.aws_errors(f"recording the cancel of job {job}"):
        dynamodb.put_item(TableName=claim_table, Item={
            "claim": {"S": _CANCEL_PREFIX + job}, "state": {"S": _CANCELLED}, "expires_at": _expires_at()})


def cancelled_jobs(dynamodb: Any, claim_table: str, jobs: set[str]) -> set[str]:
    """Which of ``jobs`` are marked cancelled (strongly consistent: a cancel is never missed)."""
    found: set[str] = set()
    for job in jobs:
        with aws.aws_errors(f"reading the state of job {job}"):
            item = dynamodb.get_item(TableName=claim_table, Key={"claim": {"S": _CANCEL_PREFIX + job}},
                                     ConsistentRead=True).get("Item", {})
        if item.get("state", {}).get("S") == _CANCELLED:
            found.add(job)
    return found


def record_slots(dynamodb: Any, claim_table: str, control_queue: str, threads: int) -> None:
    """Record that the worker of ``control_queue`` runs ``threads`` bundles at once."""
    with aws.aws_errors("recording the worker's thread count"):
        dynamodb.put_item(TableName=claim_table, Item={
            "claim": {"S": _SLOTS_PREFIX + control_queue}, "threads": {"N": str(threads)},
            "expires_at": _expires_at()})


def read_slots(dynamodb: Any, claim_table: str, control_queues: list[str]) -> dict[str, int]:
    """The thread counts recorded by the workers of ``control_queues``, by queue (one read per 100)."""
    threads: dict[str, int] = {}
    for start in range(0, len(control_queues), _BATCH_GET_KEYS):
        part = control_queues[start:start + _BATCH_GET_KEYS]
        keys = [{"claim": {"S": _SLOTS_PREFIX + name}} for name in part]
        with aws.aws_errors("reading the workers' thread counts"):
            found = dynamodb.batch_get_item(RequestItems={claim_table: {"Keys": keys}})
        for item in found.get("Responses", {}).get(claim_table, []):
            threads[item["claim"]["S"].removeprefix(_SLOTS_PREFIX)] = int(item["threads"]["N"])
    return threads
