"""EC2 workers on demand, the scheduler's side: launching by backlog, the fleet registry, cleanup.

Owns ``Fleet``: it launches instances as the policy (fleetpolicy) says for the backlog's
estimated work (up to a maximum), records each one in the fleet registry before relying on it,
adopts the registered instances of an earlier scheduler of the same fleet, and terminates
instances whose heartbeat stopped or that never sent one within the boot deadline (SQS then
redelivers their bundles).  Idle instances terminate themselves, after the keep time the policy
sets in the registry.  The worker's side (settings, heartbeat, retirement) is workerinstance.py's.

The registry is a DynamoDB table (key: ``fleet``, ``instance``) whose items carry
``launched_at``, once the worker runs ``heartbeat_at`` and ``aws_calls`` (its AWS requests so
far; its UpdateItem returns the item: the worker reads ``idle_timeout`` there, which the
scheduler updates when its policy's keep time changes).  Each scan of the registry hands the
workers' request counts to the cost accounting (costs.FleetUsage.requests).  Instances are also
tagged ``cloudkon:fleet`` at launch, so one launched just before a crash is found by its tag.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

from cloudkon import aws
from cloudkon.capacity import LaunchPlan
from cloudkon.control import delete_queue, queue_name
from cloudkon.costs import FleetUsage
from cloudkon.defaults import DEFAULT_BOOT_TIMEOUT, DEFAULT_HEARTBEAT_TIMEOUT, DEFAULT_INSTANCE_TYPE
from cloudkon.errors import BackendError, ResourceNotFound
from cloudkon.fleetpolicy import FleetPolicy, IdleRule
from cloudkon.workerinstance import WorkerSettings

log = logging.getLogger("cloudkon.fleet")

FLEET_TAG = "cloudkon:fleet"
_GONE_STATES = ("shutting-down", "terminated", "stopping", "stopped")


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
        # The instances' runs, as each describe shows them, and their workers' AWS requests, as each
        # registry scan shows them (costs.py).
        self.usage = FleetUsage(self.policy.idle.billed_minimum)
        # Each instance's EC2 state and registry item at the last scan (read by the dashboard's thread).
        self._seen: tuple[dict[str, str], dict[str, dict[str, Any]]] = ({}, {})
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
        self._seen = (states, items)
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

    def instances_seen(self) -> list[dict[str, Any]]:
        """Each instance the last scan saw: ``id``, its EC2 ``state``, ``last_heartbeat`` (epoch
        seconds; None before its first), for the dashboard and the metrics (no AWS call)."""
        states, items = self._seen
        return [{"id": instance, "state": state,
                 "last_heartbeat": float(items.get(instance, {}).get("heartbeat_at", {}).get("N", 0)) or None}
                for instance, state in states.items()]

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
                items = [item for page in pages for item in page["Items"]]
        except ResourceNotFound:
            return []  # no registry table: nothing was ever registered
        for item in items:
            calls = _worker_calls(item)
            if calls is not None:
                self.usage.requests.seen(item["instance"]["S"], calls)
        return items

    def _register(self, instance: str, launched_at: float) -> None:
        with aws.aws_errors("registering an instance"):
            self.dynamodb.put_item(TableName=self.settings.fleet_table, Item={
                "fleet": {"S": self.settings.fleet}, "instance": {"S": instance},
                "launched_at": {"N": f"{launched_at:.3f}"}})

    def _unregister(self, instance: str) -> None:
        with aws.aws_errors("unregistering an instance"):
            self.dynamodb.delete_item(TableName=self.settings.fleet_table, Key={
                "fleet": {"S": self.settings.fleet}, "instance": {"S": instance}})


def _worker_calls(item: dict[str, Any]) -> dict[str, int] | None:
    """The AWS request counts a worker's heartbeat set in its registry item (workerinstance.py);
    None before its first heartbeat, or if they are not counts."""
    try:
        return {operation: int(count["N"]) for operation, count in item["aws_calls"]["M"].items()}
    except (KeyError, TypeError, ValueError, AttributeError):
        return None
