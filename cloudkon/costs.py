"""What a remote job and a fleet cost: the price table, EC2's billing rule, and the accounting.

Owns the price table (instance types in USD per hour, AWS requests in USD per million, with
defaults and a user's ``--prices FILE`` over them), the billing rule of one instance run, and
the figures the scheduler keeps per fleet and per job: instance-seconds paid, task-seconds
(the sum of the results' elapsed times), the scheduler's and the fleet's workers' AWS requests
by service, and an estimated cost in USD.  Imports no boto3: the fleet (provisioning.py) hands
it what EC2 describes and what its workers' heartbeats say of their requests, and the scheduler
(wiring.py) a function counting its own AWS calls.

AWS behaviour relied on:
  - EC2 bills a Linux instance per second from launch to termination, with a minimum of
    60 s per run (MINIMUM_BILLED_SECONDS); a spot instance at the spot price, else alike.
  - DescribeInstances gives each instance its ``LaunchTime`` (whole seconds), its
    ``InstanceType``, ``InstanceLifecycle`` "spot" for a spot instance, and once terminated
    a ``StateTransitionReason`` of "User initiated (YYYY-MM-DD HH:MM:SS GMT)" (the emulator
    says UTC): the termination time.  Without one, the time the fleet first saw the
    instance gone stands in (later by at most --scale-interval).
  - SQS and SNS bill every API request; DynamoDB on-demand bills a write or read request
    unit per request of an item up to 1 KB (write) or 4 KB (read); EC2's API is free.

The rule per job (figures fixed when the job finishes; the job store keeps them with the job,
so a restarted scheduler still gives them: service.job_cost):
  - instance-seconds: each instance's billed minimum (--billed-minimum) goes to the jobs running when
    it was launched, the seconds past it to the jobs running while it ran; jobs running at
    once split them pro rata of the task-seconds each had over its lifetime (a job's share is
    its task-seconds over every job's task-seconds between its start and its end).  Idle time
    after the last job (the instances' idle timeout) is the fleet's, in no job's figure.
  - requests: the scheduler's requests during the job's lifetime, with the same share; and,
    apart (``worker_requests``), the fleet's workers' requests seen during it, with the same
    share.  A worker of a fleet (``worker.py --ec2``) sends its request counts so far with each
    heartbeat (workerinstance.py), read on the scheduler's next registry scan: its requests
    count when that scan sees them, and those after the last scan that saw its registry item
    (it leaves the registry as it retires) are not counted.  A worker started by hand, not in
    a fleet, sends no heartbeat: its requests are in no figure.
The fleet's figures are everything since the scheduler started: every instance it launched or
adopted, from its launch to its termination (or now), and its workers' requests (an adopted
worker's from its start).
"""

from __future__ import annotations

import json
import math
import re
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from cloudkon.errors import ConfigError
from cloudkon.tasks import ResultBatch

MINIMUM_BILLED_SECONDS = 60.0
# A --prices file larger than this is not a price table.
MAX_PRICES_FILE_BYTES = 1024 * 1024

# us-east-1, Linux, on-demand, as AWS publishes them on aws.amazon.com/ec2/pricing/on-demand/,
# /sqs/pricing/, /sns/pricing/, /dynamodb/pricing/on-demand/ and /s3/pricing/.  Read on
# PRICES_READ from stored copies of those figures (not the live pages): check them before
# relying on a total, and give yours with --prices.
PRICES_READ = "2026-12-07"
DEFAULT_INSTANCE_PRICES = {  # USD per hour
    "t3.nano": 0.0052, "t3.micro": 0.0104, "t3.small": 0.0208, "t3.medium": 0.0416, "t3.large": 0.0832,
    "c5.large": 0.085, "m5.large": 0.096,
}
DEFAULT_REQUEST_PRICES = {  # USD per million requests, by service or service.Operation
    "sqs": 0.40, "sns": 0.50,
    "dynamodb": 0.625,  # a write request unit; reads below
    "dynamodb.GetItem": 0.125, "dynamodb.Query": 0.125, "dynamodb.Scan": 0.125,
    "dynamodb.BatchGetItem": 0.125,
    "s3": 5.0, "s3.GetObject": 0.4, "s3.HeadObject": 0.4, "s3.ListObjectsV2": 5.0,
    "ec2": 0.0,
}
_GONE_STATES = ("shutting-down", "terminated", "stopping", "stopped")
_TERMINATED_AT = re.compile(r"\((\d{4}-\d\d-\d\d \d\d:\d\d:\d\d) (?:GMT|UTC)\)")


