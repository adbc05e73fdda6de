"""EC2 workers on demand: launching by backlog, the fleet registry, heartbeats, cleanup.

Owns both sides of a fleet of worker instances:
  - ``Fleet`` (the scheduler's side): launches instances as the policy (fleetpolicy) says
    for the backlog's estimated work (up to a maximum), records each one in the fleet
    registry before relying on it, adopts the registered instances of an earlier
    scheduler of the same fleet, and terminates instances whose heartbeat stopped or
    that never sent one within the boot deadline (SQS then redelivers their bundles).
    Idle instances terminate themselves, after the keep time the policy sets in the registry.
  - ``Instance`` (the worker's side): its identity and launch settings from the
    instance metadata service (IMDSv2), its heartbeat, and its self-termination.

The registry is a DynamoDB table (key: ``fleet``, ``instance``) whose items carry
``launched_at``, once the worker runs ``heartbeat_at`` (its UpdateItem returns the item: the
worker reads ``idle_timeout`` there, which the scheduler updates when its policy's keep time
changes).  Instances are also tagged ``cloudkon:fleet`` at launch, so one launched just before a
crash is found by its tag.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from typing import Any

from cloudkon import aws
from cloudkon.capacity import LaunchPlan
from cloudkon.control import delete_queue, queue_name
from cloudkon.costs import FleetUsage
from cloudkon.defaults import (
    DEFAULT_BOOT_TIMEOUT,
    DEFAULT_CLAIM_TABLE,
    DEFAULT_CONTROL_TOPIC,
    DEFAULT_FLEET,
    DEFAULT_FLEET_TABLE,
    DEFAULT_HEARTBEAT_SECONDS,
    DEFAULT_HEARTBEAT_TIMEOUT,
    DEFAULT_INSTANCE_TYPE,
    DEFAULT_REQUEST_QUEUE,
    DEFAULT_VISIBILITY_TIMEOUT,
    DEFAULT_WORKER_IDLE_TIMEOUT,
    DEFAULT_WORKER_THREADS,
)
from cloudkon.errors import BackendError, ConditionFailed, ResourceNotFound
from cloudkon.fleetpolicy import FleetPolicy, IdleRule

log = logging.getLogger("cloudkon.fleet")

FLEET_TAG = "cloudkon:fleet"
_GONE_STATES = ("shutting-down", "terminated", "stopping", "stopped")
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


@dataclass
class LaunchOptions:
    """How to launch a worker instance (the usual run_instances options)."""

    ami: str
    # Tried in this order when EC2 refuses one for capacity (capacity.py); spot_ratio: the share of spot.
    instance_types: list[str] = field(default_factory=lambda: [DEFAULT_INSTANCE_TYPE])
    key_name: str | None = None
    subnets: list[str] = field(default_factory=list)
    security_groups: list[str] = field(default_factory=list)
    instance_profile: str | None = None
    spot_ratio: float = 0.0


class Fleet:
    """The scheduler's worker instances: launch by backlog, adopt, retire the dead, clean up."""

    def __init__(self, settings: WorkerSettings, launch: LaunchOptions | None, max_workers: int,
                 heartbeat_timeout: float = DEFAULT_HEARTBEAT_TIMEOUT,
                 boot_timeout: float = DEFAULT_BOOT_TIMEOUT, make_registry: bool = True,
                 policy: FleetPolicy | None = None) -> None:
        """``make_registry``: create the fleet table if it is missing (not to clean up: a fleet
        without one has nothing registered)."""
        self.settings = settings
        self.policy = policy or FleetPolicy(max_workers, settings.threads, IdleRule(settings.idle_timeout))
        self._booting: list[float] = []  # launch times of the live instances not heard of yet
        self.launch_options = launch
        self.capacity = (LaunchPlan(launch.instance_types, launch.subnets, launch.spot_ratio)
                         if launch else None)
        self.max_workers = max_workers
        self.heartbeat_timeout = heartbeat_timeout
        self.boot_timeout = boot_timeout
        self.ec2 = aws.client("ec2")
        self.dynamodb = aws.client("dynamodb")
        if make_registry:
            aws.ensure_table(self.dynamodb, settings.fleet_table, [("fleet", "HASH"), ("instance", "RANGE")])
        self._last_decision: tuple[bool, int, int] | None = None
        self.usage = FleetUsage()  # the instances' runs, as each describe shows them (costs.py)
        adopted = self.live_instances()
        log.info("fleet %s: adopted %d running instance(s)", settings.fleet, len(adopted))

    def scale(self, backlog: float) -> None:
        """One scaling step: retire dead instances, then launch and set the idle workers' keep time
        by the policy (fleetpolicy) for ``backlog`` seconds of estimated work."""
        live = self.live_instances()
        decision = self.policy.decide(time.time(), backlog, len(live) - len(self._booting), self._booting)
        self.settings.idle_timeout = decision.keep  # what the next launches are told in their user data
        if self.policy.news(decision.keep):
            self._tell_keep(live, decision.keep)
        launch = decision.launch if self.launch_options else 0
        launched = self._launch(launch) if launch else 0  # fewer when capacity was refused
        state = (backlog > 0, len(live), len(self._booting))
        if launched or self._last_decision != state:
            log.info("scaling: backlog %.0f s of work, %d live worker(s) (%d booting, boot %.0f s), "
                     "launched %d; idle ones kept %.0f s", backlog, *state[1:], decision.boot, launched,
                     decision.keep)
            self._last_decision = state

    def _tell_keep(self, live: list[str], keep: float) -> None:
        """The live workers' keep time, in their registry items (their heartbeats read it back)."""
        for instance in live:
            aws.write_if("setting an idle timeout", self.dynamodb.update_item,
                         TableName=self.settings.fleet_table,
                         Key={"fleet": {"S": self.settings.fleet}, "instance": {"S": instance}},
                         UpdateExpression="SET idle_timeout = :keep",
                         ConditionExpression="attribute_exists(launched_at)",  # not one that left
                         ExpressionAttributeValues={":keep": {"N": f"{keep:.3f}"}})

    def live_instances(self) -> list[str]:
        """Instances of this fleet that are running and healthy; the dead are terminated on the way."""
        now = time.time()
        items = {item["instance"]["S"]: item for item in self._registered()}
        states = self._instances()
        live, dead = [], []
        self._booting = []
        for instance, state in states.items():
            item = items.get(instance)
            if state in _GONE_STATES:
                if item is not None:
                    self._unregister(instance)
                continue
            if item is None:  # launched just before a crash, never registered: adopt it now
                self._register(instance, now)
                live.append(instance)
                continue
            heartbeat = float(item.get("heartbeat_at", {}).get("N", 0))
            launched = float(item["launched_at"]["N"])
            if heartbeat:
                self.policy.boots.observe(instance, launched, heartbeat)
            if heartbeat and now - heartbeat > self.heartbeat_timeout:
                dead.append((instance, f"no heartbeat for {now - heartbeat:.0f} s"))
            elif not heartbeat and now - launched > self.boot_timeout:
                dead.append((instance, f"no heartbeat {now - launched:.0f} s after launch"))
            else:
                live.append(instance)
                if not heartbeat:
                    self._booting.append(launched)
        for instance in set(items) - set(states):  # the instance no longer exists at all
            self._unregister(instance)
        for instance, reason in dead:
            log.warning("terminating %s: %s (its bundles will be redelivered)", instance, reason)
            self._terminate([instance])
        return live

    def cleanup(self) -> int:
        """Terminate every instance of this fleet; how many there were."""
        registered = {item["instance"]["S"] for item in self._registered()}
        running = [i for i, state in self._instances().items() if state != "terminated"]
        if running:
            self._terminate(running)
        for instance in registered - set(running):
            self._unregister(instance)
        log.info("fleet %s: terminated %d instance(s)", self.settings.fleet, len(running))
        return len(running)

    def remove_resources(self) -> None:
        """Delete the queues (request, every response queue, their dead-letter queues) and the
        claim and fleet tables.  The jobs table stays: it holds the users' results."""
        sqs = aws.client("sqs")
        with aws.aws_errors("removing queues"):
            urls = sqs.list_queues(QueueNamePrefix=aws.RESPONSE_QUEUE_PREFIX).get("QueueUrls", [])
        for name in (self.settings.request_queue, aws.dead_letter_queue(self.settings.request_queue)):
            urls.append(aws.queue_url(sqs, name))
        with aws.aws_errors("removing queues"):
            for url in filter(None, urls):
                sqs.delete_queue(QueueUrl=url)
                log.info("deleted queue %s", url)
        for table in (self.settings.claim_table, self.settings.fleet_table):
            try:
                with aws.aws_errors(f"removing table {table}"):
                    self.dynamodb.delete_table(TableName=table)
                log.info("deleted table %s", table)
            except ResourceNotFound:
                pass

    # --- EC2 and the registry ----------------------------------------------------

    def _launch(self, count: int) -> int:
        """Launch up to ``count`` instances; how many EC2 granted."""
        options = self.launch_options
        assert options is not None and self.capacity is not None
        request: dict[str, Any] = {
            "ImageId": options.ami,
            "UserData": self.settings.to_user_data(), "InstanceInitiatedShutdownBehavior": "terminate",
            "MetadataOptions": {"HttpTokens": "required", "HttpEndpoint": "enabled"},
            "TagSpecifications": [{"ResourceType": "instance", "Tags": [
                {"Key": "Name", "Value": f"cloudkon-worker-{self.settings.fleet}"},
                {"Key": FLEET_TAG, "Value": self.settings.fleet}]}],
        }
        if options.key_name:
            request["KeyName"] = options.key_name
        if options.security_groups:
            request["SecurityGroupIds"] = options.security_groups
        if options.instance_profile:
            request["IamInstanceProfile"] = {"Name": options.instance_profile}
        instances = self.capacity.launch(count, request)  # type, subnet, market: fallbacks, backoff
        now = time.time()
        for instance in instances:
            self._register(instance["InstanceId"], now)
        if instances:  # none when every instance type and subnet was refused (capacity.py logs it)
            log.info("launched %s", ", ".join(f"{i['InstanceId']} ({i['InstanceType']}"
                                             f"{', spot' if i.get('InstanceLifecycle') == 'spot' else ''})"
                                             for i in instances))
        return len(instances)

    def _terminate(self, instances: list[str]) -> None:
        with aws.aws_errors("terminating instances"):
            self.ec2.terminate_instances(InstanceIds=instances)
        sqs = aws.client("sqs")
        for instance in instances:
            self._unregister(instance)
            try:  # a worker that stopped answering cannot delete its control queue itself
                delete_queue(sqs, queue_name(instance))
            except BackendError as exc:
                log.warning("%s", exc)

    def _instances(self) -> dict[str, str]:
        """State of every instance tagged as this fleet's (registered or not)."""
        with aws.aws_errors("describing instances"):
            pages = self.ec2.get_paginator("describe_instances").paginate(
                Filters=[{"Name": f"tag:{FLEET_TAG}", "Values": [self.settings.fleet]}])
            described = [i for page in pages for r in page["Reservations"] for i in r["Instances"]]
        self.usage.observe(described)
        return {i["InstanceId"]: i["State"]["Name"] for i in described}

    def _registered(self) -> list[dict[str, Any]]:
        try:
            with aws.aws_errors("reading the fleet registry"):
                pages = self.dynamodb.get_paginator("query").paginate(
                    TableName=self.settings.fleet_table, KeyConditionExpression="fleet = :fleet",
                    ExpressionAttributeValues={":fleet": {"S": self.settings.fleet}}, ConsistentRead=True)
                return [item for page in pages for item in page["Items"]]
        except ResourceNotFound:
            return []  # no registry table: nothing was ever registered

    def _register(self, instance: str, launched_at: float) -> None:
        with aws.aws_errors("registering an instance"):
            self.dynamodb.put_item(TableName=self.settings.fleet_table, Item={
                "fleet": {"S": self.settings.fleet}, "instance": {"S": instance},
                "launched_at": {"N": f"{launched_at:.3f}"}})

    def _unregister(self, instance: str) -> None:
        with aws.aws_errors("unregistering an instance"):
            self.dynamodb.delete_item(TableName=self.settings.fleet_table, Key={
                "fleet": {"S": self.settings.fleet}, "instance": {"S": instance}})


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
        """Mark this instance alive in the registry (only once the scheduler has registered it); the
        same call reads back the idle timeout the scheduler set there and the launch time."""
        try:
            with aws.aws_errors("sending a heartbeat"):
                item = dynamodb.update_item(
                    TableName=self.settings.fleet_table, ReturnValues="ALL_NEW",
                    Key={"fleet": {"S": self.settings.fleet}, "instance": {"S": self.id}},
                    UpdateExpression="SET heartbeat_at = :now",
                    ConditionExpression="attribute_exists(launched_at)",
                    ExpressionAttributeValues={":now": {"N": f"{time.time():.3f}"}})["Attributes"]
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
