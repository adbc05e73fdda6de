"""DynamoJobStore: the job store of remote mode, in one DynamoDB table.

Owns the table's layout.  Every item of a job shares its partition key ``job``; the
sort key ``part`` tells them apart:

    job=<id>  part=job            owner (the scheduler's --state name), created_at, timeout,
                                  and once finished: total, finished_at, succeeded, failed, cancelled,
                                  cost (its figures, JSON; remote mode: costs.py)
    job=<id>  part=t#<first id>   tasks, a JSON list, split so that an item stays small
    job=<id>  part=r#<n>          a results message (the protocol's JSON, cut by sqsmessages.response_bodies),
                                  the n-th of the job
    job=scheduler#<name> part=starts   how many times that scheduler started

Items carry ``expires_at`` for DynamoDB's TTL (see BACKSTOP_SECONDS); the scheduler
removes a job itself once its results expire.

DynamoDB behaviour relied on: an item is at most 400 KB (items here stay under
MAX_SQS_MESSAGE_BYTES); BatchWriteItem takes 25 puts or deletes and may hand some
back unprocessed; a Query returns one partition's items in sort-key order, a page
(1 MB) at a time.  Loading a scheduler's jobs scans the table once, at start.
"""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Iterable, Iterator
from typing import Any

from cloudkon import aws
from cloudkon.aws import MAX_SQS_MESSAGE_BYTES, aws_errors
from cloudkon.jobs import Job
from cloudkon.jobstore import (
    JobFinished,
    JobOpened,
    JobStore,
    Record,
    ResultsAdded,
    TasksAdded,
    checked_job,
    decode_results,
    encode_cost,
    finished_job,
    restore_job,
)
from cloudkon.sqsmessages import response_bodies
from cloudkon.tasks import ResultBatch

BATCH_WRITE_ITEMS = 25
# Every item also expires by DynamoDB's own TTL this long after --result-ttl from its
# writing: a backstop for a scheduler that never comes back to remove its jobs.  A job
# still running that long after its last write could not be resumed.
BACKSTOP_SECONDS = 30 * 24 * 3600
# Bytes of task commands per item: well under the item limit, with room for the keys.
TASK_ITEM_BYTES = 300_000
_RETRY_PAUSE_SECONDS = 0.2