@dataclass
class PriceTable:
    """Prices in USD: instances per hour (on-demand; spot, where known), requests per million."""

    instances: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_INSTANCE_PRICES))
    spot: dict[str, float] = field(default_factory=dict)
    requests: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_REQUEST_PRICES))
    source: str = f"default prices of {PRICES_READ}"

    def hourly(self, instance_type: str, spot: bool) -> float | None:
        """USD per hour of an instance (a spot one without a spot price: the on-demand one, at most)."""
        if spot and instance_type in self.spot:
            return self.spot[instance_type]
        return self.instances.get(instance_type)

    def per_request(self, operation: str) -> float:
        """USD of one request ``service.Operation`` (0 for a service without a price)."""
        service = operation.split(".", 1)[0]
        return self.requests.get(operation, self.requests.get(service, 0.0)) / 1e6


def load_prices(path: str | None) -> PriceTable:
    """The default prices, with those of the JSON file at ``path`` over them; ConfigError if the file
    is not a price table: {"instances": {type: USD/hour}, "spot": {type: USD/hour},
    "requests": {"service" or "service.Operation": USD per million}}, each part optional."""
    prices = PriceTable()
    if path is None:
        return prices
    try:
        with open(path, "rb") as file:
            data = file.read(MAX_PRICES_FILE_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"--prices {path}: {exc.strerror or exc}") from None
    if len(data) > MAX_PRICES_FILE_BYTES:
        raise ConfigError(f"--prices {path}: over {MAX_PRICES_FILE_BYTES} bytes: not a price table")
    try:
        table = json.loads(data)
    except ValueError as exc:
        raise ConfigError(f"--prices {path}: not JSON: {exc}") from None
    if not isinstance(table, dict) or not set(table) <= {"instances", "spot", "requests"}:
        raise ConfigError(f"--prices {path}: a JSON object with \"instances\", \"spot\" and/or \"requests\"")
    for part in ("instances", "spot", "requests"):
        given = table.get(part, {})
        if not isinstance(given, dict) or not all(
                isinstance(key, str) and _price(value) for key, value in given.items()):
            raise ConfigError(f"--prices {path}: \"{part}\" must map names to prices in USD "
                              "(numbers, 0 or more)")
        table_part = getattr(prices, part)
        if part == "requests":  # a service's price given replaces the defaults of its operations
            for operation in [op for op in table_part if op.split(".", 1)[0] in given and op not in given]:
                del table_part[operation]
        table_part.update(given)
    prices.source = f"prices of {path} over the defaults of {PRICES_READ}"
    return prices


def _price(value: object) -> bool:
    return type(value) in (int, float) and math.isfinite(value) and value >= 0  # type: ignore[arg-type]


def billed_seconds(launched: float, ended: float, minimum: float = MINIMUM_BILLED_SECONDS) -> float:
    """What EC2 bills for one instance run: per second, at least ``minimum`` (--billed-minimum)."""
    return max(minimum, ended - launched)


@dataclass
class _Run:
    """One instance run: its type, whether spot, its launch and (once over) its end."""

    kind: tuple[str, bool]
    launched: float
    minimum: float  # the billed minimum of a run
    ended: float | None = None

    def job_seconds(self, start: float, end: float) -> float:
        """This run's seconds that go to a job running from ``start`` to ``end`` (the module's rule)."""
        # LaunchTime is in whole seconds: a launch in the second a job started is the job's.
        minimum = self.minimum if math.floor(start) <= self.launched <= end else 0.0
        past_minimum = self.launched + self.minimum
        stop = end if self.ended is None else min(end, self.ended)
        return minimum + max(0.0, stop - max(start, past_minimum))


class WorkerRequests:
    """The AWS requests of a fleet's workers, as their heartbeats report them (fed by the registry
    scans of provisioning.Fleet): the sum of each worker's latest counts."""

    def __init__(self) -> None:
        self._latest: dict[str, dict[str, int]] = {}  # instance -> its counts last seen (kept once gone)
        self._total: dict[str, int] = {}
        self._lock = threading.Lock()  # fed by the scaling thread, read on the event loop

    def seen(self, instance_id: str, counts: dict[str, int]) -> None:
        """A worker's request counts so far, by ``service.Operation``.  A count lower than the one
        seen before is a new worker process on the instance: counted from 0."""
        with self._lock:
            before = self._latest.get(instance_id, {})
            if any(n < before.get(operation, 0) for operation, n in counts.items()):
                before = {}  # a new process: none of the old one's counts stand for it
            for operation, n in counts.items():
                self._total[operation] = self._total.get(operation, 0) + n - before.get(operation, 0)
            self._latest[instance_id] = {**before, **counts}

    def totals(self) -> dict[str, int]:
        """Every worker's requests seen so far, by ``service.Operation``."""
        with self._lock:
            return dict(self._total)


