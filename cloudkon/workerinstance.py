"""A fleet's worker instance, as its worker sees it: launch settings, identity, heartbeat, retirement.

Owns what the worker side of a fleet (provisioning.py is the scheduler's) reads and writes:
``WorkerSettings``, passed at launch as the instance's user data (one image serves every fleet);
``Instance``, its identity and settings from the instance metadata service (IMDSv2), its
heartbeat in the fleet registry and its self-termination; and the metadata reads themselves.

The heartbeat is one UpdateItem of the instance's registry item (provisioning.py describes the
item): it SETs ``heartbeat_at`` and ``aws_calls``, this worker's AWS requests so far by
``service.Operation`` (a map; a few hundred bytes, so the item stays within one write unit),
which the scheduler's registry scan reads for the cost report (costs.WorkerRequests).  The
heartbeat's own request is in the next one's counts.  A worker without --ec2 sends none.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from typing import Any

from cloudkon import aws
from cloudkon.defaults import (
    DEFAULT_CLAIM_TABLE,
    DEFAULT_CONTROL_TOPIC,
    DEFAULT_FLEET,
    DEFAULT_FLEET_TABLE,
    DEFAULT_HEARTBEAT_SECONDS,
    DEFAULT_REQUEST_QUEUE,
    DEFAULT_VISIBILITY_TIMEOUT,
    DEFAULT_WORKER_IDLE_TIMEOUT,
    DEFAULT_WORKER_THREADS,
)
from cloudkon.errors import BackendError, ConditionFailed

log = logging.getLogger("cloudkon.fleet")

_IMDS_DEFAULT_ENDPOINT = "http://169.254.169.254/"
_IMDS_TIMEOUT_SECONDS = 2.0
# Off EC2 the metadata address may not answer at all: a worker asks only this long.
_IMDS_PROBE_SECONDS = 0.5


@dataclass
class WorkerSettings:
    """What a worker instance needs at boot, passed as its user data (one image serves every fleet)."""

    fleet: str = DEFAULT_FLEET
    fleet_table: str = DEFAULT_FLEET_TABLE
    request_queue: str = DEFAULT_REQUEST_QUEUE
    claim_table: str = DEFAULT_CLAIM_TABLE
    threads: int = DEFAULT_WORKER_THREADS
    idle_timeout: float = DEFAULT_WORKER_IDLE_TIMEOUT
    visibility_timeout: int = DEFAULT_VISIBILITY_TIMEOUT
    heartbeat_seconds: float = DEFAULT_HEARTBEAT_SECONDS
    control_topic: str = DEFAULT_CONTROL_TOPIC
    # An idle worker stays until this long after its launch (EC2's billed minimum; 0: the fixed idle timeout).
    billed_minimum: float = 0.0

    def to_user_data(self) -> str:
        return json.dumps({"cloudkon": asdict(self)})

    @classmethod
    def from_user_data(cls, text: str) -> WorkerSettings:
        try:
            values = json.loads(text)["cloudkon"]
            return cls(**{k: v for k, v in values.items() if k in cls.__dataclass_fields__})
        except (ValueError, KeyError, TypeError) as exc:
            raise BackendError(f"instance user data is not CloudKon worker settings: {exc}") from None



class Instance:
    """This EC2 instance, as its worker sees it: identity, settings, heartbeat, retirement."""

    def __init__(self, instance_id: str, region: str, settings: WorkerSettings) -> None:
        self.id = instance_id
        self.region = region
        self.settings = settings
        self.keep: float | None = None  # the idle timeout in the registry (set by the scheduler)
        self.paid_until = 0.0  # wall clock: launch + billed minimum, once a heartbeat read the launch

    @classmethod
    def from_metadata(cls) -> Instance:
        """Read identity, region and user data from IMDSv2 (AWS_EC2_METADATA_SERVICE_ENDPOINT, if set)."""
        try:
            instance_id, region, user_data = _read_metadata(
                "meta-data/instance-id", "meta-data/placement/region", "user-data")
        except OSError as exc:
            raise BackendError(f"no EC2 instance metadata at {_imds_base()} ({exc}): "
                               "is this an EC2 instance?") from None
        return cls(instance_id, region, WorkerSettings.from_user_data(user_data))

    def heartbeat(self, dynamodb: Any) -> None:
        """Mark this instance alive in the registry (only once the scheduler has registered it), with
        this worker's AWS request counts so far; the same call reads back the idle timeout the
        scheduler set there and the launch time."""
        try:
            with aws.aws_errors("sending a heartbeat"):
                item = dynamodb.update_item(
                    TableName=self.settings.fleet_table, ReturnValues="ALL_NEW",
                    Key={"fleet": {"S": self.settings.fleet}, "instance": {"S": self.id}},
                    UpdateExpression="SET heartbeat_at = :now, aws_calls = :calls",
                    ConditionExpression="attribute_exists(launched_at)",
                    ExpressionAttributeValues={":now": {"N": f"{time.time():.3f}"}, ":calls": {"M": {
                        operation: {"N": str(n)} for operation, n in aws.call_counts().items()}}},
                )["Attributes"]
        except ConditionFailed:
            log.info("not in the fleet registry (yet): no heartbeat sent")
            return
        if "idle_timeout" in item:
            self.keep = float(item["idle_timeout"]["N"])
        self.paid_until = float(item["launched_at"]["N"]) + self.settings.billed_minimum

    def idle_rule(self, keep: float) -> tuple[float, float]:
        """(seconds an idle worker stays: the scheduler's latest word, else ``keep``; the monotonic
        time before which it stays anyway: the end of its billed minimum)."""
        return (keep if self.keep is None else self.keep), time.monotonic() + self.paid_until - time.time()

    def retire(self, dynamodb: Any) -> None:
        """Leave the registry and terminate this instance (the worker has been idle)."""
        log.info("terminating this instance (%s)", self.id)
        with aws.aws_errors("terminating this instance"):
            dynamodb.delete_item(TableName=self.settings.fleet_table, Key={
                "fleet": {"S": self.settings.fleet}, "instance": {"S": self.id}})
            aws.client("ec2", self.region).terminate_instances(InstanceIds=[self.id])


def metadata_instance_id() -> str | None:
    """This machine's EC2 instance id from IMDSv2; None off EC2, or with AWS_EC2_METADATA_DISABLED=true
    (boto's own switch, honoured here too)."""
    if os.environ.get("AWS_EC2_METADATA_DISABLED", "").lower() == "true":
        return None
    try:
        return _read_metadata("meta-data/instance-id", timeout=_IMDS_PROBE_SECONDS)[0]
    except OSError:
        return None


def metadata_item(path: str) -> str | None:
    """One item of this instance's metadata (a path under /latest/), None while it has none (404)."""
    try:
        return _read_metadata(path)[0]
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            return None
        raise


def _imds_base() -> str:
    return os.environ.get("AWS_EC2_METADATA_SERVICE_ENDPOINT", _IMDS_DEFAULT_ENDPOINT).rstrip("/")


def _read_metadata(*paths: str, timeout: float = _IMDS_TIMEOUT_SECONDS) -> list[str]:
    """Items of the instance metadata (paths under /latest/), read with an IMDSv2 session token."""
    token = _imds("/latest/api/token", timeout, method="PUT",
                  headers={"X-aws-ec2-metadata-token-ttl-seconds": "21600"})
    return [_imds(f"/latest/{path}", timeout, headers={"X-aws-ec2-metadata-token": token}) for path in paths]


def _imds(path: str, timeout: float, method: str = "GET", headers: dict[str, str] | None = None) -> str:
    request = urllib.request.Request(_imds_base() + path, method=method, headers=headers or {})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return response.read().decode()


def send_heartbeats(instance: Instance, dynamodb: Any, stop: threading.Event) -> None:
    """Heartbeat every few seconds until ``stop`` is set (run in a thread)."""
    while True:
        try:
            instance.heartbeat(dynamodb)
        except BackendError as exc:
            log.warning("%s", exc)
        if stop.wait(instance.settings.heartbeat_seconds):
            return