class DynamoJobStore(JobStore):
    """Jobs of the scheduler named ``name`` in table ``table`` (created if missing)."""

    def __init__(self, table: str, name: str, result_ttl: float) -> None:
        self.table = table
        self.name = name
        self._lifetime = int(result_ttl) + BACKSTOP_SECONDS
        self._dynamodb = aws.client("dynamodb")
        aws.ensure_table(self._dynamodb, table, [("job", "HASH"), ("part", "RANGE")],
                         ttl_attribute="expires_at")
        self._meta: dict[str, dict[str, Any]] = {}  # job id -> its "job" item
        self._results_written: dict[str, int] = {}  # job id -> r# items so far
        # The records of a write that failed, and its requests not yet written: the journal
        # gives the same records again, and they go on from there (not numbered twice).
        self._unfinished: tuple[list[Record], list[dict[str, Any]]] | None = None

    def describe(self) -> str:
        return f"DynamoDB table {self.table} as {self.name!r} (restart with --state {self.name} to resume)"

    def start(self) -> int:
        with aws_errors("counting scheduler starts"):
            answer = self._dynamodb.update_item(
                TableName=self.table, Key=_key(f"scheduler#{self.name}", "starts"),
                UpdateExpression="ADD starts :one", ExpressionAttributeValues={":one": {"N": "1"}},
                ReturnValues="UPDATED_NEW")
        return int(answer["Attributes"]["starts"]["N"])

    def load(self, finished_since: float) -> list[Job]:
        with aws_errors(f"reading jobs from {self.table}"):
            metas = [item for page in self._dynamodb.get_paginator("scan").paginate(
                TableName=self.table, FilterExpression="part = :job AND #owner = :name",
                ExpressionAttributeNames={"#owner": "owner"},
                ExpressionAttributeValues={":job": {"S": "job"}, ":name": {"S": self.name}})
                for item in page["Items"]]
        jobs, expired = [], []
        for meta in metas:
            job_id = meta["job"]["S"]
            self._meta[job_id] = meta
            job = checked_job(job_id, functools.partial(self._job, job_id, meta))
            if job is not None and job.finished_at is not None and job.finished_at < finished_since:
                expired.append(job_id)
            elif job is not None:
                jobs.append(job)
        self.remove(expired)
        return sorted(jobs, key=lambda job: job.created_at)

    def _job(self, job_id: str, meta: dict[str, Any]) -> Job:
        """A job from its item (and, unfinished, its tasks and results); ValueError and the like if
        an item is not of the right shape."""
        created_at, finished_at = float(meta["created_at"]["N"]), _number(meta, "finished_at")
        if finished_at is not None:
            return finished_job(job_id, created_at, int(meta["total"]["N"]), finished_at,
                                int(meta["succeeded"]["N"]), int(meta["failed"]["N"]),
                                int(_number(meta, "cancelled") or 0), meta.get("cost", {}).get("S"))
        return restore_job(job_id, created_at, _number(meta, "timeout"), self.read_commands(job_id),
                           self.read_results(job_id))

    def write(self, records: list[Record]) -> None:
        if self._unfinished is None or self._unfinished[0] is not records:
            self._unfinished = (records, self._requests(records))
        self._batch_write(self._unfinished[1])
        self._unfinished = None

    def _requests(self, records: list[Record]) -> list[dict[str, Any]]:
        # BatchWriteItem takes one write per item: the last one wins.
        items: dict[tuple[str, str], dict[str, Any]] = {}
        expires_at = {"N": str(int(time.time()) + self._lifetime)}
        for record in records:
            for item in self._items(record):
                item["expires_at"] = expires_at
                key = (item["job"]["S"], item["part"]["S"])
                items.pop(key, None)  # a job's finished marker goes after its results
                items[key] = item
        return [{"PutRequest": {"Item": item}} for item in items.values()]

    def _items(self, record: Record) -> Iterator[dict[str, Any]]:
        if isinstance(record, ResultsAdded):
            for body in response_bodies(record.batch, MAX_SQS_MESSAGE_BYTES):
                n = self._results_written.get(record.job, 0)
                self._results_written[record.job] = n + 1
                yield {**_key(record.job, f"r#{n:012d}"), "batch": {"S": body}}
        elif isinstance(record, TasksAdded):
            for start, commands in _pieces(record.start, record.commands):
                yield {**_key(record.job, f"t#{start:012d}"), "commands": {"S": commands}}
        elif isinstance(record, JobOpened):
            meta = {**_key(record.job, "job"), "owner": {"S": self.name},
                    "created_at": {"N": repr(record.created_at)}}
            if record.timeout is not None:
                meta["timeout"] = {"N": repr(record.timeout)}
            self._meta[record.job] = meta
            yield meta
        elif isinstance(record, JobFinished):
            meta = {**self._meta.pop(record.job), "total": {"N": str(record.total)},
                    "finished_at": {"N": repr(record.finished_at)},
                    "succeeded": {"N": str(record.succeeded)}, "failed": {"N": str(record.failed)},
                    "cancelled": {"N": str(record.cancelled)}}
            cost = encode_cost(record.cost)
            if cost is not None:
                meta["cost"] = {"S": cost}
            self._results_written.pop(record.job, None)
            yield meta

    def read_commands(self, job_id: str) -> list[str]:
        commands: list[str] = []
        for item in self._query(job_id, "t#"):
            commands.extend(json.loads(item["commands"]["S"]))
        return commands

    def read_results(self, job_id: str) -> list[ResultBatch]:
        batches = [decode_results(item["batch"]["S"].encode()) for item in self._query(job_id, "r#")]
        self._results_written[job_id] = max(self._results_written.get(job_id, 0), len(batches))
        return batches

    def remove(self, job_ids: Iterable[str]) -> None:
        for job_id in job_ids:
            self._meta.pop(job_id, None)
            self._results_written.pop(job_id, None)
            self._batch_write([{"DeleteRequest": {"Key": _key(job_id, item["part"]["S"])}}
                               for item in self._query(job_id, keys_only=True)])

    def close(self) -> None:
        """Nothing to release: the client holds no connection between calls."""

    def _query(self, job_id: str, prefix: str = "", keys_only: bool = False) -> Iterator[dict[str, Any]]:
        options: dict[str, Any] = {"TableName": self.table, "KeyConditionExpression": "job = :job",
                                   "ExpressionAttributeValues": {":job": {"S": job_id}}}
        if prefix:  # (DynamoDB refuses an empty one)
            options["KeyConditionExpression"] += " AND begins_with(part, :prefix)"
            options["ExpressionAttributeValues"][":prefix"] = {"S": prefix}
        if keys_only:
            options["ProjectionExpression"] = "job, part"
        with aws_errors(f"reading job {job_id}"):
            for page in self._dynamodb.get_paginator("query").paginate(**options):
                yield from page["Items"]

    def _batch_write(self, requests: list[dict[str, Any]]) -> None:
        """Write ``requests``, removing each from the list once written (what a failure leaves
        in it is what is still to write)."""
        with aws_errors(f"writing to {self.table}"):
            while requests:
                chunk = requests[:BATCH_WRITE_ITEMS]
                answer = self._dynamodb.batch_write_item(RequestItems={self.table: chunk})
                unprocessed = answer.get("UnprocessedItems", {}).get(self.table, [])
                requests[:BATCH_WRITE_ITEMS] = unprocessed  # the written ones leave, the others go first
                if unprocessed:  # throttled: DynamoDB asks to back off and send these again
                    time.sleep(_RETRY_PAUSE_SECONDS)


def _key(job: str, part: str) -> dict[str, Any]:
    return {"job": {"S": job}, "part": {"S": part}}


def _number(item: dict[str, Any], name: str) -> float | None:
    return float(item[name]["N"]) if name in item else None


def _pieces(start: int, commands: list[str]) -> Iterator[tuple[int, str]]:
    """(first task id, JSON list) pieces of ``commands``, each within TASK_ITEM_BYTES."""
    first, size = 0, 0
    for i, command in enumerate(commands):
        length = len(json.dumps(command, ensure_ascii=False).encode()) + 2
        if size + length > TASK_ITEM_BYTES and i > first:
            yield start + first, json.dumps(commands[first:i], ensure_ascii=False)
            first, size = i, 0
        size += length
    if first < len(commands):
        yield start + first, json.dumps(commands[first:], ensure_ascii=False)