class FleetUsage:
    """The instance runs of a fleet, as DescribeInstances shows them (fed by provisioning.Fleet),
    and its workers' requests (``requests``)."""

    def __init__(self, billed_minimum: float = MINIMUM_BILLED_SECONDS) -> None:
        """``billed_minimum``: what EC2 bills a run at least (--billed-minimum)."""
        self.billed_minimum = billed_minimum
        self._runs: dict[str, _Run] = {}
        self._lock = threading.Lock()  # fed by the scaling thread, read on the event loop
        self.requests = WorkerRequests()

    def observe(self, instances: Iterable[dict[str, Any]], now: float | None = None) -> None:
        """Record what DescribeInstances says of the fleet's instances (all of them): new runs, and
        runs over.  An instance first seen gone ended before this scheduler: not counted."""
        now = time.time() if now is None else now
        with self._lock:
            seen = set()
            for instance in instances:
                seen.add(instance["InstanceId"])
                run = self._runs.get(instance["InstanceId"])
                gone = instance["State"]["Name"] in _GONE_STATES
                if run is None and not gone:
                    kind = (instance.get("InstanceType", ""), instance.get("InstanceLifecycle") == "spot")
                    run = self._runs[instance["InstanceId"]] = _Run(kind, _timestamp(instance["LaunchTime"]),
                                                                self.billed_minimum)
                if run is not None and gone and run.ended is None:
                    run.ended = _terminated_at(instance.get("StateTransitionReason", ""), now)
            for instance_id, run in self._runs.items():
                if instance_id not in seen and run.ended is None:  # gone from EC2's answers altogether
                    run.ended = now

    def paid(self, now: float) -> dict[tuple[str, bool], float]:
        """Instance-seconds billed so far, by (instance type, spot)."""
        with self._lock:
            return _by_kind((run.kind, billed_seconds(run.launched, run.ended or now, run.minimum))
                            for run in self._runs.values())

    def during(self, start: float, end: float) -> dict[tuple[str, bool], float]:
        """Instance-seconds that go to a job running from ``start`` to ``end``, by (type, spot)."""
        with self._lock:
            return _by_kind((run.kind, run.job_seconds(start, end)) for run in self._runs.values())

    def count(self) -> int:
        with self._lock:
            return len(self._runs)


def _by_kind(pairs: Iterable[tuple[tuple[str, bool], float]]) -> dict[tuple[str, bool], float]:
    totals: dict[tuple[str, bool], float] = {}
    for kind, seconds in pairs:
        totals[kind] = totals.get(kind, 0.0) + seconds
    return totals


def _timestamp(value: datetime | str) -> float:
    if isinstance(value, str):  # not parsed by boto (a raw answer)
        value = datetime.fromisoformat(value.replace("Z", "+00:00"))
    return value.timestamp()


def _terminated_at(reason: str, default: float) -> float:
    match = _TERMINATED_AT.search(reason)
    if match is None:
        return default
    return datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S").replace(tzinfo=timezone.utc).timestamp()


@dataclass
class _JobUsage:
    started: float
    total_before: float  # every job's task-seconds when it started
    calls_before: dict[str, int]
    worker_calls_before: dict[str, int]
    task_seconds: float = 0.0
    cost: dict[str, Any] | None = None  # fixed once it finishes


class CostBook:
    """The figures of a remote scheduler's jobs and fleet (the job service feeds it)."""

    def __init__(self, prices: PriceTable, fleet: FleetUsage | None, calls: Callable[[], dict[str, int]],
                 clock: Callable[[], float] = time.time) -> None:
        self.prices = prices
        self.fleet = fleet
        self._calls = calls  # this process's AWS calls so far, by service.Operation
        self._clock = clock
        self._jobs: dict[str, _JobUsage] = {}
        self._task_seconds = 0.0  # every job's, since start

    def opened(self, job_id: str, at: float) -> None:
        self._jobs[job_id] = _JobUsage(at, self._task_seconds, self._calls(), self._worker_calls())

    def add(self, job_id: str, batch: ResultBatch) -> None:
        """New results of a job (each task's once): their elapsed times are task-seconds."""
        seconds = sum(batch.elapsed_us) / 1e6
        self._task_seconds += seconds
        usage = self._jobs.get(job_id)
        if usage is None:  # a job restored from the store: counted from its first results
            usage = self._jobs[job_id] = _JobUsage(self._clock(), self._task_seconds - seconds, self._calls(),
                                                   self._worker_calls())
        usage.task_seconds += seconds

    def finished(self, job_id: str, at: float | None) -> None:
        """The job's figures, fixed now that it has finished."""
        usage = self._jobs.get(job_id)
        if usage is None or usage.cost is not None:
            return
        end = self._clock() if at is None else at
        window = self._task_seconds - usage.total_before
        share = usage.task_seconds / window if window > 0 else 1.0
        instances = {} if self.fleet is None else self.fleet.during(usage.started, end)
        calls = _delta(self._calls(), usage.calls_before)
        worker_calls = _delta(self._worker_calls(), usage.worker_calls_before)
        usage.cost = self._report(usage.task_seconds, instances, calls, worker_calls, share)

    def job_cost(self, job_id: str) -> dict[str, Any] | None:
        """A finished job's figures (None for one unfinished, or finished before a restart: the job
        store has those)."""
        usage = self._jobs.get(job_id)
        return None if usage is None else usage.cost

    def forget(self, job_id: str) -> None:
        self._jobs.pop(job_id, None)

    def fleet_cost(self) -> dict[str, Any]:
        """The figures of everything since the scheduler started."""
        instances = {} if self.fleet is None else self.fleet.paid(self._clock())
        report = self._report(self._task_seconds, instances, self._calls(), self._worker_calls(), 1.0)
        if self.fleet is not None:
            report["instances"] = self.fleet.count()
        return report

    def _worker_calls(self) -> dict[str, int]:
        return {} if self.fleet is None else self.fleet.requests.totals()

    def _report(self, task_seconds: float, instances: dict[tuple[str, bool], float], calls: dict[str, int],
                worker_calls: dict[str, int], share: float) -> dict[str, Any]:
        """The cost object of protocol.py: a share of these instance-seconds and calls."""
        every_call = [*calls.items(), *worker_calls.items()]
        usd = sum(n * share * self.prices.per_request(op) for op, n in every_call)
        unpriced = sorted({kind for (kind, _), seconds in instances.items()
                           if seconds and self.prices.hourly(kind, False) is None})
        for (kind, spot), seconds in instances.items():
            hourly = self.prices.hourly(kind, spot)
            if hourly is not None:
                usd += seconds * share * hourly / 3600
        report: dict[str, Any] = {
            "task_seconds": round(task_seconds, 3), "requests": _by_service(calls, share),
            "usd": None if unpriced else round(usd, 6), "prices": self.prices.source}
        if self.fleet is not None:
            report["instance_seconds"] = round(sum(instances.values()) * share, 3)
            report["worker_requests"] = _by_service(worker_calls, share)
        if unpriced:
            report["unpriced"] = unpriced
        return report


def _delta(now: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    return {op: n - before.get(op, 0) for op, n in now.items() if n > before.get(op, 0)}


def _by_service(calls: dict[str, int], share: float) -> dict[str, int]:
    services: dict[str, float] = {}
    for operation, n in calls.items():
        service = operation.split(".", 1)[0]
        services[service] = services.get(service, 0) + n * share
    return {service: round(n) for service, n in sorted(services.items())}


def describe(cost: dict[str, Any]) -> str:
    """A cost object in words, for the client's summary and --jobs."""
    parts = []
    if cost.get("instance_seconds") is not None:
        parts.append(f"{cost['instance_seconds']:,.0f} instance-s paid")
    parts.append(f"{cost['task_seconds']:,.1f} task-s")
    parts.append(f"AWS requests of the scheduler: {_listed(cost['requests'])}")
    if cost.get("worker_requests") is not None:
        parts.append(f"of its workers: {_listed(cost['worker_requests'])}")
    if cost.get("usd") is None:
        money = f"no price for {', '.join(cost.get('unpriced', [])) or 'its instances'} (--prices)"
    else:
        money = f"about ${cost['usd']:,.6f} at the {cost['prices']}"
    return f"{'; '.join(parts)}; {money}"


def _listed(requests: dict[str, int]) -> str:
    return ", ".join(f"{service} {n:,}" for service, n in requests.items()) or "none"
